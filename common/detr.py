"""The DETR family on shared parts, with the encode / decode contract distillation needs.

Variants (``build_model(variant, num_classes, **overrides)``):
    detr              Carion et al., End-to-End Object Detection with Transformers, arXiv:2005.12872
    conditional_detr  Meng et al., Conditional DETR for Fast Training Convergence, arXiv:2108.06152
    dab_detr          Liu et al., DAB-DETR: Dynamic Anchor Boxes are Better Queries, arXiv:2201.12329
    deformable_detr   Zhu et al., Deformable DETR, arXiv:2010.04159 (flags with_box_refine, two_stage)
    dino              Zhang et al., DINO: DETR with Improved DeNoising Anchor Boxes, arXiv:2203.03605

Each has a frozen config dataclass whose defaults are the official ones, ``CONFIGS[variant]``,
defined in common/config.py (where the criterion reads them too) and re-exported here.

Contract (what the criterion, the engine and the distillers rely on):
    enc = model.encode(images, masks)                     -> Encoded
    q   = model.init_queries(enc)                         -> Queries (the variant's own)
    dec = model.decode(enc, queries=None, targets=None, return_attention=False) -> Decoded
    out = model(images, masks, targets=None)              -> DETR-style dict view
``decode`` accepts ``Queries`` from outside (e.g. a teacher's), so two decoders can run on the
same queries. DINO's denoising queries are added only in training mode when targets are given,
and their outputs are kept apart in ``Decoded.dn``.
"""
import copy
import math
from dataclasses import dataclass, fields, replace
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from common.backbone import build_backbone, sine_embed
from common.config import (CONFIGS, ConditionalDETRConfig, DABDETRConfig, DeformableDETRConfig,
                           DETRConfig, DINOConfig)
from common.matcher import _check_targets
from common.transformer import (MLP, ConditionalDecoder, DecoderLayer, DeformableDecoder,
                                DeformableDecoderLayer, DeformableEncoderLayer,
                                DeformableTransformerEncoder, DETRDecoder, EncoderLayer,
                                TransformerEncoder, encoder_proposals, prepare_cdn)

__all__ = ["split_levels", "DETRConfig", "ConditionalDETRConfig", "DABDETRConfig", "DeformableDETRConfig",
           "DINOConfig", "CONFIGS", "Encoded", "Proposals", "Queries", "Decoded", "DETRModel",
           "build_model"]


_MULTI_SCALE = ("deformable_detr", "dino")


# ------------------------------------------------------------------------------------------
# Output types
# ------------------------------------------------------------------------------------------

@dataclass
class Proposals:
    """Encoder proposals (Deformable two-stage, DINO): every token scored and boxed, plus the
    top-k the decoder starts from. ``anchors`` are logit-space (+inf where invalid)."""
    memory: torch.Tensor        # (B,S,D) after enc_output + enc_output_norm
    anchors: torch.Tensor       # (B,S,4)
    logits: torch.Tensor        # (B,S,C)
    boxes: torch.Tensor         # (B,S,4) sigmoid(bbox head + anchors), cxcywh
    topk_index: torch.Tensor    # (B,K) int64
    topk_logits: torch.Tensor   # (B,K,C)
    topk_boxes: torch.Tensor    # (B,K,4) not detached
    topk_memory: torch.Tensor   # (B,K,D)


def split_levels(memory: torch.Tensor, spatial_shapes_list) -> List[torch.Tensor]:
    """Encoder memory (B,S,D), tokens ordered level by level, -> per-level maps (B,D,H_l,W_l).
    Flattening each back and concatenating gives the memory again."""
    B, S, D = memory.shape
    if S != sum(H * W for H, W in spatial_shapes_list):
        raise ValueError(f"memory has {S} tokens but the spatial shapes {spatial_shapes_list} "
                         f"cover {sum(H * W for H, W in spatial_shapes_list)}")
    maps, start = [], 0
    for H, W in spatial_shapes_list:
        maps.append(memory[:, start:start + H * W].transpose(1, 2).reshape(B, D, H, W))
        start += H * W
    return maps


@dataclass
class Encoded:
    features: List[torch.Tensor]           # per level (B,D,H_l,W_l), after input_proj
    backbone_features: List[torch.Tensor]  # per backbone stage (B,C_l,H_l,W_l), before it
    masks: List[torch.Tensor]              # per level (B,H_l,W_l) bool, True on padding
    pos: List[torch.Tensor]                # per level (B,D,H_l,W_l) sine encoding
    memory: torch.Tensor                   # (B,S,D) encoder output, S = sum H_l*W_l
    mask_flatten: torch.Tensor             # (B,S)
    pos_flatten: torch.Tensor              # (B,S,D) as the encoder used it (+ level_embed)
    spatial_shapes: torch.Tensor           # (L,2) int64 (H,W), on the device
    spatial_shapes_list: List[Tuple[int, int]]
    level_start_index: torch.Tensor        # (L,) int64
    valid_ratios: torch.Tensor             # (B,L,2) (w,h) fraction not covered by padding
    proposals: Optional[Proposals] = None

    def memory_levels(self) -> List[torch.Tensor]:
        """The encoder memory cut back into its levels: per level (B,D,H_l,W_l)."""
        return split_levels(self.memory, self.spatial_shapes_list)

    def image(self, b: int) -> "Encoded":
        """The encoding of image b alone (batch of one), e.g. to decode one image's own queries
        over its own memory; proposals are dropped (decode does not read them)."""
        one = lambda x: x[b:b + 1]  # noqa: E731
        return replace(self, features=[one(f) for f in self.features],
                       backbone_features=[one(f) for f in self.backbone_features],
                       masks=[one(m) for m in self.masks], pos=[one(p) for p in self.pos],
                       memory=one(self.memory), mask_flatten=one(self.mask_flatten),
                       pos_flatten=one(self.pos_flatten), valid_ratios=one(self.valid_ratios),
                       proposals=None)


@dataclass
class Queries:
    """Decoder queries. ``reference`` is always in normalised [0,1] (sigmoid) space, never logits.

    detr:              content (B,Q,D) zeros, pos (B,Q,D) learned; reference None.
    conditional_detr:  content, pos; reference None = sigmoid(ref_point_head(pos)) (official),
                       or a given (B,Q,2) point used instead.
    dab_detr:          content, reference (B,Q,4) anchor boxes; pos None (made per layer).
    deformable_detr:   content, pos, reference (B,Q,2) points (or (B,Q,4) boxes in two-stage);
                       reference None = sigmoid(transformer.reference_points(pos)).
    dino:              content, reference (B,Q,4); pos None (made per layer).
    attn_mask:         optional (Q,Q) bool self-attention mask, True = blocked, or (B,Q,Q) one
                       per image (Deformable DETR and DINO only).
    """
    content: torch.Tensor
    pos: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None
    attn_mask: Optional[torch.Tensor] = None


@dataclass
class Decoded:
    """Stacked per decoder layer (first axis L). Matching queries only; DINO's denoising queries
    are in ``dn`` (a Decoded of the same fields for the N_dn queries, with ``dn_meta``)."""
    hs: torch.Tensor            # (L,B,Q,D) what the heads see (after the decoder norm)
    hs_raw: torch.Tensor        # (L,B,Q,D) before the decoder norm (same as hs for Deformable)
    logits: torch.Tensor        # (L,B,Q,C)
    boxes: torch.Tensor         # (L,B,Q,4) normalised cxcywh
    refs_in: Optional[torch.Tensor]  # (L,B,Q,2|4) reference each layer's box was relative to
    # (a list of per-layer tensors for Deformable refine from 2-D points: (B,Q,2) then (B,Q,4))
    query_pos: torch.Tensor     # (L,B,Q,D) positional query each layer used
    queries: Optional[Queries] = None   # the matching queries that went in
    attention: Optional[dict] = None    # dense: "cross_attn_weights" (L,B,heads,Q,S); deformable:
    # "sampling_locations" (L,B,Q,heads,Lv,P,2), "attention_weights" (L,B,Q,heads,Lv,P)
    dn: Optional["Decoded"] = None
    dn_meta: Optional[dict] = None


# ------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------

def _focal_head_init(class_embed: nn.Linear, bbox_embed: MLP):
    # prior 0.01 on every class (RetinaNet, Lin et al. arXiv:1708.02002 sec. 4.1): bias -4.6
    nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
    nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
    nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)


def _xavier(module: nn.Module):
    # what each official Transformer._reset_parameters does to every matrix it owns
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class DETRModel(nn.Module):
    """One model class for all variants; ``variant`` picks the query type, layers and heads."""

    def __init__(self, variant: str, num_classes: int, cfg):
        super().__init__()
        if variant not in CONFIGS:
            raise ValueError(f"variant must be one of {sorted(CONFIGS)}, got {variant!r}")
        if not (isinstance(num_classes, int) and num_classes > 0):
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.variant, self.cfg, self.num_classes = variant, cfg, num_classes
        D, multi = cfg.hidden_dim, variant in _MULTI_SCALE
        self.hidden_dim, self.num_queries = D, cfg.num_queries
        self.backbone = build_backbone(cfg.backbone, D, cfg.pos_temperature, cfg.pos_offset,
                                       return_interm_layers=multi, dilation=cfg.dilation,
                                       width=cfg.width, train_backbone=cfg.lr_backbone > 0,
                                       pretrained=cfg.pretrained, backbone_weights=cfg.backbone_weights)
        chans = self.backbone.num_channels
        self.transformer = nn.Module()  # holds parameters under the official "transformer." prefix
        t = self.transformer
        L = cfg.dec_layers
        if multi:
            n_lv = cfg.num_feature_levels
            if n_lv < len(chans):
                raise ValueError(f"num_feature_levels must be >= {len(chans)}, got {n_lv}")
            # C3..C5: 1x1 conv + GN; extra levels: 3x3 stride-2 conv + GN (first one on raw C5)
            projs = [nn.Sequential(nn.Conv2d(c, D, 1), nn.GroupNorm(math.gcd(32, D), D))
                     for c in chans]
            in_ch = chans[-1]
            for _ in range(n_lv - len(chans)):
                projs.append(nn.Sequential(nn.Conv2d(in_ch, D, 3, stride=2, padding=1),
                                           nn.GroupNorm(math.gcd(32, D), D)))
                in_ch = D
            self.input_proj = nn.ModuleList(projs)
            for p in self.input_proj:
                nn.init.xavier_uniform_(p[0].weight, gain=1)
                nn.init.constant_(p[0].bias, 0)
            t.level_embed = nn.Parameter(torch.empty(n_lv, D))
            t.encoder = DeformableTransformerEncoder(DeformableEncoderLayer(
                D, cfg.dim_feedforward, cfg.dropout, cfg.activation, n_lv, cfg.nheads,
                cfg.enc_n_points), cfg.enc_layers)
            t.decoder = DeformableDecoder(DeformableDecoderLayer(
                D, cfg.dim_feedforward, cfg.dropout, cfg.activation, n_lv, cfg.nheads,
                cfg.dec_n_points), L, D, dino=(variant == "dino"),
                inverse_sigmoid_eps=cfg.inverse_sigmoid_eps)
        else:
            self.input_proj = nn.Conv2d(chans[-1], D, kernel_size=1)
            enc_layer = EncoderLayer(D, cfg.nheads, cfg.dim_feedforward, cfg.dropout, cfg.activation)
            t.encoder = TransformerEncoder(enc_layer, cfg.enc_layers, D,
                                           pos_scale=(variant == "dab_detr"))
            if variant == "detr":
                t.decoder = DETRDecoder(DecoderLayer(D, cfg.nheads, cfg.dim_feedforward,
                                                     cfg.dropout, cfg.activation), L, D)
            else:
                kw = dict(d_model=D, nhead=cfg.nheads, dim_feedforward=cfg.dim_feedforward,
                          dropout=cfg.dropout, activation=cfg.activation)
                t.decoder = ConditionalDecoder(kw, L, D, anchor_dim=4 if variant == "dab_detr" else 2,
                                               modulate_hw_attn=getattr(cfg, "modulate_hw_attn", False),
                                               inverse_sigmoid_eps=cfg.inverse_sigmoid_eps)

        # variant-specific query parameters
        two_stage = variant == "deformable_detr" and cfg.two_stage
        if variant in ("detr", "conditional_detr"):
            self.query_embed = nn.Embedding(cfg.num_queries, D)
        elif variant == "dab_detr":
            self.refpoint_embed = nn.Embedding(cfg.num_queries, 4)  # anchors as logits
        elif variant == "deformable_detr" and not two_stage:
            self.query_embed = nn.Embedding(cfg.num_queries, 2 * D)  # [pos | content]
            t.reference_points = nn.Linear(D, 2)
        if two_stage or variant == "dino":
            t.enc_output, t.enc_output_norm = nn.Linear(D, D), nn.LayerNorm(D)
        if two_stage:
            t.pos_trans, t.pos_trans_norm = nn.Linear(2 * D, 2 * D), nn.LayerNorm(2 * D)
        if variant == "dino":
            t.tgt_embed = nn.Embedding(cfg.num_queries, D)
        # official transformer init: xavier on every matrix, then MSDeformAttn's own init
        _xavier(t)
        for m in t.modules():
            if hasattr(m, "_reset_parameters") and m is not t:
                m._reset_parameters()
        if multi:
            nn.init.normal_(t.level_embed)
        if hasattr(t, "reference_points"):
            nn.init.xavier_uniform_(t.reference_points.weight, gain=1.0)
            nn.init.constant_(t.reference_points.bias, 0.0)
        if variant == "dino":
            # (tgt_embed keeps the xavier init: DINO draws it normal, then its
            # _reset_parameters overwrites every matrix of the transformer with xavier)
            self.label_enc = nn.Embedding(num_classes + 1, D)  # +1: DINO's dn_labelbook_size + 1

        # heads: a ModuleList over layers (+1 for two-stage proposals), the same object if shared
        class_embed = nn.Linear(D, num_classes + 1 if cfg.class_loss == "softmax" else num_classes)
        bbox_embed = MLP(D, D, 4, 3)
        if cfg.class_loss == "focal":
            _focal_head_init(class_embed, bbox_embed)
        num_pred = L + 1 if two_stage else L
        if variant == "deformable_detr":
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)  # start from small w, h
        if variant == "deformable_detr" and cfg.with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            for b in self.bbox_embed[1:]:  # official: only the first keeps the -2 w/h bias
                nn.init.constant_(b.layers[-1].bias[2:], 0.0)
        else:
            self.class_embed = nn.ModuleList(class_embed for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(bbox_embed for _ in range(num_pred))
        if two_stage:
            for b in self.bbox_embed:
                nn.init.constant_(b.layers[-1].bias[2:], 0.0)
        if variant == "dino":  # separate copies for the encoder proposals (not shared)
            t.enc_out_class_embed = copy.deepcopy(class_embed)
            t.enc_out_bbox_embed = copy.deepcopy(bbox_embed)

    # -------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, masks: torch.Tensor) -> Encoded:
        """images (B,3,H,W) float, contiguous NCHW; masks (B,H,W) bool, True on padding."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 \
                or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (B,3,H,W), got "
                             f"{getattr(images, 'shape', type(images))}")
        if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool or \
                masks.shape != (images.shape[0],) + tuple(images.shape[2:]):
            raise ValueError(f"masks must be a bool tensor (B,H,W) = {(images.shape[0],) + tuple(images.shape[2:])}, "
                             f"got {getattr(masks, 'dtype', type(masks))} {tuple(getattr(masks, 'shape', ()))}")
        images = images.contiguous()  # NCHW (channels-last backward crashes this torch on CPU)
        feats, fmasks, pos = self.backbone(images, masks)
        t, multi = self.transformer, self.variant in _MULTI_SCALE
        if multi:
            srcs = [proj(f) for proj, f in zip(self.input_proj, feats)]
            lv_masks, lv_pos = list(fmasks), list(pos)
            for lvl in range(len(feats), len(self.input_proj)):
                src = self.input_proj[lvl](feats[-1] if lvl == len(feats) else srcs[-1])
                m = F.interpolate(masks[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
                srcs.append(src), lv_masks.append(m), lv_pos.append(self.backbone[1](m).to(src.dtype))
        else:
            srcs, lv_masks, lv_pos = [self.input_proj(feats[-1])], fmasks[-1:], pos[-1:]
        shapes = [tuple(s.shape[-2:]) for s in srcs]
        src_flat = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)  # (B,S,D)
        mask_flat = torch.cat([m.flatten(1) for m in lv_masks], 1)  # (B,S)
        pos_flat = [p.flatten(2).transpose(1, 2) for p in lv_pos]
        if multi:
            pos_flat = [p + t.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_flat)]
        pos_flat = torch.cat(pos_flat, 1)  # (B,S,D)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flat.device)
        hw = torch.tensor([h * w for h, w in shapes], dtype=torch.long)
        level_start_index = (torch.cumsum(hw, 0) - hw).to(src_flat.device)
        valid_ratios = torch.stack([self._valid_ratio(m) for m in lv_masks], 1)  # (B,L,2)
        if multi:
            memory = t.encoder(src_flat, pos_flat, spatial_shapes, shapes, level_start_index,
                               valid_ratios, mask_flat)
        else:
            memory = t.encoder(src_flat, pos_flat, mask_flat)
        enc = Encoded(srcs, feats, lv_masks, lv_pos, memory, mask_flat, pos_flat, spatial_shapes,
                      shapes, level_start_index, valid_ratios)
        if self.variant == "dino" or (self.variant == "deformable_detr" and self.cfg.two_stage):
            enc.proposals = self._proposals(enc)
        return enc

    @staticmethod
    def _valid_ratio(mask):
        """(B,H,W) -> (B,2): fraction of width and height not covered by padding."""
        _, H, W = mask.shape
        valid_h = (~mask[:, :, 0]).sum(1).float()
        valid_w = (~mask[:, 0, :]).sum(1).float()
        return torch.stack([valid_w / W, valid_h / H], -1)

    def _proposals(self, enc: Encoded) -> Proposals:
        t = self.transformer
        memory, anchors = encoder_proposals(enc.memory, enc.mask_flatten, enc.spatial_shapes_list)
        memory = t.enc_output_norm(t.enc_output(memory))  # (B,S,D)
        if self.variant == "dino":
            logits = t.enc_out_class_embed(memory)
            boxes_unact = t.enc_out_bbox_embed(memory) + anchors
            score = logits.max(-1)[0]  # DINO: max over classes (real labels in its loss)
        else:
            L = self.cfg.dec_layers  # the extra (L+1-th) head pair
            logits = self.class_embed[L](memory)
            boxes_unact = self.bbox_embed[L](memory) + anchors
            score = logits[..., 0]  # Deformable two-stage: class channel 0 (class-agnostic loss)
        k = min(self.num_queries, score.shape[1])
        idx = torch.topk(score, k, dim=1)[1]  # (B,K)
        gather = lambda x: torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))
        return Proposals(memory, anchors, logits, boxes_unact.sigmoid(), idx, gather(logits),
                         gather(boxes_unact).sigmoid(), gather(memory))

    # -------------------------------------------------------------------------------------
    def init_queries(self, enc: Encoded) -> Queries:
        """The variant's own matching queries for a batch (see ``Queries``)."""
        B, D = enc.memory.shape[0], self.hidden_dim
        batch = lambda w: w[None].expand(B, -1, -1)
        v = self.variant
        if v in ("detr", "conditional_detr"):
            pos = batch(self.query_embed.weight)
            return Queries(torch.zeros_like(pos), pos=pos)
        if v == "dab_detr":
            ref = batch(self.refpoint_embed.weight).sigmoid()
            return Queries(torch.zeros(B, ref.shape[1], D, device=ref.device, dtype=enc.memory.dtype),
                           reference=ref)
        if v == "dino":  # mixed query selection: anchors from proposals, content learned
            return Queries(batch(self.transformer.tgt_embed.weight),
                           reference=enc.proposals.topk_boxes.detach())
        if self.cfg.two_stage:
            ref = enc.proposals.topk_boxes.detach()  # (B,K,4)
            t = self.transformer
            pos_content = t.pos_trans_norm(t.pos_trans(sine_embed(ref, D // 2, order="xywh")))
            pos, content = pos_content.split(D, dim=-1)  # positional half first
            return Queries(content, pos=pos, reference=ref)
        pos, content = batch(self.query_embed.weight).split(D, dim=-1)  # positional half first
        return Queries(content, pos=pos, reference=self.transformer.reference_points(pos).sigmoid())

    def _check_queries(self, q: Queries, B: int):
        if not isinstance(q, Queries):
            raise TypeError(f"queries must be a Queries, got {type(q).__name__}")
        D = self.hidden_dim
        if not isinstance(q.content, torch.Tensor) or q.content.dim() != 3 or \
                q.content.shape[0] != B or q.content.shape[2] != D:
            raise ValueError(f"queries.content must be (B={B}, Q, D={D}), got "
                             f"{tuple(getattr(q.content, 'shape', ()))}")
        Q, v = q.content.shape[1], self.variant
        need_pos = v in ("detr", "conditional_detr", "deformable_detr")
        ref_dims = {"detr": (), "conditional_detr": (2,), "dab_detr": (4,),
                    "deformable_detr": (2, 4), "dino": (4,)}[v]
        if need_pos and (q.pos is None or q.pos.shape != q.content.shape):
            raise ValueError(f"{v} needs queries.pos of shape {tuple(q.content.shape)}, got "
                             f"{None if q.pos is None else tuple(q.pos.shape)}")
        if not need_pos and q.pos is not None:
            raise ValueError(f"{v} makes its positional queries from the reference; queries.pos "
                             f"must be None")
        if q.reference is None:
            if v in ("dab_detr", "dino"):
                raise ValueError(f"{v} needs queries.reference (B,Q,4) anchor boxes in [0,1]")
        elif q.reference.dim() != 3 or q.reference.shape[:2] != (B, Q) or \
                q.reference.shape[2] not in ref_dims:
            raise ValueError(f"queries.reference must be (B={B}, Q={Q}, one of {ref_dims}) for "
                             f"{v}, got {tuple(q.reference.shape)}")
        if q.attn_mask is not None and (q.attn_mask.dtype != torch.bool or
                                        q.attn_mask.shape not in ((Q, Q), (B, Q, Q))):
            raise ValueError(f"queries.attn_mask must be bool (Q,Q)=({Q},{Q}) or per image "
                             f"(B,Q,Q)=({B},{Q},{Q}), got {q.attn_mask.dtype} "
                             f"{tuple(q.attn_mask.shape)}")
        if v != "dino" and v != "deformable_detr" and q.attn_mask is not None:
            raise ValueError(f"{v} does not take a self-attention mask")

    def decode(self, enc: Encoded, queries: Optional[Queries] = None, targets=None,
               return_attention=False) -> Decoded:
        """Run the decoder on ``queries`` (the variant's own when None). For DINO in training
        mode with targets, contrastive denoising queries are prepended and returned in ``dn``."""
        B = enc.memory.shape[0]
        q = self.init_queries(enc) if queries is None else queries
        self._check_queries(q, B)
        content, pos, ref, attn_mask, dn_meta = q.content, q.pos, q.reference, q.attn_mask, None
        v, t = self.variant, self.transformer
        if v == "dino" and self.training and targets is not None and self.cfg.dn_number > 0:
            _check_targets(targets, B, self.num_classes)
            dn_content, dn_ref, dn_mask, dn_meta = prepare_cdn(
                targets, self.cfg.dn_number, self.cfg.dn_label_noise_ratio,
                self.cfg.dn_box_noise_scale, self.num_classes, content.shape[1], self.label_enc,
                self.cfg.inverse_sigmoid_eps)
            N = dn_meta["num_dn_queries"]
            content = torch.cat([dn_content.to(content.dtype), content], 1)  # DN block first
            ref = torch.cat([dn_ref.to(ref.dtype), ref], 1)
            if attn_mask is not None and attn_mask.dim() == 3:  # per image: (B,N+Q,N+Q)
                dn_mask = dn_mask[None].repeat(B, 1, 1)
                dn_mask[:, N:, N:] |= attn_mask
            elif attn_mask is not None:
                dn_mask[N:, N:] |= attn_mask
            attn_mask = dn_mask
        if attn_mask is not None and attn_mask.dim() == 3:
            # nn.MultiheadAttention takes a per-image mask as (B*heads,Q,Q), image-major
            attn_mask = attn_mask.repeat_interleave(self.cfg.nheads, 0)
        if v == "deformable_detr" and ref is None:
            ref = t.reference_points(pos).sigmoid()
        heads = list(self.bbox_embed)
        if v == "detr":
            out = t.decoder(content, pos, enc.memory, enc.pos_flatten, enc.mask_flatten, heads,
                            return_attention)
        elif v in ("conditional_detr", "dab_detr"):
            out = t.decoder(content, pos, ref, enc.memory, enc.pos_flatten, enc.mask_flatten,
                            heads, return_attention)
        else:
            refine = v == "dino" or self.cfg.with_box_refine
            out = t.decoder(content, pos, ref, enc.memory, enc.mask_flatten, enc.spatial_shapes,
                            enc.spatial_shapes_list, enc.level_start_index, enc.valid_ratios,
                            heads, refine, attn_mask, return_attention)
        logits = torch.stack([self.class_embed[i](h) for i, h in enumerate(out["hs"])])
        if v == "dino":  # keeps label_enc in the graph without DN (official hs[0] += w[0,0]*0)
            logits = logits + self.label_enc.weight[0, 0] * 0.0
        fields_ = dict(hs=out["hs"], hs_raw=out["hs_raw"], logits=logits, boxes=out["boxes"],
                       refs_in=out.get("refs_in"), query_pos=out["query_pos"])
        attn = out["attn"]
        if dn_meta is None:
            return Decoded(**fields_, queries=q, attention=attn)
        N = dn_meta["num_dn_queries"]
        dn = Decoded(**{k: (x[:, :, :N] if x is not None else None) for k, x in fields_.items()})
        main = {k: (x[:, :, N:] if x is not None else None) for k, x in fields_.items()}  # DINO: tensors
        if attn is not None:
            attn = {k: x[:, :, N:] for k, x in attn.items()}  # (L,B,Q,...) deformable layout
        return Decoded(**main, queries=q, attention=attn, dn=dn, dn_meta=dn_meta)

    # -------------------------------------------------------------------------------------
    def forward(self, images, masks, targets=None):
        """DETR-style dict: pred_logits (B,Q,C), pred_boxes (B,Q,4), aux_outputs (earlier layers),
        enc_outputs (two-stage: all tokens; DINO: the selected top-k, official
        'interm_outputs'), dn_outputs / dn_meta (DINO training with targets)."""
        enc = self.encode(images, masks)
        return self.outputs(enc, self.decode(enc, targets=targets))

    def outputs(self, enc, dec):
        """The DETR-style dict of ``forward`` from an ``encode`` and a ``decode`` result, for
        callers (distillers) that need the inner signals and the criterion's input alike."""
        out = {"pred_logits": dec.logits[-1], "pred_boxes": dec.boxes[-1],
               "aux_outputs": [{"pred_logits": a, "pred_boxes": b}
                               for a, b in zip(dec.logits[:-1], dec.boxes[:-1])]}
        p = enc.proposals
        if p is not None and self.variant == "dino":
            out["enc_outputs"] = {"pred_logits": p.topk_logits, "pred_boxes": p.topk_boxes}
        elif p is not None:
            out["enc_outputs"] = {"pred_logits": p.logits, "pred_boxes": p.boxes}
        if dec.dn is not None:
            out["dn_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                 for a, b in zip(dec.dn.logits, dec.dn.boxes)]
            out["dn_meta"] = {k: dec.dn_meta[k] for k in ("num_dn_queries", "num_groups",
                                                           "positive")}
        return out


def build_model(variant: str, num_classes: int, **overrides) -> DETRModel:
    """``build_model("deformable_detr", 80, with_box_refine=True, backbone="tiny")``: the
    variant's config with the named fields replaced (unknown names are an error)."""
    if variant not in CONFIGS:
        raise ValueError(f"variant must be one of {sorted(CONFIGS)}, got {variant!r}")
    cls = CONFIGS[variant]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown config fields for {variant}: {unknown}; valid: {sorted(names)}")
    return DETRModel(variant, num_classes, replace(cls(), **overrides))
