"""common/distill.py: the teacher a method script gets (cached on the embedded data, loaded
from a checkpoint, frozen) and the baseline student beside it."""
import os
import subprocess

import pytest
import torch

from common import distill, engine


def _args(tmp_path, *extra):
    parser = distill.build_parser("test")
    return distill.resolve(parser.parse_args(
        ["--teacher-preset", "cpu-tiny", "--preset", "cpu-tiny", "--synth-num-train", "8",
         "--synth-num-val", "4", "--data-cache", str(tmp_path / "cache"), "--max-iters", "1",
         "--num-workers", "0", *extra]))


def test_teacher_is_trained_once_then_cached(tmp_path, monkeypatch):
    args = _args(tmp_path)
    calls = []
    real_run = subprocess.run

    def counting_run(cmd, **kw):
        calls.append(cmd)
        return real_run(cmd, **kw)

    monkeypatch.setattr(subprocess, "run", counting_run)
    path = distill.ensure_teacher(args)
    assert os.path.isfile(path) and len(calls) == 1
    assert "--preset" in calls[0] and calls[0][calls[0].index("--preset") + 1] == "cpu-tiny"
    assert distill.ensure_teacher(args) == path and len(calls) == 1  # cached
    # another preset or data setting is another teacher
    assert distill.teacher_cache_path(_args(tmp_path, "--synth-seed", "1")) != path

    teacher = distill.freeze(distill.load_detector(path, 10))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.variant == "deformable_detr" and teacher.cfg.hidden_dim == 32


def test_teacher_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="--teacher PATH is required with --data coco"):
        distill.ensure_teacher(_args(tmp_path, "--data", "coco", "--coco-path", str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        distill.ensure_teacher(_args(tmp_path, "--teacher", str(tmp_path / "nope.pth")))
    weights = tmp_path / "weights.pth"
    engine.save_checkpoint({"model": {}}, str(weights))
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        distill.load_detector(str(weights), 10)


def test_baseline_cache_key_follows_the_student_and_schedule(tmp_path):
    a = distill.baseline_cache_path(_args(tmp_path))
    assert a == distill.baseline_cache_path(_args(tmp_path))
    assert a != distill.baseline_cache_path(_args(tmp_path, "--hidden-dim", "48"))
    assert a != distill.baseline_cache_path(_args(tmp_path, "--seed", "3"))
    assert a != distill.baseline_cache_path(_args(tmp_path, "--epochs", "2"))
    # the teacher does not change which baseline student is meant
    assert a == distill.baseline_cache_path(_args(tmp_path, "--teacher-preset", "cpu-teacher"))


def test_config_flags_follow_the_dataclass():
    import argparse
    from dataclasses import dataclass, field
    from typing import Optional

    @dataclass(frozen=True)
    class Cfg:
        use_a: bool = True
        weight: float = 1          # an int literal in a float field still parses floats
        cap: Optional[int] = None
        mode: str = "x"
        note: int = field(default=3, metadata={"help": "from the metadata"})

    parser = argparse.ArgumentParser()
    distill.add_config_args(parser, Cfg, "t", help={"weight": "w"}, choices={"mode": ["x", "y"]},
                            flags={"use_a": "a"})
    assert distill.config_from_args(Cfg, parser.parse_args([])) == Cfg()
    cfg = distill.config_from_args(Cfg, parser.parse_args(
        ["--no-a", "--weight", "0.5", "--cap", "7", "--mode", "y", "--note", "4"]))
    assert cfg == Cfg(use_a=False, weight=0.5, cap=7, mode="y", note=4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "z"])
    assert "from the metadata" in parser.format_help()
