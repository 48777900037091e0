"""HungarianMatcher against an independent brute-force reference.

Reference: a float64 cost per image built from torch/torchvision primitives (sigmoid or softmax,
``torch.cdist(p=1)``, ``torchvision.ops.generalized_box_iou``) and solved by
``scipy.optimize.linear_sum_assignment``; i.e. what the official DETR matchers compute.
"""
import numpy as np
import pytest
import scipy.optimize
import torch
from torchvision.ops import box_convert, generalized_box_iou

from common.matcher import HungarianMatcher, pad_targets


def random_boxes(*shape):
    centre = torch.rand(*shape, 2) * 0.6 + 0.2
    size = torch.rand(*shape, 2) * 0.35 + 0.05
    return torch.cat([centre, size], -1)


def random_batch(sizes, Q, C):
    B = len(sizes)
    outputs = {"pred_logits": torch.randn(B, Q, C) * 2, "pred_boxes": random_boxes(B, Q)}
    targets = [{"labels": torch.randint(0, C, (n,)), "boxes": random_boxes(n)} for n in sizes]
    return outputs, targets


def reference_cost(logits, boxes, labels, tgt_boxes, class_cost, wc, wb, wg, alpha=0.25,
                   gamma=2.0):
    """(Q, C), (Q, 4), (T,), (T, 4) -> (Q, T) float64 numpy cost, DETR's formula."""
    logits, boxes, tgt_boxes = logits.double(), boxes.double(), tgt_boxes.double()
    if class_cost == "focal":
        p = logits.sigmoid()[:, labels]                                        # (Q, T)
        pos = alpha * (1 - p) ** gamma * -torch.log(p + 1e-8)
        neg = (1 - alpha) * p ** gamma * -torch.log(1 - p + 1e-8)
        c_class = pos - neg
    else:
        c_class = -logits.softmax(-1)[:, labels]
    c_bbox = torch.cdist(boxes, tgt_boxes, p=1)
    c_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                  box_convert(tgt_boxes, "cxcywh", "xyxy"))
    return (wc * c_class + wb * c_bbox + wg * c_giou).numpy()


def check_against_reference(indices, outputs, targets, class_cost, weights):
    Q = outputs["pred_logits"].shape[1]
    assert len(indices) == len(targets)
    for b, ((qi, ti), t) in enumerate(zip(indices, targets)):
        T = len(t["labels"])
        assert qi.dtype == torch.int64 and ti.dtype == torch.int64
        assert len(qi) == len(ti) == min(Q, T)
        assert len(set(qi.tolist())) == len(qi) and len(set(ti.tolist())) == len(ti)
        if T == 0:
            continue
        cost = reference_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], t["labels"],
                              t["boxes"], class_cost, *weights)
        r, c = scipy.optimize.linear_sum_assignment(cost)
        optimum = cost[r, c].sum()
        ours = cost[qi.numpy(), ti.numpy()].sum()
        np.testing.assert_allclose(ours, optimum, rtol=1e-6, atol=1e-6)
        # Continuous random inputs: the optimum is unique, so the pairs themselves agree.
        assert sorted(zip(qi.tolist(), ti.tolist())) == sorted(zip(r.tolist(), c.tolist()))


@pytest.mark.parametrize("class_cost,weights", [("focal", (2.0, 5.0, 2.0)),
                                                ("softmax", (1.0, 5.0, 2.0)),
                                                ("focal", (0.0, 1.0, 0.0))])
def test_matches_bruteforce_reference_on_ragged_batch(class_cost, weights):
    Q, C = 10, 6
    # zero-target images, T < Q, T == Q and T > Q in one batch
    outputs, targets = random_batch([3, 0, 10, 14, 1, 0, 7], Q, C)
    matcher = HungarianMatcher(*weights, class_cost=class_cost)
    indices = matcher(outputs, targets)
    check_against_reference(indices, outputs, targets, class_cost, weights)


def test_focal_alpha_gamma_are_used():
    outputs, targets = random_batch([4, 9], 12, 3)
    weights = (2.0, 0.5, 0.5)  # class-dominated so alpha / gamma change the answer
    matcher = HungarianMatcher(*weights, class_cost="focal", focal_alpha=0.6, focal_gamma=1.0)
    indices = matcher(outputs, targets)
    for b, ((qi, ti), t) in enumerate(zip(indices, targets)):
        cost = reference_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], t["labels"],
                              t["boxes"], "focal", *weights, alpha=0.6, gamma=1.0)
        r, c = scipy.optimize.linear_sum_assignment(cost)
        np.testing.assert_allclose(cost[qi.numpy(), ti.numpy()].sum(), cost[r, c].sum(),
                                   rtol=1e-6)


def test_all_images_without_targets():
    outputs, targets = random_batch([0, 0, 0], 5, 4)
    for qi, ti in HungarianMatcher(2, 5, 2)(outputs, targets):
        assert qi.numel() == 0 and ti.numel() == 0
        assert qi.dtype == torch.int64 and ti.dtype == torch.int64


def test_stacked_layers_equal_per_layer_calls():
    Q, C, sizes = 9, 5, [2, 0, 11, 5]
    layers = [random_batch(sizes, Q, C)[0] for _ in range(4)]
    _, targets = random_batch(sizes, Q, C)
    matcher = HungarianMatcher(2, 5, 2)
    stacked = matcher.match_layers(layers, targets)
    assert len(stacked) == len(layers)
    # the stacked calls that match_layers makes on CUDA, run here on the CPU
    padded = pad_targets(targets)
    one_call = matcher._match_stacked(layers, *padded)
    assert len(one_call) == len(layers)
    for outputs, got, got_one_call in zip(layers, stacked, one_call):
        expected = matcher(outputs, targets)
        for (q1, t1), (q2, t2), (q3, t3) in zip(got, expected, got_one_call):
            assert torch.equal(q1, q2) and torch.equal(t1, t2)
            assert torch.equal(q3, q2) and torch.equal(t3, t2)


def test_no_grad_and_fp32_under_autocast():
    outputs, targets = random_batch([3, 6], 8, 4)
    outputs = {k: v.clone().requires_grad_() for k, v in outputs.items()}
    half = {k: v.detach().bfloat16() for k, v in outputs.items()}
    matcher = HungarianMatcher(2, 5, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matcher(half, targets)
    # the same bf16 values, matched in fp32 outside autocast
    expected = matcher({k: v.float() for k, v in half.items()}, targets)
    for (q1, t1), (q2, t2) in zip(got, expected):
        assert torch.equal(q1, q2) and torch.equal(t1, t2)
    for qi, ti in matcher(outputs, targets):
        assert not qi.requires_grad and not ti.requires_grad


def test_bad_input_raises_clear_errors():
    outputs, targets = random_batch([2, 3], 6, 4)
    matcher = HungarianMatcher(2, 5, 2)
    with pytest.raises(ValueError, match="targets has 1 entries"):
        matcher(outputs, targets[:1])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]"):
        matcher(outputs, [dict(targets[0], labels=targets[0]["labels"].int()), targets[1]])
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]"):
        matcher(outputs, [targets[0], dict(targets[1], boxes=targets[1]["boxes"][:, :3])])
    with pytest.raises(ValueError, match="pred_boxes"):
        matcher({"pred_logits": outputs["pred_logits"],
                 "pred_boxes": outputs["pred_boxes"][:, :5]}, targets)
    with pytest.raises(ValueError, match="one shape"):
        matcher.match_layers([outputs, random_batch([2, 3], 7, 4)[0]], targets)
    with pytest.raises(ValueError, match="tgt_labels"):  # label >= C, caught by ops.match_cost
        matcher(outputs, [dict(targets[0], labels=torch.tensor([1, 4])), targets[1]])
    bad = dict(outputs, pred_boxes=outputs["pred_boxes"].clone())
    bad["pred_boxes"][1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        matcher(bad, targets)
    with pytest.raises(ValueError, match="class_cost"):
        HungarianMatcher(class_cost="sigmoid")
