"""The embedded synthetic detection set: drawn once into a cache folder in the COCO layout
(annotations/instances_{train,val}2017.json, train2017/, val2017/), so ``common.data`` loads it
with the same loader, and COCOeval scores it, like any COCO-format folder.

    generate_synthetic(root, preset, seed, num_train, num_val)   draw a set into ``root``
    ensure_synthetic(cache_dir, preset, ...)   the cached set's folder, generated there if missing
    verify_synthetic(root, regenerate=n)       re-hash the files (and redraw n images) to check it
    SYNTH_PRESETS                              'easy', 'medium', 'hard'
"""
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, asdict
from functools import lru_cache
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, ImageDraw, ImageFilter, ImageFont

__all__ = ["SynthPreset", "SYNTH_PRESETS", "SYNTH_VERSION", "generate_synthetic", "ensure_synthetic",
           "verify_synthetic", "synthetic_image", "default_cache_dir"]

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
