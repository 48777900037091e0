"""methods/gdetkd.py: SGFI and CKD against float64 formulas written here, the method's
invariants (numbered 1-18 in the tests below), the wiring (frozen teacher, student-side
modules trained and checkpointed apart from the student) and a one-iteration run of the script."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import gdetkd  # noqa: E402
from common import engine  # noqa: E402
from common.detr import build_model  # noqa: E402
from common.distill import freeze  # noqa: E402
from common.distributed import all_gather_rows  # noqa: E402

SMALL = dict(backbone="tiny", width=8, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
             dim_feedforward=64, num_queries=10, dropout=0.0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster than two fighting over a shared CPU (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(variant, **kw):
    extra = dict(num_feature_levels=3) if variant in ("deformable_detr", "dino") else {}
    if variant == "dino":
        extra["dn_number"] = 4
    return build_model(variant, 5, **{**SMALL, **extra, **kw})


def batch():
    images = torch.randn(2, 3, 64, 80)
    masks = torch.zeros(2, 64, 80, dtype=torch.bool)
    masks[1, :, 60:] = True  # image 1 is 60 px wide, padded to 80
    targets = [{"labels": torch.tensor([1, 2]), "size": torch.tensor([64, 80]),
                "boxes": torch.tensor([[.3, .4, .2, .3], [.6, .5, .4, .5]])},
               {"labels": torch.tensor([3]), "size": torch.tensor([64, 60]),
                "boxes": torch.tensor([[.5, .5, .3, .3]])}]
    return images, masks, targets


def iou64(a, b):
    """Pairwise IoU of xyxy boxes, float64, written out."""
    a, b = a.double(), b.double()
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter)


# ------------------------------------------------------------------------------------------
# SGFI
# ------------------------------------------------------------------------------------------

def conv_s2_nopad(x, w, b):
    """3x3 stride-2 unpadded convolution written as a sum over the kernel taps (float64)."""
    H = (x.shape[-1] - 3) // 2 + 1
    out = b[None, :, None, None].expand(x.shape[0], -1, H, H).clone()
    for i in range(3):
        for j in range(3):
            patch = x[:, :, i:i + 2 * H - 1:2, j:j + 2 * H - 1:2]  # (N,C,H,H)
            out = out + torch.einsum("oc,nchw->nohw", w[:, :, i, j], patch)
    return out


def sgfi_reference(sgfi, S_levels, T):
    d = lambda t: t.detach().double()  # noqa: E731
    S = torch.stack([torch.einsum("oc,rchw->rohw", d(a.weight)[:, :, 0, 0], d(x)) +
                     d(a.bias)[None, :, None, None] for a, x in zip(sgfi.adapters, S_levels)])
    e1, e2 = sgfi.embed[0], sgfi.embed[2]

    def embed(x):
        h = conv_s2_nopad(x, d(e1.weight), d(e1.bias)).clamp(min=0)
        return conv_s2_nopad(h, d(e2.weight), d(e2.bias)).clamp(min=0).flatten(1)

    L, R = S.shape[:2]
    k_t = embed(d(T))
    sim = torch.stack([(embed(S[l]) * k_t).sum(1) for l in range(L)]) / math.exp(sgfi.log_tau.item())
    a = torch.exp(sim - sim.max(0).values) / torch.exp(sim - sim.max(0).values).sum(0)  # levels
    agg = sum(a[l][:, None, None, None] * S[l] for l in range(L))
    return ((agg - d(T)) ** 2).mean(), a


def test_sgfi_matches_float64_reference_and_weights_sum_to_one():  # invariant 1
    sgfi = gdetkd.SGFI([6, 4, 6], 8)
    with torch.no_grad():
        sgfi.log_tau.fill_(0.3)
    S = [torch.randn(5, c, 7, 7) for c in (6, 4, 6)]
    T = torch.randn(5, 8, 7, 7)
    loss, S_hat, a = sgfi(S, T)
    ref_loss, ref_a = sgfi_reference(sgfi, S, T)
    assert a.shape == (3, 5)
    torch.testing.assert_close(a.double(), ref_a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.sum(0), torch.ones(5))
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)


def test_embed_maps_7x7_to_64_vector():  # invariant 5
    sgfi = gdetkd.SGFI([16], 16)
    assert sgfi.embed(torch.randn(3, 16, 7, 7)).shape == (3, 64, 1, 1)


def identity_adapters(sgfi):
    with torch.no_grad():
        for a in sgfi.adapters:
            a.weight.copy_(torch.eye(a.weight.shape[0])[:, :, None, None])
            a.bias.zero_()


def test_zero_loss_when_every_level_is_the_teacher():  # invariant 3
    sgfi = gdetkd.SGFI([8, 8, 8, 8], 8)
    identity_adapters(sgfi)
    T = torch.randn(6, 8, 7, 7)
    loss, S_hat, _ = sgfi([T.clone() for _ in range(4)], T)
    assert float(loss.detach()) < 1e-10
    torch.testing.assert_close(S_hat, T)


def test_one_level_is_plain_adapted_mse():  # invariant 4
    sgfi = gdetkd.SGFI([6], 8)
    S, T = torch.randn(4, 6, 7, 7), torch.randn(4, 8, 7, 7)
    loss, _, a = sgfi([S], T)
    w, b = sgfi.adapters[0].weight.detach().double()[:, :, 0, 0], sgfi.adapters[0].bias.detach().double()
    ref = ((torch.einsum("oc,rchw->rohw", w, S.double()) + b[None, :, None, None] - T.double()) ** 2).mean()
    torch.testing.assert_close(a, torch.ones(1, 4))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-8)


def test_training_concentrates_weight_on_the_matching_level():  # invariant 2
    sgfi = gdetkd.SGFI([8, 8, 8], 8)
    identity_adapters(sgfi)
    for a in sgfi.adapters:
        a.requires_grad_(False)
    T = torch.randn(8, 8, 7, 7)
    S = [torch.randn(8, 8, 7, 7), T.clone(), torch.randn(8, 8, 7, 7)]  # level 1 is the teacher
    opt = torch.optim.Adam([p for p in sgfi.parameters() if p.requires_grad], lr=2e-2)
    with torch.no_grad():
        start = sgfi(S, T)[2][1]
    for _ in range(30):  # f_embed and tau train; the adapters stay the identity
        loss, _, _ = sgfi(S, T)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = sgfi(S, T)[2][1]
    assert float(start.mean()) < 0.9 and float(end.min()) > 0.95


def test_sgfi_gradients():  # invariant 6
    sgfi = gdetkd.SGFI([6, 6], 8)
    S = [torch.randn(3, 6, 7, 7, requires_grad=True) for _ in range(2)]
    T = torch.randn(3, 8, 7, 7, requires_grad=True)
    sgfi(S, T)[0].backward()
    assert T.grad is None
    for name, p in sgfi.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in S)
    fixed = gdetkd.SGFI([6], 8, learn_tau=False)
    assert "log_tau" not in dict(fixed.named_parameters()) and float(fixed.log_tau) == 0.0


# ------------------------------------------------------------------------------------------
# CKD
# ------------------------------------------------------------------------------------------

def ckd_reference(z_s, z_t, queue, img, boxes, gamma, thr, with_pos):
    u = F.normalize(z_s.double(), dim=1)
    keys = F.normalize(torch.cat([z_t, queue]).double(), dim=1)
    iou = iou64(boxes, boxes)
    R, total = z_s.shape[0], 0.0
    for i in range(R):
        pos = math.exp(float(u[i] @ keys[i]) / gamma)
        neg = 0.0
        for j in range(keys.shape[0]):
            if j == i or (j < R and img[j] == img[i] and iou[i, j] > thr):
                continue
            neg += math.exp(float(u[i] @ keys[j]) / gamma)
        total += -math.log(pos / (pos + neg)) if with_pos else (-math.log(pos / neg) if neg else 0.0)
    return total / R


@pytest.mark.parametrize("with_pos", [True, False])
def test_ckd_matches_float64_reference(with_pos):
    z_s, z_t, queue = torch.randn(6, 5), torch.randn(6, 5), torch.randn(4, 5)
    img = torch.tensor([0, 0, 0, 1, 1, 1])
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30],
                          [0, 0, 10, 10], [0, 0, 10, 11], [40, 40, 50, 50]], dtype=torch.float)
    loss = gdetkd.ckd_loss(z_s, z_t, queue, img, boxes, gamma=0.5, iou_thr=0.5,
                           positive_in_denominator=with_pos)
    ref = ckd_reference(z_s, z_t, queue, img, boxes, 0.5, 0.5, with_pos)
    assert abs(float(loss) - ref) < 1e-5 * max(1.0, abs(ref))


def test_ckd_random_embeddings_give_log_one_plus_negatives():  # invariant 7
    R, K = 32, 64
    boxes = torch.tensor([[10.0 * i, 0, 10.0 * i + 5, 5] for i in range(R)])  # no overlaps
    loss = gdetkd.ckd_loss(torch.randn(R, 8192), torch.randn(R, 8192), torch.randn(K, 8192),
                           torch.zeros(R, dtype=torch.long), boxes)
    assert abs(float(loss) - math.log(1 + R - 1 + K)) < 0.1


def test_ckd_is_zero_for_equal_embeddings_and_orthogonal_negatives():  # invariant 8
    z = torch.eye(6) * 3.0
    boxes = torch.tensor([[10.0 * i, 0, 10.0 * i + 5, 5] for i in range(6)])
    loss = gdetkd.ckd_loss(z, z, torch.zeros(0, 6), torch.zeros(6, dtype=torch.long), boxes)
    assert float(loss) < 1e-5  # 5 exp(-1/0.07) ~ 3e-6


def test_ckd_overlapping_same_image_negatives_are_excluded():  # invariant 9
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9.]])  # IoU 0.9
    empty = torch.zeros(0, 8)
    for _ in range(3):  # whatever the embeddings: each RoI's only negative is dropped -> 0
        z_s, z_t = torch.randn(2, 8), torch.randn(2, 8)
        same = torch.tensor([0, 0])
        for with_pos in (True, False):
            assert float(gdetkd.ckd_loss(z_s, z_t, empty, same, boxes,
                                         positive_in_denominator=with_pos)) == 0.0
        # kept when the two RoIs are in different images, or the threshold is above their IoU
        other = gdetkd.ckd_loss(z_s, z_t, empty, torch.tensor([0, 1]), boxes)
        high = gdetkd.ckd_loss(z_s, z_t, empty, same, boxes, iou_thr=0.95)
        ref = ckd_reference(z_s, z_t, empty, [0, 1], boxes, 0.07, 0.5, True)
        assert float(other) > 0 and abs(float(other) - ref) < 1e-4 * max(1, ref)
        assert abs(float(high) - float(other)) < 1e-5 * max(1, ref)


def test_queue_is_bounded_and_detached():  # invariants 10 and 11
    q = gdetkd.TeacherQueue(10)
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_rows(x) is x  # one process: identity
    for i in range(15):
        q.push(x * (i + 1))
    assert len(q.items) == 10
    keys = q.keys(torch.zeros(1, 4))
    assert keys.shape == (30, 4) and not keys.requires_grad and keys.grad_fn is None
    torch.testing.assert_close(keys[:3], (x * 6).detach())  # the oldest kept: iteration 6
    assert gdetkd.TeacherQueue(0).keys(torch.zeros(1, 4)).shape == (0, 4)


# ------------------------------------------------------------------------------------------
# Levels and RoIs
# ------------------------------------------------------------------------------------------

def test_teacher_level_rule():  # invariant 13
    cfg = gdetkd.GDetKDConfig()
    sides = torch.tensor([224.0, 112.0, 448.0, 896.0, 50.0, 2000.0])
    rois = torch.stack([torch.zeros(6), torch.zeros(6), torch.zeros(6), sides, sides], 1)
    lv = gdetkd.teacher_levels(rois, [8, 16, 32, 64], cfg)
    assert lv.tolist() == [1, 0, 2, 3, 0, 3]  # k = 4, 3, 5, 6, clamped 3, clamped 6; index k - 3
    assert gdetkd.teacher_levels(rois, [32], cfg).tolist() == [0] * 6
    assert gdetkd.teacher_levels(rois, [8, 16, 32], cfg).tolist() == [1, 0, 2, 2, 0, 2]


def test_roi_align_constant_map_and_stride_scaling():  # invariant 14
    cfg = gdetkd.GDetKDConfig()
    rois = torch.tensor([[0, 8.0, 8.0, 40.0, 24.0], [1, 16.0, 0.0, 48.0, 32.0]])
    const = [torch.full((2, 3, 8, 8), 2.5), torch.full((2, 3, 4, 4), -1.0)]
    for pooled, v in zip(gdetkd.pool_levels(const, [8, 16], rois, cfg), (2.5, -1.0)):
        torch.testing.assert_close(pooled, torch.full((2, 3, 7, 7), v))
    # a map holding the x index of each cell: the pooled mean is the box centre / stride - 0.5
    model = make("deformable_detr").eval()
    images, masks, _ = batch()
    with torch.no_grad():
        enc = model.encode(images, masks)
    maps, strides = gdetkd.detr_pyramid(model, enc, "input_proj")
    assert strides == [8, 16, 32]
    for m, s in zip(maps, strides):
        assert m.shape[-2:] == (math.ceil(64 / s), math.ceil(80 / s))
    ramp = [torch.arange(m.shape[-1], dtype=torch.float).expand(2, 1, *m.shape[-2:]) for m in maps]
    box = torch.tensor([[0, 16.0, 16.0, 48.0, 40.0]])
    for pooled, s in zip(gdetkd.pool_levels(ramp, strides, box, cfg), strides):
        assert abs(float(pooled.mean()) - (32.0 / s - 0.5)) < 1e-4
    mem, mstrides = gdetkd.detr_pyramid(model, enc, "memory")
    assert mstrides == strides and [m.shape for m in mem] == [m.shape for m in maps]
    torch.testing.assert_close(mem[1].flatten(2).transpose(1, 2),
                               enc.memory[:, enc.level_start_index[1]:enc.level_start_index[2]])


@pytest.mark.parametrize("tv,sv", [("deformable_detr", "deformable_detr"),
                                   ("dino", "deformable_detr"), ("deformable_detr", "dino")])
def test_query_embeddings_batched_equal_image_by_image(tv, sv, monkeypatch):
    """The batched RoI-query pass (padding + a per-image self-attention mask) gives each RoI
    what a pass over its own image's RoIs alone gives, whatever the RoI order."""
    torch.manual_seed(0)
    t, s = make(tv).eval(), make(sv).eval()
    d = gdetkd.GDetKD(gdetkd.GDetKDConfig(), t, s, 5).eval()
    images, masks, targets = batch()
    with torch.no_grad():
        enc_s, enc_t = s.encode(images, masks), t.encode(images, masks)
        rois, _, _ = gdetkd.sample_rois(s.decode(enc_s).boxes[-1], targets, d.cfg)
        rois = rois[torch.randperm(len(rois), generator=torch.Generator().manual_seed(1))]
        sizes = [tuple(float(v) for v in tt["size"]) for tt in targets]
        got_s, got_t = d.query_embeddings(enc_s, enc_t, rois, sizes)
        monkeypatch.setattr(gdetkd, "MULTI_SCALE", ())   # the image-by-image path
        ref_s, ref_t = d.query_embeddings(enc_s, enc_t, rois, sizes)
    assert len(set(rois[:, 0].tolist())) == 2 and got_s.shape == (len(rois), s.hidden_dim)
    torch.testing.assert_close(got_s, ref_s, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_t, ref_t, rtol=0, atol=1e-5)


def test_sample_rois_invariants():  # invariants 15 and 16
    cfg = gdetkd.GDetKDConfig(rois_per_img=12)
    g = torch.Generator().manual_seed(0)
    gt0 = torch.tensor([[.3, .4, .2, .3], [.6, .5, .4, .5], [.2, .2, .1, .1]])
    pred = torch.rand(2, 30, 4, generator=g) * 0.5 + 0.25
    pred[0, :5] = gt0[[0, 0, 1, 1, 2]] + 0.01  # near-GT predictions: positives
    targets = [{"boxes": gt0, "size": torch.tensor([64, 80])},
               {"boxes": torch.rand(20, 4, generator=g) * 0.3 + 0.3, "size": torch.tensor([64, 60])}]
    rois, is_pos, is_gt = gdetkd.sample_rois(pred, targets, cfg, g)
    for b, t in enumerate(targets):
        h, w = t["size"].tolist()
        mine = rois[rois[:, 0] == b, 1:]
        c = t["boxes"]
        gt_xyxy = torch.stack([(c[:, 0] - c[:, 2] / 2) * w, (c[:, 1] - c[:, 3] / 2) * h,
                               (c[:, 0] + c[:, 2] / 2) * w, (c[:, 1] + c[:, 3] / 2) * h], 1)
        for box in gt_xyxy:
            assert (mine - box).abs().amax(1).min() < 1e-4  # every GT box is a RoI of its image
        assert (mine[:, 2] <= w + 1e-4).all() and (mine[:, 3] <= h + 1e-4).all()  # not in padding
        pos = is_pos[rois[:, 0] == b]
        assert (iou64(mine[pos], gt_xyxy).amax(1) >= 0.5 - 1e-6).all()
        if (~pos).any():
            assert (iou64(mine[~pos], gt_xyxy).amax(1) < 0.5).all()
        n_gt = len(c)
        assert int(pos.sum()) <= max(n_gt, int(0.25 * 12))
        assert len(mine) <= max(n_gt, 12)
        assert int(is_gt[rois[:, 0] == b].sum()) == n_gt
    assert int((rois[:, 0] == 0).sum()) == 12 and int(is_pos[rois[:, 0] == 0].sum()) == 3
    assert int((rois[:, 0] == 1).sum()) == 20  # more GT than rois_per_img: GT only
    # a larger quota: the near-GT predictions join the GT as positives, negatives fill the rest
    rois, is_pos, is_gt = gdetkd.sample_rois(pred[:1], targets[:1], gdetkd.GDetKDConfig(rois_per_img=40), g)
    p = pred[0]
    p_xyxy = torch.stack([p[:, 0] - p[:, 2] / 2, p[:, 1] - p[:, 3] / 2,
                          p[:, 0] + p[:, 2] / 2, p[:, 1] + p[:, 3] / 2], 1) * torch.tensor([80, 64, 80, 64])
    g_xyxy = rois[is_gt, 1:]
    n_pos_pred = int((iou64(p_xyxy, g_xyxy).amax(1) >= 0.5).sum())
    assert n_pos_pred >= 5
    want_pos = 3 + min(n_pos_pred, 10 - 3)  # quota max(3, 0.25 * 40) = 10
    assert int(is_pos.sum()) == want_pos and int(is_gt.sum()) == 3
    assert len(rois) == want_pos + min(30 - n_pos_pred, 40 - want_pos)
    # gt_jitter adds one jittered copy per GT box to the candidates
    cfg_j = gdetkd.GDetKDConfig(rois_per_img=80, gt_jitter=0.1)
    assert len(gdetkd.sample_rois(pred[:1], targets[:1], cfg_j, g)[0]) == 3 + 30 + 3
    # no GT in an image: predictions only, all negative
    no_gt = [{"boxes": torch.zeros(0, 4), "size": torch.tensor([64, 80])}]
    rois, is_pos, _ = gdetkd.sample_rois(pred[:1], no_gt, cfg)
    assert len(rois) == 12 and not is_pos.any()


# ------------------------------------------------------------------------------------------
# The distiller
# ------------------------------------------------------------------------------------------

def distiller(tv="deformable_detr", sv="deformable_detr", t_kw=None, s_kw=None, **cfg):
    teacher = freeze(make(tv, **(t_kw or {})))
    student = make(sv, **(s_kw or {}))
    return gdetkd.GDetKD(gdetkd.GDetKDConfig(**{"rois_per_img": 8, **cfg}), teacher, student, 5)


@pytest.mark.parametrize("tv,sv,emb", [("deformable_detr", "deformable_detr", "query"),
                                        ("dino", "deformable_detr", "roi"),
                                        ("deformable_detr", "conditional_detr", "query"),
                                        ("dino", "conditional_detr", "roi"),
                                        ("conditional_detr", "dab_detr", "query")])
def test_gradients_reach_the_student_never_the_teacher(tv, sv, emb):  # invariants 6, 17
    d = distiller(tv, sv, t_kw=dict(hidden_dim=48), ckd_embed=emb).train()
    assert not d.teacher.training  # train() keeps the teacher in eval mode
    images, masks, targets = batch()
    with torch.no_grad():
        before = d.teacher(images, masks)["pred_boxes"].clone()
    losses = d(images, masks, targets)
    assert {"loss_sgfi", "loss_ckd", "loss_ce", "loss_bbox", "loss_giou"} <= set(losses)
    assert set(losses) - {"class_error"} <= set(d.weight_dict)
    assert d.weight_dict["loss_sgfi"] == 1.0 and d.weight_dict["loss_ckd"] == 0.5
    loss = sum(losses[k] * d.weight_dict[k] for k in losses if k in d.weight_dict)
    groups = engine.param_groups(d, 1e-3, 1e-3)
    opt = torch.optim.AdamW(groups)
    in_opt = {id(p) for g in groups for p in g["params"]}
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(p.grad is None and id(p) not in in_opt for p in d.teacher.parameters())
    for name, p in d.named_parameters():
        if name.startswith(("sgfi.", "ckd_adapter.")):
            assert id(p) in in_opt and p.grad is not None and p.grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in
               d.student.backbone.named_parameters() if "layer2" in n)  # C3 (SGFI)
    with torch.no_grad():
        torch.testing.assert_close(d.teacher(images, masks)["pred_boxes"], before, rtol=0, atol=0)
    assert len(d.queue.items) == 1 and not d.queue.items[0].requires_grad


@pytest.mark.parametrize("sv,opts", [
    ("deformable_detr", dict(pyramid_source="memory", ckd_shared_head=True, learn_tau=False)),
    ("conditional_detr", dict(student_pyramid="native", ckd_positive_in_denominator=False)),
    ("deformable_detr", dict(shared_adapter=True, gt_jitter=0.1, ckd_queue=0))])
def test_options_run_and_train_their_modules(sv, opts):
    d = distiller("dino", sv, **opts).train()
    losses = d(*batch())
    sum(losses[k] * d.weight_dict[k] for k in losses if k in d.weight_dict).backward()
    if opts.get("student_pyramid") == "native" or opts.get("shared_adapter"):
        assert len(d.sgfi.adapters) == 1
    if opts.get("ckd_shared_head"):
        assert d.ckd_head.weight.grad is not None and d.ckd_head.weight.grad.abs().sum() > 0
    if opts.get("learn_tau") is False:
        assert "sgfi.log_tau" not in dict(d.named_parameters())
    assert d.queue.items is None if opts.get("ckd_queue") == 0 else len(d.queue.items) == 1
    for name, p in d.named_parameters():
        if name.startswith(("sgfi.", "ckd_")):
            assert p.grad is not None, name


def test_ckd_query_mode_feeds_identical_frozen_queries(monkeypatch):  # invariant 12
    d = distiller("deformable_detr", "deformable_detr", sgfi=False).train()
    seen = {"t": [], "s": []}
    for key, model in (("t", d.teacher), ("s", d.student)):
        orig = model.decode

        def rec(enc, queries=None, targets=None, return_attention=False, _o=orig, _k=key):
            if queries is not None:
                seen[_k].append(queries)
            return _o(enc, queries, targets, return_attention)
        monkeypatch.setattr(model, "decode", rec)
    images, masks, targets = batch()
    d(images, masks, targets)
    assert len(seen["t"]) == len(seen["s"]) == 1  # one batched pass per model
    for qt, qs in zip(seen["t"], seen["s"]):
        assert torch.equal(qt.attn_mask, qs.attn_mask) and qt.attn_mask.shape[0] == 2
        for f in ("content", "pos", "reference"):
            a, b = getattr(qt, f), getattr(qs, f)
            assert a.grad_fn is None and b.grad_fn is None and not a.requires_grad
            assert torch.equal(a, b), f


def test_dino_student_rois_exclude_denoising_queries(monkeypatch):  # invariant 15
    d = distiller("deformable_detr", "dino").train()
    got = []
    orig = gdetkd.sample_rois
    monkeypatch.setattr(gdetkd, "sample_rois", lambda p, *a, **k: got.append(p.shape) or orig(p, *a, **k))
    images, masks, targets = batch()
    losses = d(images, masks, targets)
    assert any(k.endswith("_dn") for k in losses)  # denoising groups were there
    assert got == [(2, SMALL["num_queries"], 4)]


def test_zero_sgfi_when_student_equals_teacher():
    student = make("conditional_detr")
    teacher = freeze(make("conditional_detr"))
    teacher.load_state_dict(student.state_dict())
    d = gdetkd.GDetKD(gdetkd.GDetKDConfig(ckd=False, student_pyramid="native", rois_per_img=8),
                      teacher, student, 5).train()
    identity_adapters(d.sgfi)
    losses = d(*batch())
    assert float(losses["loss_sgfi"].detach()) < 1e-10 and "loss_ckd" not in losses


def test_unsupported_pair_and_bad_config_fail_clearly():
    with pytest.raises(ValueError, match="teacher detr -> student deformable_detr"):
        gdetkd.GDetKD(gdetkd.GDetKDConfig(), freeze(build_model("detr", 5, **SMALL)),
                      make("deformable_detr"), 5)
    with pytest.raises(ValueError, match="pyramid_source"):
        gdetkd.GDetKDConfig(pyramid_source="fpn")
    with pytest.raises(ValueError, match="ckd_gamma"):
        gdetkd.GDetKDConfig(ckd_gamma=0.0)
    with pytest.raises(ValueError, match="needs sgfi"):
        gdetkd.GDetKDConfig(sgfi=False, ckd_embed="roi")


# ------------------------------------------------------------------------------------------
# The script
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_teacher):
    tmp = tmp_path_factory.mktemp("gdetkd")
    common = ["--preset", "cpu-tiny"] + tiny_teacher.data
    teacher = tiny_teacher.path
    stats = gdetkd.main(common + ["--teacher", teacher, "--output-dir", str(tmp / "student"),
                                  "--rois-per-img", "16"])
    return common, tmp, teacher, stats


def test_one_iteration_run_and_checkpoint(run):  # invariant 18
    common, tmp, teacher, stats = run
    assert stats["epoch"] == 0 and math.isfinite(stats["train_loss_sgfi"])
    assert math.isfinite(stats["train_loss_ckd"]) and "test_AP" in stats
    ckpt = torch.load(tmp / "student" / "checkpoint.pth", weights_only=True)
    assert not any(k.startswith(("sgfi", "ckd", "roi_queries", "teacher")) for k in ckpt["model"])
    assert any(k.startswith("sgfi.") for k in ckpt["extra"])
    assert any(k.startswith("ckd_head.") for k in ckpt["extra"])     # f_theta (equal widths)
    assert len(ckpt["extra"]["queue._extra_state"]["items"]) == 1       # the queue, for resume
    # (baseline --eval of the checkpoint and --visualize: test_methods_contract.py)


def _gather_worker(rank, port):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mine = torch.full((2 + rank, 3), float(rank))  # 2 rows on rank 0, 3 on rank 1
        got = all_gather_rows(mine)
        assert got.shape == (5, 3) and got[:2].eq(0).all() and got[2:].eq(1).all(), got
        q = gdetkd.TeacherQueue(2)
        for shift in (0, 10, 20):
            q.push(all_gather_rows(mine + shift))  # the caller pushes the gathered batch
        keys = q.keys(mine)  # the last 2 iterations of both processes
        assert keys.shape == (10, 3) and float(keys.min()) == 10.0, keys
    finally:
        dist.destroy_process_group()


def test_queue_gathers_all_processes():  # the queue is all-gathered (gloo, 2 forked processes)
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gather_worker, args=(port,), nprocs=2, start_method="fork")


def test_script_refuses_unsupported_pair(run):
    common, tmp, teacher, _ = run
    with pytest.raises(ValueError, match="teacher deformable_detr -> student detr"):
        gdetkd.main(common + ["--teacher", teacher, "--variant", "detr", "--output-dir",
                              str(tmp / "bad")])


# ------------------------------------------------------------------------------------------
# The shared projection f_theta, keys treated alike, the queue in the checkpoint
# ------------------------------------------------------------------------------------------

def test_ckd_keys_current_and_queued_both_carry_their_gradient():
    """Current and queued keys are used as given: both keep the gradient they carry (through a
    shared f_theta), and the loss and every gradient equal a float64 loop reference."""
    g = torch.Generator().manual_seed(2)
    z_s, z_t, queue = (torch.randn(n, 5, generator=g, dtype=torch.float64, requires_grad=True)
                       for n in (4, 4, 3))
    img = torch.tensor([0, 0, 1, 1])
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30.]])
    gdetkd.ckd_loss(z_s, z_t, queue, img, boxes, gamma=0.2).backward()
    leaves = [z_s.detach().clone().requires_grad_(True), z_t.detach().clone().requires_grad_(True),
              queue.detach().clone().requires_grad_(True)]
    u = F.normalize(leaves[0], dim=1)
    keys = F.normalize(torch.cat(leaves[1:]), dim=1)
    iou = iou64(boxes, boxes)
    total = 0.0
    for i in range(4):
        terms = [u[i] @ keys[i] / 0.2]
        terms += [u[i] @ keys[j] / 0.2 for j in range(7)
                  if j != i and not (j < 4 and img[j] == img[i] and iou[i, j] > 0.5)]
        total = total - (terms[0] - torch.logsumexp(torch.stack(terms), 0))
    (total / 4).backward()
    for got, want in zip((z_s, z_t, queue), leaves):
        assert got.grad is not None
        torch.testing.assert_close(got.grad, want.grad)


def test_shared_head_is_the_default_and_feeds_every_key(monkeypatch):
    d = distiller().train()                       # equal widths: f_theta only, no adapter
    assert gdetkd.GDetKDConfig().ckd_shared_head and d.ckd_head is not None
    assert d.ckd_adapter is None
    seen = {}
    real = gdetkd.ckd_loss

    def spy(z_s, z_t, extra, *a, **k):
        seen.update(z_s=z_s, z_t=z_t, extra=extra)
        return real(z_s, z_t, extra, *a, **k)
    monkeypatch.setattr(gdetkd, "ckd_loss", spy)
    d(*batch())                                   # step 1 fills the queue
    raw = d.queue.keys(torch.zeros(1, 32))
    d(*batch())                                   # step 2 reads it
    torch.testing.assert_close(seen["extra"], d.ckd_head(raw))   # queued keys through f_theta
    assert seen["z_t"].requires_grad and seen["extra"].requires_grad   # alike, both with grad
    adapter = distiller(ckd_shared_head=False)    # [3p-G]: a student adapter, raw keys
    assert adapter.ckd_head is None and adapter.ckd_adapter is not None


def test_queue_is_saved_in_the_checkpoint_and_restored(tmp_path):
    d = distiller().train()
    for _ in range(2):
        d(*batch())
    state = engine.trainable_state(d)
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    fresh = distiller().train()
    assert fresh.queue.keys(torch.zeros(1, 32)).shape[0] == 0
    engine.load_trainable_state(fresh, torch.load(path, weights_only=True), "test checkpoint")
    want = d.queue.keys(torch.zeros(1, 32))
    assert want.shape[0] > 0
    torch.testing.assert_close(fresh.queue.keys(torch.zeros(1, 32)), want, rtol=0, atol=0)
    assert len(fresh.queue.items) == len(d.queue.items) == 2


# (that a resume is exact, the queue included: test_methods_contract.py's
# test_resume_equals_the_uninterrupted_run)
