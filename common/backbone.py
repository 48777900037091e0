"""Backbones and sine position encodings shared by the DETR family.

* ``Backbone``: a torchvision ResNet-18/34/50/101 with frozen batch norm (``FrozenBatchNorm2d``),
  optional dilation of the last stage (the "DC5" models), or a tiny ResNet of BasicBlocks with a
  chosen width and GroupNorm, trained whole from scratch, for CPU experiments. It returns C5 only (DETR, Conditional DETR, DAB-DETR) or
  C3, C4, C5 (Deformable DETR, DINO-4scale), each with the padding mask resized to it.
* ``PositionEmbeddingSine``: the normalised 2-D sine encoding of the image grid (DETR,
  Carion et al. arXiv:2005.12872, sec. 3 and appendix; temperature and the -0.5 pixel-centre
  offset differ per variant).
* ``sine_embed``: the sine embedding of query points or boxes (Conditional DETR, Meng et al.
  arXiv:2108.06152, eq. 4; DAB-DETR, Liu et al. arXiv:2201.12329, sec. 4.2), in the order
  y, x, w, h; or x, y, w, h for Deformable DETR's two-stage proposals.
* ``Joiner``: backbone + position encoding as ``backbone.0`` / ``backbone.1``, the layout of
  every official checkpoint (keys ``backbone.0.body.layer1...``).

Pretrained weights come only from a file that is already on disk: for ``pretrained=True``
torchvision's ImageNet file (``IMAGENET1K_V1``, the weights the official DETR repositories start
from) in torchvision's cache (``torch.hub.get_dir()/checkpoints``), or an explicit
``backbone_weights`` path. Nothing here ever starts a download: a missing file is an error that
names the file, the folder and the URL (``cached_imagenet_weights``).
"""
import math
import os
import urllib.parse
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["Backbone", "PositionEmbeddingSine", "Joiner", "sine_embed", "build_backbone",
           "imagenet_weights", "cached_imagenet_weights"]

_TORCHVISION_RESNETS = {
    "resnet18": ("resnet18", "ResNet18_Weights"),
    "resnet34": ("resnet34", "ResNet34_Weights"),
    "resnet50": ("resnet50", "ResNet50_Weights"),
    "resnet101": ("resnet101", "ResNet101_Weights"),
}


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def _tiny_resnet(width: int) -> nn.Module:
    """A ResNet-10-like network (one BasicBlock per stage) with channels w, 2w, 4w, 8w.

    Same attribute names as torchvision's ResNet (conv1, bn1, layer1..layer4), so the rest of
    the code treats it exactly like resnet18 with a smaller width. It is meant to be trained from
    scratch (there are no ImageNet weights for it), so it normalises with GroupNorm, which trains
    from scratch at any batch size and gives the same result whether a batch is split across
    processes or not (He et al., "Rethinking ImageNet Pre-training", arXiv:1811.08883), and all of
    it trains: frozen batch norm and a frozen stem are conventions for pretrained ResNets only.
    """
    net = nn.Module()
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = _group_norm(width)
    net.relu = nn.ReLU(inplace=True)
    net.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    in_ch = width
    for i, (ch, stride) in enumerate([(width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)]):
        down = None
        if stride != 1 or in_ch != ch:
            down = nn.Sequential(nn.Conv2d(in_ch, ch, 1, stride=stride, bias=False),
                                 _group_norm(ch))
        setattr(net, f"layer{i + 1}", nn.Sequential(
            BasicBlock(in_ch, ch, stride, down, norm_layer=_group_norm)))
        in_ch = ch
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def imagenet_weights(name: str):
    """The ImageNet weights the official DETR repositories start ``name`` from: torchvision's
    ``IMAGENET1K_V1`` (e.g. ``torchvision.models.ResNet50_Weights.IMAGENET1K_V1``). Returns
    (weights enum member, the file's path in torchvision's cache, its URL). The cache folder is
    ``torch.hub.get_dir()/checkpoints`` ($TORCH_HOME/hub/checkpoints), and the file name is the
    URL's last part, as ``torch.hub.load_state_dict_from_url`` names it."""
    if name not in _TORCHVISION_RESNETS:
        raise ValueError(f"ImageNet weights exist for {sorted(_TORCHVISION_RESNETS)}, not "
                         f"{name!r}; pass backbone_weights=PATH for other backbones")
    enum = getattr(torchvision.models, _TORCHVISION_RESNETS[name][1]).IMAGENET1K_V1
    path = os.path.join(torch.hub.get_dir(), "checkpoints",
                        os.path.basename(urllib.parse.urlparse(enum.url).path))
    return enum, path, enum.url


def cached_imagenet_weights(name: str) -> str:
    """The path of ``name``'s ImageNet file in torchvision's cache. Never downloads: when the
    file is not there, a FileNotFoundError says which file to put in which folder, and where it
    comes from."""
    enum, path, url = imagenet_weights(name)
    if not os.path.isfile(path):
        folder, fname = os.path.split(path)
        raise FileNotFoundError(
            f"the ImageNet weights of {name} are not in the local torchvision cache: put the "
            f"file {fname} into the folder {folder} (torchvision's cache, "
            f"torch.hub.get_dir()/checkpoints; set TORCH_HOME to use another one). It is "
            f"torchvision.models.{type(enum).__name__}.IMAGENET1K_V1, from {url} (e.g. "
            f"`wget -P {folder} {url}` on a machine with network; nothing is downloaded here). "
            f"Or start the backbone from another file (--backbone-weights PATH), or from "
            f"random weights (--no-pretrained, pretrained=False)")
    return path


def _load_weights(net: nn.Module, name: str, pretrained: bool, backbone_weights: Optional[str]):
    """Fill ``net`` from a local file; raise a clear error when the file is not there."""
    if backbone_weights is not None:
        path = os.path.expanduser(str(backbone_weights))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"backbone_weights: no such file {path!r}")
    elif pretrained:
        if name not in _TORCHVISION_RESNETS:
            raise ValueError(f"pretrained=True needs a torchvision ResNet, not {name!r}; "
                             f"pass backbone_weights=PATH for other backbones")
        path = cached_imagenet_weights(name)
    else:
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # no classifier
    missing, unexpected = net.load_state_dict(state, strict=False)
    # FrozenBatchNorm2d has no num_batches_tracked; nothing else may be missing or unexpected.
    missing = [k for k in missing if not k.endswith("num_batches_tracked") and not k.startswith("fc.")]
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"backbone weights {path!r} do not fit {name}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


class Backbone(nn.Module):
    """ResNet body with frozen BN, returning the last one or three stages.

    Args:
        name: "resnet18" | "resnet34" | "resnet50" | "resnet101" | "tiny" (BasicBlocks with
              ``width`` base channels, for CPU runs).
        train_backbone: if False every parameter is frozen; if True the stem and layer1 stay
              frozen and layer2-4 train, as in all official repositories (ResNets; the tiny
              backbone trains whole).
        return_interm_layers: C3, C4, C5 (strides 8/16/32) instead of C5 only.
        dilation: DC5, layer4 with dilation 2 instead of stride 2 (Bottleneck ResNets only).
    """

    def __init__(self, name="resnet50", train_backbone=True, return_interm_layers=False,
                 dilation=False, width=16, pretrained=False, backbone_weights=None):
        super().__init__()
        if name == "tiny":
            if dilation:
                raise ValueError("dilation (DC5) is not supported by the 'tiny' backbone")
            if not (isinstance(width, int) and width > 0):
                raise ValueError(f"width must be a positive int, got {width!r}")
            body = _tiny_resnet(width)
            channels = [2 * width, 4 * width, 8 * width]
        elif name in _TORCHVISION_RESNETS:
            if dilation and name in ("resnet18", "resnet34"):
                raise ValueError(f"dilation (DC5) needs a Bottleneck ResNet, not {name}")
            body = getattr(torchvision.models, _TORCHVISION_RESNETS[name][0])(
                weights=None, replace_stride_with_dilation=[False, False, dilation],
                norm_layer=FrozenBatchNorm2d)
            expansion = 4 if name in ("resnet50", "resnet101") else 1
            channels = [128 * expansion, 256 * expansion, 512 * expansion]
        else:
            raise ValueError(f"backbone name must be one of {sorted(_TORCHVISION_RESNETS)} or "
                             f"'tiny', got {name!r}")
        _load_weights(body, name, pretrained, backbone_weights)
        for pname, p in body.named_parameters():
            # official recipe for pretrained ResNets: stem and layer1 frozen; the tiny backbone
            # learns from scratch (or from a glyph-classifier checkpoint), so all of it trains
            if not train_backbone or (name != "tiny"
                                      and not pname.startswith(("layer2", "layer3", "layer4"))):
                p.requires_grad_(False)
        if return_interm_layers:
            return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
            self.strides, self.num_channels = [8, 16, 32], channels
        else:
            return_layers = {"layer4": "0"}
            self.strides, self.num_channels = [32], channels[-1:]
        if dilation:
            self.strides[-1] = 16
        self.body = IntermediateLayerGetter(body, return_layers=return_layers)

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """images (B,3,H,W), mask (B,H,W) True on padding -> lists of features (B,C_l,H_l,W_l)
        and masks (B,H_l,W_l), one per returned stage."""
        feats = list(self.body(images).values())
        masks = [F.interpolate(mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0]
                 for f in feats]  # nearest, as DETR
        return feats, masks


class PositionEmbeddingSine(nn.Module):
    """Normalised 2-D sine encoding: ``num_pos_feats`` channels for y, then as many for x.

    Each coordinate is the cumulative count of valid pixels along its axis, shifted by
    ``offset`` (Deformable DETR uses -0.5, i.e. pixel centres), divided by the valid extent and
    scaled to [0, 2*pi]; channel pair (2i, 2i+1) holds sin/cos of coord / T^(2i/num_pos_feats).
    DETR / Conditional DETR / Deformable DETR use T = 10000; DAB-DETR and DINO use 20 (for both
    axes: their ``PositionEmbeddingSineHW`` with equal temperatures is this class).
    """

    def __init__(self, num_pos_feats=128, temperature=10000.0, offset=0.0, scale=2 * math.pi,
                 eps=1e-6):
        super().__init__()
        self.num_pos_feats, self.temperature = num_pos_feats, temperature
        self.offset, self.scale, self.eps = offset, scale, eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """mask (B,H,W) bool, True on padding -> pos (B, 2*num_pos_feats, H, W) float32."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)  # (B,H,W): 1..valid_h
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") /
                                     self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t  # (B,H,W,F)
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)  # (B,2F,H,W)


def sine_embed(coords: torch.Tensor, num_feats=128, temperature=10000.0, order="yxwh"):
    """Sine embedding of normalised points (…,2) or boxes (…,4) in [0, 1].

    Each coordinate c gives ``num_feats`` channels: sin/cos pairs of 2*pi*c / T^(2i/num_feats).
    ``order="yxwh"`` (Conditional DETR, DAB-DETR, DINO) concatenates them as y, x[, w, h];
    ``order="xywh"`` (Deformable DETR two-stage ``get_proposal_pos_embed``) as x, y, w, h.
    Returns (…, coords.shape[-1] * num_feats).
    """
    if coords.shape[-1] not in (2, 4):
        raise ValueError(f"coords must end in 2 (points) or 4 (boxes), got {tuple(coords.shape)}")
    if order not in ("yxwh", "xywh"):
        raise ValueError(f"order must be 'yxwh' or 'xywh', got {order!r}")
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=coords.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = coords[..., None] * (2 * math.pi) / dim_t  # (…, 2|4, F)
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    parts = list(pos.unbind(-2))  # x, y[, w, h]
    if order == "yxwh":
        parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=-1)


class Joiner(nn.Sequential):
    """``backbone.0`` = Backbone, ``backbone.1`` = position encoding (official key layout)."""

    def __init__(self, backbone: Backbone, position_embedding: PositionEmbeddingSine):
        super().__init__(backbone, position_embedding)
        self.strides, self.num_channels = backbone.strides, backbone.num_channels

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        """-> features, masks, pos: lists over stages of (B,C_l,H_l,W_l), (B,H_l,W_l),
        (B,D,H_l,W_l) (pos in the features' dtype)."""
        feats, masks = self[0](images, mask)
        pos = [self[1](m).to(f.dtype) for f, m in zip(feats, masks)]
        return feats, masks, pos


def build_backbone(name, hidden_dim, pos_temperature, pos_offset, return_interm_layers,
                   dilation=False, width=16, train_backbone=True, pretrained=False,
                   backbone_weights=None) -> Joiner:
    if hidden_dim % 2:
        raise ValueError(f"hidden_dim must be even for the sine encoding, got {hidden_dim}")
    body = Backbone(name, train_backbone, return_interm_layers, dilation, width, pretrained,
                    backbone_weights)
    return Joiner(body, PositionEmbeddingSine(hidden_dim // 2, pos_temperature, pos_offset))
