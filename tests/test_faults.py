"""Faults and bad input, injected as a user would meet them: an occupied or unwritable output
folder, a kill at any moment of a training run, a full disk, damaged checkpoints and images,
bad flags, a diverging model. Each must end in one clear line (or a warning) before training
time is spent, and a killed run must resume to exactly what an uninterrupted run gives."""
import argparse
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from common import cli, distill, engine
from common import data as D
from common.checkpoint import read_checkpoint, save_checkpoint
from common.distributed import DistInfo
from common.matcher import HungarianMatcher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baseline  # noqa: E402
from test_data import write_coco  # noqa: E402
from test_engine import NoisyBoxes, Trainer, TinyDetector, build, collate  # noqa: E402


def parse(*flags):
    return cli.resolve(cli.build_parser("t").parse_args(list(flags)))[0]


# ------------------------------------------------------------------------------------------
# Bad flags: one line naming the flag, before anything is loaded
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--print-every", "0"], "--print-every must be at least 1"),
    (["--nheads", "0"], "--nheads must be at least 1"),
    (["--dec-layers", "0"], "--dec-layers must be at least 1"),
    (["--num-queries", "-3"], "--num-queries must be at least 1"),
    (["--num-queries", "0"], "--num-queries must be at least 1"),
    (["--lr-drop", "0"], "--lr-drop must be at least 1"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--hidden-dim", "30", "--nheads", "8"], "--hidden-dim 30 must be a multiple of --nheads 8"),
    (["--coco-path", "/data/coco"], "--coco-path is for --data coco"),
    (["--val-ann", "x.json", "--val-images", "v"], "--val-ann, --val-images are for --data coco"),
    (["--save-every", "-1"], "--save-every must be a finite number >= 0"),
    (["--resume", __file__, "--overwrite"], "give only one of them"),
])
def test_bad_flags_are_refused_by_name(flags, message):
    with pytest.raises(ValueError, match=message):
        parse("--preset", "cpu-tiny", *flags)


def test_good_flags_pass():
    args = parse("--preset", "cpu-tiny", "--save-every", "2", "--enc-layers", "0")
    assert args.save_every == 2 and args.model_overrides["enc_layers"] == 0


# ------------------------------------------------------------------------------------------
# The job's setup: checked before the first iteration (baseline.py on a tiny embedded set)
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_flags(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return ["--preset", "cpu-tiny", "--synth-num-train", "4", "--synth-num-val", "2",
            "--data-cache", str(cache), "--num-workers", "0", "--max-iters", "1",
            "--threads", "1"]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a single training iteration starts."""
    def refuse(*a, **k):
        raise AssertionError("training started before the setup error was found")
    monkeypatch.setattr(engine, "train_one_epoch", refuse)


def test_occupied_output_dir_is_refused(tmp_path, data_flags, no_training):
    out, other = tmp_path / "run", tmp_path / "other"
    for folder in (out, other):                    # two finished runs (fake, as fit writes them)
        folder.mkdir()
        save_checkpoint({"epoch": 0}, str(folder / "checkpoint.pth"))
        engine.write_log(str(folder), [{"epoch": 0}])
    first, log = (out / "checkpoint.pth").read_bytes(), (out / "log.txt").read_text()
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint.pth, log.txt\).*"
                                         r"--resume .*checkpoint.pth.*--overwrite"):
        baseline.main(data_flags + ["--output-dir", str(out)])
    with pytest.raises(ValueError, match="already holds a run.*continues that run in its own"):
        baseline.main(data_flags + ["--output-dir", str(out), "--epochs", "3",
                                    "--resume", str(other / "checkpoint.pth")])
    assert (out / "checkpoint.pth").read_bytes() == first
    assert (out / "log.txt").read_text() == log


def run_files(folder):
    """The files of a run (checkpoints and log) in a folder, sorted."""
    return sorted(n for n in os.listdir(folder) if n.startswith("checkpoint") or n == "log.txt")


def test_overwrite_replaces_and_resume_continues(tmp_path, data_flags):
    out = tmp_path / "run"
    baseline.main(data_flags + ["--output-dir", str(out), "--epochs", "2", "--lr-drop", "1"])
    assert run_files(out) == ["checkpoint.pth", "checkpoint0000.pth", "checkpoint0001.pth",
                              "log.txt"]
    baseline.main(data_flags + ["--output-dir", str(out), "--epochs", "3",
                                "--resume", str(out / "checkpoint.pth")])
    assert [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [0, 1, 2]
    baseline.main(data_flags + ["--output-dir", str(out), "--overwrite"])
    # the old run's files are gone: cpu-tiny trains 1 epoch with an lr drop after it
    assert run_files(out) == ["checkpoint.pth", "checkpoint0000.pth", "log.txt"]
    assert len((out / "log.txt").read_text().splitlines()) == 1


def test_teacher_folder_is_refused(tmp_path):
    teacher = tmp_path / "teacher" / "checkpoint.pth"
    teacher.parent.mkdir()
    teacher.write_bytes(b"x")
    parser = distill.build_parser("t")
    args = parser.parse_args(["--teacher", str(teacher), "--output-dir", str(teacher.parent),
                              "--overwrite"])
    with pytest.raises(ValueError, match="is the folder of the teacher"):
        distill.resolve(args)


def test_setup_errors_come_before_training(tmp_path, data_flags, no_training, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OSError, match="--output-dir .* is not writable"):
        baseline.main(data_flags + ["--output-dir", str(blocker / "run")])
    with pytest.raises(ValueError, match="training split has 4 image.*--batch-size 8"):
        baseline.main(data_flags + ["--batch-size", "8"])
    # no --output-dir: said once, before training
    with pytest.raises(AssertionError, match="training started"):
        baseline.main(data_flags)
    assert "no --output-dir: nothing of this run" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00" * 101, "cannot be read"),
    (b"hello world\n" * 10, "cannot be read"),
    ("truncated", "cannot be read"),
    ("weights", "not a training checkpoint .*no 'optimizer' entry"),
])
def test_bad_resume_checkpoint_is_one_line_before_data(tmp_path, data_flags, monkeypatch,
                                                       content, message):
    path = tmp_path / "bad.pth"
    if content == "truncated":
        buf = io.BytesIO()
        torch.save({"model": {"w": torch.zeros(1000)}, "epoch": 3}, buf)
        content = buf.getvalue()[:len(buf.getvalue()) // 2]
    elif content == "weights":
        buf = io.BytesIO()
        torch.save({"model": {"w": torch.zeros(3)}}, buf)
        content = buf.getvalue()
    path.write_bytes(content)

    def no_data(*a, **k):
        raise AssertionError("data loaded before the checkpoint was checked")
    monkeypatch.setattr(engine, "build_dataset", no_data)
    with pytest.raises(ValueError, match=message) as e:
        baseline.main(data_flags + ["--resume", str(path), "--output-dir", str(tmp_path / "o")])
    assert "\n" not in str(e.value) and "bad.pth" in str(e.value)


def test_resume_with_nothing_left_to_train(tmp_path, data_flags):
    out = tmp_path / "run"
    baseline.main(data_flags + ["--output-dir", str(out)])
    with pytest.raises(ValueError, match=r"already trained 1 epoch.*--epochs is 1"):
        baseline.main(data_flags + ["--output-dir", str(out), "--resume",
                                    str(out / "checkpoint.pth")])


def test_eval_of_a_bare_state_dict_names_baselines_own_flags(tmp_path, data_flags):
    out = tmp_path / "run"
    baseline.main(data_flags + ["--output-dir", str(out)])
    bare = tmp_path / "bare.pth"
    torch.save(read_checkpoint(str(out / "checkpoint.pth"))["model"], bare)
    with pytest.raises(ValueError, match="does not record how its model was built.*--variant") \
            as e:
        baseline.main(["--synth-num-train", "4", "--synth-num-val", "2", "--data-cache",
                       data_flags[data_flags.index("--data-cache") + 1], "--eval", "--resume",
                       str(bare), "--max-iters", "1"])
    assert "--teacher" not in str(e.value)
    stats = baseline.main(data_flags + ["--eval", "--resume", str(bare)])  # with model flags
    assert "AP" in stats


# ------------------------------------------------------------------------------------------
# Disk full, divergence
# ------------------------------------------------------------------------------------------

def test_disk_full_is_one_clear_line(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"epoch": 1}, path)
    real_save = torch.save

    def save_to_full_disk(obj, f):  # the real failure: torch's writer on a full device
        with open("/dev/full", "wb") as full:
            real_save(obj, full)
            full.flush()

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    monkeypatch.setattr(torch, "save", save_to_full_disk)
    with pytest.raises(OSError, match=r"could not write .*checkpoint.pth: No space left on "
                                      r"device; \d+ MiB free .*previous file is intact"):
        engine.write_checkpoint({"epoch": 2, "w": torch.zeros(10000)}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


class MatchedTrainer(Trainer):
    """The stand-in detector's boxes through the project's Hungarian matcher, like a DETR."""

    def forward(self, images, masks, targets):
        pred = self.student(images, masks)[:, None, :]                  # (B, 1, 4)
        logits = pred.new_zeros(pred.shape[0], 1, 1)
        idx = HungarianMatcher()({"pred_logits": logits, "pred_boxes": pred}, targets)
        tgt = torch.cat([t["boxes"] for t in targets])
        return {"loss_bbox": (pred[:, 0] - tgt).abs().mean() + 0 * len(idx)}


@pytest.mark.parametrize("optimizer, lr", [(torch.optim.SGD, 1e38), (torch.optim.AdamW, 1e30)])
def test_divergence_is_named_with_the_lr(optimizer, lr):
    """SGD at this lr overflows the gradient; AdamW's normalised step makes finite but huge
    weights whose outputs are NaN, which the matcher's cost check meets first."""
    module = MatchedTrainer(TinyDetector(dropout=0.0))
    opt = optimizer(module.parameters(), lr=lr)
    loader = engine.make_loader(NoisyBoxes(8), 4, collate, train=True)
    with pytest.raises(FloatingPointError) as e:
        for epoch in range(3):
            engine.train_one_epoch(module, loader, opt, torch.device("cpu"), epoch,
                                   clip_max_norm=0, verbose=False)
    message = str(e.value)
    assert "the model diverged" in message and f"the lr is {lr:g}" in message, message
    assert "lower --lr" in message


def test_divergence_in_a_real_run_is_named(tmp_path, data_flags):
    """One step at lr 1e30 leaves finite but useless weights: the evaluation after it meets the
    non-finite predictions and says what happened, not which detection was bad."""
    with pytest.raises(FloatingPointError, match=r"diverged; the lr is 1e\+30: lower --lr"):
        baseline.main(data_flags + ["--lr", "1e30", "--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


# ------------------------------------------------------------------------------------------
# Images: header check (cached), sizes on disk, decode errors naming the file
# ------------------------------------------------------------------------------------------

ANN = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [30, 30, 20, 20]}]
CATS = [{"id": 1, "name": "a"}]


def test_header_check_is_cached_and_names_bad_files(tmp_path, monkeypatch):
    write_coco(tmp_path, [(1, 64, 64), (2, 64, 64)], ANN, CATS)
    folder, ann = tmp_path / "train2017", tmp_path / "annotations" / "instances_train2017.json"
    opened = []
    real = D._image_header
    monkeypatch.setattr(D, "_image_header", lambda p: opened.append(p) or real(p))
    D.CocoDetection(folder, ann, cache_dir=tmp_path / "cache")
    assert len(opened) == 2 and D.image_check_cache_path(folder, tmp_path / "cache").is_file()
    D.CocoDetection(folder, ann, cache_dir=tmp_path / "cache")
    assert len(opened) == 2                               # from the cache: no file opened
    (folder / "000000000002.png").write_bytes(b"not an image at all")
    with pytest.raises(D.ImageDecodeError, match="000000000002.png"):
        D.CocoDetection(folder, ann, cache_dir=tmp_path / "cache")
    assert len(opened) == 3                               # only the changed file reopened


def test_image_size_on_disk_wins_over_the_annotation_file(tmp_path):
    path = write_coco(tmp_path, [(1, 64, 64)], ANN, CATS)
    data = json.loads(open(path).read())
    data["images"][0]["width"] = data["images"][0]["height"] = 16   # wrong in the file list
    open(path, "w").write(json.dumps(data))
    with pytest.warns(UserWarning, match="another size on disk.*16x16 in the file list, 64x64"):
        ds = D.CocoDetection(tmp_path / "train2017", path, cache_dir=tmp_path / "cache")
    assert len(ds.coco.dataset["annotations"]) == 1                  # the real box is kept
    _, target = ds[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[40 / 64, 40 / 64, 20 / 64,
                                                               20 / 64]]))


@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_image_stops_with_its_name(tmp_path, workers):
    write_coco(tmp_path, [(1, 64, 64), (2, 64, 64)], ANN, CATS)
    jpg = tmp_path / "train2017" / "000000000002.png"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, format="JPEG")
    jpg.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])   # a truncated JPEG
    ds = D.CocoDetection(tmp_path / "train2017",
                         tmp_path / "annotations" / "instances_train2017.json",
                         cache_dir=tmp_path / "cache")                # the header is fine
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers,
                                         collate_fn=D.collate)
    with pytest.raises(D.ImageDecodeError) as e:
        list(engine.named_decode_errors(loader))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"cannot decode image file {jpg}")


# ------------------------------------------------------------------------------------------
# The teacher's cached evaluation follows the teacher file
# ------------------------------------------------------------------------------------------

def test_teacher_stats_cache_follows_the_teacher_file(tmp_path):
    teacher = tmp_path / "checkpoint.pth"
    teacher.write_bytes(b"first teacher")
    args = argparse.Namespace(data="synthetic")
    assert distill.teacher_stats(str(teacher), lambda: {"AP": 0.1}, args) == {"AP": 0.1}
    assert distill.teacher_stats(str(teacher), lambda: {"AP": 0.9}, args) == {"AP": 0.1}
    teacher.write_bytes(b"another teacher, retrained")
    assert distill.teacher_stats(str(teacher), lambda: {"AP": 0.5}, args) == {"AP": 0.5}


# ------------------------------------------------------------------------------------------
# Kept copies, flags changed on resume
# ------------------------------------------------------------------------------------------

def fit(module, opt, sched, out, start, epochs, history=(), save_every=0):
    loader = engine.make_loader(NoisyBoxes(8), 4, collate, train=True, seed=1)
    return engine.fit(module, opt, sched, loader, args=argparse.Namespace(seed=1),
                      dist_info=DistInfo(), output_dir=str(out), start_epoch=start,
                      epochs=epochs, verbose=False, history=history, save_every=save_every)


def test_kept_copies_before_each_lr_drop_and_every_n_epochs(tmp_path):
    module, opt, sched = build(0)                      # StepLR(2): drops after epochs 1, 3
    fit(module, opt, sched, tmp_path, 0, 5, save_every=3)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth", "checkpoint0001.pth",
                                            "checkpoint0002.pth", "checkpoint0003.pth",
                                            "log.txt"]
    for epoch in (1, 2, 3):
        kept = read_checkpoint(str(tmp_path / f"checkpoint{epoch:04d}.pth"))
        assert kept["epoch"] == epoch and len(kept["log"]) == epoch + 1
    last = read_checkpoint(str(tmp_path / "checkpoint.pth"))
    kept = read_checkpoint(str(tmp_path / "checkpoint0003.pth"))
    assert not torch.equal(kept["model"]["head.weight"], last["model"]["head.weight"])


def test_lr_and_lr_drop_given_on_resume_are_applied(tmp_path):
    module, opt, sched = build(0, lr=1e-2)                       # lr drop every 2 epochs
    fit(module, opt, sched, tmp_path, 0, 3)
    module, opt, sched = build(0, lr=4e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)              # --lr 4e-2 --lr-drop 5
    ckpt = read_checkpoint(str(tmp_path / "checkpoint.pth"))
    start = engine.resume(module, opt, sched, ckpt)
    assert start == 3
    # epoch 3 under the new flags: 4e-2 * 0.1 ** (3 // 5) for "rest", a tenth for the backbone
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([4e-2, 4e-3])
    fit(module, opt, sched, tmp_path, start, 6, history=engine.log_history(ckpt, ""))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([4e-3, 4e-4])  # dropped at 5
    saved = read_checkpoint(str(tmp_path / "checkpoint.pth"))
    assert saved["lr_scheduler"]["step_size"] == 5
    assert saved["lr_scheduler"]["base_lrs"] == pytest.approx([4e-2, 4e-3])
    lrs = [line["train_lr"] for line in saved["log"]]
    assert lrs == pytest.approx([1e-2, 1e-2, 1e-3, 4e-2, 4e-2, 4e-3])


# ------------------------------------------------------------------------------------------
# SIGKILL at random moments: the resumed run ends where an uninterrupted one ends
# ------------------------------------------------------------------------------------------

EPOCHS = 8
TIMING = ("epoch_time_s", "train_iter_time_s", "train_peak_mem_mb")


class SlowBoxes(NoisyBoxes):
    """NoisyBoxes that take a few milliseconds per image, so a kill at a random moment lands
    inside an epoch as often as not."""

    def __getitem__(self, i):
        time.sleep(0.01)
        return super().__getitem__(i)


def _child(out, fault):
    """One training process, as a method script runs it: the output-folder policy, resume
    from the folder's checkpoint when there is one, then fit. ``fault`` kills this process
    with SIGKILL at a chosen point of the first epoch end it reaches: "save" halfway through
    writing checkpoint.pth, "kept" inside the next kept copy, "between" after checkpoint.pth
    and before the log."""
    torch.set_num_threads(1)
    path = os.path.join(out, "checkpoint.pth")
    args = argparse.Namespace(seed=1, output_dir=out, eval=False, overwrite=False,
                              resume=path if os.path.exists(path) else None)
    engine.prepare_output_dir(args, DistInfo())
    engine.seed_everything(1)
    module, opt, sched = build(0)                              # lr drop every 2 epochs
    start, history = 0, []
    if args.resume:
        ckpt = read_checkpoint(path)
        start, history = engine.resume(module, opt, sched, ckpt), engine.log_history(ckpt, path)
        engine.write_log(out, history)
    kind = fault
    real_save, real_write_log = torch.save, engine.write_log

    def dying_save(obj, f):
        name = os.path.basename(getattr(f, "name", ""))
        if (kind == "save" and name.startswith(".checkpoint.pth.tmp-")) or \
                (kind == "kept" and re.match(r"\.checkpoint\d{4}\.pth\.tmp-", name)):
            f.write(b"PK\x03\x04 partial")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f)

    def dying_write_log(folder, lines):
        if kind == "between" and len(lines) > start:   # a log line of this process's epochs
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write_log(folder, lines)

    if fault != "none":
        torch.save, engine.write_log = dying_save, dying_write_log
    print("training", flush=True)
    loader = engine.make_loader(SlowBoxes(16), 4, collate, train=True, seed=1)
    try:
        engine.fit(module, opt, sched, loader, args=argparse.Namespace(seed=1),
                   dist_info=DistInfo(), output_dir=out, start_epoch=start, epochs=EPOCHS,
                   verbose=False, history=history)
    finally:
        torch.save, engine.write_log = real_save, real_write_log


def _launch(out, fault, kill_after=None):
    """Run ``_child`` in a fresh process; with ``kill_after`` seconds, SIGKILL it that long
    after it starts training. Returns the exit code (-9: killed)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), out, fault],
                            stdout=subprocess.PIPE, env=env, cwd=ROOT)
    if kill_after is not None:
        for line in proc.stdout:                # other lines first (e.g. temporary files removed)
            if line.strip() == b"training":
                time.sleep(kill_after)
                proc.send_signal(signal.SIGKILL)
                break
    proc.communicate(timeout=120)
    return proc.returncode


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_uninterrupted_run(tmp_path):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    rng = random.Random(0)
    # the chosen points (in a save, between checkpoint and log, in a kept copy), in epoch
    # order, with kills at random moments between them
    faults = ["save", None, "between", None, "kept"]
    killed = 0
    for fault in faults:
        code = _launch(cut, fault or "none", rng.uniform(0.05, 0.3) if fault is None else None)
        assert code in (0, -signal.SIGKILL), code
        killed += code == -signal.SIGKILL
    while _launch(cut, "none") != 0:
        pass
    assert killed >= 5, killed
    _child(full, "none")       # the uninterrupted run, in this process (also 1 thread)
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in TIMING}  # noqa
                           for x in lines.splitlines()]
    assert strip(open(os.path.join(cut, "log.txt")).read()) == \
        strip(open(os.path.join(full, "log.txt")).read())
    assert sorted(os.listdir(cut)) == sorted(os.listdir(full)) == [
        "checkpoint.pth", "checkpoint0001.pth", "checkpoint0003.pth", "checkpoint0005.pth",
        "checkpoint0007.pth", "log.txt"]                                          # no temporary file left behind
    for name in ("checkpoint.pth", "checkpoint0001.pth", "checkpoint0003.pth",
                 "checkpoint0005.pth"):
        a, b = (read_checkpoint(os.path.join(d, name)) for d in (cut, full))
        for k in b["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (name, k)
        assert strip("\n".join(json.dumps(x) for x in a["log"])) == \
            strip("\n".join(json.dumps(x) for x in b["log"]))


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
