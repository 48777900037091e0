"""DETRDistill: A Universal Knowledge Distillation Framework for DETR-families.

Jiahao Chang, Shuo Wang, Hai-Ming Xu, Zehui Chen, Chenhongyi Yang, Feng Zhao. ICCV 2023,
arXiv:2211.10156. Official code: github.com/BIVLab-USTC/DETRDistill (MMDetection 2.x, Deformable
DETR only; read at commit b5ee33d7).

    python methods/detrdistill.py                         # embedded data, cached cpu-teacher
    python methods/detrdistill.py --data coco --coco-path /data/coco --teacher teacher.pth \
        --variant deformable_detr --output-dir out/detrdistill
    python methods/detrdistill.py --eval --resume out/detrdistill/checkpoint.pth --visualize figs

A frozen teacher supervises a student of the same DETR family at every decoder layer with
    HMLD  Hungarian-matching logits distillation: all N teacher predictions are matched to the
          student's by a soft-BCE + L1 + GIoU cost; soft-label BCE + L1 + GIoU losses (C1);
    TAFD  target-aware feature distillation: MSE between teacher and student features, weighted
          by a mask of cosine similarities between quality-scored teacher queries and the
          teacher's features (C2);
    QPAD  query-prior assignment distillation: the teacher's queries run through the student's
          decoder as a separate group, supervised with the teacher's own GT assignment (C3);
    NCE   the query contrastive (InfoNCE) term of the released code only (C4), weight 0.2.

Where we follow the official code rather than the paper:
    A1  TAFD imitates the features entering the encoder (our input projections), not the
        encoder output of the paper's figure (``--feature-source encoder_memory`` for that).
    A2  the TAFD mask is built from the teacher's decoder *output* states of the same layer.
    A3  quality = score x max IoU with GT (plain IoU; = score for an image without GT).
    A4  mask = max(sum_n s_n cos(q_n, F), 0.01) / its per-image maximum.
    A5  HMLD is one matching over all N teacher predictions (no positive/negative split).
    (A3, A4 and A5 each have the paper's form one flag away, listed below.)
    A9  normalisers: HMLD class / (B N), boxes / (pairs averaged over processes); TAFD is a mean.
    A10 the InfoNCE head is on (``--no-query-contrastive`` is the paper-only variant). As in
        the released code its BatchNorm statistics and its in-batch negatives are per process,
        so with it N processes x batch b do not train exactly like one process x batch N*b
        (every other term does; tests/test_method_ddp.py).
The paper's forms, each one flag away from the released-code default [paper]:
    --quality-form paper  TAFD quality q = c^gamma IoU^(1 - gamma) (code: c IoU); gamma = 0.5
                          is reconstructed: the paper does not state it (--quality-gamma);
    --tafd-form paper     Eq. 9: one mask per selected query, psi_i = F^T Q_i (plain product,
                          no cosine, floor or max-normalisation), the masked MSE of each query
                          weighted by q_i and divided by M d H W (and by the batch size,
                          reconstructed), with an adapter phi (1x1 conv) on the student feature
                          even for equal widths;
    --hmld-form paper     Eq. 3-4: two matchings, the student queries against the teacher's
                          positive predictions, then the students left over against its negative
                          ones; which predictions are positive (here the teacher's own Hungarian
                          assignment to the GT, as QPAD uses), the order of the two matchings and
                          the per-part normalisers are reconstructed: the paper does not state
                          them.
    The paper's overall loss L_det + lambda1 L_logits + lambda2 L_feat + lambda3 L_assign has no
    InfoNCE term (--no-query-contrastive); lambda1..3 are w_hmld, w_tafd, w_qpad = 1,
    reconstructed: the paper does not state them.
Reconstructed [recon], because the paper and code leave it open:
    - per-term multipliers w_hmld, w_tafd, w_nce, w_qpad (all 1.0);
    - A6 N_S != N_T: unmatched student queries get a zero class target and no box loss (the
      class term then divides by B N_S); unmatched teacher predictions are dropped;
    - A7 L_S != L_T: student layer i -> teacher layer ceil(i L_T / L_S) (or ``--layer-map last``);
      TAFD and QPAD use the teacher layer mapped to each student layer, so every KD term has one
      entry per student decoder layer;
    - A8 QPAD queries per family: Deformable single-stage the teacher's learned query embedding
      (reference points from the student's own ``reference_points`` layer, as the official
      code); Deformable two-stage and DINO the teacher's per-image initial queries and reference
      boxes; Conditional DETR the teacher's learned positional queries (content starts at 0);
      DAB-DETR the teacher's anchor boxes. When d_T != d_S a trainable linear projection maps
      the teacher's query vectors to the student's width;
    - d_T != d_S in TAFD: a 1x1 conv adapter per level on the student side;
    - QPAD runs the student's encoder a second time for the teacher-query group, on the same
      input projections, with fresh dropout, as the official ``forward_train_teacher_group``
      recomputes the transformer on the neck features; ``--qpad-reuse-encoder`` reuses the main
      pass's encoder output instead (cheaper). The two agree only with dropout 0 (the CPU
      presets); the COCO configs use dropout 0.1 (Deformable DETR, Conditional DETR), where
      they differ;
    - QPAD and detection use the student's own loss weights (Deformable DETR: 2 / 5 / 2);
    - DINO's denoising queries take part in none of the KD terms (only in the student's loss).
Not ported: the FGD modules of the released config (built but never called).

Pairs: teacher and student of one family (backbone, width, depth, query count may differ):
deformable_detr (the official setting; with box refinement and two-stage), conditional_detr,
dab_detr, dino. Plain DETR is refused (softmax classes: HMLD distils sigmoid probabilities).
"""
import os
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import ImageDraw
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import distill, engine, figures, ops  # noqa: E402
from common.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh  # noqa: E402
from common.criterion import build_criterion  # noqa: E402
from common.data import collate  # noqa: E402
from common.distributed import is_main_process, mean_over_processes  # noqa: E402
from common.detr import Queries  # noqa: E402

SUPPORTED = ("deformable_detr", "conditional_detr", "dab_detr", "dino")


@dataclass(frozen=True)
class DETRDistillConfig:
    # which mechanisms run
    use_hmld: bool = True               # C1 [code]
    use_tafd: bool = True               # C2 [code]
    use_qpad: bool = True               # C3 [code] (use_teacher_group=True)
    use_query_contrastive: bool = True  # C4 [code]; False = paper-faithful variant (A10)
    qpad_reuse_encoder: bool = False    # C3: False = a second student encoder pass [code]
    # per-term multipliers [recon]: the code adds every term with weight 1
    w_hmld: float = 1.0
    w_tafd: float = 1.0
    w_nce: float = 1.0
    w_qpad: float = 1.0
    # HMLD (C1): DistillHungarianAssigner costs and loss_*_distill weights [code]
    hmld_cost_class: float = 1.0        # soft-BCE summed over classes, not focal-weighted
    hmld_cost_bbox: float = 5.0
    hmld_cost_giou: float = 2.0
    hmld_loss_class: float = 1.0
    hmld_loss_bbox: float = 5.0
    hmld_loss_giou: float = 2.0
    clamp_teacher_boxes: bool = True    # pseudo boxes clipped to the image [code]
    # TAFD (C2)
    feature_source: str = "neck"        # "neck" [code] or "encoder_memory" (paper figure, A1)
    tafd_topk: int = 100                # test_cfg.max_per_img [code]
    tafd_mask_floor: float = 0.01       # clamp(min=1e-2) [code]
    # C4: MoCoCLHead(mid_channels=512, T=0.07), loss weight 0.2 [code]
    nce_dim: int = 512
    nce_temperature: float = 0.07
    nce_weight: float = 0.2
    # A7: teacher layer for each student layer when the counts differ [recon]
    layer_map: str = "ceil"             # "ceil": i -> ceil(i L_T / L_S); "last": last L_S layers
    # the paper's forms where they differ from the released code, each one flag away [paper]
    hmld_form: str = "code"             # "paper": two matchings, positives and negatives (Eq. 3-4)
    quality_form: str = "code"          # "paper": q = c^gamma IoU^(1 - gamma)
    quality_gamma: float = 0.5          # reconstructed: the paper does not state it
    tafd_form: str = "code"             # "paper": psi_i = F^T Q_i, per-query MSE (Eq. 9)

    def __post_init__(self):
        forms = ("code", "paper")
        for name in ("hmld_form", "quality_form", "tafd_form"):
            if getattr(self, name) not in forms:
                raise ValueError(f"{name} must be one of {forms}, got {getattr(self, name)!r}")
        if not 0.0 <= self.quality_gamma <= 1.0:
            raise ValueError(f"quality_gamma must lie in [0, 1], got {self.quality_gamma}")



# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------



def rerun_encoder(model, enc):
    """The encoder of ``model`` run once more on the same input projections, masks and
    positions (fresh dropout): the official QPAD group recomputes the transformer on the neck
    features [code]. Returns ``enc`` with the new memory (B,S,D); proposals are dropped (decoding
    given queries does not read them)."""
    src = torch.cat([f.flatten(2).transpose(1, 2) for f in enc.features], 1)      # (B,S,D)
    t = model.transformer
    if model.variant in ("deformable_detr", "dino"):
        memory = t.encoder(src, enc.pos_flatten, enc.spatial_shapes, enc.spatial_shapes_list,
                           enc.level_start_index, enc.valid_ratios, enc.mask_flatten)
    else:
        memory = t.encoder(src, enc.pos_flatten, enc.mask_flatten)
    return replace(enc, memory=memory, proposals=None)




# ------------------------------------------------------------------------------------------
# C1: Hungarian-matching logits distillation (HMLD)
# ------------------------------------------------------------------------------------------

def teacher_pseudo_boxes(boxes: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Teacher boxes (..., 4) cxcywh -> the pseudo targets: clipped to the image [code]."""
    if not clamp:
        return boxes
    return xyxy_to_cxcywh(cxcywh_to_xyxy(boxes).clamp(0.0, 1.0))


@torch.no_grad()
def hmld_cost(s_logits, s_boxes, t_probs, t_boxes, w_class=1.0, w_bbox=5.0, w_giou=2.0):
    """Student-vs-teacher matching cost:

        C_ij = w_class sum_c BCE(z_ic, p_jc) + w_bbox |b_i - b_j|_1 - w_giou GIoU(b_i, b_j)

    s_logits (B,N_S,C), s_boxes (B,N_S,4), t_probs (B,N_T,C) in [0,1], t_boxes (B,N_T,4), boxes
    normalised cxcywh. Returns (B,N_S,N_T). BCE(x,t) = softplus(x) - t x, so the class term is a
    row sum minus one batched matrix product instead of a (N_S,N_T,C) tensor.
    """
    cost_class = F.softplus(s_logits).sum(-1, keepdim=True) - s_logits @ t_probs.transpose(1, 2)
    cost_bbox = torch.cdist(s_boxes, t_boxes, p=1)                                # (B,N_S,N_T)
    giou = ops.pairwise_giou(cxcywh_to_xyxy(s_boxes), cxcywh_to_xyxy(t_boxes))     # scale-free
    return w_class * cost_class + w_bbox * cost_bbox - w_giou * giou


def hmld_loss(s_logits, s_boxes, t_probs, t_boxes, indices):
    """HMLD loss for one layer: (class, L1, GIoU) terms, unweighted.

        L_cls  = (1/P)  sum_i sum_c BCE(z_ic, p_{sigma(i),c})    P  = B N_S local (A6, A9)
        L_L1   = (1/P') sum_pairs |b_i - b_sigma(i)|_1             P' = pairs averaged over
        L_GIoU = (1/P') sum_pairs (1 - GIoU(b_i, b_sigma(i)))          processes, >= 1

    indices: per image (student_idx, teacher_idx) from the matching. Student queries without a
    teacher (N_S > N_T) get an all-zero class target and no box loss (A6).
    """
    B, N_S, C = s_logits.shape
    dev = s_logits.device
    b_idx = torch.cat([torch.full_like(i, b) for b, (i, _) in enumerate(indices)]).to(dev)
    s_idx = torch.cat([i for i, _ in indices]).to(dev)                    # (P',) student rows
    t_idx = torch.cat([j for _, j in indices]).to(dev)                    # (P',) teacher rows
    soft = torch.zeros_like(s_logits)                                     # (B,N_S,C)
    soft[b_idx, s_idx] = t_probs[b_idx, t_idx].to(soft.dtype)
    loss_cls = F.binary_cross_entropy_with_logits(s_logits, soft, reduction="sum") / max(B * N_S, 1)
    num_pairs = mean_over_processes(torch.tensor(float(s_idx.numel()), device=dev)).clamp(min=1)
    src, tgt = s_boxes[b_idx, s_idx], t_boxes[b_idx, t_idx]              # (P',4) each
    loss_bbox = F.l1_loss(src, tgt, reduction="sum") / num_pairs
    loss_giou = generalized_box_iou_loss(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt), reduction="sum",
                                         eps=torch.finfo(torch.float32).tiny) / num_pairs
    return loss_cls, loss_bbox, loss_giou


@torch.no_grad()
def hmld_match_paper(s_logits, s_boxes, t_probs, t_boxes, t_positive, costs=(1.0, 5.0, 2.0)):
    """The paper's HMLD matching (Eq. 3-4) for one layer: two Hungarian matchings per image,
    the student queries against the teacher's positive predictions, then the student queries
    left over against the teacher's negative predictions.

    t_positive: per image the teacher query indices that count as positive; here the teacher's
    own Hungarian assignment to the GT at that layer (reconstructed: the paper does not state
    how it picks them). Cost as ``hmld_cost``. Returns per image (pos, neg), each a pair
    (student_idx, teacher_idx) of int64 tensors."""
    cost = hmld_cost(s_logits, s_boxes, t_probs, t_boxes, *costs)       # (B,N_S,N_T)
    B, N_S, N_T = cost.shape
    dev = cost.device
    out = []
    for b in range(B):
        pos_t = torch.as_tensor(t_positive[b], dtype=torch.int64, device=dev)
        is_pos = torch.zeros(N_T, dtype=torch.bool, device=dev)
        is_pos[pos_t] = True
        neg_t = (~is_pos).nonzero().flatten()
        r, c = ops.linear_sum_assignment(cost[b][:, pos_t]) if len(pos_t) else (pos_t, pos_t)
        pos = (r, pos_t[c])
        free = torch.ones(N_S, dtype=torch.bool, device=dev)
        free[r] = False
        free_s = free.nonzero().flatten()
        if len(free_s) and len(neg_t):
            r2, c2 = ops.linear_sum_assignment(cost[b][free_s][:, neg_t])
            neg = (free_s[r2], neg_t[c2])
        else:
            neg = (free_s[:0], neg_t[:0])
        out.append((pos, neg))
    return out


def hmld_loss_paper(s_logits, s_boxes, t_probs, t_boxes, matched):
    """The paper's HMLD loss (Eq. 3-4) for one layer: L_pos + L_neg, each part the soft-BCE,
    L1 and GIoU of its pairs divided by its own pair count (averaged over processes, >= 1);
    student queries in neither matching get no loss. The per-part normalisers and the unit
    weights of L_pos and L_neg are reconstructed: the paper does not state them.
    matched: ``hmld_match_paper``'s output. Returns (class, L1, GIoU), unweighted."""
    dev = s_logits.device
    total = [s_logits.sum() * 0.0] * 3
    for part in (0, 1):
        b_idx = torch.cat([torch.full_like(m[part][0], b) for b, m in enumerate(matched)])
        s_idx = torch.cat([m[part][0] for m in matched])
        t_idx = torch.cat([m[part][1] for m in matched])
        n = mean_over_processes(torch.tensor(float(s_idx.numel()), device=dev)).clamp(min=1)
        z, p = s_logits[b_idx, s_idx], t_probs[b_idx, t_idx].to(s_logits.dtype)   # (P,C)
        src, tgt = s_boxes[b_idx, s_idx], t_boxes[b_idx, t_idx]                    # (P,4)
        terms = (F.binary_cross_entropy_with_logits(z, p, reduction="sum"),
                 F.l1_loss(src, tgt, reduction="sum"),
                 generalized_box_iou_loss(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt),
                                          reduction="sum", eps=torch.finfo(torch.float32).tiny))
        total = [a + t / n for a, t in zip(total, terms)]
    return tuple(total)


# ------------------------------------------------------------------------------------------
# C2: Target-aware feature distillation (TAFD)
# ------------------------------------------------------------------------------------------

@torch.no_grad()
def tafd_select(t_probs, t_boxes, t_hs, targets, k=100, form="code", gamma=0.5):
    """Quality-scored teacher queries.

    Top-k (query, class) pairs of the flattened (N x C) teacher scores: query = idx // C,
    class = idx % C (a query can appear twice). Quality, with c the pair's score and IoU =
    max_j IoU(b_q, g_j) (plain IoU, A3):
        form "code"   s = c * IoU                       [code]
        form "paper"  q = c^gamma * IoU^(1 - gamma)     [paper]; gamma reconstructed
    and s = c for an image without GT. t_probs (B,N,C), t_boxes (B,N,4), t_hs (B,N,D).
    Returns hs (B,K,D), quality (B,K), query_idx (B,K), class_idx (B,K).
    """
    B, N, C = t_probs.shape
    scores, flat = t_probs.flatten(1).topk(min(k, N * C), dim=1)         # (B,K)
    query_idx, class_idx = flat // C, flat % C
    quality = scores.clone()
    for b, t in enumerate(targets):
        if t["boxes"].shape[0] > 0:
            boxes = cxcywh_to_xyxy(t_boxes[b, query_idx[b]])              # (K,4)
            iou = box_iou(boxes, cxcywh_to_xyxy(t["boxes"]).to(boxes)).max(1)[0]
            if form == "paper":
                quality[b] = scores[b].pow(gamma) * iou.pow(1.0 - gamma)
            else:
                quality[b] = scores[b] * iou
    hs = torch.gather(t_hs, 1, query_idx[..., None].expand(-1, -1, t_hs.shape[-1]))  # (B,K,D)
    return hs, quality, query_idx, class_idx


@torch.no_grad()
def tafd_mask(hs, quality, t_feat, floor=0.01):
    """M(h,w) = max(sum_n s_n cos(q_n, F^T(h,w)), floor) / max_hw(...) per image.

    hs (B,K,D) selected teacher queries, quality (B,K), t_feat (B,D,H,W). Returns (B,1,H,W), no
    gradient (teacher tensors only), values in (0, 1], maximum exactly 1 per image.
    """
    q = F.normalize(hs, dim=-1)                                           # (B,K,D)
    f = F.normalize(t_feat, dim=1)                                        # (B,D,H,W)
    sim = torch.einsum("bkd,bdhw->bkhw", q, f)                            # (B,K,H,W) cosine
    mask = torch.einsum("bkhw,bk->bhw", sim, quality).clamp(min=floor)    # (B,H,W)
    mask = mask / mask.flatten(1).max(1)[0][:, None, None]
    return mask[:, None]                                                  # (B,1,H,W)


def tafd_loss(mask, t_feat, s_feat):
    """nn.MSELoss()(M F^T, M F^S): mean over (b, c, h, w), raw features, padding included."""
    return F.mse_loss(mask * s_feat, mask * t_feat)


def tafd_loss_paper(hs, quality, t_feat, s_feat):
    """The paper's TAFD (Eq. 9) on one level: one mask per selected query, psi_i = F^T Q_i (the
    plain product of the teacher features with the query, no normalisation, no floor), and

        L = 1 / (B M d H W) sum_b sum_i q_i sum_{c,h,w} (psi_i(h,w) (F^T - phi(F^S))_c(h,w))^2

    computed as sum_hw [sum_i q_i psi_i^2] ||F^T - phi(F^S)||^2_c, without the (B,M,d,H,W)
    tensor. The mean over the batch B is reconstructed (the paper writes one image).
    hs (B,M,d) selected teacher queries, quality (B,M), t_feat, s_feat (B,d,H,W) (the student
    through the adapter phi). The masks carry no gradient (teacher tensors only)."""
    B, M = quality.shape
    _, d, H, W = t_feat.shape
    with torch.no_grad():
        psi = torch.einsum("bmd,bdhw->bmhw", hs, t_feat)                 # (B,M,H,W) psi_i
        weight = torch.einsum("bm,bmhw->bhw", quality, psi.pow(2))       # (B,H,W)
    err = (t_feat.detach() - s_feat).pow(2).sum(1)                       # (B,H,W)
    return (weight * err).sum() / max(B * M * d * H * W, 1)


def level_maps(enc, source):
    """Per-level feature maps (B,D,H,W): the input projections ("neck", A1 code reading) or the
    encoder memory (B,S,D) cut back into its levels ("encoder_memory", the paper's figure)."""
    return list(enc.features) if source == "neck" else enc.memory_levels()


# ------------------------------------------------------------------------------------------
# C4: query contrastive term (released code only)
# ------------------------------------------------------------------------------------------

class ProjectionHead(nn.Module):
    """MoCoCLHead's branch: Linear(d, m) -> Linear(m, m) -> BN1d -> ReLU -> Linear(m, m), L2."""

    def __init__(self, in_dim, dim=512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, dim), nn.Linear(dim, dim), nn.BatchNorm1d(dim),
                                 nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, x):                                                 # (n,d) -> (n,m)
        return F.normalize(self.net(x), dim=-1)


def info_nce(u, v, temperature=0.07):
    """InfoNCE of paired unit vectors: logits = v u^T / T (rows: teacher, as the code's
    einsum('nc,ck->nk', teacher, student^T)), target the diagonal, cross-entropy (mean)."""
    logits = v @ u.t() / temperature                                      # (n,n)
    return F.cross_entropy(logits, torch.arange(u.shape[0], device=u.device))


# ------------------------------------------------------------------------------------------
# The distiller
# ------------------------------------------------------------------------------------------

class DETRDistill(nn.Module):
    """Teacher (frozen) + student + student-side modules; ``forward`` returns named losses.

    Keys (last decoder layer unsuffixed, earlier student layers ``_{i}``, as DETR's aux losses):
    the student's own SetCriterion losses, ``loss_hmld_{cls,bbox,giou}``, ``loss_tafd``,
    ``loss_nce``, ``loss_qpad_{ce,bbox,giou}``; all unweighted, weights in ``weight_dict``.
    """

    def __init__(self, cfg: DETRDistillConfig, teacher, student, num_classes):
        super().__init__()
        distill.check_pair(
            "DETRDistill", teacher, student, supported=SUPPORTED,
            supported_reason="HMLD distils sigmoid class probabilities",
            same_variant="QPAD feeds the teacher's queries to the student decoder",
            same_class_loss="HMLD and TAFD read both models' logits as sigmoid probabilities",
            same_levels=cfg.use_tafd and "TAFD distils features level by level; or turn it "
                                         "off: --no-tafd")
        if student.num_classes != num_classes:
            raise ValueError(f"the student has {student.num_classes} classes, the data set "
                             f"{num_classes}")
        if cfg.feature_source not in ("neck", "encoder_memory"):
            raise ValueError(f"feature_source must be 'neck' or 'encoder_memory', got "
                             f"{cfg.feature_source!r}")
        if cfg.use_tafd and cfg.tafd_topk < 1:
            raise ValueError(f"tafd_topk must be >= 1, got {cfg.tafd_topk}")
        n_lv_s = getattr(student.cfg, "num_feature_levels", 1)
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.layer_map = distill.teacher_layer_map(student.cfg.dec_layers, teacher.cfg.dec_layers,
                                       cfg.layer_map)
        self.criterion = build_criterion(student, num_classes)
        self.teacher_matcher = build_criterion(teacher, num_classes).matcher  # QPAD's assignment
        d_t, d_s = teacher.hidden_dim, student.hidden_dim
        # TAFD: student features -> teacher width when they differ [recon]; the paper's form
        # always has the adapter phi (Eq. 9)
        if cfg.use_tafd and (d_t != d_s or cfg.tafd_form == "paper"):
            self.feat_adapters = nn.ModuleList(nn.Conv2d(d_s, d_t, 1) for _ in range(n_lv_s))
        # QPAD: teacher query vectors -> student width when they differ (A8) [recon]
        if cfg.use_qpad and d_t != d_s:
            self.query_proj = nn.ModuleDict({"content": nn.Linear(d_t, d_s),
                                             "pos": nn.Linear(d_t, d_s)})
        if cfg.use_query_contrastive:
            self.proj_student = ProjectionHead(d_s, cfg.nce_dim)
            self.proj_teacher = ProjectionHead(d_t, cfg.nce_dim)
        self.weight_dict = dict(self.criterion.weight_dict)
        base = self.criterion.weight_dict
        L = student.cfg.dec_layers
        for i in range(L):
            sfx = "" if i == L - 1 else f"_{i}"
            if cfg.use_hmld:
                self.weight_dict.update({f"loss_hmld_cls{sfx}": cfg.hmld_loss_class * cfg.w_hmld,
                                         f"loss_hmld_bbox{sfx}": cfg.hmld_loss_bbox * cfg.w_hmld,
                                         f"loss_hmld_giou{sfx}": cfg.hmld_loss_giou * cfg.w_hmld})
            if cfg.use_tafd:
                self.weight_dict[f"loss_tafd{sfx}"] = cfg.w_tafd
            if cfg.use_query_contrastive:
                self.weight_dict[f"loss_nce{sfx}"] = cfg.nce_weight * cfg.w_nce
            if cfg.use_qpad:
                self.weight_dict.update({f"loss_qpad_{k}{sfx}": base[f"loss_{k}"] * cfg.w_qpad
                                         for k in ("ce", "bbox", "giou")})

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()  # always: no dropout, no denoising groups in the teacher
        return self

    # --- pieces of forward, also used by the tests and --visualize ---------------------------
    @torch.no_grad()
    def run_teacher(self, images, masks):
        t_enc = self.teacher.encode(images, masks)
        return t_enc, self.teacher.decode(t_enc)

    @torch.no_grad()
    def hmld_match(self, s_dec, t_dec):
        """Per student layer, the HMLD assignment (student_idx, teacher_idx) per image: one
        batched linear_sum_assignment over all layers and images."""
        c = self.cfg
        costs = [hmld_cost(s_dec.logits[i].float(), s_dec.boxes[i].float(),
                           t_dec.logits[l].float().sigmoid(),
                           teacher_pseudo_boxes(t_dec.boxes[l].float(), c.clamp_teacher_boxes),
                           c.hmld_cost_class, c.hmld_cost_bbox, c.hmld_cost_giou)
                 for i, l in enumerate(self.layer_map)]
        B = s_dec.logits.shape[1]
        pairs = ops.linear_sum_assignment(torch.cat(costs))                  # L_S*B results
        return [pairs[i * B:(i + 1) * B] for i in range(len(self.layer_map))]

    @torch.no_grad()
    def hmld_match_paper(self, s_dec, t_dec, assign):
        """Per student layer, ``hmld_match_paper``'s two matchings per image; the positives of
        teacher layer layer_map[i] are its GT assignment ``assign[i]``."""
        c = self.cfg
        return [hmld_match_paper(s_dec.logits[i].float(), s_dec.boxes[i].float(),
                                 t_dec.logits[l].float().sigmoid(),
                                 teacher_pseudo_boxes(t_dec.boxes[l].float(), c.clamp_teacher_boxes),
                                 [t for t, _ in assign[i]],
                                 (c.hmld_cost_class, c.hmld_cost_bbox, c.hmld_cost_giou))
                for i, l in enumerate(self.layer_map)]

    def qpad_queries(self, t_dec):
        """The teacher's queries in the student's format."""
        q, v = t_dec.queries, self.student.variant
        proj = getattr(self, "query_proj", None)
        content, pos, ref = q.content, q.pos, q.reference
        if v in ("conditional_detr", "dab_detr"):  # content starts at zero in both families
            content = torch.zeros(*content.shape[:2], self.student.hidden_dim,
                                  device=content.device, dtype=content.dtype)
        elif proj is not None:
            content = proj["content"](content)
        if pos is not None and proj is not None:
            pos = proj["pos"](pos)
        if v == "deformable_detr" and ref is not None and ref.shape[-1] == 2 and \
                hasattr(self.student.transformer, "reference_points"):
            ref = None  # official: the student's reference_points layer reads the teacher's pos
        return Queries(content, pos=pos, reference=ref)

    def tafd_terms(self, s_enc, t_enc, t_dec, targets):
        """One TAFD loss per student layer i (teacher layer layer_map[i]), summed over levels."""
        f_t = level_maps(t_enc, self.cfg.feature_source)
        f_s = level_maps(s_enc, self.cfg.feature_source)
        if hasattr(self, "feat_adapters"):
            f_s = [a(f) for a, f in zip(self.feat_adapters, f_s)]
        for k, (a, b) in enumerate(zip(f_t, f_s)):
            if a.shape != b.shape:
                raise ValueError(f"TAFD level {k}: teacher features {tuple(a.shape)} and student "
                                 f"features {tuple(b.shape)} differ in size (backbone strides?)")
        c = self.cfg
        losses, masks = [], []
        for l in self.layer_map:
            hs, quality, _, _ = tafd_select(t_dec.logits[l].float().sigmoid(),
                                            t_dec.boxes[l].float(), t_dec.hs[l].float(),
                                            targets, c.tafd_topk, c.quality_form, c.quality_gamma)
            m = [tafd_mask(hs, quality, a.float(), c.tafd_mask_floor) for a in f_t]
            if c.tafd_form == "paper":  # Eq. 9: per-query masks psi_i = F^T Q_i
                losses.append(sum(tafd_loss_paper(hs, quality, a.float(), b.float())
                                  for a, b in zip(f_t, f_s)))
            else:
                losses.append(sum(tafd_loss(mk, a.float(), b.float())
                                  for mk, a, b in zip(m, f_t, f_s)))
            masks.append(m)
        return losses, masks

    def forward(self, images, masks, targets):
        cfg, L = self.cfg, len(self.layer_map)
        t_enc, t_dec = self.run_teacher(images, masks)
        s_enc = self.student.encode(images, masks)
        s_dec = self.student.decode(s_enc, targets=targets)
        q_dec = None
        if cfg.use_qpad:  # no targets: no denoising groups in this pass
            q_enc = s_enc if cfg.qpad_reuse_encoder else rerun_encoder(self.student, s_enc)
            q_dec = self.student.decode(q_enc, queries=self.qpad_queries(t_dec))
        sfx = [""] * L
        sfx[:-1] = [f"_{i}" for i in range(L - 1)]  # DETR's aux-loss suffixes: last layer none
        with torch.autocast(device_type=images.device.type, enabled=False):  # losses in fp32
            outputs = engine.fp32(self.student.outputs(s_enc, s_dec))
            losses = self.criterion(outputs, targets)  # the student's own detection losses
            assign = None
            if cfg.use_qpad or (cfg.use_hmld and cfg.hmld_form == "paper"):
                # the teacher's own layer-l GT assignment (QPAD; the paper HMLD's positives)
                assign = self.teacher_matcher.match_layers(
                    [{"pred_logits": t_dec.logits[l], "pred_boxes": t_dec.boxes[l]}
                     for l in self.layer_map], targets)
            if cfg.use_hmld and cfg.hmld_form == "paper":
                paper = self.hmld_match_paper(s_dec, t_dec, assign)
                pairs = [[(torch.cat([p[0], n[0]]), torch.cat([p[1], n[1]])) for p, n in m]
                         for m in paper]  # both matchings, for the InfoNCE term
            elif cfg.use_hmld or cfg.use_query_contrastive:
                pairs = self.hmld_match(s_dec, t_dec)
            for i, l in enumerate(self.layer_map):
                if cfg.use_hmld:  # C1
                    t_boxes = teacher_pseudo_boxes(t_dec.boxes[l].float(), cfg.clamp_teacher_boxes)
                    if cfg.hmld_form == "paper":
                        cls_, bbox, giou = hmld_loss_paper(
                            s_dec.logits[i].float(), s_dec.boxes[i].float(),
                            t_dec.logits[l].float().sigmoid(), t_boxes, paper[i])
                    else:
                        cls_, bbox, giou = hmld_loss(s_dec.logits[i].float(), s_dec.boxes[i].float(),
                                                     t_dec.logits[l].float().sigmoid(), t_boxes, pairs[i])
                    losses.update({f"loss_hmld_cls{sfx[i]}": cls_, f"loss_hmld_bbox{sfx[i]}": bbox,
                                   f"loss_hmld_giou{sfx[i]}": giou})
                if cfg.use_query_contrastive:  # C4: student state i <-> its matched teacher state
                    u = torch.cat([s_dec.hs[i][b, si] for b, (si, _) in enumerate(pairs[i])])
                    v = torch.cat([t_dec.hs[l][b, ti] for b, (_, ti) in enumerate(pairs[i])])
                    losses[f"loss_nce{sfx[i]}"] = info_nce(self.proj_student(u.float()),
                                                           self.proj_teacher(v.float()),
                                                           cfg.nce_temperature)
            if cfg.use_tafd:  # C2
                for i, loss in enumerate(self.tafd_terms(s_enc, t_enc, t_dec, targets)[0]):
                    losses[f"loss_tafd{sfx[i]}"] = loss
            if cfg.use_qpad:  # C3: the teacher's own layer-l GT assignment, no new matching
                for i, indices in enumerate(assign):
                    num_pos = mean_over_processes(torch.tensor(
                        float(sum(len(q) for q, _ in indices)), device=images.device)).clamp(min=1)
                    group = {"pred_logits": q_dec.logits[i].float(), "pred_boxes": q_dec.boxes[i].float()}
                    out = self.criterion.group_losses(group, targets, indices, num_pos, "_qpad")
                    losses.update({f"loss_qpad_{k}{sfx[i]}": out[f"loss_{k}_qpad"]
                                   for k in ("ce", "bbox", "giou")})
        return losses


# ------------------------------------------------------------------------------------------
# --visualize: what the method distils, for a few validation images
# ------------------------------------------------------------------------------------------

GT_GREEN, TEACHER_ORANGE, TEACHER_RED = (0, 220, 0), (255, 140, 0), (230, 40, 40)
STUDENT_BLUE, PAIR_YELLOW = (60, 120, 255), (255, 255, 0)


@torch.no_grad()
def visualize(distiller, dataset, out_dir, num_images=4, shown=10):
    """One PNG per validation image, panels left to right (last student layer, its teacher layer):
      TAFD   GT (green) and the teacher's top-quality (query, class) pairs that build the mask
             (orange, thicker = higher quality); then the mask of every feature level;
      HMLD   the teacher's highest-scored predictions (red) and the student predictions matched
             to them (blue), centres joined (yellow);
      QPAD   the student decoder run on the teacher's queries: its boxes for the queries the
             teacher's own assignment gives a GT (blue), and the GT (green).
    Panels of a switched-off term are left out."""
    cfg, was_training = distiller.cfg, distiller.training
    distiller.eval()
    device = next(distiller.student.parameters()).device
    images, masks, targets = collate([dataset[i] for i in range(min(num_images, len(dataset)))])
    images, masks, targets = engine.to_device(images, masks, targets, device)
    t_enc, t_dec = distiller.run_teacher(images, masks)
    s_enc = distiller.student.encode(images, masks)
    s_dec = distiller.student.decode(s_enc)
    l = distiller.layer_map[-1]
    pairs = distiller.hmld_match(s_dec, t_dec)[-1]
    if cfg.use_tafd:
        lv_masks = distiller.tafd_terms(s_enc, t_enc, t_dec, targets)[1][-1]  # per level (B,1,H,W)
        _, quality, q_idx, _ = tafd_select(t_dec.logits[l].sigmoid(), t_dec.boxes[l], t_dec.hs[l],
                                           targets, cfg.tafd_topk)
    if cfg.use_qpad:
        q_dec = distiller.student.decode(s_enc, queries=distiller.qpad_queries(t_dec))
        assign = distiller.teacher_matcher({"pred_logits": t_dec.logits[l],
                                            "pred_boxes": t_dec.boxes[l]}, targets)
    paths = []
    for b, t in enumerate(targets):
        base, panels = figures.to_pil(images[b], t["size"], figures.zoom_for(t["size"])), []
        if cfg.use_tafd:
            p = base.copy()
            qmax = float(quality[b].max().clamp(min=1e-6))
            for j in quality[b].argsort(descending=True)[:shown].tolist():
                figures.draw_boxes(p, t_dec.boxes[l][b, q_idx[b, j]], TEACHER_ORANGE,
                                   1 + int(3 * float(quality[b, j]) / qmax))
            figures.draw_boxes(p, t["boxes"], GT_GREEN)
            panels.append(figures.panel(p, "TAFD: GT, top-quality queries"))
            for k, m in enumerate(lv_masks):
                over = figures.heat_overlay(base, m[b, 0], images.shape[-2:], t["size"])
                panels.append(figures.panel(over, f"TAFD mask, level {k}"))
        p = base.copy()
        d, si, ti = ImageDraw.Draw(p), *pairs[b]
        for j in t_dec.logits[l][b, ti].sigmoid().amax(-1).argsort(descending=True)[:shown].tolist():
            tb, sb = t_dec.boxes[l][b, ti[j]], s_dec.boxes[-1][b, si[j]]
            figures.draw_boxes(p, tb, TEACHER_RED)
            figures.draw_boxes(p, sb, STUDENT_BLUE)
            d.line([float(tb[0]) * p.width, float(tb[1]) * p.height,
                    float(sb[0]) * p.width, float(sb[1]) * p.height], fill=PAIR_YELLOW, width=1)
        panels.append(figures.panel(p, "HMLD: teacher / matched student"))
        if cfg.use_qpad:
            p = base.copy()
            figures.draw_boxes(p, t["boxes"], GT_GREEN)
            figures.draw_boxes(p, q_dec.boxes[-1][b, assign[b][0]], STUDENT_BLUE)
            panels.append(figures.panel(p, "QPAD: teacher queries, student"))
        width = figures.row_width(panels)
        key = figures.legend([(GT_GREEN, "GT"), (TEACHER_ORANGE, "TAFD top-quality teacher query"),
                              (TEACHER_RED, "teacher"), (STUDENT_BLUE, "student"),
                              (PAIR_YELLOW, "HMLD pair")], width)
        footer = [key] + ([figures.colorbar(width, "mask 0", "1")] if cfg.use_tafd else [])
        paths.append(figures.save(figures.sheet([panels], footer), out_dir, "detrdistill", t["image_id"]))
    distiller.train(was_training)
    return paths


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

HELP = {"w_hmld": "multiplier of the HMLD terms", "w_tafd": "multiplier of the TAFD terms",
        "w_nce": "multiplier of the InfoNCE term (on top of --nce-weight)",
        "w_qpad": "multiplier of the QPAD terms",
        "hmld_cost_class": "HMLD matching: soft-BCE cost weight",
        "hmld_cost_bbox": "HMLD matching: L1 cost weight", "hmld_cost_giou": "HMLD matching: GIoU cost weight",
        "hmld_loss_class": "HMLD soft-BCE loss weight", "hmld_loss_bbox": "HMLD L1 loss weight",
        "hmld_loss_giou": "HMLD GIoU loss weight",
        "feature_source": "TAFD features: neck (entering the encoder, code) or encoder_memory (paper figure)",
        "tafd_topk": "TAFD: teacher (query, class) pairs that build the mask",
        "tafd_mask_floor": "TAFD: lower clamp of the mask before max-normalisation",
        "nce_dim": "InfoNCE projection width", "nce_temperature": "InfoNCE temperature",
        "nce_weight": "InfoNCE loss weight",
        "layer_map": "teacher layer per student layer when counts differ: ceil(i L_T / L_S) or the last L_S",
        "hmld_form": "HMLD: code (one matching over all teacher predictions) or paper (two "
                     "matchings, the teacher's positives then its negatives, Eq. 3-4)",
        "quality_form": "TAFD quality: code (c IoU) or paper (c^gamma IoU^(1-gamma))",
        "quality_gamma": "gamma of the paper's quality (reconstructed: the paper does not state it)",
        "tafd_form": "TAFD: code (one cosine mask, masked MSE) or paper (per-query masks "
                     "psi_i = F^T Q_i, weighted MSE / (M d H W), adapter on the student, Eq. 9)"}


def add_method_args(parser):
    help_ = {**HELP, "use_hmld": "C1 Hungarian-matching logits distillation",
             "use_tafd": "C2 target-aware feature distillation",
             "use_qpad": "C3 query-prior assignment distillation",
             "use_query_contrastive": "C4 InfoNCE on matched decoder states (released code "
                                      "only)",
             "clamp_teacher_boxes": "clip HMLD pseudo boxes to the image",
             "qpad_reuse_encoder": "QPAD decodes over the main pass's encoder output instead "
                                   "of a second encoder pass with its own dropout"}
    flags = {"use_hmld": "hmld", "use_tafd": "tafd", "use_qpad": "qpad",
             "use_query_contrastive": "query-contrastive"}
    choices = {"feature_source": ["neck", "encoder_memory"], "layer_map": ["ceil", "last"],
               "hmld_form": ["code", "paper"], "quality_form": ["code", "paper"],
               "tafd_form": ["code", "paper"]}
    g = distill.add_config_args(parser, DETRDistillConfig, "DETRDistill", help_, choices, flags)
    figures.add_args(g, "the TAFD masks, HMLD pairs and QPAD group")
    return parser


def main(argv=None):
    parser = distill.build_parser(__doc__)
    add_method_args(parser)
    args = distill.resolve(parser.parse_args(argv))
    cfg = distill.config_from_args(DETRDistillConfig, args)
    run = engine.prepare(args)
    teacher = distill.load_teacher(args, run)
    distiller = DETRDistill(cfg, teacher, run.student, run.num_classes)
    stats = engine.train(run, distiller)
    if args.visualize and is_main_process():  # one process draws
        paths = visualize(distiller, run.dataset_val, args.visualize, args.visualize_images)
        print(f"visualize: wrote {len(paths)} figures to {args.visualize}", flush=True)
    distill.print_summary(args, run, teacher, stats)
    return stats


if __name__ == "__main__":
    engine.main_guard(main)
