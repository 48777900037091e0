"""What every method script must satisfy, checked the same way for all four (the per-method
test files keep each method's maths):

  1. its losses are finite, and every loss it returns is weighted (a key of ``weight_dict``);
  2. the weighted loss sends gradients to the student and to the method's student-side modules,
     never to the teacher (frozen: no gradient, not even a zero one);
  3. the script's checkpoint holds no teacher entry and loads into ``methods/baseline.py --eval``,
     which then reports the AP the script reported;
  4. ``--visualize DIR --visualize-images N`` writes N figures ``<method>_<image_id>.png``.

All on the session's tiny teacher (conftest.py) and 8 embedded images, one iteration."""
import importlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

import baseline  # noqa: E402  (methods/, on the path through conftest.py)
from common import distill, engine
from common.data import build_dataset, collate

# method -> (its flag function, config class, distiller class, extra flags of the tests)
METHODS = {
    "qskd": ("add_qskd_args", "QSKDConfig", "QSKD", ["--hidden-dim", "16"]),
    "clockdistill": ("add_args", "CLoCKConfig", "CLoCKDistiller", ["--hidden-dim", "16"]),
    "detrdistill": ("add_method_args", "DETRDistillConfig", "DETRDistill", []),
    "gdetkd": ("add_args", "GDetKDConfig", "GDetKD", ["--rois-per-img", "16"]),
}
FIGURES = 2


def build_distiller(name, argv):
    """What the method's main() does before training: flags, config, data and student, the
    teacher, the distiller."""
    add, config, distiller = METHODS[name][:3]
    module = importlib.import_module(name)
    parser = getattr(module, add)(distill.build_parser(name))
    args = distill.resolve(parser.parse_args(argv))
    run = engine.prepare(args)
    teacher = distill.load_teacher(args, run)
    cfg = distill.config_from_args(getattr(module, config), args)
    return getattr(module, distiller)(cfg, teacher, run.student, run.num_classes), run


@pytest.mark.parametrize("name", sorted(METHODS))
def test_losses_weighted_and_gradients_reach_the_student_only(name, tiny_teacher, tmp_path):
    argv = ["--preset", "cpu-tiny", "--teacher", tiny_teacher.path, "--output-dir", str(tmp_path)]
    distiller, run = build_distiller(name, argv + METHODS[name][3] + tiny_teacher.data)
    images, masks, targets = collate([run.dataset_train[i] for i in range(2)])
    distiller.train()
    losses = distiller(images, masks, targets)
    # 1. finite, and every loss weighted
    assert losses and all(torch.isfinite(v).all() for v in losses.values()), losses
    unweighted = sorted(k for k in losses if k.startswith("loss") and k not in distiller.weight_dict)
    assert unweighted == [], f"{name} returns losses without a weight: {unweighted}"
    weighted = [k for k in losses if k in distiller.weight_dict and distiller.weight_dict[k] != 0]
    assert any(not k.startswith(("loss_ce", "loss_bbox", "loss_giou")) for k in weighted), \
        f"{name}: no distillation loss is weighted: {weighted}"
    # 2. gradients: the student and the student-side modules, never the teacher
    sum(losses[k] * distiller.weight_dict[k] for k in weighted).backward()
    teacher = list(distiller.teacher.parameters())
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    student = [p.grad.abs().sum() for p in distiller.student.parameters() if p.grad is not None]
    assert student and float(sum(student)) > 0
    for child, module in distiller.named_children():
        trainable = [p for p in module.parameters() if p.requires_grad]
        if child in ("teacher", "student") or not trainable:
            continue
        got = [p for p in trainable if p.grad is not None and bool(p.grad.abs().sum() > 0)]
        assert got, f"{name}: the student-side module {child} gets no gradient"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_batches_with_images_without_boxes(name, tiny_teacher, tmp_path):
    """A batch where one image has no ground truth, and one where no image has any: the losses
    stay finite and the backward pass runs (a method must not divide by an empty count)."""
    argv = ["--preset", "cpu-tiny", "--teacher", tiny_teacher.path, "--output-dir", str(tmp_path)]
    distiller, run = build_distiller(name, argv + METHODS[name][3] + tiny_teacher.data)
    images, masks, targets = collate([run.dataset_train[i] for i in range(2)])
    assert all(len(t["labels"]) > 0 for t in targets)  # the emptiness below is ours

    def emptied(t):
        return {**t, "labels": t["labels"][:0], "boxes": t["boxes"][:0]}
    distiller.train()
    for batch in ([emptied(targets[0]), targets[1]], [emptied(t) for t in targets]):
        distiller.zero_grad(set_to_none=True)
        losses = distiller(images, masks, batch)
        assert all(torch.isfinite(v).all() for v in losses.values()), (name, losses)
        total = sum(losses[k] * w for k, w in distiller.weight_dict.items() if k in losses)
        total.backward()
        grads = [p.grad for p in distiller.student.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.fixture(scope="module", params=sorted(METHODS))
def script(request, tiny_teacher, tmp_path_factory):
    """One iteration of the method script, then --visualize of FIGURES validation images."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    module = importlib.import_module(name)
    stats = module.main(["--preset", "cpu-tiny", "--teacher", tiny_teacher.path, "--output-dir",
                         str(tmp / "student"), "--visualize", str(tmp / "figs"),
                         "--visualize-images", str(FIGURES)] + METHODS[name][3] + tiny_teacher.data)
    return name, tmp, stats, tiny_teacher


def test_script_losses_are_finite(script):
    name, _, stats, _ = script
    train = {k: v for k, v in stats.items() if k.startswith("train_loss")}
    assert len(train) > 3 and all(math.isfinite(v) for v in train.values()), train


def test_checkpoint_holds_no_teacher_and_loads_into_baseline(script):
    name, tmp, stats, teacher = script
    path = tmp / "student" / "checkpoint.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for part in ("model", "extra"):
        assert not any(k.startswith("teacher.") for k in ckpt.get(part, {})), part
    # the model comes from the checkpoint (no --preset): baseline --eval finds the same AP
    again = baseline.main(teacher.data + ["--eval", "--resume", str(path)])
    assert again["AP"] == stats["test_AP"]


def test_visualize_writes_one_figure_per_image(script):
    name, tmp, _, teacher = script
    data = teacher.data
    val = build_dataset("val", data_cache=data[data.index("--data-cache") + 1],
                        synth_num_train=8, synth_num_val=4)
    files = sorted((tmp / "figs").iterdir())
    assert sorted(f.name for f in files) == sorted(f"{name}_{i}.png" for i in val.ids[:FIGURES])
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "RGB" and im.size[0] > 128          # larger than the 128 px image
            pixels = np.asarray(im)
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
