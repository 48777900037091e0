"""common/evaluate.py: COCOeval wrapper, checked by hand and against pycocotools run directly."""
import contextlib
import io
import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from common import data as D
from common.evaluate import CocoEvaluator, STAT_NAMES

# category ids 1, 5, 90 -> labels 0, 1, 2
CATEGORIES = [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}, {"id": 90, "name": "c"}]
LABEL_TO_CATEGORY = [1, 5, 90]


def gt_json(path):
    """4 images: 1 and 2 with two objects each (categories 1 and 5, 40x40 = medium), 3 with a crowd
    region only, 4 with nothing; 'info' and 'area' left out on purpose (the loader adds them)."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 100} for i in (1, 2, 3, 4)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [100, 20, 40, 40], "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [30, 30, 40, 40], "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 5, "bbox": [120, 50, 40, 40], "iscrowd": 0},
        {"id": 5, "image_id": 3, "category_id": 90, "bbox": [0, 0, 100, 50], "iscrowd": 1},
    ]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)
    return path


@pytest.fixture
def coco_gt(tmp_path):
    return D.load_coco_annotations(gt_json(tmp_path / "gt.json"))


def xyxy(b):
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def perfect_results(coco):
    """Post-processed results (contiguous labels, absolute xyxy) equal to the non-crowd ground truth."""
    out = {}
    for image_id in coco.getImgIds():
        anns = [a for a in coco.imgToAnns[image_id] if not a["iscrowd"]]
        out[image_id] = {"scores": torch.ones(len(anns)),
                         "labels": torch.tensor([LABEL_TO_CATEGORY.index(a["category_id"]) for a in anns],
                                                dtype=torch.int64),
                         "boxes": torch.tensor([xyxy(a["bbox"]) for a in anns], dtype=torch.float32).reshape(-1, 4)}
    return out


def run(coco, results, image_ids=None, label_to_category=LABEL_TO_CATEGORY):
    ev = CocoEvaluator(coco, label_to_category)
    ids = image_ids if image_ids is not None else sorted(results)
    ev.update([{"image_id": i} for i in ids], [results[i] for i in ids])
    return ev.summarize(verbose=False)


def pycocotools_direct(gt_path, detections, image_ids):
    """The textbook pycocotools recipe, from the json file, independent of our loader."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        for a in gt.dataset["annotations"]:
            a["area"] = a["bbox"][2] * a["bbox"][3]
        dt = gt.loadRes(detections)
        e = COCOeval(gt, dt, "bbox")
        e.params.imgIds = sorted(image_ids)
        e.evaluate()
        e.accumulate()
        e.summarize()
    return dict(zip(STAT_NAMES, e.stats.tolist()))


def test_perfect_predictions_give_one(coco_gt):
    stats = run(coco_gt, perfect_results(coco_gt))
    assert set(stats) == set(STAT_NAMES)
    for k in ("AP", "AP50", "AP75", "APm", "AR1", "AR10", "AR100", "ARm"):
        assert stats[k] == pytest.approx(1.0), k
    # no small or large ground truth: pycocotools reports -1 for those buckets
    assert stats["APs"] == -1 and stats["APl"] == -1


def test_no_predictions_give_zero(coco_gt):
    empty = {i: {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
             for i in coco_gt.getImgIds()}
    stats = run(coco_gt, empty)
    for k in ("AP", "AP50", "AP75", "APm", "AR100"):
        assert stats[k] == 0.0, k


def test_wrong_category_mapping_scores_zero(coco_gt):
    # labels read as the wrong categories (5, 1, 90 instead of 1, 5, 90): nothing matches
    assert run(coco_gt, perfect_results(coco_gt), label_to_category=[5, 1, 90])["AP"] == 0.0
    with pytest.raises(ValueError, match="category ids \\[2\\]"):
        CocoEvaluator(coco_gt, [1, 2, 90])


def test_half_found_by_hand_and_against_pycocotools(tmp_path, coco_gt):
    """Image 1's two objects found exactly (score 0.9), image 2's missed, plus a false positive on
    image 4 (no ground truth) with a lower score. Per category: 1 of 2 found before any false
    positive, so precision is 1 up to recall 0.5 and 0 beyond: COCO's 101-point AP is 51/101 at
    every IoU threshold; recall is 0.5."""
    results = perfect_results(coco_gt)
    results[1]["scores"] = torch.full((2,), 0.9)
    results[2] = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    results[4] = {"scores": torch.tensor([0.3]), "labels": torch.tensor([0]), "boxes": torch.tensor([[5., 5, 45, 45]])}
    stats = run(coco_gt, results)
    assert stats["AP"] == pytest.approx(51 / 101) and stats["AP50"] == pytest.approx(51 / 101)
    assert stats["AR100"] == pytest.approx(0.5)

    detections = [{"image_id": 1, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},
                  {"image_id": 1, "category_id": 5, "bbox": [100, 20, 40, 40], "score": 0.9},
                  {"image_id": 4, "category_id": 1, "bbox": [5, 5, 40, 40], "score": 0.3}]
    direct = pycocotools_direct(tmp_path / "gt.json", detections, [1, 2, 3, 4])
    assert stats == pytest.approx(direct)


def test_partial_boxes_against_pycocotools(tmp_path, coco_gt):
    """Shifted boxes (IoU between 0.5 and 0.95) and duplicates: every number equals pycocotools'."""
    rng = np.random.default_rng(0)
    results, detections = {}, []
    for image_id in (1, 2, 3):
        gts = [a for a in coco_gt.imgToAnns[image_id] if not a["iscrowd"]] * 2   # each object twice
        boxes, scores, labels = [], [], []
        for a in gts:
            x, y, w, h = a["bbox"]
            dx, dy = rng.uniform(-6, 6, size=2)
            s = float(rng.uniform(0.05, 1.0))
            boxes.append([x + dx, y + dy, x + dx + w, y + dy + h])
            scores.append(s)
            labels.append(LABEL_TO_CATEGORY.index(a["category_id"]))
            detections.append({"image_id": image_id, "category_id": a["category_id"],
                               "bbox": [x + dx, y + dy, w, h], "score": s})
        results[image_id] = {"scores": torch.tensor(scores, dtype=torch.float64),
                             "labels": torch.tensor(labels, dtype=torch.int64),
                             "boxes": torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)}
    stats = run(coco_gt, results)
    direct = pycocotools_direct(tmp_path / "gt.json", detections, [1, 2, 3])
    assert stats == pytest.approx(direct, abs=1e-9)
    assert 0.2 < stats["AP"] < 0.9            # a genuinely intermediate case


def test_round_trip_through_the_dataset(tmp_path):
    """Targets of a COCO folder with category ids 1, 5, 90, turned back into absolute boxes in the
    original image and mapped back to category ids, score AP 1.0."""
    from tests.test_data import write_coco
    anns = [{"id": 1, "image_id": 3, "category_id": 90, "bbox": [4, 6, 30, 20]},
            {"id": 2, "image_id": 3, "category_id": 1, "bbox": [40, 10, 24, 40]},
            {"id": 3, "image_id": 8, "category_id": 5, "bbox": [10, 12, 50, 30]}]
    write_coco(tmp_path, [(3, 80, 60), (8, 70, 50), (9, 30, 30)], anns, CATEGORIES, split="val")
    ds = D.build_dataset("val", data="coco", coco_path=tmp_path, image_size=48)
    ev = CocoEvaluator.from_dataset(ds)
    for i in range(len(ds)):
        _, t = ds[i]
        h, w = t["orig_size"].tolist()
        cx, cy, bw, bh = (t["boxes"] * torch.tensor([w, h, w, h])).unbind(-1)
        boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        ev.update([t], [{"scores": torch.ones(len(boxes)), "labels": t["labels"], "boxes": boxes}])
    stats = ev.summarize(verbose=False)
    assert stats["AP"] == pytest.approx(1.0) and stats["AR100"] == pytest.approx(1.0)


def test_bad_results_are_clear_errors(coco_gt):
    ev = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    t = [{"image_id": 1}]
    with pytest.raises(ValueError, match="labels must be in \\[0, 3\\)"):
        ev.update(t, [{"scores": torch.ones(1), "labels": torch.tensor([3]), "boxes": torch.zeros(1, 4)}])
    with pytest.raises(ValueError, match="non-finite"):
        ev.update(t, [{"scores": torch.ones(1), "labels": torch.tensor([0]),
                       "boxes": torch.tensor([[0., 0, float("nan"), 1]])}])
    with pytest.raises(ValueError, match="2 boxes, 1 scores"):
        ev.update(t, [{"scores": torch.ones(1), "labels": torch.tensor([0, 0]), "boxes": torch.zeros(2, 4)}])
    with pytest.raises(KeyError, match="scores"):
        ev.update(t, [{"labels": torch.tensor([0]), "boxes": torch.zeros(1, 4)}])
    with pytest.raises(ValueError, match="1 targets but 2 results"):
        ev.update(t, [{}, {}])
    with pytest.raises(ValueError, match="no images"):
        CocoEvaluator(coco_gt, LABEL_TO_CATEGORY).summarize(verbose=False)
    ev2 = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    ev2.update([{"image_id": 77}], [perfect_results(coco_gt)[1]])
    with pytest.raises(ValueError, match="77"):
        ev2.summarize(verbose=False)


# ------------------------------------------------------------------------------------------
# Two processes (gloo) give the numbers of one process over the whole set
# ------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, gt_path, shards, out_dir):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        coco = D.load_coco_annotations(gt_path)
        results = _shard_results(coco)
        ev = CocoEvaluator(coco, LABEL_TO_CATEGORY)
        ids = shards[rank]
        ev.update([{"image_id": i} for i in ids], [results[i] for i in ids])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(ev.summarize(verbose=False), f)
    finally:
        dist.destroy_process_group()


def _shard_results(coco):
    results = perfect_results(coco)
    results[2]["scores"] = torch.tensor([0.8, 0.2])                     # image 2: one box misplaced
    results[2]["boxes"][1] += 30
    return results


def test_gathered_from_two_processes(tmp_path):
    gt_path = gt_json(tmp_path / "gt.json")
    # a DistributedSampler-like split, with image 1 padded in twice: it must count once
    shards = [[1, 3], [2, 4, 1]]
    ctx = mp.get_context("fork")  # the children inherit the imports: much faster than spawn
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(gt_path), shards, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    coco = D.load_coco_annotations(gt_path)
    single = run(coco, _shard_results(coco), image_ids=[1, 2, 3, 4])
    assert per_rank[0] == pytest.approx(single) and per_rank[1] == pytest.approx(single)
    assert 0 < single["AP"] < 1


# ------------------------------------------------------------------------------------------
# The report: detections JSON, COCOeval's table, per-class AP
# ------------------------------------------------------------------------------------------

def _partial(coco_gt):
    """Image 1 found exactly at 0.9, image 2 missed, a category-1 false positive on image 4."""
    results = perfect_results(coco_gt)
    results[1]["scores"] = torch.full((2,), 0.9)
    results[2] = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                  "boxes": torch.zeros(0, 4)}
    results[4] = {"scores": torch.tensor([0.3]), "labels": torch.tensor([0]),
                  "boxes": torch.tensor([[5., 5, 45, 45]])}
    ev = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    ev.update([{"image_id": i} for i in sorted(results)], [results[i] for i in sorted(results)])
    return ev, ev.summarize(verbose=False)


def _pycocotools(gt_path, detections, cat_ids=None):
    """COCOeval run directly from the files; returns (stats, the text summarize printed)."""
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        gt = COCO(str(gt_path))
        for a in gt.dataset["annotations"]:
            a["area"] = a["bbox"][2] * a["bbox"][3]
        e = COCOeval(gt, gt.loadRes(detections), "bbox")
        e.params.imgIds = [1, 2, 3, 4]
        if cat_ids is not None:
            e.params.catIds = cat_ids
        e.evaluate()
        e.accumulate()
        text = io.StringIO()  # only summarize's lines
    with contextlib.redirect_stdout(text):
        e.summarize()
    return e.stats.tolist(), text.getvalue()


def test_written_detections_reload_to_the_same_numbers(tmp_path, coco_gt):
    ev, stats = _partial(coco_gt)
    path = tmp_path / "out" / "detections.json"
    assert ev.write_detections(path) == 3
    detections = json.loads(path.read_text())
    assert {(d["image_id"], d["category_id"]) for d in detections} == {(1, 1), (1, 5), (4, 1)}
    assert [10, 10, 40, 40] in [d["bbox"] for d in detections]  # xywh in pixels
    direct, _ = _pycocotools(tmp_path / "gt.json", detections)
    assert list(stats.values()) == pytest.approx(direct, abs=1e-12)


def test_summary_table_is_pycocotools_own(tmp_path, coco_gt):
    ev, _ = _partial(coco_gt)
    _, printed = _pycocotools(tmp_path / "gt.json", json.loads(
        json.dumps([d for i in sorted(ev.detections) for d in ev.detections[i]])))
    table = ev.summary_table()
    assert table.splitlines() == printed.strip("\n").splitlines()
    assert len(table.splitlines()) == 12 and "Average Precision  (AP) @[ IoU=0.50:0.95" in table


def test_per_class_ap_by_hand_and_against_single_category_cocoeval(tmp_path, coco_gt):
    """Category 1: one of two objects found before its false positive -> 51/101 at every IoU;
    category 5: one of two, no false positive -> 51/101 too; category 90: crowd only -> nan.
    Each row also equals COCOeval restricted to that one category."""
    ev, _ = _partial(coco_gt)
    rows = {r["category_id"]: r for r in ev.per_class_ap()}
    assert [r["name"] for r in ev.per_class_ap()] == ["a", "b", "c"]
    for cat in (1, 5):
        for k in ("AP", "AP50", "AP75"):
            assert rows[cat][k] == pytest.approx(51 / 101), (cat, k)
    assert all(np.isnan(rows[90][k]) for k in ("AP", "AP50", "AP75"))
    detections = [d for i in sorted(ev.detections) for d in ev.detections[i]]
    for cat in (1, 5):
        direct, _ = _pycocotools(tmp_path / "gt.json", detections, cat_ids=[cat])
        assert [rows[cat]["AP"], rows[cat]["AP50"], rows[cat]["AP75"]] == \
            pytest.approx(direct[:3], abs=1e-12)
    table = ev.per_class_table()
    assert "a" in table and "0.505" in table and "nan" in table


def test_per_class_ap_on_shifted_boxes_against_single_category_cocoeval(tmp_path, coco_gt):
    """Intermediate APs that differ between categories and IoU thresholds."""
    rng = np.random.default_rng(1)
    results, detections = {}, []
    for image_id in (1, 2):
        gts = [a for a in coco_gt.imgToAnns[image_id] if not a["iscrowd"]]
        boxes, scores, labels = [], [], []
        for a in gts * 2:
            x, y, w, h = a["bbox"]
            dx, dy = rng.uniform(-8, 8, size=2)
            s = float(rng.uniform(0.05, 1.0))
            boxes.append([x + dx, y + dy, x + dx + w, y + dy + h]), scores.append(s)
            labels.append(LABEL_TO_CATEGORY.index(a["category_id"]))
            detections.append({"image_id": image_id, "category_id": a["category_id"],
                               "bbox": [x + dx, y + dy, w, h], "score": s})
        results[image_id] = {"scores": torch.tensor(scores, dtype=torch.float64),
                             "labels": torch.tensor(labels),
                             "boxes": torch.tensor(boxes, dtype=torch.float64)}
    for i in (3, 4):
        results[i] = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                      "boxes": torch.zeros(0, 4)}
    ev = CocoEvaluator(coco_gt, LABEL_TO_CATEGORY)
    ev.update([{"image_id": i} for i in (1, 2, 3, 4)], [results[i] for i in (1, 2, 3, 4)])
    ev.summarize(verbose=False)
    rows = {r["category_id"]: r for r in ev.per_class_ap()}
    for cat in (1, 5):
        direct, _ = _pycocotools(tmp_path / "gt.json", detections, cat_ids=[cat])
        got = [rows[cat]["AP"], rows[cat]["AP50"], rows[cat]["AP75"]]
        assert got == pytest.approx(direct[:3], abs=1e-12)
    assert rows[1]["AP"] != rows[5]["AP"] or rows[1]["AP75"] != rows[1]["AP50"]


def test_report_needs_a_summarize_first(coco_gt):
    with pytest.raises(RuntimeError, match="summarize"):
        CocoEvaluator(coco_gt, LABEL_TO_CATEGORY).summary_table()
