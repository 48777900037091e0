"""G-DetKD: semantic-guided feature imitation across pyramid levels and contrastive distillation.

Paper: Lewei Yao, Renjie Pi, Hang Xu, Wei Zhang, Zhenguo Li, Tong Zhang, "G-DetKD: Towards
General Distillation Framework for Object Detectors via Contrastive and Semantic-guided Feature
Imitation", ICCV 2021, arXiv:2108.07482. Official code: none public.
Sources are tagged: [note-G] a paper-reading note, [3p-G] Luting Wang's re-implementation
in LutingWang/todd and LutingWang/HEAD, [recon] our reconstruction.

    python methods/gdetkd.py                                   # embedded data, cached teacher
    python methods/gdetkd.py --teacher t.pth --variant conditional_detr ...   # heterogeneous pair
    python methods/gdetkd.py --eval --resume out/checkpoint.pth --visualize figs

The two losses (added to the student's own DETR loss, L = L_det + 1.0 L_SGFI + 0.5 L_CKD):
  SGFI  for every region of interest (RoI) i the teacher feature T_i is RoIAligned from the one
        teacher level the FPN rule picks; the student feature is a soft, learned, per-RoI mixture
        of its RoIAligned features on *all* its levels, a_i^l = softmax_l(<f_embed(S_i^l),
        f_embed(T_i)> / tau); L_SGFI = MSE(sum_l a_i^l S_i^l, T_i).
  CKD   InfoNCE (cosine / gamma) between the student and teacher embeddings of the same RoI,
        both through one shared projection f_theta (the note's form); the negatives are the
        other RoIs' teacher embeddings (this step's, of every process) and a queue of past ones
        (all processes), minus those of the same image that overlap the positive with IoU > 0.5.

The paper distils CNN detectors with an FPN. THE WHOLE DETR ADAPTATION IS OUR DESIGN [recon],
following the paper's heterogeneous (one-stage student) path:
  - the pyramid is the maps entering the encoder (``input_proj``; option: the encoder memory
    split back per level); a single-scale student (Conditional DETR, DAB-DETR) gets a train-time
    pseudo-pyramid from its backbone C3-C5 (option: its one native level);
  - the RoIs are the student's last-layer predicted boxes (matching queries only, detached)
    plus all GT boxes, labelled by IoU >= 0.5 with GT, sampled positives : negatives = 1 : 3;
  - the region embeddings for CKD come from running both decoders on the same frozen,
    box-conditioned queries built from the RoIs, one image at a time (no padded query can
    disturb another through self-attention), last-layer outputs (option ``roi``: pooled features);
  - the teacher level rule is the FPN one, clamped to the teacher's levels: with strides 8..64,
    k = clamp(floor(4 + log2(sqrt(wh) / 224)), 3, 6), level index k - 3.
Constants taken from [3p-G], not from the paper (its full text was not available): CKD
temperature 0.07, queue of the last 10 iterations, IoU filter 0.5, weights SGFI 1.0 / CKD 0.5,
1x1 adapters, f_embed widths 128 -> 64, dot-product similarity, MSE mean reduction.
Other readings [recon]: softmax over *levels* (todd's newest version normalises over RoIs, a bug);
ReLU after both f_embed convs (as the note and todd's older version); standard InfoNCE with the
positive in the denominator (todd omits it: ``--no-ckd-positive-in-denominator``); the CKD
projection is the note's (our main source for the paper's equations): one linear f_theta
(D_T -> D_T) shared by student and teacher, then cosine / gamma; a bias-free linear adapter
D_S -> D_T precedes it on the student side only when the widths differ [recon]. Every key, this
step's and the queued ones alike, goes through the current f_theta with its gradient (the teacher
embeddings themselves are detached) [recon]. ``--no-ckd-shared-head`` is [3p-G]'s form: a
student-side adapter only, raw teacher keys. The queue keeps raw teacher embeddings; each step
all-gathers the current batch of every process before the loss, so the other processes' RoIs are
negatives at once, as in [3p-G]'s toolkit; the queue is saved in checkpoints (a resume is exact).
SGFI and CKD divide by the RoI count averaged over processes (N processes x batch b train like
one process x batch N b) [recon]. With ``ckd_embed='roi'`` the CKD gradient also reaches the SGFI
adapters.
RoIAlign is torchvision's roi_align(aligned=True), computed as two matrix products per image
(``common.ops.roi_align_separable``, tested equal to torchvision's in float64): torchvision's CPU
backward dominated a training step on the CPU.
Not implemented: the paper's homogeneous-pair extras (R-CNN prediction KD, class-aware
regression KD, head transfer) and the torchvision CNN path (the paper's own CNN detectors).

Pairs: {Deformable DETR, DINO, Conditional DETR, DAB-DETR} -> the same set,
including mixed ones (e.g. Deformable DETR or DINO -> Conditional DETR); plain DETR is refused.
"""
import os
import sys
from collections import deque
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import ImageDraw
from torch import nn
from torchvision.ops import box_iou
from torchvision.ops.poolers import LevelMapper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import distill, engine, figures, ops  # noqa: E402
from common.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh  # noqa: E402
from common.criterion import build_criterion  # noqa: E402
from common.data import collate  # noqa: E402
from common.distributed import (gather_rows_per_process, is_main_process,  # noqa: E402
                                mean_over_processes)
from common.detr import Queries  # noqa: E402
from common.transformer import MLP, inverse_sigmoid  # noqa: E402

SUPPORTED = ("deformable_detr", "dino", "conditional_detr", "dab_detr")
MULTI_SCALE = ("deformable_detr", "dino")
CHOICES = {"pyramid_source": ("input_proj", "memory"), "student_pyramid": ("backbone_c3c5", "native"),
           "ckd_embed": ("query", "roi")}


@dataclass(frozen=True)
class GDetKDConfig:
    sgfi: bool = True                       # semantic-guided feature imitation (C1)
    ckd: bool = True                        # contrastive knowledge distillation (C2)
    sgfi_weight: float = 1.0                # [3p-G] configs/kd/gdet.py
    ckd_weight: float = 0.5                 # [3p-G]
    pyramid_source: str = "input_proj"      # [recon] or "memory" (encoder output per level)
    student_pyramid: str = "backbone_c3c5"  # [recon] single-scale students only; or "native"
    shared_adapter: bool = False            # [3p-G] one 1x1 f_adap per student level; or shared
    learn_tau: bool = True                  # [note-G][3p-G] learnable tau, init 1
    roi_size: int = 7                       # [3p-G] RoIAlign output 7x7
    sampling_ratio: int = 2                 # [recon] as torchvision's MultiScaleRoIAlign
    canonical_scale: float = 224.0          # FPN rule (Lin et al. 2017, eq. 1) [note-G]
    canonical_level: int = 4                # k0 of the FPN rule [note-G]
    rois_per_img: int = 128                 # [recon] ([3p-G] samples 512 for CNN students)
    pos_fraction: float = 0.25              # [3p-G][recon] positives : negatives = 1 : 3
    pos_iou: float = 0.5                    # [recon] a prediction with IoU >= 0.5 is positive
    gt_jitter: float = 0.0                  # [recon] off; > 0 adds jittered GT boxes (fraction of w, h)
    ckd_embed: str = "query"                # [recon] decoder on box queries; or "roi" (pooled)
    ckd_gamma: float = 0.07                 # [3p-G] (MoCo's temperature)
    ckd_queue: int = 10                     # [3p-G] iterations of teacher embeddings kept
    ckd_iou_thr: float = 0.5                # [3p-G] same-image negatives above it are dropped
    ckd_shared_head: bool = True            # [note-G] one projection f_theta on both sides;
    #                                         False: a student-side linear adapter only [3p-G]
    ckd_positive_in_denominator: bool = True  # [recon] standard InfoNCE; False = [3p-G]

    def __post_init__(self):
        for name, ok in CHOICES.items():
            if getattr(self, name) not in ok:
                raise ValueError(f"{name} must be one of {ok}, got {getattr(self, name)!r}")
        for name in ("sgfi_weight", "ckd_weight", "gt_jitter", "ckd_queue"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("roi_size", "sampling_ratio", "rois_per_img", "ckd_gamma", "canonical_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("pos_fraction", "pos_iou", "ckd_iou_thr"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.ckd and self.ckd_embed == "roi" and not self.sgfi:
            raise ValueError("ckd_embed='roi' embeds SGFI's aggregated RoI features: it needs sgfi")


# ------------------------------------------------------------------------------------------
# Regions of interest
# ------------------------------------------------------------------------------------------

def sample_rois(pred_boxes, targets, cfg, generator=None):
    """The RoIs of a batch: every GT box, then the student's predictions labelled by IoU with GT,
    positives : negatives = pos_fraction : (1 - pos_fraction), at most max(#GT, rois_per_img).

    pred_boxes (B,Q,4) normalised cxcywh, the last decoder layer's matching queries (detached);
    targets: B dicts with "boxes" (T_b,4) normalised cxcywh and "size" (h, w) of the un-padded
    image. Returns rois (R,5) = (image index, x1, y1, x2, y2) in input pixels, and is_pos,
    is_gt (R,) bool.
    """
    rois, is_pos, is_gt = [], [], []
    for b, t in enumerate(targets):
        h, w = (float(v) for v in t["size"])
        scale = pred_boxes.new_tensor([w, h, w, h])
        gt = cxcywh_to_xyxy(t["boxes"].to(pred_boxes)) * scale            # (T,4) pixels
        cand = cxcywh_to_xyxy(pred_boxes[b].detach()) * scale              # (Q,4)
        if cfg.gt_jitter > 0 and len(gt):  # shift the centre and scale w, h by U(-j, j) of w, h
            cw = xyxy_to_cxcywh(gt)
            noise = (torch.rand(cw.shape, generator=generator) * 2 - 1).to(cw) * cfg.gt_jitter
            jit = torch.cat([cw[:, :2] + noise[:, :2] * cw[:, 2:], cw[:, 2:] * (1 + noise[:, 2:])], 1)
            cand = torch.cat([cand, cxcywh_to_xyxy(jit)])
        cand = torch.stack([cand[:, 0].clamp(0, w), cand[:, 1].clamp(0, h),
                            cand[:, 2].clamp(0, w), cand[:, 3].clamp(0, h)], 1)
        best = box_iou(cand, gt).amax(1) if len(gt) else cand.new_zeros(len(cand))
        pos, neg = cand[best >= cfg.pos_iou], cand[best < cfg.pos_iou]
        # GT boxes are kept even beyond the quota; predicted positives fill what is left of it
        quota = max(len(gt), int(cfg.rois_per_img * cfg.pos_fraction))
        pos = pos[torch.randperm(len(pos), generator=generator)[:max(quota - len(gt), 0)]]
        n_neg = max(cfg.rois_per_img - len(gt) - len(pos), 0)
        neg = neg[torch.randperm(len(neg), generator=generator)[:n_neg]]
        boxes = torch.cat([gt, pos, neg])                                  # (R_b,4)
        rois.append(torch.cat([boxes.new_full((len(boxes), 1), b), boxes], 1))
        n_pos = len(gt) + len(pos)
        is_pos.append(torch.arange(len(boxes), device=boxes.device) < n_pos)
        is_gt.append(torch.arange(len(boxes), device=boxes.device) < len(gt))
    return torch.cat(rois), torch.cat(is_pos), torch.cat(is_gt)


def teacher_levels(rois, strides, cfg):
    """FPN level rule (Lin et al., FPN, eq. 1), as torchvision's MultiScaleRoIAlign applies it:
    k = floor(k0 + log2(sqrt(w h) / 224)) clamped to the teacher's levels (stride 2^k), returned
    as an index into them. rois (R,5) pixels -> (R,) int64. A single level takes every RoI."""
    if len(strides) == 1:
        return torch.zeros(len(rois), dtype=torch.long, device=rois.device)
    k_min = int(round(torch.log2(torch.tensor(float(strides[0]))).item()))
    mapper = LevelMapper(k_min, k_min + len(strides) - 1, cfg.canonical_scale, cfg.canonical_level)
    return mapper([rois[:, 1:]])


# ------------------------------------------------------------------------------------------
# Pyramids
# ------------------------------------------------------------------------------------------

def level_strides(model):
    """Strides of the model's transformer input levels: C3..C5 then x2 per extra level."""
    strides = list(model.backbone[0].strides)
    if model.variant not in MULTI_SCALE:
        return strides[-1:]
    while len(strides) < model.cfg.num_feature_levels:
        strides.append(strides[-1] * 2)
    return strides


def detr_pyramid(model, enc, source):
    """The level maps (B,D,H_l,W_l) of a DETR and their strides: the ``input_proj`` outputs, or
    the encoder memory (B,S,D) split back into its levels."""
    maps = list(enc.features) if source == "input_proj" else enc.memory_levels()
    return maps, level_strides(model)


def backbone_c3c5(model, images, enc):
    """A single-scale DETR's pseudo-pyramid (train-time only): backbone C3, C4 (its stages layer2
    and layer3, run again since the model returns C5 only) and C5 from the encoding."""
    x, out = images, []
    for name, stage in model.backbone[0].body.items():
        if name == "layer4":
            break
        x = stage(x)
        if name in ("layer2", "layer3"):
            out.append(x)
    strides = [8, 16, model.backbone[0].strides[-1]]
    return out + [enc.backbone_features[-1]], strides


def backbone_stage_channels(model):
    """Output widths of backbone layer2..layer4 (C3..C5) of any of our ResNets."""
    body = model.backbone[0].body
    return [[m for m in body[n].modules() if isinstance(m, nn.Conv2d)][-1].out_channels
            for n in ("layer2", "layer3", "layer4")]


def pool_levels(maps, strides, rois, cfg):
    """RoIAlign of every RoI on every level: list of (R,C_l,s,s), spatial_scale = 1/stride."""
    return [ops.roi_align_separable(m.float(), rois, cfg.roi_size, 1.0 / s, cfg.sampling_ratio)
            for m, s in zip(maps, strides)]


def pool_assigned(maps, strides, rois, level, cfg):
    """RoIAlign of each RoI on its own level only -> (R,C,s,s)."""
    out = rois.new_zeros(len(rois), maps[0].shape[1], cfg.roi_size, cfg.roi_size)
    for lvl, (m, s) in enumerate(zip(maps, strides)):
        idx = (level == lvl).nonzero().flatten()
        if len(idx):
            out[idx] = ops.roi_align_separable(m.float(), rois[idx], cfg.roi_size, 1.0 / s,
                                               cfg.sampling_ratio)
    return out


# ------------------------------------------------------------------------------------------
# C1: SGFI
# ------------------------------------------------------------------------------------------

class SGFI(nn.Module):
    """Semantic-guided feature imitation (G-DetKD sec. 3.1).

    f_adap: 1x1 conv C_l -> C_T per student level (or one shared); f_embed: 3x3 stride-2 unpadded
    conv C_T -> 128, ReLU, 3x3 stride-2 conv 128 -> 64, ReLU, shared by both sides (7x7 -> 1x1);
    tau = exp(log_tau), learnable, 1 at init.
    """

    def __init__(self, student_channels, teacher_channels, shared_adapter=False, learn_tau=True):
        super().__init__()
        if shared_adapter and len(set(student_channels)) != 1:
            raise ValueError(f"shared_adapter needs equal student level widths, got {student_channels}")
        n = 1 if shared_adapter else len(student_channels)
        self.num_levels = len(student_channels)
        self.adapters = nn.ModuleList(nn.Conv2d(c, teacher_channels, 1) for c in student_channels[:n])
        self.embed = nn.Sequential(nn.Conv2d(teacher_channels, 128, 3, stride=2), nn.ReLU(),
                                   nn.Conv2d(128, 64, 3, stride=2), nn.ReLU())
        log_tau = torch.zeros(())
        if learn_tau:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)

    def adapt(self, student_rois):
        """list of L (R,C_l,s,s) -> S (L,R,C_T,s,s), S_i^l = f_adap(RoIAlign(F_S^l, box_i))."""
        ads = self.adapters if len(self.adapters) == len(student_rois) else \
            [self.adapters[0]] * len(student_rois)
        return torch.stack([a(x) for a, x in zip(ads, student_rois)])

    def level_weights(self, S, T):
        """a (L,R) = softmax over levels l of <f_embed(S_i^l), f_embed(T_i)> / tau."""
        L, R = S.shape[:2]
        k_s = self.embed(S.flatten(0, 1)).flatten(1).view(L, R, -1)      # (L,R,64)
        k_t = self.embed(T.detach()).flatten(1)                          # (R,64)
        return ((k_s * k_t).sum(-1) / self.log_tau.exp()).softmax(dim=0)  # levels sum to 1

    def forward(self, student_rois, T, num_rois=None):
        """student_rois: list of L (R,C_l,s,s); T (R,C_T,s,s) teacher RoI features.
        Returns L_SGFI = mean over RoIs, channels and cells of (sum_l a^l S^l - T)^2 (the RoI
        count ``num_rois`` averaged over processes when given, else R), the aggregate S_hat
        (R,C_T,s,s) and the level weights a (L,R)."""
        T = T.detach()  # the teacher is a fixed target
        S = self.adapt(student_rois)                                     # (L,R,C_T,s,s)
        a = self.level_weights(S, T)                                     # (L,R)
        S_hat = (a[..., None, None, None] * S).sum(0)                    # (R,C_T,s,s)
        R = T.shape[0] if num_rois is None else num_rois
        loss = F.mse_loss(S_hat, T, reduction="sum") / (R * T[0].numel() if T.shape[0] else 1)
        return loss, S_hat, a


# ------------------------------------------------------------------------------------------
# C2: CKD
# ------------------------------------------------------------------------------------------







class TeacherQueue(nn.Module):
    """The memory of past teacher embeddings (MoCo style): the last ``iterations`` batches of
    every process (the caller pushes the gathered batch), detached, raw (before f_theta). Its
    content is the module's extra state, so it is saved in checkpoints and a resume is exact."""

    def __init__(self, iterations):
        super().__init__()
        self.iterations = iterations
        self.items = deque(maxlen=iterations) if iterations > 0 else None

    def keys(self, like):
        if not self.items:
            return like.new_zeros(0, like.shape[1])
        return torch.cat(list(self.items)).to(like)

    def push(self, v):
        """v (N,d): this iteration's teacher embeddings of all processes."""
        if self.items is not None:
            self.items.append(v.detach())

    def get_extra_state(self):
        return {"items": list(self.items or [])}

    def set_extra_state(self, state):
        if self.items is not None:
            self.items.clear()
            self.items.extend(t.detach() for t in state["items"][-self.iterations:])


def ckd_loss(z_s, z_t, queue, roi_image, roi_boxes, gamma=0.07, iou_thr=0.5,
             positive_in_denominator=True, num_rois=None):
    """Contrastive KD (G-DetKD sec. 3.2): InfoNCE with u = normalize(z_s),
    v = normalize(z_t),

        L = -(1/N) sum_i log exp(u_i.v_i/g) / (exp(u_i.v_i/g) + sum_{j in Neg(i)} exp(u_i.v_j/g))

    Neg(i) = the other RoIs of the batch and ``queue`` (the other processes' current RoIs and
    the past iterations), minus same-image RoIs with IoU > iou_thr to RoI i.
    ``positive_in_denominator=False`` drops the first denominator term ([3p-G]).
    z_s, z_t (R,d); queue (K,d); roi_image (R,) image index; roi_boxes (R,4) xyxy. The keys z_t
    and queue are used as given (the caller decides what carries a gradient). N = ``num_rois``
    (the RoI count averaged over processes, as the detection loss's box count), else R."""
    R = z_s.shape[0]
    u = F.normalize(z_s.float(), dim=1)
    keys = F.normalize(torch.cat([z_t, queue.to(z_t)]).float(), dim=1)            # (R+K,d)
    logits = u @ keys.t() / gamma                                      # (R,R+K), i-th is positive
    eye = torch.eye(R, dtype=torch.bool, device=u.device)
    same = roi_image[:, None] == roi_image[None, :]
    drop = same & (box_iou(roi_boxes, roi_boxes) > iou_thr) & ~eye     # near-duplicate negatives
    logits[:, :R] = logits[:, :R].masked_fill(drop, float("-inf"))
    pos = logits.diagonal()                                            # (R,)
    neg = logits.clone()
    neg[:, :R] = neg[:, :R].masked_fill(eye, float("-inf"))
    N = R if num_rois is None else num_rois
    if positive_in_denominator:
        return (torch.logsumexp(logits, 1) - pos).sum() / N
    lse = torch.logsumexp(neg, 1)
    has_neg = torch.isfinite(lse)  # a RoI without any negative has no ratio to maximise
    return torch.where(has_neg, lse - pos, torch.zeros_like(pos)).sum() / N


class RoIQueries(nn.Module):
    """Frozen box-conditioned queries for CKD: the same tensors for teacher and
    student (the first D_T / D_S channels of one frozen content vector and of one frozen
    MLP(logit(box)) 4 -> 64 -> D_max), built per family as CLoCKDistill's target-aware queries
    are (methods/clockdistill.py)."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("content", torch.randn(dim))
        self.pos_mlp = MLP(4, 64, dim, 2).requires_grad_(False)

    @torch.no_grad()
    def forward(self, model, boxes):
        """boxes (1,R,4) normalised cxcywh -> Queries for ``model``'s variant."""
        D, v = model.hidden_dim, model.variant
        content = self.content[:D].expand(*boxes.shape[:2], D)                 # (1,R,D)
        if v in ("dab_detr", "dino"):  # 4-D anchors through the model's own anchor -> pos path
            return Queries(content, reference=boxes)
        pos = self.pos_mlp(inverse_sigmoid(boxes))[..., :D]                    # (1,R,D)
        box_ref = v == "deformable_detr" and (model.cfg.with_box_refine or model.cfg.two_stage)
        return Queries(content, pos=pos, reference=boxes if box_ref else boxes[..., :2])


# ------------------------------------------------------------------------------------------
# The distiller
# ------------------------------------------------------------------------------------------

class GDetKD(nn.Module):
    """Student + frozen teacher + G-DetKD's student-side modules (sgfi, ckd_adapter,
    ckd_head, roi_queries); ``forward`` returns the student's DETR losses, "loss_sgfi" and
    "loss_ckd"."""

    def __init__(self, cfg: GDetKDConfig, teacher, student, num_classes):
        super().__init__()
        if teacher is None:
            raise ValueError("G-DetKD needs a teacher (--teacher PATH)")
        distill.check_pair("G-DetKD", teacher, student, supported=SUPPORTED,
                           supported_reason="plain DETR has no reference boxes for the RoI "
                                            "queries",
                           same_variant=False, same_classes=False, same_class_loss=False)
        self.cfg, self.teacher, self.student = cfg, teacher, student
        self.criterion = build_criterion(student, num_classes)
        self.weight_dict = dict(self.criterion.weight_dict)
        C_T = teacher.hidden_dim
        if cfg.sgfi:
            if student.variant in MULTI_SCALE or cfg.student_pyramid == "native":
                chans = [student.hidden_dim] * (len(level_strides(student)))
            else:
                chans = backbone_stage_channels(student)
            self.sgfi = SGFI(chans, C_T, cfg.shared_adapter, cfg.learn_tau)
            self.weight_dict["loss_sgfi"] = cfg.sgfi_weight
        if cfg.ckd:
            d_s = C_T if cfg.ckd_embed == "roi" else student.hidden_dim
            # g: student -> teacher width; with the shared head only where the widths differ
            self.ckd_adapter = (nn.Linear(d_s, C_T, bias=False)
                                if not cfg.ckd_shared_head or d_s != C_T else None)
            self.ckd_head = nn.Linear(C_T, C_T) if cfg.ckd_shared_head else None   # f_theta
            if cfg.ckd_embed == "query":
                self.roi_queries = RoIQueries(max(C_T, student.hidden_dim))
            self.queue = TeacherQueue(cfg.ckd_queue)
            self.weight_dict["loss_ckd"] = cfg.ckd_weight

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher stays in eval mode (no dropout, no denoising)
        return self

    def student_pyramid(self, images, enc):
        s = self.student
        if s.variant not in MULTI_SCALE and self.cfg.student_pyramid == "backbone_c3c5":
            return backbone_c3c5(s, images, enc)
        return detr_pyramid(s, enc, self.cfg.pyramid_source)

    def region_features(self, images, enc_s, enc_t, rois):
        """T (R,C_T,s,s) from each RoI's teacher level and the list of student RoI features on
        all student levels, in fp32; plus the teacher level of every RoI."""
        s_maps, s_strides = self.student_pyramid(images, enc_s)
        t_maps, t_strides = detr_pyramid(self.teacher, enc_t, self.cfg.pyramid_source)
        with torch.autocast(device_type=images.device.type, enabled=False):
            level = teacher_levels(rois, t_strides, self.cfg)
            T = pool_assigned([m.detach() for m in t_maps], t_strides, rois, level, self.cfg)
            return T, pool_levels(s_maps, s_strides, rois, self.cfg), level

    def query_embeddings(self, enc_s, enc_t, rois, sizes):
        """r^s, r^t (R,D_S), (R,D_T): last-layer decoder outputs of student and teacher on the
        same frozen box queries, each image's RoIs seeing only each other in self-attention."""
        B = enc_s.memory.shape[0]
        image = rois[:, 0].long()
        counts = torch.bincount(image, minlength=B).tolist()
        scale = torch.stack([rois.new_tensor([w, h, w, h]) for h, w in sizes])   # (B,4)
        box = xyxy_to_cxcywh(rois[:, 1:] / scale[image]).clamp(0.0, 1.0)        # (R,4)
        if self.student.variant in MULTI_SCALE and self.teacher.variant in MULTI_SCALE:
            # one batched pass per model: image b's RoIs in slots [0, R_b) of row b, the rest
            # padding; a per-image self-attention mask hides the padding from the real queries
            # (a padded query sees itself only), so each image's result is that of its own pass
            R_max = max(counts)
            slot = torch.empty_like(image)            # rank of each RoI within its image
            slot[torch.argsort(image, stable=True)] = torch.cat(
                [torch.arange(n, device=rois.device) for n in counts])
            boxes = box.new_tensor([0.5, 0.5, 0.1, 0.1]).repeat(B, R_max, 1)     # (B,R_max,4)
            boxes[image, slot] = box
            real = torch.zeros(B, R_max, dtype=torch.bool, device=rois.device)
            real[image, slot] = True
            eye = torch.eye(R_max, dtype=torch.bool, device=rois.device)
            blocked = ~real[:, None, :] & ~eye                                   # (B,R_max,R_max)

            def embed(model, enc):
                q = replace(self.roi_queries(model, boxes), attn_mask=blocked)
                return model.decode(enc, q).hs[-1][image, slot]                  # (R,D)
            with torch.no_grad():
                r_t = embed(self.teacher, enc_t)
            return embed(self.student, enc_s), r_t
        # decoders without a self-attention mask (Conditional DETR, DAB-DETR): image by image
        r_s, r_t, order = [], [], []
        for b in range(B):
            sel = (image == b).nonzero().flatten()
            if len(sel) == 0:
                continue
            with torch.no_grad():
                r_t.append(self.teacher.decode(enc_t.image(b), self.roi_queries(
                    self.teacher, box[sel][None])).hs[-1][0])
            r_s.append(self.student.decode(enc_s.image(b), self.roi_queries(
                self.student, box[sel][None])).hs[-1][0])
            order.append(sel)
        order = torch.argsort(torch.cat(order))                              # back to RoI order
        return torch.cat(r_s)[order], torch.cat(r_t)[order]

    def forward(self, images, masks, targets):
        s, cfg = self.student, self.cfg
        enc_s = s.encode(images, masks)
        dec_s = s.decode(enc_s, targets=targets)
        with torch.autocast(device_type=images.device.type, enabled=False):
            losses = self.criterion(engine.fp32(s.outputs(enc_s, dec_s)), targets)
        if not (cfg.sgfi or cfg.ckd):
            return losses
        with torch.no_grad():
            rois, _, _ = sample_rois(dec_s.boxes[-1].float(), targets, cfg)   # (R,5) pixels
            enc_t = self.teacher.encode(images, masks)
        S_hat = T = None
        # the RoI count averaged over processes: N processes x batch b train as 1 x N b
        num_rois = mean_over_processes(torch.tensor(float(len(rois)), device=rois.device))
        num_rois = num_rois.clamp(min=1)
        if cfg.sgfi:
            T, s_rois, _ = self.region_features(images, enc_s, enc_t, rois)
            with torch.autocast(device_type=images.device.type, enabled=False):
                losses["loss_sgfi"], S_hat, _ = self.sgfi(s_rois, T, num_rois)
        if cfg.ckd:
            if cfg.ckd_embed == "query":
                sizes = [tuple(float(v) for v in t["size"]) for t in targets]
                r_s, r_t = self.query_embeddings(enc_s, enc_t, rois, sizes)
            else:  # global-average-pooled RoI features (teacher T_i, student S_hat_i)
                r_s, r_t = S_hat.mean((2, 3)), T.mean((2, 3))
            with torch.autocast(device_type=images.device.type, enabled=False):
                r_t = r_t.float().detach()                               # (R,D_T) raw teacher
                # this iteration's teacher embeddings of every process: the other processes'
                # are negatives in this very step, as the queue will be later ([3p-G])
                everyone, rank = gather_rows_per_process(r_t)
                others = [x for j, x in enumerate(everyone) if j != rank]
                extra = torch.cat(others + [self.queue.keys(r_t)])        # (K,D_T) raw
                z_s = r_s.float()
                if self.ckd_adapter is not None:
                    z_s = self.ckd_adapter(z_s)                          # (R,D_S) -> (R,D_T)
                z_t = r_t
                if self.ckd_head is not None:  # f_theta on both sides; every key (current,
                    # other processes', queued) goes through it alike, with its gradient
                    z_s, z_t, extra = self.ckd_head(z_s), self.ckd_head(z_t), self.ckd_head(extra)
                losses["loss_ckd"] = ckd_loss(z_s, z_t, extra, rois[:, 0], rois[:, 1:],
                                              cfg.ckd_gamma, cfg.ckd_iou_thr,
                                              cfg.ckd_positive_in_denominator, num_rois)
            self.queue.push(torch.cat(everyone))  # raw: the head is applied at use
        return losses


# ------------------------------------------------------------------------------------------
# --visualize: the RoIs and SGFI's level weights
# ------------------------------------------------------------------------------------------

def level_colour(lvl):
    """The colour of student level lvl: red, green, blue, orange, purple."""
    return figures.PALETTE[[0, 1, 3, 4, 5][int(lvl) % 5]]


@torch.no_grad()
def visualize(distiller, dataset, out_dir, num_images=4):
    """One PNG per validation image: the sampled RoIs, negatives thin grey, positives (GT
    thickest) coloured by the student level SGFI weights most; above each positive, its teacher
    level "t<k>" and one bar per student level l of height a^l. The key below gives each
    student level's colour and stride."""
    device = next(distiller.student.parameters()).device
    images, masks, targets = engine.to_device(
        *collate([dataset[i] for i in range(min(num_images, len(dataset)))]), device)
    distiller.eval()
    enc_s = distiller.student.encode(images, masks)
    dec_s = distiller.student.decode(enc_s)
    rois, is_pos, is_gt = sample_rois(dec_s.boxes[-1], targets, distiller.cfg,
                                      torch.Generator().manual_seed(0))
    a = level = None
    if distiller.cfg.sgfi:
        T, s_rois, level = distiller.region_features(images, enc_s, distiller.teacher.encode(
            images, masks), rois)
        _, _, a = distiller.sgfi(s_rois, T)                                  # (L,R)
        strides = distiller.student_pyramid(images, enc_s)[1]
    paths = []
    for b in range(len(targets)):
        h, w = (int(v) for v in targets[b]["size"])
        img = figures.to_pil(images[b], (h, w), figures.zoom_for((h, w)))
        draw, zoom = ImageDraw.Draw(img), img.width / w
        mine = (rois[:, 0] == b).nonzero().flatten().tolist()
        boxes = xyxy_to_cxcywh(rois[:, 1:].float().cpu()) / torch.tensor([w, h, w, h])  # normalised
        for i in mine:
            if not is_pos[i]:
                figures.draw_boxes(img, boxes[i], figures.GREY, width=1)
                continue
            colour = figures.WHITE if a is None else level_colour(a[:, i].argmax())
            figures.draw_boxes(img, boxes[i], colour, width=3 if is_gt[i] else 2)
            if a is not None:  # a bar per student level (height a^l) and the teacher level
                x0, y0 = float(rois[i, 1]) * zoom, max(float(rois[i, 2]) * zoom - 24, 0)
                draw.rectangle([x0, y0, x0 + 22 + 8 * a.shape[0], y0 + 22], fill=figures.BLACK)
                draw.text((x0 + 2, y0 + 4), f"t{int(level[i])}", fill=figures.WHITE, font=figures.font())
                for lvl in range(a.shape[0]):
                    top = y0 + 21 - 20 * float(a[lvl, i])
                    draw.rectangle([x0 + 20 + 8 * lvl, top, x0 + 26 + 8 * lvl, y0 + 21],
                                   fill=level_colour(lvl))
        entries = [(figures.GREY, "negative RoI"), (None, "thick: GT RoI")]
        if a is not None:
            entries += [(level_colour(lvl), f"student level S{lvl} (stride {st})")
                        for lvl, st in enumerate(strides)]
            entries += [(None, "tk: teacher level; bars: SGFI weight a^l per student level")]
        fig = figures.sheet([[figures.panel(img, "G-DetKD: sampled RoIs, SGFI level weights")]],
                            [figures.legend(entries, img.width)])
        paths.append(figures.save(fig, out_dir, "gdetkd", targets[b]["image_id"]))
    return paths


# ------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------

HELP = {
    "sgfi": "semantic-guided feature imitation", "ckd": "contrastive knowledge distillation",
    "sgfi_weight": "weight of loss_sgfi", "ckd_weight": "weight of loss_ckd",
    "pyramid_source": "DETR levels used as the pyramid", "learn_tau": "learnable SGFI tau",
    "student_pyramid": "single-scale student: backbone C3-C5 pseudo-pyramid or its one level",
    "shared_adapter": "one 1x1 adapter for all student levels", "roi_size": "RoIAlign output",
    "sampling_ratio": "RoIAlign sampling ratio", "canonical_scale": "FPN rule: box size of k0",
    "canonical_level": "FPN rule: k0", "rois_per_img": "RoIs per image (GT always kept)",
    "pos_fraction": "fraction of positive RoIs", "pos_iou": "IoU with GT for a positive RoI",
    "gt_jitter": "add GT boxes jittered by this fraction of w, h (0: off)",
    "ckd_embed": "CKD region embeddings: decoders on box queries, or pooled RoI features",
    "ckd_gamma": "CKD temperature", "ckd_queue": "iterations of teacher embeddings in the queue",
    "ckd_iou_thr": "same-image negatives above this IoU are dropped",
    "ckd_shared_head": "one linear projection f_theta shared by student and teacher before the "
                       "cosine (the paper note's form); off: a student-side adapter only",
    "ckd_positive_in_denominator": "standard InfoNCE (off: the ratio pos / sum neg of a third-party re-implementation)",
}


def add_args(parser):
    g = distill.add_config_args(parser, GDetKDConfig, "G-DetKD", HELP, CHOICES)
    figures.add_args(g, "the sampled RoIs and SGFI level weights")
    return parser


def main(argv=None):
    parser = add_args(distill.build_parser(__doc__))
    args = distill.resolve(parser.parse_args(argv))
    cfg = distill.config_from_args(GDetKDConfig, args)
    run = engine.prepare(args)
    teacher = distill.load_teacher(args, run)
    distiller = GDetKD(cfg, teacher, run.student, run.num_classes)
    stats = engine.train(run, distiller)
    if args.visualize and is_main_process():  # one process draws
        paths = visualize(distiller, run.dataset_val, args.visualize, args.visualize_images)
        print(f"visualize: wrote {len(paths)} figures to {args.visualize}", flush=True)
    distill.print_summary(args, run, teacher, stats)
    return stats


__all__ = ["GDetKDConfig", "GDetKD", "SGFI", "ckd_loss", "sample_rois", "teacher_levels",
           "TeacherQueue", "RoIQueries", "visualize", "main"]

if __name__ == "__main__":
    engine.main_guard(main)
