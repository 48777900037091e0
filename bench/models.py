"""What distillation buys at inference: parameters, GFLOPs and latency of teacher against student.

    python bench/models.py                               # everything, 1 thread
    python bench/models.py --groups cpu --batch-sizes 1 8 --reps 7
    python bench/models.py --groups paper --paper-size 800 1333 --exported none
    python bench/models.py --train-step                  # forward + backward of a training step

Models (random weights: speed does not depend on them):
    cpu     the embedded data's teacher and student presets (common/cli.py "cpu-teacher",
            "cpu-student": Deformable DETR +refine +two-stage, tiny ResNets), 10 classes, on
            128x128 images (the embedded data's validation size).
    paper   each variant at its official settings with a ResNet-50 (the teacher the KD papers
            use) and the same with a ResNet-18 (their student), 91 classes, on ``--paper-size``.

Columns:
    params   every parameter of the model (M).
    GFLOPs   one image's forward pass at the stated size, counted by
             torch.utils.flop_counter.FlopCounterMode on fake tensors (nothing is computed).
             The counter does not see inside the deformable-attention op, so that op is counted
             analytically: 5 multiply-adds (4 bilinear corners + the attention weight) = 10 FLOPs
             per batch x query x head x head-channel x level x point; the sampling-weight
             arithmetic per point is left out. Norms, softmax and elementwise ops are not counted
             (FlopCounterMode counts matrix products and convolutions). FLOPs = 2 x
             multiply-adds: the GFLOPs the DETR papers quote (fvcore) count multiply-adds, so
             halve these to compare (DETR-R50 at 800x1333: 196 here, 86 in its paper, whose
             count leaves out attention).
    eager / exported   median latency (ms) of ``model(images, masks)`` under no_grad, batch 1
             and batch 8 (``--batch-sizes``), after one warm-up call; "exported" is the
             torch.export program (methods/export.py, the extension's kernels through the
             custom op) run through ``ExportedProgram.module()``.
The last lines give the student's speed-up over its teacher. Threads are fixed with --threads.
"""
import argparse
import os
import statistics
import sys
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "methods"))
from common import cli, ops  # noqa: E402
from common.criterion import build_criterion  # noqa: E402
from common.detr import CONFIGS, build_model  # noqa: E402
from export import ExportableDetector  # noqa: E402

PAPER_VARIANTS = [
    ("detr", {}),
    ("conditional_detr", {}),
    ("dab_detr", {}),
    ("deformable_detr", {}),
    ("deformable_detr", dict(with_box_refine=True, two_stage=True)),
    ("dino", {}),
]


@register_flop_formula(torch.ops.detrkd.ms_deform_attn)
def _ms_deform_attn_flops(value_shape, spatial_shapes_shape, level_start_index_shape,
                          locations_shape, weights_shape, *args, **kwargs) -> int:
    B, _, H, Dh = value_shape
    _, Q, _, L, P, _ = locations_shape
    return 10 * B * Q * H * Dh * L * P  # 5 multiply-adds per sample and channel


def model_specs(groups):
    """[(group, pair name, role, variant, overrides, num_classes)]."""
    specs = []
    if "cpu" in groups:
        for role, preset in (("teacher", "cpu-teacher"), ("student", "cpu-student")):
            p = cli.PRESETS[preset]
            cfg = CONFIGS[p["variant"]]()
            kw = {k: v for k, v in p.items() if hasattr(cfg, k) and k not in
                  ("variant", "backbone_weights", "lr", "lr_backbone", "lr_drop", "epochs",
                   "batch_size")}
            specs.append(("cpu", "cpu presets", role, p["variant"], kw, 10))
    if "paper" in groups:
        for variant, kw in PAPER_VARIANTS:
            name = variant + (" +refine +two-stage" if kw.get("two_stage") else "")
            specs.append(("paper", name, "teacher", variant, dict(kw, backbone="resnet50"), 91))
            specs.append(("paper", name, "student", variant, dict(kw, backbone="resnet18"), 91))
    return specs


def count_gflops(model, height, width):
    """Forward FLOPs of one image (see the module docstring), on fake tensors."""
    tracing = ops.tracing
    ops.tracing = lambda: True  # route deformable attention through the op the counter knows
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), FlopCounterMode(display=False) as fc:
            images = torch.empty(1, 3, height, width)
            masks = torch.zeros(1, height, width, dtype=torch.bool)
            model(images, masks)
    finally:
        ops.tracing = tracing
    return fc.get_total_flops() / 1e9


def median_ms(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.no_grad()
def latency(model, batch, height, width, reps, exported):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=g)
    masks = torch.zeros(batch, height, width, dtype=torch.bool)
    eager = median_ms(lambda: model(images, masks), reps)
    if not exported:
        return eager, None
    with ops.trace_impl("op"):
        program = torch.export.export(ExportableDetector(model), (images, masks), strict=False)
    module = program.module()
    return eager, median_ms(lambda: module(images, masks), reps)


def inference_table(args):
    groups = args.groups
    sizes = {"cpu": (128, 128), "paper": tuple(args.paper_size)}
    exported_groups = {"all": groups, "none": [], "cpu": ["cpu"]}[args.exported]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), ops backend "
          f"{ops.backend('cpu')}, median of {args.reps} calls after a warm-up, no_grad, "
          f"random weights and images")
    for group, size in sizes.items():
        if group in groups:
            print(f"{group}: images {size[0]}x{size[1]}, GFLOPs per image at that size")
    head = f"{'model':36s} {'role':8s} {'backbone':9s} {'params':>7s} {'GFLOPs':>7s}"
    for b in args.batch_sizes if args.latency else ():
        head += f" {'eager b' + str(b):>11s} {'export b' + str(b):>11s}"
    print(head + "   (latency in ms)")
    rows = {}
    for group, pair, role, variant, kw, num_classes in model_specs(groups):
        torch.manual_seed(0)
        model = build_model(variant, num_classes, **kw).eval()
        height, width = sizes[group]
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gflops = count_gflops(model, height, width)
        line = f"{pair:36s} {role:8s} {model.cfg.backbone:9s} {params:6.2f}M {gflops:7.2f}"
        times = {}
        for b in args.batch_sizes if args.latency else ():
            eager, exp = latency(model, b, height, width, args.reps, group in exported_groups)
            times[b] = (eager, exp)
            line += f" {eager:11.1f} {exp:11.1f}" if exp is not None else f" {eager:11.1f} {'-':>11s}"
        print(line, flush=True)
        rows[(group, pair, role)] = (params, gflops, times)
    print("student vs teacher (teacher / student): params, GFLOPs, eager latency per batch size")
    for (group, pair, role), (params, gflops, times) in rows.items():
        if role != "student" or (group, pair, "teacher") not in rows:
            continue
        t_params, t_gflops, t_times = rows[(group, pair, "teacher")]
        speed = ", ".join(f"b{b} {t_times[b][0] / times[b][0]:.2f}x" for b in times) or "-"
        print(f"  {pair:36s} params {t_params / params:.2f}x, GFLOPs {t_gflops / gflops:.2f}x, "
              f"latency {speed}")


# ------------------------------------------------------------------------------------------
# --train-step: forward + backward of one training step of every variant at a CPU-sized config
# (a batch of 2 images of 128x128 with 4 and 1 boxes; tiny ResNet of width 16, hidden 64,
# 8 heads, 3+3 layers, FFN 128)
# ------------------------------------------------------------------------------------------

SMALL = dict(backbone="tiny", width=16, hidden_dim=64, nheads=8, enc_layers=3, dec_layers=3,
             dim_feedforward=128, dropout=0.0)
STEP_CASES = [
    ("detr", dict(num_queries=50)),
    ("conditional_detr", dict(num_queries=50)),
    ("dab_detr", dict(num_queries=50)),
    ("deformable_detr", dict(num_queries=50)),
    ("deformable_detr", dict(num_queries=50, with_box_refine=True, two_stage=True)),
    ("dino", dict(num_queries=100, dn_number=20)),
]


def step_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 128, 128, generator=g)
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[1, :, 100:] = True
    targets = [dict(labels=torch.tensor([1, 2, 3, 4]),
                    boxes=torch.tensor([[.5, .5, .2, .3], [.3, .3, .1, .1], [.7, .6, .2, .2],
                                        [.2, .7, .15, .2]])),
               dict(labels=torch.tensor([0]), boxes=torch.tensor([[.4, .5, .3, .3]]))]
    return images, masks, targets


def time_step(variant, kw, reps):
    torch.manual_seed(0)
    model = build_model(variant, 10, **SMALL, **kw).train()
    criterion = build_criterion(model, 10)
    images, masks, targets = step_batch()

    def step():
        losses = criterion(model(images, masks, targets), targets)
        loss = sum(v * criterion.weight_dict[k] for k, v in losses.items()
                   if k in criterion.weight_dict)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return median_ms(step, reps), sum(p.numel() for p in model.parameters())


def train_step_table(args):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), ops backend "
          f"{ops.backend('cpu')}, median of {args.reps} steps after a warm-up")
    print(f"{'variant':36s} {'fwd+bwd':>10s} {'params':>8s}")
    for variant, kw in STEP_CASES:
        name = variant + (" +refine +two-stage" if kw.get("two_stage") else "")
        t, n = time_step(variant, kw, args.reps)
        print(f"{name:36s} {t:8.1f} ms {n / 1e6:7.2f}M", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--groups", nargs="+", choices=["cpu", "paper"], default=["cpu", "paper"])
    parser.add_argument("--batch-sizes", dest="batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--paper-size", dest="paper_size", type=int, nargs=2, default=[800, 1333],
                        metavar=("H", "W"), help="image size of the paper-sized models")
    parser.add_argument("--exported", choices=["all", "cpu", "none"], default="all",
                        help="which groups are also timed as torch.export programs")
    parser.add_argument("--no-latency", dest="latency", action="store_false",
                        help="parameters and GFLOPs only (no timing)")
    parser.add_argument("--train-step", dest="train_step", action="store_true",
                        help="instead: forward + backward time of one training step per variant")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.reps < 1:
        raise ValueError("--batch-sizes and --reps must be >= 1")
    torch.set_num_threads(args.threads)
    if args.train_step:
        train_step_table(args)
    else:
        inference_table(args)


if __name__ == "__main__":
    main()
