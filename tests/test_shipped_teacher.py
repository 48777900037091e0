"""The teacher shipped in methods/teachers/: it loads, its file is the one recorded (sha256, size,
README), and it reproduces its recorded COCO stats on the first validation images; the method
scripts use it only when their teacher settings are the ones it was trained with."""
import importlib.util
import json
import os
import shutil

import pytest
import torch

from common import cli, distill
from common.data import SYNTH_PRESETS
from common.detr import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHERS = os.path.join(ROOT, "methods", "teachers")
SHIPPED = os.path.join(TEACHERS, "cpu-teacher.json")


def _pack():
    spec = importlib.util.spec_from_file_location("pack", os.path.join(TEACHERS, "pack.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not os.path.isfile(SHIPPED), reason="no teacher shipped in methods/teachers")
def test_shipped_teacher_reproduces_its_recorded_ap(tmp_path):
    with open(SHIPPED) as f:
        meta = json.load(f)
    path = os.path.join(TEACHERS, meta["file"])
    assert os.path.getsize(path) == meta["size_bytes"]
    assert distill.file_sha256(path) == meta["sha256"]
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert meta["sha256"] in readme  # the README names the file a reader gets
    a = meta["log"][-1]
    assert meta["recorded"]["AP"] == a["test_AP"]
    n = meta["subset"]["num_images"]
    stats = _pack().subset_stats(path, torch.load(path, weights_only=True)["args"], n,
                                 str(tmp_path))
    for k in ("AP", "AP50", "AP75", "AR100"):
        assert stats[k] == pytest.approx(meta["subset"]["stats"][k], abs=5e-3), k
    assert stats["AP50"] > 0.2  # a teacher, not an untrained model


def _fake_teacher_run(folder, seed):
    """A run folder as methods/baseline.py leaves it (untrained cpu-tiny weights, log.txt)."""
    args, overrides = cli.resolve(cli.build_parser("x").parse_args(
        ["--preset", "cpu-tiny", "--seed", str(seed)]))
    torch.manual_seed(0)
    model = build_model(args.variant, len(SYNTH_PRESETS["easy"].classes), **overrides)
    os.makedirs(folder)
    torch.save({"model": model.state_dict(), "args": dict(vars(args)), "epoch": 0,
                "optimizer": {"state": {}}, "rng": {}}, os.path.join(folder, "checkpoint.pth"))
    with open(os.path.join(folder, "log.txt"), "w") as f:
        f.write(json.dumps({"epoch": 0, "train_loss": 9.0, "test_AP": 0.0125,
                            "test_AP50": 0.05}) + "\n")


def _method_args(tmp_path, seed):
    parser = distill.build_parser("x")
    return distill.resolve(parser.parse_args(
        ["--teacher-preset", "cpu-tiny", "--seed", str(seed), "--data-cache",
         str(tmp_path / "cache")]))


def test_pack_then_the_scripts_use_the_shipped_teacher(tmp_path, monkeypatch):
    run, ship = str(tmp_path / "run"), str(tmp_path / "ship")
    _fake_teacher_run(run, seed=7)
    os.makedirs(ship)
    _pack().main([run, "--subset", "3", "--out-dir", ship])
    with open(os.path.join(ship, "cpu-tiny.json")) as f:
        meta = json.load(f)
    shipped = os.path.join(ship, "cpu-tiny.pth")
    kept = torch.load(shipped, weights_only=True)
    assert set(kept) == {"model", "args", "epoch"}  # no optimizer or RNG state
    original = torch.load(os.path.join(run, "checkpoint.pth"), weights_only=True)["model"]
    assert all(torch.equal(kept["model"][k], v) for k, v in original.items())
    assert meta["command"].startswith("python methods/baseline.py --preset cpu-tiny --seed 7")
    assert meta["recorded"] == {"AP": 0.0125, "AP50": 0.05}
    assert meta["subset"]["num_images"] == 3 and set(meta["subset"]["stats"]) >= {"AP", "AP50"}

    monkeypatch.setattr(distill, "SHIPPED_TEACHERS", ship)
    other = _method_args(tmp_path, seed=8)  # another seed: another teacher, not the shipped one
    assert distill.shipped_teacher(other) is None
    args = _method_args(tmp_path, seed=7)
    assert distill.shipped_teacher(args)["sha256"] == meta["sha256"]
    path = distill.ensure_teacher(args)
    assert path == distill.teacher_cache_path(args)
    assert distill.file_sha256(path) == meta["sha256"]
    assert distill.last_log_line(path)["test_AP"] == 0.0125
    assert distill.ensure_teacher(args) == path  # now the cached one

    shutil.rmtree(os.path.dirname(path))
    with open(shipped, "r+b") as f:  # a damaged shipped file is refused, not used
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        distill.ensure_teacher(args)
    assert not os.path.exists(os.path.dirname(path))
