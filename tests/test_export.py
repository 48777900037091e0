"""methods/export.py and the traceable deformable attention (common/ops.py): every variant goes
through torch.export, and each export gives the eager model's outputs on a real image.

Tiny models (hidden 32, 1+2 layers) on one 128x128 image of the embedded data set, padded onto a
larger canvas so the masks are exercised. Speed is measured in bench/models.py, not here.
"""
import importlib.util
import os
import sys

import pytest
import torch
from PIL import Image

from common import ops
from common.data import make_transforms
from common.synthetic import SYNTH_PRESETS, synthetic_image
from common.detr import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import export as E  # noqa: E402

SMALL = dict(backbone="tiny", width=8, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
             dim_feedforward=64, dropout=0.0, num_queries=20)
VARIANTS = [
    ("detr", {}),
    ("conditional_detr", {}),
    ("dab_detr", {}),
    ("deformable_detr", {}),
    ("deformable_detr", dict(with_box_refine=True)),
    ("deformable_detr", dict(with_box_refine=True, two_stage=True)),
    ("dino", dict(num_queries=30)),
]
IDS = ["detr", "conditional", "dab", "deformable", "deformable-refine", "deformable-two-stage",
       "dino"]
HAS_ONNX = importlib.util.find_spec("onnx") is not None and \
    importlib.util.find_spec("onnxscript") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


def real_inputs(height=144, width=160):
    """One validation image of the embedded set, preprocessed as in evaluation, on a canvas
    larger than the image (right and bottom padding, mask True there)."""
    pixels, _ = synthetic_image(SYNTH_PRESETS["easy"], 0, "val", 3)
    transform = make_transforms("val", 128)
    return E.example_inputs(transform, [Image.fromarray(pixels)], height, width)


def tiny(variant, kw, seed=0):
    torch.manual_seed(seed)
    model = build_model(variant, 5, **{**SMALL, **kw}).eval()
    with torch.no_grad():  # a trained-looking head: boxes and classes vary across queries
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@torch.no_grad()
def eager(model, images, masks):
    out = model(images, masks)
    return out["pred_logits"], out["pred_boxes"]


@pytest.mark.slow
@pytest.mark.parametrize("variant,kw", VARIANTS, ids=IDS)
def test_torch_export_traces_every_variant_and_matches_eager(variant, kw, tmp_path):
    model = tiny(variant, kw)
    images, masks = real_inputs()
    path = E.export(model, "exported", str(tmp_path / "m.pt2"), images, masks)
    program = torch.export.load(path).module()
    logits, boxes = program(images, masks)
    ref_logits, ref_boxes = eager(model, images, masks)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(boxes, ref_boxes, rtol=1e-5, atol=1e-5)
    # the deformable variants carry the custom op, not a pybind call the program cannot hold
    has_op = "detrkd.ms_deform_attn" in str(torch.export.load(path).graph)
    assert has_op == (variant in ("deformable_detr", "dino"))


def test_exported_program_runs_the_fallback_too(tmp_path, monkeypatch):
    """The same ExportedProgram, with the extension unavailable at run time, runs the
    pure-PyTorch fallback inside the op and still matches the eager model (itself on the
    fallback)."""
    model = tiny("deformable_detr", dict(with_box_refine=True, two_stage=True), seed=1)
    images, masks = real_inputs()
    path = E.export(model, "exported", str(tmp_path / "m.pt2"), images, masks)
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops, "_WARNED", True)
    logits, boxes = torch.export.load(path).module()(images, masks)
    ref_logits, ref_boxes = eager(model, images, masks)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(boxes, ref_boxes, rtol=1e-5, atol=1e-5)


def _op_inputs(dtype=torch.float64):
    shapes = torch.tensor([[6, 5], [3, 3]])
    hw = shapes.prod(1)
    start = torch.cumsum(hw, 0) - hw
    B, Q, H, Dh, L, P = 2, 7, 2, 4, 2, 3
    value = torch.randn(B, int(hw.sum()), H, Dh, dtype=dtype)
    loc = torch.rand(B, Q, H, L, P, 2, dtype=dtype) * 1.4 - 0.2  # some points off the map
    weights = torch.rand(B, Q, H, L, P, dtype=dtype).softmax(-1)
    return value, shapes, start, loc, weights


@pytest.mark.parametrize("backend", ["ext", "fallback"])
def test_custom_op_equals_ms_deform_attn_forward_and_backward(backend, monkeypatch):
    if backend == "fallback":
        monkeypatch.setattr(ops, "_C", None)
        monkeypatch.setattr(ops, "_WARNED", True)
    elif ops.backend("cpu") != "ext":
        pytest.skip("the extension is not built")
    value, shapes, start, loc, weights = _op_inputs()
    a = [t.clone().requires_grad_() for t in (value, loc, weights)]
    b = [t.clone().requires_grad_() for t in (value, loc, weights)]
    out_a = torch.ops.detrkd.ms_deform_attn(a[0], shapes, start, a[1], a[2])
    out_b = ops.ms_deform_attn(b[0], shapes, start, b[1], b[2])
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    grad = torch.randn_like(out_a)
    for x, y in zip(torch.autograd.grad(out_a, a, grad), torch.autograd.grad(out_b, b, grad)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_custom_op_passes_torch_library_opcheck():
    """torch.library.opcheck: the fake implementation's shapes, the autograd registration and
    the schema agree with the real op."""
    value, shapes, start, loc, weights = _op_inputs(torch.float32)
    torch.library.opcheck(torch.ops.detrkd.ms_deform_attn.default,
                          (value.requires_grad_(), shapes, start, loc.requires_grad_(),
                           weights.requires_grad_()))


@pytest.mark.parametrize("impl", ["op", "grid_sample"])
def test_traceable_entry_equals_the_op(impl):
    value, shapes, start, loc, weights = _op_inputs()
    with ops.trace_impl(impl):
        out = ops.ms_deform_attn_traceable(value, shapes, start, loc, weights,
                                           [tuple(s) for s in shapes.tolist()])
    torch.testing.assert_close(out, ops.ms_deform_attn(value, shapes, start, loc, weights),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="trace_impl must be"):
        ops.trace_impl("cuda")


@pytest.mark.slow
def test_torchscript_matches_eager(tmp_path):
    model = tiny("dino", dict(num_queries=30), seed=2)
    images, masks = real_inputs()
    path = E.export(model, "torchscript", str(tmp_path / "m.ts"), images, masks)
    logits, boxes = E.load_runner("torchscript", path)(images, masks)
    ref_logits, ref_boxes = eager(model, images, masks)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(boxes, ref_boxes, rtol=1e-5, atol=1e-5)
    assert "detrkd" not in str(torch.jit.load(path).inlined_graph)  # grid_sample, not our op


@pytest.mark.slow
@pytest.mark.skipif(not HAS_ONNX, reason="onnx / onnxscript are not installed")
def test_onnx_export_is_a_valid_model_that_matches_eager(tmp_path):
    import onnx
    model = tiny("deformable_detr", dict(with_box_refine=True, two_stage=True), seed=3)
    images, masks = real_inputs()
    path = E.export(model, "onnx", str(tmp_path / "m.onnx"), images, masks)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    assert "GridSample" in {n.op_type for n in proto.graph.node}
    if not HAS_ORT:
        pytest.skip("onnxruntime is not installed: the ONNX file is checked, not run")
    logits, boxes = E.load_runner("onnx", path)(images, masks)
    ref_logits, ref_boxes = eager(model, images, masks)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(boxes, ref_boxes, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_command_line_exports_a_checkpoint_and_checks_it(tmp_path, capsys):
    """A checkpoint saved the way training saves one ("model" + "args"), exported from the
    command line; the check against the eager model runs on real images."""
    model = tiny("deformable_detr", dict(with_box_refine=True, two_stage=True), seed=4)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(),
                "args": {"variant": "deformable_detr", "model_overrides": dict(
                    SMALL, with_box_refine=True, two_stage=True), "data": "synthetic",
                    "synth": "easy", "image_size": None, "max_size": None}}, ckpt)
    diff = E.main(["--checkpoint", str(ckpt), "--format", "exported", "--output",
                   str(tmp_path / "student.pt2"), "--batch-size", "2"])
    assert max(diff) < 1e-4
    out = capsys.readouterr().out
    assert "(2, 3, 213, 213)" in out  # the canvas: 128 * 1333 / 800 = 213, squared
    with pytest.raises(SystemExit):
        E.main(["--checkpoint", str(ckpt), "--format", "tflite", "--output", "x"])
