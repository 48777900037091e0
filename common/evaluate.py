"""COCO evaluation: pycocotools COCOeval (bbox) on detections gathered from every process.

    evaluator = CocoEvaluator.from_dataset(val_set)          # ground truth + label -> category id map
    for images, masks, targets in loader:
        results = postprocess(model(images, masks), orig_sizes)  # [{"scores","labels","boxes" xyxy abs}]
        evaluator.update(targets, results)
    stats = evaluator.summarize()    # {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", ...}
    print(evaluator.summary_table())     # COCOeval's 12 lines
    print(evaluator.per_class_table())   # AP, AP50, AP75 of each category, by name
    evaluator.write_detections("detections.json")  # COCO results format, for COCO.loadRes

Every image passed to ``update`` counts, with or without detections (its ground truth then counts
as missed). Under torch.distributed every process calls ``summarize``; the detections are gathered
from all of them first, so each process gets the same numbers as one process over the whole set.
An image seen twice (DistributedSampler pads the last batch by repeating images) counts once.
Like pycocotools, a bucket with no ground truth (e.g. APl when no object is large) reports -1.
"""
import contextlib
import io
import json
import math
import os

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from common.distributed import all_gather_objects, is_main_process

__all__ = ["CocoEvaluator", "results_to_coco", "coco_evaluate", "per_class_ap",
           "format_per_class", "STAT_NAMES"]

# the order of COCOeval.stats for iouType="bbox"
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def results_to_coco(image_id, result, label_to_category):
    """One image's post-processed result -> COCO result dicts
    ``{"image_id", "category_id", "bbox" [x, y, w, h] absolute, "score"}``.

    ``result``: {"scores" (N,), "labels" (N,) contiguous labels, "boxes" (N, 4) absolute xyxy}.
    """
    for key in ("scores", "labels", "boxes"):
        if key not in result:
            raise KeyError(f"result for image {image_id} has no '{key}' (expected scores, labels, boxes)")
    boxes = torch.as_tensor(result["boxes"]).detach().to("cpu", torch.float64).reshape(-1, 4)
    scores = torch.as_tensor(result["scores"]).detach().to("cpu", torch.float64).reshape(-1)
    labels = torch.as_tensor(result["labels"]).detach().to("cpu", torch.int64).reshape(-1)
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"result for image {image_id}: {len(boxes)} boxes, {len(scores)} scores, "
                         f"{len(labels)} labels")
    if not (torch.isfinite(boxes).all() and torch.isfinite(scores).all()):
        raise ValueError(f"result for image {image_id} has non-finite boxes or scores")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(label_to_category)):
        raise ValueError(f"result for image {image_id}: labels must be in [0, {len(label_to_category)}), "
                         f"got {labels.min().item()}..{labels.max().item()}")
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    return [{"image_id": int(image_id), "category_id": int(label_to_category[lb]), "bbox": b, "score": s}
            for lb, b, s in zip(labels.tolist(), xywh, scores.tolist())]


def coco_evaluate(coco_gt: COCO, detections, image_ids, verbose=False):
    """COCOeval (bbox) of COCO-format ``detections`` over ``image_ids``; returns (stats dict, COCOeval)."""
    image_ids = sorted(set(int(i) for i in image_ids))
    if not image_ids:
        raise ValueError("no images were evaluated (image_ids is empty)")
    unknown = set(image_ids) - set(coco_gt.getImgIds())
    if unknown:
        raise ValueError(f"image ids {sorted(unknown)[:5]} are not in the ground truth")
    coco_gt.dataset.setdefault("info", {})  # pycocotools 2.0.9-2.0.10 loadRes reads it
    text = io.StringIO()  # what pycocotools prints; its last 12 lines are the summary table
    with contextlib.redirect_stdout(text):
        if detections:
            coco_dt = coco_gt.loadRes(list(detections))
        else:  # loadRes cannot take an empty list; an empty result set scores 0 wherever there is ground truth
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "annotations": [],
                               "categories": list(coco_gt.dataset["categories"])}
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    if verbose:
        print(text.getvalue(), end="")
    coco_eval.summary_text = "\n".join(text.getvalue().rstrip("\n").splitlines()[-12:])
    stats = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
    return stats, coco_eval


def per_class_ap(coco_eval: COCOeval):
    """AP, AP50 and AP75 of each category from an accumulated COCOeval (bbox), as MMDetection's
    ``classwise`` table: the mean of ``eval["precision"][T, R, k, area "all", maxDets 100]``
    over the IoU thresholds T (all, or 0.5, or 0.75) and recall points R, skipping the -1
    entries; NaN for a category without ground truth in the evaluated images.

    -> [{"category_id", "name", "AP", "AP50", "AP75"}] in category id order."""
    precision = coco_eval.eval["precision"]  # (T iou thresholds, R recalls, K cats, A areas, M)
    iou = list(coco_eval.params.iouThrs)
    area = list(coco_eval.params.areaRngLbl).index("all")
    max_dets = list(coco_eval.params.maxDets).index(100) if 100 in coco_eval.params.maxDets else -1
    cats = coco_eval.cocoGt.cats
    rows = []
    for k, cat_id in enumerate(coco_eval.params.catIds):
        def mean(t_index):
            p = precision[t_index, :, k, area, max_dets]
            p = p[p > -1]
            return float(p.mean()) if p.size else float("nan")
        rows.append({"category_id": int(cat_id), "name": str(cats[cat_id].get("name", cat_id)),
                     "AP": mean(slice(None)), "AP50": mean(_iou_index(iou, 0.5)),
                     "AP75": mean(_iou_index(iou, 0.75))})
    return rows


def _iou_index(thresholds, value):
    for i, t in enumerate(thresholds):
        if abs(t - value) < 1e-9:
            return i
    raise ValueError(f"IoU threshold {value} is not among COCOeval's {list(thresholds)}")


def format_per_class(rows, columns=2):
    """The per-class rows of ``per_class_ap`` as a text table (``columns`` categories a line);
    categories without ground truth show "nan"."""
    def cell(x):
        return "nan" if math.isnan(x) else f"{x:.3f}"
    width = max([len("category")] + [len(r["name"]) for r in rows])
    head = f"{'category':<{width}} {'AP':>6} {'AP50':>6} {'AP75':>6}"
    lines = [" | ".join([head] * min(columns, max(len(rows), 1)))]
    for i in range(0, len(rows), columns):
        lines.append(" | ".join(f"{r['name']:<{width}} {cell(r['AP']):>6} {cell(r['AP50']):>6} "
                                f"{cell(r['AP75']):>6}" for r in rows[i:i + columns]))
    return "\n".join(lines)


class CocoEvaluator:
    """Accumulates detections over an evaluation pass and scores them with COCOeval.

    coco_gt: the pycocotools ``COCO`` of the ground truth (``dataset.coco``).
    label_to_category: label -> COCO category id (``dataset.label_to_category``).
    """

    def __init__(self, coco_gt: COCO, label_to_category):
        self.coco_gt = coco_gt
        self.label_to_category = [int(c) for c in label_to_category]
        missing = set(self.label_to_category) - set(coco_gt.getCatIds())
        if missing:
            raise ValueError(f"label_to_category holds category ids {sorted(missing)} that the ground truth "
                             f"does not define")
        self.detections = {}   # image id -> list of COCO result dicts (first time the image is seen)
        self.coco_eval = None  # the last COCOeval, for whoever wants its arrays

    @classmethod
    def from_dataset(cls, dataset):
        return cls(dataset.coco, dataset.label_to_category)

    def update(self, targets, results):
        """targets: the batch's target dicts (for "image_id"); results: PostProcess output, same order."""
        if len(targets) != len(results):
            raise ValueError(f"update: {len(targets)} targets but {len(results)} results")
        for target, result in zip(targets, results):
            image_id = int(target["image_id"])
            if image_id not in self.detections:
                self.detections[image_id] = results_to_coco(image_id, result, self.label_to_category)

    def _gathered(self):
        """{image id: detections} over all processes; an image seen by several keeps the first copy."""
        parts = all_gather_objects(self.detections)
        if len(parts) == 1:
            return self.detections
        merged = {}
        for part in parts:
            for image_id, dets in part.items():
                merged.setdefault(image_id, dets)
        return merged

    def summarize(self, verbose=None):
        """Gather, run COCOeval, return {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100",
        "ARs", "ARm", "ARl"}. ``verbose`` (default: on the main process) prints pycocotools' table."""
        per_image = self._gathered()
        if verbose is None:
            verbose = is_main_process()
        detections = [d for image_id in sorted(per_image) for d in per_image[image_id]]
        stats, self.coco_eval = coco_evaluate(self.coco_gt, detections, per_image.keys(), verbose=verbose)
        return stats

    def reset(self):
        self.detections = {}

    def _last_eval(self):
        if self.coco_eval is None:
            raise RuntimeError("call summarize() first")
        return self.coco_eval

    def summary_table(self) -> str:
        """COCOeval's 12-line summary (AP, AR by IoU, area and maxDets) of the last summarize."""
        return self._last_eval().summary_text

    def per_class_ap(self):
        """[{"category_id", "name", "AP", "AP50", "AP75"}] of the last summarize (see
        ``per_class_ap``)."""
        return per_class_ap(self._last_eval())

    def per_class_table(self, columns=2) -> str:
        return format_per_class(self.per_class_ap(), columns)

    def write_detections(self, path) -> int:
        """Write every detection gathered over all processes as
        COCO results JSON: ``[{"image_id", "category_id", "bbox" [x, y, w, h] pixels,
        "score"}]``, sorted by image id; loads with ``COCO.loadRes``. Under torch.distributed
        every process calls it (the detections are gathered), the main one writes. Returns the
        number of detections."""
        per_image = self._gathered()
        detections = [d for image_id in sorted(per_image) for d in per_image[image_id]]
        if is_main_process():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump(detections, f)
            os.replace(tmp, path)
        return len(detections)
