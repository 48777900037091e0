"""match_cost and pairwise_giou: extension and fallback against an independent float64 reference.

The reference is built per image from torchvision.ops (box_convert, generalized_box_iou,
box_iou), torch.cdist and the plain focal / softmax formulas in float64; it never calls
common.ops. CUDA-marked tests run the same checks on the GPU (skipped without one).
"""
import math

import pytest
import torch
from torchvision.ops import box_convert, box_iou, generalized_box_iou

from common import ops

HAS_EXT_CPU = ops.backend("cpu") == "ext"
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


# ------------------------------------------------------------------------------------------
# Independent float64 reference
# ------------------------------------------------------------------------------------------

def reference_giou_iou(a, b):
    """(N, 4), (M, 4) xyxy float64 -> (giou, iou), torchvision's, plus the zero-area convention
    common.ops documents: where the union is 0 (two zero-area boxes), IoU = 0 and
    GIoU = -(hull - 0) / hull = -1, or 0 when the hull is empty too."""
    giou, iou = generalized_box_iou(a, b), box_iou(a, b)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    empty_union = (area_a[:, None] == 0) & (area_b[None, :] == 0)
    hull_w = torch.maximum(a[:, None, 2], b[None, :, 2]) - torch.minimum(a[:, None, 0], b[None, :, 0])
    hull_h = torch.maximum(a[:, None, 3], b[None, :, 3]) - torch.minimum(a[:, None, 1], b[None, :, 1])
    empty_hull = (hull_w * hull_h) == 0
    iou = torch.where(empty_union, 0.0, iou)
    giou = torch.where(empty_union, torch.where(empty_hull, 0.0, -1.0), giou)
    return giou, iou


def reference_cost(logits, pred_boxes, labels, tgt_boxes, num_targets, class_cost,
                   w_class, w_bbox, w_giou, alpha, gamma):
    """Per image, float64: w_class * class + w_bbox * L1(cxcywh) - w_giou * GIoU(xyxy)."""
    logits, pred_boxes, tgt_boxes = (t.detach().cpu().double()
                                     for t in (logits, pred_boxes, tgt_boxes))
    labels, num_targets = labels.cpu(), num_targets.cpu()
    B, Q, _ = logits.shape
    T = labels.shape[1]
    out = torch.zeros(B, Q, T, dtype=torch.float64)
    for b in range(B):
        k = int(num_targets[b])
        if k == 0:
            continue
        lab = labels[b, :k]
        if class_cost == "focal":
            p = torch.sigmoid(logits[b][:, lab])  # (Q, k)
            cls = (alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)
                   - (1 - alpha) * p ** gamma * -torch.log(1 - p + 1e-8))
        else:
            cls = -torch.softmax(logits[b], dim=-1)[:, lab]
        pb, tb = pred_boxes[b], tgt_boxes[b, :k]
        l1 = torch.cdist(pb, tb, p=1)
        giou, _ = reference_giou_iou(box_convert(pb, "cxcywh", "xyxy"),
                                     box_convert(tb, "cxcywh", "xyxy"))
        out[b, :, :k] = w_class * cls + w_bbox * l1 - w_giou * giou
    return out


def random_inputs(B, Q, C, T, num_targets, seed, device="cpu", dtype=torch.float32,
                  logit_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, Q, C, generator=g, dtype=torch.float64) * logit_scale
    def boxes(n):
        centre = torch.rand(B, n, 2, generator=g, dtype=torch.float64)
        size = torch.rand(B, n, 2, generator=g, dtype=torch.float64) * 0.5
        return torch.cat([centre, size], -1)
    pred_boxes, tgt_boxes = boxes(Q), boxes(T)
    labels = torch.randint(0, max(C, 1), (B, T), generator=g)
    num_targets = torch.tensor(num_targets, dtype=torch.int64)
    # Padding must be ignored whatever it holds: out-of-range labels and NaN boxes.
    pad = torch.arange(T)[None, :] >= num_targets[:, None]
    labels[pad] = -7
    tgt_boxes[pad] = float("nan")
    as_dev = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return (as_dev(logits), as_dev(pred_boxes), labels.to(device), as_dev(tgt_boxes),
            num_targets.to(device))


def random_weights(seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(3, generator=g) * 4 + 0.1).tolist()
    return dict(w_class=w[0], w_bbox=w[1], w_giou=w[2],
                alpha=float(torch.rand(1, generator=g) * 0.8 + 0.1))


def run(backend, inputs, **kw):
    if backend == "fallback":
        args = dict(class_cost="focal", w_class=2.0, w_bbox=5.0, w_giou=2.0, alpha=0.25,
                    gamma=2.0)
        args.update(kw)
        return ops.match_cost_fallback(*inputs, args["class_cost"], args["w_class"],
                                       args["w_bbox"], args["w_giou"], args["alpha"],
                                       args["gamma"])
    return ops.match_cost(*inputs, **kw)


BACKENDS = [pytest.param("ext", marks=pytest.mark.skipif(not HAS_EXT_CPU,
                                                         reason="extension not built")),
            "fallback"]


def assert_close_to_reference(cost, ref, dtype):
    assert torch.isfinite(cost).all()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(cost.cpu().double(), ref, rtol=tol, atol=tol * 10)


# ------------------------------------------------------------------------------------------
# match_cost on CPU: extension and fallback
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_match_cost_matches_reference(backend, class_cost, dtype, gamma):
    # ragged batch: an empty image, counts around the 8/16-lane vector boundaries, a full one
    counts = [3, 0, 7, 8, 9, 16, 17, 33]
    inputs = random_inputs(B=len(counts), Q=19, C=11, T=33, num_targets=counts, seed=1,
                           dtype=dtype)
    weights = random_weights(seed=int(gamma * 10) + len(class_cost))
    cost = run(backend, inputs, class_cost=class_cost, gamma=gamma, **weights)
    assert cost.shape == (len(counts), 19, 33)
    assert cost.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = reference_cost(*inputs, class_cost, gamma=gamma, **weights)
    assert_close_to_reference(cost, ref, dtype)
    assert (cost[1] == 0).all() and (cost[0, :, 3:] == 0).all()  # padded targets are 0
    if backend == "ext":  # the CPU kernel's target-major storage (read as is by the solver)
        assert cost.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
def test_match_cost_detr_sized(backend, class_cost):
    inputs = random_inputs(B=2, Q=300, C=91, T=37, num_targets=[37, 20], seed=2)
    cost = run(backend, inputs, class_cost=class_cost)
    ref = reference_cost(*inputs, class_cost, 2.0, 5.0, 2.0, 0.25, 2.0)
    assert_close_to_reference(cost, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
@pytest.mark.parametrize("Q", [1, 16, 33, 45])
def test_match_cost_shared_and_distinct_classes(backend, class_cost, Q):
    # The CPU kernel computes the class cost once per distinct class of an image and runs the
    # queries along 16-lane vectors in blocks of 32: one class for all targets, all classes
    # distinct, and a mix, with query counts that leave blocks part-filled.
    logits, pb, labels, tb, n = random_inputs(B=3, Q=Q, C=40, T=24, num_targets=[24, 24, 13],
                                              seed=21)
    labels[0] = 5                         # 24 targets of one class
    labels[1] = torch.randperm(40)[:24]   # 24 distinct classes
    labels[2, :13] = torch.tensor([3, 3, 7, 3, 0, 7, 7, 39, 0, 3, 12, 12, 3])
    inputs = (logits, pb, labels, tb, n)
    cost = run(backend, inputs, class_cost=class_cost)
    ref = reference_cost(*inputs, class_cost, 2.0, 5.0, 2.0, 0.25, 2.0)
    assert_close_to_reference(cost, ref, torch.float32)
    assert (cost[2, :, 13:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
def test_match_cost_extreme_logits(backend, class_cost):
    # |logit| up to 40: sigmoid saturates in float32, the 1e-8 inside the logs takes over
    inputs = random_inputs(B=2, Q=64, C=5, T=9, num_targets=[9, 4], seed=3, logit_scale=15.0)
    inputs[0].clamp_(-40, 40)
    cost = run(backend, inputs, class_cost=class_cost)
    ref = reference_cost(*inputs, class_cost, 2.0, 5.0, 2.0, 0.25, 2.0)
    assert_close_to_reference(cost, ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_match_cost_no_targets_at_all(backend):
    for T, counts in ((0, [0, 0]), (4, [0, 0])):
        inputs = random_inputs(B=2, Q=5, C=3, T=T, num_targets=counts, seed=4)
        cost = run(backend, inputs, class_cost="softmax")
        assert cost.shape == (2, 5, T) and (cost == 0).all()
    inputs = random_inputs(B=2, Q=0, C=3, T=4, num_targets=[4, 1], seed=4)  # no queries
    assert run(backend, inputs).shape == (2, 0, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
def test_match_cost_degenerate_boxes(backend, class_cost):
    inputs = list(random_inputs(B=1, Q=6, C=4, T=5, num_targets=[5], seed=5))
    pb, tb = inputs[1], inputs[3]
    pb[0, 0, 2:] = 0          # a point
    pb[0, 1, 2] = 0           # zero width
    pb[0, 2, 3] = 0           # zero height
    pb[0, 3] = tb[0, 0]       # equal to a target
    tb[0, 1, 2:] = 0          # a zero-size target...
    tb[0, 1, :2] = pb[0, 0, :2]  # ...on the zero-size prediction: empty union AND empty hull
    tb[0, 2, 2:] = 0          # another point, elsewhere: empty union, non-empty hull
    cost = run(backend, inputs, class_cost=class_cost)
    ref = reference_cost(*inputs, class_cost, 2.0, 5.0, 2.0, 0.25, 2.0)
    assert_close_to_reference(cost, ref, torch.float32)


@pytest.mark.skipif(not HAS_EXT_CPU, reason="extension not built")
def test_match_cost_half_inputs_on_cpu_are_computed_in_float32():
    inputs = random_inputs(B=2, Q=8, C=6, T=3, num_targets=[3, 2], seed=6, dtype=torch.bfloat16)
    cost = ops.match_cost(*inputs)
    assert cost.dtype == torch.float32
    ref = reference_cost(*inputs, "focal", 2.0, 5.0, 2.0, 0.25, 2.0)  # from the bf16 values
    assert_close_to_reference(cost, ref, torch.float32)


# ------------------------------------------------------------------------------------------
# pairwise_giou
# ------------------------------------------------------------------------------------------

def random_xyxy(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(*shape, 2, generator=g, dtype=torch.float64)
    wh = torch.rand(*shape, 2, generator=g, dtype=torch.float64) * 0.5
    return torch.cat([xy, xy + wh], -1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_giou_matches_torchvision(device, dtype):
    a, b = random_xyxy(37, seed=7), random_xyxy(21, seed=8)
    giou, iou = ops.pairwise_giou(a.to(device, dtype), b.to(device, dtype), return_iou=True)
    assert giou.shape == (37, 21) and giou.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(giou.cpu().double(), generalized_box_iou(a, b), rtol=tol, atol=tol)
    torch.testing.assert_close(iou.cpu().double(), box_iou(a, b), rtol=tol, atol=tol)

    A, Bx = random_xyxy(3, 17, seed=9), random_xyxy(3, 29, seed=10)  # batched
    giou, iou = ops.pairwise_giou(A.to(device, dtype), Bx.to(device, dtype), return_iou=True)
    assert giou.shape == (3, 17, 29)
    for i in range(3):
        torch.testing.assert_close(giou[i].cpu().double(), generalized_box_iou(A[i], Bx[i]),
                                   rtol=tol, atol=tol)
        torch.testing.assert_close(iou[i].cpu().double(), box_iou(A[i], Bx[i]), rtol=tol,
                                   atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_pairwise_giou_degenerate_boxes(device):
    a = torch.tensor([[0.2, 0.2, 0.2, 0.2],    # a point
                      [0.1, 0.1, 0.1, 0.5],    # a vertical segment
                      [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64)
    b = torch.tensor([[0.2, 0.2, 0.2, 0.2],    # the same point
                      [0.6, 0.6, 0.6, 0.6],    # another point
                      [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    giou, iou = ops.pairwise_giou(a.to(device), b.to(device), return_iou=True)
    assert torch.isfinite(giou).all() and torch.isfinite(iou).all()
    ref_giou, ref_iou = reference_giou_iou(a, b)
    torch.testing.assert_close(giou.cpu(), ref_giou)
    torch.testing.assert_close(iou.cpu(), ref_iou)
    # by hand: point vs same point 0, point vs other point -1, box inside the unit box: 1/4
    assert giou[0, 0] == 0 and giou[0, 1] == -1 and iou[2, 2] == 0.25


def test_pairwise_giou_fallback_matches_torchvision():
    A, Bx = random_xyxy(2, 9, seed=11), random_xyxy(2, 13, seed=12)
    giou, iou = ops.pairwise_giou_fallback(A, Bx)
    for i in range(2):
        torch.testing.assert_close(giou[i], generalized_box_iou(A[i], Bx[i]))
        torch.testing.assert_close(iou[i], box_iou(A[i], Bx[i]))


# ------------------------------------------------------------------------------------------
# NaN in, NaN out: a broken prediction must reach linear_sum_assignment's NaN check instead of
# being matched with a finite (or the cheapest) cost
# ------------------------------------------------------------------------------------------

NAN = float("nan")


def nan_case(dtype, class_cost, device="cpu"):
    """Inputs with NaN in one logit, one predicted box, one target box, and the entries of the
    (B, Q, T) cost that must be NaN."""
    logits, pb, labels, tb, n = random_inputs(B=2, Q=40, C=6, T=5, num_targets=[5, 3], seed=31,
                                              dtype=torch.float64)
    labels[0, :5] = torch.tensor([0, 1, 2, 1, 4])
    logits[0, 3, 1] = NAN  # the logit of the class of image 0's targets 1 and 3
    pb[0, 7, 2] = NAN      # a predicted width
    pb[1, 35, 0] = NAN     # a predicted centre, in the second block of 32 queries
    tb[1, 2, 3] = NAN      # a real target's height
    expected = torch.zeros(2, 40, 5, dtype=torch.bool)
    if class_cost == "focal":
        expected[0, 3, [1, 3]] = True  # the focal cost reads only the target's class logit
    else:
        expected[0, 3, :5] = True      # softmax normalises over all of the query's logits
    expected[0, 7, :5] = True
    expected[1, 35, :3] = True
    expected[1, :, 2] = True
    as_dev = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    inputs = (as_dev(logits), as_dev(pb), labels.to(device), as_dev(tb), n.to(device))
    return inputs, expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_cost,gamma", [("focal", 2.0), ("focal", 1.5), ("softmax", 2.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_match_cost_nan_inputs_give_nan(backend, class_cost, gamma, dtype):
    inputs, expected = nan_case(dtype, class_cost)
    cost = run(backend, inputs, class_cost=class_cost, gamma=gamma)
    assert torch.equal(cost.isnan(), expected), torch.nonzero(cost.isnan() != expected).tolist()
    ref = reference_cost(*inputs, class_cost, 2.0, 5.0, 2.0, 0.25, gamma)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(cost.double()[~expected], ref[~expected], rtol=tol, atol=tol * 10)
    # what the matcher does next: refuse the first image with a NaN
    sizes = inputs[4].tolist()
    with pytest.raises(ValueError, match="cost of image 0 contains NaN or inf"):
        ops.linear_sum_assignment_fallback(cost, sizes)
    if HAS_EXT_CPU:
        with pytest.raises(ValueError, match="cost of image 0 contains NaN or inf"):
            ops.linear_sum_assignment(cost, sizes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
def test_match_cost_infinite_logits_stay_finite(backend, class_cost):
    """+-inf logits are not NaN: the focal cost saturates (as the fallback's sigmoid does) and
    the softmax cost of a query with one +inf logit is NaN in both backends (inf - inf)."""
    logits, pb, labels, tb, n = random_inputs(B=1, Q=4, C=3, T=2, num_targets=[2], seed=32)
    labels[0] = torch.tensor([0, 2])
    logits[0, 1, 0], logits[0, 2, 2] = float("inf"), float("-inf")
    cost = run(backend, (logits, pb, labels, tb, n), class_cost=class_cost)
    if class_cost == "focal":
        assert torch.isfinite(cost).all()
        ref = reference_cost(logits, pb, labels, tb, n, "focal", 2.0, 5.0, 2.0, 0.25, 2.0)
        torch.testing.assert_close(cost.double(), ref, rtol=2e-5, atol=2e-4)
    else:
        assert cost[0, 1].isnan().all() and torch.isfinite(cost[0, [0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_giou_nan_boxes_give_nan(dtype):
    a, b = random_xyxy(5, seed=33), random_xyxy(4, seed=34)
    a[1, 0] = NAN  # x1
    a[3, 3] = NAN  # y2
    b[2, 2] = NAN  # x2
    expected = torch.zeros(5, 4, dtype=torch.bool)
    expected[[1, 3]] = True
    expected[:, 2] = True
    results = [ops.pairwise_giou_fallback(a[None].to(dtype), b[None].to(dtype))]
    if HAS_EXT_CPU:
        results.append(ops.pairwise_giou(a.to(dtype), b.to(dtype), return_iou=True))
    ok_a, ok_b = [0, 2, 4], [0, 1, 3]
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for giou, iou in results:
        giou, iou = giou.reshape(5, 4).double(), iou.reshape(5, 4).double()
        assert torch.equal(giou.isnan(), expected) and torch.equal(iou.isnan(), expected)
        torch.testing.assert_close(giou[ok_a][:, ok_b], generalized_box_iou(a[ok_a], b[ok_b]),
                                   rtol=tol, atol=tol)
        torch.testing.assert_close(iou[ok_a][:, ok_b], box_iou(a[ok_a], b[ok_b]), rtol=tol,
                                   atol=tol)


# ------------------------------------------------------------------------------------------
# Bad input: a clear Python error naming the argument
# ------------------------------------------------------------------------------------------

def _good():
    return dict(zip(["pred_logits", "pred_boxes", "tgt_labels", "tgt_boxes", "num_targets"],
                    random_inputs(B=2, Q=4, C=3, T=2, num_targets=[2, 1], seed=13)))


def _with(**changes):
    args = _good()
    for k, f in changes.items():
        args[k] = f(args[k])
    return args


BAD_MATCH_COST = [
    ("pred_logits", dict(pred_logits=lambda t: t[0])),                          # rank
    ("pred_logits", dict(pred_logits=lambda t: t.long())),                      # dtype
    ("pred_boxes", dict(pred_boxes=lambda t: t[:, :3])),                        # Q differs
    ("pred_boxes", dict(pred_boxes=lambda t: t[..., :3])),                      # not 4 coords
    ("tgt_labels", dict(tgt_labels=lambda t: t.int())),                         # dtype
    ("tgt_boxes", dict(tgt_boxes=lambda t: torch.cat([t, t], 1))),              # T differs
    ("tgt_boxes", dict(tgt_boxes=lambda t: t[:1])),                             # B differs
    ("num_targets", dict(num_targets=lambda t: torch.cat([t, t]))),             # B differs
    ("num_targets", dict(num_targets=lambda t: t + 1)),                         # > T
    ("num_targets", dict(num_targets=lambda t: t - 2)),                         # < 0
    ("tgt_labels", dict(tgt_labels=lambda t: t.fill_(3))),                      # label == C
    ("tgt_labels", dict(tgt_labels=lambda t: t.fill_(-1))),                     # label < 0
    ("tgt_boxes", dict(tgt_boxes=lambda t: t.to("meta"))),                      # devices differ
]


@pytest.mark.parametrize("name,change", BAD_MATCH_COST)
def test_match_cost_bad_input_names_the_argument(name, change):
    with pytest.raises((ValueError, TypeError), match=name):
        ops.match_cost(**_with(**change))


def test_match_cost_unknown_class_cost():
    with pytest.raises(ValueError, match="class_cost"):
        ops.match_cost(**_good(), class_cost="sigmoid")


@pytest.mark.skipif(not HAS_EXT_CPU, reason="extension not built")
def test_extension_checks_values_when_called_directly():
    args = _good()
    args["tgt_labels"][0, 0] = 99
    with pytest.raises(ValueError, match="tgt_labels"):
        ops._C.match_cost(*args.values(), 0, 2.0, 5.0, 2.0, 0.25, 2.0)
    args = _good()
    args["num_targets"][1] = 5
    with pytest.raises(ValueError, match="num_targets"):
        ops._C.match_cost(*args.values(), 1, 2.0, 5.0, 2.0, 0.25, 2.0)


@pytest.mark.parametrize("a,b,name", [
    (torch.rand(3, 5), torch.rand(3, 4), "boxes1"),             # not 4 coords
    (torch.rand(3, 4), torch.rand(2, 3, 4), "boxes1 and boxes2"),  # ranks differ
    (torch.rand(2, 3, 4), torch.rand(3, 3, 4), "batch"),         # batch sizes differ
    (torch.rand(3, 4), torch.ones(3, 4, dtype=torch.int64), "boxes2"),  # dtype
])
def test_pairwise_giou_bad_input(a, b, name):
    with pytest.raises((ValueError, TypeError), match=name):
        ops.pairwise_giou(a, b)


# ------------------------------------------------------------------------------------------
# CUDA (run when a GPU is present; skipped otherwise)
# ------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma", [2.0, 1.5])
def test_match_cost_cuda_matches_reference(class_cost, dtype, gamma):
    counts = [3, 0, 7, 8, 9, 16, 17, 33, 40]
    inputs = random_inputs(B=len(counts), Q=45, C=91, T=40, num_targets=counts, seed=14,
                           device="cuda", dtype=dtype)
    weights = random_weights(seed=15)
    cost = ops.match_cost(*inputs, class_cost=class_cost, gamma=gamma, **weights)
    assert cost.device.type == "cuda"
    assert cost.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = reference_cost(*inputs, class_cost, gamma=gamma, **weights)  # from the rounded inputs
    assert_close_to_reference(cost, ref, dtype if dtype == torch.float64 else torch.float32)
    # and equal to the CPU extension on the same values
    if HAS_EXT_CPU:
        cpu_inputs = [t.cpu().float() if t.is_floating_point() and dtype != torch.float64
                      else t.cpu() for t in inputs]
        cpu = ops.match_cost(*cpu_inputs, class_cost=class_cost, gamma=gamma, **weights)
        torch.testing.assert_close(cost.cpu(), cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("class_cost", ["focal", "softmax"])
def test_match_cost_cuda_edge_cases(class_cost):
    inputs = list(random_inputs(B=1, Q=6, C=4, T=5, num_targets=[5], seed=16, device="cuda"))
    inputs[1][0, 0, 2:] = 0
    inputs[3][0, 1, 2:] = 0
    inputs[3][0, 1, :2] = inputs[1][0, 0, :2]
    cost = ops.match_cost(*inputs, class_cost=class_cost)
    assert_close_to_reference(cost, reference_cost(*inputs, class_cost, 2.0, 5.0, 2.0, 0.25, 2.0),
                              torch.float32)
    for T, counts in ((0, [0, 0]), (4, [0, 0])):
        inputs = random_inputs(B=2, Q=5, C=3, T=T, num_targets=counts, seed=17, device="cuda")
        cost = ops.match_cost(*inputs, class_cost=class_cost)
        assert cost.shape == (2, 5, T) and (cost == 0).all()


@pytest.mark.cuda
def test_match_cost_cuda_bad_values_give_nan():
    # Not checked on the host (that would sync); the kernel must not read out of bounds and must
    # not return a plausible number.
    logits, pb, labels, tb, n = random_inputs(B=3, Q=4, C=3, T=2, num_targets=[2, 1, 2], seed=18,
                                              device="cuda")
    labels[0, 1] = 3          # label == C for a real target
    n[2] = 3                  # more targets than T
    cost = ops.match_cost(logits, pb, labels, tb, n).cpu()
    assert torch.isnan(cost[0, :, 1]).all() and torch.isfinite(cost[0, :, 0]).all()
    assert torch.isfinite(cost[1]).all()
    assert torch.isnan(cost[2]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("class_cost,gamma", [("focal", 2.0), ("focal", 1.5), ("softmax", 2.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_match_cost_cuda_nan_inputs_give_nan(class_cost, gamma, dtype):
    inputs, expected = nan_case(dtype, class_cost, device="cuda")
    cost = ops.match_cost(*inputs, class_cost=class_cost, gamma=gamma)
    assert torch.equal(cost.isnan().cpu(), expected)
    with pytest.raises(ValueError, match="cost of image 0 contains NaN or inf"):
        ops.linear_sum_assignment(cost, inputs[4].tolist())


@pytest.mark.cuda
def test_pairwise_giou_cuda_nan_boxes_give_nan():
    a, b = random_xyxy(5, seed=33), random_xyxy(4, seed=34)
    a[1, 0] = NAN
    b[2, 2] = NAN
    giou, iou = ops.pairwise_giou(a.cuda(), b.cuda(), return_iou=True)
    for t in (giou.cpu(), iou.cpu()):
        assert t[1].isnan().all() and t[:, 2].isnan().all()
        assert t.isnan().sum() == 4 + 5 - 1


@pytest.mark.cuda
def test_match_cost_cuda_uses_current_device_and_stream():
    inputs = random_inputs(B=2, Q=8, C=5, T=3, num_targets=[3, 1], seed=19, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        cost = ops.match_cost(*inputs)
    stream.synchronize()
    ref = reference_cost(*inputs, "focal", 2.0, 5.0, 2.0, 0.25, 2.0)
    assert_close_to_reference(cost, ref, torch.float32)
    assert not math.isnan(float(cost.sum()))
