"""The decoder-layer map wired into each distiller when teacher and student depths differ.

A teacher with 3 decoder layers and a student with 2: student layer 0 must learn from teacher
layer 1 and student layer 1 from teacher layer 2 (``common.distill.teacher_layer_map(2, 3)``,
DETRDistill's ceil rule). For QSKD, DETRDistill and CLoCKDistill one forward of the distiller is
run while both models' encoder and decoder outputs are recorded; every per-layer KD term is then
recomputed from the recorded outputs with the method's own (separately tested) loss functions on
the pair (student layer i, teacher layer [1, 2][i]), and must equal what the distiller returned.
The same recomputation on the identity-truncated pairing [0, 1] must give other values, so a
distiller that used the wrong map would fail here.

G-DetKD is not covered: it distils the student's last decoder layer and the teacher's pyramid
features; it has no decoder-layer map.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import clockdistill  # noqa: E402
import detrdistill  # noqa: E402
import qskd  # noqa: E402
from common import ops  # noqa: E402
from common.detr import build_model  # noqa: E402
from common.distill import freeze, teacher_layer_map  # noqa: E402
from common.matcher import pad_targets  # noqa: E402
from test_method_ddp import square_batch  # noqa: E402  (one-size batches, shared)

NC = 4
SMALL = dict(backbone="tiny", width=8, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
             dim_feedforward=64, num_queries=10, dropout=0.0, num_feature_levels=3)
EXPECTED = [1, 2]   # ceil((i + 1) * 3 / 2) - 1 for student layers i = 0, 1: written out here
WRONG = [0, 1]      # the identity map truncated to the student's depth


def models():
    """A 3-layer teacher (width 48) and a 2-layer student (width 32). Random box and class heads:
    boxes that are not the references and scores away from the focal prior, so each decoder
    layer answers differently (at the prior every teacher layer gives TAFD the same mask)."""
    torch.manual_seed(0)
    teacher = freeze(build_model("deformable_detr", NC, **dict(SMALL, hidden_dim=48,
                                                               dec_layers=3)))
    student = build_model("deformable_detr", NC, **SMALL)
    with torch.no_grad():
        for m in (teacher, student):
            for head in m.bbox_embed:
                head.layers[-1].weight.normal_(0, 0.3)
            for head in m.class_embed:
                head.weight.normal_(0, 0.3)
                head.bias.zero_()
    assert teacher.cfg.dec_layers == 3 and student.cfg.dec_layers == 2
    return teacher, student


def data():
    """Two images of one size, 2 and 3 GT boxes."""
    return square_batch([([1, 2], [[0.3, 0.35, 0.3, 0.4], [0.7, 0.6, 0.35, 0.3]]),
                         ([3, 0, 2], [[0.5, 0.5, 0.4, 0.5], [0.2, 0.7, 0.2, 0.3],
                                      [0.75, 0.25, 0.3, 0.2]])])


class Recorder:
    """Records every ``encode`` / ``decode`` call of a model (its keyword arguments and its
    output) by shadowing the bound methods on the instance."""

    def __init__(self, model):
        self.encoded, self.decoded = [], []
        encode, decode = model.encode, model.decode

        def rec_encode(*args, **kwargs):
            out = encode(*args, **kwargs)
            self.encoded.append(out)
            return out

        def rec_decode(*args, **kwargs):
            out = decode(*args, **kwargs)
            self.decoded.append((kwargs, out))
            return out

        model.encode, model.decode = rec_encode, rec_decode

    def decodes(self, with_queries):
        """The outputs of the decode calls that were (or were not) given explicit queries."""
        return [out for kw, out in self.decoded if (kw.get("queries") is not None) == with_queries]


def run(distiller):
    """One training-mode forward with both models recorded: (losses, teacher rec, student rec)."""
    rec_t, rec_s = Recorder(distiller.teacher), Recorder(distiller.student)
    images, masks, targets = data()
    losses = distiller.train()(images, masks, targets)
    return losses, rec_t, rec_s, targets


def check_map(distiller, terms, losses, keys):
    """``terms(mapping)`` -> {key: value} recomputed for the pairing ``mapping``; it must equal
    the distiller's output for EXPECTED and differ from it for WRONG, term by term."""
    assert teacher_layer_map(2, 3) == EXPECTED
    assert distiller.layer_map == EXPECTED
    right, wrong = terms(EXPECTED), terms(WRONG)
    assert sorted(right) == sorted(keys)
    for k in keys:
        got = losses[k].detach().double()
        assert abs(float(got)) > 1e-6, k  # a term that is there
        torch.testing.assert_close(got, right[k].detach().double(), rtol=1e-5, atol=1e-7, msg=k)
        # the identity-truncated pairing gives another value, well outside the tolerance above
        # (10x), so the check above tells the two maps apart
        assert not torch.isclose(got, wrong[k].detach().double(), rtol=1e-4, atol=0.0), k


# ------------------------------------------------------------------------------------------
# QSKD: LAPD, one term per student layer ("loss_lapd_0", "loss_lapd")
# ------------------------------------------------------------------------------------------

def test_qskd_lapd_pairs_student_layer_i_with_teacher_layer_map_i():
    teacher, student = models()
    cfg = qskd.QSKDConfig()
    d = qskd.QSKD(cfg, teacher, student, NC)
    losses, rec_t, rec_s, targets = run(d)
    (t_dec,), (s_dec,) = rec_t.decodes(False), rec_s.decodes(False)
    assert t_dec.logits.shape[0] == 3 and s_dec.logits.shape[0] == 2

    def terms(mapping):
        with torch.no_grad():
            _, gt_boxes, _, sizes = pad_targets(targets, s_dec.boxes.device)
            M = gt_boxes.shape[1]

            def gqs(boxes, matched):
                return qskd.group_query_selection(boxes.float(), gt_boxes, sizes, matched, cfg.tau,
                                                  cfg.tau_mode, cfg.k_max, cfg.hard_negatives)

            t_match = d.teacher_matcher.match_layers(
                [{"pred_logits": t_dec.logits[l], "pred_boxes": t_dec.boxes[l]} for l in mapping],
                targets)
            s_match = d.criterion.matcher.match_layers(
                [{"pred_logits": s_dec.logits[i], "pred_boxes": s_dec.boxes[i]} for i in range(2)],
                targets)
            pairs = qskd.local_pairs(
                [(s_dec.logits[i].float(), s_dec.boxes[i].float(), t_dec.logits[l].float(),
                  t_dec.boxes[l].float(), gqs(s_dec.boxes[i], s_match[i]),
                  gqs(t_dec.boxes[l], t_match[i]), M) for i, l in enumerate(mapping)], cfg)
        out = {}
        for i, (l, (b, qs, qt)) in enumerate(zip(mapping, pairs)):
            assert b.numel() > 0  # every GT's matched queries make at least one pair
            out["loss_lapd_0" if i == 0 else "loss_lapd"] = qskd.lapd_loss(
                s_dec.logits[i][b, qs].float(), s_dec.boxes[i][b, qs].float(),
                t_dec.logits[l][b, qt].float(), t_dec.boxes[l][b, qt].float(), cfg)
        return out

    check_map(d, terms, losses, ["loss_lapd_0", "loss_lapd"])


# ------------------------------------------------------------------------------------------
# DETRDistill: HMLD, TAFD, QPAD and the InfoNCE term, one entry each per student layer
# ------------------------------------------------------------------------------------------

def test_detrdistill_terms_pair_student_layer_i_with_teacher_layer_map_i():
    teacher, student = models()
    cfg = detrdistill.DETRDistillConfig()
    d = detrdistill.DETRDistill(cfg, teacher, student, NC)
    losses, rec_t, rec_s, targets = run(d)
    (t_enc,), (t_dec,) = rec_t.encoded, rec_t.decodes(False)
    (s_dec,), (q_dec,) = rec_s.decodes(False), rec_s.decodes(True)  # main pass, QPAD group
    s_enc = rec_s.encoded[0]
    assert t_dec.logits.shape[0] == 3 and s_dec.logits.shape[0] == q_dec.logits.shape[0] == 2
    sfx = ["_0", ""]

    def terms(mapping):
        out = {}
        f_t = detrdistill.level_maps(t_enc, cfg.feature_source)
        f_s = [a(f) for a, f in zip(d.feat_adapters, detrdistill.level_maps(s_enc, cfg.feature_source))]
        assign = d.teacher_matcher.match_layers(
            [{"pred_logits": t_dec.logits[l], "pred_boxes": t_dec.boxes[l]} for l in mapping],
            targets)
        for i, l in enumerate(mapping):
            t_probs = t_dec.logits[l].float().sigmoid()
            t_boxes = detrdistill.teacher_pseudo_boxes(t_dec.boxes[l].float(),
                                                       cfg.clamp_teacher_boxes)
            # HMLD: the student-teacher matching of this pair, then its loss
            cost = detrdistill.hmld_cost(s_dec.logits[i].float(), s_dec.boxes[i].float(), t_probs,
                                         t_boxes, cfg.hmld_cost_class, cfg.hmld_cost_bbox,
                                         cfg.hmld_cost_giou)
            pairs = ops.linear_sum_assignment(cost)
            cls_, bbox, giou = detrdistill.hmld_loss(s_dec.logits[i].float(),
                                                     s_dec.boxes[i].float(), t_probs, t_boxes,
                                                     pairs)
            out.update({f"loss_hmld_cls{sfx[i]}": cls_, f"loss_hmld_bbox{sfx[i]}": bbox,
                        f"loss_hmld_giou{sfx[i]}": giou})
            # InfoNCE between the matched student and teacher states of this pair
            u = torch.cat([s_dec.hs[i][b, si] for b, (si, _) in enumerate(pairs)])
            v = torch.cat([t_dec.hs[l][b, ti] for b, (_, ti) in enumerate(pairs)])
            out[f"loss_nce{sfx[i]}"] = detrdistill.info_nce(
                d.proj_student(u.float()), d.proj_teacher(v.float()), cfg.nce_temperature)
            # TAFD: the mask from teacher layer l's selected queries, summed over levels
            hs, quality, _, _ = detrdistill.tafd_select(t_probs, t_dec.boxes[l].float(),
                                                        t_dec.hs[l].float(), targets,
                                                        cfg.tafd_topk, cfg.quality_form,
                                                        cfg.quality_gamma)
            out[f"loss_tafd{sfx[i]}"] = sum(
                detrdistill.tafd_loss(detrdistill.tafd_mask(hs, quality, a.float(),
                                                             cfg.tafd_mask_floor),
                                      a.float(), b.float()) for a, b in zip(f_t, f_s))
            # QPAD: student layer i of the teacher-query group, with teacher layer l's assignment
            num_pos = torch.tensor(float(sum(len(q) for q, _ in assign[i]))).clamp(min=1)
            group = {"pred_logits": q_dec.logits[i].float(), "pred_boxes": q_dec.boxes[i].float()}
            g = d.criterion.group_losses(group, targets, assign[i], num_pos, "_qpad")
            out.update({f"loss_qpad_{k}{sfx[i]}": g[f"loss_{k}_qpad"]
                        for k in ("ce", "bbox", "giou")})
        return out

    keys = [f"loss_{k}{s}" for s in sfx for k in ("hmld_cls", "hmld_bbox", "hmld_giou", "nce",
                                                  "tafd", "qpad_ce", "qpad_bbox", "qpad_giou")]
    check_map(d, terms, losses, keys)


# ------------------------------------------------------------------------------------------
# CLoCKDistill: L_tcld, the sum over student layers of one term per (layer i, teacher layer)
# ------------------------------------------------------------------------------------------

def test_clockdistill_tcld_pairs_student_layer_i_with_teacher_layer_map_i():
    teacher, student = models()
    cfg = clockdistill.CLoCKConfig()
    d = clockdistill.CLoCKDistiller(cfg, teacher, student, NC)
    losses, rec_t, rec_s, targets = run(d)
    # the target-aware pass: each image's GT queries decoded on its own by both models
    t_img, s_img = rec_t.decodes(True), rec_s.decodes(True)
    assert len(t_img) == len(s_img) == len(targets)
    zt = torch.cat([o.logits[:, 0] for o in t_img], 1)                 # (3,N,C), N = all GT
    bt = torch.cat([o.boxes[:, 0] for o in t_img], 1)
    zs = torch.cat([o.logits[:, 0] for o in s_img], 1)                 # (2,N,C)
    bs = torch.cat([o.boxes[:, 0] for o in s_img], 1)
    assert zt.shape[:2] == (3, 5) and zs.shape[:2] == (2, 5)

    def terms(mapping):
        out = {"loss_tcld_cls": 0.0, "loss_tcld_bbox": 0.0, "loss_tcld_giou": 0.0}
        for i, l in enumerate(mapping):  # one tcld_layer term per (student i, teacher l) pair
            w = clockdistill.confidence_weight(zt[l])
            layer = clockdistill.tcld_layer(zs[i].float(), bs[i].float(), zt[l].float(),
                                            bt[l].float(), w, cfg.tau, cfg.kd_cls, cfg.tcld_norm)
            for k, v in zip(("cls", "bbox", "giou"), layer):
                out[f"loss_tcld_{k}"] = out[f"loss_tcld_{k}"] + v
        return out

    check_map(d, terms, losses, ["loss_tcld_cls", "loss_tcld_bbox", "loss_tcld_giou"])
