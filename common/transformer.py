"""Attention, encoder and decoder layers and decoder loops of the DETR family.

Layers keep the official parameter names so checkpoints map onto
them almost one to one:

* ``EncoderLayer``: dense post-norm self-attention + FFN (DETR, Conditional DETR, DAB-DETR).
* ``DeformableEncoderLayer``: MSDeformAttn self-attention + FFN (Deformable DETR, DINO).
* ``DecoderLayer``: DETR's layer, ``self_attn`` -> norm1, ``multihead_attn`` -> norm2, FFN -> norm3.
* ``ConditionalDecoderLayer``: Conditional DETR's / DAB-DETR's layer with separate content and
  positional projections; cross-attention query and key are [content | spatial] per head.
* ``DeformableDecoderLayer``: Deformable DETR's / DINO's layer; NOTE the swapped norm names:
  ``self_attn`` -> norm2, ``cross_attn`` (MSDeformAttn) -> norm1, FFN -> norm3.

The decoder loops (``DETRDecoder``, ``ConditionalDecoder``, ``DeformableDecoder``) run the layers
and return stacked per-layer tensors (hidden states before and after the output norm, the
reference each layer's box head used, query positional embeddings, boxes). Heads are passed in
as arguments, not aliased as decoder attributes. All tensors are batch-first: (B, Q, D).

``prepare_cdn`` builds DINO's contrastive denoising queries and their attention mask.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from common import ops
from common.backbone import sine_embed

__all__ = ["MLP", "inverse_sigmoid", "MSDeformAttn", "ConditionalAttention", "EncoderLayer",
           "DeformableEncoderLayer", "DecoderLayer", "ConditionalDecoderLayer",
           "DeformableDecoderLayer", "TransformerEncoder", "DeformableTransformerEncoder",
           "DETRDecoder", "ConditionalDecoder", "DeformableDecoder", "prepare_cdn", "box_from",
           "encoder_proposals"]


def inverse_sigmoid(x, eps=1e-5):
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to >= eps (official helper).

    eps is the official repository's: 1e-5 in DETR, Conditional DETR and Deformable DETR,
    1e-3 in DAB-DETR and DINO (their util/misc.py). It decides the logit of a reference at 0 or 1
    (a padded proposal, a tiny or border box): log(1 / eps) is 11.5 against 6.9."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_from(delta, reference, eps=1e-5):
    """Box head output relative to a reference (all variants): sigmoid(delta + logit(ref)),
    logit = ``inverse_sigmoid(., eps)`` with the variant's eps.

    delta (…,4); reference None (DETR: the box is predicted directly), (…,2) (a point: only
    cx, cy are offset, w and h are predicted directly) or (…,4) (an anchor box)."""
    if reference is None:
        return delta.sigmoid()
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference, eps)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference, eps), delta[..., 2:]],
                     -1).sigmoid()


class MLP(nn.Module):
    """``num_layers`` Linears with ReLU between them (DETR's box head and small MLPs)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.num_layers = num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def _activation(name):
    # a module, so DAB-DETR's PReLU has its parameter ``activation.weight`` in the state dict
    return {"relu": nn.ReLU, "prelu": nn.PReLU, "gelu": nn.GELU}[name]()


# ------------------------------------------------------------------------------------------
# Attention modules
# ------------------------------------------------------------------------------------------

class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al., arXiv:2010.04159, eq. 3) around the
    ``common.ops.ms_deform_attn`` core. Parameter names and initialisation are the official ones.

    Each query attends, per head, to ``n_points`` sampled points on each of ``n_levels`` maps.
    A 2-D reference (B,Q,L,2) gives locations ref + offset / (W_l, H_l) (pixel offsets); a 4-D
    reference box (B,Q,L,4) gives ref_xy + offset / n_points * ref_wh * 0.5 (box-relative).
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # head h initially looks in direction 2*pi*h/n_heads, scaled onto the unit square;
        # point k at distance k+1 (pixels for 2-D references)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)  # uniform attention at start
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, input_flatten, spatial_shapes, level_start_index,
                input_padding_mask=None, spatial_shapes_list=None):
        """query (B,Q,D); reference_points (B,Q,L,2|4) normalised; input_flatten (B,S,D);
        spatial_shapes (L,2) int64 (H,W); level_start_index (L,); input_padding_mask (B,S) True
        on padding. -> output (B,Q,D), sampling_locations (B,Q,heads,L,P,2),
        attention_weights (B,Q,heads,L,P) (softmaxed over L*P)."""
        B, Q, _ = query.shape
        S = input_flatten.shape[1]
        H, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(B, S, H, self.d_model // H)  # (B,S,H,Dh)
        offsets = self.sampling_offsets(query).view(B, Q, H, L, P, 2)
        weights = self.attention_weights(query).view(B, Q, H, L * P).softmax(-1).view(B, Q, H, L, P)
        if reference_points.shape[-1] == 2:
            if spatial_shapes_list is not None:  # avoids a device sync
                wh = torch.tensor([[w, h] for h, w in spatial_shapes_list], dtype=offsets.dtype,
                                  device=offsets.device)
            else:
                wh = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets)
            loc = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            loc = (reference_points[:, :, None, :, None, :2] +
                   offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        # fp32 island under autocast (as DINO does): the op wants one dtype, and sampling
        # locations lose precision in half (fp16 resolves locations in [0, 1] in steps of about
        # 1/2000, a whole pixel on a 2000-pixel-wide map)
        dtype = torch.promote_types(value.dtype, loc.dtype)
        if ops.tracing():  # torch.export / jit.trace: no checks that read tensor values
            out = ops.ms_deform_attn_traceable(value.to(dtype), spatial_shapes, level_start_index,
                                               loc.to(dtype), weights.to(dtype),
                                               spatial_shapes_list)  # (B,Q,D)
        else:
            out = ops.ms_deform_attn(value.to(dtype), spatial_shapes, level_start_index,
                                     loc.to(dtype), weights.to(dtype))  # (B,Q,D)
        return self.output_proj(out.to(value.dtype)), loc, weights


class ConditionalAttention(nn.Module):
    """Multi-head attention without input projections (Conditional DETR's ``MultiheadAttention``
    copy): q and k have ``embed_dim`` channels, v has ``vdim``; only ``out_proj`` (vdim->vdim).

    In the cross-attention q/k are [content | spatial] per head, so embed_dim = 2*D and the
    logits are scaled by 1/sqrt(2*D/heads) while v has head dim D/heads.
    """

    def __init__(self, embed_dim, num_heads, vdim, dropout=0.0):
        super().__init__()
        if embed_dim % num_heads or vdim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} and vdim {vdim} must be divisible by "
                             f"num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.vdim, self.dropout = embed_dim, num_heads, vdim, dropout
        self.out_proj = nn.Linear(vdim, vdim)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(self, q, k, v, key_padding_mask=None, attn_mask=None, need_weights=False):
        """q (B,Q,E), k (B,S,E), v (B,S,Dv); key_padding_mask (B,S) / attn_mask (Q,S) True =
        blocked -> out (B,Q,Dv), weights (B,heads,Q,S) or None."""
        B, Q, E = q.shape
        S, h = k.shape[1], self.num_heads
        q = q.view(B, Q, h, E // h).transpose(1, 2)  # (B,h,Q,E/h)
        k = k.view(B, S, h, E // h).transpose(1, 2)
        v = v.view(B, S, h, self.vdim // h).transpose(1, 2)  # (B,h,S,Dv/h)
        blocked = None
        if key_padding_mask is not None:
            blocked = key_padding_mask[:, None, None, :]  # (B,1,1,S)
        if attn_mask is not None:
            blocked = attn_mask if blocked is None else (blocked | attn_mask)
        logits = (q * (E // h) ** -0.5) @ k.transpose(-2, -1)  # (B,h,Q,S)
        if blocked is not None:
            logits = logits.masked_fill(blocked, float("-inf"))
        weights = logits.softmax(-1)
        out = F.dropout(weights, self.dropout, self.training) @ v  # (B,h,Q,Dv/h)
        out = self.out_proj(out.transpose(1, 2).reshape(B, Q, self.vdim))
        return out, (weights if need_weights else None)


def _mha(attn: nn.MultiheadAttention, q, k, v, key_padding_mask=None, attn_mask=None,
         need_weights=False):
    """batch-first nn.MultiheadAttention returning per-head weights (B,heads,Q,S) on request."""
    out, w = attn(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                  need_weights=need_weights, average_attn_weights=False)
    return out, w


# ------------------------------------------------------------------------------------------
# Encoder layers and encoders
# ------------------------------------------------------------------------------------------

class EncoderLayer(nn.Module):
    """DETR's post-norm encoder layer: q = k = src + pos, v = src; norm1; FFN; norm2."""

    def __init__(self, d_model=256, nhead=8, dim_feedforward=2048, dropout=0.1, activation="relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.activation = _activation(activation)

    def forward(self, src, pos, key_padding_mask=None):
        q = k = src + pos
        src = self.norm1(src + self.dropout1(_mha(self.self_attn, q, k, src, key_padding_mask)[0]))
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerEncoder(nn.Module):
    """Dense encoder (no final norm). With ``pos_scale`` (DAB-DETR) the position embedding given
    to each layer is multiplied by ``query_scale(current tokens)``, an MLP D->D->D."""

    def __init__(self, layer, num_layers, d_model=256, pos_scale=False):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.query_scale = MLP(d_model, d_model, d_model, 2) if pos_scale else None

    def forward(self, src, pos, key_padding_mask=None):
        """src, pos (B,S,D); key_padding_mask (B,S) -> memory (B,S,D)."""
        out = src
        for layer in self.layers:
            p = pos if self.query_scale is None else pos * self.query_scale(out)
            out = layer(out, p, key_padding_mask)
        return out


class DeformableEncoderLayer(nn.Module):
    """Deformable DETR's encoder layer: MSDeformAttn(src + pos) -> norm1; FFN -> norm2."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4,
                 n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index,
                padding_mask=None, spatial_shapes_list=None):
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index,
                              padding_mask, spatial_shapes_list)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    """Deformable encoder: every token is a query whose reference is its own pixel centre."""

    def __init__(self, layer, num_layers):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    @staticmethod
    def get_reference_points(spatial_shapes_list, valid_ratios):
        """Pixel centres of every level, normalised by the valid size, then multiplied by every
        level's valid ratio: (B,L,2) -> (B,S,L,2) in (x, y)."""
        refs = []
        for lvl, (h, w) in enumerate(spatial_shapes_list):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=valid_ratios.dtype, device=valid_ratios.device),
                torch.linspace(0.5, w - 0.5, w, dtype=valid_ratios.dtype, device=valid_ratios.device),
                indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)  # (B,h*w)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            refs.append(torch.stack((ref_x, ref_y), -1))
        ref = torch.cat(refs, 1)  # (B,S,2)
        return ref[:, :, None] * valid_ratios[:, None]  # (B,S,L,2)

    def forward(self, src, pos, spatial_shapes, spatial_shapes_list, level_start_index,
                valid_ratios, padding_mask=None):
        ref = self.get_reference_points(spatial_shapes_list, valid_ratios)
        out = src
        for layer in self.layers:
            out = layer(out, pos, ref, spatial_shapes, level_start_index, padding_mask,
                        spatial_shapes_list)
        return out


# ------------------------------------------------------------------------------------------
# Decoder layers
# ------------------------------------------------------------------------------------------

class DecoderLayer(nn.Module):
    """DETR's post-norm decoder layer (standard, dense)."""

    def __init__(self, d_model=256, nhead=8, dim_feedforward=2048, dropout=0.1, activation="relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.activation = _activation(activation)

    def forward(self, tgt, memory, pos, query_pos, memory_key_padding_mask=None, need_weights=False):
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(_mha(self.self_attn, q, k, tgt)[0]))
        tgt2, w = _mha(self.multihead_attn, tgt + query_pos, memory + pos, memory,
                       memory_key_padding_mask, need_weights=need_weights)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2)), w


class ConditionalDecoderLayer(nn.Module):
    """Conditional DETR's decoder layer (Meng et al., arXiv:2108.06152, sec. 3.3), also DAB-DETR's.

    Self-attention: q = sa_qcontent(tgt) + sa_qpos(query_pos), k likewise, v = sa_v(tgt).
    Cross-attention per head: q = [ca_qcontent(tgt) (+ ca_qpos(query_pos) in layer 0) |
    ca_qpos_sine(query_sine_embed)], k = [ca_kcontent(memory) (+ ca_kpos(pos) in layer 0) |
    ca_kpos(pos)], v = ca_v(memory). ``ca_qpos_proj`` exists in the first layer only.
    """

    def __init__(self, d_model=256, nhead=8, dim_feedforward=2048, dropout=0.1, activation="relu",
                 is_first=False):
        super().__init__()
        for name in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj",
                     "sa_v_proj", "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj",
                     "ca_v_proj", "ca_qpos_sine_proj"):
            setattr(self, name, nn.Linear(d_model, d_model))
        self.ca_qpos_proj = nn.Linear(d_model, d_model) if is_first else None
        self.self_attn = ConditionalAttention(d_model, nhead, d_model, dropout)
        self.cross_attn = ConditionalAttention(2 * d_model, nhead, d_model, dropout)
        self.nhead, self.is_first = nhead, is_first
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(3))
        self.activation = _activation(activation)

    def forward(self, tgt, memory, pos, query_pos, query_sine_embed, memory_key_padding_mask=None,
                need_weights=False):
        """tgt, query_pos, query_sine_embed (B,Q,D); memory, pos (B,S,D)."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, self.sa_v_proj(tgt))[0]))

        B, Q, D = tgt.shape
        S, h = memory.shape[1], self.nhead
        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.is_first:  # layer 0 also adds the positional query / image pos to content
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q_sine = self.ca_qpos_sine_proj(query_sine_embed)
        q = torch.cat([q.view(B, Q, h, D // h), q_sine.view(B, Q, h, D // h)], 3).view(B, Q, 2 * D)
        k = torch.cat([k.view(B, S, h, D // h), k_pos.view(B, S, h, D // h)], 3).view(B, S, 2 * D)
        tgt2, w = self.cross_attn(q, k, self.ca_v_proj(memory), memory_key_padding_mask,
                                  need_weights=need_weights)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2)), w


class DeformableDecoderLayer(nn.Module):
    """Deformable DETR's / DINO's decoder layer: self-attention (optional boolean mask, True =
    blocked) -> norm2; MSDeformAttn cross-attention -> norm1; FFN -> norm3 (official names)."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4,
                 n_heads=8, n_points=4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4, self.norm3 = nn.Dropout(dropout), nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask=None, self_attn_mask=None, spatial_shapes_list=None):
        """tgt, query_pos (B,Q,D); reference_points (B,Q,L,2|4) already times valid ratios."""
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(_mha(self.self_attn, q, k, tgt,
                                                   attn_mask=self_attn_mask)[0]))
        tgt2, loc, attw = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                                          level_start_index, memory_padding_mask, spatial_shapes_list)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2)), loc, attw


# ------------------------------------------------------------------------------------------
# Decoder loops. Each returns a dict of per-layer stacks (L,B,Q,…):
#   hs_raw   layer outputs before the output norm    hs      what the heads see
#   refs_in  the reference the box head used         query_pos the positional query used
#   boxes    (cx,cy,w,h) in [0,1]                     attn    dict of stacked attention, or None
# ------------------------------------------------------------------------------------------

def _stack(out, attn):
    res = {}
    for k, v in out.items():
        if v and v[0] is not None:
            # refs_in of Deformable refine with 2-D initial points: layer 0 (B,Q,2), later (B,Q,4);
            # then it stays a list of per-layer tensors
            res[k] = torch.stack(v) if len({x.shape for x in v}) == 1 else v
    res["attn"] = {k: torch.stack(v) for k, v in attn.items()} if attn else None
    return res


class DETRDecoder(nn.Module):
    """DETR: fixed learned positional queries, no reference; every output goes through ``norm``."""

    def __init__(self, layer, num_layers, d_model):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, memory, pos, memory_padding_mask, bbox_embed,
                return_attention=False):
        out = {k: [] for k in ("hs_raw", "hs", "query_pos", "boxes")}
        attn = {"cross_attn_weights": []} if return_attention else None
        for lid, layer in enumerate(self.layers):
            tgt, w = layer(tgt, memory, pos, query_pos, memory_padding_mask, return_attention)
            hs = self.norm(tgt)
            out["hs_raw"].append(tgt), out["hs"].append(hs), out["query_pos"].append(query_pos)
            out["boxes"].append(box_from(bbox_embed[lid](hs), None))
            if attn is not None:
                attn["cross_attn_weights"].append(w)
        return _stack(out, attn)


class ConditionalDecoder(nn.Module):
    """Conditional DETR (``anchor_dim=2``) and DAB-DETR (``anchor_dim=4``) decoder loop.

    Conditional DETR (arXiv:2108.06152): the reference point s = sigmoid(ref_point_head(p_q)) is
    fixed for all layers (never refined); spatial query = sine(s) * query_scale(tgt) (the
    constant 1 in layer 0); boxes offset only cx, cy by logit(s).
    DAB-DETR (arXiv:2201.12329): the query is a 4-D anchor (cx,cy,w,h); per layer
    query_pos = ref_point_head(sine(anchor)) (512 -> D -> D), spatial query = the x/y half of
    sine(anchor) * query_scale(tgt) (1 in layer 0), with ``modulate_hw_attn`` the x part times
    w_ref/w and the y part times h_ref/h (eq. 6), w_ref, h_ref = sigmoid(ref_anchor_head(tgt)).
    After each layer the anchor becomes sigmoid(bbox_embed(raw output) + logit(anchor)) and is
    detached before the next layer. As in the official code (DAB_DETR/transformer.py, which keeps
    the *undetached* new anchors in ``ref_points``), layer i's box is predicted relative to the
    undetached anchor from layer i-1, so layer i's box loss reaches layer i-1's box delta.
    """

    def __init__(self, layer_kwargs, num_layers, d_model, anchor_dim=2, modulate_hw_attn=False,
                 inverse_sigmoid_eps=1e-5):
        super().__init__()
        self.eps = inverse_sigmoid_eps  # 1e-5 Conditional DETR, 1e-3 DAB-DETR
        self.layers = nn.ModuleList(ConditionalDecoderLayer(**layer_kwargs, is_first=(i == 0))
                                    for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.d_model, self.anchor_dim = d_model, anchor_dim
        self.query_scale = MLP(d_model, d_model, d_model, 2)
        if anchor_dim == 2:
            self.ref_point_head = MLP(d_model, d_model, 2, 2)
        else:
            self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.ref_anchor_head = MLP(d_model, d_model, 2, 2) if modulate_hw_attn else None

    def forward(self, tgt, query_pos, reference, memory, pos, memory_padding_mask, bbox_embed,
                return_attention=False):
        """tgt (B,Q,D); Conditional: query_pos (B,Q,D), reference None (then computed from
        query_pos) or (B,Q,2); DAB: query_pos None, reference (B,Q,4) anchors in [0,1]."""
        D = self.d_model
        out = {k: [] for k in ("hs_raw", "hs", "query_pos", "refs_in", "boxes")}
        attn = {"cross_attn_weights": []} if return_attention else None
        if self.anchor_dim == 2 and reference is None:
            reference = self.ref_point_head(query_pos).sigmoid()  # (B,Q,2), fixed for all layers
        ref_for_head = reference  # DAB: the undetached anchor, see the class docstring
        for lid, layer in enumerate(self.layers):
            if self.anchor_dim == 4:
                sine = sine_embed(reference, D // 2)  # (B,Q,2D): y, x, w, h
                query_pos = self.ref_point_head(sine)
                sine = sine[..., :D]  # y, x halves
            else:
                sine = sine_embed(reference, D // 2)  # (B,Q,D): y, x
            scale = 1.0 if lid == 0 else self.query_scale(tgt)  # the constant 1 in layer 0
            sine = sine * scale
            if self.ref_anchor_head is not None:
                ref_hw = self.ref_anchor_head(tgt).sigmoid()  # (B,Q,2) w_ref, h_ref
                sine = torch.cat([sine[..., :D // 2] * (ref_hw[..., 1] / reference[..., 3])[..., None],
                                  sine[..., D // 2:] * (ref_hw[..., 0] / reference[..., 2])[..., None]], -1)
            tgt, w = layer(tgt, memory, pos, query_pos, sine, memory_padding_mask, return_attention)
            hs = self.norm(tgt)
            out["hs_raw"].append(tgt), out["hs"].append(hs), out["query_pos"].append(query_pos)
            out["refs_in"].append(ref_for_head)
            out["boxes"].append(box_from(bbox_embed[lid](hs), ref_for_head, self.eps))
            if attn is not None:
                attn["cross_attn_weights"].append(w)
            if self.anchor_dim == 4:  # DAB iterative update from the un-normalised output
                ref_for_head = box_from(bbox_embed[lid](tgt), reference, self.eps)
                reference = ref_for_head.detach()
        return _stack(out, attn)


class DeformableDecoder(nn.Module):
    """Deformable DETR and DINO decoder loop.

    Deformable DETR (arXiv:2010.04159): query_pos is given; no output norm; with ``refine``
    (per-layer heads) the reference becomes box_i.detach() after layer i (a 2-D reference
    becomes a 4-D box after layer 0, so later layers sample box-relative), and layer i's box is
    relative to the detached reference it received.
    DINO (Zhang et al., arXiv:2203.03605): query_pos = ref_point_head(sine(ref * valid_ratio
    of level 0)) each layer (512 -> D -> D); every output goes through ``norm`` before the heads;
    look forward twice (sec. 3.5): the next reference is sigmoid(bbox_embed(raw output) +
    logit(ref)) detached for the next layer, but layer i+1's box is predicted relative to the
    *undetached* one, so layer i+1's box loss also trains layer i's box delta.
    """

    def __init__(self, layer, num_layers, d_model, dino=False, inverse_sigmoid_eps=1e-5):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.dino = dino
        self.eps = inverse_sigmoid_eps  # 1e-5 Deformable DETR, 1e-3 DINO
        self.norm = nn.LayerNorm(d_model) if dino else None
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2) if dino else None
        self.d_model = d_model

    def forward(self, tgt, query_pos, reference, memory, memory_padding_mask, spatial_shapes,
                spatial_shapes_list, level_start_index, valid_ratios, bbox_embed, refine,
                self_attn_mask=None, return_attention=False):
        """tgt (B,Q,D); query_pos (B,Q,D) or None (DINO); reference (B,Q,2|4) in [0,1];
        memory (B,S,D); valid_ratios (B,L,2); bbox_embed list of L heads; refine bool."""
        out = {k: [] for k in ("hs_raw", "hs", "query_pos", "refs_in", "boxes")}
        attn = {"sampling_locations": [], "attention_weights": []} if return_attention else None
        ref_for_head = reference
        for lid, layer in enumerate(self.layers):
            if reference.shape[-1] == 4:  # rescale to the padded map of each level
                ref_input = reference[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                ref_input = reference[:, :, None] * valid_ratios[:, None]  # (B,Q,L,2)
            if self.dino:
                query_pos = self.ref_point_head(sine_embed(ref_input[:, :, 0], self.d_model // 2))
            tgt, loc, attw = layer(tgt, query_pos, ref_input, memory, spatial_shapes,
                                   level_start_index, memory_padding_mask, self_attn_mask,
                                   spatial_shapes_list)
            hs = self.norm(tgt) if self.norm is not None else tgt
            box = box_from(bbox_embed[lid](hs), ref_for_head, self.eps)
            out["hs_raw"].append(tgt), out["hs"].append(hs), out["query_pos"].append(query_pos)
            out["refs_in"].append(ref_for_head), out["boxes"].append(box)
            if attn is not None:
                attn["sampling_locations"].append(loc), attn["attention_weights"].append(attw)
            if self.dino:  # look forward twice
                ref_for_head = box_from(bbox_embed[lid](tgt), reference, self.eps)
                reference = ref_for_head.detach()
            elif refine:  # Deformable: detached, and the head predicts from the detached input
                reference = ref_for_head = box.detach()
        return _stack(out, attn)


def encoder_proposals(memory, padding_mask, spatial_shapes_list):
    """Two-stage proposals (Deformable DETR sec. 4.1 / ``gen_encoder_output_proposals``).

    Every token proposes a box at its cell centre (normalised by the valid size) with
    w = h = 0.05 * 2^level. Proposals within 0.01 of the border or under padding are invalid:
    their logit-space boxes become +inf and their memory 0.
    memory (B,S,D), padding_mask (B,S) -> memory (B,S,D) masked, anchors (B,S,4) logit space.
    """
    B = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes_list):
        m = padding_mask[:, start:start + h * w].view(B, h, w)
        valid_h, valid_w = (~m[:, :, 0]).sum(1), (~m[:, 0, :]).sum(1)  # (B,)
        gy, gx = torch.meshgrid(torch.arange(h, dtype=memory.dtype, device=memory.device),
                                torch.arange(w, dtype=memory.dtype, device=memory.device), indexing="ij")
        grid = torch.stack([gx, gy], -1)  # (h,w,2) x, y
        scale = torch.stack([valid_w, valid_h], -1).to(memory.dtype).view(B, 1, 1, 2)
        grid = (grid[None] + 0.5) / scale  # (B,h,w,2)
        wh = torch.full_like(grid, 0.05 * (2.0 ** lvl))
        proposals.append(torch.cat([grid, wh], -1).view(B, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)  # (B,S,4)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)  # (B,S,1)
    anchors = torch.log(proposals / (1 - proposals))
    invalid = padding_mask[..., None] | ~valid
    anchors = anchors.masked_fill(invalid, float("inf"))
    return memory.masked_fill(invalid, 0.0), anchors


# ------------------------------------------------------------------------------------------
# DINO contrastive denoising (Zhang et al., arXiv:2203.03605, sec. 3.3; official dn_components.py)
# ------------------------------------------------------------------------------------------

def prepare_cdn(targets, dn_number, label_noise_ratio, box_noise_scale, num_classes, num_queries,
                label_enc: nn.Embedding, inverse_sigmoid_eps=1e-3):
    """Contrastive denoising queries for a batch (training only).

    Each of ``G = dn_number // max_gt`` groups (at least 1; ``dn_number`` counts positive and
    negative queries per GT, official ``dn_number * 2 // (2 * max_gt)``) holds ``max_gt``
    positive then ``max_gt`` negative slots per image; image b fills its first n_b slots of each.
    Labels are flipped to a random class with probability label_noise_ratio / 2; box corners
    move by up to box_noise_scale * half the size (positives) or between 1x and 2x that
    (negatives). Returns content (B,N,D) = label_enc(label), reference (B,N,4) in [0,1],
    attn_mask (N+Q, N+Q) bool (True = blocked: matching queries cannot see DN queries, DN groups
    cannot see each other) and meta {"num_dn_queries", "num_groups", "pad_size", "positive"}.
    The noised boxes become anchors through inverse_sigmoid with DINO's eps 1e-3, so a corner
    clamped to 0 or 1 gives the anchor sigmoid(log(1 / 1e-3)) = 0.999, as official.
    """
    device = label_enc.weight.device
    B = len(targets)
    counts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(counts) if counts else 0
    groups = 1 if max_gt == 0 else max(dn_number * 2 // (2 * max_gt), 1)
    single_pad = max_gt  # slots per half-group
    N = 2 * single_pad * groups
    D = label_enc.weight.shape[1]
    labels = torch.cat([t["labels"] for t in targets]).to(device)  # (T,)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device).float()  # (T,4) cxcywh
    T = labels.numel()
    # 2G copies of every GT: [g0 pos, g0 neg, g1 pos, ...], each copy in batch order
    known_labels = labels.repeat(2 * groups)
    known_boxes = boxes.repeat(2 * groups, 1)
    if label_noise_ratio > 0:
        flip = torch.rand(known_labels.shape, device=device) < label_noise_ratio * 0.5
        known_labels = torch.where(flip, torch.randint_like(known_labels, 0, num_classes), known_labels)
    if box_noise_scale > 0 and T > 0:
        xyxy = torch.cat([known_boxes[:, :2] - known_boxes[:, 2:] / 2,
                          known_boxes[:, :2] + known_boxes[:, 2:] / 2], -1)
        half_wh = known_boxes[:, 2:].repeat(1, 2) / 2  # each corner moves by <= scale * half size
        sign = torch.randint(0, 2, known_boxes.shape, device=device).float() * 2 - 1
        part = torch.rand(known_boxes.shape, device=device)
        negative = (torch.arange(2 * groups, device=device) % 2 == 1).repeat_interleave(T)
        part = (part + negative[:, None].float()) * sign  # negatives: 1..2 x the noise
        xyxy = (xyxy + part * half_wh * box_noise_scale).clamp(0.0, 1.0)
        known_boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
    content = torch.zeros(B, N, D, device=device, dtype=label_enc.weight.dtype)
    ref_logit = torch.zeros(B, N, 4, device=device)  # empty slots: logit 0, i.e. box 0.5
    if T > 0:
        batch_idx = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(counts)])
        slot = torch.cat([torch.arange(n) for n in counts])
        slot = torch.cat([slot + single_pad * i for i in range(2 * groups)]).to(device)
        batch_idx = batch_idx.repeat(2 * groups).to(device)
        content = content.index_put((batch_idx, slot), label_enc(known_labels))
        ref_logit = ref_logit.index_put((batch_idx, slot),
                                        inverse_sigmoid(known_boxes, inverse_sigmoid_eps))
    reference = ref_logit.sigmoid()  # the decoder works in [0,1]; logit 0 -> 0.5 as official

    size = N + num_queries
    attn_mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    attn_mask[N:, :N] = True  # matching queries cannot see the denoising part
    for g in range(groups):  # each group sees only itself (and the matching queries)
        s, e = 2 * single_pad * g, 2 * single_pad * (g + 1)
        attn_mask[s:e, :s] = True
        attn_mask[s:e, e:N] = True
    positive = []
    for n in counts:
        t = torch.arange(n, device=device)
        q = (torch.arange(groups, device=device)[:, None] * 2 * single_pad + t[None]).flatten()
        positive.append((q, t.repeat(groups)))
    meta = {"num_dn_queries": N, "num_groups": groups, "pad_size": single_pad, "positive": positive}
    return content, reference, attn_mask, meta
