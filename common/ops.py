"""The four ops every DETR in this project runs, each with two backends.

    ms_deform_attn          multi-scale deformable attention (Deformable DETR, DINO)
    match_cost              DETR matching cost, class + L1 + GIoU, on each image's own block
    pairwise_giou           batched pairwise generalized IoU (and IoU) of xyxy boxes
    linear_sum_assignment   exact batched rectangular assignment (Hungarian matching)

Backends:
    "ext"       the compiled extension ``common._C`` (csrc/): CPU kernels always, CUDA kernels
                when it was built with CUDA.
    "fallback"  the pure-PyTorch (and scipy) code in this file: slow, but short and readable; it
                is the reference the tests hold the extension to.

The extension is used when it can be imported, else the fallback, with one warning naming the
reason. ``DETRKD_OPS=fallback`` forces the fallback, ``DETRKD_OPS=ext`` makes a missing
extension an error. ``python -m common.ops`` prints what is active.
"""
import os
import warnings

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["ms_deform_attn", "match_cost", "pairwise_giou", "linear_sum_assignment",
           "backend", "describe"]

# ------------------------------------------------------------------------------------------
# Backend selection
# ------------------------------------------------------------------------------------------

_MODE = os.environ.get("DETRKD_OPS", "auto").strip().lower() or "auto"
if _MODE not in ("auto", "ext", "fallback"):
    raise ValueError(f"DETRKD_OPS must be 'auto', 'ext' or 'fallback', got {_MODE!r}")

_C = None
_WHY_NOT = None
if _MODE == "fallback":
    _WHY_NOT = "DETRKD_OPS=fallback is set"
else:
    try:
        from common import _C  # noqa: F811
    except ImportError as e:  # not built, or built for another torch / Python
        _WHY_NOT = f"the extension common._C could not be imported ({e}); build it with " \
                   f"'python setup.py build_ext --inplace'"
        if _MODE == "ext":
            raise ImportError(f"DETRKD_OPS=ext but {_WHY_NOT}") from e
_WARNED = False


def _ext_for(device: torch.device):
    """The extension module if it can run on ``device``, else None (after one warning)."""
    global _WARNED
    if _C is not None and (device.type == "cpu" or (device.type == "cuda" and _C.with_cuda())):
        return _C
    if _C is not None:
        why = f"the extension was built without CUDA kernels; inputs are on {device}"
        if _MODE == "ext":
            raise RuntimeError(f"DETRKD_OPS=ext but {why}")
    else:
        why = _WHY_NOT
    if not _WARNED and _MODE != "fallback":
        warnings.warn(f"detrkd ops use the slow pure-PyTorch fallback: {why}", stacklevel=3)
        _WARNED = True
    return None


def backend(device="cpu") -> str:
    """'ext' or 'fallback': which backend the ops use for tensors on ``device``."""
    device = torch.device(device)
    ok = _C is not None and (device.type == "cpu" or (device.type == "cuda" and _C.with_cuda()))
    return "ext" if ok else "fallback"


def describe() -> str:
    lines = [f"detrkd ops (DETRKD_OPS={_MODE})"]
    if _C is None:
        lines.append(f"  extension: not used: {_WHY_NOT}")
    else:
        lines.append(f"  extension: {_C.__file__}")
        lines.append(f"  CUDA kernels built: {'yes' if _C.with_cuda() else 'no'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in __all__[:4]:
        lines.append(f"  {name:22s} " + ", ".join(f"{d}: {backend(d)}" for d in devices))
    lines.append(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), "
                 f"GPU available: {torch.cuda.is_available()}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Argument checks shared by both backends: clear Python errors, never a crash in a kernel.
# ------------------------------------------------------------------------------------------

def _check_tensor(name, x, ndim=None, last=None, floating=None, dtype=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in ((ndim,) if isinstance(ndim, int) else ndim):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if last is not None and x.shape[-1] != last:
        raise ValueError(f"{name} must have last dimension {last}, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")


def _check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("all inputs must be on one device, got " +
                         ", ".join(f"{n} on {d}" for n, d in devices.items()))


# ------------------------------------------------------------------------------------------
# Multi-scale deformable attention
# ------------------------------------------------------------------------------------------

def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
    """Multi-scale deformable attention core (Zhu et al., Deformable DETR, arXiv:2010.04159, eq. 2).

    Args:
        value:              (B, S, H, Dh) projected values of all levels, level l in rows
                            level_start_index[l] : level_start_index[l] + H_l * W_l, row-major.
        spatial_shapes:     (L, 2) int64, (H_l, W_l) of each level.
        level_start_index:  (L,) int64, exclusive cumulative sum of H_l * W_l.
        sampling_locations: (B, Q, H, L, P, 2) in (x, y) order, normalised to [0, 1] over each
                            level's (padded) map; points outside it read zeros.
        attention_weights:  (B, Q, H, L, P), normally softmaxed over L * P.
    Returns:
        (B, Q, H * Dh): sum over levels and points of weight x bilinear sample, exactly
        ``F.grid_sample(align_corners=False, padding_mode='zeros')`` semantics, NaN included:
        a NaN or infinite sampling location makes its query-head's output NaN (and its
        gradients those of grid_sample on the CPU), a NaN attention weight or value cell
        propagates; huge finite locations are outside the map and sample zero.

    spatial_shapes must hold positive sizes that add up to S (checked in exact integers, so
    sizes whose product overflows int64 are refused) and level_start_index their exclusive
    cumulative sum: ValueError otherwise. (A table on the GPU is not checked, as that would
    wait for the device; the CUDA kernels skip any level that does not fit inside value.)

    value, locations and weights share one dtype (fp32/fp64 on CPU; fp32/fp16/bf16, and fp64, on
    CUDA, with fp16/bf16 accumulated in fp32) and are differentiable. The extension's backward
    is deterministic on CPU (no atomics); on CUDA grad_value is summed with atomics, so its last
    bits vary from run to run, as with grid_sample.
    """
    _check_tensor("value", value, ndim=4, floating=True)
    _check_tensor("spatial_shapes", spatial_shapes, ndim=2, last=2, dtype=torch.int64)
    _check_tensor("level_start_index", level_start_index, ndim=1, dtype=torch.int64)
    _check_tensor("sampling_locations", sampling_locations, ndim=6, last=2, floating=True)
    _check_tensor("attention_weights", attention_weights, ndim=5, floating=True)
    B, S, H, Dh = value.shape
    L = spatial_shapes.shape[0]
    if level_start_index.shape[0] != L:
        raise ValueError(f"level_start_index has {level_start_index.shape[0]} entries but "
                         f"spatial_shapes has {L} levels")
    Bl, Q, Hl, Ll, P, _ = sampling_locations.shape
    if (Bl, Hl, Ll) != (B, H, L):
        raise ValueError(f"sampling_locations shape {tuple(sampling_locations.shape)} does not "
                         f"fit (B={B}, Q, H={H}, L={L}, P, 2) from value and spatial_shapes")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights shape {tuple(attention_weights.shape)} must be "
                         f"{tuple(sampling_locations.shape[:-1])} (B, Q, H, L, P)")
    if not (value.dtype == sampling_locations.dtype == attention_weights.dtype):
        raise TypeError(f"value, sampling_locations and attention_weights must share a dtype, "
                        f"got {value.dtype}, {sampling_locations.dtype}, "
                        f"{attention_weights.dtype}")
    _check_same_device(value=value, sampling_locations=sampling_locations,
                       attention_weights=attention_weights)
    ext = _ext_for(value.device)
    # Checking a level table that lives on the GPU would sync; the fallback reads it anyway, and
    # the CUDA kernels skip any level whose rows do not lie inside value's S rows.
    if spatial_shapes.device.type == "cpu" or ext is None:
        _check_level_table(spatial_shapes, level_start_index, S,
                           check_starts=level_start_index.device.type == "cpu" or ext is None)

    if ext is None:
        return ms_deform_attn_fallback(value, spatial_shapes, sampling_locations,
                                       attention_weights)
    if value.device.type == "cpu" and value.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"ms_deform_attn on CPU supports float32 and float64, got {value.dtype}")
    return _MSDeformAttnFunction.apply(
        value.contiguous(), spatial_shapes.to(value.device).contiguous(),
        level_start_index.to(value.device).contiguous(), sampling_locations.contiguous(),
        attention_weights.contiguous())


def _check_level_table(spatial_shapes, level_start_index, S, check_starts=True):
    """Every level must be a non-empty H x W map, the levels must fill value's S rows exactly, and
    level_start_index must be the exclusive cumulative sum of H * W. In Python integers, which
    do not overflow: (2^32, 2^32) has 2^64 cells, not the 0 that int64 arithmetic wraps it to."""
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist() if check_starts else None
    rows = 0  # cells of the levels so far
    for lvl, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            raise ValueError(f"spatial_shapes[{lvl}] must be a positive (H, W), got ({h}, {w})")
        if starts is not None and starts[lvl] != rows:
            raise ValueError(f"level_start_index {starts} is not the exclusive cumulative sum of "
                             f"H*W of spatial_shapes {shapes}: entry {lvl} must be {rows}")
        rows += h * w
        if rows > S:
            raise ValueError(f"value has S={S} rows but spatial_shapes {shapes} need more: "
                             f"levels 0..{lvl} alone have {rows} cells (H*W = {h * w} for "
                             f"level {lvl})")
    if rows != S:
        raise ValueError(f"value has S={S} rows but spatial_shapes {shapes} sum to {rows}")


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        output = _C.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_value, grad_loc, grad_attn = _C.ms_deform_attn_backward(
            *ctx.saved_tensors, grad_output.contiguous())
        return grad_value, None, None, grad_loc, grad_attn


def ms_deform_attn_fallback(value, spatial_shapes, sampling_locations, attention_weights):
    """Pure-PyTorch reference: one ``grid_sample`` per level (as the official repository's
    ``ms_deform_attn_core_pytorch``). Memory grows as B * H * Dh * Q * L * P. ``spatial_shapes``
    may also be a list of (H, W) ints (under tracing the tensor's values are unknown)."""
    B, S, H, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    shapes = [(int(h), int(w)) for h, w in (spatial_shapes.tolist() if isinstance(
        spatial_shapes, torch.Tensor) else spatial_shapes)]  # a list of (H, W) when traced
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # (B, h*w, H, Dh) -> (B*H, Dh, h, w)
        v = value_per_level[lvl].flatten(2).transpose(1, 2).reshape(B * H, Dh, h, w)
        # (B, Q, H, P, 2) -> (B*H, Q, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # -> (B*H, Dh, Q, P)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))
    # (B, Q, H, L, P) -> (B*H, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L * P)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1)  # (B*H, Dh, Q)
    out = out.view(B, H * Dh, Q).transpose(1, 2)  # (B, Q, H * Dh)
    # A NaN or infinite location samples NaN in grid_sample on the CPU; CUDA's grid_sample gives
    # 0 for an infinite one. 0, or NaN for such a location, added to its query-head's output
    # (outside autograd, so the gradients stay grid_sample's) makes both devices give NaN.
    poison = (sampling_locations - sampling_locations).detach().sum((-3, -2, -1))  # (B, Q, H)
    return (out.reshape(B, Q, H, Dh) + poison[..., None]).view(B, Q, H * Dh)


# ------------------------------------------------------------------------------------------
# Boxes: pairwise GIoU
# ------------------------------------------------------------------------------------------

def pairwise_giou(boxes1, boxes2, return_iou=False):
    """Generalized IoU (Rezatofighi et al., CVPR 2019) of every pair of xyxy boxes.

    boxes1 (N, 4) and boxes2 (M, 4) -> (N, M); or batched (B, N, 4), (B, M, 4) -> (B, N, M).
    With ``return_iou`` returns (giou, iou). Zero-size boxes give finite values (IoU 0); a box
    with a NaN coordinate gives NaN against every box. The result is float32 for half inputs
    (computed in fp32), else the input dtype.
    """
    _check_tensor("boxes1", boxes1, ndim=(2, 3), last=4, floating=True)
    _check_tensor("boxes2", boxes2, ndim=(2, 3), last=4, floating=True)
    if boxes1.dim() != boxes2.dim():
        raise ValueError(f"boxes1 and boxes2 must both be 2-D or both 3-D, got shapes "
                         f"{tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    if boxes1.dim() == 3 and boxes1.shape[0] != boxes2.shape[0]:
        raise ValueError(f"batch sizes differ: boxes1 {tuple(boxes1.shape)}, "
                         f"boxes2 {tuple(boxes2.shape)}")
    _check_same_device(boxes1=boxes1, boxes2=boxes2)
    unbatched = boxes1.dim() == 2
    a, b = (boxes1[None], boxes2[None]) if unbatched else (boxes1, boxes2)
    dtype = torch.promote_types(a.dtype, b.dtype)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    a, b = a.to(dtype), b.to(dtype)
    ext = _ext_for(a.device)
    if ext is None:
        giou, iou = pairwise_giou_fallback(a, b)
    else:
        giou, iou = ext.pairwise_giou(a.contiguous(), b.contiguous())
    if unbatched:
        giou, iou = giou[0], iou[0]
    return (giou, iou) if return_iou else giou


def pairwise_giou_fallback(a, b):
    """(B, N, 4), (B, M, 4) xyxy -> (giou, iou), each (B, N, M)."""
    area_a = (a[..., 2] - a[..., 0]).clamp(min=0) * (a[..., 3] - a[..., 1]).clamp(min=0)
    area_b = (b[..., 2] - b[..., 0]).clamp(min=0) * (b[..., 3] - b[..., 1]).clamp(min=0)
    a, b = a[:, :, None, :], b[:, None, :, :]  # (B, N, 1, 4), (B, 1, M, 4)
    inter_wh = (torch.minimum(a[..., 2:], b[..., 2:]) -
                torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = area_a[:, :, None] + area_b[:, None, :] - inter
    iou = inter / union.clamp(min=torch.finfo(union.dtype).tiny)
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) -
               torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    giou = iou - (hull - union) / hull.clamp(min=torch.finfo(hull.dtype).tiny)
    return giou, iou


# ------------------------------------------------------------------------------------------
# Matching cost
# ------------------------------------------------------------------------------------------

_CLASS_COSTS = {"focal": 0, "softmax": 1}


def _check_target_values(tgt_labels, num_targets, C):
    """The value checks of match_cost on CPU (the extension makes the same ones in C++)."""
    B, T = tgt_labels.shape
    if num_targets.device.type != "cpu" or B == 0:  # on CUDA these checks would sync
        return
    counts = num_targets.tolist()
    if min(counts) < 0 or max(counts) > T:
        raise ValueError(f"num_targets must lie in [0, T={T}], got {counts}")
    if T > 0:
        padded = torch.arange(T)[None, :] >= num_targets[:, None]  # (B, T)
        lo, hi = (int(v) for v in tgt_labels.masked_fill(padded, 0).aminmax())
        if lo < 0 or hi >= C:
            raise ValueError(f"tgt_labels must lie in [0, C={C}) for real targets, got "
                             f"min {lo}, max {hi}")


def match_cost(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets, *,
               class_cost="focal", w_class=2.0, w_bbox=5.0, w_giou=2.0, alpha=0.25, gamma=2.0):
    """The DETR matching cost (Carion et al., arXiv:2005.12872, eq. 1) on each image's own block.

    Args:
        pred_logits: (B, Q, C) class logits.
        pred_boxes:  (B, Q, 4) predicted boxes, normalised cxcywh.
        tgt_labels:  (B, T) int64 labels in [0, C), padded to T = max targets per image.
        tgt_boxes:   (B, T, 4) target boxes, normalised cxcywh, padded likewise.
        num_targets: (B,) int64, the number of real targets of each image (<= T).
        class_cost:  "focal", as Conditional DETR, DAB-DETR, Deformable DETR and DINO:
                     alpha * (1-p)^gamma * -log(p) - (1-alpha) * p^gamma * -log(1-p) with
                     p = sigmoid(logit of the target's class); or "softmax", as DETR:
                     -softmax(logits)[label].
        w_class, w_bbox, w_giou: weights of the class, L1 and -GIoU terms.
        alpha, gamma: the focal cost's parameters (Deformable DETR: 0.25 and 2).
    Returns:
        cost (B, Q, T): w_class * class + w_bbox * L1 - w_giou * GIoU; entries of padded
        targets (t >= num_targets[b]) are 0. float32, or float64 when the inputs are float64.
        On the CPU it is a view of target-major storage (``cost.transpose(1, 2)`` is
        contiguous): the kernel's own layout, and the one linear_sum_assignment solves DETR's
        T < Q problems in without a transpose. Use ``.contiguous()`` before ``.view()``.

    Only each image's own (Q, T) block is computed, never the (B*Q, sum T) matrix of the
    reference DETR matcher; the focal cost needs only the T logits of the targets' classes, the
    softmax cost one logsumexp per query. Inputs: float32/float64 on CPU (float16/bfloat16 are
    converted to float32); float32/float16/bfloat16/float64 on CUDA (half computed in float32).
    Mixed float dtypes are promoted to one. Zero-size boxes give finite costs. NaN in a box or
    in a logit the cost reads (the target's class for focal, any class for softmax) gives NaN
    costs, which linear_sum_assignment refuses, rather than a finite cost that could be matched.
    On CPU, num_targets outside [0, T] and labels of real targets outside [0, C) raise
    ValueError. On CUDA they are not checked (that would need a device sync): such an image's
    block, or such a target's column, is NaN instead, which linear_sum_assignment reports.
    """
    _check_tensor("pred_logits", pred_logits, ndim=3, floating=True)
    _check_tensor("pred_boxes", pred_boxes, ndim=3, last=4, floating=True)
    _check_tensor("tgt_labels", tgt_labels, ndim=2, dtype=torch.int64)
    _check_tensor("tgt_boxes", tgt_boxes, ndim=3, last=4, floating=True)
    _check_tensor("num_targets", num_targets, ndim=1, dtype=torch.int64)
    B, Q, C = pred_logits.shape
    T = tgt_labels.shape[1]
    if pred_boxes.shape[:2] != (B, Q):
        raise ValueError(f"pred_boxes shape {tuple(pred_boxes.shape)} must be (B={B}, Q={Q}, 4)")
    if tgt_boxes.shape[:2] != (B, T):
        raise ValueError(f"tgt_boxes shape {tuple(tgt_boxes.shape)} must be (B={B}, T={T}, 4) "
                         f"like tgt_labels {tuple(tgt_labels.shape)}")
    if num_targets.shape[0] != B:
        raise ValueError(f"num_targets has {num_targets.shape[0]} entries, expected B={B}")
    if class_cost not in _CLASS_COSTS:
        raise ValueError(f"class_cost must be one of {sorted(_CLASS_COSTS)}, got {class_cost!r}")
    _check_same_device(pred_logits=pred_logits, pred_boxes=pred_boxes, tgt_labels=tgt_labels,
                       tgt_boxes=tgt_boxes, num_targets=num_targets)
    ext = _ext_for(pred_logits.device)
    if ext is None:
        _check_target_values(tgt_labels, num_targets, C)
        return match_cost_fallback(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets,
                                   class_cost, w_class, w_bbox, w_giou, alpha, gamma)
    # One float dtype for the kernel: the promoted one (half only on CUDA).
    dtype = torch.promote_types(torch.promote_types(pred_logits.dtype, pred_boxes.dtype),
                                tgt_boxes.dtype)
    if pred_logits.device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    if not (pred_logits.dtype == pred_boxes.dtype == tgt_boxes.dtype == dtype):
        pred_logits, pred_boxes, tgt_boxes = (t.to(dtype)
                                              for t in (pred_logits, pred_boxes, tgt_boxes))
    return ext.match_cost(pred_logits.contiguous(), pred_boxes.contiguous(),
                          tgt_labels.contiguous(), tgt_boxes.contiguous(),
                          num_targets.contiguous(), _CLASS_COSTS[class_cost], float(w_class),
                          float(w_bbox), float(w_giou), float(alpha), float(gamma))


def _cxcywh_to_xyxy(b):
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def match_cost_fallback(pred_logits, pred_boxes, tgt_labels, tgt_boxes, num_targets,
                        class_cost="focal", w_class=2.0, w_bbox=5.0, w_giou=2.0, alpha=0.25,
                        gamma=2.0):
    """Compact eager reference: (B, Q, T) blocks, never the (B*Q, sum T) matrix.

    Same contract as match_cost (float64 in, float64 out; else float32). Invalid counts or labels,
    which match_cost checks on CPU only, give NaN as the CUDA kernel does.
    """
    dtype = torch.float64 if torch.float64 in (pred_logits.dtype, pred_boxes.dtype,
                                                tgt_boxes.dtype) else torch.float32
    logits = pred_logits.to(dtype)
    boxes, tgt = pred_boxes.to(dtype), tgt_boxes.to(dtype)
    B, Q, C = logits.shape
    T = tgt_labels.shape[1]
    label_ok = (tgt_labels >= 0) & (tgt_labels < C)  # (B, T)
    labels = torch.where(label_ok, tgt_labels, 0)[:, None, :].expand(B, Q, T)  # (B, Q, T)
    if class_cost == "focal":
        x = logits.gather(2, labels)  # only the T logits each query is matched against
        p, q = x.sigmoid(), (-x).sigmoid()  # p and 1 - p, each to full relative precision
        pos = alpha * q.pow(gamma) * -(p + 1e-8).log()
        neg = (1 - alpha) * p.pow(gamma) * -(q + 1e-8).log()
        cost_class = pos - neg
    else:
        cost_class = -logits.softmax(-1).gather(2, labels)
    cost_bbox = (boxes[:, :, None, :] - tgt[:, None, :, :]).abs().sum(-1)  # (B, Q, T)
    giou, _ = pairwise_giou_fallback(_cxcywh_to_xyxy(boxes), _cxcywh_to_xyxy(tgt))
    cost = w_class * cost_class + w_bbox * cost_bbox - w_giou * giou
    t = torch.arange(T, device=cost.device)
    real = t[None, None, :] < num_targets[:, None, None]  # (B, 1, T)
    cost = torch.where(real, cost, torch.zeros((), dtype=dtype, device=cost.device))
    bad = (real & ~label_ok[:, None, :]) | ((num_targets < 0) | (num_targets > T))[:, None, None]
    return cost.masked_fill(bad, float("nan"))


# ------------------------------------------------------------------------------------------
# Linear assignment
# ------------------------------------------------------------------------------------------

def linear_sum_assignment(cost, sizes=None, validate=True):
    """Exact minimum-cost assignment, batched and rectangular, like scipy's.

    Args:
        cost:  (N, M) or (B, N, M) float32/float64; rows are usually queries, columns targets.
        sizes: None (every column is real) or a sequence/CPU tensor of B ints, the number of real
               columns of each image (padded columns beyond it are ignored).
        validate: raise ValueError for a non-finite or infeasible cost. On CUDA this waits for
               the result (one device sync); pass False to keep the call asynchronous.
    Returns:
        for (N, M): (row_ind, col_ind), int64 tensors on cost's device, row_ind ascending, as
        ``scipy.optimize.linear_sum_assignment``; for (B, N, M): a list of B such tuples.

    The extension runs scipy's own algorithm (shortest augmenting path, Crouse 2016, float64
    duals) with scipy's tie order, so it returns scipy's assignment, ties included, not just an
    equally cheap one; images are solved in parallel (CPU threads; one CUDA block each). Half
    precision costs are solved in float32. Unlike scipy, +inf entries (forbidden pairs) are
    rejected too: mask them with a large finite cost. On the CPU the solver reads a contiguous
    cost or a transposed view of contiguous storage (match_cost's CPU output) as it is; other
    strides are copied first.
    """
    _check_tensor("cost", cost, ndim=(2, 3), floating=True)
    unbatched = cost.dim() == 2
    c = cost[None] if unbatched else cost
    B, N, M = c.shape
    if sizes is None:
        cols = [M] * B
    else:
        cols = [int(s) for s in (sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes)]
        if len(cols) != B:
            raise ValueError(f"sizes has {len(cols)} entries, expected one per image (B={B})")
        if any(s < 0 or s > M for s in cols):
            raise ValueError(f"sizes must lie in [0, M={M}], got {cols}")
    if c.dtype not in (torch.float32, torch.float64):
        c = c.float()
    ext = _ext_for(c.device)
    if ext is None:
        result = linear_sum_assignment_fallback(c, cols)
    elif c.device.type == "cpu":  # the per-image pairs straight from C++, validated there
        if not (c.is_contiguous() or c.transpose(1, 2).is_contiguous()):
            c = c.contiguous()  # (the solver reads both layouts, match_cost's is the second)
        result = ext.linear_sum_assignment_cpu(c, cols, validate)
    else:
        num_cols = torch.tensor(cols, dtype=torch.int64).to(c.device, non_blocking=True)
        # (B, K) each, K = min(N, M), -1 beyond each image's min(N, cols[b]) assignments
        row_ind, col_ind, status = ext.linear_sum_assignment(c.contiguous(), num_cols)
        if validate and bool(status.any()):
            bad = torch.nonzero(status).flatten().tolist()
            kind = {1: "contains NaN or inf", 2: "is infeasible"}[int(status[bad[0]])]
            raise ValueError(f"cost of image {bad[0]} {kind} (images with a problem: {bad})")
        K = min(N, M)
        result = [(r, q) if min(N, k) == K else (r[:min(N, k)], q[:min(N, k)])
                  for r, q, k in zip(row_ind.unbind(0), col_ind.unbind(0), cols)]
    return result[0] if unbatched else result


def linear_sum_assignment_fallback(cost, cols):
    """scipy.optimize.linear_sum_assignment, one image at a time (what DETR's matcher does)."""
    out = []
    host = cost.detach().to("cpu", torch.float64).numpy()
    for b, k in enumerate(cols):
        block = host[b, :, :k]
        if not np.isfinite(block).all():
            raise ValueError(f"cost of image {b} contains NaN or inf")
        r, c = scipy.optimize.linear_sum_assignment(block)
        out.append((torch.as_tensor(r, dtype=torch.int64, device=cost.device),
                    torch.as_tensor(c, dtype=torch.int64, device=cost.device)))
    return out


# ==========================================================================================
# Tracing and export: ms_deform_attn as a torch.library custom op
# ==========================================================================================
# torch.export cannot trace ``ms_deform_attn`` as it is: its argument checks read the values of
# ``spatial_shapes`` (a data-dependent guard), and the extension's pybind call is opaque to the
# tracer. Under tracing the model calls ``ms_deform_attn_traceable`` instead, which runs one of
#   "op"           the custom op ``torch.ops.detrkd.ms_deform_attn``: the extension's kernels (or
#                  the fallback) behind a fake (shape-only) implementation, with autograd; an
#                  ExportedProgram holding it needs ``import common.ops`` before it is loaded.
#                  The default for torch.export / torch.compile.
#   "grid_sample"  the pure-PyTorch formulation (``ms_deform_attn_fallback`` with the levels'
#                  (H, W) as Python ints): only standard ops, so ONNX and TorchScript files that
#                  need nothing from this project. The default under torch.jit.trace.
# ``with ops.trace_impl("grid_sample"): torch.onnx.export(...)`` picks one.

_TRACE_IMPL = None  # None: "op" under torch.export / torch.compile, "grid_sample" under jit.trace


def tracing() -> bool:
    """True while torch.export, torch.compile or torch.jit.trace is tracing the caller."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class trace_impl:
    """Context manager: the ms_deform_attn formulation that tracing records ("op" or
    "grid_sample"), e.g. ``with trace_impl("grid_sample"): torch.onnx.export(...)``."""

    def __init__(self, impl: str):
        if impl not in ("op", "grid_sample"):
            raise ValueError(f"trace_impl must be 'op' or 'grid_sample', got {impl!r}")
        self.impl = impl

    def __enter__(self):
        global _TRACE_IMPL
        self.previous, _TRACE_IMPL = _TRACE_IMPL, self.impl
        return self

    def __exit__(self, *exc):
        global _TRACE_IMPL
        _TRACE_IMPL = self.previous


@torch.library.custom_op("detrkd::ms_deform_attn", mutates_args=())
def _ms_deform_attn_op(value: torch.Tensor, spatial_shapes: torch.Tensor,
                       level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                       attention_weights: torch.Tensor) -> torch.Tensor:
    """The ms_deform_attn core on real tensors (the extension, else the fallback)."""
    ext = _ext_for(value.device)
    if ext is None:
        return ms_deform_attn_fallback(value, spatial_shapes, sampling_locations,
                                       attention_weights)
    return ext.ms_deform_attn_forward(value.contiguous(), spatial_shapes.contiguous(),
                                      level_start_index.contiguous(),
                                      sampling_locations.contiguous(),
                                      attention_weights.contiguous())


@_ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    # (B, S, H, Dh), (B, Q, H, L, P, 2) -> (B, Q, H * Dh); no value is read
    B, _, H, Dh = value.shape
    return value.new_empty(B, sampling_locations.shape[1], H * Dh)


def _ms_deform_attn_op_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@torch.library.custom_op("detrkd::ms_deform_attn_backward", mutates_args=())
def _ms_deform_attn_backward_op(value: torch.Tensor, spatial_shapes: torch.Tensor,
                                level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                                attention_weights: torch.Tensor, grad_output: torch.Tensor
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_value, grad_sampling_locations, grad_attention_weights) from the extension's
    kernel, an op of its own so that a traced backward (torch.compile training) holds it."""
    ext = _ext_for(value.device)
    if ext is None:
        raise RuntimeError("detrkd::ms_deform_attn_backward needs the compiled extension")
    return tuple(ext.ms_deform_attn_backward(
        value.contiguous(), spatial_shapes.contiguous(), level_start_index.contiguous(),
        sampling_locations.contiguous(), attention_weights.contiguous(),
        grad_output.contiguous()))


@_ms_deform_attn_backward_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
      grad_output):
    return (torch.empty_like(value), torch.empty_like(sampling_locations),
            torch.empty_like(attention_weights))


def _ms_deform_attn_op_backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
    if _ext_for(value.device) is not None:
        grad_value, grad_loc, grad_attn = torch.ops.detrkd.ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, locations, weights, grad_output)
    else:  # differentiate the fallback (here, above the op, autograd can record it)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
            out = ms_deform_attn_fallback(leaves[0], spatial_shapes, leaves[1], leaves[2])
            grad_value, grad_loc, grad_attn = torch.autograd.grad(out, leaves, grad_output)
    return grad_value, None, None, grad_loc, grad_attn


_ms_deform_attn_op.register_autograd(_ms_deform_attn_op_backward,
                                     setup_context=_ms_deform_attn_op_setup)


def ms_deform_attn_traceable(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, spatial_shapes_list=None):
    """``ms_deform_attn`` for tracing: the same contract, no checks that read tensor values.
    ``spatial_shapes_list`` (the levels' (H, W) as ints) is needed by the "grid_sample" form."""
    impl = _TRACE_IMPL or ("grid_sample" if torch.jit.is_tracing() else "op")
    if impl == "op":
        return torch.ops.detrkd.ms_deform_attn(value, spatial_shapes, level_start_index,
                                               sampling_locations, attention_weights)
    if spatial_shapes_list is None:
        raise ValueError("the grid_sample formulation under tracing needs spatial_shapes_list, "
                         "the levels' (H, W) as Python ints")
    return ms_deform_attn_fallback(value, spatial_shapes_list, sampling_locations,
                                   attention_weights)


# ------------------------------------------------------------------------------------------
# RoIAlign as two matrix products (G-DetKD's region features)
# ------------------------------------------------------------------------------------------
# Not one of the four DETR ops above: a single pure-PyTorch backend, held equal to
# torchvision.ops.roi_align(aligned=True) in value and feature gradient (tests/test_roi_align.py).

__all__ += ["roi_align_separable"]


def _axis_weights(start, bin_size, grid, size, out_size):
    """1-D RoIAlign weights along one axis: (R,out_size,size), row p holding the mean over the
    bin's ``grid`` samples of each sample's two linear-interpolation weights, with torchvision's
    border rules (a sample beyond [-1, size] counts 0; below 0 it reads cell 0; at or beyond
    size - 1 it reads cell size - 1). start, bin_size (R,) in feature-map pixels."""
    p = torch.arange(out_size, device=start.device, dtype=start.dtype)
    i = torch.arange(grid, device=start.device, dtype=start.dtype)
    coord = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]
             + (i[None, None, :] + 0.5) * bin_size[:, None, None] / grid)      # (R,out,grid)
    inside = ((coord >= -1.0) & (coord <= size)).to(coord.dtype)
    coord = coord.clamp(min=0.0)
    low = coord.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, torch.full_like(low, size - 1), low)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, torch.zeros_like(coord), coord - low.to(coord.dtype))
    w = torch.zeros(len(start), out_size, size, device=start.device, dtype=start.dtype)
    w.scatter_add_(2, low, (1.0 - frac) * inside / grid)
    w.scatter_add_(2, high, frac * inside / grid)
    return w


def roi_align_separable(features, rois, output_size, spatial_scale, sampling_ratio):
    """torchvision.ops.roi_align(features, rois, output_size, spatial_scale, sampling_ratio,
    aligned=True), computed as two matrix products per image; the same function, and the
    gradient to ``features`` is exact (no gradient to ``rois``, as in torchvision).

    Why: RoIAlign samples a regular grid_h x grid_w grid of points in each bin and interpolates
    bilinearly, and a bilinear weight is the product of a weight along y and one along x. So a
    pooled RoI is A_y (s,H) @ F (C,H,W) @ A_x^T (W,s), where row p of A_y averages the
    y-weights of bin p's samples (``_axis_weights``). torchvision's CPU backward recomputes
    every sample's interpolation for every channel, one channel at a time. At our shapes
    (hundreds of RoIs on small maps) that backward was the largest single cost of a G-DetKD
    training step on the CPU. The products here are matrix multiplications
    (bench/RESULTS.md appendix A4 has the timings).
    features (B,C,H,W), rois (R,5) [batch index, x1, y1, x2, y2] in image pixels, sampling_ratio
    > 0 (torchvision's adaptive -1 is not supported) -> (R,C,s,s)."""
    if sampling_ratio <= 0:
        raise ValueError(f"roi_align_separable needs sampling_ratio > 0, got {sampling_ratio}")
    B, C, H, W = features.shape
    s = output_size
    with torch.no_grad():
        r = rois.to(features.dtype)
        x1, y1 = r[:, 1] * spatial_scale - 0.5, r[:, 2] * spatial_scale - 0.5   # aligned=True
        x2, y2 = r[:, 3] * spatial_scale - 0.5, r[:, 4] * spatial_scale - 0.5
        a_y = _axis_weights(y1, (y2 - y1) / s, sampling_ratio, H, s)          # (R,s,H)
        a_x = _axis_weights(x1, (x2 - x1) / s, sampling_ratio, W, s)          # (R,s,W)
        image = rois[:, 0].long()
    pieces, order = [features.new_zeros(0, C, s, s)], [image.new_zeros(0)]
    for b in range(B):
        sel = (image == b).nonzero().flatten()
        if len(sel) == 0:
            continue
        n = len(sel)
        f = features[b].permute(1, 0, 2).reshape(H, C * W)                  # (H,C*W)
        t = (a_y[sel].reshape(n * s, H) @ f).view(n, s, C, W)                # (n,s_y,C,W)
        pooled = t @ a_x[sel].transpose(1, 2)[:, None]                       # (n,s_y,C,s_x)
        pieces.append(pooled.permute(0, 2, 1, 3))                             # (n,C,s_y,s_x)
        order.append(sel)
    order = torch.cat(order)
    if len(order) != len(rois):
        raise ValueError(f"rois hold batch indices outside [0, {B}): "
                         f"{sorted(set(image.tolist()) - set(range(B)))}")
    return torch.cat(pieces)[torch.argsort(order)]                           # (R,C,s,s)


if __name__ == "__main__":
    print(describe())
