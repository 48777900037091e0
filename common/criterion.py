"""Set criterion and post-processor of the DETR family.

SetCriterion (Carion et al., DETR, arXiv:2005.12872, section 3.1) matches predictions to targets
with the Hungarian matcher and computes, for the matched pairs,

    loss_ce    class loss: softmax cross-entropy with a down-weighted no-object class (DETR), or
               sigmoid focal loss (Lin et al., arXiv:1708.02002) summed over queries and classes
               and divided by the number of target boxes (Deformable DETR, arXiv:2010.04159, and
               Conditional DETR, DAB-DETR, DINO)
    loss_bbox  L1 distance of normalised cxcywh boxes, summed, divided by the number of boxes
    loss_giou  1 - GIoU (Rezatofighi et al., CVPR 2019) of matched pairs, likewise

for the last decoder layer, and the same keys with a suffix for each extra group:

    "_0" .. "_{L-2}"   auxiliary decoder layers (DETR's aux_outputs), first to second-to-last
    "_enc"             encoder proposals: two-stage Deformable DETR's "enc_outputs" (matched
                       class-agnostically: every label becomes 0, as the official code does) or
                       DINO's intermediate outputs (real labels; the official key suffix there
                       is "_interm"); the flag ``enc_class_agnostic`` chooses
    "_dn", "_dn_{i}"   DINO's contrastive denoising groups (Zhang et al., arXiv:2203.03605) of the
                       last and the earlier decoder layers: fixed assignment, positive queries get
                       class and box losses, all others are pushed to "no object"

Losses are returned unweighted; ``weight_dict`` holds the weights, and the training loss is
sum(loss[k] * weight_dict[k] for k in loss if k in weight_dict) as in DETR.

PostProcess turns the last layer's predictions into COCO-style detections.
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from common.box_ops import cxcywh_to_xyxy, scale_boxes
from common.config import CONFIGS, variant_of
from common.distributed import mean_over_processes
from common.matcher import HungarianMatcher, _check_outputs, _check_targets

__all__ = ["SetCriterion", "PostProcess", "build_criterion",
           "build_postprocess", "build_weight_dict", "num_boxes_across_processes"]

LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def num_boxes_across_processes(targets, device) -> torch.Tensor:
    """DETR's normaliser: target boxes summed over all processes, divided by the world size,
    clamped at 1. Kept as a 0-d tensor (no host sync); all_reduce only when torch.distributed
    is initialised."""
    n = torch.tensor(float(sum(int(t["labels"].shape[0]) for t in targets)), device=device)
    return mean_over_processes(n).clamp(min=1.0)


class SetCriterion(nn.Module):
    """DETR-family set loss: Hungarian matching, then class, L1 and GIoU losses per group.

    Args:
        num_classes: number of object classes K. Focal mode expects K logits per query, softmax
            mode K + 1 (the last one is "no object").
        matcher: a HungarianMatcher (its ``match_layers`` matches all decoder layers at once).
        weight_dict: {loss name: weight}, e.g. from ``build_weight_dict``.
        class_loss: "focal" or "softmax".
        focal_alpha, focal_gamma: focal loss parameters (0.25 and 2 in every official config).
        eos_coef: softmax mode only, the weight of the no-object class in the cross-entropy.
        enc_class_agnostic: encoder proposals ("enc_outputs") are matched and classified with all
            labels set to 0: True for two-stage Deformable DETR, False for DINO (real labels).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: Dict[str, float],
                 class_loss: str = "focal", focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 eos_coef: float = 0.1, enc_class_agnostic: bool = True):
        super().__init__()
        if class_loss not in ("focal", "softmax"):
            raise ValueError(f"class_loss must be 'focal' or 'softmax', got {class_loss!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if class_loss == "softmax" and not 0 <= eos_coef <= 1:
            raise ValueError(f"eos_coef must lie in [0, 1], got {eos_coef}")
        if not 0 <= focal_alpha <= 1:
            raise ValueError(f"focal_alpha must lie in [0, 1], got {focal_alpha}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.class_loss = class_loss
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.eos_coef = eos_coef
        self.enc_class_agnostic = enc_class_agnostic
        # Softmax mode: class weights of the cross-entropy, 1 for objects, eos_coef for no-object.
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    # --------------------------------------------------------------------------------------
    # The three losses, on one group of predictions with a given assignment.
    # --------------------------------------------------------------------------------------

    def loss_labels(self, logits, batch_idx, query_idx, target_labels, num_boxes):
        """Class loss. logits (B, Q, C); matched queries (batch_idx[k], query_idx[k]) have class
        target_labels[k], every other query is "no object"."""
        B, Q, C = logits.shape
        logits = logits.float()
        if self.class_loss == "focal":
            # One-hot over the K real classes: a no-object query is all zeros (the official code
            # builds K + 1 columns and drops the last, which is the same thing).
            onehot = torch.zeros_like(logits)                                  # (B, Q, C)
            onehot[batch_idx, query_idx, target_labels] = 1.0
            # Sum over queries and classes, per target box (the official mean(1).sum() * Q).
            return sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha,
                                      gamma=self.focal_gamma, reduction="sum") / num_boxes
        target_classes = torch.full((B, Q), C - 1, dtype=torch.int64, device=logits.device)
        target_classes[batch_idx, query_idx] = target_labels                   # (B, Q)
        # DETR: weighted mean over all queries (normalised by the sum of the class weights).
        return F.cross_entropy(logits.transpose(1, 2), target_classes,
                               self.empty_weight.to(logits.device))

    @staticmethod
    def loss_boxes(src_boxes, target_boxes, num_boxes):
        """L1 and 1 - GIoU of matched pairs, both (N, 4) normalised cxcywh; summed / num_boxes."""
        src_boxes, target_boxes = src_boxes.float(), target_boxes.float()
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="sum") / num_boxes
        # The official code has no epsilon in GIoU; torchvision's default 1e-7 would shift the
        # loss of a 0.01 x 0.01 box by 1e-3, so use the smallest normal float instead (it only
        # guards 0 / 0 for two empty boxes).
        loss_giou = generalized_box_iou_loss(cxcywh_to_xyxy(src_boxes),
                                             cxcywh_to_xyxy(target_boxes), reduction="sum",
                                             eps=torch.finfo(torch.float32).tiny) / num_boxes
        return loss_bbox, loss_giou

    def group_losses(self, outputs, targets, indices, num_boxes, suffix=""):
        """loss_ce, loss_bbox, loss_giou (+ suffix) for one group of predictions.

        indices: per image (query_idx, target_idx), as the matcher returns.
        """
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        device = logits.device
        # Flatten the per-image pairs: (batch_idx, query_idx) address predictions, the targets
        # are gathered in the same order. K = number of matched pairs in the batch.
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(indices)])  # (K,)
        query_idx = torch.cat([q for q, _ in indices]).to(device)                            # (K,)
        batch_idx = batch_idx.to(device)
        target_labels = torch.cat([t["labels"].to(device)[j.to(device)]
                                   for t, (_, j) in zip(targets, indices)])                 # (K,)
        target_boxes = torch.cat([t["boxes"].detach().to(device)[j.to(device)]
                                  for t, (_, j) in zip(targets, indices)])                  # (K, 4)
        loss_ce = self.loss_labels(logits, batch_idx, query_idx, target_labels, num_boxes)
        loss_bbox, loss_giou = self.loss_boxes(boxes[batch_idx, query_idx], target_boxes,
                                               num_boxes)
        losses = {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}
        if suffix == "":  # logged only (DETR's class_error): % of matched queries misclassified
            with torch.no_grad():
                if target_labels.numel():
                    pred = logits[batch_idx, query_idx].argmax(-1)
                    losses["class_error"] = 100.0 * (pred != target_labels).float().mean()
                else:
                    losses["class_error"] = torch.zeros((), device=device)
        return {k + suffix: v for k, v in losses.items()}

    # --------------------------------------------------------------------------------------
    # All groups
    # --------------------------------------------------------------------------------------

    def _check(self, outputs, name, agnostic=False):
        _check_outputs(outputs, name)
        C = outputs["pred_logits"].shape[-1]
        want = self.num_classes + (1 if self.class_loss == "softmax" else 0)
        if C != want and not agnostic:
            raise ValueError(f"{name}['pred_logits'] has {C} classes; with num_classes="
                             f"{self.num_classes} and class_loss={self.class_loss!r} it must "
                             f"have {want}" + (" (the last is no-object)"
                                               if self.class_loss == "softmax" else ""))

    def forward(self, outputs: Dict, targets: List[Dict[str, torch.Tensor]]
                ) -> Dict[str, torch.Tensor]:
        """Args:
            outputs: the model's DETR-style dict: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4),
                optional "aux_outputs" (list of such dicts, first to second-to-last layer),
                "enc_outputs" (dict), "dn_outputs" (list, one per layer, last layer last) with
                "dn_meta" {"num_dn_queries": N_dn, "positive": list over images of
                (dn_query_idx (K_b,), target_idx (K_b,)) int64, optional "num_groups"}.
            targets: list of B dicts with "labels" (T_b,) int64 and "boxes" (T_b, 4) cxcywh.
        Returns:
            dict of unweighted scalar losses (and "class_error", logged only).
        """
        self._check(outputs, "outputs")
        B = outputs["pred_logits"].shape[0]
        _check_targets(targets, B)
        device = outputs["pred_logits"].device
        for b, t in enumerate(targets):  # checked on the host only: on CUDA it would sync
            lab = t["labels"]
            if lab.device.type == "cpu" and lab.numel() and (int(lab.min()) < 0 or
                                                             int(lab.max()) >= self.num_classes):
                raise ValueError(f"targets[{b}]['labels'] must lie in [0, num_classes="
                                 f"{self.num_classes}), got {t['labels'].tolist()}")
        aux = list(outputs.get("aux_outputs", []))
        for i, a in enumerate(aux):
            self._check(a, f"outputs['aux_outputs'][{i}]")
        enc = outputs.get("enc_outputs")
        if enc is not None:
            self._check(enc, "outputs['enc_outputs']", agnostic=self.enc_class_agnostic)

        num_boxes = num_boxes_across_processes(targets, device)  # 0-d tensor, >= 1
        losses = {}
        # The last layer and the auxiliary layers share targets and shapes: one stacked match.
        # DINO's intermediate outputs (real labels, same query count) can join the stack.
        main = [{"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}] + aux
        stack_enc = (enc is not None and not self.enc_class_agnostic and
                     enc["pred_logits"].shape == outputs["pred_logits"].shape)
        all_indices = self.matcher.match_layers(main + ([enc] if stack_enc else []), targets)
        losses.update(self.group_losses(main[0], targets, all_indices[0], num_boxes))
        for i, a in enumerate(aux):
            losses.update(self.group_losses(a, targets, all_indices[1 + i], num_boxes, f"_{i}"))

        if enc is not None:
            enc_targets = targets
            if self.enc_class_agnostic:  # two-stage Deformable DETR: one "object" class
                enc_targets = [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets]
            indices = all_indices[-1] if stack_enc else self.matcher(enc, enc_targets)
            losses.update(self.group_losses(enc, enc_targets, indices, num_boxes, "_enc"))

        if "dn_outputs" in outputs:
            losses.update(self.dn_losses(outputs, targets, num_boxes))
        unweighted = sorted(k for k in losses if k not in self.weight_dict and k != "class_error")
        if unweighted:  # e.g. a weight_dict built for fewer decoder layers: never silently drop
            raise ValueError(f"losses {unweighted} have no weight in weight_dict; build it for "
                             f"this model's decoder layers, encoder proposals and denoising "
                             f"(build_weight_dict / build_criterion), or give them weight 0")
        return losses

    def dn_losses(self, outputs, targets, num_boxes):
        """DINO's denoising losses: a fixed assignment (positive dn query k <-> its target), the
        other dn queries (negatives and padding) get only the no-object class loss. As in the
        official code they are normalised by num_boxes times the number of denoising groups."""
        dn_outputs, meta = outputs["dn_outputs"], outputs.get("dn_meta")
        if meta is None or "positive" not in meta:
            raise KeyError("outputs has 'dn_outputs' but no 'dn_meta' with 'positive' pairs")
        positive = meta["positive"]
        if len(positive) != len(targets):
            raise ValueError(f"dn_meta['positive'] has {len(positive)} entries, expected one per "
                             f"image ({len(targets)})")
        n_dn = meta.get("num_dn_queries")
        for i, o in enumerate(dn_outputs):
            self._check(o, f"outputs['dn_outputs'][{i}]")
            if n_dn is not None and o["pred_logits"].shape[1] != n_dn:
                raise ValueError(f"outputs['dn_outputs'][{i}] has {o['pred_logits'].shape[1]} "
                                 f"queries but dn_meta['num_dn_queries'] is {n_dn}")
        for b, ((q, j), t) in enumerate(zip(positive, targets)):
            if q.shape != j.shape or q.dim() != 1:
                raise ValueError(f"dn_meta['positive'][{b}] must be two 1-D int64 tensors of one "
                                 f"length, got shapes {tuple(q.shape)} and {tuple(j.shape)}")
        # Groups: each holds one positive copy of every target, so K_b = groups * T_b.
        groups = meta.get("num_groups")
        if groups is None:
            groups = next((int(q.shape[0]) // int(t["labels"].shape[0])
                           for (q, _), t in zip(positive, targets) if t["labels"].shape[0] > 0), 1)
        losses = {}
        L = len(dn_outputs)
        for i, o in enumerate(dn_outputs):
            suffix = "_dn" if i == L - 1 else f"_dn_{i}"
            out = self.group_losses(o, targets, positive, num_boxes * max(groups, 1), suffix)
            losses.update(out)
        return losses


class PostProcess(nn.Module):
    """Predictions -> detections in absolute xyxy pixels of the original images.

    Focal-loss models (Deformable DETR, Conditional DETR, DAB-DETR, DINO): the top ``num_select``
    (query, class) pairs by sigmoid score, so one query may yield several detections (official
    values: 100 for Conditional and Deformable DETR, 300 for DAB-DETR and DINO).
    Softmax models (DETR): per query the best real class of the softmax (no-object dropped), all
    Q queries kept.
    """

    def __init__(self, num_select: int = 100, class_loss: str = "focal"):
        super().__init__()
        if class_loss not in ("focal", "softmax"):
            raise ValueError(f"class_loss must be 'focal' or 'softmax', got {class_loss!r}")
        if int(num_select) < 1:
            raise ValueError(f"num_select must be >= 1, got {num_select}")
        self.num_select, self.class_loss = int(num_select), class_loss

    @torch.no_grad()
    def forward(self, outputs, orig_sizes: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
        """outputs: {"pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) normalised cxcywh};
        orig_sizes: (B, 2) (height, width) of the original images.
        Returns a list of B dicts {"scores" (N,), "labels" (N,) int64, "boxes" (N, 4) xyxy}."""
        _check_outputs(outputs)
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        B, Q, C = logits.shape
        if not isinstance(orig_sizes, torch.Tensor) or orig_sizes.shape != (B, 2):
            raise ValueError(f"orig_sizes must be a (B={B}, 2) tensor of (height, width), got "
                             f"{getattr(orig_sizes, 'shape', type(orig_sizes).__name__)}")
        boxes = scale_boxes(cxcywh_to_xyxy(boxes), orig_sizes.to(boxes.device))  # (B, Q, 4)
        if self.class_loss == "focal":
            prob = logits.sigmoid().flatten(1)                                      # (B, Q*C)
            k = min(self.num_select, Q * C)
            scores, flat_idx = prob.topk(k, dim=1)                                  # (B, k)
            query_idx, labels = flat_idx // C, flat_idx % C
            boxes = boxes.gather(1, query_idx[..., None].expand(-1, -1, 4))         # (B, k, 4)
        else:
            if C < 2:
                raise ValueError("softmax post-processing needs pred_logits with at least one "
                                 "class plus the no-object class")
            scores, labels = logits.softmax(-1)[..., :-1].max(-1)                   # (B, Q)
        return [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]


# ------------------------------------------------------------------------------------------
# Builders from a variant's config (common/config.py holds every per-variant default: the class
# loss, the loss and matcher weights, focal alpha or eos_coef, the eval top-k). Shared by all
# variants: focal gamma 2; auxiliary, "_enc" / interm and denoising weights = the main weights.
# ------------------------------------------------------------------------------------------

def _variant_and_config(variant_or_cfg):
    """(variant name, config) from a name (its default config), a config of common.config or
    a model with ``variant`` and ``cfg`` attributes."""
    if isinstance(variant_or_cfg, str):
        if variant_or_cfg not in CONFIGS:
            raise ValueError(f"unknown variant {variant_or_cfg!r}; expected one of "
                             f"{sorted(CONFIGS)}")
        return variant_or_cfg, CONFIGS[variant_or_cfg]()
    if hasattr(variant_or_cfg, "variant") and hasattr(variant_or_cfg, "cfg"):  # a DETRModel
        return variant_or_cfg.variant, variant_or_cfg.cfg
    try:
        return variant_of(variant_or_cfg), variant_or_cfg
    except TypeError:
        raise TypeError(f"expected a variant name, a model config or a model, got "
                        f"{type(variant_or_cfg).__name__}") from None


def _settings(variant_or_cfg):
    """The criterion's settings of a variant, read from its config."""
    variant, cfg = _variant_and_config(variant_or_cfg)
    d = dict(zip(LOSS_NAMES, cfg.loss_weights))
    d.update(zip(("cost_class", "cost_bbox", "cost_giou"), cfg.matcher_weights))
    d.update(class_loss=cfg.class_loss, num_select=cfg.num_select, dec_layers=cfg.dec_layers,
             two_stage=getattr(cfg, "two_stage", False),
             dn=variant == "dino" and cfg.dn_number > 0)
    # the class-loss parameter a config has (focal_alpha or eos_coef); the other one keeps the
    # SetCriterion / HungarianMatcher default, which that class loss never reads
    d.update({k: getattr(cfg, k) for k in ("focal_alpha", "eos_coef") if hasattr(cfg, k)})
    return variant, d


def build_weight_dict(base, num_decoder_layers: int = 6, enc: bool = False, dn: bool = False,
                      enc_coef: float = 1.0) -> Dict[str, float]:
    """DETR-convention weight_dict.

    base: a variant name (its config's loss_weights) or {"loss_ce", "loss_bbox", "loss_giou":
    weight}.
    Keys: the main ones, "_{i}" for the L-1 auxiliary layers, "_enc" (enc_coef x base) for
    encoder proposals, "_dn" and "_dn_{i}" for denoising, all with the base weights.
    """
    if isinstance(base, str):
        base = _settings(base)[1]
    base = {k: float(base[k]) for k in LOSS_NAMES}
    per_layer = dict(base)
    if dn:
        per_layer.update({k + "_dn": v for k, v in base.items()})
    weights = dict(per_layer)
    for i in range(num_decoder_layers - 1):
        weights.update({k + f"_{i}": v for k, v in per_layer.items()})
    if enc:
        weights.update({k + "_enc": v * enc_coef for k, v in base.items()})
    return weights


def build_criterion(variant_or_cfg, num_classes: int, *, num_decoder_layers: Optional[int] = None,
                    two_stage: Optional[bool] = None, dn: Optional[bool] = None,
                    **overrides) -> SetCriterion:
    """SetCriterion with a variant's official defaults (its config in common/config.py).

    variant_or_cfg: "detr", "conditional_detr", "dab_detr", "deformable_detr", "dino" (the
        variant's default config); or a config of common.config (``CONFIGS[variant](...)``, also
        exported by common.detr), or the model itself, whose loss_weights, matcher_weights,
        class_loss, focal_alpha or eos_coef, dec_layers, two_stage and dn_number are used.
    two_stage: Deformable DETR with encoder proposals ("_enc", class-agnostic). DINO always has
        its (real-label) encoder proposals. dn: DINO's denoising keys (default on for DINO).
    overrides: loss_ce, loss_bbox, loss_giou (weights of every group), cost_class, cost_bbox,
        cost_giou, class_loss, focal_alpha, focal_gamma, eos_coef.
    """
    variant, d = _settings(variant_or_cfg)
    allowed = set(LOSS_NAMES) | {"cost_class", "cost_bbox", "cost_giou", "class_loss",
                                 "focal_alpha", "focal_gamma", "eos_coef"}
    unknown = set(overrides) - allowed
    if unknown:
        raise TypeError(f"build_criterion got unknown overrides {sorted(unknown)}; valid: "
                        f"{sorted(allowed)}")
    d.update(overrides)
    gamma = d.get("focal_gamma", 2.0)
    # focal_alpha (focal-loss configs) or eos_coef (DETR's): the one the config or overrides have
    alpha = {"focal_alpha": d["focal_alpha"]} if "focal_alpha" in d else {}
    eos = {"eos_coef": d["eos_coef"]} if "eos_coef" in d else {}
    matcher = HungarianMatcher(d["cost_class"], d["cost_bbox"], d["cost_giou"],
                               class_cost=d["class_loss"], focal_gamma=gamma, **alpha)
    L = d["dec_layers"] if num_decoder_layers is None else num_decoder_layers
    two_stage = d["two_stage"] if two_stage is None else two_stage
    dn = d["dn"] if dn is None else dn
    weights = build_weight_dict(d, L, enc=two_stage or variant == "dino", dn=dn)
    # Two-stage Deformable DETR matches its proposals class-agnostically, DINO with real labels.
    return SetCriterion(num_classes, matcher, weights, class_loss=d["class_loss"],
                        focal_gamma=gamma, enc_class_agnostic=variant != "dino", **alpha, **eos)


def build_postprocess(variant_or_cfg, num_select: Optional[int] = None) -> PostProcess:
    """PostProcess with the variant's official top-k (100 or 300) and class rule."""
    _, d = _settings(variant_or_cfg)
    return PostProcess(num_select or d["num_select"], class_loss=d["class_loss"])
