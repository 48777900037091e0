"""common/distill.py: the teacher a method script gets (cached on the embedded data, loaded
from a checkpoint of ours or an official one, frozen), the baseline student beside it, and the
teacher/student pair rules of check_pair."""
import argparse
import functools
import os
import subprocess

import pytest
import torch

from common import distill, engine
from common.checkpoint import ours_to_official
from common.checkpoint import load_detector, save_checkpoint
from common.detr import build_model
from test_checkpoint import SMALL, images, tiny  # tiny random models, official layouts


def _args(tmp_path, *extra):
    parser = distill.build_parser("test")
    return distill.resolve(parser.parse_args(
        ["--teacher-preset", "cpu-tiny", "--preset", "cpu-tiny", "--synth-num-train", "8",
         "--synth-num-val", "4", "--data-cache", str(tmp_path / "cache"), "--max-iters", "1",
         "--num-workers", "0", *extra]))


@pytest.mark.slow
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

    teacher = distill.freeze(load_detector(path, 10))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.variant == "deformable_detr" and teacher.cfg.hidden_dim == 32


def test_teacher_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="--teacher PATH is required with --data coco"):
        distill.ensure_teacher(_args(tmp_path, "--data", "coco", "--coco-path", str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        distill.ensure_teacher(_args(tmp_path, "--teacher", str(tmp_path / "nope.pth")))
    weights = tmp_path / "weights.pth"
    save_checkpoint({"model": {}}, str(weights))
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        load_detector(str(weights), 10)


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


# ------------------------------------------------------------------------------------------
# check_pair: the teacher/student rules each method declares
# ------------------------------------------------------------------------------------------

PAIR_TINY = dict(backbone="tiny", width=8, hidden_dim=16, nheads=4, enc_layers=1, dec_layers=1,
                 dim_feedforward=16, num_queries=4, dropout=0.0)
PAIR_MODELS = {  # name -> (variant, num_classes, overrides)
    "detr": ("detr", 4, {}), "conditional_detr": ("conditional_detr", 4, {}),
    "dab_detr": ("dab_detr", 4, {}), "dino": ("dino", 4, dict(num_feature_levels=3)),
    "deformable_detr": ("deformable_detr", 4, dict(num_feature_levels=3)),
    "deformable_detr_4lv": ("deformable_detr", 4, dict(num_feature_levels=4)),
    "conditional_detr_5cls": ("conditional_detr", 5, {}),
    "conditional_detr_softmax": ("conditional_detr", 4, dict(class_loss="softmax")),
    # DC5 needs a Bottleneck ResNet: the one model here with a real backbone
    "conditional_detr_dc5": ("conditional_detr", 4, dict(backbone="resnet50", dilation=True)),
}
FOUR = ("conditional_detr", "dab_detr", "deformable_detr", "dino")
LEVELS = dict(supported=FOUR, same_levels="compared level by level")


@functools.lru_cache(maxsize=None)
def pair_model(name):
    variant, num_classes, overrides = PAIR_MODELS[name]
    return build_model(variant, num_classes, **{**PAIR_TINY, **overrides})


PAIR_CASES = [  # teacher, student, the rules, the refusal (a regex) or None: accepted
    ("deformable_detr", "deformable_detr", LEVELS, None),
    ("dab_detr", "dab_detr", dict(supported=FOUR), None),
    # one family: named first, even when a variant is also unsupported
    ("conditional_detr", "dab_detr", dict(supported=FOUR),
     r"^M needs teacher and student of the same DETR family; got teacher conditional_detr -> "
     r"student dab_detr$"),
    ("detr", "dino", dict(supported=FOUR, same_variant="queries are shared"),
     r"same DETR family \(queries are shared\); got teacher detr -> student dino$"),
    # supported variants
    ("detr", "detr", dict(supported=FOUR, supported_reason="sigmoid classes"),
     r"^M does not support teacher detr -> student detr \(sigmoid classes\): the family must be "
     r"one of conditional_detr, dab_detr, deformable_detr, dino, not detr$"),
    ("dino", "dino", dict(supported=FOUR[:3]), r"student dino: the family .*, not dino$"),
    ("detr", "deformable_detr", dict(supported=FOUR, same_variant=False),
     r"^M does not support teacher detr -> student deformable_detr: both must be one of .*, "
     r"not detr$"),
    ("deformable_detr", "detr", dict(supported=FOUR, same_variant=False),
     r"teacher deformable_detr -> student detr: both .*, not detr$"),
    ("deformable_detr", "dab_detr", dict(supported=FOUR, same_variant=False, same_classes=False,
                                         same_class_loss=False), None),
    # classes and class loss
    ("conditional_detr", "conditional_detr_5cls", dict(supported=FOUR),
     r"^M needs teacher and student of the same classes: teacher conditional_detr has 4 "
     r"classes, student conditional_detr has 5$"),
    ("conditional_detr", "conditional_detr_5cls", dict(supported=FOUR, same_classes=False), None),
    ("conditional_detr", "conditional_detr_softmax", dict(supported=FOUR),
     r"^M needs teacher and student of the same class loss: teacher conditional_detr uses "
     r"focal, student conditional_detr uses softmax$"),
    ("conditional_detr", "conditional_detr_softmax", dict(supported=FOUR, same_class_loss=False),
     None),
    # feature levels: only when asked for
    ("deformable_detr_4lv", "deformable_detr", LEVELS,
     r"^M needs teacher and student of the same num_feature_levels \(compared level by "
     r"level\): teacher deformable_detr has 4, student deformable_detr has 3$"),
    ("deformable_detr", "deformable_detr_4lv", dict(supported=FOUR, same_levels=True),
     r"num_feature_levels: teacher deformable_detr has 3, student deformable_detr has 4$"),
    ("deformable_detr_4lv", "deformable_detr", dict(supported=FOUR, same_levels=False), None),
    ("conditional_detr", "conditional_detr", LEVELS, None),  # single-scale: 1 level each
    # stride: only when asked for
    ("conditional_detr_dc5", "conditional_detr", dict(supported=FOUR, same_stride="cell by cell"),
     r"^M needs teacher and student of the same stride \(cell by cell\): teacher "
     r"conditional_detr has dilation=True, student conditional_detr has dilation=False"),
    ("conditional_detr_dc5", "conditional_detr", dict(supported=FOUR), None),
]


@pytest.mark.parametrize("teacher, student, rules, refusal", PAIR_CASES,
                         ids=[f"{t}-{s}-{'refused' if r else 'accepted'}"
                              for t, s, _, r in PAIR_CASES])
def test_check_pair_refuses_by_rule(teacher, student, rules, refusal):
    t, s = pair_model(teacher), pair_model(student)
    if refusal is None:
        distill.check_pair("M", t, s, **rules)
    else:
        with pytest.raises(ValueError, match=refusal):
            distill.check_pair("M", t, s, **rules)


# ------------------------------------------------------------------------------------------
# Official teachers: --teacher-variant / --teacher-arg, COCO's 91 slots -> the data set's ids
# ------------------------------------------------------------------------------------------

IDS = [1, 3, 90, 17]  # a data set's label_to_category: label i is COCO slot IDS[i]


def official_file(tmp_path, variant, seed=0, **flags):
    """A tiny official COCO checkpoint (91 class slots) saved as the official repos do: the
    weights under "model" in the official layout, the training args as an argparse.Namespace."""
    full = tiny(variant, num_classes=91, seed=seed, **flags)
    official = ours_to_official(full.state_dict(), variant, dec_layers=SMALL["dec_layers"],
                                **flags)
    path = tmp_path / f"{variant}-official.pth"
    torch.save({"model": {"module." + k: v for k, v in official.items()}, "epoch": 49,
                "args": argparse.Namespace(lr=2e-4, coco_path="/data/coco", **flags)}, path)
    return str(path), official


def teacher_args(tmp_path, path, variant, *flags):
    """The command line of a method script with an official teacher at SMALL's sizes."""
    items = [f"{k}={v}" for k, v in SMALL.items()] + list(flags)
    return _args(tmp_path, "--teacher", path, "--teacher-variant", variant,
                 *[a for item in items for a in ("--teacher-arg", item)])


def class_head_keys(official, i):
    """The file's keys of class head ``i``: one head for all layers, or one per index."""
    if "class_embed.weight" in official:
        return "class_embed.weight", "class_embed.bias"
    return f"class_embed.{i}.weight", f"class_embed.{i}.bias"


@pytest.mark.parametrize("variant,flags,kw", [
    ("conditional_detr", [], {}),
    ("dab_detr", [], {}),
    ("deformable_detr", [], {}),
    ("deformable_detr", ["with_box_refine=true"], dict(with_box_refine=True)),
    ("deformable_detr", ["with-box-refine=yes", "two_stage=True"],
     dict(with_box_refine=True, two_stage=True)),
    ("dino", [], {}),
], ids=["conditional", "dab", "deformable", "deformable+refine", "deformable+refine+2stage",
        "dino"])
def test_official_teacher_loads_with_the_data_sets_slots(tmp_path, variant, flags, kw):
    path, official = official_file(tmp_path, variant, **kw)
    args = teacher_args(tmp_path, path, variant, *flags)
    assert args.teacher_overrides == {**SMALL, **kw}  # typed: ints, floats, strings, bools
    teacher = distill.freeze(load_detector(
        distill.ensure_teacher(args), len(IDS), "cpu", variant=args.teacher_variant,
        overrides=args.teacher_overrides, category_ids=IDS))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.variant == variant and teacher.num_classes == len(IDS)
    if variant == "deformable_detr":
        assert (teacher.cfg.with_box_refine, teacher.cfg.two_stage) == (
            kw.get("with_box_refine", False), kw.get("two_stage", False))
    # class rows: the file's rows at the chosen slots (a two-stage proposal head keeps slot 0,
    # its objectness channel, first)
    proposal = len(teacher.class_embed) - 1 if kw.get("two_stage") else None
    for i, head in enumerate(teacher.class_embed):
        rows = [0] + IDS[1:] if i == proposal else IDS
        w, b = class_head_keys(official, i)
        assert torch.equal(head.weight, official[w][rows]), (i, w)
        assert torch.equal(head.bias, official[b][rows]), (i, b)
    if variant == "dino":
        assert torch.equal(teacher.transformer.enc_out_class_embed.weight,
                           official["transformer.enc_out_class_embed.weight"][IDS])
        assert torch.equal(teacher.label_enc.weight, official["label_enc.weight"][IDS + [91]])
    # every other weight is the file's, under the same name
    own = teacher.state_dict()
    same = [k for k in own if k in official and "class_embed" not in k and k != "label_enc.weight"]
    assert len(same) > len(own) // 2
    assert all(torch.equal(own[k], official[k]) for k in same)
    with torch.no_grad():
        out = teacher(*images())
    assert out["pred_logits"].shape[-1] == len(IDS)


def test_official_teacher_errors_are_clear(tmp_path):
    path, _ = official_file(tmp_path, "deformable_detr", with_box_refine=True)
    # no --teacher-variant: what to pass
    with pytest.raises(ValueError, match="not a checkpoint of this project.*--teacher-variant"):
        load_detector(path, len(IDS), category_ids=IDS)
    # the file's stored args say with_box_refine=True: a contradicting setting names both
    with pytest.raises(ValueError, match=r"with_box_refine=False contradicts the args stored in "
                                         rf"{path}: it was trained with with_box_refine=True"):
        load_detector(path, len(IDS), variant="deformable_detr",
                      overrides={**SMALL, "with_box_refine": False}, category_ids=IDS)
    # a file without stored args and other flags than given: the file is named
    bare = tmp_path / "no-args.pth"
    ckpt = torch.load(path, weights_only=False)
    torch.save({"model": ckpt["model"]}, bare)
    with pytest.raises(ValueError, match=f"{bare} is neither .* official deformable_detr"):
        load_detector(str(bare), len(IDS), variant="deformable_detr", overrides=SMALL,
                      category_ids=IDS)
    with pytest.raises(ValueError, match="4 category ids for 5 classes"):
        load_detector(path, 5, variant="deformable_detr", category_ids=IDS)
    # not a checkpoint at all
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"could not read {junk}"):
        load_detector(str(junk), 10, variant="dino")
    # the command line
    for extra, msg in (
            (["--teacher-arg", "two_stage=true"], "needs --teacher-variant"),
            (["--teacher-variant", "dino"], r"given as --teacher PATH"),
            (["--teacher", path, "--teacher-variant", "dino", "--teacher-arg", "with_box_refine=1"],
             "dino has no such setting"),
            (["--teacher", path, "--teacher-variant", "deformable_detr", "--teacher-arg",
              "two_stage=maybe"], "two_stage takes a bool"),
            (["--teacher", path, "--teacher-variant", "dino", "--teacher-arg", "num_queries"],
             "expected NAME=VALUE"),
            (["--teacher", path, "--teacher-variant", "dino", "--teacher-arg",
              "backbone_weights=crops"], "holds every weight")):
        with pytest.raises(ValueError, match=msg):
            _args(tmp_path, *extra)
    with pytest.raises(SystemExit):  # argparse: not a variant
        _args(tmp_path, "--teacher", path, "--teacher-variant", "yolo")
    help_text = distill.build_parser("test").format_help()
    assert "--teacher-variant" in help_text and "with_box_refine=true" in help_text


def test_our_checkpoints_load_as_before(tmp_path):
    model = tiny("deformable_detr", num_classes=10, with_box_refine=True)
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint({"model": model.state_dict(), "epoch": 3, "args": {
        "variant": "deformable_detr",
        "model_overrides": {**SMALL, "with_box_refine": True, "backbone_weights": "crops"}}},
        path)
    for kw in ({}, {"category_ids": list(range(1, 11))}, {"variant": "deformable_detr"}):
        loaded = load_detector(path, 10, "cpu", **kw)  # positional, as clockdistill
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="checkpoint of this project .*for official checkpoints"):
        load_detector(path, 10, variant="dino")
    with pytest.raises(ValueError, match="checkpoint of this project .*for official checkpoints"):
        load_detector(path, 10, overrides={"two_stage": True})


def test_load_teacher_hands_the_data_sets_ids_to_an_official_teacher(tmp_path):
    """distill.load_teacher loads the official teacher with the embedded data's category ids
    (1..10): its heads are the file's slots 1..10."""
    path, official = official_file(tmp_path, "deformable_detr", with_box_refine=True)
    args = teacher_args(tmp_path, path, "deformable_detr", "with_box_refine=true")
    run = engine.prepare(args)
    teacher = distill.load_teacher(args, run)
    assert run.num_classes == 10 and teacher.num_classes == 10
    assert not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher.class_embed[2].weight, official["class_embed.2.weight"][1:11])


@pytest.mark.slow
def test_baseline_trains_beside_and_equals_a_direct_baseline_run(tmp_path):
    """--baseline: methods/baseline.py runs in its own process while the distillation trains;
    the student it caches is the one baseline.py trains by hand with the same flags and 1
    thread, and a cached baseline is not trained again."""
    args = _args(tmp_path, "--seed", "3")
    path = distill.start_baseline(args)
    assert not os.path.exists(path)          # still training, beside this process
    assert distill.start_baseline(args) == path  # not started twice
    assert distill.wait_for_baseline(args) == path and os.path.isfile(path)
    assert distill.wait_for_baseline(args) == path  # cached from now on

    by_hand = tmp_path / "by-hand"
    subprocess.run(distill._baseline_command(args, str(by_hand), threads=1), check=True,
                   capture_output=True)
    ours, ref = torch.load(path, weights_only=False), torch.load(
        by_hand / "checkpoint.pth", weights_only=False)
    assert ours["model"].keys() == ref["model"].keys()
    for k, v in ref["model"].items():
        assert torch.equal(ours["model"][k], v), k
    cmd = distill._baseline_command(args, "OUT", threads=1)
    for flag, value in (("--seed", "3"), ("--max-iters", "1"), ("--threads", "1"),
                        ("--synth-num-train", "8")):
        assert cmd[cmd.index(flag) + 1] == value


@pytest.mark.slow
def test_a_failed_baseline_is_named_and_not_cached(tmp_path, capsys):
    args = _args(tmp_path, "--seed", "4")
    args.batch_size = -1                     # baseline.py refuses it
    path = distill.start_baseline(args)
    assert distill.wait_for_baseline(args) is None and not os.path.exists(path)
    out = capsys.readouterr().out
    assert "baseline student: training failed" in out and "stdout.txt" in out
