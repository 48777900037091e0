"""The settings of each DETR variant, in one place: what the model, the criterion, the
post-processor and the training loop read.

The defaults are the official ones (R50 on COCO, from each repository's configs and argparse
defaults); a default that differs from the official code says so in a comment.
``DETRConfig`` is written out in full. Every other variant is derived from the one it builds on
by the settings it changes, adds or drops, so DINO reads as "Deformable DETR plus these
changes":

    DETR -> Conditional DETR -> DAB-DETR
                             -> Deformable DETR -> DINO

Each variant keeps its own class with exactly its own fields (``CONFIGS[name]()``), so a setting
that does not apply to a variant (``with_box_refine`` for DINO, ``eos_coef`` for a focal-loss
model) is an error where a config is built or overridden, not a silently ignored value.

This module imports nothing from ``common``: it sits below the criterion and the model, which
both read it (the criterion never imports the model).
"""
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Optional, Tuple

__all__ = ["DETRConfig", "ConditionalDETRConfig", "DABDETRConfig", "DeformableDETRConfig",
           "DINOConfig", "CONFIGS", "variant_of"]


@dataclass(frozen=True)
class DETRConfig:
    """DETR (Carion et al., arXiv:2005.12872): the settings every variant has, DETR's values.
    Tiny CPU runs override backbone, width and sizes."""
    backbone: str = "resnet50"      # or resnet18/34/101, or "tiny" (BasicBlocks, ``width``)
    width: int = 16                 # base channels of the "tiny" backbone only
    dilation: bool = False          # DC5
    pretrained: bool = False        # torchvision ImageNet weights from the local cache only
    backbone_weights: Optional[str] = None
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "relu"
    num_queries: int = 100
    pos_temperature: float = 10000.0
    pos_offset: float = 0.0
    # the clamp of the official inverse_sigmoid (util/misc.py): logit(1.0) = log(1 / eps)
    inverse_sigmoid_eps: float = 1e-5
    class_loss: str = "softmax"     # 92-way for COCO (91 slots + no-object)
    eos_coef: float = 0.1
    loss_weights: Tuple[float, float, float] = (1.0, 5.0, 2.0)   # cls, L1, GIoU
    matcher_weights: Tuple[float, float, float] = (1.0, 5.0, 2.0)
    num_select: int = 100           # DETR itself takes the arg-max per query
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    lr_linear_proj_mult: float = 1.0
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1
    epochs: int = 300               # code default; the released models trained 500
    lr_drop: int = 200



def _derive(name, base, doc, change=None, add=(), drop=()):
    """The config class of a variant: ``base``'s fields without those in ``drop``, with the
    defaults in ``change``, and the fields in ``add`` as (name, type, default, after): each
    inserted after the field ``after``."""
    change, drop = dict(change or {}), set(drop)
    base_names = [f.name for f in fields(base)]
    new_names = [a[0] for a in add]
    for what, names in (("change", change), ("drop", drop), ("add after", [a[3] for a in add])):
        unknown = set(names) - set(base_names) - set(new_names)
        if unknown:
            raise TypeError(f"{name}: cannot {what} {sorted(unknown)}: not a field of "
                            f"{base.__name__}")
    specs = []
    for f in fields(base):
        if f.name not in drop:
            specs.append((f.name, f.type, field(default=change.get(f.name, f.default))))
        for n, t, default, after in add:
            if after == f.name:
                specs.append((n, t, field(default=change.get(n, default))))
    doc += (f"\n\nFrom {base.__name__}: " +
            "; ".join(part for part in (
                ", ".join(f"{k}={v!r}" for k, v in change.items()),
                ", ".join(f"adds {n}={d!r}" for n, _, d, _ in add),
                ", ".join(f"drops {n}" for n in sorted(drop))) if part) + ".")
    cls = make_dataclass(name, specs, frozen=True, namespace={"__doc__": doc})
    cls.__module__ = __name__
    return cls


ConditionalDETRConfig = _derive(
    "ConditionalDETRConfig", DETRConfig,
    "Conditional DETR (Meng et al., arXiv:2108.06152): DETR with focal loss and 300 queries.",
    change=dict(num_queries=300, class_loss="focal", loss_weights=(2.0, 5.0, 2.0),
                matcher_weights=(2.0, 5.0, 2.0), epochs=50, lr_drop=40),
    add=[("focal_alpha", float, 0.25, "class_loss")],
    drop=["eos_coef"])

DABDETRConfig = _derive(
    "DABDETRConfig", ConditionalDETRConfig,
    "DAB-DETR (Liu et al., arXiv:2201.12329): Conditional DETR with 4-D anchor queries.",
    change=dict(dropout=0.0, activation="prelu",
                pos_temperature=20.0,  # HF's converter uses 10 for the released R50-DC5 model
                inverse_sigmoid_eps=1e-3,  # DAB-DETR's util/misc.py
                loss_weights=(1.0, 5.0, 2.0), num_select=300),
    # epochs 50 as Conditional DETR's: the README's schedule; the code's argparse default is 300
    add=[("modulate_hw_attn", bool, True, "inverse_sigmoid_eps")])

DeformableDETRConfig = _derive(
    "DeformableDETRConfig", ConditionalDETRConfig,
    "Deformable DETR (Zhu et al., arXiv:2010.04159): Conditional DETR's losses and queries "
    "count on four feature levels with deformable attention; flags with_box_refine, "
    "two_stage.",
    change=dict(dim_feedforward=1024,
                pos_offset=-0.5,  # pixel centres
                lr=2e-4, lr_backbone=2e-5,
                lr_linear_proj_mult=0.1),  # sampling_offsets and reference_points
    add=[("num_feature_levels", int, 4, "num_queries"), ("enc_n_points", int, 4, "num_queries"),
         ("dec_n_points", int, 4, "num_queries"),
         ("with_box_refine", bool, False, "inverse_sigmoid_eps"),
         ("two_stage", bool, False, "inverse_sigmoid_eps")])

DINOConfig = _derive(
    "DINOConfig", DeformableDETRConfig,
    "DINO (Zhang et al., arXiv:2203.03605): Deformable DETR with refinement, mixed query "
    "selection and contrastive denoising always on (no flags), and these changes.",
    change=dict(dim_feedforward=2048, dropout=0.0, num_queries=900, pos_temperature=20.0,
                pos_offset=0.0,
                inverse_sigmoid_eps=1e-3,  # DINO's util/misc.py
                loss_weights=(1.0, 5.0, 2.0), num_select=300, lr=1e-4, lr_backbone=1e-5,
                # DINO_4scale.py lists lr_linear_proj_mult = 0.1, but its param_dict_type =
                # 'default' never applies it (main.py get_param_dict): sampling_offsets train at
                # the full lr
                lr_linear_proj_mult=1.0,
                epochs=12, lr_drop=11),
    add=[("dn_number", int, 100, "inverse_sigmoid_eps"),
         ("dn_box_noise_scale", float, 0.4, "inverse_sigmoid_eps"),
         ("dn_label_noise_ratio", float, 0.5, "inverse_sigmoid_eps")],
    drop=["with_box_refine", "two_stage"])

CONFIGS = {"detr": DETRConfig, "conditional_detr": ConditionalDETRConfig,
           "dab_detr": DABDETRConfig, "deformable_detr": DeformableDETRConfig, "dino": DINOConfig}


def variant_of(cfg) -> str:
    """The variant name of a config instance (``CONFIGS[variant_of(cfg)] is type(cfg)``)."""
    for name, cls in CONFIGS.items():
        if type(cfg) is cls:
            return name
    raise TypeError(f"expected a config of {sorted(CONFIGS)} (common.config), got "
                    f"{type(cfg).__name__}")
