"""methods/predict.py: the detections of an image folder equal those of the evaluation path
(validation transform, model, PostProcess, COCO conversion of common/evaluate.py), drawn PNGs,
category names and ids, batching, and clear errors for bad input."""
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from common.criterion import build_postprocess
from common.data import collate, make_transforms
from common.synthetic import SYNTH_PRESETS, synthetic_image
from common.detr import build_model
from common.evaluate import results_to_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import predict as P  # noqa: E402

SMALL = dict(backbone="tiny", width=8, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
             dim_feedforward=64, dropout=0.0, num_queries=20, num_feature_levels=3,
             with_box_refine=True, two_stage=True)
CATEGORIES = [{"id": 10 + 3 * i, "name": f"digit {i}"} for i in range(10)]  # non-contiguous ids
SIZES = [(128, 128), (200, 160), (96, 150)]  # (width, height): resized differently, padded


def make_checkpoint(path, categories=True, variant="deformable_detr", overrides=SMALL):
    """A checkpoint laid out as training saves it: "model" and "args" (vars of the parser)."""
    torch.manual_seed(0)
    model = build_model(variant, 10, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {"model": model.state_dict(),
            "args": {"variant": variant, "model_overrides": dict(overrides), "data": "synthetic",
                     "synth": "easy", "image_size": None, "max_size": None}}
    if categories:
        ckpt[P.CATEGORIES_KEY] = CATEGORIES
    torch.save(ckpt, path)
    return model.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i, size in enumerate(SIZES):
        pixels, _ = synthetic_image(SYNTH_PRESETS["easy"], 0, "val", i)
        Image.fromarray(pixels).resize(size).save(root / f"img{i}.png")
    (root / "notes.txt").write_text("not an image")
    return root


@torch.no_grad()
def evaluation_path(model, image):
    """What evaluation does with one image (batch of one): validation transform, model,
    PostProcess to original pixels, results_to_coco."""
    x = make_transforms("val", 128)(image)
    out = model(x[None], torch.zeros(1, *x.shape[1:], dtype=torch.bool))
    result = build_postprocess(model.cfg)(out, torch.tensor([[image.height, image.width]]))[0]
    return results_to_coco(0, result, [c["id"] for c in CATEGORIES])


def test_detections_equal_the_evaluation_path(tmp_path, folder):
    model = make_checkpoint(tmp_path / "ckpt.pth")
    dets = P.predict(str(tmp_path / "ckpt.pth"), str(folder), str(tmp_path / "out"),
                     score_threshold=0.0)
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert written == json.loads(json.dumps(dets))
    for i in range(len(SIZES)):
        mine = [d for d in written if d["file_name"] == f"img{i}.png"]
        assert {d["image_id"] for d in mine} == {i}  # sorted file-name order
        ref = evaluation_path(model, Image.open(folder / f"img{i}.png").convert("RGB"))
        assert len(mine) == len(ref) == 100  # the variant's top-100
        for a, b in zip(mine, ref):
            assert a["category_id"] == b["category_id"]
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)
            assert a["score"] == pytest.approx(b["score"], abs=1e-6)
        boxes = np.array([d["bbox"] for d in mine])  # xywh, w and h > 0
        assert (boxes[:, 2:] > 0).all()
    assert {d["category_id"] for d in written} <= {c["id"] for c in CATEGORIES}


def test_batches_are_padded_and_masked_as_in_evaluation(tmp_path, folder):
    """--batch-size 3 on images of three sizes: the batch is padded and masked by the
    evaluation's collate, so the detections are those of evaluating that batch."""
    model = make_checkpoint(tmp_path / "ckpt.pth")
    three = P.predict(str(tmp_path / "ckpt.pth"), str(folder), str(tmp_path / "b"),
                      score_threshold=0.0, batch_size=3, draw_images=False)
    pil = [Image.open(folder / f"img{i}.png").convert("RGB") for i in range(3)]
    images, masks, _ = collate([(make_transforms("val", 128)(im), {}) for im in pil])
    assert masks.any()  # the three sizes are padded
    with torch.no_grad():
        results = build_postprocess(model.cfg)(model(images, masks), torch.tensor(
            [[im.height, im.width] for im in pil]))
    ref = [d for i, r in enumerate(results)
           for d in results_to_coco(i, r, [c["id"] for c in CATEGORIES])]
    assert [(d["image_id"], d["category_id"]) for d in three] == \
        [(d["image_id"], d["category_id"]) for d in ref]
    np.testing.assert_allclose([d["bbox"] for d in three], [d["bbox"] for d in ref], atol=1e-4)
    np.testing.assert_allclose([d["score"] for d in three], [d["score"] for d in ref], atol=1e-6)
    assert not os.path.exists(tmp_path / "b" / "img0.png")


def test_threshold_and_drawn_boxes_with_names(tmp_path, folder):
    make_checkpoint(tmp_path / "ckpt.pth")
    all_dets = P.predict(str(tmp_path / "ckpt.pth"), str(folder / "img1.png"),
                         str(tmp_path / "all"), score_threshold=0.0)
    threshold = sorted(d["score"] for d in all_dets)[-5]  # keeps the best five
    kept = P.predict(str(tmp_path / "ckpt.pth"), str(folder / "img1.png"), str(tmp_path / "out"),
                     score_threshold=threshold)
    assert len(kept) == 5 and all(d["score"] >= threshold for d in kept)
    drawn = np.asarray(Image.open(tmp_path / "out" / "img1.png").convert("RGB"))
    original = np.asarray(Image.open(folder / "img1.png").convert("RGB"))
    assert drawn.shape == original.shape
    changed = (drawn != original).any(-1)
    x, y, w, h = [int(round(v)) for v in kept[0]["bbox"]]
    assert changed.any() and changed[max(y, 0):y + h + 1, max(x, 0):x + w + 1].any()
    label = P.draw(Image.fromarray(original), [{**kept[0], "name": "digit 0"}],
                   {c["id"]: i for i, c in enumerate(CATEGORIES)})
    assert (np.asarray(label) != original).any()


def test_old_checkpoint_names_classes_and_annotations_give_names_and_ids(tmp_path, folder):
    make_checkpoint(tmp_path / "old.pth", categories=False)
    with pytest.warns(UserWarning, match="class N"):
        _, _, _, cats = P.load_for_inference(str(tmp_path / "old.pth"))
    assert cats[3] == {"id": 3, "name": "class 3"}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 77, "file_name": "img2.png"}],
                               "categories": CATEGORIES[::-1], "annotations": []}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dets = P.predict(str(tmp_path / "old.pth"), str(folder), str(tmp_path / "out"),
                         score_threshold=0.0, annotations=str(ann), draw_images=False)
    assert {d["image_id"] for d in dets if d["file_name"] == "img2.png"} == {77}
    assert {d["category_id"] for d in dets} <= {c["id"] for c in CATEGORIES}


def test_softmax_variant_counts_its_classes(tmp_path, folder):
    """DETR's head has one extra no-object row: the class count is read correctly."""
    kw = {k: v for k, v in SMALL.items()
          if k not in ("num_feature_levels", "with_box_refine", "two_stage")}
    make_checkpoint(tmp_path / "detr.pth", variant="detr", overrides=kw)
    model, _, num_classes, _ = P.load_for_inference(str(tmp_path / "detr.pth"))
    assert num_classes == 10 and model.variant == "detr"
    dets = P.predict(str(tmp_path / "detr.pth"), str(folder / "img0.png"), str(tmp_path / "o"),
                     score_threshold=0.0, draw_images=False)
    assert len(dets) == 20  # DETR keeps every query's best class


def test_bad_input_is_a_clear_error(tmp_path, folder):
    make_checkpoint(tmp_path / "ckpt.pth")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        P.predict(str(tmp_path / "ckpt.pth"), str(tmp_path / "nothing"), str(tmp_path / "o"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        P.predict(str(tmp_path / "ckpt.pth"), str(tmp_path / "empty"), str(tmp_path / "o"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a checkpoint of this project"):
        P.predict(str(tmp_path / "other.pth"), str(folder), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="score-threshold"):
        P.predict(str(tmp_path / "ckpt.pth"), str(folder), str(tmp_path / "o"),
                  score_threshold=1.5)
    (tmp_path / "broken.png").write_text("not a png")
    with pytest.raises(ValueError, match="cannot read the image"):
        P.predict(str(tmp_path / "ckpt.pth"), str(tmp_path / "broken.png"), str(tmp_path / "o"))
