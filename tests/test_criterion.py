"""SetCriterion and PostProcess on hand-built cases, against float64 hand computations and
torchvision's losses."""
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from torchvision.ops import sigmoid_focal_loss

from common.criterion import (PostProcess, SetCriterion, build_criterion, build_postprocess,
                              build_weight_dict, num_boxes_across_processes)
from common.matcher import HungarianMatcher


def logit(p):
    return math.log(p / (1 - p))


def focal_by_hand(logits, onehot, alpha=0.25, gamma=2.0):
    """Sum of the sigmoid focal loss (Lin et al. eq. 5), float64, written out per element."""
    total = 0.0
    for x, y in zip(logits.double().flatten().tolist(), onehot.double().flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        if y == 1:
            total += -alpha * (1 - p) ** gamma * math.log(p)
        else:
            total += -(1 - alpha) * p ** gamma * math.log(1 - p)
    return total


def focal_criterion(num_classes, **kw):
    weights = build_weight_dict("deformable_detr", num_decoder_layers=3, enc=True, dn=True)
    return SetCriterion(num_classes, HungarianMatcher(2, 5, 2, class_cost="focal"), weights, **kw)


def two_box_case():
    """Two targets, two queries; query 0 sits near target 0, query 1 near target 1.

    target 0 (0.5, 0.5, 0.2, 0.2) = xyxy (0.4, 0.4, 0.6, 0.6); query 0 (0.55, 0.5, 0.2, 0.2) =
    (0.45, 0.4, 0.65, 0.6): L1 0.05; inter 0.15*0.2 = 0.03, union 0.05, IoU 0.6, hull 0.05,
    GIoU 0.6, 1 - GIoU = 0.4.
    target 1 (0.25, 0.25, 0.1, 0.1) = (0.2, 0.2, 0.3, 0.3); query 1 (0.4, 0.3, 0.1, 0.1) =
    (0.35, 0.25, 0.45, 0.35): L1 0.15 + 0.05 = 0.2; no overlap, union 0.02, hull 0.25*0.15 =
    0.0375, GIoU = -(0.0375 - 0.02) / 0.0375 = -7/15, 1 - GIoU = 22/15.
    """
    outputs = {"pred_logits": torch.tensor([[[logit(0.7), logit(0.2)],
                                             [logit(0.1), logit(0.6)]]]),
               "pred_boxes": torch.tensor([[[0.55, 0.5, 0.2, 0.2], [0.4, 0.3, 0.1, 0.1]]])}
    targets = [{"labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.25, 0.25, 0.1, 0.1]])}]
    return outputs, targets


def test_l1_giou_and_focal_on_hand_computed_two_box_example():
    outputs, targets = two_box_case()
    criterion = focal_criterion(2)
    q, t = criterion.matcher(outputs, targets)[0]
    assert q.tolist() == [0, 1] and t.tolist() == [0, 1]
    losses = criterion(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx((0.05 + 0.2) / 2, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx((0.4 + 22 / 15) / 2, abs=1e-5)
    onehot = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    expected = focal_by_hand(outputs["pred_logits"], onehot) / 2  # normalised by 2 boxes
    assert losses["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    tv = sigmoid_focal_loss(outputs["pred_logits"], onehot, 0.25, 2.0, reduction="sum") / 2
    assert losses["loss_ce"].item() == pytest.approx(tv.item(), rel=1e-6)
    assert losses["class_error"].item() == 0.0


def test_focal_loss_is_normalised_by_num_boxes():
    torch.manual_seed(1)
    Q, C = 6, 3
    logits = torch.randn(1, Q, C)
    boxes = torch.rand(1, Q, 4) * 0.3 + 0.3
    target = {"labels": torch.tensor([2, 0, 1]), "boxes": torch.rand(3, 4) * 0.3 + 0.3}
    criterion = focal_criterion(C, focal_alpha=0.4, focal_gamma=1.5)
    one = criterion({"pred_logits": logits, "pred_boxes": boxes}, [target])
    q, t = criterion.matcher({"pred_logits": logits, "pred_boxes": boxes}, [target])[0]
    onehot = torch.zeros(1, Q, C)
    onehot[0, q, target["labels"][t]] = 1
    expected = focal_by_hand(logits, onehot, alpha=0.4, gamma=1.5) / 3
    assert one["loss_ce"].item() == pytest.approx(expected, rel=1e-5)
    # A batch of two copies: twice the sum over twice the boxes, so every loss is unchanged.
    two = criterion({"pred_logits": logits.repeat(2, 1, 1), "pred_boxes": boxes.repeat(2, 1, 1)},
                    [target, target])
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        assert two[k].item() == pytest.approx(one[k].item(), rel=1e-6)
    # No targets at all: num_boxes is clamped at 1, the class loss is the plain sum.
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    none = criterion({"pred_logits": logits, "pred_boxes": boxes}, [empty])
    assert none["loss_ce"].item() == pytest.approx(focal_by_hand(logits, torch.zeros(1, Q, C),
                                                                 alpha=0.4, gamma=1.5), rel=1e-5)
    assert none["loss_bbox"].item() == 0 and none["loss_giou"].item() == 0


def test_trap11_focal_equals_the_official_formula_with_a_dropped_background_column():
    """Trap 11, written as the official code computes it (deformable_detr.py loss_labels and
    segmentation.py sigmoid_focal_loss): a K + 1 one-hot whose last column (no object) is dropped,
    the element loss averaged over queries (mean(1)), summed, divided by num_boxes, times Q.
    Two images with 3 and 1 targets, the last real class among the labels, unmatched queries."""
    torch.manual_seed(3)
    B, Q, C = 2, 5, 3
    out, targets = random_case([3, 1], Q, C, requires_grad=False)
    targets[0]["labels"] = torch.tensor([2, 0, 2])
    targets[1]["labels"] = torch.tensor([2])
    criterion = focal_criterion(C)
    losses = criterion(out, targets)
    indices = criterion.matcher(out, targets)
    target_classes = torch.full((B, Q), C, dtype=torch.int64)  # index C = no object
    for b, (q, t) in enumerate(indices):
        target_classes[b, q] = targets[b]["labels"][t]
    onehot = torch.zeros(B, Q, C + 1, dtype=torch.float64)
    onehot.scatter_(2, target_classes[..., None], 1)
    onehot = onehot[..., :-1]
    assert (onehot.sum(-1) == 0).sum() == B * Q - 4  # unmatched queries: all-zero rows
    x = out["pred_logits"].double()
    prob = x.sigmoid()
    ce = -(onehot * torch.log(prob) + (1 - onehot) * torch.log(1 - prob))
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    alpha_t = 0.25 * onehot + 0.75 * (1 - onehot)
    loss = alpha_t * ce * (1 - p_t) ** 2
    num_boxes = 4.0
    official = loss.mean(1).sum() / num_boxes * Q
    assert losses["loss_ce"].item() == pytest.approx(official.item(), rel=1e-5)
    # the normaliser is the box count, not the queries (a mean over queries would be 1/Q of it)
    assert losses["loss_ce"].item() != pytest.approx(official.item() / Q, rel=1e-2)


def test_perfect_predictions_give_zero_box_losses():
    torch.manual_seed(2)
    Q, C = 8, 4
    tgt_boxes = torch.tensor([[0.3, 0.3, 0.2, 0.1], [0.7, 0.6, 0.3, 0.4], [0.5, 0.2, 0.1, 0.1]])
    labels = torch.tensor([3, 0, 3])
    boxes = torch.rand(1, Q, 4) * 0.2 + 0.4
    logits = torch.full((1, Q, C), -6.0)
    for q, (b, l) in zip([5, 1, 6], zip(tgt_boxes, labels)):
        boxes[0, q], logits[0, q, l] = b, 6.0
    losses = focal_criterion(C)({"pred_logits": logits, "pred_boxes": boxes},
                                [{"labels": labels, "boxes": tgt_boxes}])
    assert losses["loss_bbox"].item() < 1e-6 and losses["loss_giou"].item() < 1e-6
    assert losses["class_error"].item() == 0.0


def random_case(sizes, Q, C, requires_grad=True):
    B = len(sizes)
    out = {"pred_logits": torch.randn(B, Q, C),
           "pred_boxes": torch.cat([torch.rand(B, Q, 2) * 0.6 + 0.2,
                                    torch.rand(B, Q, 2) * 0.3 + 0.05], -1)}
    out = {k: v.requires_grad_(requires_grad) for k, v in out.items()}
    targets = [{"labels": torch.randint(0, C, (n,)),
                "boxes": torch.cat([torch.rand(n, 2) * 0.6 + 0.2, torch.rand(n, 2) * 0.3 + 0.05],
                                   -1)} for n in sizes]
    return out, targets


def test_group_keys_and_values_equal_the_main_loss_on_the_same_tensors():
    Q, C = 7, 4
    main, targets = random_case([3, 0, 5], Q, C)
    same = {"pred_logits": main["pred_logits"], "pred_boxes": main["pred_boxes"]}
    criterion = focal_criterion(C, enc_class_agnostic=False)
    ref = criterion(same, targets)
    indices = criterion.matcher(same, targets)
    outputs = dict(same, aux_outputs=[same, same], enc_outputs=same,
                   dn_outputs=[same, same, same],
                   dn_meta={"num_dn_queries": Q, "positive": indices, "num_groups": 1})
    losses = criterion(outputs, targets)
    suffixes = ["", "_0", "_1", "_enc", "_dn", "_dn_0", "_dn_1"]
    assert set(losses) == {k + s for k in ("loss_ce", "loss_bbox", "loss_giou")
                           for s in suffixes} | {"class_error"}
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        for s in suffixes:
            torch.testing.assert_close(losses[k + s], ref[k], rtol=1e-6, atol=1e-7)
    # every key the criterion returns (but class_error) has a weight, and vice versa
    assert set(losses) - {"class_error"} == set(criterion.weight_dict)


def test_class_agnostic_encoder_loss_uses_label_zero():
    Q, C = 7, 4
    main, targets = random_case([3, 4], Q, C)
    enc, _ = random_case([3, 4], 11, C)  # more proposals than queries, as in two-stage
    criterion = focal_criterion(C, enc_class_agnostic=True)
    losses = criterion(dict(main, enc_outputs=enc), targets)
    zeroed = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
    ref = criterion(enc, zeroed)
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[k + "_enc"], ref[k])
    # and it differs from real labels (the test would be void otherwise)
    assert not torch.allclose(criterion(enc, targets)["loss_ce"], ref["loss_ce"])


def test_denoising_positives_and_negatives():
    """One image, one target, 2 groups of (positive, negative): dn queries 0 and 2 are the
    positive copies of target 0, queries 1 and 3 negatives; normalised by num_boxes x groups."""
    C = 3
    main, _ = random_case([1], 5, C)
    target = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    dn_logits = torch.randn(1, 4, C, requires_grad=True)
    dn_boxes = torch.tensor([[[0.55, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1],
                              [0.5, 0.45, 0.2, 0.3], [0.1, 0.1, 0.1, 0.1]]], requires_grad=True)
    positive = [(torch.tensor([0, 2]), torch.tensor([0, 0]))]
    outputs = dict(main, dn_outputs=[{"pred_logits": dn_logits, "pred_boxes": dn_boxes}],
                   dn_meta={"num_dn_queries": 4, "positive": positive})  # groups inferred: 2
    losses = focal_criterion(C)(outputs, [target])
    onehot = torch.zeros(1, 4, C)
    onehot[0, 0, 2] = onehot[0, 2, 2] = 1  # negatives stay all-zero (no object)
    assert losses["loss_ce_dn"].item() == pytest.approx(focal_by_hand(dn_logits, onehot) / 2,
                                                        rel=1e-5)
    # L1: |0.05| for query 0, |0.05| + |0.1| for query 2; over 1 box x 2 groups
    assert losses["loss_bbox_dn"].item() == pytest.approx((0.05 + 0.15) / 2, abs=1e-6)
    # GIoU of query 2 (0.4,0.3,0.6,0.6) with the target (0.4,0.4,0.6,0.6): IoU = 0.04/0.06
    # and the hull is the union; query 0 as in two_box_case: 1 - GIoU = 0.4
    assert losses["loss_giou_dn"].item() == pytest.approx((0.4 + (1 - 2 / 3)) / 2, abs=1e-5)
    sum(losses[k] for k in ("loss_ce_dn", "loss_bbox_dn", "loss_giou_dn")).backward()
    assert dn_boxes.grad[0, [1, 3]].abs().sum() == 0  # negatives get no box loss
    assert dn_boxes.grad[0, [0, 2]].abs().sum() > 0
    assert (dn_logits.grad[0, [1, 3]].abs() > 0).all()  # but a no-object class loss


def test_gradients_reach_predictions_not_targets():
    main, targets = random_case([2, 4], 6, 3)
    aux, _ = random_case([2, 4], 6, 3)
    for t in targets:
        t["boxes"].requires_grad_()
    criterion = focal_criterion(3)
    losses = criterion(dict(main, aux_outputs=[aux, aux]), targets)
    total = sum(v * criterion.weight_dict[k] for k, v in losses.items()
                if k in criterion.weight_dict)
    total.backward()
    for o in (main, aux):
        assert o["pred_logits"].grad.abs().sum() > 0 and o["pred_boxes"].grad.abs().sum() > 0
    assert all(t["boxes"].grad is None for t in targets)
    assert not losses["class_error"].requires_grad


def test_softmax_mode_cross_entropy_with_eos_coef():
    """DETR: K + 1 logits, cross-entropy weighted 1 for objects and eos_coef for no-object,
    averaged by the sum of the weights (torch's weighted mean)."""
    outputs, targets = two_box_case()
    # add a no-object column and a third, unmatched query
    logits = torch.tensor([[[2.0, -1.0, 0.5], [0.1, 1.5, -0.3], [0.2, 0.3, 1.0]]])
    boxes = torch.cat([outputs["pred_boxes"], torch.tensor([[[0.8, 0.8, 0.1, 0.1]]])], 1)
    criterion = SetCriterion(2, HungarianMatcher(1, 5, 2, class_cost="softmax"),
                             build_weight_dict("detr"), class_loss="softmax", eos_coef=0.1)
    q, t = criterion.matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)[0]
    assert q.tolist() == [0, 1] and t.tolist() == [0, 1]
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, targets)
    classes, weights = [0, 1, 2], [1.0, 1.0, 0.1]
    nll = 0.0
    for row, y, w in zip(logits[0].double().tolist(), classes, weights):
        nll += -w * (row[y] - math.log(sum(math.exp(v) for v in row)))
    assert losses["loss_ce"].item() == pytest.approx(nll / sum(weights), rel=1e-6)
    assert losses["loss_bbox"].item() == pytest.approx(0.125, abs=1e-6)
    with pytest.raises(ValueError, match="must have 3"):
        criterion(outputs, targets)  # 2 logits: the no-object column is missing


def test_postprocess_topk_over_queries_and_classes():
    probs = torch.tensor([[[0.9, 0.1, 0.3], [0.2, 0.8, 0.05]]])
    outputs = {"pred_logits": torch.log(probs / (1 - probs)),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.1, 0.1]]])}
    sizes = torch.tensor([[100, 200]])  # h, w
    (det,) = PostProcess(num_select=3)(outputs, sizes)
    torch.testing.assert_close(det["scores"], torch.tensor([0.9, 0.8, 0.3]))
    assert det["labels"].tolist() == [0, 1, 2]
    # query 0 -> xyxy (0.4, 0.3, 0.6, 0.7) * (200, 100) ; query 1 -> (0.2, 0.7, 0.3, 0.8)
    torch.testing.assert_close(det["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0],
                                                           [40.0, 70.0, 60.0, 80.0],
                                                           [80.0, 30.0, 120.0, 70.0]]))
    assert len(PostProcess(num_select=100)(outputs, sizes)[0]["scores"]) == 6  # capped at Q*K


def test_postprocess_softmax_mode():
    logits = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.5, 3.0]]])  # last column = no-object
    outputs = {"pred_logits": logits,
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.1, 0.1]]])}
    (det,) = PostProcess(class_loss="softmax")(outputs, torch.tensor([[100, 200]]))
    p = logits.double().softmax(-1)[0]
    assert det["labels"].tolist() == [0, 1]  # no-object never chosen, even for query 1
    torch.testing.assert_close(det["scores"].double(), torch.stack([p[0, 0], p[1, 1]]))
    torch.testing.assert_close(det["boxes"][1], torch.tensor([40.0, 70.0, 60.0, 80.0]))
    with pytest.raises(ValueError, match="orig_sizes"):
        PostProcess()(outputs, torch.tensor([100, 200]))


def test_variant_defaults_follow_the_official_configs():
    # the official repositories' loss weights and matcher costs
    dino = build_criterion("dino", 91)
    w = dino.weight_dict
    assert (w["loss_ce"], w["loss_bbox"], w["loss_giou"]) == (1.0, 5.0, 2.0)
    assert (w["loss_ce_dn"], w["loss_bbox_dn_4"], w["loss_ce_enc"]) == (1.0, 5.0, 1.0)
    assert "loss_ce_5" not in w and "loss_ce_dn_5" not in w
    assert dino.matcher.cost_class == 2.0 and dino.matcher.class_cost == "focal"
    assert dino.focal_alpha == 0.25 and not dino.enc_class_agnostic
    deform = build_criterion("deformable_detr", 91, two_stage=True)
    assert deform.weight_dict["loss_ce"] == 2.0 and deform.weight_dict["loss_giou_enc"] == 2.0
    assert deform.enc_class_agnostic and "loss_ce_dn" not in deform.weight_dict
    assert "loss_ce_enc" not in build_criterion("deformable_detr", 91).weight_dict
    detr = build_criterion("detr", 91)
    assert detr.class_loss == "softmax" and detr.eos_coef == 0.1
    assert detr.matcher.cost_class == 1.0 and detr.matcher.class_cost == "softmax"
    assert build_criterion("dab_detr", 91).weight_dict["loss_ce_2"] == 1.0
    assert build_criterion("conditional_detr", 91, loss_ce=3.0).weight_dict["loss_ce_4"] == 3.0
    assert build_postprocess("dino").num_select == 300
    assert build_postprocess("deformable_detr").num_select == 100
    assert build_postprocess("detr").class_loss == "softmax"
    with pytest.raises(ValueError, match="unknown variant"):
        build_criterion("yolo", 80)


def test_built_from_a_model_config():
    from common.detr import CONFIGS
    for variant, cls in CONFIGS.items():  # our table and the model configs agree
        crit, cfg = build_criterion(variant, 5), cls()
        assert tuple(crit.weight_dict[k] for k in ("loss_ce", "loss_bbox", "loss_giou")) == \
            tuple(cfg.loss_weights), variant
        m = crit.matcher
        assert (m.cost_class, m.cost_bbox, m.cost_giou) == tuple(cfg.matcher_weights), variant
        assert crit.class_loss == cfg.class_loss
        assert build_postprocess(variant).num_select == cfg.num_select, variant
    dino = build_criterion(CONFIGS["dino"](dec_layers=3, loss_weights=(1.5, 5.0, 2.0)), 5)
    assert dino.weight_dict["loss_ce_dn_1"] == 1.5 and "loss_ce_2" not in dino.weight_dict
    assert "loss_ce_dn" not in build_criterion(CONFIGS["dino"](dn_number=0), 5).weight_dict
    deform = build_criterion(CONFIGS["deformable_detr"](two_stage=True), 5)
    assert deform.weight_dict["loss_bbox_enc"] == 5.0 and deform.enc_class_agnostic


@pytest.mark.slow
def test_one_source_of_variant_defaults_and_no_model_import():
    """The criterion reads the per-variant defaults from common.config, the module the model
    reads too, and never imports the model (layering: config -> criterion -> detr)."""
    import subprocess
    import sys
    code = ("import sys; from common.config import CONFIGS; "
            "from common.criterion import build_criterion, build_postprocess; "
            "build_criterion(CONFIGS['dino'](dec_layers=2), 5); build_postprocess('detr'); "
            "assert 'common.detr' not in sys.modules, sorted(m for m in sys.modules "
            "if m.startswith('common'))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    from common import config, detr
    assert detr.CONFIGS is config.CONFIGS
    # a changed default reaches the criterion: the same name, a patched table entry
    cfg = config.CONFIGS["dab_detr"](matcher_weights=(3.0, 4.0, 1.0), focal_alpha=0.5,
                                     num_select=7)
    crit = build_criterion(cfg, 5)
    assert (crit.matcher.cost_class, crit.matcher.cost_bbox, crit.matcher.cost_giou) == \
        (3.0, 4.0, 1.0)
    assert crit.focal_alpha == crit.matcher.focal_alpha == 0.5
    assert build_postprocess(cfg).num_select == 7
    with pytest.raises(TypeError, match="expected a variant name, a model config or a model"):
        build_criterion(object(), 5)


def test_bad_input_raises_clear_errors():
    outputs, targets = random_case([2, 1], 5, 3)
    criterion = focal_criterion(3)
    with pytest.raises(ValueError, match="has 4 classes"):
        criterion({"pred_logits": torch.randn(2, 5, 4),
                   "pred_boxes": outputs["pred_boxes"]}, targets)
    with pytest.raises(ValueError, match=r"targets\[1\]\['labels'\] must lie in"):
        criterion(outputs, [targets[0], dict(targets[1], labels=torch.tensor([3]))])
    with pytest.raises(ValueError, match=r"\['loss_bbox_2', 'loss_ce_2', 'loss_giou_2'\] have no weight"):
        criterion(dict(outputs, aux_outputs=[outputs] * 3), targets)  # built for 3 layers, got 4
    with pytest.raises(KeyError, match="dn_meta"):
        criterion(dict(outputs, dn_outputs=[outputs]), targets)
    with pytest.raises(ValueError, match="num_dn_queries"):
        criterion(dict(outputs, dn_outputs=[outputs],
                       dn_meta={"num_dn_queries": 4,
                                "positive": [(torch.zeros(0).long(),) * 2] * 2}),
                  targets)


# ------------------------------------------------------------------------------------------
# num_boxes across processes: two gloo processes, 1 and 3 target boxes -> 2 boxes per process.
# ------------------------------------------------------------------------------------------

def _distributed_worker(rank, world_size, init_file, result_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        n = [1, 3][rank]
        boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(n, 1)
        pred = boxes.clone()
        pred[:, 0] += 0.1  # every matched pair has L1 = 0.1
        outputs = {"pred_logits": torch.zeros(1, n, 2), "pred_boxes": pred[None]}
        losses = focal_criterion(2)(outputs, [{"labels": torch.zeros(n, dtype=torch.int64),
                                               "boxes": boxes}])
        nb = num_boxes_across_processes([{"labels": torch.zeros(n)}], "cpu")
        torch.save({"num_boxes": nb, "loss_bbox": losses["loss_bbox"].detach()},
                   os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_averaged_over_processes(tmp_path):
    # fork (as DataLoader workers do) rather than spawn: no re-import of torch in the children
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)),
                       nprocs=2, start_method="fork")
    for rank, n in enumerate([1, 3]):
        r = torch.load(tmp_path / f"{rank}.pt")
        assert r["num_boxes"].item() == pytest.approx(2.0)  # (1 + 3) / 2
        assert r["loss_bbox"].item() == pytest.approx(0.1 * n / 2, rel=1e-5)
    # a single process is untouched by the distributed path
    assert num_boxes_across_processes([{"labels": torch.zeros(3)}], "cpu").item() == 3.0
