"""Run a trained detector of this project on your images: drawn boxes and COCO-format detections.

    python methods/predict.py --checkpoint out/checkpoint.pth --source photo.jpg --output-dir pred
    python methods/predict.py --checkpoint student.pth --source images/ --output-dir pred \\
        --score-threshold 0.5 --batch-size 8 --device cuda

Any checkpoint of this project works: a teacher or baseline from methods/baseline.py, or a
distilled student from a method script (all keep the detector under "model" and its settings
under "args"). For each image, ``OUT/<name>.png`` shows the boxes with class names and scores,
and ``OUT/detections.json`` lists every detection in the COCO results format::

    {"image_id": 0, "file_name": "photo.jpg", "category_id": 3, "bbox": [x, y, w, h], "score": 0.91}

bbox is in pixels of the original image. Images are numbered in sorted file-name order, unless
``--annotations`` gives a COCO annotation file whose images have these file names: then its image
ids are used, so the file goes straight into COCOeval (``pycocotools COCO.loadRes``).

Preprocessing is the validation transform of training (common/data.py ``make_transforms("val")``:
shorter side resized to the training's image size, longer side capped, ImageNet normalisation),
and a batch is padded and masked as in evaluation (common/data.py ``collate``). Post-processing is
the variant's own (common/criterion.py ``build_postprocess``: top-k (query, class) pairs for
focal-loss variants, the best class per query for DETR).

Class names and data-set category ids come from the checkpoint's "categories" entry (a list of
``{"id", "name"}`` in label order). A checkpoint without it uses ``--annotations`` (a COCO
annotation file of the training data) when given, else "class N" with category id N.
"""
import argparse
import colorsys
import json
import os
import sys
import warnings

import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cli  # noqa: E402
from common.checkpoint import read_checkpoint  # noqa: E402
from common.criterion import build_postprocess  # noqa: E402
from common.data import SYNTH_PRESETS, collate, make_transforms  # noqa: E402
from common.detr import CONFIGS  # noqa: E402
from common.distill import load_detector  # noqa: E402
from common.engine import main_guard  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# where training stores the class names (label order); see the module docstring
CATEGORIES_KEY = "categories"


# ------------------------------------------------------------------------------------------
# The checkpoint: model, preprocessing, class names
# ------------------------------------------------------------------------------------------

def checkpoint_info(path):
    """Read a checkpoint of this project -> (ckpt dict, args dict, num_classes). The number of
    classes is read off the class head (softmax variants have one extra no-object row)."""
    ckpt = read_checkpoint(path)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    if not (isinstance(ckpt, dict) and "model" in ckpt and isinstance(args, dict)
            and "variant" in args):
        raise ValueError(f"{path} is not a checkpoint of this project's training scripts (it "
                         f"needs 'model' and 'args' with the variant); official checkpoints are "
                         f"for --teacher of the method scripts")
    head = ckpt["model"].get("class_embed.0.weight")
    if head is None:
        raise ValueError(f"{path}: the model has no class head 'class_embed.0.weight'")
    overrides = args.get("model_overrides") or {}
    class_loss = overrides.get("class_loss", CONFIGS[args["variant"]]().class_loss)
    num_classes = head.shape[0] - (1 if class_loss == "softmax" else 0)
    return ckpt, args, num_classes


def val_transform(args):
    """The validation transform the checkpoint's training evaluated with (common/data.py)."""
    size = args.get("image_size")
    if not size:
        size = SYNTH_PRESETS[args.get("synth", "easy")].image_size \
            if args.get("data", "synthetic") == "synthetic" else 800
    return make_transforms("val", size, args.get("max_size"))


def categories_from_annotations(path):
    """(categories in label order [{"id", "name"}], {file name: image id}) of a COCO annotation
    file; labels are the categories in sorted id order, as in training (common/data.py)."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise ValueError(f"--annotations {path}: not a COCO annotation file (no 'categories' list)")
    cats = sorted(({"id": int(c["id"]), "name": str(c.get("name", c["id"]))}
                   for c in data["categories"]), key=lambda c: c["id"])
    ids = {os.path.basename(im["file_name"]): int(im["id"]) for im in data.get("images", [])
           if "file_name" in im and "id" in im}
    return cats, ids


def resolve_categories(ckpt, num_classes, annotations=None):
    """Label -> {"id", "name"}: the checkpoint's entry, else ``annotations``, else "class N"."""
    cats = ckpt.get(CATEGORIES_KEY)
    source = "the checkpoint"
    if cats is None and annotations is not None:
        cats, source = categories_from_annotations(annotations)[0], f"--annotations {annotations}"
    if cats is None:
        warnings.warn("the checkpoint records no class names and no --annotations file was "
                      "given: classes are called 'class N' with category id N", stacklevel=2)
        return [{"id": i, "name": f"class {i}"} for i in range(num_classes)]
    cats = [{"id": int(c["id"]), "name": str(c["name"])} for c in cats]
    if len(cats) != num_classes:
        raise ValueError(f"{source} names {len(cats)} categories but the model has "
                         f"{num_classes} classes")
    return cats


def load_for_inference(path, device="cpu", annotations=None):
    """-> (model in eval mode on ``device``, its settings dict, num_classes, categories)."""
    ckpt, args, num_classes = checkpoint_info(path)
    model = load_detector(path, num_classes, device).eval()
    return model, args, num_classes, resolve_categories(ckpt, num_classes, annotations)


# ------------------------------------------------------------------------------------------
# Images in, detections out
# ------------------------------------------------------------------------------------------

def list_images(source):
    """A file, or the image files of a folder (not recursive), in sorted order."""
    if os.path.isfile(source):
        return [source]
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--source {source}: no such file or folder")
    files = sorted(os.path.join(source, n) for n in os.listdir(source)
                   if n.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"--source {source}: the folder holds no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_image(path):
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: cannot read the image ({e})") from e


@torch.no_grad()
def detect(model, postprocess, transform, pil_images, device):
    """A batch of PIL images -> PostProcess results (scores, labels, absolute xyxy boxes in the
    original images' pixels), preprocessed and padded exactly as in evaluation."""
    batch = [(transform(im), {}) for im in pil_images]
    images, masks, _ = collate(batch)  # (B,3,H,W) padded, (B,H,W) True on padding
    orig_sizes = torch.tensor([[im.height, im.width] for im in pil_images], dtype=torch.int64)
    outputs = model(images.to(device), masks.to(device))
    return [{k: v.cpu() for k, v in r.items()}
            for r in postprocess(outputs, orig_sizes.to(device))]


def to_coco(image_id, file_name, result, categories, score_threshold):
    """One image's result -> COCO result dicts (bbox xywh in pixels), scores >= threshold."""
    keep = result["scores"] >= score_threshold
    boxes, scores, labels = result["boxes"][keep], result["scores"][keep], result["labels"][keep]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).double()
    return [{"image_id": image_id, "file_name": file_name,
             "category_id": categories[lb]["id"], "bbox": b,
             "score": s}
            for lb, b, s in zip(labels.tolist(), xywh.tolist(), scores.double().tolist())]


def _colour(label):
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(255 * r), int(255 * g), int(255 * b)


def draw(image, detections, label_of):
    """A copy of ``image`` with each detection's box and "name score" label drawn on it."""
    out = image.copy()
    pen = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    width = max(1, round(max(image.size) / 300))
    for d in sorted(detections, key=lambda d: d["score"]):  # best on top
        x, y, w, h = d["bbox"]
        colour = _colour(label_of[d["category_id"]])
        pen.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        text = f"{d['name']} {d['score']:.2f}"
        left, top, right, bottom = pen.textbbox((x, y), text, font=font)
        top_y = y - (bottom - top) - 2 if y - (bottom - top) - 2 >= 0 else y
        pen.rectangle([x, top_y, x + (right - left) + 4, top_y + (bottom - top) + 2], fill=colour)
        pen.text((x + 2, top_y), text, fill=(0, 0, 0), font=font)
    return out


def predict(checkpoint, source, output_dir, *, score_threshold=0.3, device="cpu", batch_size=1,
            annotations=None, draw_images=True):
    """Detections of every image of ``source``; writes OUT/detections.json and OUT/<name>.png.
    Returns the list of COCO result dicts."""
    if not 0.0 <= score_threshold <= 1.0:
        raise ValueError(f"--score-threshold must lie in [0, 1], got {score_threshold}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    files = list_images(source)
    device = torch.device(device)
    model, args, _, categories = load_for_inference(checkpoint, device, annotations)
    image_ids = categories_from_annotations(annotations)[1] if annotations else {}
    postprocess = build_postprocess(model.cfg)
    transform = val_transform(args)
    names = {c["id"]: c["name"] for c in categories}
    label_of = {c["id"]: i for i, c in enumerate(categories)}
    os.makedirs(output_dir, exist_ok=True)
    detections = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        images = [read_image(f) for f in chunk]
        for k, (path, image, result) in enumerate(zip(chunk, images, detect(
                model, postprocess, transform, images, device))):
            name = os.path.basename(path)
            dets = to_coco(image_ids.get(name, start + k), name, result, categories,
                           score_threshold)
            detections.extend(dets)
            if draw_images:
                shown = [{**d, "name": names[d["category_id"]]} for d in dets]
                draw(image, shown, label_of).save(
                    os.path.join(output_dir, os.path.splitext(name)[0] + ".png"))
    with open(os.path.join(output_dir, "detections.json"), "w") as f:
        json.dump(detections, f)
    return detections


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=cli.epilog_from(__doc__),
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth of this project")
    parser.add_argument("--source", required=True, help="an image file or a folder of images")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True,
                        help="PNGs with drawn boxes and detections.json go here")
    parser.add_argument("--score-threshold", dest="score_threshold", type=float, default=0.3,
                        help="keep detections with at least this score (drawn and in the JSON; "
                             "0 keeps all, as COCO evaluation wants)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=1,
                        help="images per forward pass (padded and masked as in evaluation)")
    parser.add_argument("--annotations", default=None,
                        help="a COCO annotation file: class names for a checkpoint that does "
                             "not record them, and image ids by file name")
    parser.add_argument("--no-draw", dest="draw", action="store_false",
                        help="write detections.json only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dets = predict(args.checkpoint, args.source, args.output_dir,
                   score_threshold=args.score_threshold, device=args.device,
                   batch_size=args.batch_size, annotations=args.annotations,
                   draw_images=args.draw)
    print(f"{len(dets)} detections written to {os.path.join(args.output_dir, 'detections.json')}")
    return dets


if __name__ == "__main__":
    main_guard(main)
