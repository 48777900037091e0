"""What every method script must satisfy, checked the same way for all four (the per-method
test files keep each method's maths):

  1. its losses are finite, and every loss it returns is weighted (a key of ``weight_dict``);
  2. the weighted loss sends gradients to the student and to the method's student-side modules,
     never to the teacher (frozen: no gradient, not even a zero one);
  3. the script's checkpoint holds no teacher entry; its "model" entry is, tensor for tensor
     (``torch.equal``), the student as training left it (captured from ``engine.train``), which
     the one iteration changed from its initial state; its "extra" entry is, likewise, the
     method's student-side state; ``methods/baseline.py --eval`` of it rebuilds a student that
     holds exactly these weights and writes the same detections (detections_val.json: image ids,
     categories, boxes and scores) as the script's final evaluation did;
  4. ``--visualize DIR --visualize-images N`` writes N figures ``<method>_<image_id>.png``;
  5. resuming is exact: 2 epochs in one go equal 1 epoch, then ``--resume`` for the second, in
     the final checkpoint's "model", "extra" (the student-side modules and buffers, G-DetKD's
     queue), "optimizer", "lr_scheduler" and "rng" entries (bit for bit) and in the log lines
     (losses and COCO stats per epoch, all but the timings).

All on the session's tiny teacher (conftest.py) and 8 embedded images, one iteration (two per
epoch for 5)."""
import contextlib
import copy
import importlib
import json
import math
from types import SimpleNamespace

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
# log entries that measure the machine, not the training: they differ between any two runs
MACHINE_KEYS = ("epoch_time_s", "train_iter_time_s", "train_peak_mem_mb")


def assert_same(got, want, where):
    """``got`` equals ``want`` exactly: tensors by dtype, shape and ``torch.equal`` (rtol 0,
    atol 0), dicts by keys, lists and tuples by length, anything else by ``==``; a difference
    names its place."""
    if isinstance(want, torch.Tensor) or isinstance(got, torch.Tensor):
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor), where
        assert (got.dtype, got.shape) == (want.dtype, want.shape), \
            f"{where}: {got.dtype} {tuple(got.shape)} != {want.dtype} {tuple(want.shape)}"
        assert torch.equal(got, want), \
            f"{where}: max |diff| {(got.double() - want.double()).abs().max().item():.3g}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got, key=str) == sorted(want, key=str), \
            f"{where}: keys {sorted(set(got) ^ set(want), key=str)} in one only"
        for k in want:
            assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: lengths"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def student_side(module):
    """Copies of a training module's state without the teacher's entries."""
    return {k: copy.deepcopy(v) for k, v in module.state_dict().items()
            if not k.startswith("teacher.")}


@contextlib.contextmanager
def recorded_training():
    """``engine.train`` (which every script calls) recording each call's module, its state when
    the call began (``before``) and when it returned (``after``): the list of calls."""
    calls, train = [], engine.train

    def recording(run, module):
        before = student_side(module)
        stats = train(run, module)
        calls.append(SimpleNamespace(module=module, before=before, after=student_side(module)))
        return stats
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "train", recording)
        yield calls


def split_state(state):
    """A training module's state as its checkpoint keeps it: "model" (the student's entries,
    without the prefix) and "extra" (the rest)."""
    return ({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")},
            {k: v for k, v in state.items() if not k.startswith("student.")})


def read_detections(path):
    with open(path) as f:
        return json.load(f)


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
    """One iteration of the method script, then --visualize of FIGURES validation images; the
    training module's states before and after ``engine.train``."""
    name = request.param
    tmp = tmp_path_factory.mktemp(name)
    module = importlib.import_module(name)
    with recorded_training() as calls:
        stats = module.main(["--preset", "cpu-tiny", "--teacher", tiny_teacher.path,
                             "--output-dir", str(tmp / "student"), "--visualize",
                             str(tmp / "figs"), "--visualize-images", str(FIGURES)] +
                            METHODS[name][3] + tiny_teacher.data)
    assert len(calls) == 1
    return name, tmp, stats, tiny_teacher, calls[0]


def test_script_losses_are_finite(script):
    name, _, stats, _, _ = script
    train = {k: v for k, v in stats.items() if k.startswith("train_loss")}
    assert len(train) > 3 and all(math.isfinite(v) for v in train.values()), train


def test_checkpoint_is_the_trained_student(script):
    name, tmp, _, _, trained = script
    ckpt = torch.load(tmp / "student" / "checkpoint.pth", map_location="cpu", weights_only=True)
    for part in ("model", "extra"):
        assert not any(k.startswith("teacher.") for k in ckpt.get(part, {})), part
    model, extra = split_state(trained.after)
    assert_same(ckpt["model"], model, "model")
    assert_same(ckpt["extra"], extra, "extra")
    # and that is not the initial student: the iteration moved the heads and most tensors
    initial, _ = split_state(trained.before)
    moved = [k for k, v in model.items() if not torch.equal(v, initial[k])]
    assert any(k.startswith("class_embed.") for k in moved), moved
    assert any(k.startswith("bbox_embed.") for k in moved), moved
    assert len(moved) > len(model) // 2, (len(moved), len(model))


def test_checkpoint_loads_into_baseline_with_the_same_detections(script):
    name, tmp, stats, teacher, _ = script
    path = tmp / "student" / "checkpoint.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # the model comes from the checkpoint (no --preset): baseline --eval rebuilds the student
    # with exactly its weights
    with recorded_training() as calls:
        again = baseline.main(teacher.data + ["--eval", "--resume", str(path), "--output-dir",
                                              str(tmp / "eval")])
    model, extra = split_state(calls[0].after)
    assert_same(model, ckpt["model"], "baseline's student")
    assert not any(k.startswith("student.") for k in extra)
    # and writes the detections the script's final evaluation wrote (same code, same weights:
    # the same numbers)
    want = read_detections(tmp / "student" / "detections_val.json")
    got = read_detections(tmp / "eval" / "detections_val.json")
    # --max-iters 1 evaluates one batch: 2 images, num_select (100) detections each
    assert len({d["image_id"] for d in want}) == 2 and len(want) == 200, len(want)
    assert len({d["category_id"] for d in want}) > 1
    assert [(d["image_id"], d["category_id"]) for d in got] == \
        [(d["image_id"], d["category_id"]) for d in want]
    np.testing.assert_array_equal(np.array([d["bbox"] + [d["score"]] for d in got]),
                                  np.array([d["bbox"] + [d["score"]] for d in want]))
    assert {k: again[k] for k in again} == {k: stats[f"test_{k}"] for k in again}
def test_visualize_writes_one_figure_per_image(script):
    name, tmp, _, teacher, _ = script
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


@pytest.mark.parametrize("name", sorted(METHODS))
def test_resume_equals_the_uninterrupted_run(name, tiny_teacher, tmp_path):
    """Two epochs in one go equal one epoch, then a resume for the second, bit for bit: the
    student, the method's student-side modules and buffers (G-DetKD's queue: filled in epoch 1,
    read in epoch 2), AdamW's moments and steps, the scheduler, every RNG stream, the log."""
    main = importlib.import_module(name).main
    argv = (["--preset", "cpu-tiny", "--teacher", tiny_teacher.path] + METHODS[name][3] +
            tiny_teacher.data + ["--max-iters", "2"])
    straight, split = tmp_path / "straight", tmp_path / "split"
    main(argv + ["--epochs", "2", "--output-dir", str(straight)])
    main(argv + ["--epochs", "1", "--output-dir", str(split)])
    first = torch.load(split / "checkpoint.pth", weights_only=True)
    main(argv + ["--epochs", "2", "--output-dir", str(split), "--resume",
                 str(split / "checkpoint.pth")])
    want = torch.load(straight / "checkpoint.pth", weights_only=True)
    got = torch.load(split / "checkpoint.pth", weights_only=True)
    assert (first["epoch"], got["epoch"], want["epoch"]) == (0, 1, 1)
    assert want["args"]["max_iters"] == 2
    for part in ("model", "extra", "optimizer", "lr_scheduler", "rng"):
        assert_same(got[part], want[part], part)
    # the second epoch did train: the resumed run did not just hand back the first checkpoint
    assert any(not torch.equal(v, first["model"][k]) for k, v in want["model"].items())
    if name == "gdetkd":
        assert len(want["extra"]["queue._extra_state"]["items"]) == 4   # 2 epochs x 2 iterations

    def lines(folder):
        with open(folder / "log.txt") as f:
            return [{k: v for k, v in json.loads(x).items() if k not in MACHINE_KEYS}
                    for x in f.read().splitlines()]
    log = lines(straight)
    assert [x["epoch"] for x in log] == [0, 1]
    assert all(math.isfinite(x["train_loss"]) for x in log)
    assert_same(lines(split), log, "log")
