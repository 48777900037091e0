"""Forward + backward time of one training step of every DETR variant at a CPU-sized config.

    python bench/models.py                 # 1 thread, the extension's ops
    python bench/models.py --threads 2 --reps 7
    DETRKD_OPS=fallback python bench/models.py

A step is model(images, masks, targets) -> SetCriterion losses (the variant's own weights) ->
weighted sum -> backward, on a batch of 2 images of 128x128 with 4 and 1 boxes. The config is
small (tiny ResNet of width 16, hidden 64, 8 heads, 3+3 layers, FFN 128) so that it runs on a
laptop; the numbers are for information (issue 3), not a goal.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import ops  # noqa: E402
from common.criterion import build_criterion  # noqa: E402
from common.detr import build_model  # noqa: E402

SMALL = dict(backbone="tiny", width=16, hidden_dim=64, nheads=8, enc_layers=3, dec_layers=3,
             dim_feedforward=128, dropout=0.0)
CASES = [
    ("detr", dict(num_queries=50)),
    ("conditional_detr", dict(num_queries=50)),
    ("dab_detr", dict(num_queries=50)),
    ("deformable_detr", dict(num_queries=50)),
    ("deformable_detr", dict(num_queries=50, with_box_refine=True, two_stage=True)),
    ("dino", dict(num_queries=100, dn_number=20)),
]


def batch():
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
    images, masks, targets = batch()
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        losses = criterion(model(images, masks, targets), targets)
        loss = sum(v * criterion.weight_dict[k] for k, v in losses.items()
                   if k in criterion.weight_dict)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    return statistics.median(times[1:]), n_params


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), ops backend "
          f"{ops.backend('cpu')}, median of {args.reps} steps after a warm-up")
    print(f"{'variant':36s} {'fwd+bwd':>10s} {'params':>8s}")
    for variant, kw in CASES:
        name = variant + (" +refine +two-stage" if kw.get("two_stage") else "")
        t, n = time_step(variant, kw, args.reps)
        print(f"{name:36s} {t * 1e3:8.1f} ms {n / 1e6:7.2f}M", flush=True)


if __name__ == "__main__":
    main()
