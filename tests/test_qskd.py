"""methods/qskd.py: each loss term against an independent float64 computation (torchvision,
scipy, grid_sample, hand-computed examples), the method's
invariants (numbered in the tests below), the wiring (frozen teacher, gradients, checkpoint)
and a one-iteration run of the script on the embedded data."""
import copy
import math
import os
import sys

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import qskd  # noqa: E402
from common import engine  # noqa: E402
from common.checkpoint import trainable_state  # noqa: E402
from common.detr import build_model  # noqa: E402
from common.distill import freeze  # noqa: E402

xyxy = lambda b: box_convert(b, "cxcywh", "xyxy")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: two OpenMP threads only wait on each other (10x slower on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# helpers: random scenes, a reference GQS written as plain loops
# ------------------------------------------------------------------------------------------

def random_scene(gen, B=3, N=40, num_gt=(3, 0, 5), dtype=torch.float64):
    """Predictions jittered around the GTs (so groups have hard negatives) plus random ones;
    GTs padded to M = max(num_gt); a random one-to-one 'Hungarian' matching per image."""
    M = max(num_gt)
    gt = torch.zeros(B, M, 4, dtype=dtype)
    boxes = torch.rand(B, N, 4, generator=gen, dtype=dtype) * 0.5 + 0.25
    matched = []
    for b, n in enumerate(num_gt):
        g = torch.rand(n, 4, generator=gen, dtype=dtype) * 0.4 + 0.3
        gt[b, :n] = g
        for i in range(min(N // 2, 4 * n)):  # 4 jittered copies per GT
            boxes[b, i] = g[i % n] * (1 + 0.3 * (torch.rand(4, generator=gen, dtype=dtype) - 0.5))
        q = torch.randperm(N, generator=gen)[:n]
        matched.append((q.sort()[0], torch.randperm(n, generator=gen)[torch.argsort(q)] if n else q))
    return boxes, gt, list(num_gt), matched


def reference_gqs(boxes, gt, n, matched, tau, mode, k_max, hard=True):
    """C1 for one image, loop by loop, with torchvision's GIoU in float64."""
    N = boxes.shape[0]
    group, pos = [-1] * N, [False] * N
    if n == 0:
        return group, pos
    G = generalized_box_iou(xyxy(boxes.double()), xyxy(gt[:n].double()))   # (N, n)
    for i in range(N):
        j = int(G[i].argmax())
        thr = tau if mode == "absolute" else tau * float(G[:, j].max())
        if hard and float(G[i, j]) >= thr:
            group[i] = j
    for q, j in zip(*matched):
        group[int(q)], pos[int(q)] = int(j), True
    if k_max:
        for j in range(n):
            members = sorted((i for i in range(N) if group[i] == j),
                             key=lambda i: (not pos[i], -float(G[i, j]), i))
            for i in members[k_max:]:
                group[i] = -1
    return group, pos


# ------------------------------------------------------------------------------------------
# C1: GQS (invariants 1-7)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,tau,k_max", [("absolute", 0.5, 0), ("absolute", 0.2, 0),
                                            ("relative", 0.7, 0), ("absolute", 0.3, 2),
                                            ("relative", 0.5, 1)])
def test_gqs_matches_reference_loops(mode, tau, k_max):
    gen = torch.Generator().manual_seed(1)
    boxes, gt, num_gt, matched = random_scene(gen)
    out = qskd.group_query_selection(boxes, gt, num_gt, matched, tau, mode, k_max)
    for b in range(len(num_gt)):
        group, pos = reference_gqs(boxes[b], gt[b], num_gt[b], matched[b], tau, mode, k_max)
        assert out.group[b].tolist() == group
        assert out.positive[b].tolist() == pos
    assert (out.group >= 0).sum() > (out.positive).sum() or k_max == 1  # hard negatives exist


def test_gqs_invariants():
    gen = torch.Generator().manual_seed(2)
    boxes, gt, num_gt, matched = random_scene(gen)
    for mode, tau in (("absolute", 0.5), ("relative", 0.6)):
        out = qskd.group_query_selection(boxes, gt, num_gt, matched, tau, mode)
        for b, (q, j) in enumerate(matched):
            G = generalized_box_iou(xyxy(boxes[b]), xyxy(gt[b, :num_gt[b]]))
            # 1 + 2: the matched query is in its GT's group, even with GIoU < tau, and only there
            assert out.group[b, q].tolist() == j.tolist()
            assert (out.positive[b].nonzero().flatten().sort()[0] == q.sort()[0]).all()
            # 3: every unmatched member clears the threshold
            for i in ((out.group[b] >= 0) & ~out.positive[b]).nonzero().flatten().tolist():
                g = int(out.group[b, i])
                thr = tau if mode == "absolute" else tau * float(G[:, g].max())
                assert float(G[i, g]) >= thr
                assert int(G[i].argmax()) == g
            # 6: GQS's GIoU is torchvision's, in float64
            member = out.group[b] >= 0
            torch.testing.assert_close(out.gamma[b][member],
                                       G[member.nonzero().flatten(), out.group[b][member]])
        assert bool((matched[0][0].numel() == 0) or
                    (generalized_box_iou(xyxy(boxes[0, matched[0][0]]),
                                         xyxy(gt[0, matched[0][1]])).diagonal() < tau).any()), \
            "the scene should hold a matched query below tau (invariant 1 must be exercised)"
        # 5: P and H disjoint, P u H u easy = all queries (group labels partition them)
        hard = (out.group >= 0) & ~out.positive
        assert not (hard & out.positive).any()
        assert ((out.group == -1) | hard | out.positive).all()
        # 7: the image without GT has empty groups
        assert (out.group[1] == -1).all() and not out.positive[1].any()


def test_gqs_cap_keeps_matched_and_top_gamma():
    gen = torch.Generator().manual_seed(3)
    boxes, gt, num_gt, matched = random_scene(gen)
    free = qskd.group_query_selection(boxes, gt, num_gt, matched, 0.1)
    for k in (1, 2, 3):
        cap = qskd.group_query_selection(boxes, gt, num_gt, matched, 0.1, k_max=k)   # 4
        for b in range(3):
            for j in range(num_gt[b]):
                before = (free.group[b] == j).nonzero().flatten()
                after = (cap.group[b] == j).nonzero().flatten()
                assert len(after) == min(k, len(before))
                assert cap.positive[b][after].sum() == 1        # the matched one is kept
                others = [i for i in before.tolist() if not free.positive[b, i]]
                best = sorted(others, key=lambda i: -float(free.gamma[b, i]))[:k - 1]
                assert sorted(best) == sorted(i for i in after.tolist() if not cap.positive[b, i])


def test_gqs_no_gt_at_all_and_no_hard_negatives_flag():
    gen = torch.Generator().manual_seed(4)
    boxes = torch.rand(2, 10, 4, generator=gen)
    out = qskd.group_query_selection(boxes, torch.zeros(2, 0, 4), [0, 0],
                                     [(torch.zeros(0, dtype=torch.long),) * 2] * 2)
    assert (out.group == -1).all() and not out.positive.any()
    boxes, gt, num_gt, matched = random_scene(gen)
    only_p = qskd.group_query_selection(boxes, gt, num_gt, matched, 0.5, hard_negatives=False)
    assert ((only_p.group >= 0) == only_p.positive).all()


# ------------------------------------------------------------------------------------------
# C2: AGFD (invariants 9-14)
# ------------------------------------------------------------------------------------------

def test_splat_hand_computed_2x2():
    """One 2x2 level, one head, one query, three points with weights 0.5, 0.3, 0.2."""
    loc = torch.tensor([[0.5, 0.5], [0.25, 0.25], [0.1, 0.5]], dtype=torch.float64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    out = qskd.splat_attention_map(loc.view(1, 1, 1, 1, 3, 2), w.view(1, 1, 1, 1, 3), [(2, 2)],
                                   torch.ones(1, 1, dtype=torch.float64))
    # (0.5,0.5): pixel (0.5,0.5) -> 1/4 on every cell; (0.25,0.25): pixel (0,0) -> cell (0,0);
    # (0.1,0.5): pixel x = -0.3, y = 0.5 -> column -1 dropped (0.3), column 0 gets 0.7 x 1/2 per row
    expect = torch.tensor([0.5 / 4 + 0.3 + 0.2 * 0.35, 0.5 / 4, 0.5 / 4 + 0.2 * 0.35, 0.5 / 4],
                          dtype=torch.float64)
    torch.testing.assert_close(out[0], expect)
    assert math.isclose(float(out.sum()), 1 - 0.2 * 0.3)   # 10: only the inside mass remains


def test_splat_is_the_adjoint_of_grid_sample():
    """sum_s splat(s) V(s) = sum over samples of w * grid_sample(V, loc): the splat puts each
    weight exactly where the deformable op reads (align_corners=False, zero padding)."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(3, 5), (2, 2)]
    B, Q, H, L, P = 2, 3, 2, 2, 4
    loc = torch.rand(B, Q, H, L, P, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    w = torch.rand(B, Q, H, L, P, generator=gen, dtype=torch.float64)
    qw = torch.rand(B, Q, generator=gen, dtype=torch.float64)
    V = [torch.randn(B, 1, h, ww, generator=gen, dtype=torch.float64) for h, ww in shapes]
    out = qskd.splat_attention_map(loc, w, shapes, qw)                         # (B, S)
    lhs = (out * torch.cat([v.flatten(1) for v in V], 1)).sum(1)
    rhs = 0
    for lvl in range(L):
        grid = loc[:, :, :, lvl].reshape(B, Q * H, P, 2) * 2 - 1
        s = F.grid_sample(V[lvl], grid, align_corners=False, padding_mode="zeros")[:, 0]
        rhs = rhs + (s.view(B, Q, H, P) * w[:, :, :, lvl] * qw[:, :, None, None] / H).sum((1, 2, 3))
    torch.testing.assert_close(lhs, rhs)
    # 10: interior samples keep all their mass
    inner = qskd.splat_attention_map(loc.clamp(0.3, 0.7), w / w.sum((3, 4), keepdim=True), shapes,
                                     torch.ones(B, Q, dtype=torch.float64))
    torch.testing.assert_close(inner.sum(1), torch.full((B,), float(Q), dtype=torch.float64))


def test_dense_and_similarity_maps():
    gen = torch.Generator().manual_seed(6)
    B, h, Q, S, D = 2, 3, 4, 7, 5
    attn = torch.rand(B, h, Q, S, generator=gen, dtype=torch.float64).softmax(-1)
    qw = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    out = qskd.dense_attention_map(attn, qw)
    torch.testing.assert_close(out[0], attn[0].mean(0)[0] + attn[0].mean(0)[2])
    assert (out[1] == 0).all()
    # 9: each a_i sums to 1 over memory positions
    for q in range(Q):
        one_hot = torch.zeros(B, Q, dtype=torch.float64)
        one_hot[:, q] = 1
        torch.testing.assert_close(qskd.dense_attention_map(attn, one_hot).sum(1),
                                   torch.ones(B, dtype=torch.float64))
    hs, feats = (torch.randn(B, Q, D, generator=gen, dtype=torch.float64),
                 torch.randn(B, S, D, generator=gen, dtype=torch.float64))
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 5:] = True
    sim = qskd.similarity_map(hs, feats, pad, qw, "similarity")
    cos = qskd.similarity_map(hs, feats, pad, qw, "cosine")
    for b in range(B):
        e_sim, e_cos = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
        valid = (~pad[b]).nonzero().flatten()
        for q in range(Q):
            logits = torch.tensor([float(hs[b, q] @ feats[b, s]) / math.sqrt(D) for s in valid])
            e_sim[valid] += qw[b, q] * torch.exp(logits - logits.max()) / torch.exp(logits - logits.max()).sum()
            for s in valid:
                c = float(hs[b, q] @ feats[b, s]) / float(hs[b, q].norm() * feats[b, s].norm())
                e_cos[s] += qw[b, q] * c              # raw cosine x weight, summed ...
        e_cos[valid] = e_cos[valid].clamp(min=0.01)   # ... then floored (DETRDistill's map)
        torch.testing.assert_close(sim[b], e_sim)
        torch.testing.assert_close(cos[b], e_cos)


def test_cosine_map_sums_signed_cosines_before_the_floor():
    """Hand example: at one cell the two queries' cosines are +0.6 and -0.8 (unit vectors), so
    DETRDistill's map is max(0.6 - 0.8, 0.01) = 0.01 and max(0.8 + 0.6, 0.01) = 1.4 at the
    other; clamping each cosine at 0 first would give 0.6 and 1.4."""
    hs = torch.tensor([[[0.6, 0.8], [-0.8, 0.6]]], dtype=torch.float64)     # (1,2,2) unit rows
    feats = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)  # (1,2,2)
    out = qskd.similarity_map(hs, feats, torch.zeros(1, 2, dtype=torch.bool),
                              torch.ones(1, 2, dtype=torch.float64), "cosine")
    torch.testing.assert_close(out, torch.tensor([[0.01, 1.4]], dtype=torch.float64))


def test_agfd_loss_against_loops_and_invariants():
    gen = torch.Generator().manual_seed(7)
    shapes = [(2, 3), (1, 2)]
    B, S, d = 2, 8, 4
    ft, fs = (torch.randn(B, S, d, generator=gen, dtype=torch.float64) for _ in range(2))
    raw = torch.rand(B, S, generator=gen, dtype=torch.float64)
    raw[1, 6:] = 0  # image 1 has nothing selected on level 1
    for mode in ("max", "sum"):
        mask = qskd.normalise_mask(raw, shapes, mode)
        expect = 0.0
        for lo, hi in ((0, 6), (6, 8)):
            ref = raw[:, lo:hi] / (raw[:, lo:hi].amax(1, keepdim=True) if mode == "max"
                                   else raw[:, lo:hi].sum(1, keepdim=True))
            ref = torch.nan_to_num(ref)
            torch.testing.assert_close(mask[:, lo:hi], ref)
            num = sum(float(ref[b, s]) * float(((ft[b, lo + s] - fs[b, lo + s]) ** 2).sum())
                      for b in range(B) for s in range(hi - lo))
            expect += num / (float(ref.sum()) * d)
        assert math.isclose(float(qskd.agfd_loss(ft, fs, mask, shapes)), expect, rel_tol=1e-12)
        # 13: invariant to a positive scale of M; 12: zero when features are equal
        assert math.isclose(float(qskd.agfd_loss(ft, fs, 3.7 * mask, shapes)), expect, rel_tol=1e-12)
        assert float(qskd.agfd_loss(ft, ft.clone(), mask, shapes)) == 0.0
    # 11 (max): >= 0 and max 1 per image and level where something was selected
    mask = qskd.normalise_mask(raw, shapes, "max")
    assert (mask >= 0).all() and mask[:, :6].amax(1).tolist() == [1.0, 1.0]
    assert mask[0, 6:].max() == 1.0 and (mask[1, 6:] == 0).all()
    # an all-zero mask (no GT anywhere) gives 0, not NaN
    assert float(qskd.agfd_loss(ft, fs, torch.zeros(B, S, dtype=torch.float64), shapes)) == 0.0


# ------------------------------------------------------------------------------------------
# C3: LAPD (invariants 15-19)
# ------------------------------------------------------------------------------------------

def bce_ref(zs, zt):
    p, s = torch.sigmoid(zt.double()), torch.sigmoid(zs.double())
    return -(p * torch.log(s) + (1 - p) * torch.log(1 - s)).sum(-1)


def test_kd_cls_against_formulas():
    gen = torch.Generator().manual_seed(8)
    zs = torch.randn(2, 5, 6, generator=gen, dtype=torch.float64)
    zt = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    pair = qskd.pairwise_kd_cls(zs, zt)
    for T in (1.0, 2.0):
        pair_kl = qskd.pairwise_kd_cls(zs, zt, "kl", T)
        for g in range(2):
            for i in range(5):
                for k in range(4):
                    e = float(bce_ref(zs[g, i], zt[g, k]))
                    assert math.isclose(float(pair[g, i, k]), e, rel_tol=1e-10)
                    assert math.isclose(float(qskd.kd_cls_loss(zs[g, i:i + 1], zt[g, k:k + 1])), e,
                                        rel_tol=1e-10)
                    q, p = torch.softmax(zt[g, k] / T, -1), torch.softmax(zs[g, i] / T, -1)
                    e_kl = T * T * float((q * torch.log(q / p)).sum())
                    assert math.isclose(float(pair_kl[g, i, k]), e_kl, rel_tol=1e-9, abs_tol=1e-12)


def test_lapd_loss_against_formula_and_identity():
    gen = torch.Generator().manual_seed(9)
    cfg = qskd.QSKDConfig(lambda_cls=2.0)
    zs = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    zt = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    bs = torch.rand(3, 4, generator=gen, dtype=torch.float64) * 0.3 + torch.tensor([0.3, 0.3, 0.1, 0.1])
    bt = torch.rand(3, 4, generator=gen, dtype=torch.float64) * 0.3 + torch.tensor([0.3, 0.3, 0.1, 0.1])
    giou = generalized_box_iou(xyxy(bs), xyxy(bt)).diagonal()
    expect = (2.0 * bce_ref(zs, zt) + 5 * (bs - bt).abs().sum(-1) + 2 * (1 - giou)).sum() / 3
    torch.testing.assert_close(qskd.lapd_loss(zs, bs, zt, bt, cfg), expect)
    # 18: identical predictions: L1 and GIoU terms 0, class term's gradient 0
    z = zt.clone().requires_grad_(True)
    assert float(qskd.lapd_loss(z, bt, zt, bt, qskd.QSKDConfig(lambda_cls=0.0)).detach()) == 0.0
    qskd.lapd_loss(z, bt, zt, bt, qskd.QSKDConfig(lambda_l1=0.0, lambda_giou=0.0)).backward()
    assert z.grad.abs().max() < 1e-12
    # no pairs: 0, no NaN
    e = torch.zeros(0, 4, dtype=torch.float64)
    assert float(qskd.lapd_loss(e, e, e, e, cfg)) == 0.0


def test_local_pairs_optimal_group_local_and_small(monkeypatch):
    gen = torch.Generator().manual_seed(10)
    cfg = qskd.QSKDConfig(tau=0.2)
    C = 5
    blocks, scenes = [], []
    for layer in range(2):
        boxes_s, gt, num_gt, matched_s = random_scene(gen, N=40, dtype=torch.float32)
        boxes_t = boxes_s[:, torch.randperm(40, generator=gen)[:30]] * 1.02  # N_T = 30 != N_S
        matched_t = [(q[q < 30], j[q < 30]) for q, j in matched_s]
        gs = qskd.group_query_selection(boxes_s, gt, num_gt, matched_s, cfg.tau)
        gtg = qskd.group_query_selection(boxes_t, gt, num_gt, matched_t, cfg.tau)
        zs, zt = torch.randn(3, 40, C, generator=gen), torch.randn(3, 30, C, generator=gen)
        blocks.append((zs, boxes_s, zt, boxes_t, gs, gtg, gt.shape[1]))
        scenes.append((zs, boxes_s, zt, boxes_t, gs, gtg, num_gt))
    shapes = []
    real_lsa = qskd.ops.linear_sum_assignment
    monkeypatch.setattr(qskd.ops, "linear_sum_assignment",
                        lambda cost, sizes=None, **kw: shapes.append(tuple(cost.shape)) or
                        real_lsa(cost, sizes, **kw))
    pairs = qskd.local_pairs(blocks, cfg)
    assert len(shapes) == 1                                     # one batched call for all layers
    largest = max(max(int((g.group[b] == j).sum()) for g in (s[4], s[5])
                      for b in range(3) for j in range(5)) for s in scenes)
    assert shapes[0][1] <= largest and shapes[0][2] <= largest < 30   # 16: group-sized matrices
    for (img, qs, qt), (zs, bs, zt, bt, gs, gtg, num_gt) in zip(pairs, scenes):
        # 15: a pair joins members of the same GT group
        assert (gs.group[img, qs] == gtg.group[img, qt]).all() and (gs.group[img, qs] >= 0).all()
        for b in range(3):
            for j in range(num_gt[b]):
                S = (gs.group[b] == j).nonzero().flatten()
                T = (gtg.group[b] == j).nonzero().flatten()
                sel = (img == b) & (gs.group[b][qs] == j)
                assert int(sel.sum()) == min(len(S), len(T))
                if len(S) == 0 or len(T) == 0:
                    continue
                # 17: same total cost as scipy on an independently built float64 cost
                cost = (bce_ref(zs[b, S][:, None], zt[b, T][None])
                        + 5 * torch.cdist(bs[b, S].double(), bt[b, T].double(), p=1)
                        - 2 * generalized_box_iou(xyxy(bs[b, S].double()), xyxy(bt[b, T].double())))
                r, c = scipy.optimize.linear_sum_assignment(cost.numpy())
                pos_s = {int(q): k for k, q in enumerate(S)}
                pos_t = {int(q): k for k, q in enumerate(T)}
                ours = sum(float(cost[pos_s[int(a)], pos_t[int(t)]])
                           for a, t in zip(qs[sel], qt[sel]))
                assert math.isclose(ours, float(cost[r, c].sum()), rel_tol=1e-5, abs_tol=1e-5)


# ------------------------------------------------------------------------------------------
# The distiller on tiny models (invariants 8, 11, 14, 19, 20, 21 and the zero-KD case)
# ------------------------------------------------------------------------------------------

TINY = dict(backbone="tiny", width=8, nheads=4, enc_layers=1, dim_feedforward=32,
            num_queries=12, dropout=0.0)


def tiny_pair(variant, d_t=32, d_s=16, L_t=3, L_s=2, **kw):
    extra = dict(num_feature_levels=3) if variant in ("deformable_detr", "dino") else {}
    extra.update(kw)
    teacher = freeze(build_model(variant, 4, hidden_dim=d_t, dec_layers=L_t, **TINY, **extra))
    student = build_model(variant, 4, hidden_dim=d_s, dec_layers=L_s, **TINY, **extra)
    return teacher, student


def tiny_batch():
    images = torch.randn(2, 3, 64, 96)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 64:] = True                                     # image 1 is padded on the right
    targets = [{"labels": torch.tensor([1, 3]),
                "boxes": torch.tensor([[0.3, 0.4, 0.3, 0.4], [0.7, 0.6, 0.3, 0.3]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.4, 0.5]])}]
    return images, masks, targets


@pytest.mark.parametrize("variant", ["deformable_detr", "conditional_detr", "dab_detr", "dino"])
def test_distiller_gradients_and_frozen_teacher(variant):
    teacher, student = tiny_pair(variant)
    d = qskd.QSKD(qskd.QSKDConfig(), teacher, student, 4).train()
    assert not teacher.training                                 # train() keeps the teacher in eval
    assert d.adapter is not None                                # 14: widths 32 vs 16
    assert d.layer_map == [1, 2]                                # 19: ceil(i * 3 / 2), 1-based
    images, masks, targets = tiny_batch()
    t_before = teacher(images, masks)
    losses = d(images, masks, targets)
    assert {"loss_agfd", "loss_lapd", "loss_lapd_0", "loss_ce", "loss_ce_0"} <= set(losses)
    assert {"loss_agfd", "loss_lapd", "loss_lapd_0"} <= set(d.weight_dict)
    kd = losses["loss_agfd"] + losses["loss_lapd"] + losses["loss_lapd_0"]
    assert torch.isfinite(kd) and kd > 0
    opt = torch.optim.AdamW(engine.param_groups(d, 1e-3, 1e-3))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in teacher.parameters())      # 20
    assert all(id(p) in in_opt for p in d.adapter.parameters())
    kd.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert d.adapter.weight.grad.abs().sum() > 0
    assert student.class_embed[0].weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    opt.step()
    t_after = teacher(images, masks)
    assert torch.equal(t_before["pred_boxes"], t_after["pred_boxes"])
    # 21: the trainable state is the student plus the adapter, never the teacher
    state = trainable_state(d)
    assert set(state["model"]) == set(student.state_dict())
    assert set(state["extra"]) == {"adapter.weight", "adapter.bias"}


def test_student_equal_to_teacher_gives_zero_kd_gradient():
    teacher, _ = tiny_pair("deformable_detr")
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    # with cost_class 0, each query pairs with itself (L1 0, GIoU 1 is the unique best cost)
    d = qskd.QSKD(qskd.QSKDConfig(cost_class=0.0, tau=0.0), teacher, student, 4).train()
    assert d.adapter is None                                    # 14: equal widths, no adapter
    images, masks, targets = tiny_batch()
    losses = d(images, masks, targets)
    assert float(losses["loss_agfd"].detach()) == 0.0           # 12
    kd = losses["loss_agfd"] + losses["loss_lapd"] + losses["loss_lapd_0"]
    kd.backward()
    grads = [p.grad.abs().max() for p in student.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-6                          # 18: only the constant entropy left
    zero_box = qskd.QSKD(qskd.QSKDConfig(cost_class=0.0, tau=0.0, lambda_cls=0.0), teacher,
                         student, 4).train()
    assert float(zero_box(images, masks, targets)["loss_lapd"].detach()) < 1e-6


def test_mask_padding_and_images_without_gt():
    teacher, student = tiny_pair("deformable_detr")
    d = qskd.QSKD(qskd.QSKDConfig(), teacher, student, 4).train()
    images, masks, targets = tiny_batch()
    targets[1] = {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    t_enc, t_dec = d.teacher_forward(images, masks)
    s_dec = student.decode(student.encode(images, masks), targets=targets)
    sel = d.select(t_enc, t_dec, s_dec, targets)
    mask = sel["mask"]
    assert not mask.requires_grad and (mask >= 0).all()        # 11
    assert (mask[t_enc.mask_flatten] == 0).all()               # padded cells ignored
    assert (mask[1] == 0).all()                                # 7: no GT, empty mask
    for lvl in mask[0].split([h * w for h, w in t_enc.spatial_shapes_list]):
        assert float(lvl.max()) == 1.0
    for img, _, _ in sel["pairs"]:
        assert (img == 0).all()                                # 7: no pairs for image 1
    # all images without GT: every KD term is exactly 0, nothing NaN
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    losses = d(images, masks, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert float(losses["loss_agfd"].detach()) == 0 and float(losses["loss_lapd"].detach()) == 0


def test_dino_denoising_queries_never_enter_groups():
    teacher, student = tiny_pair("dino", dn_number=6)
    d = qskd.QSKD(qskd.QSKDConfig(tau=0.0), teacher, student, 4).train()
    images, masks, targets = tiny_batch()
    enc = student.encode(images, masks)
    with_dn = student.decode(enc, targets=targets)             # training: DN queries prepended
    assert with_dn.dn is not None
    t_enc, t_dec = d.teacher_forward(images, masks)
    sel = d.select(t_enc, t_dec, with_dn, targets)
    Q = student.num_queries
    assert all(g.group.shape == (2, Q) for g in sel["s_groups"])                    # 8
    assert all(int(qs.max()) < Q for _, qs, _ in sel["pairs"] if qs.numel())
    # the matching queries cannot see the DN ones, so groups equal those of a run without DN
    student.eval()
    without = student.decode(enc)
    sel2 = d.select(t_enc, t_dec, without, targets)
    for a, b in zip(sel["s_groups"], sel2["s_groups"]):
        assert torch.equal(a.group, b.group)


def test_layer_map_and_unsupported_pairs():
    t, s = tiny_pair("conditional_detr", L_t=6, L_s=4)
    d = qskd.QSKD(qskd.QSKDConfig(), t, s, 4)
    assert d.layer_map == [1, 2, 4, 5]                          # ceil(i*6/4)-1 for i = 1..4
    assert set(k for k in d.weight_dict if "lapd" in k) == {"loss_lapd", "loss_lapd_0",
                                                            "loss_lapd_1", "loss_lapd_2"}
    off = qskd.QSKD(qskd.QSKDConfig(agfd=False, lapd=False), t, s, 4)
    assert off.adapter is None and not any("lapd" in k or "agfd" in k for k in off.weight_dict)
    other = build_model("dab_detr", 4, hidden_dim=16, dec_layers=2, **TINY)
    with pytest.raises(ValueError, match="conditional_detr.*dab_detr"):
        qskd.QSKD(qskd.QSKDConfig(), t, other, 4)
    plain = freeze(build_model("detr", 4, hidden_dim=16, dec_layers=2, **TINY))
    with pytest.raises(ValueError, match="not detr"):
        qskd.QSKD(qskd.QSKDConfig(), plain, build_model("detr", 4, hidden_dim=16, dec_layers=2, **TINY), 4)
    with pytest.raises(ValueError, match="tau_mode"):
        qskd.QSKDConfig(tau_mode="maybe")


# ------------------------------------------------------------------------------------------
# The script: one iteration on the embedded data, the checkpoint, --visualize
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def script_run(tmp_path_factory, tiny_teacher):
    tmp, data = tmp_path_factory.mktemp("qskd"), tiny_teacher.data
    out = tmp / "student"
    stats = qskd.main(["--preset", "cpu-tiny", "--hidden-dim", "16", "--teacher", tiny_teacher.path,
                       "--output-dir", str(out)] + data)
    return tmp, data, out, stats, tiny_teacher.path


def test_script_one_iteration(script_run):
    tmp, data, out, stats, teacher = script_run
    for k in ("train_loss_agfd", "train_loss_lapd", "train_loss_lapd_0", "train_loss_ce"):
        assert np.isfinite(stats[k]), k
    assert "test_AP" in stats
    ckpt = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert not any(k.startswith("teacher.") for k in ckpt["model"])
    assert set(ckpt["extra"]) == {"adapter.weight", "adapter.bias"}          # 21
    # (that the deployed student loads into methods/baseline.py --eval: test_methods_contract.py)
    # --eval of the distilled student with --visualize: one PNG per image
    ev = qskd.main(["--preset", "cpu-tiny", "--hidden-dim", "16", "--eval", "--resume",
                    str(out / "checkpoint.pth"), "--teacher", teacher,
                    "--visualize", str(tmp / "figs"), "--visualize-images", "2"] + data)
    assert ev["AP"] == stats["test_AP"]
    figs = sorted(os.listdir(tmp / "figs"))
    assert len(figs) == 2 and all(f.endswith(".png") for f in figs)


def test_script_refuses_unsupported_pair(script_run):
    tmp, data, _, _, teacher = script_run
    with pytest.raises(ValueError, match="same DETR family; got teacher deformable_detr -> student dino"):
        qskd.main(["--preset", "cpu-tiny", "--variant", "dino", "--teacher", teacher] + data)


# ------------------------------------------------------------------------------------------
# CUDA (run by the lead on a GPU): same selection and losses as on CPU; bf16 autocast runs
# ------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["deformable_detr", "dab_detr", "dino"])
def test_cuda_matches_cpu_and_runs_under_amp(variant):
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        teacher, student = tiny_pair(variant, dn_number=0) if variant == "dino" else tiny_pair(variant)
        cpu = qskd.QSKD(qskd.QSKDConfig(), teacher, student, 4).train()
        gpu = copy.deepcopy(cpu).cuda().train()
        images, masks, targets = tiny_batch()
        t_gpu = [{k: v.cuda() for k, v in t.items()} for t in targets]
        out_c = cpu(images, masks, targets)
        out_g = gpu(images.cuda(), masks.cuda(), t_gpu)
        for k in ("loss_agfd", "loss_lapd", "loss_lapd_0", "loss_ce"):
            torch.testing.assert_close(out_g[k].cpu(), out_c[k].detach(), rtol=1e-3, atol=1e-4)
        t_enc, t_dec = gpu.teacher_forward(images.cuda(), masks.cuda())
        s_dec = gpu.student.decode(gpu.student.encode(images.cuda(), masks.cuda()))
        sel_g = gpu.select(t_enc, t_dec, s_dec, t_gpu)
        t_enc, t_dec = cpu.teacher_forward(images, masks)
        sel_c = cpu.select(t_enc, t_dec, student.decode(student.encode(images, masks)), targets)
        for a, b in zip(sel_g["s_groups"], sel_c["s_groups"]):
            assert torch.equal(a.group.cpu(), b.group)
        torch.testing.assert_close(sel_g["mask"].cpu(), sel_c["mask"], rtol=1e-3, atol=1e-4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            amp = gpu(images.cuda(), masks.cuda(), t_gpu)
        loss = sum(amp[k].float() * gpu.weight_dict[k] for k in amp if k in gpu.weight_dict)
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is None for p in gpu.teacher.parameters())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
