"""methods/baseline.py end to end on the embedded data: two training iterations plus COCO
evaluation, then --eval on the saved checkpoint gives the same numbers, and --resume of a
checkpoint from another model size is refused with a clear message."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import baseline  # noqa: E402


def _capture_detections(monkeypatch):
    """Record every detection the evaluator receives: AP after two iterations is ~0, so equal
    numbers alone would prove little; equal detections prove the two evaluations are one."""
    seen = []
    original = baseline.CocoEvaluator.update

    def update(self, targets, results):
        seen.extend((int(t["image_id"]), {k: v.clone() for k, v in r.items()})
                    for t, r in zip(targets, results))
        return original(self, targets, results)

    monkeypatch.setattr(baseline.CocoEvaluator, "update", update)
    return seen


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baseline")
    common = ["--preset", "cpu-tiny", "--synth-num-train", "8", "--synth-num-val", "4",
              "--data-cache", str(tmp / "cache"), "--num-workers", "0", "--max-iters", "2",
              "--threads", "1"]  # one thread count for both runs: bitwise-equal results
    out = tmp / "run"
    with pytest.MonkeyPatch.context() as mp:
        detections = _capture_detections(mp)
        stats = baseline.main(common + ["--output-dir", str(out)])
    return common, out, stats, detections


def test_two_iterations_train_and_evaluate(trained):
    common, out, stats, detections = trained
    assert len(detections) == 4 and all(len(r["scores"]) > 0 for _, r in detections)
    assert stats["epoch"] == 0
    assert {"train_loss", "train_loss_ce", "train_loss_bbox", "train_loss_giou",
            "test_AP", "test_AP50"} <= set(stats)
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and log[0]["test_AP"] == stats["test_AP"]
    # DETR's plot_logs reads the 12 COCOeval stats as one list, in COCOeval's order
    order = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    assert log[0]["test_coco_eval_bbox"] == [stats[f"test_{k}"] for k in order]
    assert (out / "checkpoint.pth").is_file()


def test_checkpoint_names_the_categories_and_the_detections_are_written(trained):
    """The checkpoint carries the data set's categories in label order (read here from the
    annotation file itself), and the last evaluation's detections are a COCO results file that
    pycocotools loads, one entry per recorded detection."""
    common, out, stats, detections = trained
    ann = next((out.parent / "cache").glob("synthetic-*")) / "annotations" / "instances_val2017.json"
    cats = sorted(json.loads(ann.read_text())["categories"], key=lambda c: c["id"])
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["categories"] == [{"id": c["id"], "name": c["name"]} for c in cats]
    from pycocotools.coco import COCO
    gt = COCO(str(ann))
    dt = gt.loadRes(str(out / "detections_val.json"))
    assert len(dt.getAnnIds()) == sum(len(r["scores"]) for _, r in detections)
    assert set(dt.getImgIds()) == {i for i, _ in detections}


def test_eval_only_matches_end_of_training(trained, monkeypatch):
    common, out, stats, detections = trained
    seen = _capture_detections(monkeypatch)
    again = baseline.main(common + ["--eval", "--resume", str(out / "checkpoint.pth")])
    assert [i for i, _ in seen] == [i for i, _ in detections]
    for (_, a), (_, b) in zip(seen, detections):
        for k in ("scores", "labels", "boxes"):
            assert torch.equal(a[k], b[k]), k
    for k, v in stats.items():
        if k.startswith("test_"):
            assert again[k[len("test_"):]] == v, k


def test_resume_of_another_model_is_refused(trained):
    common, out, stats, _ = trained
    with pytest.raises(ValueError, match="does not fit this model"):
        baseline.main(common + ["--hidden-dim", "48", "--resume", str(out / "checkpoint.pth"),
                                "--eval"])


def test_presets_carry_over_to_other_families():
    from common import cli
    parser = cli.build_parser("t")
    args, overrides = cli.resolve(parser.parse_args(["--variant", "dab_detr", "--preset",
                                                     "cpu-student"]))
    assert overrides["hidden_dim"] == cli.PRESETS["cpu-student"]["hidden_dim"]
    assert "two_stage" not in overrides and "num_feature_levels" not in overrides
    with pytest.raises(ValueError, match="--two-stage does not apply to dab_detr"):
        cli.resolve(parser.parse_args(["--variant", "dab_detr", "--two-stage"]))
