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
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors

from common.distributed import barrier, is_main_process
from common.synthetic import SYNTH_PRESETS, default_cache_dir, ensure_synthetic

# the embedded set's generator lives in common/synthetic.py; its cache folder and presets are
# re-exported here for the scripts that build data sets
__all__ = ["CocoDetection", "load_coco_annotations", "check_images", "ImageDecodeError",
           "make_transforms", "RandomSizeCrop", "collate", "build_dataset", "add_data_args",
           "SYNTH_PRESETS", "ensure_synthetic", "default_cache_dir"]

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
            of a 1x1 stride-2 conv on one crashes)
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
