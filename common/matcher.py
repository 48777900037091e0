"""Hungarian matching between predictions and ground truth (Carion et al., DETR, arXiv:2005.12872).

For each image, DETR assigns every target box to a distinct query by minimising the sum of the
matching cost (paper eq. 1)

    C(q, t) = w_class * class_cost(q, t) + w_bbox * |b_q - b_t|_1 - w_giou * GIoU(b_q, b_t)

with class_cost = -softmax(logits_q)[label_t] (DETR) or the focal-style cost evaluated at the
target's class (Deformable DETR, Conditional DETR, DAB-DETR, DINO):

    alpha * (1 - p)^gamma * -log(p) - (1 - alpha) * p^gamma * -log(1 - p),  p = sigmoid(logit).

The official matchers build one (B*Q, sum T) cost matrix for the whole batch, copy it to the
host and run scipy per image. Here the cost is built only on each image's own (Q, T_max) block
by ``common.ops.match_cost`` and every block is solved by one batched
``common.ops.linear_sum_assignment`` call. ``match_layers`` matches several decoder layers (which
share the targets) after padding the targets once; on CUDA it stacks them into that same single
pair of calls.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from common import ops

__all__ = ["HungarianMatcher", "pad_targets"]

Indices = List[Tuple[torch.Tensor, torch.Tensor]]  # per image: (query_idx, target_idx), int64


def pad_targets(targets: Sequence[Dict[str, torch.Tensor]], device=None):
    """Stack a ragged list of targets into padded tensors.

    Returns labels (B, T_max) int64, boxes (B, T_max, 4) float32, num_targets (B,) int64 on
    ``device``, and ``sizes``, the per-image target counts as a Python list (read from tensor
    shapes, so known on the host without a device sync). Padding is label 0, box (0.5, 0.5, 1, 1).
    """
    sizes = [int(t["labels"].shape[0]) for t in targets]
    B, T = len(targets), max(sizes, default=0)
    labels = torch.zeros(B, T, dtype=torch.int64, device=device)
    boxes = torch.tensor([0.5, 0.5, 1.0, 1.0], device=device).repeat(B, T, 1)  # (B, T, 4)
    num_targets = torch.tensor(sizes, dtype=torch.int64).to(device, non_blocking=True)
    if T > 0:  # one scatter for the whole batch: the slots (b, t < sizes[b]) in row-major order
        real = torch.arange(T, device=device)[None, :] < num_targets[:, None]          # (B, T)
        labels[real] = torch.cat([t["labels"] for t in targets]).to(device)
        boxes[real] = torch.cat([t["boxes"] for t in targets]).detach().to(device, boxes.dtype)
    return labels, boxes, num_targets, sizes


def _check_targets(targets, batch_size, num_classes=None):
    """The targets contract: a list of ``batch_size`` dicts with "labels" (T,) int64 and "boxes"
    (T, 4) float; with ``num_classes``, labels must also lie in [0, num_classes) (a host sync
    on CUDA, so only where a label indexes something, e.g. DINO's denoising embedding)."""
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of dicts, got {type(targets).__name__}")
    if len(targets) != batch_size:
        raise ValueError(f"targets has {len(targets)} entries but the predictions have batch "
                         f"size {batch_size}")
    for b, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise KeyError(f"targets[{b}] must have 'labels' and 'boxes', got keys {sorted(t)}")
        labels, boxes = t["labels"], t["boxes"]
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"targets[{b}]['labels'] must be a 1-D int64 tensor, got "
                             f"{labels.dtype} of shape {tuple(labels.shape)}")
        if boxes.shape != (labels.shape[0], 4) or not boxes.is_floating_point():
            raise ValueError(f"targets[{b}]['boxes'] must be a float tensor of shape "
                             f"({labels.shape[0]}, 4) (one cxcywh box per label), got "
                             f"{boxes.dtype} of shape {tuple(boxes.shape)}")
        if num_classes is not None and labels.numel() and \
                (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"targets[{b}]['labels'] must lie in [0, {num_classes}), got min "
                             f"{int(labels.min())}, max {int(labels.max())}")


def _check_outputs(outputs, name="outputs"):
    if "pred_logits" not in outputs or "pred_boxes" not in outputs:
        raise KeyError(f"{name} must have 'pred_logits' and 'pred_boxes', got keys "
                       f"{sorted(outputs)}")
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    if logits.dim() != 3:
        raise ValueError(f"{name}['pred_logits'] must be (B, Q, C), got {tuple(logits.shape)}")
    if boxes.shape != (*logits.shape[:2], 4):
        raise ValueError(f"{name}['pred_boxes'] must be (B, Q, 4) = {(*logits.shape[:2], 4)}, "
                         f"got {tuple(boxes.shape)}")


class HungarianMatcher(nn.Module):
    """One-to-one assignment of targets to queries (DETR's ``HungarianMatcher``, same contract).

    Args:
        cost_class, cost_bbox, cost_giou: weights of the class, L1 and -GIoU terms of the cost.
        class_cost: "focal" (sigmoid focal-style cost) or "softmax" (-p(target class), DETR).
        focal_alpha, focal_gamma: the focal cost's alpha and gamma.
        check_finite: raise a ValueError when a cost block contains NaN/inf. On CUDA this waits
            for the assignment (one device sync per call); False keeps the call asynchronous (a
            non-finite prediction then shows up in the loss instead).
    """

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 1.0, cost_giou: float = 1.0,
                 class_cost: str = "focal", focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 check_finite: bool = True):
        super().__init__()
        if class_cost not in ("focal", "softmax"):
            raise ValueError(f"class_cost must be 'focal' or 'softmax', got {class_cost!r}")
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.class_cost = class_cost
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.check_finite = check_finite

    @torch.no_grad()
    def forward(self, outputs: Dict[str, torch.Tensor], targets) -> Indices:
        """Match one layer's predictions.

        Args:
            outputs: {"pred_logits": (B, Q, C), "pred_boxes": (B, Q, 4) normalised cxcywh}.
            targets: list of B dicts with "labels" (T_b,) int64 and "boxes" (T_b, 4) cxcywh.
        Returns:
            a list of B tuples (query_idx, target_idx) of int64 tensors on the predictions'
            device, each of length min(Q, T_b), query_idx ascending.
        """
        return self.match_layers([outputs], targets)[0]

    @torch.no_grad()
    def match_layers(self, outputs_list: Sequence[Dict[str, torch.Tensor]], targets
                     ) -> List[Indices]:
        """Match L sets of predictions of equal shape (e.g. all decoder layers) against the same
        targets, padded once. On CUDA the layers are stacked into one ``match_cost`` and one
        ``linear_sum_assignment`` call; on the CPU they are matched one by one (stacking would
        copy every layer's logits, which costs more there than the calls it saves).

        Returns a list of L results, each as ``forward`` returns.
        """
        if len(outputs_list) == 0:
            return []
        for i, o in enumerate(outputs_list):
            _check_outputs(o, f"outputs_list[{i}]")
        B, Q, C = outputs_list[0]["pred_logits"].shape
        for i, o in enumerate(outputs_list[1:], 1):
            if o["pred_logits"].shape != (B, Q, C):
                raise ValueError(f"match_layers needs predictions of one shape: outputs_list[{i}]"
                                 f"['pred_logits'] is {tuple(o['pred_logits'].shape)}, the first "
                                 f"is {(B, Q, C)}")
        _check_targets(targets, B)
        L = len(outputs_list)
        device = outputs_list[0]["pred_logits"].device
        labels, boxes, num_targets, sizes = pad_targets(targets, device)  # (B,T), (B,T,4), (B,)
        if labels.shape[1] == 0:  # no image has a target: nothing to assign
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return [[(empty, empty) for _ in range(B)] for _ in range(L)]

        # On the GPU all layers go through one match_cost and one assignment call (one launch
        # each, one sync); on the CPU layer by layer, which costs no copy of the predictions.
        groups = [outputs_list] if device.type != "cpu" else [[o] for o in outputs_list]
        return [pairs for group in groups
                for pairs in self._match_stacked(group, labels, boxes, num_targets, sizes)]

    def _match_stacked(self, outputs_list, labels, boxes, num_targets, sizes) -> List[Indices]:
        """One match_cost and one assignment call for the L layers of outputs_list, stacked
        along the batch (a copy of the predictions only when L > 1)."""
        L, B = len(outputs_list), len(sizes)

        def stack(key):  # (L*B, ...) in fp32, the DETR-family convention for costs
            x = [o[key].detach().float() for o in outputs_list]
            return x[0] if L == 1 else torch.cat(x)

        def repeat(x):
            return x if L == 1 else x.repeat(L, *([1] * (x.dim() - 1)))
        with torch.autocast(labels.device.type, enabled=False):  # the fallback's ops too
            cost = ops.match_cost(
                stack("pred_logits"), stack("pred_boxes"), repeat(labels), repeat(boxes),
                repeat(num_targets), class_cost=self.class_cost, w_class=self.cost_class,
                w_bbox=self.cost_bbox, w_giou=self.cost_giou, alpha=self.focal_alpha,
                gamma=self.focal_gamma)                                         # (L*B, Q, T)
            pairs = ops.linear_sum_assignment(cost, sizes * L, validate=self.check_finite)
        return [pairs[l * B:(l + 1) * B] for l in range(L)]

    def extra_repr(self) -> str:
        return (f"class_cost={self.class_cost!r}, cost_class={self.cost_class}, "
                f"cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
                f"focal_alpha={self.focal_alpha}, focal_gamma={self.focal_gamma}")
