"""The anchors bench/kernels.py measures our ops against: what a user would run instead.

Matching:
    detr_matcher          the HungarianMatcher of DETR / Deformable DETR as their repositories
                          write it: predictions flattened to (B*Q, .), all targets of the batch
                          concatenated, one dense (B*Q, sum T) cost with torch.cdist(p=1) and
                          torchvision's generalized_box_iou, then .cpu() and scipy on each image's
                          diagonal block. B-1 of every B entries are computed and thrown away.
    compact_matcher       the "compact" eager path: each image's own (Q, T_b) block only
                          (broadcast L1, torchvision GIoU), then scipy per image.
    scipy_loop            scipy.optimize.linear_sum_assignment image by image.
    lapx_batch_solvers    lapx's batched rectangular solvers (lapjvh_batch / lapjvr_batch), the
                          fastest batched CPU solvers we know of, when lapx is installed.

Deformable attention:
    official_msda         the official Deformable-DETR CUDA kernel, when
                          bench/build_official_msda.sh has built it in the git-ignored folder
                          bench/_anchors/Deformable-DETR.
                          Its code is never committed here; we only load the built module.
The grid_sample fallback is common.ops.ms_deform_attn_fallback and is not repeated here.

Class costs (Carion et al. arXiv:2005.12872 eq. 1; Zhu et al. arXiv:2010.04159 appendix):
    "softmax" (DETR):      cost_class = -softmax(logits)[label]
    "focal" (Deformable DETR, DINO, ...): with p = sigmoid(logit[label]),
        cost_class = alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))
The full cost is w_class * cost_class + w_bbox * L1(cxcywh) - w_giou * GIoU(xyxy).
"""
import glob
import os
import sys

import numpy as np
import scipy.optimize
import torch
from torchvision.ops import box_convert, generalized_box_iou

HERE = os.path.dirname(os.path.abspath(__file__))
OFFICIAL_MSDA_DIR = os.path.join(HERE, "_anchors", "Deformable-DETR", "models", "ops")


# ------------------------------------------------------------------------------------------
# Matching cost, the way the reference repositories compute it
# ------------------------------------------------------------------------------------------

def _class_cost(logits, labels, class_cost, alpha, gamma):
    """logits (N, C), labels (M,) -> (N, M) class cost of every prediction for every target."""
    if class_cost == "softmax":
        return -logits.softmax(-1)[:, labels]
    if class_cost == "focal":
        # Deformable DETR evaluates the focal terms for all C classes, then gathers the targets'.
        prob = logits.sigmoid()
        neg = (1 - alpha) * prob ** gamma * -(1 - prob + 1e-8).log()
        pos = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        return pos[:, labels] - neg[:, labels]
    raise ValueError(f"class_cost must be 'focal' or 'softmax', got {class_cost!r}")


def detr_matcher_cost(pred_logits, pred_boxes, targets, class_cost="focal", w_class=2.0,
                      w_bbox=5.0, w_giou=2.0, alpha=0.25, gamma=2.0):
    """The reference DETR cost on the whole batch at once.

    pred_logits (B, Q, C), pred_boxes (B, Q, 4) cxcywh, targets: list of B dicts with "labels"
    (T_b,) and "boxes" (T_b, 4) -> (B, Q, sum_b T_b); image b's own block is columns
    sum_{b'<b} T_b' : sum_{b'<=b} T_b'.
    """
    B, Q, _ = pred_logits.shape
    logits = pred_logits.flatten(0, 1)  # (B*Q, C)
    boxes = pred_boxes.flatten(0, 1)  # (B*Q, 4)
    tgt_labels = torch.cat([t["labels"] for t in targets])  # (sum T,)
    tgt_boxes = torch.cat([t["boxes"] for t in targets])  # (sum T, 4)
    cost_class = _class_cost(logits, tgt_labels, class_cost, alpha, gamma)
    cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
    cost_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                     box_convert(tgt_boxes, "cxcywh", "xyxy"))
    cost = w_bbox * cost_bbox + w_class * cost_class + w_giou * cost_giou  # (B*Q, sum T)
    return cost.view(B, Q, -1)


def scipy_loop(costs):
    """scipy.optimize.linear_sum_assignment on each (Q, T_b) block -> list of (rows, cols)
    int64 tensors. ``costs`` is a list of 2-D CPU arrays or tensors."""
    out = []
    for c in costs:
        r, k = scipy.optimize.linear_sum_assignment(np.asarray(c))
        out.append((torch.as_tensor(r, dtype=torch.int64), torch.as_tensor(k, dtype=torch.int64)))
    return out


@torch.no_grad()
def detr_matcher(pred_logits, pred_boxes, targets, **cost_kw):
    """DETR's HungarianMatcher.forward: full cost, one .cpu() (a device sync), split into the
    diagonal blocks, scipy per image -> list of B (query_idx, target_idx) int64 CPU tensors."""
    cost = detr_matcher_cost(pred_logits, pred_boxes, targets, **cost_kw).cpu()
    sizes = [len(t["boxes"]) for t in targets]
    return scipy_loop([c[b] for b, c in enumerate(cost.split(sizes, -1))])


def compact_costs(pred_logits, pred_boxes, targets, class_cost="focal", w_class=2.0, w_bbox=5.0,
                  w_giou=2.0, alpha=0.25, gamma=2.0, dtype=None):
    """Each image's own block only: list of B costs (Q, T_b), computed in ``dtype`` (default:
    the input dtype). In float64 this is the independent reference for our fp32 cost."""
    out = []
    for b, t in enumerate(targets):
        logits = pred_logits[b] if dtype is None else pred_logits[b].to(dtype)  # (Q, C)
        boxes = pred_boxes[b] if dtype is None else pred_boxes[b].to(dtype)  # (Q, 4)
        tgt = t["boxes"] if dtype is None else t["boxes"].to(dtype)  # (T_b, 4)
        cost_class = _class_cost(logits, t["labels"], class_cost, alpha, gamma)  # (Q, T_b)
        cost_bbox = (boxes[:, None, :] - tgt[None, :, :]).abs().sum(-1)  # (Q, T_b)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                   box_convert(tgt, "cxcywh", "xyxy"))
        out.append(w_class * cost_class + w_bbox * cost_bbox - w_giou * giou)
    return out


@torch.no_grad()
def compact_matcher(pred_logits, pred_boxes, targets, **cost_kw):
    """Compact eager cost per image, one transfer per image (as mmdetection's per-image
    assigner does), scipy per image -> list of B (query_idx, target_idx) int64 CPU tensors."""
    return scipy_loop([c.cpu() for c in compact_costs(pred_logits, pred_boxes, targets,
                                                        **cost_kw)])


# ------------------------------------------------------------------------------------------
# Third-party solvers and kernels, loaded only when present
# ------------------------------------------------------------------------------------------

def lapx_batch_solvers():
    """{name: solve(costs (B, N, M) float32 ndarray, n_threads) -> list of (rows, cols)}, and a
    reason string when lapx is missing (then the dict is empty).

    lapx installs a module named ``lap`` (as does the older ``lap`` package, which lacks the
    batch solvers). ``extend_cost=True`` lets the rectangular native path run without padding
    to a square matrix."""
    try:
        import lap
    except ImportError as e:
        return {}, f"lapx is not installed ({e}); pip install lapx"
    solvers = {}
    for name in ("lapjvh_batch", "lapjvr_batch"):
        fn = getattr(lap, name, None)
        if fn is None:
            continue

        def solve(costs, n_threads, fn=fn):
            rows, cols = fn(costs, extend_cost=True, return_cost=False, n_threads=n_threads)
            return list(zip(rows, cols))
        solvers[f"lapx {name}"] = solve
    if not solvers:
        return {}, (f"the installed 'lap' module ({getattr(lap, '__version__', '?')}) has no "
                    f"lapjvh_batch/lapjvr_batch: it is the old lap package, not lapx")
    return solvers, None


def official_msda():
    """The official Deformable-DETR op as a function with our signature
    ``f(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)``,
    differentiable in value, locations and weights; or (None, reason) when it is not built or
    cannot load. Only CUDA tensors (fp32/fp64) are accepted by that kernel."""
    built = glob.glob(os.path.join(OFFICIAL_MSDA_DIR, "MultiScaleDeformableAttention*.so"))
    if not built:
        return None, ("not built: put github.com/fundamentalvision/Deformable-DETR in "
                      "bench/_anchors/ and run bash bench/build_official_msda.sh")
    if OFFICIAL_MSDA_DIR not in sys.path:
        sys.path.insert(0, OFFICIAL_MSDA_DIR)
    try:
        import MultiScaleDeformableAttention as msda_ext
    except ImportError as e:  # built for another torch, or no CUDA runtime here
        return None, f"built but cannot be imported: {e}"

    im2col_step = 64  # the repository's default; it needs batch % min(batch, 64) == 0

    class OfficialMSDA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, start, loc, attn):
            ctx.save_for_backward(value, shapes, start, loc, attn)
            return msda_ext.ms_deform_attn_forward(value, shapes, start, loc, attn, im2col_step)

        @staticmethod
        def backward(ctx, grad_output):
            grads = msda_ext.ms_deform_attn_backward(*ctx.saved_tensors,
                                                     grad_output.contiguous(), im2col_step)
            grad_value, grad_loc, grad_attn = grads
            return grad_value, None, None, grad_loc, grad_attn

    def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return OfficialMSDA.apply(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights)
    return apply, None
