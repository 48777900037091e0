"""What a teacher answers to CLoCKDistill's target-aware queries, over the validation split.

L_tcld (methods/clockdistill.py) feeds queries built from each ground-truth object (frozen label
embedding, the GT box as reference) to the teacher and the student, and pulls the student's
answer towards the teacher's. That helps only if the teacher's answer is better than the query
it started from. This probe measures, for every GT object of the validation split:

  target-aware  the teacher's last-layer answer to the object's own target-aware query: its
                confidence w = max_c sigmoid (L_tcld's query weight), whether its top class is
                the GT label, and the IoU of its box with the GT box the query started from;
  own queries   for comparison, the teacher's best answer among its ordinary queries: the
                prediction with the highest IoU with the object, its confidence and top class.

    python bench/clockdistill_probe.py                  # the cached cpu-teacher, embedded data
    python bench/clockdistill_probe.py --teacher t.pth --data coco --coco-path DIR

The query builder is built as in training (frozen random weights from --seed), so the numbers
are those of one draw of it.
"""
import os
import statistics
import sys

import torch
from torchvision.ops import box_iou

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "methods"))
import clockdistill  # noqa: E402
from common import distill, engine  # noqa: E402
from common.checkpoint import load_detector  # noqa: E402
from common.box_ops import cxcywh_to_xyxy  # noqa: E402
from common.data import build_dataset, collate  # noqa: E402


@torch.no_grad()
def probe(teacher, dataset, cfg, device, batch_size=8, max_images=None):
    """Per GT object: (w, correct, IoU) of the target-aware answer and of the best own answer."""
    # the distiller builds the target-aware query builders; the teacher stands in as student
    kd = clockdistill.CLoCKDistiller(cfg, teacher, teacher, dataset.num_classes).to(device).eval()
    loader = engine.make_loader(dataset, batch_size, collate, train=False)
    rows = {"target-aware": [], "own queries": []}
    seen = 0
    for images, masks, targets in loader:
        images, masks, targets = engine.to_device(images, masks, targets, device)
        enc = teacher.encode(images, masks)
        logits, boxes = kd.decode_each(teacher, enc, kd.target_queries(targets, kd.builder_t))
        gt_labels = torch.cat([t["labels"] for t in targets])                  # (N,)
        gt_boxes = cxcywh_to_xyxy(torch.cat([t["boxes"] for t in targets]))    # (N,4)
        # per image the pass holds its GT x groups, then the extra random queries: keep group 0
        keep, start = [], 0
        for t in targets:
            n_b = len(t["labels"])
            keep.append(torch.arange(start, start + n_b))
            start += n_b * cfg.groups + len(kd.extra_labels)
        keep = torch.cat(keep).to(device)
        if len(keep):
            z, b = logits[-1, keep], cxcywh_to_xyxy(boxes[-1, keep])           # (N,C), (N,4)
            iou = box_iou(b, gt_boxes).diagonal()
            conf, top = z.sigmoid().max(-1)
            rows["target-aware"] += list(zip(conf.tolist(), (top == gt_labels).tolist(),
                                             iou.tolist()))
        dec = teacher.decode(enc)
        for i, t in enumerate(targets):
            if len(t["labels"]) == 0:
                continue
            iou = box_iou(cxcywh_to_xyxy(t["boxes"]), cxcywh_to_xyxy(dec.boxes[-1, i]))  # (T,Q)
            best_iou, q = iou.max(1)
            conf, top = dec.logits[-1, i, q].sigmoid().max(-1)
            rows["own queries"] += list(zip(conf.tolist(), (top == t["labels"]).tolist(),
                                            best_iou.tolist()))
        seen += len(targets)
        if max_images is not None and seen >= max_images:
            break
    return rows


def summary(rows):
    lines = ["| teacher answer | objects | confidence w (mean) | top class = GT | IoU with GT "
             "(mean) | IoU >= 0.9 |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if not r:
            lines.append(f"| {name} | 0 | | | | |")
            continue
        w, ok, iou = zip(*r)
        lines.append(f"| {name} | {len(r)} | {statistics.fmean(w):.3f} | "
                     f"{100 * statistics.fmean(ok):.1f}% | {statistics.fmean(iou):.3f} | "
                     f"{100 * sum(x >= 0.9 for x in iou) / len(iou):.1f}% |")
    return "\n".join(lines)


def main(argv=None):
    parser = distill.build_parser(__doc__)
    clockdistill.add_args(parser)
    parser.add_argument("--max-images", type=int, default=None,
                        help="stop after this many validation images")
    args = distill.resolve(parser.parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = distill.config_from_args(clockdistill.CLoCKConfig, args)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    dataset = build_dataset("val", args)
    teacher = distill.freeze(load_detector(
        distill.ensure_teacher(args), dataset.num_classes, device,
        variant=args.teacher_variant, overrides=args.teacher_overrides,
        category_ids=dataset.label_to_category))
    torch.manual_seed(args.seed)
    rows = probe(teacher, dataset, cfg, device, max_images=args.max_images)
    print(summary(rows))
    return rows


if __name__ == "__main__":
    main()
