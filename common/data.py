"""Data: COCO-format detection sets, DETR-style transforms, batching, and the embedded synthetic set.

Two sources, one loader:

    --data coco --coco-path DIR   any COCO-format folder: annotations/instances_{train,val}2017.json,
                                  train2017/, val2017/ (or annotation file and image folder given
                                  one by one with --train-ann/--train-images/--val-ann/--val-images)
    --data synthetic (default)    the embedded set: procedurally drawn glyphs on real photos and
                                  textures, generated once into a cache folder in the same COCO
                                  layout, so the same loader and the same COCOeval serve both

A sample is ``(image, target)``: ``image`` float32 (3, H, W) ImageNet-normalised, ``target`` a dict
    "boxes"      (T, 4) float32, normalised cxcywh relative to the (unpadded) transformed image
    "labels"     (T,) int64, contiguous labels in [0, num_classes)
    "image_id"   int, the COCO image id
    "orig_size"  int64 (2,) = (h, w) of the image on disk
    "size"       int64 (2,) = (h, w) after the transforms
and ``collate`` pads a list of samples into ``(images (B,3,H,W), masks (B,H,W) True on padding,
targets)``.

Category ids are arbitrary integers in COCO files (COCO itself uses 80 ids in 1..90). Models see
contiguous labels: ``label = category_to_label[category_id]`` in sorted id order, and
``label_to_category[label]`` maps back for evaluation (and gives the slot of an official
91-slot COCO checkpoint's classifier).

Follows the DETR reference (Carion et al. 2020, github.com/facebookresearch/detr, datasets/coco.py
and datasets/transforms.py) for what is kept in a training target and for the augmentation; the box
bookkeeping is done by torchvision.transforms.v2 on tv_tensors.BoundingBoxes.
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, asdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pycocotools.coco import COCO
from torchvision import tv_tensors

from common.distributed import barrier, is_main_process

__all__ = ["CocoDetection", "load_coco_annotations", "check_images", "ImageDecodeError",
           "make_transforms", "RandomSizeCrop", "collate",
           "build_dataset", "add_data_args", "SynthPreset", "SYNTH_PRESETS", "SYNTH_VERSION",
           "generate_synthetic", "ensure_synthetic", "verify_synthetic", "synthetic_image", "default_cache_dir"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ==========================================================================================
# COCO-format annotations: load, validate, repair
# ==========================================================================================

class ImageDecodeError(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


def image_check_cache_path(img_folder, cache_dir=None) -> Path:
    """The cache of ``check_images`` for one image folder (keyed on its real path)."""
    key = hashlib.sha256(os.path.realpath(img_folder).encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / "image-checks" / f"{key}.json"


def _image_header(path):
    """(width, height) from the image's header (PIL's lazy open: no pixel is decoded)."""
    with Image.open(path) as pil:
        return pil.size


def check_images(img_folder, file_names, ann_file=None, cache_dir=None, workers=None) -> dict:
    """Check that every listed image exists and has a readable header; returns
    ``{file_name: (width, height)}`` as the files say.

    Cheap enough for COCO's 118k images: each file is ``stat``-ed and, unless the cache holds it
    with the same size and modification time, opened lazily by PIL (format and size from the
    header, no decoding), in a thread pool. Results are cached in a small JSON file per image
    folder under the data cache (``image_check_cache_path``). A missing file is a
    FileNotFoundError, an unreadable header an ImageDecodeError, both naming the files. A file
    whose header is fine but whose data is damaged (a truncated JPEG) is found only when it is
    decoded: ``CocoDetection`` then raises an ImageDecodeError naming it.
    """
    img_folder = Path(img_folder)
    where = f" (listed in {ann_file})" if ann_file else ""
    cache_path = image_check_cache_path(img_folder, cache_dir)
    try:
        with open(cache_path) as f:
            cached = json.load(f).get("files", {})
    except (OSError, ValueError, AttributeError):
        cached = {}

    def stat(name):
        try:
            st = os.stat(img_folder / name)
            return name, [st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            return name, None

    def header(name):
        try:
            return name, list(_image_header(img_folder / name)), None
        except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, ...
            return name, None, f"{type(e).__name__}: {e}"

    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        stats = dict(pool.map(stat, file_names))
        missing = [n for n, st in stats.items() if st is None]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image file(s){where} not found, first: "
                                    + ", ".join(str(img_folder / n) for n in missing[:3]))
        todo = [n for n, st in stats.items()
                if not (isinstance(cached.get(n), list) and cached[n][:2] == st)]
        fresh = list(pool.map(header, todo))
    bad = [(n, why) for n, _, why in fresh if why]
    if bad:
        raise ImageDecodeError(f"{len(bad)} image file(s){where} cannot be read as images, "
                               f"first: " + "; ".join(f"{img_folder / n} ({why})"
                                                      for n, why in bad[:3]))
    redo = set(todo)
    files = {n: cached[n] for n in file_names if n not in redo}
    files.update({n: stats[n] + size for n, size, _ in fresh})
    if fresh:  # write the cache atomically; a read-only cache only costs the next run time
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(f".{cache_path.name}.tmp-{os.getpid()}")
            with open(tmp, "w") as f:
                json.dump({"folder": os.path.realpath(img_folder),
                           "files": {**cached, **files}}, f)
            os.replace(tmp, cache_path)
        except OSError:
            pass
    return {n: (v[2], v[3]) for n, v in files.items()}


def load_coco_annotations(ann_file, img_folder=None, cache_dir=None) -> COCO:
    """Read a COCO-format json into a pycocotools ``COCO`` index, checked and repaired.

    Errors name the file: a missing file, invalid json, missing top-level lists, annotations that
    point to unknown images or categories, boxes that are not 4 finite numbers, duplicate ids.
    Repairs (the usual pycocotools pitfalls): missing ``info``/``licenses`` (pycocotools 2.0.9-10
    ``loadRes`` needs ``info``), missing ``iscrowd`` (0), ``area`` (box area) and annotation ``id``,
    missing category ``name``. With ``img_folder`` every image file is checked (``check_images``:
    existence and header, cached in ``cache_dir``) and the image sizes the files give are the
    ones used: a missing ``width``/``height`` is filled in, one that differs from the file is
    replaced, with one warning (boxes are clipped to the real image, as in training). Degenerate
    boxes (zero or negative width or height once clipped to the image) are dropped with one
    warning, so training and evaluation see the same set.
    """
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with open(ann_file, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"COCO annotation file {ann_file} is not valid json: {e}") from None

    def bad(msg):
        return ValueError(f"COCO annotation file {ann_file}: {msg}")

    if not isinstance(data, dict):
        raise bad(f"expected a json object at the top level, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise bad(f"missing the '{key}' list" if key not in data else f"'{key}' is not a list")
    data.setdefault("info", {})
    data.setdefault("licenses", [])

    categories = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise bad(f"category #{i} has no integer 'id': {c!r}")
        if c["id"] in categories:
            raise bad(f"duplicate category id {c['id']}")
        c.setdefault("name", str(c["id"]))
        categories[c["id"]] = c
    if not categories:
        raise bad("the 'categories' list is empty")

    images = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or "file_name" not in im:
            raise bad(f"image #{i} needs an integer 'id' and a 'file_name': {im!r}")
        if im["id"] in images:
            raise bad(f"duplicate image id {im['id']}")
        images[im["id"]] = im
    if img_folder is not None:
        sizes = check_images(img_folder, sorted({im["file_name"] for im in images.values()}),
                             ann_file, cache_dir)
        wrong = []
        for im in images.values():
            w, h = sizes[im["file_name"]]
            if "width" in im and "height" in im and (im["width"], im["height"]) != (w, h):
                wrong.append(f"{im['file_name']}: {im['width']}x{im['height']} in the file list, "
                             f"{w}x{h} on disk")
            im["width"], im["height"] = w, h
        if wrong:
            warnings.warn(f"{ann_file}: {len(wrong)} image(s) have another size on disk than "
                          f"the annotation file says; the sizes on disk are used (check that the "
                          f"boxes were drawn on these images), first: {'; '.join(wrong[:3])}",
                          stacklevel=2)

    kept, dropped, ann_ids = [], 0, set()
    for i, a in enumerate(data["annotations"]):
        where = f"annotation #{i}" + (f" (id {a['id']})" if isinstance(a, dict) and "id" in a else "")
        if not isinstance(a, dict):
            raise bad(f"{where} is not an object")
        if a.get("image_id") not in images:
            raise bad(f"{where} refers to unknown image_id {a.get('image_id')!r}")
        if a.get("category_id") not in categories:
            raise bad(f"{where} refers to unknown category_id {a.get('category_id')!r}")
        box = a.get("bbox")
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            raise bad(f"{where} needs 'bbox' = [x, y, w, h] of 4 finite numbers, got {box!r}")
        if "id" in a:
            if a["id"] in ann_ids:
                raise bad(f"duplicate annotation id {a['id']}")
            ann_ids.add(a["id"])
        # degenerate once clipped to the image (where the image size is known)
        x0, y0, w, h = (float(v) for v in box)
        im = images[a["image_id"]]
        x1, y1 = x0 + w, y0 + h
        if "width" in im and "height" in im:
            x0, y0 = max(x0, 0.0), max(y0, 0.0)
            x1, y1 = min(x1, float(im["width"])), min(y1, float(im["height"]))
        if x1 <= x0 or y1 <= y0:
            dropped += 1
            continue
        a.setdefault("iscrowd", 0)
        a.setdefault("area", float(w * h))
        kept.append(a)
    next_id = max(ann_ids, default=0) + 1
    for a in kept:  # pycocotools indexes annotations by id
        if "id" not in a:
            a["id"], next_id = next_id, next_id + 1
    data["annotations"] = kept
    if dropped:
        warnings.warn(f"{ann_file}: dropped {dropped} degenerate box(es) (zero or negative width or "
                      f"height inside the image)", stacklevel=2)

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection set: ``dataset[i] -> (image, target)`` in the format of the module doc.

    Crowd boxes (``iscrowd=1``) are left out of training targets, as in DETR; they stay in
    ``self.coco`` where COCOeval treats them as regions to ignore. Images without boxes are kept
    (their target has zero boxes). Every listed image file is checked to exist at construction.
    """

    def __init__(self, img_folder, ann_file, transforms=None, cache_dir=None):
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {self.ann_file}")
        if not self.img_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.img_folder}")
        # every image file checked (existence, header, size), see check_images
        self.coco = load_coco_annotations(self.ann_file, self.img_folder, cache_dir)
        self.ids = sorted(self.coco.imgs)

        # contiguous labels <-> category ids, in sorted id order
        self.label_to_category = sorted(self.coco.cats)           # label -> category id
        self.category_to_label = {c: i for i, c in enumerate(self.label_to_category)}
        self.num_classes = len(self.label_to_category)
        self.class_names = [self.coco.cats[c]["name"] for c in self.label_to_category]
        self.transforms = transforms if transforms is not None else T.Compose(
            [T.ToImage(), T.ToDtype(torch.float32, scale=True)])

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        path = self.img_folder / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as pil:
                image = pil.convert("RGB")
        except FileNotFoundError:
            raise ImageDecodeError(f"image file not found: {path} (listed in {self.ann_file}); "
                                   f"it was there when the run started") from None
        except (OSError, SyntaxError, ValueError) as e:  # truncated or damaged data
            raise ImageDecodeError(f"cannot decode image file {path} (listed in {self.ann_file}): "
                                   f"{e}; replace the file or remove it from the annotation "
                                   f"file, then --resume") from None
        w, h = image.size

        # COCO boxes are absolute [x, y, w, h]; to xyxy, clipped to the image; crowd and empty out
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        labels = torch.tensor([self.category_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {"boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(h, w)),
                  "labels": labels[keep]}

        image, target = self.transforms(image, target)
        image = image.as_subclass(torch.Tensor).contiguous()  # PIL -> tensor gives an HWC-strided view
        if image.dtype != torch.float32 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"transforms must end with a float32 (3, H, W) image, got "
                             f"{tuple(image.shape)} {image.dtype}")
        th, tw = image.shape[-2:]
        boxes = TF.convert_bounding_box_format(target["boxes"], new_format="CXCYWH").as_subclass(torch.Tensor)
        boxes = boxes / torch.tensor([tw, th, tw, th], dtype=torch.float32)  # (T, 4) normalised cxcywh
        return image, {"boxes": boxes.float().contiguous(), "labels": target["labels"].to(torch.int64),
                       "image_id": int(image_id), "orig_size": torch.tensor([h, w], dtype=torch.int64),
                       "size": torch.tensor([th, tw], dtype=torch.int64)}


# ==========================================================================================
# Transforms (DETR's, on torchvision.transforms.v2)
# ==========================================================================================

class RandomSizeCrop(T.Transform):
    """DETR's RandomSizeCrop: crop a random (h, w) region, each side uniform in [min_size, max_size]
    (capped at the image's side), at a uniform random position. Boxes are cut by torchvision."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size, self.max_size = int(min_size), int(max_size)

    def make_params(self, flat_inputs):
        height, width = T.query_size(flat_inputs)
        w = int(torch.randint(min(self.min_size, width), min(width, self.max_size) + 1, ()))
        h = int(torch.randint(min(self.min_size, height), min(height, self.max_size) + 1, ()))
        top = int(torch.randint(0, height - h + 1, ()))
        left = int(torch.randint(0, width - w + 1, ()))
        return dict(top=top, left=left, height=h, width=w)

    def transform(self, inpt, params):
        return self._call_kernel(TF.crop, inpt, **params)


def make_transforms(image_set: str, size: int = 800, max_size: int = None, augment: bool = True,
                    hflip: bool = True):
    """DETR's transforms, scaled to a validation size ``size`` (DETR: 800, max 1333).

    train: horizontal flip, then with probability 1/2 either
             resize the shorter side to one of 11 scales in [0.6, 1.0] * size (longer side <= max_size)
           or resize the shorter side to one of (0.5, 0.625, 0.75) * size, crop a random region with
             sides in [0.48, 0.75] * size (DETR's RandomSizeCrop(384, 600)), then the multi-scale resize;
           boxes falling out of the crop are removed with their labels.
    val:   resize the shorter side to ``size`` (longer side <= max_size).
    Both end with ImageNet normalisation. ``size=800`` reproduces DETR's COCO settings exactly.
    ``hflip=False`` leaves out the flip (the embedded set: its glyphs are chiral, a mirrored "2"
    is no digit).
    """
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    max_size = int(max_size) if max_size is not None else int(round(size * 1333 / 800))
    if max_size < size:
        raise ValueError(f"max_size ({max_size}) must be >= size ({size})")
    finish = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if image_set == "val" or not augment:
        return T.Compose([T.Resize(size, max_size=max_size)] + finish)

    scales = sorted({int(round(s)) for s in np.linspace(0.6 * size, size, 11)})  # DETR: 480, 512, ..., 800
    crop_resize = [int(round(f * size)) for f in (0.5, 0.625, 0.75)]              # DETR: 400, 500, 600
    crop_lo, crop_hi = int(round(0.48 * size)), int(round(0.75 * size))           # DETR: 384, 600
    return T.Compose([
        T.RandomHorizontalFlip(p=0.5 if hflip else 0.0),
        T.RandomChoice([
            T.RandomShortestSize(scales, max_size=max_size),
            T.Compose([T.RandomShortestSize(crop_resize),
                       RandomSizeCrop(crop_lo, crop_hi),
                       T.RandomShortestSize(scales, max_size=max_size)]),
        ]),
        T.ClampBoundingBoxes(),
        T.SanitizeBoundingBoxes(min_size=1.0),  # drop boxes the crop cut to (near) nothing, with their labels
    ] + finish)


def collate(batch):
    """Pad a list of ``(image (3,h,w), target)`` into ``(images, masks, targets)``.

    images: float32 (B, 3, H, W), contiguous NCHW, zero padding on the right and bottom to the
            batch's largest H and W (never a channels-last view: on this torch the CPU backward
            of a 1x1 stride-2 conv on one crashes, see specs/data-and-users.md A.4)
    masks:  bool (B, H, W), True on padding
    targets: the list of B target dicts, unchanged
    """
    if len(batch) == 0:
        raise ValueError("collate: the batch is empty")
    images, targets = zip(*batch)
    for i, im in enumerate(images):
        if not torch.is_tensor(im) or im.ndim != 3 or im.shape[0] != 3:
            raise ValueError(f"collate: image {i} must be a (3, H, W) tensor, got "
                             f"{tuple(im.shape) if torch.is_tensor(im) else type(im).__name__}")
    H = max(im.shape[1] for im in images)
    W = max(im.shape[2] for im in images)
    out = images[0].new_zeros((len(images), 3, H, W))        # (B, 3, H, W), contiguous
    masks = torch.ones((len(images), H, W), dtype=torch.bool)
    for i, im in enumerate(images):
        out[i, :, :im.shape[1], :im.shape[2]].copy_(im)
        masks[i, :im.shape[1], :im.shape[2]] = False
    return out, masks, list(targets)


# ==========================================================================================
# The embedded synthetic data set
# ==========================================================================================
#
# Each image: a crop of a real photo or texture (scikit-image's bundled CC0 / public-domain data)
# with colour, contrast and illumination jitter; objects are glyphs (digits, and in the hard preset
# letters picked to be confusable with digits: B~8, S~5, Z~2, G~6) from Pillow's built-in font with
# random stroke width, rotation, shear and aspect, filled with a solid colour or a real texture, so
# colour and texture say nothing about the class; pasted in sequence so later ones occlude earlier
# ones; unlabeled distractors (polygons, strokes, glyphs of other letters) add clutter. A box is
# the tight box of an object's *visible* pixels; objects less than 40 % visible are left
# unannotated, like the faint and hidden objects of a real set. Every image has its own random
# generator seeded by (seed, split, index), so image i does not depend on the set size.

SYNTH_VERSION = 1
DIGITS = tuple("0123456789")
LETTERS = tuple("ABEGKMRSXZ")      # look-alikes: B~8, S~5, Z~2, G~6, E~3, A~4 and, among letters, K~X~R, M~A
OTHER_GLYPHS = "CFHJLNPTUVWY"      # never a class: glyph-like distractors
# scikit-image pictures whose docstrings state CC0, public domain or no known copyright restrictions
# ("text" and "coins" also bring real small glyphs and round objects: hard negatives)
BACKGROUNDS = ("brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket", "hubble_deep_field",
               "text", "retina", "cell", "coins", "camera")
TEXTURES = ("brick", "grass", "gravel", "coffee", "hubble_deep_field", "retina", "coins")
_SPLIT_ID = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SynthPreset:
    classes: tuple          # class names (single characters), category ids 1..K in this order
    mean_objects: float     # objects per image = 1 + Poisson(mean_objects), at most max_objects
    max_objects: int
    min_side: int           # longer side of an object, log-uniform in [min_side, max_side] pixels
    max_side: int
    max_distractors: int    # 0..max_distractors unlabeled distractors per image
    distractor_glyphs: bool  # whether distractors include glyphs of non-class letters
    image_size: int = 128


SYNTH_PRESETS = {
    # 10 digit classes, 1-4 objects, light clutter
    "easy": SynthPreset(DIGITS, 1.0, 4, 16, 58, 1, False),
    # 10 digit classes, 1-6 objects, smaller objects, polygon and glyph distractors
    "medium": SynthPreset(DIGITS, 1.5, 6, 12, 58, 2, True),
    # 20 classes (digits + look-alike letters), 1-8 objects, down to 10 px, more clutter
    "hard": SynthPreset(DIGITS + LETTERS, 2.5, 8, 10, 58, 3, True),
}


def _require_skimage():
    try:
        import skimage.data  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the embedded synthetic data set draws on the photos and textures bundled with scikit-image: "
            "install it with 'pip install scikit-image' (see requirements.txt), or use --data coco "
            f"--coco-path DIR ({e})") from None
    return skimage.data


@lru_cache(maxsize=None)
def _source_image(name: str) -> np.ndarray:
    """A bundled scikit-image picture as uint8 (H, W, 3); grey ones are replicated to 3 channels."""
    data = _require_skimage()
    im = np.asarray(getattr(data, name)())
    if im.ndim == 2:
        im = np.repeat(im[:, :, None], 3, axis=2)
    return np.ascontiguousarray(im[:, :, :3]).astype(np.uint8)


@lru_cache(maxsize=None)
def _font(px: int):
    font = ImageFont.load_default(size=px)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise RuntimeError("the synthetic data set needs Pillow >= 10.1 built with FreeType "
                           "(ImageFont.load_default(size=...) returned a bitmap font)")
    return font


def _luma(rgb):
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _background(rng, S):
    """(S, S, 3) float32: a random crop of a real picture, flipped, rotated, recoloured and unevenly lit."""
    src = _source_image(BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    H, W = src.shape[:2]
    c = int(rng.integers(48, min(H, W) + 1))                     # crop side, 48 px .. the whole source
    y, x = int(rng.integers(0, H - c + 1)), int(rng.integers(0, W - c + 1))
    crop = Image.fromarray(src[y:y + c, x:x + c]).resize((S, S), Image.BILINEAR)
    bg = np.rot90(np.asarray(crop, dtype=np.float32), k=int(rng.integers(4)))
    if rng.random() < 0.5:
        bg = bg[:, ::-1]
    if np.array_equal(bg[..., 0], bg[..., 1]):                   # grey source: tint it
        bg = bg * rng.uniform(0.55, 1.0, size=3).astype(np.float32)
    else:                                                        # colour source: permute channels
        bg = bg[..., rng.permutation(3)]
    contrast, brightness = rng.uniform(0.6, 1.3), rng.uniform(-40, 40)
    bg = (bg - 128.0) * np.float32(contrast) + np.float32(128.0 + brightness)
    # smooth illumination field: a 4x4 grid of gains in [0.7, 1.3], bicubic-upsampled
    gain = Image.fromarray(rng.uniform(0.7, 1.3, size=(4, 4)).astype(np.float32)).resize((S, S), Image.BICUBIC)
    bg = bg * np.asarray(gain, dtype=np.float32)[:, :, None]
    return np.ascontiguousarray(np.clip(bg, 0, 255), dtype=np.float32)


def _glyph_alpha(char, side, rng):
    """(h, w) float32 alpha in [0, 1]: ``char`` in Pillow's built-in font, random stroke width,
    rotation (+-20 deg), shear and aspect, scaled so its longer side is ``side`` pixels."""
    canvas = Image.new("L", (192, 192), 0)
    ImageDraw.Draw(canvas).text((96, 96), char, font=_font(96), fill=255, anchor="mm",
                                stroke_width=int(rng.integers(0, 5)), stroke_fill=255)
    theta = math.radians(rng.uniform(-20, 20))
    shear, aspect = rng.uniform(-0.25, 0.25), rng.uniform(0.85, 1.15)
    # forward map A = rotation @ shear @ diag(aspect, 1) about the centre; PIL wants output -> input
    A = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]]) \
        @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag([aspect, 1.0])
    a, b, d, e = np.linalg.inv(A).ravel()
    coeffs = (a, b, 96 - 96 * (a + b), d, e, 96 - 96 * (d + e))
    canvas = canvas.transform((192, 192), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    canvas = canvas.crop(canvas.getbbox())
    s = side / max(canvas.size)
    canvas = canvas.resize((max(1, round(canvas.width * s)), max(1, round(canvas.height * s))), Image.BILINEAR)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _distractor_alpha(rng, preset):
    """An unlabeled clutter shape: a random polygon, a few thick strokes, or a non-class glyph."""
    side = int(round(math.exp(rng.uniform(math.log(10), math.log(50)))))
    kind = int(rng.integers(3 if preset.distractor_glyphs else 2))
    if kind == 2:
        return _glyph_alpha(OTHER_GLYPHS[rng.integers(len(OTHER_GLYPHS))], side, rng)
    big = 4 * side                                               # drawn 4x larger, then downsampled
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == 0:                                                # polygon with 3-7 vertices
        n = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * math.pi, size=n))
        radii = rng.uniform(0.3, 0.5, size=n) * big
        draw.polygon([(big / 2 + r * math.cos(t), big / 2 + r * math.sin(t)) for t, r in zip(angles, radii)],
                     fill=255)
    else:                                                        # 1-3 thick strokes
        for _ in range(int(rng.integers(1, 4))):
            p = rng.uniform(0.05, 0.95, size=4) * big
            draw.line([(p[0], p[1]), (p[2], p[3])], fill=255, width=int(rng.integers(big // 16, big // 6 + 1)))
    if canvas.getbbox() is None:
        canvas.putpixel((big // 2, big // 2), 255)
    canvas = canvas.crop(canvas.getbbox())
    canvas = canvas.resize((max(1, canvas.width // 4), max(1, canvas.height // 4)), Image.BILINEAR)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _fill(rng, h, w, bg_luma):
    """(h, w, 3) float32 fill, a solid colour or a real texture crop, kept >= 50 grey levels from
    the background's mean luma under the object (so it is visible, whatever its colour)."""
    if rng.random() < 0.5:
        fill = np.broadcast_to(rng.uniform(0, 255, size=3).astype(np.float32), (h, w, 3)).copy()
    else:
        src = _source_image(TEXTURES[rng.integers(len(TEXTURES))])
        y, x = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
        fill = src[y:y + h, x:x + w].astype(np.float32)[..., rng.permutation(3)]
    diff = float(_luma(fill).mean()) - bg_luma
    if abs(diff) < 50:
        up_ok, down_ok = bg_luma + 50 <= 255, bg_luma - 50 >= 0
        target = bg_luma + 50 if (diff >= 0 and up_ok) or not down_ok else bg_luma - 50
        fill = np.clip(fill + np.float32(target - (bg_luma + diff)), 0, 255)
    return fill


def _paste(canvas, ids, layer_id, alpha, fill, x, y, shadow):
    """Alpha-composite ``fill`` at (x, y), clipped to the canvas; mark ``ids`` where alpha > 0.5."""
    S = canvas.shape[0]
    h, w = alpha.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, S), min(y + h, S)
    if x1 <= x0 or y1 <= y0:
        return
    a = alpha[y0 - y:y1 - y, x0 - x:x1 - x, None]
    if shadow:                                                   # soft dark copy, offset by 2 px
        sh = np.zeros((S, S), np.uint8)
        sx0, sy0, sx1, sy1 = min(x0 + 2, S), min(y0 + 2, S), min(x1 + 2, S), min(y1 + 2, S)
        sh[sy0:sy1, sx0:sx1] = np.rint(a[:sy1 - sy0, :sx1 - sx0, 0] * 255)
        sh = np.asarray(Image.fromarray(sh).filter(ImageFilter.GaussianBlur(1.5)), dtype=np.float32) / 255
        canvas *= (1.0 - 0.5 * sh)[:, :, None]
    region = canvas[y0:y1, x0:x1]
    region[:] = region * (1.0 - a) + fill[y0 - y:y1 - y, x0 - x:x1 - x] * a
    ids[y0:y1, x0:x1][a[:, :, 0] > 0.5] = layer_id


def synthetic_image(preset: SynthPreset, seed: int, split: str, index: int):
    """Draw image ``index`` of ``split``: ``(uint8 (S, S, 3), [(label, [x, y, w, h]), ...])``.

    Deterministic in (preset, seed, split, index) alone (its own numpy Generator), so any image can
    be regenerated without the others.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_ID[split], index])))
    S = preset.image_size
    canvas = _background(rng, S)
    ids = np.full((S, S), -1, dtype=np.int32)                    # which layer owns each pixel

    n_obj = min(1 + int(rng.poisson(preset.mean_objects)), preset.max_objects)
    n_dis = int(rng.integers(0, preset.max_distractors + 1))
    kinds = rng.permutation(np.array([1] * n_obj + [0] * n_dis))  # 1 object, 0 distractor; paste order
    objects = []                                                   # (layer id, label, pixels in full)
    for layer, is_obj in enumerate(kinds):
        if is_obj:
            label = int(rng.integers(len(preset.classes)))
            side = math.exp(rng.uniform(math.log(preset.min_side), math.log(preset.max_side)))
            alpha = _glyph_alpha(preset.classes[label], max(4, int(round(side))), rng)
        else:
            alpha = _distractor_alpha(rng, preset)
        h, w = alpha.shape
        # at most a quarter of the shape may fall outside the image
        x = int(rng.integers(-(w // 4), S - w + w // 4 + 1))
        y = int(rng.integers(-(h // 4), S - h + h // 4 + 1))
        under = canvas[max(y, 0):max(y, 0) + h, max(x, 0):max(x, 0) + w]
        fill = _fill(rng, h, w, float(_luma(under).mean()))
        _paste(canvas, ids, layer, alpha, fill, x, y, shadow=rng.random() < 0.3)
        if is_obj:
            objects.append((layer, label, int((alpha > 0.5).sum())))

    annotations = []
    for layer, label, full in objects:
        ys, xs = np.nonzero(ids == layer)
        if len(xs) == 0 or len(xs) < 0.4 * full:                 # mostly hidden: unannotated clutter
            continue
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        if max(x1 - x0, y1 - y0) < 6:
            continue
        annotations.append((label, [x0, y0, x1 - x0, y1 - y0]))

    pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    if rng.random() < 0.3:                                       # slight defocus
        pixels = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.6)))
    noise = rng.normal(0.0, 4.0, size=pixels.shape).astype(np.float32)  # sensor noise, sigma 4
    pixels = np.clip(np.rint(pixels.astype(np.float32) + noise), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels), annotations


def _image_digest(hasher, pixels, annotations):
    hasher.update(pixels.tobytes())
    hasher.update(json.dumps(annotations, separators=(",", ":")).encode())


def _library_versions():
    skimage = sys.modules.get("skimage")
    return {"numpy": np.__version__, "Pillow": PIL.__version__,
            "scikit-image": getattr(skimage, "__version__", None)}


def _draw_and_save(job):
    preset, seed, split, index, path = job
    pixels, anns = synthetic_image(preset, seed, split, index)
    Image.fromarray(pixels).save(path, compress_level=1)  # lossless, so verify_synthetic can re-hash
    return pixels, anns


@contextlib.contextmanager
def _pool(workers):
    if workers <= 1:
        yield _SerialPool()
    else:
        with ProcessPoolExecutor(workers) as pool:
            yield pool


class _SerialPool:
    @staticmethod
    def map(fn, jobs, chunksize=1):
        return map(fn, jobs)


def generate_synthetic(root, preset="easy", seed=0, num_train=2000, num_val=500, workers=None):
    """Write the synthetic set to ``root`` in the COCO layout (annotations/, train2017/, val2017/).

    The json's ``info`` records the generator version, preset, seed and a content hash (16 hex of
    the sha256 over every image's pixels and annotations, in order), which ``verify_synthetic``
    checks. ``workers`` processes draw the images (default: up to 2); the result does not depend on
    it. Returns ``root``.
    """
    workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    preset_name, preset = _resolve_preset(preset)
    for name in BACKGROUNDS:  # load the pictures once, before worker processes fork
        _source_image(name)
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        folder = root / f"{split}2017"
        folder.mkdir(exist_ok=True)
        hasher = hashlib.sha256()
        images, annotations = [], []
        jobs = [(preset, seed, split, index, folder / f"{index + 1:06d}.png") for index in range(int(count))]
        with _pool(workers) as pool:  # images are independent: draw them in parallel, hash in order
            for (*_, path), (pixels, anns) in zip(jobs, pool.map(_draw_and_save, jobs, chunksize=16)):
                _image_digest(hasher, pixels, anns)
                image_id = len(images) + 1
                images.append({"id": image_id, "file_name": path.name,
                               "width": pixels.shape[1], "height": pixels.shape[0]})
                for label, (x, y, w, h) in anns:
                    # no segmentation here, so 'area' is the box area (it sets COCO's small/medium/large)
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                        "category_id": label + 1, "bbox": [x, y, w, h], "area": w * h,
                                        "iscrowd": 0})
        data = {
            "info": {"description": f"detrkd embedded synthetic detection set ({split})",
                     "version": str(SYNTH_VERSION), "preset": preset_name, "preset_config": asdict(preset),
                     "seed": int(seed), "split": split, "content_hash": hasher.hexdigest()[:16],
                     "libraries": _library_versions()},
            "licenses": [{"id": 1, "name": "pictures from scikit-image's data module (CC0, public domain or "
                                               "no known copyright restrictions); glyphs: Pillow's built-in font"}],
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1, "name": c, "supercategory": "digit" if c.isdigit() else "letter"}
                           for k, c in enumerate(preset.classes)],
        }
        with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
            json.dump(data, f)
    return root


def _resolve_preset(preset):
    if isinstance(preset, SynthPreset):
        return "custom", preset
    if preset not in SYNTH_PRESETS:
        raise ValueError(f"synthetic preset must be one of {sorted(SYNTH_PRESETS)}, got {preset!r}")
    return preset, SYNTH_PRESETS[preset]


def default_cache_dir() -> Path:
    """``$DETRKD_CACHE`` or ``~/.cache/detrkd``."""
    return Path(os.environ.get("DETRKD_CACHE") or Path.home() / ".cache" / "detrkd")


def ensure_synthetic(cache_dir=None, preset="easy", seed=0, num_train=2000, num_val=500, verbose=True) -> Path:
    """The synthetic set's folder under ``cache_dir``, generated there first if it is not yet.

    Generation goes to a temporary folder renamed into place at the end, so an interrupted or
    concurrent run never leaves (or reads) a half-written set.
    """
    preset_name, _ = _resolve_preset(preset)
    if preset_name == "custom":
        raise ValueError("ensure_synthetic caches only named presets; call generate_synthetic for a custom one")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache_dir / f"synthetic-v{SYNTH_VERSION}-{preset_name}-seed{seed}-{num_train}x{num_val}"
    if not root.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        if verbose:
            print(f"data: generating the embedded synthetic set ({preset_name}, seed {seed}, "
                  f"{num_train} train + {num_val} val images) into {root}", flush=True)
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=cache_dir))
        try:
            generate_synthetic(tmp, preset_name, seed, num_train, num_val)
            os.rename(tmp, root)
        except OSError:
            if not root.exists():  # a real failure, not another process finishing first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    for split in ("train", "val"):
        ann = root / "annotations" / f"instances_{split}2017.json"
        try:
            with open(ann) as f:
                info = json.load(f).get("info", {})
        except (OSError, json.JSONDecodeError) as e:
            raise RuntimeError(f"the cached synthetic set at {root} is damaged ({e}); delete the folder "
                               f"to regenerate it") from None
        if info.get("version") != str(SYNTH_VERSION) or info.get("preset") != preset_name \
                or info.get("seed") != seed:
            raise RuntimeError(f"{ann} does not describe synthetic v{SYNTH_VERSION} {preset_name} seed {seed} "
                               f"(info: {info.get('version')}, {info.get('preset')}, {info.get('seed')}); "
                               f"delete {root} to regenerate it")
    return root


def verify_synthetic(root, regenerate: int = 0):
    """Check a generated set: recompute each split's content hash from the files on disk and compare
    it with the json's ``info.content_hash``; with ``regenerate=n`` also redraw the first n images of
    each split and require them equal bit for bit (this fails if Pillow's resampling or a bundled
    picture ever changes). Raises ValueError on any difference; returns {split: hash}."""
    root = Path(root)
    hashes = {}
    for split in ("train", "val"):
        ann = root / "annotations" / f"instances_{split}2017.json"
        with open(ann) as f:
            data = json.load(f)
        info = data["info"]
        config = dict(info["preset_config"], classes=tuple(info["preset_config"]["classes"]))
        preset = SynthPreset(**config)  # as recorded at generation, so a custom preset works too
        by_image = {}
        for a in data["annotations"]:
            by_image.setdefault(a["image_id"], []).append((a["category_id"] - 1, a["bbox"]))
        hasher = hashlib.sha256()
        for index, im in enumerate(data["images"]):
            pixels = np.asarray(Image.open(root / f"{split}2017" / im["file_name"]).convert("RGB"))
            anns = by_image.get(im["id"], [])
            _image_digest(hasher, pixels, anns)
            if index < regenerate:
                fresh, fresh_anns = synthetic_image(preset, info["seed"], split, index)
                if not np.array_equal(fresh, pixels) or [(lb, list(b)) for lb, b in fresh_anns] != anns:
                    raise ValueError(f"{split} image {index} of {root} differs from a fresh draw by this "
                                     f"generator (libraries now: {_library_versions()}, "
                                     f"at generation: {info.get('libraries')})")
        digest = hasher.hexdigest()[:16]
        if digest != info["content_hash"]:
            raise ValueError(f"{ann}: content hash of the files is {digest}, the json records "
                             f"{info['content_hash']}: the set was modified or damaged")
        hashes[split] = digest
    return hashes


# ==========================================================================================
# Building data sets from arguments
# ==========================================================================================

_DEFAULTS = dict(data="synthetic", coco_path=None, train_ann=None, train_images=None, val_ann=None,
                 val_images=None, data_cache=None, synth="easy", synth_seed=0, synth_num_train=2000,
                 synth_num_val=500, image_size=None, max_size=None, augment=True)


def add_data_args(parser: argparse.ArgumentParser):
    """The data flags (DETR spellings with underscores are accepted too)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=["synthetic", "coco"], default="synthetic",
                   help="synthetic: the embedded set (default); coco: a COCO-format folder")
    g.add_argument("--coco-path", "--coco_path", dest="coco_path", default=None,
                   help="folder with annotations/instances_{train,val}2017.json, train2017/, val2017/")
    for split in ("train", "val"):
        g.add_argument(f"--{split}-ann", dest=f"{split}_ann", default=None,
                       help=f"{split} annotation json (overrides the --coco-path layout)")
        g.add_argument(f"--{split}-images", dest=f"{split}_images", default=None,
                       help=f"{split} image folder (overrides the --coco-path layout)")
    g.add_argument("--data-cache", "--data_cache", dest="data_cache", default=None,
                   help="where the synthetic set is generated (default $DETRKD_CACHE or ~/.cache/detrkd)")
    g.add_argument("--synth", choices=sorted(SYNTH_PRESETS), default="easy", help="synthetic set preset")
    g.add_argument("--synth-seed", dest="synth_seed", type=int, default=0)
    g.add_argument("--synth-num-train", dest="synth_num_train", type=int, default=2000)
    g.add_argument("--synth-num-val", dest="synth_num_val", type=int, default=500)
    g.add_argument("--image-size", dest="image_size", type=int, default=None,
                   help="validation shorter side; training scales are 0.6-1.0x it "
                        "(default 800 for coco, the image size for synthetic)")
    g.add_argument("--max-size", dest="max_size", type=int, default=None,
                   help="longest side after resizing (default image-size * 1333 / 800)")
    return parser


def build_dataset(image_set: str, args=None, **overrides) -> CocoDetection:
    """The 'train' or 'val' split chosen by ``args`` (an argparse namespace or any object with the
    attributes of ``add_data_args``) and/or keyword ``overrides`` (which win). Keys and defaults:

        data='synthetic' | 'coco', coco_path, train_ann, train_images, val_ann, val_images,
        data_cache, synth='easy', synth_seed=0, synth_num_train=2000, synth_num_val=500,
        image_size (None: 800 for coco, the generated size for synthetic), max_size, augment=True
        (False gives the validation transform for the train split too)

    ``--data coco`` never falls back to another data set: a missing path is an error.
    """
    unknown = set(overrides) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"build_dataset got unknown option(s) {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    if image_set not in ("train", "val"):
        raise ValueError(f"image_set must be 'train' or 'val', got {image_set!r}")
    opt = {k: overrides[k] if k in overrides else getattr(args, k, v) for k, v in _DEFAULTS.items()}

    if opt["data"] == "synthetic":
        if not is_main_process():
            barrier()                                            # let rank 0 generate it first
        try:
            root = ensure_synthetic(opt["data_cache"], opt["synth"], int(opt["synth_seed"]),
                                    int(opt["synth_num_train"]), int(opt["synth_num_val"]),
                                    verbose=is_main_process())
        finally:  # release the others even if it failed (they then fail with the same clear error)
            if is_main_process():
                barrier()
        ann_file = root / "annotations" / f"instances_{image_set}2017.json"
        img_folder = root / f"{image_set}2017"
        default_size = SYNTH_PRESETS[opt["synth"]].image_size
        if is_main_process():
            print(f"data: synthetic embedded set, preset {opt['synth']}, seed {opt['synth_seed']}, "
                  f"{image_set} split at {img_folder}", flush=True)
    elif opt["data"] == "coco":
        ann_file, img_folder = opt[f"{image_set}_ann"], opt[f"{image_set}_images"]
        if ann_file is None or img_folder is None:
            if opt["coco_path"] is None:
                raise ValueError(f"--data coco needs --coco-path DIR (or --{image_set}-ann FILE and "
                                 f"--{image_set}-images DIR)")
            coco_path = Path(opt["coco_path"])
            if not coco_path.is_dir():
                raise FileNotFoundError(f"--coco-path {coco_path} does not exist or is not a folder")
            ann_file = ann_file or coco_path / "annotations" / f"instances_{image_set}2017.json"
            img_folder = img_folder or coco_path / f"{image_set}2017"
        default_size = 800
    else:
        raise ValueError(f"data must be 'synthetic' or 'coco', got {opt['data']!r}")

    size = opt["image_size"] or default_size
    transforms = make_transforms(image_set, size, opt["max_size"], augment=bool(opt["augment"]),
                                 hflip=opt["data"] != "synthetic")
    return CocoDetection(img_folder, ann_file, transforms, cache_dir=opt["data_cache"])
