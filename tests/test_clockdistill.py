"""methods/clockdistill.py: every loss term against an independent float64 computation, the
method's invariants (numbered 1-20 in the tests below), the wiring
(gradients reach the student and its adapter, never the teacher) and a one-iteration run of the
script on the embedded data whose checkpoint loads into methods/baseline.py --eval."""
import copy
import math
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import clockdistill as C  # noqa: E402
from common import engine  # noqa: E402
from common.checkpoint import read_checkpoint  # noqa: E402
from common.detr import build_model, split_levels  # noqa: E402
from common.distill import freeze, teacher_layer_map  # noqa: E402

SMALL = dict(backbone="tiny", width=8, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
             dim_feedforward=64, num_queries=10, dropout=0.0)
MULTI = dict(num_feature_levels=3)
NC = 3


def _batch():
    """Two images padded to one batch (image 1 is smaller: padded right and bottom), 2 + 1 GT."""
    images = torch.randn(2, 3, 64, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 70:] = True
    masks[1, 48:] = True
    targets = [{"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.5, 0.4, 0.2]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    return images, masks, targets


def _models(variant, extra=None, student=None, perturb=True):
    """A frozen teacher and a student of the same family; box heads perturbed so that box KD is
    non-trivial (fresh heads output the reference box exactly)."""
    extra = dict(MULTI if variant in ("deformable_detr", "dino") else {}, **(extra or {}))
    t = build_model(variant, NC, **SMALL, **extra)
    s = build_model(variant, NC, **dict(SMALL, **extra, **(student or {})))
    if perturb:
        with torch.no_grad():
            for m in (t, s):
                for head in m.bbox_embed:
                    head.layers[-1].weight.normal_(0, 0.2)
    return freeze(t), s


def _total(d, losses):
    return sum(losses[k] * d.weight_dict[k] for k in losses if k in d.weight_dict)


# ------------------------------------------------------------------------------------------
# Masks (invariants 1-6) and an independent cell-overlap reference
# ------------------------------------------------------------------------------------------

def _box(x1, y1, x2, y2):
    return [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]


def test_single_box_mask_and_weights_sum_to_one():
    # valid 10 x 10 cells; the box spans x in [0.2, 0.5), y in [0.3, 0.7) -> cells [2,5) x [3,7)
    M, S = C.level_masks(torch.tensor([_box(0.2, 0.3, 0.5, 0.7)]), 10, 10, 10, 10)
    want = torch.zeros(10, 10, dtype=torch.bool)
    want[3:7, 2:5] = True
    assert torch.equal(M, want)                                                 # invariant 1
    assert torch.allclose(S[want], torch.full((12,), 1 / 12))
    assert math.isclose(float(S[want].sum()), 1.0, rel_tol=1e-6)                 # invariant 2
    assert math.isclose(float(S[~want].sum()), 1.0, rel_tol=1e-6)
    assert torch.allclose(S[~want], torch.full((88,), 1 / 88))


def test_padded_cells_and_empty_image():
    # a 10 x 12 map of which 7 rows x 9 columns are image
    M, S = C.level_masks(torch.tensor([_box(0.1, 0.1, 0.4, 0.5)]), 10, 12, 7, 9)
    assert not M[7:].any() and not M[:, 9:].any() and (S[7:] == 0).all() and (S[:, 9:] == 0).all()
    assert math.isclose(float(S[:7, :9][~M[:7, :9]].sum()), 1.0, rel_tol=1e-6)  # invariant 3
    M, S = C.level_masks(torch.zeros(0, 4), 10, 12, 7, 9)                        # invariant 6
    assert not M.any()
    assert torch.allclose(S[:7, :9], torch.full((7, 9), 1 / 63)) and S[7:].sum() == 0
    assert S[:, 9:].sum() == 0


def test_nested_boxes_and_tiny_box():
    outer, inner = _box(0.0, 0.0, 0.8, 0.8), _box(0.2, 0.2, 0.4, 0.4)  # 8x8 and 2x2 cells
    M, S = C.level_masks(torch.tensor([outer, inner]), 10, 10, 10, 10)
    assert torch.allclose(S[2:4, 2:4], torch.full((2, 2), 1 / 4))               # invariant 4
    assert math.isclose(float(S[0, 0]), 1 / 64, rel_tol=1e-6)
    assert math.isclose(float(S[~M].sum()), 1.0, rel_tol=1e-6)
    # a box far smaller than one stride-32 cell still covers one cell, with weight 1 (inv. 5)
    M, S = C.level_masks(torch.tensor([[0.53, 0.27, 0.001, 0.001]]), 4, 5, 4, 5)
    assert int(M.sum()) == 1 and bool(M[1, 2]) and math.isclose(float(S[1, 2]), 1.0)
    # a zero-size box on a cell border too
    M, _ = C.level_masks(torch.tensor([[0.4, 0.5, 0.0, 0.0]]), 4, 5, 4, 5)
    assert int(M.sum()) == 1


def test_masks_match_cell_overlap_reference():
    """Independent reference: a cell is inside a box iff they overlap with positive area; S is
    1 / (cells of the smallest covering box), 1 / (background cells) elsewhere, 0 on padding."""
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        H, W = int(torch.randint(3, 12, (1,), generator=g)), int(torch.randint(3, 12, (1,), generator=g))
        vh, vw = int(torch.randint(1, H + 1, (1,), generator=g)), int(torch.randint(1, W + 1, (1,), generator=g))
        xy = torch.rand(4, 2, generator=g) * 0.8
        wh = torch.rand(4, 2, generator=g) * 0.5 + 0.01
        boxes = torch.cat([xy + wh / 2, wh], 1).clamp(max=1.0)
        M, S = C.level_masks(boxes, H, W, vh, vw)
        b = boxes.double().numpy()
        cover = np.zeros((len(b), H, W), bool)
        for k, (cx, cy, w, h) in enumerate(b):
            for i in range(vh):
                for j in range(vw):
                    ox = min(j + 1, (cx + w / 2) * vw) - max(j, (cx - w / 2) * vw)
                    oy = min(i + 1, (cy + h / 2) * vh) - max(i, (cy - h / 2) * vh)
                    cover[k, i, j] = ox > 0 and oy > 0
        m = cover.any(0)
        area = cover.reshape(len(b), -1).sum(1)
        s = np.zeros((H, W))
        n_bg = max((~m[:vh, :vw]).sum(), 1)
        for i in range(vh):
            for j in range(vw):
                ks = [k for k in range(len(b)) if cover[k, i, j]]
                s[i, j] = max(1 / area[k] for k in ks) if ks else 1 / n_bg
        assert np.array_equal(M.numpy(), m)
        np.testing.assert_allclose(S.numpy(), s, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# L_lcmd (invariants 7-10)
# ------------------------------------------------------------------------------------------

def test_split_levels_roundtrip():
    shapes = [(3, 4), (2, 2), (1, 3)]
    mem = torch.randn(2, 12 + 4 + 3, 5)
    maps = split_levels(mem, shapes)
    assert [tuple(m.shape) for m in maps] == [(2, 5, 3, 4), (2, 5, 2, 2), (2, 5, 1, 3)]
    assert torch.equal(torch.cat([m.flatten(2).transpose(1, 2) for m in maps], 1), mem)  # inv. 7
    assert torch.equal(maps[1][1, :, 1, 0], mem[1, 12 + 2])   # token start_l + i * W + j
    with pytest.raises(ValueError, match="tokens"):
        split_levels(mem[:, :-1], shapes)


def _two_level_example():
    """Image 0: a 4x4 level 0 whose last column is padding (valid 4 rows x 3 cols) and a 2x2
    level 1 (all valid); one box x in [0, 2/3), y in [0.25, 0.75). Image 1: no GT, the same maps
    all valid. Hand-derived M, S."""
    shapes = [(4, 4), (2, 2)]
    pad0 = torch.zeros(2, 4, 4, dtype=torch.bool)
    pad0[0, :, 3] = True
    pad1 = torch.zeros(2, 2, 2, dtype=torch.bool)
    targets = [{"boxes": torch.tensor([_box(0.0, 0.25, 2 / 3, 0.75)]), "labels": torch.tensor([0])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    M0 = np.zeros((2, 4, 4))
    M0[0, 1:3, 0:2] = 1                          # 4 cells: x cells 0,1 (of 3), y cells 1,2 (of 4)
    S0 = np.zeros((2, 4, 4))
    S0[0, 1:3, 0:2] = 1 / 4
    S0[0, :, :3][M0[0, :, :3] == 0] = 1 / 8      # 12 valid cells - 4 box cells
    S0[1] = 1 / 16
    M1 = np.zeros((2, 2, 2))
    M1[0] = 1                                    # y in [0.5, 1.5), x in [0, 1.33): all 4 cells
    S1 = np.zeros((2, 2, 2))
    S1[0] = 1 / 4
    S1[1] = 1 / 4
    return shapes, [pad0, pad1], targets, [(M0, S0), (M1, S1)]


def test_lcmd_against_float64_reference():
    shapes, pads, targets, ms = _two_level_example()
    alpha, beta, D = 5e-5, 1e-7, 6
    g = torch.Generator().manual_seed(1)
    mem_t, mem_s = torch.randn(2, 20, D, generator=g), torch.randn(2, 20, D, generator=g)
    w = C.lcmd_weights(targets, pads, alpha, beta)
    for (M, S), w_l in zip(ms, w):
        np.testing.assert_allclose(w_l.numpy(), alpha * M * S + beta * (1 - M) * S, rtol=1e-6)
    got = C.lcmd_loss(mem_t, mem_s, shapes, w)
    t, s = mem_t.double().numpy(), mem_s.double().numpy()
    want, start = 0.0, 0
    for (H, W), (M, S) in zip(shapes, ms):
        for b in range(2):
            for i in range(H):
                for j in range(W):
                    sq = ((t[b, start + i * W + j] - s[b, start + i * W + j]) ** 2).sum()  # channels
                    want += (alpha * M[b, i, j] + beta * (1 - M[b, i, j])) * S[b, i, j] * sq
        start += H * W
    assert math.isclose(float(got), want / 2, rel_tol=1e-5)                     # invariant 10
    assert float(C.lcmd_loss(mem_t, mem_t.clone(), shapes, w)) == 0.0           # invariant 8


def test_lcmd_foreground_versus_background():
    shapes, pads, targets, ms = _two_level_example()
    mem = torch.randn(2, 20, 4)
    w = C.lcmd_weights(targets, pads, 5e-5, 1e-7)
    fg_token, bg_token = 1 * 4 + 0, 3 * 4 + 2       # level 0 cells (1, 0) in the box, (3, 2) not

    def bumped(token, delta):
        ps = mem.clone()
        ps[0, token, 0] += delta
        return ps
    losses = [float(C.lcmd_loss(mem, bumped(fg_token, d), shapes, w)) for d in (0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(losses, losses[1:]))                        # invariant 9
    ratio = losses[-1] / float(C.lcmd_loss(mem, bumped(bg_token, 0.8), shapes, w))
    # alpha/beta = 500, times the scale-mask ratio S_fg / S_bg = (1/4) / (1/8)
    assert math.isclose(ratio, 500 * 2, rel_tol=1e-4)
    w = C.lcmd_weights(targets, pads, 5e-5, 1e-7, scale_mask=False)   # S = 1: exactly alpha/beta
    assert math.isclose(float(C.lcmd_loss(mem, bumped(fg_token, 0.8), shapes, w)) /
                        float(C.lcmd_loss(mem, bumped(bg_token, 0.8), shapes, w)), 500, rel_tol=1e-4)


# ------------------------------------------------------------------------------------------
# L_tcld terms against float64 formulas (invariants 16-19)
# ------------------------------------------------------------------------------------------

def _np_giou(a, b):
    """GIoU of cxcywh boxes a, b (N,4), float64, written out."""
    def corners(x):
        return x[:, 0] - x[:, 2] / 2, x[:, 1] - x[:, 3] / 2, x[:, 0] + x[:, 2] / 2, x[:, 1] + x[:, 3] / 2
    ax1, ay1, ax2, ay2 = corners(a)
    bx1, by1, bx2, by2 = corners(b)
    inter = np.clip(np.minimum(ax2, bx2) - np.maximum(ax1, bx1), 0, None) * \
        np.clip(np.minimum(ay2, by2) - np.maximum(ay1, by1), 0, None)
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (np.maximum(ax2, bx2) - np.minimum(ax1, bx1)) * (np.maximum(ay2, by2) - np.minimum(ay1, by1))
    return inter / union - (hull - union) / hull


def _np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _random_outputs(L=2, N=5, Cn=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    zs, zt = torch.randn(L, N, Cn, generator=g) * 3, torch.randn(L, N, Cn, generator=g) * 3
    bs = torch.cat([torch.rand(L, N, 2, generator=g) * 0.6 + 0.2,
                    torch.rand(L, N, 2, generator=g) * 0.3 + 0.05], -1)
    bt = torch.cat([torch.rand(L, N, 2, generator=g) * 0.6 + 0.2,
                    torch.rand(L, N, 2, generator=g) * 0.3 + 0.05], -1)
    return zs, bs, zt, bt


@pytest.mark.parametrize("kd_cls", ["softmax_kl", "sigmoid_bce"])
@pytest.mark.parametrize("norm", ["project", "prototype"])
def test_tcld_against_float64_reference(kd_cls, norm):
    tau = 10.0 if kd_cls == "softmax_kl" else 2.0
    zs, bs, zt, bt = _random_outputs()
    got = C.tcld_loss(zs, bs, zt, bt, tau=tau, kd_cls=kd_cls, norm=norm)
    ZS, BS, ZT, BT = (x.double().numpy() for x in (zs, bs, zt, bt))
    want = {"cls": 0.0, "bbox": 0.0, "giou": 0.0}
    for e in range(ZS.shape[0]):
        w = (1 / (1 + np.exp(-ZT[e]))).max(-1)                                  # teacher confidence
        if kd_cls == "softmax_kl":
            pt, ps = _np_softmax(ZT[e] / tau), _np_softmax(ZS[e] / tau)
            kl = tau ** 2 * pt * (np.log(pt) - np.log(ps))                      # (N,C) invariant 19
        else:
            pt, ps = 1 / (1 + np.exp(-ZT[e] / tau)), 1 / (1 + np.exp(-ZS[e] / tau))
            kl = tau ** 2 * (pt * np.log(pt / ps) + (1 - pt) * np.log((1 - pt) / (1 - ps)))
        d = np.abs(BS[e] - BT[e])
        if norm == "project":
            want["cls"] += (w * kl.sum(-1)).sum() / w.sum()
            want["bbox"] += (w * d.sum(-1)).sum() / w.sum()
        else:
            want["cls"] += (w * kl.mean(-1)).sum()
            want["bbox"] += (w * d.mean(-1)).sum() / w.sum()
        want["giou"] += (w * (1 - _np_giou(BS[e], BT[e]))).sum() / w.sum()
    for k in want:
        assert math.isclose(float(got[k]), want[k], rel_tol=1e-4, abs_tol=1e-6), k


def test_tcld_zero_at_equality_and_class_gradient():
    zs, bs, zt, bt = _random_outputs()
    for kd in ("softmax_kl", "sigmoid_bce"):
        same = C.tcld_loss(zt, bt, zt, bt, kd_cls=kd)
        assert all(abs(float(v)) < 1e-6 for v in same.values())
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    C.tcld_loss(zs, bs, zt, bt)["cls"].backward()
    assert zs.grad.abs().sum() > 0                                              # invariant 16
    assert zt.grad is None or zt.grad.abs().sum() == 0  # teacher side detached


def test_confidence_weight_and_scale_invariance():
    z = torch.tensor([[100.0, -100.0], [-100.0, -100.0], [0.0, 1.0]], requires_grad=True)
    w = C.confidence_weight(z)
    assert w.grad_fn is None and not w.requires_grad                            # invariant 18
    assert ((w >= 0) & (w <= 1)).all()
    assert torch.allclose(w, torch.tensor([1.0, 0.0, 1 / (1 + math.exp(-1))]), atol=1e-6)
    zs, bs, zt, bt = _random_outputs(L=1)
    w = C.confidence_weight(zt[0])
    a = C.tcld_layer(zs[0], bs[0], zt[0], bt[0], w, 10.0)
    b = C.tcld_layer(zs[0], bs[0], zt[0], bt[0], 3.7 * w, 10.0)
    for x, y in zip(a, b):
        assert math.isclose(float(x), float(y), rel_tol=1e-5)


def test_padded_slots_do_not_change_the_loss():
    zs, bs, zt, bt = _random_outputs(L=2, N=6)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    # lay the 6 real queries out as (L, B=2, G=4) with 2 padded slots holding garbage
    pad = lambda x, fill: torch.cat([x[:, :2], torch.full_like(x[:, :2], fill), x[:, 2:]], 1) \
        .view(x.shape[0], 2, 4, x.shape[-1])  # noqa: E731
    ref = C.tcld_loss(zs, bs, zt, bt)
    for fill in (float("nan"), 1e6, 0.0):
        got = C.tcld_loss(pad(zs, fill), pad(bs, fill), pad(zt, fill), pad(bt, fill), valid)
        for k in ref:                                                           # invariant 17
            assert torch.allclose(got[k], ref[k], rtol=1e-6), (k, fill)
    with pytest.raises(ValueError, match="valid"):
        C.tcld_loss(pad(zs, 0), pad(bs, 0), pad(zt, 0), pad(bt, 0), valid[:, :3])


def test_teacher_layer_map():
    assert teacher_layer_map(6, 6) == list(range(6))
    assert teacher_layer_map(3, 6) == [1, 3, 5]
    assert teacher_layer_map(2, 3) == [1, 2]


# ------------------------------------------------------------------------------------------
# Target-aware queries (invariants 11-14)
# ------------------------------------------------------------------------------------------

def _record_decode(model, seen):
    original = model.decode

    def decode(enc, queries=None, **kw):
        seen.append(queries)
        return original(enc, queries=queries, **kw)
    model.decode = decode


def _queries_decoded(d, t, s):
    """Run the distiller on the test batch; the batch and the outside queries that the teacher
    and the student decoded (the student's ordinary pass, with None, left out)."""
    images, masks, targets = _batch()
    seen_t, seen_s = [], []
    _record_decode(t, seen_t)
    _record_decode(s, seen_s)
    d.train()
    d(images, masks, targets)
    return images, masks, targets, seen_t, [q for q in seen_s if q is not None]


@pytest.mark.parametrize("variant,extra,ref_dim", [("dab_detr", {}, 4), ("deformable_detr", {}, 2),
                                                   ("deformable_detr", {"with_box_refine": True}, 4)])
def test_target_queries_identical_frozen_and_on_the_gt(variant, extra, ref_dim):
    t, s = _models(variant, extra)
    d = C.CLoCKDistiller(C.CLoCKConfig(), t, s, NC)
    assert d.builder_s is d.builder_t
    images, masks, targets, seen_t, seen_s = _queries_decoded(d, t, s)
    assert len(seen_t) == len(seen_s) == 2                                      # one per image
    for b, (qt, qs) in enumerate(zip(seen_t, seen_s)):
        for name in ("content", "pos", "reference"):                            # invariant 11
            a, c = getattr(qt, name), getattr(qs, name)
            assert (a is None and c is None) or torch.equal(a, c)
            assert a is None or (a.grad_fn is None and not a.requires_grad)     # invariant 12
        gt = targets[b]["boxes"]
        assert torch.equal(qt.reference[0], gt[:, :ref_dim])                    # invariant 13
        assert qt.content.shape[1] == len(gt)
    trainable = {id(p) for g in engine.param_groups(d, 1e-4, 1e-5) for p in g["params"]}
    assert not any(id(p) in trainable for p in d.builder_t.parameters())
    assert not any(id(p) in trainable for p in t.parameters())                  # invariant 20
    assert all(id(p) in trainable for p in s.parameters() if p.requires_grad)


def test_different_widths_get_own_builders_and_an_adapter():
    t, s = _models("deformable_detr", student=dict(hidden_dim=16))
    d = C.CLoCKDistiller(C.CLoCKConfig(), t, s, NC)
    assert d.builder_s is not d.builder_t and d.adapter is not None
    q_t = d.target_queries(_batch()[2], d.builder_t)
    q_s = d.target_queries(_batch()[2], d.builder_s)
    assert q_t[0].content.shape[-1] == 32 and q_s[0].content.shape[-1] == 16
    assert torch.equal(q_t[0].reference, q_s[0].reference)
    d.train()
    losses = d(*_batch())
    _total(d, losses).backward()
    assert d.adapter.weight.grad is not None and d.adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in t.parameters())


@pytest.mark.parametrize("variant,extra", [("deformable_detr", {"two_stage": True,
                                                                "with_box_refine": True}),
                                           ("dab_detr", {})])
def test_student_outputs_unchanged_by_the_target_aware_pass(variant, extra):
    t, s = _models(variant, extra)
    images, masks, targets = _batch()
    s.train()
    criterion = C.CLoCKDistiller(C.CLoCKConfig(tcld=False, lcmd=False), t, s, NC).criterion
    plain = criterion(s(images, masks, targets), targets)                       # invariant 14
    for cfg in (C.CLoCKConfig(), C.CLoCKConfig(tcld=False)):
        d = C.CLoCKDistiller(cfg, t, s, NC).train()
        losses = d(images, masks, targets)
        for k, v in plain.items():
            assert torch.equal(losses[k], v), k
        assert ("loss_tcld_cls" in losses) == cfg.tcld


# ------------------------------------------------------------------------------------------
# Whole distiller: zero KD for a copy of the teacher, gradients, every family (15, 20)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,extra", [("deformable_detr", {"with_box_refine": True}),
                                           ("dab_detr", {})])
def test_student_copy_of_teacher_gives_zero_kd(variant, extra):
    t, s = _models(variant, extra)
    cfg = C.CLoCKConfig(teacher_queries_through_student=True)
    twin = copy.deepcopy(t).requires_grad_(True)
    losses = C.CLoCKDistiller(cfg, t, twin, NC).train()(*_batch())
    kd = [k for k in losses if "lcmd" in k or "tcld" in k or "tq" in k]
    assert len(kd) == 7
    for k in kd:                                                                # invariant 15
        assert abs(float(losses[k].detach())) < 1e-5, (k, float(losses[k].detach()))
    other = C.CLoCKDistiller(cfg, t, s, NC).train()(*_batch())
    assert all(float(other[k].detach()) > 1e-4 for k in kd)  # the same check fails for a different student


@pytest.mark.parametrize("variant,extra,cfg", [
    ("dino", {"dn_number": 4}, dict(content_embed="teacher_dn", kd_cls="sigmoid_bce")),
    ("conditional_detr", {}, dict(extra_random_queries=3)),
    ("deformable_detr", {"two_stage": True, "with_box_refine": True},
     dict(query_builder="prototype", tcld_norm="prototype", teacher_queries_through_student=True)),
])
def test_gradients_reach_student_never_teacher(variant, extra, cfg):
    t, s = _models(variant, extra, student=dict(dec_layers=1))
    d = C.CLoCKDistiller(C.CLoCKConfig(**cfg), t, s, NC).train()
    assert not t.training
    images, masks, targets = _batch()
    with torch.no_grad():
        before = t(images, masks)["pred_logits"].clone()
    losses = d(images, masks, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    for k in ("loss_lcmd", "loss_tcld_cls", "loss_tcld_bbox", "loss_tcld_giou"):
        assert k in d.weight_dict
        s.zero_grad()
        losses[k].backward(retain_graph=True)
        g = sum(p.grad.abs().sum() for p in s.parameters() if p.grad is not None)
        assert g > 0, k
    assert all(p.grad is None for p in t.parameters())                          # invariant 20
    opt = torch.optim.AdamW(engine.param_groups(d, 1e-3, 1e-3))
    opt.step()
    with torch.no_grad():
        assert torch.equal(t(images, masks)["pred_logits"], before)


def test_unsupported_pairs_and_bad_config():
    t, s = _models("deformable_detr")
    with pytest.raises(ValueError, match="teacher deformable_detr.*student dab_detr"):
        C.CLoCKDistiller(C.CLoCKConfig(), t, _models("dab_detr")[1], NC)
    detr_t, detr_s = build_model("detr", NC, **SMALL), build_model("detr", NC, **SMALL)
    with pytest.raises(ValueError, match="does not support teacher detr -> student detr"):
        C.CLoCKDistiller(C.CLoCKConfig(), freeze(detr_t), detr_s, NC)
    with pytest.raises(ValueError, match="num_feature_levels"):
        C.CLoCKDistiller(C.CLoCKConfig(), t, _models("deformable_detr", {"num_feature_levels": 4})[1], NC)
    with pytest.raises(ValueError, match="prototype"):
        C.CLoCKDistiller(C.CLoCKConfig(query_builder="prototype"), *_models("dab_detr"), NC)
    with pytest.raises(ValueError, match="teacher_dn"):
        C.CLoCKDistiller(C.CLoCKConfig(content_embed="teacher_dn"), t, s, NC)
    with pytest.raises(ValueError, match="kd_cls"):
        C.CLoCKConfig(kd_cls="mse")
    with pytest.raises(ValueError, match="tau"):
        C.CLoCKConfig(tau=0)


def test_each_image_decoded_on_its_own():
    """No padded slot and no other image's query reaches an image's target-aware predictions."""
    t, s = _models("deformable_detr")
    d = C.CLoCKDistiller(C.CLoCKConfig(), t, s, NC).eval()
    images, masks, targets = _batch()
    with torch.no_grad():
        enc = t.encode(images, masks)
        z2, b2 = d.decode_each(t, enc, d.target_queries(targets, d.builder_t))
        more = [dict(targets[0]), {"labels": torch.tensor([0, 1, 2]),
                                   "boxes": torch.rand(3, 4) * 0.4 + 0.1}]
        z3, b3 = d.decode_each(t, enc, d.target_queries(more, d.builder_t))
        z1, b1 = d.decode_each(t, enc.image(0), d.target_queries(targets[:1], d.builder_t))
    assert z2.shape[1] == 3 and z3.shape[1] == 5
    assert torch.allclose(z2[:, :2], z3[:, :2], atol=1e-6) and torch.allclose(b2[:, :2], b3[:, :2], atol=1e-6)
    assert torch.allclose(z1, z2[:, :2], atol=1e-5) and torch.allclose(b1, b2[:, :2], atol=1e-5)


# ------------------------------------------------------------------------------------------
# The script: one iteration on the embedded data, checkpoint into baseline --eval, --visualize
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher):
    tmp = tmp_path_factory.mktemp("clockdistill")
    common = ["--preset", "cpu-tiny"] + tiny_teacher.data
    out = tmp / "student"
    stats = C.main(common + ["--teacher", tiny_teacher.path,
                             "--hidden-dim", "16", "--output-dir", str(out),
                             "--visualize", str(tmp / "figs"), "--visualize-images", "2"])
    return common, tmp, out, stats


def test_one_iteration_run(run):
    common, tmp, out, stats = run
    for k in ("train_loss_lcmd", "train_loss_tcld_cls", "train_loss_tcld_bbox",
              "train_loss_tcld_giou", "train_loss_ce", "test_AP"):
        assert k in stats and math.isfinite(stats[k]), k
    ckpt = read_checkpoint(str(out / "checkpoint.pth"))
    student = build_model("deformable_detr", ckpt["model"]["class_embed.0.bias"].shape[0],
                          **ckpt["args"]["model_overrides"])
    assert set(ckpt["model"]) == set(student.state_dict())                      # invariant 20
    assert "adapter.weight" in ckpt["extra"]
    assert not any(k.startswith("teacher.") for k in ckpt["extra"])
    # (baseline --eval of the checkpoint: test_methods_contract.py)


def test_visualize_writes_figures(run):
    from PIL import Image
    _, tmp, _, _ = run
    files = sorted((tmp / "figs").glob("*.png"))
    assert len(files) == 2
    with Image.open(files[0]) as im:
        # two rows of 1 + 3 panels (3 feature levels of cpu-tiny), each at the image size
        assert im.mode == "RGB" and 1.5 < im.size[0] / im.size[1] < 2.5
        pixels = np.asarray(im)
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


# ------------------------------------------------------------------------------------------
# Reference forms: each model gets its own (target-aware queries, teacher-query pass)
# ------------------------------------------------------------------------------------------

def test_reference_form_chosen_per_model():
    """A refining Deformable teacher takes the GT box, a plain Deformable student its centre:
    a plain student never sees 4-D boxes it was not built for."""
    t, _ = _models("deformable_detr", {"with_box_refine": True})
    _, s = _models("deformable_detr")
    d = C.CLoCKDistiller(C.CLoCKConfig(), t, s, NC)
    images, masks, targets, seen_t, seen_s = _queries_decoded(d, t, s)
    assert len(seen_t) == len(seen_s) == 2
    for b, (qt, qs) in enumerate(zip(seen_t, seen_s)):
        gt = targets[b]["boxes"]
        assert torch.equal(qt.reference[0], gt)                      # teacher: the whole box
        assert torch.equal(qs.reference[0], gt[:, :2])               # student: the centre
        assert torch.equal(qt.content, qs.content) and torch.equal(qt.pos, qs.pos)


def test_teacher_queries_decoded_at_the_teachers_reference_points():
    """Conditional DETR: the teacher-query pass gives the student the teacher's reference points
    sigmoid(ref_point_head_T(p_q)), not its own ref_point_head's."""
    t, s = _models("conditional_detr")
    d = C.CLoCKDistiller(C.CLoCKConfig(teacher_queries_through_student=True, lcmd=False), t, s, NC)
    seen = []
    _record_decode(s, seen)
    d.train()
    d(*_batch())
    tq = [q for q in seen if q is not None and q.content.shape[1] == t.num_queries]
    assert len(tq) == 1
    with torch.no_grad():
        want = t.transformer.decoder.ref_point_head(t.query_embed.weight).sigmoid()   # (Q,2)
        own = s.transformer.decoder.ref_point_head(s.query_embed.weight).sigmoid()
    assert tq[0].reference is not None
    torch.testing.assert_close(tq[0].reference, want[None].expand(2, -1, -1))
    assert not torch.allclose(want, own, atol=1e-3)                  # the test can tell them apart
