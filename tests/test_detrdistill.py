"""methods/detrdistill.py: each loss on hand-built inputs against independent float64 formulas
(torchvision, scipy), the method's invariants (numbered in the tests
below), teacher/student wiring, and a one-iteration run of the script on
the embedded data whose student loads into methods/baseline.py --eval."""
import copy
import math
import os
import sys

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
import torchvision.ops as tvops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import detrdistill as dd  # noqa: E402
from common import engine  # noqa: E402
from common.checkpoint import read_checkpoint  # noqa: E402
from common.detr import build_model  # noqa: E402
from common.distill import freeze, teacher_layer_map  # noqa: E402

C = 5  # classes of the hand-built models


def tiny(variant="deformable_detr", **kw):
    cfg = dict(backbone="tiny", width=8, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
               dim_feedforward=64, num_queries=10, dropout=0.0)
    if variant in ("deformable_detr", "dino"):
        cfg["num_feature_levels"] = 3
    cfg.update(kw)
    return build_model(variant, C, **cfg)


def batch():
    """Two images, the second with padding on the right and no ground truth."""
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 80, generator=g)
    masks = torch.zeros(2, 64, 80, dtype=torch.bool)
    masks[1, :, 56:] = True
    targets = [{"labels": torch.tensor([1, 3]),
                "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    return images, masks, targets


def distiller(teacher_kw=None, student_kw=None, variant="deformable_detr", **cfg):
    torch.manual_seed(0)
    teacher = freeze(tiny(variant, **(teacher_kw or {})))
    student = tiny(variant, **(student_kw or {}))
    return dd.DETRDistill(dd.DETRDistillConfig(**cfg), teacher, student, C)


def rand_boxes(*shape, g=None):
    """Random normalised cxcywh boxes well inside the image (no clamping active)."""
    c = 0.3 + 0.4 * torch.rand(*shape, 2, generator=g, dtype=torch.float64)
    wh = 0.05 + 0.3 * torch.rand(*shape, 2, generator=g, dtype=torch.float64)
    return torch.cat([c, wh], -1)


def xyxy(b):
    return tvops.box_convert(b, "cxcywh", "xyxy")


# ------------------------------------------------------------------------------------------
# HMLD (C1)
# ------------------------------------------------------------------------------------------

def test_hmld_cost_against_float64_formula():
    # invariant 5 (class cost is BCE-with-logits summed over classes, every (i, j)) and the
    # L1 / GIoU terms, against an elementwise float64 computation
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, C, generator=g, dtype=torch.float64)
    p = torch.rand(2, 3, C, generator=g, dtype=torch.float64)
    bs, bt = rand_boxes(2, 4, g=g), rand_boxes(2, 3, g=g)
    cls = F.binary_cross_entropy_with_logits(z[:, :, None].expand(-1, -1, 3, -1),
                                             p[:, None].expand(-1, 4, -1, -1),
                                             reduction="none").sum(-1)          # (2,4,3)
    assert torch.allclose(dd.hmld_cost(z, bs, p, bt, 1.0, 0.0, 0.0), cls, atol=1e-12)
    l1 = (bs[:, :, None] - bt[:, None]).abs().sum(-1)
    giou = torch.stack([tvops.generalized_box_iou(xyxy(bs[b]), xyxy(bt[b])) for b in range(2)])
    want = 1.0 * cls + 5.0 * l1 - 2.0 * giou
    assert torch.allclose(dd.hmld_cost(z, bs, p, bt), want, atol=1e-10)


def test_giou_cost_is_scale_free():
    # invariant 6: pixel xyxy and normalised xyxy give the same GIoU (no clamping active)
    g = torch.Generator().manual_seed(2)
    a, b = xyxy(rand_boxes(6, g=g)), xyxy(rand_boxes(5, g=g))
    scale = torch.tensor([640.0, 480.0, 640.0, 480.0], dtype=torch.float64)
    assert torch.allclose(tvops.generalized_box_iou(a, b),
                          tvops.generalized_box_iou(a * scale, b * scale), atol=1e-12)
    cost = dd.hmld_cost(torch.zeros(1, 6, C, dtype=torch.float64), xyxy_inv(a)[None],
                        torch.zeros(1, 5, C, dtype=torch.float64), xyxy_inv(b)[None], 0.0, 0.0, 1.0)
    assert torch.allclose(cost[0], -tvops.generalized_box_iou(a * scale, b * scale), atol=1e-10)


def xyxy_inv(b):
    return tvops.box_convert(b, "xyxy", "cxcywh")


@pytest.mark.parametrize("ns,nt", [(7, 7), (9, 6), (5, 8)])
def test_hmld_assignment_is_optimal_and_a_permutation(ns, nt):
    # invariants 4 and 7: same total cost as scipy on square and rectangular blocks; with
    # N_S = N_T every student query appears exactly once
    g = torch.Generator().manual_seed(ns * 10 + nt)
    z = torch.randn(3, ns, C, generator=g)
    p = torch.rand(3, nt, C, generator=g)
    cost = dd.hmld_cost(z, rand_boxes(3, ns, g=g).float(), p, rand_boxes(3, nt, g=g).float())
    pairs = dd.ops.linear_sum_assignment(cost)
    for b, (r, c) in enumerate(pairs):
        block = cost[b].double().numpy()
        sr, sc = scipy.optimize.linear_sum_assignment(block)
        assert math.isclose(block[r.numpy(), c.numpy()].sum(), block[sr, sc].sum(), rel_tol=1e-6)
        assert len(r) == min(ns, nt)
        if ns == nt:
            assert sorted(r.tolist()) == list(range(ns)) and sorted(c.tolist()) == list(range(nt))


def test_hmld_loss_values_and_normalisers():
    # hand-built pairs; invariants 9 (class / (B N), boxes / pairs) and 22 (N_S > N_T: the
    # unmatched student query has an all-zero class target and no box loss)
    g = torch.Generator().manual_seed(3)
    B, ns, nt = 2, 3, 2
    z = torch.randn(B, ns, C, generator=g, dtype=torch.float64)
    p = torch.rand(B, nt, C, generator=g, dtype=torch.float64)
    bs, bt = rand_boxes(B, ns, g=g), rand_boxes(B, nt, g=g)
    indices = [(torch.tensor([0, 2]), torch.tensor([1, 0])), (torch.tensor([1, 2]), torch.tensor([0, 1]))]
    cls, l1, giou = dd.hmld_loss(z, bs, p, bt, indices)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    zn, pn = z.numpy(), p.numpy()
    want_cls, want_l1, want_giou = 0.0, 0.0, 0.0
    for b, (si, ti) in enumerate(indices):
        target = np.zeros((ns, C))
        target[si.numpy()] = pn[b, ti.numpy()]
        want_cls += -(target * np.log(sig(zn[b])) + (1 - target) * np.log(1 - sig(zn[b]))).sum()
        for i, j in zip(si.tolist(), ti.tolist()):
            want_l1 += float((bs[b, i] - bt[b, j]).abs().sum())
            want_giou += 1 - float(tvops.generalized_box_iou(xyxy(bs[b, i])[None], xyxy(bt[b, j])[None]))
    assert math.isclose(float(cls), want_cls / (B * ns), rel_tol=1e-10)
    assert math.isclose(float(l1), want_l1 / 4, rel_tol=1e-10)    # P' = 4 pairs on one process
    assert math.isclose(float(giou), want_giou / 4, rel_tol=1e-9)
    # zero pairs: P' clamps to 1, the box terms are 0 (not NaN), every class target is 0
    empty = [(torch.zeros(0, dtype=torch.int64),) * 2] * B
    cls, l1, giou = dd.hmld_loss(z, bs, p, bt, empty)
    assert float(l1) == 0.0 and float(giou) == 0.0
    assert math.isclose(float(cls), float(F.softplus(z).sum()) / (B * ns), rel_tol=1e-10)


def test_hmld_self_distillation():
    # invariant 8: student outputs = teacher outputs (distinct predictions): the matching is the
    # identity, L1 = GIoU = 0, the class gradient is 0 and the class value is the teacher's
    # binary entropy (not 0)
    g = torch.Generator().manual_seed(4)
    z = (3 * torch.randn(2, 6, C, generator=g, dtype=torch.float64)).requires_grad_()
    boxes = rand_boxes(2, 6, g=g)
    p = z.detach().sigmoid()
    pairs = dd.ops.linear_sum_assignment(dd.hmld_cost(z.detach(), boxes, p, boxes))
    for r, c in pairs:
        assert torch.equal(r, torch.arange(6)) and torch.equal(c, torch.arange(6))
    cls, l1, giou = dd.hmld_loss(z, boxes, p, boxes, pairs)
    assert float(l1) == 0.0 and abs(float(giou)) < 1e-12
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum() / 12
    assert math.isclose(cls.item(), entropy.item(), rel_tol=1e-10) and cls.item() > 0.1
    (grad,) = torch.autograd.grad(cls, z)
    assert grad.abs().max() < 1e-12


def test_teacher_pseudo_boxes_are_clipped_to_the_image():
    b = torch.tensor([[0.05, 0.5, 0.2, 0.4], [0.5, 0.5, 0.2, 0.2]])
    out = dd.teacher_pseudo_boxes(b)
    assert torch.allclose(out[0], torch.tensor([0.075, 0.5, 0.15, 0.4]))  # x from [-0.05, .15]
    assert torch.allclose(out[1], b[1]) and torch.equal(dd.teacher_pseudo_boxes(b, clamp=False), b)


# ------------------------------------------------------------------------------------------
# TAFD (C2)
# ------------------------------------------------------------------------------------------

def test_tafd_select_topk_and_quality():
    # invariants 10 (top-k over the flattened N x C scores, query = idx // C, class = idx % C,
    # duplicates allowed) and 11 (s = p * max IoU with torchvision's box_iou, not GIoU; s = p
    # without GT)
    probs = torch.full((2, 3, C), 0.01)
    probs[:, 1, 2], probs[:, 1, 4], probs[:, 0, 0] = 0.9, 0.8, 0.7
    boxes = torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4], [0.8, 0.8, 0.1, 0.1]]).repeat(2, 1, 1)
    hs = torch.randn(2, 3, 8)
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.85, 0.85, 0.1, 0.1]])
    targets = [{"boxes": gt, "labels": torch.tensor([0, 1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    sel, q, qi, ci = dd.tafd_select(probs, boxes, hs, targets, k=3)
    assert qi.tolist() == [[1, 1, 0]] * 2 and ci.tolist() == [[2, 4, 0]] * 2
    assert torch.equal(sel, hs[:, [1, 1, 0]])
    # image 0: query 1 (0.3..0.7 square) vs GT 0 (0.4..0.6 x 0.3..0.7): IoU 0.08/0.16 = 0.5;
    # query 0 (0.15..0.35) overlaps no GT: IoU 0 although its GIoU is negative, not 0
    assert torch.allclose(q[0], torch.tensor([0.9 * 0.5, 0.8 * 0.5, 0.0]), atol=1e-6)
    assert torch.allclose(q[1], torch.tensor([0.9, 0.8, 0.7]))  # no GT: s = p


def mask_reference(hs, quality, feat, floor=0.01):
    """float64 loop over pixels: max(sum_n s_n cos(q_n, F(h,w)), floor) / its max."""
    hs, quality, feat = hs.double(), quality.double(), feat.double()
    B, K, D = hs.shape
    _, _, H, W = feat.shape
    out = torch.zeros(B, 1, H, W, dtype=torch.float64)
    for b in range(B):
        for y in range(H):
            for x in range(W):
                f = feat[b, :, y, x]
                cos = [float(hs[b, n] @ f) / (float(hs[b, n].norm()) * float(f.norm())) for n in range(K)]
                out[b, 0, y, x] = max(sum(float(quality[b, n]) * c for n, c in enumerate(cos)), floor)
        out[b] /= out[b].max()
    return out


def test_tafd_mask_against_reference_and_its_properties():
    # invariant 12: shape B x 1 x H x W, max exactly 1 per image, all > 0, no gradient
    g = torch.Generator().manual_seed(5)
    hs = torch.randn(2, 4, 6, generator=g)
    quality = torch.rand(2, 4, generator=g)
    feat = torch.randn(2, 6, 5, 7, generator=g, requires_grad=True)
    m = dd.tafd_mask(hs, quality, feat)
    assert m.shape == (2, 1, 5, 7) and not m.requires_grad
    assert torch.allclose(m.double(), mask_reference(hs, quality, feat.detach()), atol=1e-6)
    assert (m > 0).all() and all(float(m[b].max()) == 1.0 for b in range(2))
    # all-negative similarity: the floor makes the mask uniform 1 (0.01 / 0.01)
    m = dd.tafd_mask(hs, quality, -hs[:, :1, :, None, None].expand(-1, -1, -1, 3, 3)[:, 0].detach())
    assert (m > 0).all() and m.max() == 1.0


def test_tafd_loss_is_masked_mse():
    # invariant 14: 0 when F^S = F^T; otherwise nn.MSELoss()(M F^T, M F^S)
    g = torch.Generator().manual_seed(6)
    ft, fs = torch.randn(2, 4, 5, 6, generator=g), torch.randn(2, 4, 5, 6, generator=g)
    mask = torch.rand(2, 1, 5, 6, generator=g)
    assert float(dd.tafd_loss(mask, ft, ft)) == 0.0
    want = ((mask.double() * (ft.double() - fs.double())) ** 2).sum() / ft.numel()
    assert math.isclose(float(dd.tafd_loss(mask, ft, fs)), float(want), rel_tol=1e-6)
    assert torch.allclose(dd.tafd_loss(mask, ft, fs), torch.nn.MSELoss()(mask * ft, mask * fs))


def test_tafd_terms_per_layer_padding_and_teacher_only_mask():
    # invariants 13 (mask independent of the student), 15 (padded pixels contribute) and 16 (one
    # entry per decoder layer, each the sum over levels of the masked MSE)
    m = distiller()
    images, masks, targets = batch()
    t_enc, t_dec = m.run_teacher(images, masks)
    s_enc = m.student.encode(images, masks)
    losses, lv_masks = m.tafd_terms(s_enc, t_enc, t_dec, targets)
    assert len(losses) == 2 and len(lv_masks) == 2 and all(len(x) == 3 for x in lv_masks)
    for i, l in enumerate(m.layer_map):
        hs, q, _, _ = dd.tafd_select(t_dec.logits[l].sigmoid(), t_dec.boxes[l], t_dec.hs[l], targets)
        want = 0.0
        for ft, fs in zip(t_enc.features, s_enc.features):
            mk = mask_reference(hs, q, ft) if ft.shape[-1] <= 10 else dd.tafd_mask(hs, q, ft).double()
            want += float(((mk * (ft.double() - fs.detach().double())) ** 2).mean())
        assert math.isclose(losses[i].item(), want, rel_tol=1e-5)
    # another student: same masks
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    _, again = m.tafd_terms(m.student.encode(images, masks), t_enc, t_dec, targets)
    assert all(torch.equal(a, b) for x, y in zip(lv_masks, again) for a, b in zip(x, y))
    # a change of the student's features under padding only changes the loss
    pad = s_enc.masks[0][1]                                  # (H,W) True on padding, image 1
    assert pad.any()
    feats = [f.detach().clone() for f in s_enc.features]
    feats[0][1][:, pad] += 1.0
    changed = copy.copy(s_enc)
    changed.features = feats
    after, _ = m.tafd_terms(changed, t_enc, t_dec, targets)
    before, _ = m.tafd_terms(s_enc, t_enc, t_dec, targets)
    assert after[0].item() != pytest.approx(before[0].item(), rel=1e-6)


def test_encoder_memory_source_cuts_levels():
    m = distiller(feature_source="encoder_memory")
    images, masks, _ = batch()
    enc = m.student.encode(images, masks)
    maps = dd.level_maps(enc, "encoder_memory")
    for f, lv in zip(maps, enc.features):
        assert f.shape == lv.shape
    h, w = enc.spatial_shapes_list[1]
    start = int(enc.level_start_index[1])
    assert torch.equal(maps[1][0, :, 2, 3], enc.memory[0, start + 2 * w + 3])


# ------------------------------------------------------------------------------------------
# Contrastive term (C4) and layer mapping (A7)
# ------------------------------------------------------------------------------------------

def test_info_nce():
    # invariant 20: ~log(n) for random unit vectors, ~0 for identical well-separated ones, the
    # target is the diagonal; weight 0.2 in weight_dict
    g = torch.Generator().manual_seed(7)
    n = 64
    u = F.normalize(torch.randn(n, 512, generator=g), dim=-1)
    v = F.normalize(torch.randn(n, 512, generator=g), dim=-1)
    assert abs(float(dd.info_nce(u, v)) - math.log(n)) < 0.5
    e = torch.eye(n, 512)
    assert float(dd.info_nce(e, e)) < 1e-4
    logits = (v.double() @ u.double().t()) / 0.07
    want = float((logits.logsumexp(1) - logits.diagonal()).mean())
    assert math.isclose(float(dd.info_nce(u, v)), want, rel_tol=1e-5)
    m = distiller()
    assert m.weight_dict["loss_nce"] == pytest.approx(0.2)
    assert m.weight_dict["loss_nce_0"] == pytest.approx(0.2)


def test_contrastive_switch_removes_heads():
    # invariant 21: without the term, no loss_nce keys and no projection heads to optimise
    m = distiller(use_query_contrastive=False)
    assert not any(n.startswith(("proj_student", "proj_teacher")) for n, _ in m.named_parameters())
    assert not any(k.startswith("loss_nce") for k in m.weight_dict)
    assert not any(k.startswith("loss_nce") for k in m(*batch()))


def test_layer_mapping():
    # invariant 23: ceil(i L_T / L_S) is monotonic, maps last to last; identity when equal
    for ls in range(1, 8):
        for lt in range(1, 8):
            mp = teacher_layer_map(ls, lt)
            assert len(mp) == ls and mp[-1] == lt - 1 and mp == sorted(mp)
            assert all(0 <= x < lt for x in mp)
            assert mp == [math.ceil((i + 1) * lt / ls) - 1 for i in range(ls)]
    assert teacher_layer_map(6, 6) == list(range(6)) == teacher_layer_map(6, 6, "last")
    assert teacher_layer_map(2, 3) == [1, 2] and teacher_layer_map(3, 6, "last") == [3, 4, 5]
    with pytest.raises(ValueError, match="layer_map='last'"):
        teacher_layer_map(4, 3, "last")
    with pytest.raises(ValueError, match="layer_map"):
        teacher_layer_map(2, 2, "first")


# ------------------------------------------------------------------------------------------
# QPAD (C3)
# ------------------------------------------------------------------------------------------

def focal_cost(logits, labels, alpha=0.25, gamma=2.0):
    p = logits.double().sigmoid()[:, labels]
    return alpha * (1 - p) ** gamma * -(p + 1e-8).log() - (1 - alpha) * p ** gamma * -(1 - p + 1e-8).log()


def test_qpad_uses_the_teachers_own_assignment(monkeypatch):
    # invariants 17 (the teacher's layer-l Hungarian vs GT, computed here with scipy; no
    # matching on the QPAD outputs) and 19 (normaliser = the teacher's positive count)
    m = distiller()
    m.train()
    images, masks, targets = batch()
    seen, matched = [], []
    group_losses = m.criterion.group_losses

    def spy(outputs, tg, indices, num_boxes, suffix=""):
        if suffix == "_qpad":
            seen.append((outputs, indices, float(num_boxes)))
        return group_losses(outputs, tg, indices, num_boxes, suffix)

    match_layers = type(m.teacher_matcher).match_layers

    def match_spy(self, outputs_list, tg):
        matched.extend(o["pred_logits"].detach().clone() for o in outputs_list)
        return match_layers(self, outputs_list, tg)

    monkeypatch.setattr(m.criterion, "group_losses", spy)
    monkeypatch.setattr(type(m.teacher_matcher), "match_layers", match_spy)
    losses = m(images, masks, targets)
    t_enc, t_dec = m.run_teacher(images, masks)
    q_dec = m.student.decode(m.student.encode(images, masks), queries=m.qpad_queries(t_dec))
    assert len(seen) == 2
    for i, (outputs, indices, num_pos) in enumerate(seen):
        l = m.layer_map[i]
        logits, boxes = t_dec.logits[l][0], t_dec.boxes[l][0]
        gt = targets[0]
        cost = (2 * focal_cost(logits, gt["labels"]) +
                5 * torch.cdist(boxes.double(), gt["boxes"].double(), p=1) -
                2 * tvops.generalized_box_iou(xyxy(boxes.double()), xyxy(gt["boxes"].double())))
        r, c = scipy.optimize.linear_sum_assignment(cost.numpy())
        assert indices[0][0].tolist() == r.tolist() and indices[0][1].tolist() == c.tolist()
        assert len(indices[1][0]) == 0                       # the image without GT
        assert num_pos == 2.0                                # teacher positives
        assert torch.allclose(outputs["pred_boxes"], q_dec.boxes[i], atol=1e-6)
        want_l1 = (q_dec.boxes[i][0, r] - gt["boxes"][c]).abs().sum().item() / 2
        sfx = "" if i == 1 else "_0"
        assert math.isclose(losses[f"loss_qpad_bbox{sfx}"].item(), want_l1, rel_tol=1e-5)
    for lg in matched:  # no matcher ever saw the QPAD group's predictions
        assert not any(lg.shape == q.shape and torch.allclose(lg, q) for q in q_dec.logits)


def test_qpad_does_not_touch_the_students_own_outputs():
    # invariant 18: with dropout off, the student's own losses are identical with or without QPAD
    on = distiller()
    off = dd.DETRDistill(dd.DETRDistillConfig(use_qpad=False), on.teacher, on.student, C)
    on.train(), off.train()
    a, b = on(*batch()), off(*batch())
    for k in ("loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_hmld_cls", "loss_tafd"):
        assert torch.equal(a[k], b[k]), k
    assert "loss_qpad_ce" in a and not any(k.startswith("loss_qpad") for k in b)


@pytest.mark.parametrize("variant", ["deformable_detr", "conditional_detr"])
def test_qpad_group_gets_its_own_encoder_pass(variant):
    """The official forward_train_teacher_group recomputes the student transformer for the
    teacher-query group: a second encoder call with its own dropout. With dropout 0 (the CPU
    presets) that is exactly the reused encoding: same losses, same random stream afterwards."""
    calls = []
    m = distiller(variant=variant, student_kw=dict(dropout=0.1))
    m.student.transformer.encoder.register_forward_hook(lambda mod, i, o: calls.append(o))
    m.train()
    torch.manual_seed(3)
    fresh = m(*batch())
    assert len(calls) == 2 and not torch.allclose(calls[0], calls[1])   # dropout drew anew
    reuse = dd.DETRDistill(dd.DETRDistillConfig(qpad_reuse_encoder=True), m.teacher, m.student, C)
    calls.clear()
    torch.manual_seed(3)
    reused = reuse.train()(*batch())
    assert len(calls) == 1
    assert torch.equal(fresh["loss_ce"], reused["loss_ce"])            # the main pass is the same
    assert not torch.equal(fresh["loss_qpad_ce"], reused["loss_qpad_ce"])
    # dropout 0: the recomputation is a no-op (the presets' numbers do not move)
    m0 = distiller(variant=variant)
    r0 = copy.deepcopy(m0)  # the same student-side modules (InfoNCE heads) in both
    r0.cfg = dd.DETRDistillConfig(qpad_reuse_encoder=True)
    torch.manual_seed(4)
    a = m0.train()(*batch())
    state_a = torch.get_rng_state()
    torch.manual_seed(4)
    b = r0.train()(*batch())
    assert torch.equal(state_a, torch.get_rng_state())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qpad_queries_per_family():
    # A8: which teacher queries reach the student decoder
    m = distiller()
    _, t_dec = m.run_teacher(*batch()[:2])
    q = m.qpad_queries(t_dec)
    pos, content = m.teacher.query_embed.weight.split(32, -1)
    assert torch.equal(q.pos[0], pos) and torch.equal(q.content[1], content) and q.reference is None
    m = distiller(teacher_kw=dict(hidden_dim=64), variant="conditional_detr")
    _, t_dec = m.run_teacher(*batch()[:2])
    q = m.qpad_queries(t_dec)
    assert q.content.shape == (2, 10, 32) and not q.content.any()
    assert torch.allclose(q.pos[0], m.query_proj["pos"](m.teacher.query_embed.weight))
    m = distiller(variant="dab_detr")
    _, t_dec = m.run_teacher(*batch()[:2])
    assert torch.equal(m.qpad_queries(t_dec).reference[0], m.teacher.refpoint_embed.weight.sigmoid())


# ------------------------------------------------------------------------------------------
# Wiring: teacher frozen, gradients, self-distillation, pairs
# ------------------------------------------------------------------------------------------

def test_one_step_updates_student_side_only():
    # invariants 1 and 2; gradients reach the student and every student-side module
    m = distiller(teacher_kw=dict(hidden_dim=64, two_stage=True, with_box_refine=True, dec_layers=3),
                  student_kw=dict(two_stage=True, with_box_refine=True))
    groups = engine.param_groups(m, 1e-3, 1e-3)
    in_opt = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in m.teacher.parameters())
    assert {id(p) for p in m.student.parameters() if p.requires_grad} <= in_opt
    for name in ("feat_adapters", "query_proj", "proj_student", "proj_teacher"):
        assert {id(p) for p in getattr(m, name).parameters()} <= in_opt, name
    opt = torch.optim.AdamW(groups)
    images, masks, targets = batch()
    before = copy.deepcopy(m.teacher.state_dict())
    t_out = m.teacher(images, masks)["pred_logits"].clone()
    student_before = [p.detach().clone() for p in m.student.parameters()]
    m.train()
    assert not m.teacher.training
    losses = m(images, masks, targets)
    assert set(m.weight_dict) >= set(losses) - {"class_error"}
    loss = sum(losses[k] * m.weight_dict[k] for k in losses if k in m.weight_dict)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    for name in ("feat_adapters", "query_proj", "proj_student", "proj_teacher"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0
                   for p in getattr(m, name).parameters()), name
    opt.step()
    assert all(p.grad is None for p in m.teacher.parameters())
    for k, v in m.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(m.teacher(images, masks)["pred_logits"], t_out)
    assert sum(not torch.equal(a, b) for a, b in zip(student_before, m.student.parameters())) > 10


def test_student_equal_to_teacher():
    # zero KD where the method's definitions give zero: HMLD boxes and TAFD are 0, HMLD class = teacher entropy
    teacher = freeze(tiny())
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    m = dd.DETRDistill(dd.DETRDistillConfig(clamp_teacher_boxes=False), teacher, student, C)
    m.eval()  # the same (eval) mode for both
    images, masks, targets = batch()
    losses = {k: v.detach() for k, v in m(images, masks, targets).items()}
    _, t_dec = m.run_teacher(images, masks)
    for sfx, l in (("_0", 0), ("", 1)):
        assert float(losses[f"loss_hmld_bbox{sfx}"]) == 0.0
        assert abs(float(losses[f"loss_hmld_giou{sfx}"])) < 1e-6
        assert float(losses[f"loss_tafd{sfx}"]) == 0.0
        p = t_dec.logits[l].double().sigmoid()
        entropy = float(-(p * p.log() + (1 - p) * (1 - p).log()).sum()) / p[..., 0].numel()
        assert math.isclose(float(losses[f"loss_hmld_cls{sfx}"]), entropy, rel_tol=1e-5)


@pytest.mark.parametrize("variant,kw", [("dino", dict(dn_number=4)), ("dab_detr", {}),
                                        ("conditional_detr", dict(num_queries=12, dec_layers=3))])
def test_other_families_and_query_counts(variant, kw):
    # other families (DINO's denoising outside KD), N_S > N_T (A6) and L_S > L_T (A7)
    m = distiller(teacher_kw=dict(hidden_dim=48), student_kw=kw, variant=variant)
    m.train()
    losses = m(*batch())
    L = m.student.cfg.dec_layers
    assert all(f"loss_{k}{'' if i == L - 1 else f'_{i}'}" in losses for i in range(L)
               for k in ("hmld_cls", "tafd", "nce", "qpad_ce"))
    assert all(torch.isfinite(v) for v in losses.values())
    if variant == "dino":
        assert "loss_ce_dn" in losses


def test_unsupported_pairs_fail_clearly():
    with pytest.raises(ValueError, match="same DETR family.*teacher conditional_detr -> student deformable_detr"):
        dd.DETRDistill(dd.DETRDistillConfig(), freeze(tiny("conditional_detr")), tiny(), C)
    with pytest.raises(ValueError, match="detr -> student detr"):
        dd.DETRDistill(dd.DETRDistillConfig(), freeze(tiny("detr")), tiny("detr"), C)
    with pytest.raises(ValueError, match="teacher deformable_detr has 4, student deformable_detr has 3"):
        dd.DETRDistill(dd.DETRDistillConfig(), freeze(tiny(num_feature_levels=4)), tiny(), C)
    with pytest.raises(ValueError, match="feature_source"):
        dd.DETRDistill(dd.DETRDistillConfig(feature_source="backbone"), freeze(tiny()), tiny(), C)
    # a teacher whose logits are softmax scores (e.g. --teacher-arg class_loss=softmax) cannot
    # feed HMLD's and TAFD's sigmoid probabilities
    with pytest.raises(ValueError, match="sigmoid probabilities.*softmax"):
        dd.DETRDistill(dd.DETRDistillConfig(), freeze(tiny(class_loss="softmax")), tiny(), C)


# ------------------------------------------------------------------------------------------
# The script
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def script_run(tmp_path_factory, tiny_teacher):
    tmp = tmp_path_factory.mktemp("detrdistill")
    data = ["--preset", "cpu-tiny"] + tiny_teacher.data
    teacher = tiny_teacher.path
    stats = dd.main(data + ["--teacher", teacher, "--output-dir", str(tmp / "student"),
                            "--visualize", str(tmp / "figs")])
    return tmp, data, teacher, stats


def test_script_one_iteration(script_run):
    tmp, data, teacher, stats = script_run
    for k in ("loss_hmld_cls", "loss_tafd", "loss_nce", "loss_qpad_ce", "loss_ce"):
        assert math.isfinite(stats[f"train_{k}"]), k
    assert "test_AP" in stats
    pngs = sorted(os.listdir(tmp / "figs"))
    assert len(pngs) == 4 and all(p.endswith(".png") for p in pngs)
    from PIL import Image
    assert Image.open(tmp / "figs" / pngs[0]).size[0] > 100


def test_checkpoint_is_the_student_and_loads_into_baseline(script_run):
    # invariant 3: "model" holds the student only (no teacher, no heads); baseline --eval loads it
    tmp, data, teacher, stats = script_run
    ckpt = read_checkpoint(str(tmp / "student" / "checkpoint.pth"))
    num_classes = ckpt["model"]["class_embed.0.bias"].shape[0]
    student = build_model("deformable_detr", num_classes, **ckpt["args"]["model_overrides"])
    assert set(ckpt["model"]) == set(student.state_dict())
    assert not any(k.startswith(("teacher.", "proj_", "student.")) for k in ckpt["model"])
    assert any(k.startswith("proj_student.") for k in ckpt["extra"])
    # (baseline --eval of the checkpoint: test_methods_contract.py)


def test_script_refuses_a_mismatched_pair(script_run):
    tmp, data, teacher, _ = script_run
    # (a family mismatch through the script is the constructor test above: the CPU presets
    # carry Deformable-only fields, so cli.resolve refuses --variant conditional_detr first)
    with pytest.raises(ValueError, match="teacher deformable_detr has 3, student deformable_detr has 4"):
        dd.main(data + ["--teacher", teacher, "--num-feature-levels", "4"])


# ------------------------------------------------------------------------------------------
# The paper's forms (one flag each): quality, Eq. 9 TAFD, Eq. 3-4 HMLD
# ------------------------------------------------------------------------------------------

def test_paper_quality_is_c_to_gamma_times_iou_to_one_minus_gamma():
    g = torch.Generator().manual_seed(8)
    probs = torch.rand(2, 6, C, generator=g, dtype=torch.float64)
    boxes = rand_boxes(2, 6, g=g)
    gt = rand_boxes(3, g=g).float()
    targets = [{"boxes": gt, "labels": torch.tensor([0, 1, 2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    hs = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    _, q, qi, ci = dd.tafd_select(probs, boxes, hs, targets, k=5, form="paper", gamma=0.3)
    for n in range(5):
        c = float(probs[0, qi[0, n], ci[0, n]])
        iou = float(tvops.box_iou(xyxy(boxes[0, qi[0, n]])[None], xyxy(gt.double())).max())
        assert math.isclose(float(q[0, n]), c ** 0.3 * iou ** 0.7, rel_tol=1e-6, abs_tol=1e-12)
        assert math.isclose(float(q[1, n]), float(probs[1, qi[1, n], ci[1, n]]), rel_tol=1e-12)


def test_paper_tafd_loss_against_the_literal_per_query_sum():
    # Eq. 9 written out: psi_i = F^T Q_i per query, (B,M,d,H,W) tensor, / (B M d H W)
    g = torch.Generator().manual_seed(9)
    B, M, d, H, W = 2, 3, 4, 5, 6
    hs = torch.randn(B, M, d, generator=g, dtype=torch.float64)
    q = torch.rand(B, M, generator=g, dtype=torch.float64)
    ft = torch.randn(B, d, H, W, generator=g, dtype=torch.float64)
    fs = torch.randn(B, d, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    got = dd.tafd_loss_paper(hs, q, ft, fs)
    psi = (hs[:, :, :, None, None] * ft[:, None]).sum(2)                 # (B,M,H,W)
    terms = (psi[:, :, None] * (ft[:, None] - fs[:, None])) ** 2          # (B,M,d,H,W)
    want = (q[:, :, None, None, None] * terms).sum() / (B * M * d * H * W)
    torch.testing.assert_close(got, want)
    assert float(dd.tafd_loss_paper(hs, q, ft, ft)) == 0.0


def test_paper_tafd_in_the_distiller_has_an_adapter_and_uses_eq9():
    m = distiller(tafd_form="paper", quality_form="paper")
    assert m.teacher.hidden_dim == m.student.hidden_dim and len(m.feat_adapters) == 3
    images, masks, targets = batch()
    t_enc, t_dec = m.run_teacher(images, masks)
    s_enc = m.student.encode(images, masks)
    losses, _ = m.tafd_terms(s_enc, t_enc, t_dec, targets)
    for i, l in enumerate(m.layer_map):
        hs, q, _, _ = dd.tafd_select(t_dec.logits[l].sigmoid(), t_dec.boxes[l], t_dec.hs[l],
                                     targets, form="paper", gamma=0.5)
        want = sum(dd.tafd_loss_paper(hs, q, a, ad(b)) for a, b, ad in
                   zip(t_enc.features, s_enc.features, m.feat_adapters))
        torch.testing.assert_close(losses[i], want)
    losses[-1].backward()
    assert m.feat_adapters[0].weight.grad.abs().sum() > 0


def test_paper_hmld_two_matchings_against_scipy():
    g = torch.Generator().manual_seed(10)
    B, N_S, N_T = 2, 7, 6
    z = torch.randn(B, N_S, C, generator=g, dtype=torch.float64)
    p = torch.rand(B, N_T, C, generator=g, dtype=torch.float64)
    bs, bt = rand_boxes(B, N_S, g=g), rand_boxes(B, N_T, g=g)
    positives = [[4, 1], []]
    matched = dd.hmld_match_paper(z, bs, p, bt, positives)
    cost = dd.hmld_cost(z, bs, p, bt).numpy()
    for b, ((ps, pt), (ns, nt)) in enumerate(matched):
        pos = positives[b]
        r, c = scipy.optimize.linear_sum_assignment(cost[b][:, pos]) if pos else ([], [])
        assert ps.tolist() == list(r) and pt.tolist() == [pos[j] for j in c]
        free = [i for i in range(N_S) if i not in set(r)]
        neg = [j for j in range(N_T) if j not in pos]
        r2, c2 = scipy.optimize.linear_sum_assignment(cost[b][free][:, neg])
        assert ns.tolist() == [free[i] for i in r2] and nt.tolist() == [neg[j] for j in c2]
        assert not set(ps.tolist()) & set(ns.tolist())                   # disjoint students
    # the loss: each part summed over its pairs, divided by its own pair count
    cls_, l1, gi = dd.hmld_loss_paper(z, bs, p, bt, matched)
    want = [0.0, 0.0, 0.0]
    for part in (0, 1):
        rows = [(b, int(i), int(j)) for b, m in enumerate(matched) for i, j in zip(*m[part])]
        n = len(rows)
        for b, i, j in rows:
            bce = F.binary_cross_entropy_with_logits(z[b, i], p[b, j], reduction="sum")
            giou = tvops.generalized_box_iou(xyxy(bs[b, i])[None], xyxy(bt[b, j])[None])
            want[0] += float(bce) / n
            want[1] += float((bs[b, i] - bt[b, j]).abs().sum()) / n
            want[2] += float(1 - giou) / n
    for got, w in zip((cls_, l1, gi), want):
        assert math.isclose(float(got), w, rel_tol=1e-9)


def test_paper_forms_train_end_to_end():
    m = distiller(hmld_form="paper", tafd_form="paper", quality_form="paper",
                  use_query_contrastive=False)
    m.train()
    losses = m(*batch())
    assert {"loss_hmld_cls", "loss_hmld_bbox", "loss_tafd", "loss_qpad_ce"} <= set(losses)
    sum(losses[k] * m.weight_dict[k] for k in losses if k in m.weight_dict).backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert m.student.class_embed[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hmld_form"):
        dd.DETRDistillConfig(hmld_form="two")
