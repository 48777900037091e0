"""Export a trained detector of this project to TorchScript, torch.export or ONNX.

    python methods/export.py --checkpoint student.pth --format exported --output student.pt2
    python methods/export.py --checkpoint student.pth --format onnx --output student.onnx
    python methods/export.py --checkpoint student.pth --format torchscript --output student.ts

The exported graph maps ``images`` (B, 3, H, W) float32, normalised as in training, and ``masks``
(B, H, W) bool (True on padding) to ``pred_logits`` (B, Q, C) and ``pred_boxes`` (B, Q, 4)
(normalised cxcywh), the model's raw outputs; post-processing (top-k, scaling to pixels) stays
outside, as in common/criterion.py ``PostProcess``. The input size is fixed at export time:
by default a square canvas of the validation transform's longest side, which holds every
preprocessed image (pad it and set the mask, as common/data.py ``collate`` does); ``--height``
and ``--width`` choose another, ``--batch-size`` the batch.

Formats:
    exported     ``torch.export`` (an ExportedProgram, ``torch.export.load``). Multi-scale
                 deformable attention is the custom op ``detrkd::ms_deform_attn`` (common/ops.py,
                 the compiled kernels), so loading the file needs ``import common.ops`` first.
    onnx         ``torch.onnx.export`` (dynamo exporter); deformable attention in its pure
                 PyTorch form (``grid_sample`` per level), which ONNX has (GridSample, opset 16+).
    torchscript  ``torch.jit.trace``, deformable attention as ``grid_sample`` too: the file loads
                 without this project (``torch.jit.load``, also from C++).

Every export is checked against the eager model on a real image of the embedded data set (or
``--sample IMAGE``): the largest difference of logits and boxes is printed and must stay under
``--tolerance``. ONNX files are run with onnxruntime when it is installed.
"""
import argparse
import os
import sys

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cli, ops  # noqa: E402
from common.synthetic import SYNTH_PRESETS, synthetic_image  # noqa: E402
from common.engine import main_guard  # noqa: E402
from predict import load_for_inference, read_image, val_transform  # noqa: E402

FORMATS = ("torchscript", "exported", "onnx")


class ExportableDetector(nn.Module):
    """``(images, masks) -> (pred_logits, pred_boxes)``: the detector without its dict output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, masks):
        out = self.model(images, masks)
        return out["pred_logits"], out["pred_boxes"]


def canvas_size(args):
    """(H, W) holding every image the validation transform makes: its longest side, squared."""
    transform = val_transform(args)
    size = transform.transforms[0].max_size or max(transform.transforms[0].size)
    return int(size), int(size)


def example_inputs(transform, pil_images, height, width):
    """Preprocessed images padded onto an (H, W) canvas -> images (B,3,H,W), masks (B,H,W)."""
    images = torch.zeros(len(pil_images), 3, height, width)
    masks = torch.ones(len(pil_images), height, width, dtype=torch.bool)
    for i, im in enumerate(pil_images):
        x = transform(im)  # (3, h, w)
        h, w = x.shape[1:]
        if h > height or w > width:
            raise ValueError(f"a preprocessed image of {h}x{w} does not fit the {height}x{width} "
                             f"canvas; give a larger --height / --width")
        images[i, :, :h, :w] = x
        masks[i, :h, :w] = False
    return images, masks


def sample_images(sample, batch_size):
    """``batch_size`` real images: the file ``sample`` repeated, else validation images of the
    embedded data set (drawn directly, nothing is cached)."""
    if sample is not None:
        return [read_image(sample)] * batch_size
    return [Image.fromarray(synthetic_image(SYNTH_PRESETS["easy"], 0, "val", i)[0])
            for i in range(batch_size)]


def export(model, fmt, path, images, masks):
    """Write ``model`` (eval mode) traced on ``images``, ``masks`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    wrapper = ExportableDetector(model.eval()).eval()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with torch.no_grad():
        if fmt == "exported":
            with ops.trace_impl("op"):
                program = torch.export.export(wrapper, (images, masks), strict=False)
            torch.export.save(program, path)
        elif fmt == "torchscript":
            with ops.trace_impl("grid_sample"):
                traced = torch.jit.trace(wrapper, (images, masks), check_trace=False)
            traced.save(path)
        else:
            with ops.trace_impl("grid_sample"):
                torch.onnx.export(wrapper, (images, masks), path, dynamo=True,
                                  input_names=["images", "masks"],
                                  output_names=["pred_logits", "pred_boxes"], verbose=False,
                                  optimize=False)  # this torch's ONNX optimiser leaves a
                # dangling input behind the clamps of inverse_sigmoid (onnxruntime refuses it)
    return path


def load_runner(fmt, path):
    """A callable ``(images, masks) -> (pred_logits, pred_boxes)`` running the exported file;
    ONNX needs onnxruntime (ImportError otherwise)."""
    if fmt == "exported":
        module = torch.export.load(path).module()
        return lambda images, masks: module(images, masks)
    if fmt == "torchscript":
        module = torch.jit.load(path)
        return lambda images, masks: module(images, masks)
    if fmt == "onnx":
        import onnxruntime  # optional dependency
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run(images, masks):
            logits, boxes = session.run(None, {"images": images.numpy(),
                                               "masks": masks.numpy()})
            return torch.from_numpy(np.asarray(logits)), torch.from_numpy(np.asarray(boxes))
        return run
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


@torch.no_grad()
def compare(model, runner, images, masks):
    """Largest |difference| of (logits, boxes) between the eager model and ``runner``."""
    ref_logits, ref_boxes = ExportableDetector(model.eval())(images, masks)
    logits, boxes = runner(images, masks)
    return (float((logits - ref_logits).abs().max()), float((boxes - ref_boxes).abs().max()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog=cli.epilog_from(__doc__),
                                     formatter_class=cli.HelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pth of this project")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True,
                        help="the file to write (torch.export files end in .pt2)")
    parser.add_argument("--height", type=int, default=None,
                        help="input height (default: the validation transform's longest side)")
    parser.add_argument("--width", type=int, default=None, help="input width (likewise)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=1)
    parser.add_argument("--sample", default=None,
                        help="an image to trace and check on (default: embedded data images)")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="largest allowed |exported - eager| of logits and boxes")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the comparison with the eager model")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, settings, _, _ = load_for_inference(args.checkpoint, "cpu")
    height, width = canvas_size(settings)
    height, width = args.height or height, args.width or width
    images, masks = example_inputs(val_transform(settings), sample_images(
        args.sample, args.batch_size), height, width)
    export(model, args.format, args.output, images, masks)
    print(f"{args.format}: {args.output} (input images {tuple(images.shape)}, masks "
          f"{tuple(masks.shape)}; {model.variant})")
    if not args.check:
        return None
    try:
        runner = load_runner(args.format, args.output)
    except ImportError:
        print("onnxruntime is not installed: the ONNX file was not run (pip install onnxruntime)")
        return None
    diff = compare(model, runner, images, masks)
    print(f"check against the eager model: max |diff| logits {diff[0]:.2e}, boxes {diff[1]:.2e}")
    if max(diff) > args.tolerance:
        raise ValueError(f"the exported model differs from the eager one by {max(diff):.2e} "
                         f"(> --tolerance {args.tolerance})")
    return diff


if __name__ == "__main__":
    main_guard(main)
