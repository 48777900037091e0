"""The KD losses' normalisers across processes: two gloo processes with one image each give the
same losses (averaged over the processes, as DDP averages gradients) as one process with both
images, for QSKD (LAPD pair count, AGFD sum(M) * d), CLoCKDistill (sum of weights in L_tcld)
and G-DetKD (the RoI count; the other process's current teacher embeddings as CKD negatives).
The two images differ in their GT count, so per-process normalisers would differ.

Then the training job itself, for QSKD, CLoCKDistill, G-DetKD and DETRDistill (without its
InfoNCE head, see ``build``): engine.fit / train_one_epoch with the distiller wrapped in
DistributedDataParallel as engine.train wraps it, three AdamW steps on two gloo processes with
batch 2 each, against one process with batch 4 over the same images in the same order; the
checkpoints the two jobs write must hold the same student and student-side modules."""
import argparse
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import clockdistill  # noqa: E402
import detrdistill  # noqa: E402
import gdetkd  # noqa: E402
import qskd  # noqa: E402
from common import engine  # noqa: E402
from common.checkpoint import read_checkpoint  # noqa: E402
from common.data import collate  # noqa: E402
from common.detr import build_model  # noqa: E402
from common.distill import freeze  # noqa: E402
from common.distributed import DistInfo, init_distributed  # noqa: E402

SMALL = dict(backbone="tiny", width=8, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
             dim_feedforward=64, num_queries=10, dropout=0.0, num_feature_levels=3)
NC = 4

# per method: the distiller built from a (teacher, student) pair and the KD losses compared
KEYS = {"qskd": ["loss_agfd", "loss_lapd", "loss_lapd_0"],
        "clockdistill": ["loss_lcmd", "loss_tcld_cls", "loss_tcld_bbox", "loss_tcld_giou"],
        "gdetkd": ["loss_sgfi", "loss_ckd"]}


def build(method):
    torch.manual_seed(0)
    teacher = freeze(build_model("deformable_detr", NC, **dict(SMALL, hidden_dim=48)))
    student = build_model("deformable_detr", NC, **SMALL)
    with torch.no_grad():  # boxes that are not the references, so box terms are non-trivial
        for m in (teacher, student):
            for head in m.bbox_embed:
                head.layers[-1].weight.normal_(0, 0.3)
    if method == "qskd":
        return qskd.QSKD(qskd.QSKDConfig(), teacher, student, NC)
    if method == "clockdistill":
        return clockdistill.CLoCKDistiller(clockdistill.CLoCKConfig(), teacher, student, NC)
    if method == "detrdistill":
        # without the InfoNCE head (the paper's form, --no-query-contrastive): its BatchNorm and
        # its in-batch negatives are per process by design (MoCo-style, as the released code),
        # so with it two processes do not train like one with the doubled batch
        cfg = detrdistill.DETRDistillConfig(use_query_contrastive=False)
        return detrdistill.DETRDistill(cfg, teacher, student, NC)
    # every candidate RoI is kept (quota above the candidates): the RoI set does not depend on
    # the random sampling order, so one process and two see the same RoIs
    cfg = gdetkd.GDetKDConfig(rois_per_img=64, pos_fraction=1.0)
    return gdetkd.GDetKD(cfg, teacher, student, NC)


def square_batch(gt):
    """Random 64x64 images (seed 5), one per entry of ``gt`` = [(labels, boxes cxcywh)], all of
    one size: no padding, so one process and two see the same pixels."""
    g = torch.Generator().manual_seed(5)
    images = torch.randn(len(gt), 3, 64, 64, generator=g)
    masks = torch.zeros(len(gt), 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.tensor(labels), "size": torch.tensor([64, 64]),
                "boxes": torch.tensor(boxes)} for labels, boxes in gt]
    return images, masks, targets


def data():
    """Two images of one size (no padding difference between 1 and 2 processes), 2 and 1 GT."""
    return square_batch([([1, 2], [[0.3, 0.35, 0.3, 0.4], [0.7, 0.6, 0.35, 0.3]]),
                         ([3], [[0.5, 0.5, 0.4, 0.5]])])


def losses_of(method, images, masks, targets):
    d = build(method).train()
    out = d(images, masks, targets)
    return {k: out[k].detach().double() for k in KEYS[method]}


def _worker(rank, port, method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        images, masks, targets = data()
        mine = losses_of(method, images[rank:rank + 1], masks[rank:rank + 1], targets[rank:rank + 1])
        for v in mine.values():  # the mean over processes, as DDP's gradient average
            dist.all_reduce(v)
            v /= 2
        torch.save(mine, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", sorted(KEYS))
def test_two_processes_equal_one_with_the_doubled_batch(method, tmp_path):
    # fork rather than spawn: the children inherit the imports (much faster)
    mp.start_processes(_worker, args=(_free_port(), method, str(tmp_path)), nprocs=2,
                       start_method="fork")
    two = torch.load(tmp_path / "0.pt")
    one = losses_of(method, *data())
    for k in KEYS[method]:
        assert float(one[k]) > 1e-4, k  # a term that is there
        torch.testing.assert_close(two[k], one[k], rtol=2e-5, atol=1e-7, msg=k)


# ------------------------------------------------------------------------------------------
# The training job: 2 processes x batch b train like 1 process x batch 2b
# ------------------------------------------------------------------------------------------

class SameSizeImages(torch.utils.data.Dataset):
    """12 images of one size (so 1 and 2 processes pad alike) with 1, 2 or 3 GT boxes: the
    processes' batches differ in their GT counts, so per-process normalisers would show."""

    def __init__(self, n=12):
        g = torch.Generator().manual_seed(11)
        self.items = []
        for i in range(n):
            k = 1 + i % 3
            boxes = torch.cat([0.3 + 0.4 * torch.rand(k, 2, generator=g),
                               0.15 + 0.3 * torch.rand(k, 2, generator=g)], 1)
            target = {"labels": torch.randint(0, NC, (k,), generator=g), "boxes": boxes,
                      "size": torch.tensor([64, 64]), "orig_size": torch.tensor([64, 64]),
                      "image_id": i}
            self.items.append((torch.randn(3, 64, 64, generator=g), target))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


STEPS, BATCH = 3, 2


def train_job(method, batch, out_dir, info):
    """The job's training part for one process: the optimiser, the DistributedDataParallel
    wrapping (device_ids None on the CPU) and the loader as engine.train sets them up, then
    engine.fit for STEPS iterations; fit writes out_dir/checkpoint.pth on the main process."""
    d = build(method)  # seed 0 on every process: one initial model
    # lr 2e-5: AdamW moves a parameter whose gradient is 0 up to rounding (the key bias of
    # attention, a conv bias before GroupNorm) by lr * noise / eps per step, differently in the
    # two jobs; at this lr that stays below 3e-7, under atol, while trained weights move 6e-5
    opt = torch.optim.AdamW(engine.param_groups(d, 2e-5, 2e-6, d.student.cfg.lr_linear_proj_mult),
                            weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, 40)
    module = torch.nn.parallel.DistributedDataParallel(d, device_ids=None) \
        if info.distributed else d
    loader = engine.make_loader(SameSizeImages(), batch, collate, train=True, seed=3,
                                dist_info=info)
    assert len(loader) >= STEPS
    engine.fit(module, opt, sched, loader, args=argparse.Namespace(seed=3), dist_info=info,
               output_dir=out_dir, epochs=1, max_iters=STEPS, verbose=False)
    return d


def _train_worker(rank, port, method, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    try:
        train_job(method, BATCH, out_dir, info)
    finally:
        dist.destroy_process_group()


def _rows_sorted(x):
    """The rows of a (N,d) tensor in an order that does not depend on how they were stacked."""
    key = x.double() @ torch.linspace(1.0, 2.0, x.shape[1], dtype=torch.float64)
    return x[torch.argsort(key)]


def assert_same_training_state(two, one, weight_dict):
    """The checkpoints of the 2-process and the 1-process job: same student ("model"), same
    student-side modules ("extra"; G-DetKD's queue of teacher embeddings as a set of rows:
    gathered in rank order there, in batch order here), same logged weighted losses."""
    assert sorted(two["model"]) == sorted(one["model"]) and two["model"]
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert sorted(two["extra"]) == sorted(one["extra"])
    for k, v in one["extra"].items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(two["extra"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        else:  # the CKD queue's extra state: one (N,d) tensor per past iteration
            a, b = two["extra"][k]["items"], v["items"]
            assert len(a) == len(b) == STEPS, k
            for x, y in zip(a, b):
                torch.testing.assert_close(_rows_sorted(x), _rows_sorted(y), rtol=1e-5,
                                           atol=1e-6, msg=k)
    (log_two,), (log_one,) = two["log"], one["log"]
    for k in ["loss"] + sorted(weight_dict):
        if f"train_{k}" in log_one:
            assert log_two[f"train_{k}"] == pytest.approx(log_one[f"train_{k}"], rel=1e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("method", ["clockdistill", "detrdistill", "gdetkd", "qskd"])
def test_two_process_training_equals_one_with_the_doubled_batch(method, tmp_path):
    # the two processes' batches differ in their GT counts (else per-process counts would equal
    # their mean and a normaliser left per process would go unnoticed)
    gt = [[[len(t["labels"]) for t in targets] for _, _, targets in list(engine.make_loader(
        SameSizeImages(), BATCH, collate, train=True, seed=3,
        dist_info=DistInfo(rank=r, world_size=2)))[:STEPS]] for r in range(2)]
    assert any(sum(a) != sum(b) for a, b in zip(*gt)), gt
    # fork rather than spawn, as above: the children inherit the imports
    mp.start_processes(_train_worker, args=(_free_port(), method, str(tmp_path / "two")),
                       nprocs=2, start_method="fork")
    d = train_job(method, 2 * BATCH, str(tmp_path / "one"), DistInfo())
    two = read_checkpoint(str(tmp_path / "two" / "checkpoint.pth"))
    one = read_checkpoint(str(tmp_path / "one" / "checkpoint.pth"))
    initial = build(method).student.state_dict()
    moved = [k for k, v in one["model"].items()
             if v.is_floating_point() and not torch.equal(v, initial[k])]
    assert len(moved) > len(one["model"]) // 2  # the steps did train the student
    assert_same_training_state(two, one, d.weight_dict)
