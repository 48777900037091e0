"""common/data.py: COCO-format loading and its edge cases, transforms, collate, the synthetic set."""
import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from common import data as D
from common import synthetic as S

MEAN = torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(D.IMAGENET_STD).view(3, 1, 1)


def write_coco(root, images, annotations, categories, split="train", extra=None, skip_files=()):
    """A tiny COCO folder in the standard layout. ``images``: list of (id, w, h); each image is drawn
    black with a white rectangle over every annotation box (so box bookkeeping can be checked)."""
    root = str(root)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, f"{split}2017"), exist_ok=True)
    imgs = []
    for image_id, w, h in images:
        name = f"{image_id:012d}.png"
        imgs.append({"id": image_id, "file_name": name, "width": w, "height": h})
        if name in skip_files:
            continue
        px = np.zeros((h, w, 3), np.uint8)
        for a in annotations:
            if a["image_id"] == image_id and a["bbox"][2] > 0 and a["bbox"][3] > 0:
                x, y, bw, bh = (int(round(v)) for v in a["bbox"])
                px[max(y, 0):y + bh, max(x, 0):x + bw] = 255
        Image.fromarray(px).save(os.path.join(root, f"{split}2017", name))
    data = {"images": imgs, "annotations": annotations, "categories": categories}
    data.update(extra or {})
    path = os.path.join(root, "annotations", f"instances_{split}2017.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def plain_dataset(root, split="train", transforms=None):
    return D.CocoDetection(os.path.join(root, f"{split}2017"),
                           os.path.join(root, "annotations", f"instances_{split}2017.json"), transforms)


CATS = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}]


# ------------------------------------------------------------------------------------------
# COCO format: ids, edge cases, errors
# ------------------------------------------------------------------------------------------

def test_category_ids_round_trip(tmp_path):
    anns = [{"id": 1, "image_id": 7, "category_id": 90, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [20, 5, 6, 12], "area": 72, "iscrowd": 0},
            {"id": 3, "image_id": 7, "category_id": 5, "bbox": [5, 20, 9, 9], "area": 81, "iscrowd": 0}]
    write_coco(tmp_path, [(7, 40, 30)], anns, CATS)
    ds = plain_dataset(tmp_path)
    assert ds.num_classes == 3
    assert ds.label_to_category == [1, 5, 90]                 # sorted ids -> labels 0, 1, 2
    assert ds.category_to_label == {1: 0, 5: 1, 90: 2}
    assert ds.class_names == ["person", "airplane", "toothbrush"]
    _, target = ds[0]
    assert target["labels"].tolist() == [2, 0, 1]
    assert [ds.label_to_category[lb] for lb in target["labels"].tolist()] == [90, 1, 5]
    assert target["image_id"] == 7 and isinstance(target["image_id"], int)


def test_edge_cases_empty_crowd_degenerate_missing_keys(tmp_path):
    anns = [
        # no 'area', no 'iscrowd', no 'id': filled in
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 10, 6]},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [20, 2, 8, 8], "iscrowd": 1},  # crowd
        {"id": 12, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 7]},                # zero width
        {"id": 13, "image_id": 1, "category_id": 1, "bbox": [5, 5, 4, -3]},               # negative height
        {"id": 14, "image_id": 1, "category_id": 1, "bbox": [50, 5, 4, 4]},               # outside the image
        {"id": 15, "image_id": 1, "category_id": 1, "bbox": [-4, 10, 10, 5]},             # partly outside
    ]
    # no 'info', no 'licenses'; image 2 has no annotation at all
    write_coco(tmp_path, [(1, 32, 24), (2, 16, 16)], anns, [{"id": 1}])
    with pytest.warns(UserWarning, match="dropped 3 degenerate"):
        ds = plain_dataset(tmp_path)
    assert len(ds) == 2
    assert ds.coco.dataset["info"] == {} and ds.coco.dataset["licenses"] == []
    assert ds.class_names == ["1"]
    kept = ds.coco.dataset["annotations"]
    assert sorted(a["id"] for a in kept) == [11, 15, 16]       # the unnamed one got a fresh id
    first = next(a for a in kept if a["bbox"] == [4, 4, 10, 6])
    assert first["area"] == 60 and first["iscrowd"] == 0
    # the crowd box stays in the ground truth (COCOeval ignores it) but not in the training target
    assert any(a["iscrowd"] for a in ds.coco.imgToAnns[1])
    _, t = ds[0]
    assert t["boxes"].shape == (2, 4) and t["labels"].tolist() == [0, 0]
    # the partly outside box is clipped to x in [0, 6]: cx = 3/32, w = 6/32
    expected = torch.tensor([[9 / 32, 7 / 24, 10 / 32, 6 / 24], [3 / 32, 12.5 / 24, 6 / 32, 5 / 24]])
    torch.testing.assert_close(t["boxes"], expected)
    _, t2 = ds[1]
    assert t2["boxes"].shape == (0, 4) and t2["boxes"].dtype == torch.float32
    assert t2["labels"].shape == (0,) and t2["labels"].dtype == torch.int64


def test_missing_width_height_read_from_file(tmp_path):
    path = write_coco(tmp_path, [(1, 20, 10)], [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}],
                      [{"id": 1, "name": "a"}])
    with open(path) as f:
        data = json.load(f)
    for im in data["images"]:
        del im["width"], im["height"]
    with open(path, "w") as f:
        json.dump(data, f)
    ds = plain_dataset(tmp_path)
    assert (ds.coco.imgs[1]["width"], ds.coco.imgs[1]["height"]) == (20, 10)


def test_clear_errors_name_the_file(tmp_path):
    cats = [{"id": 1, "name": "a"}]
    ann = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]
    # missing annotation file
    missing = tmp_path / "nope" / "instances_train2017.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        D.CocoDetection(tmp_path, missing)
    # missing image file, named in the error
    write_coco(tmp_path / "a", [(1, 8, 8), (2, 8, 8)], ann, cats, skip_files=("000000000002.png",))
    with pytest.raises(FileNotFoundError, match="000000000002.png"):
        plain_dataset(tmp_path / "a")
    # malformed json
    path = write_coco(tmp_path / "b", [(1, 8, 8)], ann, cats)
    with open(path, "w") as f:
        f.write('{"images": [')
    with pytest.raises(ValueError, match="instances_train2017.json.*not valid json"):
        plain_dataset(tmp_path / "b")
    # structurally wrong annotations, each named with the file
    one_image = [{"id": 1, "file_name": "x.png", "width": 8, "height": 8}]

    def with_anns(*anns):
        return {"images": one_image, "categories": cats, "annotations": list(anns)}

    bad_cases = [
        ({"images": [], "categories": cats}, "missing the 'annotations' list"),
        (with_anns({"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}), "unknown category_id 3"),
        (with_anns({"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}), "unknown image_id 9"),
        (with_anns({"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}), "4 finite numbers"),
        (with_anns({"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]},
                   {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}), "duplicate annotation id 1"),
        ({"images": one_image + one_image, "categories": cats, "annotations": []}, "duplicate image id 1"),
        ({"images": one_image, "categories": [], "annotations": []}, "'categories' list is empty"),
        ([1, 2], "json object at the top level"),
    ]
    for i, (content, message) in enumerate(bad_cases):
        p = tmp_path / f"bad{i}.json"
        p.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=f"bad{i}.json.*{message}"):
            D.load_coco_annotations(p)


def test_build_dataset_coco_paths_and_errors(tmp_path):
    ann = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4]}]
    write_coco(tmp_path / "coco", [(1, 16, 12)], ann, [{"id": 3, "name": "c"}], split="val")
    parser = D.add_data_args(argparse.ArgumentParser())
    args = parser.parse_args(["--data", "coco", "--coco_path", str(tmp_path / "coco"), "--image-size", "24"])
    ds = D.build_dataset("val", args)
    image, target = ds[0]
    assert image.shape == (3, 24, 32) and target["size"].tolist() == [24, 32]
    assert target["orig_size"].tolist() == [12, 16]
    # explicit annotation file and image folder, no --coco-path
    ds2 = D.build_dataset("val", data="coco", val_ann=tmp_path / "coco/annotations/instances_val2017.json",
                          val_images=tmp_path / "coco/val2017", image_size=24)
    assert len(ds2) == 1
    # no silent switch: missing path or layout is an error naming it
    with pytest.raises(ValueError, match="--coco-path"):
        D.build_dataset("val", data="coco")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        D.build_dataset("val", data="coco", coco_path=tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="instances_train2017.json"):
        D.build_dataset("train", data="coco", coco_path=tmp_path / "coco")
    with pytest.raises(TypeError, match="cocopath"):
        D.build_dataset("val", data="coco", cocopath="x")


# ------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------

def to_pixels(image):
    return (image * STD + MEAN)  # undo the ImageNet normalisation: values in [0, 1]


def test_horizontal_flip_by_hand(tmp_path):
    write_coco(tmp_path, [(1, 40, 20)], [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 2, 10, 6]}],
               [{"id": 1, "name": "a"}])
    flip = T.Compose([T.RandomHorizontalFlip(p=1.0), T.ToImage(), T.ToDtype(torch.float32, scale=True)])
    image, t = plain_dataset(tmp_path, transforms=flip)[0]
    # x in [4, 14] of a 40-wide image becomes [26, 36]: cx = 31/40, cy = 5/20, w = 10/40, h = 6/20
    torch.testing.assert_close(t["boxes"], torch.tensor([[31 / 40, 5 / 20, 10 / 40, 6 / 20]]))
    assert image[:, 2:8, 26:36].min() == 1.0 and image[:, :, :26].max() == 0.0


def test_train_transform_flips_only_when_asked():
    """The embedded set trains without the horizontal flip (its glyphs are chiral). An image red
    on the left and blue on the right keeps red left of blue through every resize and crop
    unless it is flipped: with the flip, about half the samples come out mirrored."""
    px = np.zeros((64, 64, 3), np.uint8)
    px[:, :32, 0] = 255
    px[:, 32:, 2] = 255
    box = D.tv_tensors.BoundingBoxes(torch.tensor([[8.0, 8.0, 56.0, 56.0]]), format="XYXY",
                                     canvas_size=(64, 64))

    def mirrored(tf):
        image, _ = tf(Image.fromarray(px), {"boxes": box, "labels": torch.tensor([0])})
        image = to_pixels(image)
        left, right = image[:, :, 0], image[:, :, -1]     # (3, H) first and last columns
        return bool((left[2] > left[0]).all() and (right[0] > right[2]).all())

    torch.manual_seed(0)
    assert sum(mirrored(D.make_transforms("train", 64, hflip=True)) for _ in range(40)) >= 8
    assert not any(mirrored(D.make_transforms("train", 64, hflip=False)) for _ in range(40))


def test_val_transform_sizes_and_boxes(tmp_path):
    write_coco(tmp_path, [(1, 200, 100)], [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 25, 40, 20]}],
               [{"id": 1, "name": "a"}], split="val")
    ds = plain_dataset(tmp_path, "val", D.make_transforms("val", size=64, max_size=1000))
    image, t = ds[0]
    assert image.shape == (3, 64, 128) and image.dtype == torch.float32
    assert t["size"].tolist() == [64, 128] and t["orig_size"].tolist() == [100, 200]
    torch.testing.assert_close(t["boxes"], torch.tensor([[70 / 200, 35 / 100, 40 / 200, 20 / 100]]))
    # max_size caps the longer side: 200x100 at size 64, max 96 -> 96 x 48
    image, _ = plain_dataset(tmp_path, "val", D.make_transforms("val", size=64, max_size=96))[0]
    assert image.shape == (3, 48, 96)
    # the normalisation is ImageNet's: the white box reads 1.0, the black background 0.0
    px = to_pixels(D.CocoDetection(tmp_path / "val2017", tmp_path / "annotations/instances_val2017.json",
                                   D.make_transforms("val", 100, 200))[0][0])
    torch.testing.assert_close(px[:, 30:40, 60:80], torch.ones(3, 10, 20), atol=1e-5, rtol=0)
    torch.testing.assert_close(px[:, :20, :], torch.zeros(3, 20, 200), atol=1e-5, rtol=0)


def test_detr_scales_at_800():
    train = D.make_transforms("train", size=800)
    choice = train.transforms[1]
    multi_scale, crop_branch = choice.transforms
    assert multi_scale.min_size == list(range(480, 801, 32)) and multi_scale.max_size == 1333
    assert crop_branch.transforms[0].min_size == [400, 500, 600]
    assert (crop_branch.transforms[1].min_size, crop_branch.transforms[1].max_size) == (384, 600)


def test_train_transform_keeps_boxes_on_their_pixels(tmp_path):
    """After random flip / resize / crop, each target box must still frame the white rectangle drawn
    where the original box was: measured from the pixels, independently of the box arithmetic."""
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 12, 30, 20]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [70, 40, 16, 30]}]
    write_coco(tmp_path, [(1, 100, 80)], anns, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    ds = plain_dataset(tmp_path, transforms=D.make_transforms("train", size=64))
    torch.manual_seed(0)
    seen_sizes, seen_counts = set(), set()
    for _ in range(40):
        image, t = ds[0]
        h, w = image.shape[-2:]
        seen_sizes.add((h, w))
        boxes = t["boxes"]
        seen_counts.add(len(boxes))
        assert boxes.dtype == torch.float32 and t["labels"].dtype == torch.int64
        assert len(boxes) == len(t["labels"]) and t["size"].tolist() == [h, w]
        # normalised cxcywh inside the image
        assert (boxes[:, 2:] > 0).all()
        assert (boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-6).all() and (boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-6).all()
        bright = to_pixels(image).mean(0) > 0.5
        for (cx, cy, bw, bh), lb in zip(boxes.tolist(), t["labels"].tolist()):
            x0, x1 = (cx - bw / 2) * w, (cx + bw / 2) * w
            y0, y1 = (cy - bh / 2) * h, (cy + bh / 2) * h
            inner = bright[int(np.ceil(y0)) + 1:int(np.floor(y1)) - 1, int(np.ceil(x0)) + 1:int(np.floor(x1)) - 1]
            assert inner.numel() == 0 or inner.float().mean() > 0.95   # the box is on the white pixels
            # and the white pixels near the box do not reach beyond it (1.5 px of resampling slack)
            ys, xs = torch.nonzero(bright[max(0, int(y0) - 3):int(y1) + 3, max(0, int(x0) - 3):int(x1) + 3],
                                   as_tuple=True)
            if len(xs):
                assert xs.min() + max(0, int(x0) - 3) >= x0 - 1.5 and xs.max() + max(0, int(x0) - 3) <= x1 + 1.5
                assert ys.min() + max(0, int(y0) - 3) >= y0 - 1.5 and ys.max() + max(0, int(y0) - 3) <= y1 + 1.5
    assert len(seen_sizes) > 3          # multi-scale and crops happened
    assert 2 in seen_counts             # and not every sample lost a box


# ------------------------------------------------------------------------------------------
# Collate
# ------------------------------------------------------------------------------------------

def test_collate_pads_masks_and_is_contiguous():
    a, b = torch.rand(3, 5, 7), torch.rand(3, 6, 4)
    ta, tb = {"image_id": 1}, {"image_id": 2}
    images, masks, targets = D.collate([(a, ta), (b, tb)])
    assert images.shape == (2, 3, 6, 7) and images.is_contiguous() and images.dtype == torch.float32
    assert masks.shape == (2, 6, 7) and masks.dtype == torch.bool
    assert torch.equal(images[0, :, :5, :7], a) and torch.equal(images[1, :, :6, :4], b)
    assert images[0, :, 5:].abs().sum() == 0 and images[1, :, :, 4:].abs().sum() == 0
    expected = torch.ones(2, 6, 7, dtype=torch.bool)
    expected[0, :5, :7] = False
    expected[1, :6, :4] = False
    assert torch.equal(masks, expected)
    assert targets == [ta, tb]
    # a channels-last input image still comes out as a contiguous NCHW batch
    cl = torch.rand(1, 6, 6, 3).permute(0, 3, 1, 2)[0]
    images, _, _ = D.collate([(cl, ta)])
    assert images.is_contiguous() and images.stride() == (108, 36, 6, 1)
    with pytest.raises(ValueError, match="empty"):
        D.collate([])
    with pytest.raises(ValueError, match="image 0"):
        D.collate([(torch.rand(1, 4, 4), ta)])


# ------------------------------------------------------------------------------------------
# The embedded synthetic set
# ------------------------------------------------------------------------------------------

def read_info(root, split):
    with open(os.path.join(root, "annotations", f"instances_{split}2017.json")) as f:
        return json.load(f)


def test_synthetic_is_deterministic_and_versioned(tmp_path):
    a = S.generate_synthetic(tmp_path / "a", "easy", seed=0, num_train=6, num_val=3, workers=1)
    b = S.generate_synthetic(tmp_path / "b", "easy", seed=0, num_train=6, num_val=3, workers=2)
    c = S.generate_synthetic(tmp_path / "c", "easy", seed=1, num_train=6, num_val=3, workers=1)
    small = S.generate_synthetic(tmp_path / "small", "easy", seed=0, num_train=3, num_val=1, workers=1)
    for split in ("train", "val"):
        ia, ib, ic = (read_info(r, split)["info"] for r in (a, b, c))
        assert ia["version"] == str(S.SYNTH_VERSION) and ia["preset"] == "easy" and ia["seed"] == 0
        assert len(ia["content_hash"]) == 16
        assert ia["content_hash"] == ib["content_hash"]     # same seed: same set, whatever the worker count
        assert ia["content_hash"] != ic["content_hash"]     # another seed: another set
        assert read_info(a, split) == read_info(b, split)
    # image i does not depend on the size of the set
    for i in range(3):
        name = f"{i + 1:06d}.png"
        assert np.array_equal(np.asarray(Image.open(a / "train2017" / name)),
                              np.asarray(Image.open(small / "train2017" / name)))
    # the recorded hash matches the files, and a fresh draw matches them bit for bit
    assert S.verify_synthetic(a, regenerate=2) == {s: read_info(a, s)["info"]["content_hash"] for s in ("train", "val")}
    # any change to a pixel is caught
    path = a / "val2017" / "000002.png"
    px = np.asarray(Image.open(path)).copy()
    px[0, 0, 0] ^= 1
    Image.fromarray(px).save(path)
    with pytest.raises(ValueError, match="content hash"):
        S.verify_synthetic(a)


def test_synthetic_content_is_detection_like(tmp_path):
    root = S.generate_synthetic(tmp_path, "hard", seed=3, num_train=40, num_val=2, workers=1)
    data = read_info(root, "train")
    preset = S.SYNTH_PRESETS["hard"]
    assert [c["name"] for c in data["categories"]] == list(preset.classes)
    sides, per_image, cats = [], {}, set()
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 128 and w > 0 and h > 0
        assert a["area"] == w * h and a["iscrowd"] == 0
        sides.append(max(w, h))
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
        cats.add(a["category_id"])
    assert 6 <= min(sides) and max(sides) <= 60
    assert min(sides) < 20 and max(sides) > 40                 # small and large objects both occur
    assert len(cats) >= 12                                      # many classes in 40 images
    assert max(per_image.values()) >= 4                         # crowded images occur
    # occlusion: some pair of boxes in an image overlaps
    boxes = {}
    for a in data["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a["bbox"])
    def overlap(p, q):
        return min(p[0] + p[2], q[0] + q[2]) > max(p[0], q[0]) and min(p[1] + p[3], q[1] + q[3]) > max(p[1], q[1])
    assert any(overlap(p, q) for bs in boxes.values() for i, p in enumerate(bs) for q in bs[i + 1:])
    # images are RGB 128x128 with real content (not flat)
    px = np.asarray(Image.open(root / "train2017" / "000001.png"))
    assert px.shape == (128, 128, 3) and px.std() > 10


def test_build_dataset_synthetic_uses_the_cache(tmp_path, monkeypatch):
    kw = dict(data="synthetic", data_cache=tmp_path, synth="easy", synth_num_train=4, synth_num_val=2)
    ds = D.build_dataset("train", **kw)
    assert len(ds) == 4 and ds.num_classes == 10 and ds.label_to_category == list(range(1, 11))
    image, t = ds[0]
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert (t["labels"] >= 0).all() and (t["labels"] < 10).all()
    # second use: no regeneration
    monkeypatch.setattr(S, "generate_synthetic", lambda *a, **k: pytest.fail("regenerated a cached set"))
    val = D.build_dataset("val", **kw)
    assert len(val) == 2 and val[0][0].shape == (3, 128, 128)   # validation size = the generated size
    # a cache folder whose json describes something else is refused, not silently used
    root = next(p for p in tmp_path.iterdir() if p.name.startswith("synthetic-"))
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    data["info"]["version"] = "0"
    path.write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match="delete"):
        D.build_dataset("val", **kw)
    with pytest.raises(ValueError, match="preset"):
        D.build_dataset("val", data="synthetic", data_cache=tmp_path, synth="impossible")


def test_synthetic_without_scikit_image_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)       # makes "import skimage" raise ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    S._source_image.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install scikit-image"):
            D.build_dataset("train", data="synthetic", data_cache=tmp_path, synth_num_train=2, synth_num_val=1)
        assert list(tmp_path.iterdir()) == []                # no half-written set left behind
    finally:
        S._source_image.cache_clear()
