"""The training engine on a tiny stand-in detector: exact resume (one process, and two gloo
processes each restoring its own RNG stream), atomic checkpoints, refusing a checkpoint of
another model, and two gloo processes equal to one process with the doubled batch.
(The same engine runs the real detectors; methods' one-step runs exercise that path.)"""
import argparse
import os
import random
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from common import engine
from common.checkpoint import read_checkpoint, save_checkpoint
from common.distributed import DistInfo, init_distributed, is_main_process


class NoisyBoxes(torch.utils.data.Dataset):
    """Random images whose single target box is a function of the image; the random flip in
    __getitem__ draws from torch's global RNG, like the real augmentations."""

    def __init__(self, n=24, augment=True):
        g = torch.Generator().manual_seed(123)
        self.images = torch.rand(n, 3, 8, 8, generator=g)
        self.augment = augment

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        if self.augment and torch.rand(()) < 0.5:
            img = img.flip(-1)
        box = img.mean((1, 2)).clamp(0.05, 0.95)
        box = torch.cat([box[:2], box[1:]])[:4]
        return img, {"boxes": box[None], "labels": torch.zeros(1, dtype=torch.int64),
                     "image_id": i}


def collate(batch):
    images = torch.stack([b[0] for b in batch]).contiguous()
    masks = torch.zeros(images.shape[0], 8, 8, dtype=torch.bool)
    return images, masks, [b[1] for b in batch]


class TinyDetector(nn.Module):
    def __init__(self, width=8, dropout=0.1):
        super().__init__()
        self.backbone = nn.Conv2d(3, width, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, 4)

    def forward(self, images, masks):
        x = self.backbone(images).relu().mean((2, 3))
        return self.head(self.drop(x)).sigmoid()


class Trainer(nn.Module):
    """The training-module protocol: forward -> named losses, weight_dict, .student."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.weight_dict = {"loss_bbox": 5.0}

    def forward(self, images, masks, targets):
        pred = self.student(images, masks)
        tgt = torch.cat([t["boxes"] for t in targets])
        return {"loss_bbox": (pred - tgt).abs().mean()}


def build(seed, dropout=0.1, width=8, lr=1e-2):
    torch.manual_seed(seed)
    module = Trainer(TinyDetector(width, dropout))
    opt = torch.optim.AdamW(engine.param_groups(module, lr, lr * 0.1), weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    return module, opt, sched


def run(module, opt, sched, loader, out, start, epochs, history=(), save_every=0,
        dist_info=None):
    args = argparse.Namespace(seed=0)
    return engine.fit(module, opt, sched, loader, args=args, dist_info=dist_info or DistInfo(),
                      output_dir=out, start_epoch=start, epochs=epochs, verbose=False,
                      history=history, save_every=save_every)


def test_resume_equals_uninterrupted_run(tmp_path):
    data = NoisyBoxes()
    loader = engine.make_loader(data, 4, collate, train=True, seed=7)

    module, opt, sched = build(0)
    engine.seed_everything(7)
    run(module, opt, sched, loader, str(tmp_path / "full"), 0, 4)
    full = {k: v.clone() for k, v in module.student.state_dict().items()}

    module, opt, sched = build(0)
    engine.seed_everything(7)
    run(module, opt, sched, loader, str(tmp_path / "cut"), 0, 2)  # "interrupted" after epoch 1
    torch.manual_seed(999)  # the process dies; whatever RNG state a new process has
    module, opt, sched = build(1)  # a fresh process builds a differently initialised model
    ckpt = read_checkpoint(str(tmp_path / "cut" / "checkpoint.pth"))
    start = engine.resume(module, opt, sched, ckpt)
    assert start == 2
    run(module, opt, sched, loader, str(tmp_path / "cut"), start, 4,
        history=engine.log_history(ckpt, ""))
    for k, v in module.student.state_dict().items():
        assert torch.equal(v, full[k]), k
    lines = (tmp_path / "cut" / "log.txt").read_text().splitlines()
    assert [int(__import__("json").loads(x)["epoch"]) for x in lines] == [0, 1, 2, 3]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_resume_refuses_another_model(tmp_path):
    data = NoisyBoxes(8)
    loader = engine.make_loader(data, 4, collate, train=True)
    module, opt, sched = build(0, width=8)
    run(module, opt, sched, loader, str(tmp_path), 0, 1)
    other, opt2, sched2 = build(0, width=16)
    with pytest.raises(ValueError, match=r"does not fit.*backbone.weight \(8, 3, 3, 3\) "
                                         r"\(model \(16, 3, 3, 3\)\)"):
        engine.resume(other, opt2, sched2, str(tmp_path / "checkpoint.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        engine.resume(other, opt2, sched2, str(tmp_path / "nope.pth"))


def test_missing_checkpoint_entries_named(tmp_path):
    path = str(tmp_path / "weights.pth")
    save_checkpoint({"model": {}}, path)
    module, opt, sched = build(0)
    with pytest.raises(ValueError, match="no 'optimizer' entry"):
        engine.resume(module, opt, sched, path)


def test_non_finite_loss_is_reported():
    module, opt, sched = build(0)
    module.weight_dict = {"loss_bbox": float("inf")}
    loader = engine.make_loader(NoisyBoxes(8), 4, collate, train=True)
    with pytest.raises(FloatingPointError, match="iteration 0"):
        engine.train_one_epoch(module, loader, opt, torch.device("cpu"), 0, verbose=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, steps, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    module, opt, sched = build(0, dropout=0.0)
    ddp = torch.nn.parallel.DistributedDataParallel(module)
    loader = engine.make_loader(NoisyBoxes(augment=False), batch, collate, train=True, seed=3,
                                dist_info=info)
    engine.train_one_epoch(ddp, loader, opt, info.device, 0, max_iters=steps, verbose=False)
    if rank == 0:
        torch.save(module.student.state_dict(), out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_equal_one_with_doubled_batch(tmp_path):
    steps, batch = 3, 2
    out = str(tmp_path / "ddp.pth")
    mp.spawn(_worker, args=(2, _free_port(), steps, batch, out), nprocs=2, join=True)
    ddp_state = torch.load(out)

    module, opt, sched = build(0, dropout=0.0)
    loader = engine.make_loader(NoisyBoxes(augment=False), 2 * batch, collate, train=True,
                                seed=3)
    engine.train_one_epoch(module, loader, opt, torch.device("cpu"), 0, max_iters=steps,
                           verbose=False)
    for k, v in module.student.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _crops_worker(rank, world, port, cache, out):
    from types import SimpleNamespace
    from common.data import build_dataset
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    args = SimpleNamespace(data="synthetic", data_cache=cache, synth="easy", synth_num_train=3,
                           synth_num_val=2, variant="deformable_detr",
                           model_overrides={"backbone": "tiny", "width": 4,
                                            "backbone_weights": "crops"})
    train, val = build_dataset("train", args), build_dataset("val", args)
    overrides = engine.backbone_weights_ready(args, info, train, val)
    with open(f"{out}.{rank}", "w") as f:
        f.write(overrides["backbone_weights"])
    dist.destroy_process_group()


@pytest.mark.slow
def test_crop_backbone_under_two_processes(tmp_path):
    """Under torchrun the main process pretrains the crop backbone once while the others wait;
    every process gets the same cached file (and nobody deadlocks)."""
    out = str(tmp_path / "path")
    ctx = mp.spawn(_crops_worker, args=(2, _free_port(), str(tmp_path), out), nprocs=2,
                   join=False)
    deadline = time.time() + 300
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two processes did not finish: a barrier mismatch?")
    paths = {open(f"{out}.{r}").read() for r in range(2)}
    assert len(paths) == 1 and os.path.isfile(paths.pop())
    assert len(list((tmp_path / "backbones").glob("*.pth"))) == 1


def test_is_main_process_follows_torchruns_rank(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()                     # a plain single-process run
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    monkeypatch.setenv("RANK", "3")
    assert not is_main_process()


def _resume_worker(rank, world, port, out, epochs, resume):
    """One process of a 2-process gloo run of `epochs` epochs, resumed from `out` if asked."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    module, opt, sched = build(0, dropout=0.3)            # the same initial model on each rank
    engine.seed_everything(5, info.rank)                  # then each rank's own stream: the
    if resume:                                            # dropout and flips differ by rank
        torch.manual_seed(1000 + rank)                    # a new process: whatever RNG state
    start, history = 0, []
    if resume:
        ckpt = read_checkpoint(os.path.join(out, "checkpoint.pth"))
        start = engine.resume(module, opt, sched, ckpt, info)
        history = engine.log_history(ckpt, "")
    ddp = torch.nn.parallel.DistributedDataParallel(module)
    loader = engine.make_loader(NoisyBoxes(), 2, collate, train=True, seed=3, dist_info=info)
    run(ddp, opt, sched, loader, out, start, epochs, history, dist_info=info)
    dist.destroy_process_group()


@pytest.mark.slow
def test_resume_under_two_gloo_processes_is_exact(tmp_path):
    """Each rank saves and restores its own RNG stream: a 2-process run killed after epoch 1
    and resumed ends bit-for-bit where the uninterrupted 2-process run ends."""
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    mp.spawn(_resume_worker, args=(2, _free_port(), full, 4, False), nprocs=2, join=True)
    mp.spawn(_resume_worker, args=(2, _free_port(), cut, 2, False), nprocs=2, join=True)
    assert len(read_checkpoint(os.path.join(cut, "checkpoint.pth"))["rng"]) == 2
    mp.spawn(_resume_worker, args=(2, _free_port(), cut, 4, True), nprocs=2, join=True)
    a, b = (read_checkpoint(os.path.join(d, "checkpoint.pth")) for d in (cut, full))
    assert a["epoch"] == b["epoch"] == 3
    for k, v in b["model"].items():
        assert torch.equal(a["model"][k], v), k
    keep = lambda log: [{k: v for k, v in x.items() if "time" not in k and "mem" not in k}  # noqa
                        for x in log]
    assert keep(a["log"]) == keep(b["log"])


def test_crop_pretraining_leaves_the_random_streams_as_they_were(tmp_path):
    """A run draws the same random numbers whether the tiny backbone was pretrained by this
    process or read from the cache (the pretraining used to consume the seeded streams)."""
    from types import SimpleNamespace
    from common.data import build_dataset
    args = SimpleNamespace(data="synthetic", data_cache=str(tmp_path), synth="easy",
                           synth_num_train=3, synth_num_val=2, variant="deformable_detr",
                           model_overrides={"backbone": "tiny", "width": 4,
                                            "backbone_weights": "crops"})
    train, val = build_dataset("train", args), build_dataset("val", args)
    draws = []
    for _ in range(2):  # the first call pretrains, the second reads the cached file
        engine.seed_everything(5)
        engine.backbone_weights_ready(args, DistInfo(), train, val)
        draws.append((torch.rand(4), np.random.rand(4), random.random()))
    assert len(list((tmp_path / "backbones").glob("*.pth"))) == 1
    assert torch.equal(draws[0][0], draws[1][0])
    assert np.array_equal(draws[0][1], draws[1][1]) and draws[0][2] == draws[1][2]
