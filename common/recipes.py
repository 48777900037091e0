"""The papers' settings as named recipes: ``--recipe NAME``, ``--list-recipes``.

This module is data: one ``Recipe`` per row of the four papers' COCO tables that the DETR
families of common/detr.py can run, and one reconstructed DETR recipe for G-DetKD (whose paper
reports CNN detectors only). How a recipe is applied is in common/cli.py (``resolve``): on real
data a method script without ``--variant`` / ``--preset`` runs its ``HEADLINE`` recipe; a flag
given on the command line always wins over a recipe field; ``--recipe none`` applies none.

Every value carries its source, as the method pages do:

    [paper]  the paper (its tables and text) or the authors' README
    [code]   the official code or its released configs (of the method, or of the detector
             for the detector's own defaults)
    [3p]     a third-party re-implementation that quotes the paper (CLoCKDistill, G-DetKD)
    [recon]  our reading where no source gives the value: a reconstruction, not the paper's

Field groups of a recipe (the keys are the flags' names, ``--epochs`` is ``epochs``):

    student   the student detector: ``variant`` and the config fields of common/detr.py
    teacher   the teacher it expects: ``variant``, ``backbone`` and structural flags
    train     epochs, lr, lr_backbone, lr_drop, weight_decay, clip_max_norm, batch_size (per
              GPU) and ``gpus``; the lr is the one for the total batch batch_size x gpus
    weights   the method's loss weights and switches: fields of its config dataclass (flags)
    reported  COCO val2017 box AP the paper reports: teacher_ap, baseline_ap (the student
              trained without distillation), distilled_ap; None where we have no value

None of these numbers has been measured by this project.
"""
from dataclasses import dataclass, field
from typing import Dict, Optional

__all__ = ["Tagged", "Recipe", "RECIPES", "HEADLINE", "METHOD_CONFIGS", "PAPERS"]


@dataclass(frozen=True)
class Tagged:
    """A value and where it comes from ("paper", "code", "3p" or "recon")."""
    value: object
    source: str

    def __str__(self):
        return f"{self.value} [{self.source}]"


def paper(v):
    return Tagged(v, "paper")


def code(v):
    return Tagged(v, "code")


def third_party(v):
    return Tagged(v, "3p")


def recon(v):
    return Tagged(v, "recon")


@dataclass(frozen=True)
class Recipe:
    method: str                        # methods/<method>.py
    row: str                           # the paper's table row (or our reconstruction) in words
    student: Dict[str, Tagged]
    teacher: Dict[str, Tagged]
    train: Dict[str, Tagged]
    weights: Dict[str, Tagged] = field(default_factory=dict)
    reported: Dict[str, Tagged] = field(default_factory=dict)
    note: str = ""
    source: Optional[str] = None       # the table the numbers come from


# the config dataclass each method script defines (its fields are the recipe's "weights")
METHOD_CONFIGS = {"clockdistill": "CLoCKConfig", "detrdistill": "DETRDistillConfig",
                  "qskd": "QSKDConfig", "gdetkd": "GDetKDConfig"}

PAPERS = {
    "detrdistill": "DETRDistill (Chang et al., ICCV 2023, arXiv:2211.10156)",
    "qskd": "QSKD (Liu et al., arXiv:2409.06443)",
    "clockdistill": "CLoCKDistill (Lan and Tian, WACV, arXiv:2502.10683)",
    "gdetkd": "G-DetKD (Yao et al., ICCV 2021, arXiv:2108.07482)",
}

# ------------------------------------------------------------------------------------------
# Shared pieces: the detectors' official schedules (each repository's main.py or config)
# ------------------------------------------------------------------------------------------

# Deformable DETR as DETRDistill's released config trains it: AdamW 2e-4, backbone x0.1,
# clip 0.1, 50 epochs with the drop at 40, 2 images per GPU x 8 GPUs
_DEFORMABLE_50E_CODE = dict(epochs=code(50), lr_drop=code(40), lr=code(2e-4),
                            lr_backbone=code(2e-5), weight_decay=code(1e-4),
                            clip_max_norm=code(0.1), batch_size=code(2), gpus=code(8))
_DEFORMABLE_50E_RECON = {k: recon(v.value) for k, v in _DEFORMABLE_50E_CODE.items()}
# Conditional DETR / DAB-DETR official 50-epoch schedule (lr 1e-4, backbone 1e-5, drop at 40,
# 2 images per GPU x 8 GPUs): the papers' use of it is our reading
_DENSE_50E_RECON = dict(epochs=recon(50), lr_drop=recon(40), lr=recon(1e-4),
                        lr_backbone=recon(1e-5), weight_decay=recon(1e-4),
                        clip_max_norm=recon(0.1), batch_size=recon(2), gpus=recon(8))
# DINO-4scale's "1x" (config/DINO/DINO_4scale.py: 12 epochs, drop at 11, 2 per GPU x 8 GPUs)
_DINO_12E_RECON = dict(epochs=recon(12), lr_drop=recon(11), lr=recon(1e-4),
                       lr_backbone=recon(1e-5), weight_decay=recon(1e-4),
                       clip_max_norm=recon(0.1), batch_size=recon(2), gpus=recon(8))

# the standard model of each family (every size the official default: 6 + 6 layers, D 256)
_DEFORMABLE = dict(variant="deformable_detr", num_queries=300, num_feature_levels=4,
                   with_box_refine=False, two_stage=False)
_CONDITIONAL = dict(variant="conditional_detr", num_queries=300)
_DAB = dict(variant="dab_detr", num_queries=300)
_DINO = dict(variant="dino", num_queries=900, num_feature_levels=4)
_LAYERS = dict(enc_layers=6, dec_layers=6)


def _model(base, backbone, tag):
    """The student: variant and backbone tagged ``tag``, the rest the family's official
    defaults [code]."""
    out = {k: code(v) for k, v in {**base, **_LAYERS}.items()}
    out.update(variant=tag(base["variant"]), backbone=tag(backbone))
    return out


def _teacher(base, backbone, tag):
    keys = ("variant", "with_box_refine", "two_stage")
    return {k: tag(v) for k, v in {**base, "backbone": backbone}.items()
            if k in keys or k == "backbone"}


# ------------------------------------------------------------------------------------------
# The recipes
# ------------------------------------------------------------------------------------------

_DETRDISTILL_WEIGHTS = dict(w_hmld=code(1.0), w_tafd=code(1.0), w_nce=code(1.0),
                            w_qpad=code(1.0), nce_weight=code(0.2),
                            use_query_contrastive=code(True))
_QSKD_WEIGHTS = dict(lambda_agfd=recon(1.0), lambda_lapd=recon(1.0), tau=recon(0.5))
_CLOCK_WEIGHTS = dict(alpha=third_party(5e-5), beta=third_party(1e-7),
                      lambda_lcmd=recon(1.0), lambda_tcld=recon(1.0))
_GDETKD_WEIGHTS = dict(sgfi_weight=third_party(1.0), ckd_weight=third_party(0.5),
                       rois_per_img=recon(128))

RECIPES = {
    # DETRDistill: the authors' README (Deformable DETR, 50 epochs) and the paper's Tables 3, 10
    "detrdistill-deformable-r50": Recipe(
        method="detrdistill",
        row="Deformable DETR, teacher R101 -> student R50, COCO, 50 epochs",
        student=_model(_DEFORMABLE, "resnet50", code),
        teacher=_teacher(_DEFORMABLE, "resnet101", code),
        train=dict(_DEFORMABLE_50E_CODE),
        weights=dict(_DETRDISTILL_WEIGHTS),
        reported=dict(teacher_ap=paper(45.5), baseline_ap=paper(44.1), distilled_ap=paper(46.6)),
        note="the authors' README gives the teacher as 44.8 AP; the paper's Table 3 as 45.5",
        source="README table; paper Table 3"),
    "detrdistill-deformable-r18": Recipe(
        method="detrdistill",
        row="Deformable DETR, teacher R101 -> student R18, COCO, 50 epochs",
        student=_model(_DEFORMABLE, "resnet18", paper),
        teacher=_teacher(_DEFORMABLE, "resnet101", paper),
        train=dict(_DEFORMABLE_50E_RECON),
        weights=dict(_DETRDISTILL_WEIGHTS),
        reported=dict(teacher_ap=paper(45.5), baseline_ap=paper(40.0), distilled_ap=paper(43.3)),
        note="the README's link to the R18 config is empty: the R50 config's schedule is assumed",
        source="README table; paper Table 10"),
    "detrdistill-conditional-r50": Recipe(
        method="detrdistill",
        row="Conditional DETR, teacher R101 -> student R50, COCO, 50 epochs",
        student=_model(_CONDITIONAL, "resnet50", paper),
        teacher=_teacher(_CONDITIONAL, "resnet101", paper),
        train={**_DENSE_50E_RECON, "epochs": paper(50)},
        weights=dict(_DETRDISTILL_WEIGHTS),
        reported=dict(teacher_ap=paper(42.4), baseline_ap=paper(40.7), distilled_ap=paper(42.9)),
        note="the authors' code for Conditional DETR is not released: schedule from the "
             "official Conditional DETR code, QPAD and the loss weights as for Deformable DETR",
        source="paper Table 3"),
    "detrdistill-conditional-r18": Recipe(
        method="detrdistill",
        row="Conditional DETR, teacher R101 -> student R18, COCO, 50 epochs",
        student=_model(_CONDITIONAL, "resnet18", paper),
        teacher=_teacher(_CONDITIONAL, "resnet101", paper),
        train={**_DENSE_50E_RECON, "epochs": paper(50)},
        weights=dict(_DETRDISTILL_WEIGHTS),
        reported=dict(teacher_ap=paper(42.4), baseline_ap=paper(35.8), distilled_ap=paper(None)),
        note="the distilled AP of this row is not available to us",
        source="paper Table 10"),
    # QSKD: the three headline results of the abstract; teachers and schedules are our reading
    "qskd-dab-r18": Recipe(
        method="qskd",
        row="DAB-DETR, teacher R101 -> student R18, COCO, 50 epochs",
        student=_model(_DAB, "resnet18", paper),
        teacher={"variant": paper("dab_detr"), "backbone": recon("resnet101")},
        train=dict(_DENSE_50E_RECON),
        weights=dict(_QSKD_WEIGHTS),
        reported=dict(teacher_ap=recon(43.5), baseline_ap=paper(36.2), distilled_ap=paper(41.5)),
        note="teacher and schedule follow KD-DETR (arXiv:2211.08071), whose DAB-DETR R18 "
             "baseline is the same 36.2 AP",
        source="paper abstract"),
    "qskd-conditional-r18": Recipe(
        method="qskd",
        row="Conditional DETR, teacher R101 -> student R18, COCO, 50 epochs",
        student=_model(_CONDITIONAL, "resnet18", paper),
        teacher={"variant": paper("conditional_detr"), "backbone": recon("resnet101")},
        train=dict(_DENSE_50E_RECON),
        weights=dict(_QSKD_WEIGHTS),
        reported=dict(teacher_ap=recon(None), baseline_ap=paper(35.8), distilled_ap=paper(39.9)),
        note="the teacher is not given; R101 as in DETRDistill's Conditional DETR rows",
        source="paper abstract"),
    "qskd-dino-r50": Recipe(
        method="qskd",
        row="DINO-4scale, teacher R101 -> student R50, COCO, 12 epochs",
        student=_model(_DINO, "resnet50", paper),
        teacher={"variant": paper("dino"), "backbone": recon("resnet101")},
        train=dict(_DINO_12E_RECON),
        weights=dict(_QSKD_WEIGHTS),
        reported=dict(teacher_ap=recon(None), baseline_ap=paper(49.0), distilled_ap=paper(51.4)),
        note="49.0 is the official DINO-4scale R50 12-epoch result, hence the schedule; the "
             "teacher is not given",
        source="paper abstract"),
    # CLoCKDistill: per-setting numbers are not available to us (the abstract reports gains of
    # +2.2 to +6.4 AP over KITTI and COCO); the pairs follow the author's companion configs
    "clockdistill-deformable-r50": Recipe(
        method="clockdistill",
        row="Deformable DETR, teacher R101 -> student R50, COCO, 50 epochs",
        student={**_model(_DEFORMABLE, "resnet50", recon), "variant": paper("deformable_detr")},
        teacher={"variant": paper("deformable_detr"), "backbone": recon("resnet101")},
        train=dict(_DEFORMABLE_50E_RECON),
        weights=dict(_CLOCK_WEIGHTS),
        reported=dict(teacher_ap=recon(None), baseline_ap=recon(None), distilled_ap=recon(None)),
        note="the paper's tables are not available to us: backbones and schedule are our reading",
        source=None),
    "clockdistill-dab-r50": Recipe(
        method="clockdistill",
        row="DAB-DETR, teacher R101 -> student R50, COCO, 50 epochs",
        student={**_model(_DAB, "resnet50", recon), "variant": paper("dab_detr")},
        teacher={"variant": paper("dab_detr"), "backbone": recon("resnet101")},
        train=dict(_DENSE_50E_RECON),
        weights=dict(_CLOCK_WEIGHTS),
        reported=dict(teacher_ap=recon(None), baseline_ap=recon(None), distilled_ap=recon(None)),
        note="the paper's tables are not available to us: backbones and schedule are our reading",
        source=None),
    "clockdistill-dino-r50": Recipe(
        method="clockdistill",
        row="DINO-4scale, teacher R101 -> student R50, COCO, 12 epochs",
        student={**_model(_DINO, "resnet50", recon), "variant": paper("dino")},
        teacher={"variant": paper("dino"), "backbone": recon("resnet101")},
        train=dict(_DINO_12E_RECON),
        weights=dict(_CLOCK_WEIGHTS),
        reported=dict(teacher_ap=recon(None), baseline_ap=recon(None), distilled_ap=recon(None)),
        note="the paper's tables are not available to us: backbones and schedule are our reading",
        source=None),
    # G-DetKD: no DETR rows in the paper; the whole recipe is our reconstruction, set up like
    # DETRDistill's Deformable DETR row so that its baseline (44.1 AP there) is comparable
    "gdetkd-deformable-r50": Recipe(
        method="gdetkd",
        row="Deformable DETR, teacher R101 -> student R50, COCO, 50 epochs (reconstructed)",
        student=_model(_DEFORMABLE, "resnet50", recon),
        teacher=_teacher(_DEFORMABLE, "resnet101", recon),
        train=dict(_DEFORMABLE_50E_RECON),
        weights=dict(_GDETKD_WEIGHTS),
        reported=dict(teacher_ap=recon(None), baseline_ap=recon(None), distilled_ap=recon(None)),
        note="G-DetKD reports CNN detectors only (Faster R-CNN, RetinaNet, FCOS): this DETR "
             "recipe is a reconstruction and has no paper number",
        source=None),
}

# the recipe a method script runs on real data when no --recipe, --variant or --preset is given
HEADLINE = {"detrdistill": "detrdistill-deformable-r50", "qskd": "qskd-dab-r18",
            "clockdistill": "clockdistill-deformable-r50", "gdetkd": "gdetkd-deformable-r50"}
