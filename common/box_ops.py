"""Box helpers that torchvision.ops does not give directly.

Boxes in this project are normalised (cx, cy, w, h) inside the model and the losses, and absolute
(x1, y1, x2, y2) pixels in COCO-style detections. Conversions go through
``torchvision.ops.box_convert``; pairwise GIoU is ``common.ops.pairwise_giou`` (or
``torchvision.ops.generalized_box_iou``), element-wise GIoU loss is
``torchvision.ops.generalized_box_iou_loss``.
"""
import torch
from torchvision.ops import box_convert

__all__ = ["cxcywh_to_xyxy", "xyxy_to_cxcywh", "scale_boxes"]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size -> corners. Differentiable."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners -> centre/size. Differentiable."""
    return box_convert(boxes, "xyxy", "cxcywh")


def scale_boxes(boxes: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Normalised boxes (B, N, 4) in any 4-coordinate format -> absolute pixels.

    sizes: (B, 2) image (height, width). x coordinates are multiplied by the width, y by the
    height, as DETR's PostProcess does with ``orig_target_sizes``.
    """
    h, w = sizes.to(boxes.dtype).unbind(-1)                 # (B,), (B,)
    scale = torch.stack([w, h, w, h], dim=-1)               # (B, 4)
    return boxes * scale[:, None, :]                        # (B, N, 4)
