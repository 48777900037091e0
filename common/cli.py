"""Command-line arguments shared by methods/baseline.py and the method scripts.

DETR spellings are kept (``--lr_backbone`` works as well as ``--lr-backbone``). Model flags left
unset take the variant's official default (common/detr.py) or the chosen ``--preset``; a flag
given explicitly always wins over the preset.
"""
import argparse
import os

from common.data import add_data_args
from common.detr import CONFIGS

# Presets for the embedded data on a CPU (model size + training settings). They are starting
# points sized for 2 CPU cores; bench/RESULTS.md records what they reach. "variant" is only the
# default: with --variant another family gets the same sizes, and the fields it does not have
# (num_feature_levels, two_stage, ...) are skipped.
PRESETS = {
    # calibrated on 2 CPU cores, embedded data (bench/RESULTS.md sec. 4): the teacher trains in
    # <= 15 min to AP50 >= 0.5, the student in <= 5 min and ends >= 10 AP below it. Both start
    # from a tiny backbone pretrained on object crops of the training split (common/pretrain.py).
    "cpu-teacher": dict(variant="deformable_detr", backbone="tiny", width=32,
                        backbone_weights="crops", hidden_dim=64, nheads=8, enc_layers=3,
                        dec_layers=3, dim_feedforward=256, num_queries=50, num_feature_levels=3,
                        with_box_refine=True, two_stage=True, dropout=0.0, batch_size=8,
                        epochs=10, lr_drop=8, lr=1e-3, lr_backbone=1e-3),
    "cpu-student": dict(variant="deformable_detr", backbone="tiny", width=16,
                        backbone_weights="crops", hidden_dim=64, nheads=4, enc_layers=1,
                        dec_layers=2, dim_feedforward=256, num_queries=50, num_feature_levels=3,
                        with_box_refine=True, two_stage=True, dropout=0.0, batch_size=8,
                        epochs=5, lr_drop=4, lr=1e-3, lr_backbone=1e-3),
    # the smallest thing that runs the whole pipeline (tests, smoke runs): AP stays about 0
    "cpu-tiny": dict(variant="deformable_detr", backbone="tiny", width=8, hidden_dim=32,
                     nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=20,
                     num_feature_levels=3, batch_size=2, epochs=1, lr_drop=1),
}

# model flags: name -> (type, help); passed to common.detr.build_model when set
MODEL_FLAGS = {
    "backbone": (str, "resnet18/34/50/101 or tiny (a small ResNet for CPU runs)"),
    "width": (int, "base width of the tiny backbone"),
    "backbone_weights": (str, "a state dict file to start the backbone from (a torchvision "
                              "ResNet's), or 'crops': the tiny backbone pretrained on object "
                              "crops of the training split (common/pretrain.py, cached)"),
    "hidden_dim": (int, "transformer width"),
    "nheads": (int, "attention heads"),
    "enc_layers": (int, "encoder layers"),
    "dec_layers": (int, "decoder layers"),
    "dim_feedforward": (int, "feed-forward width"),
    "dropout": (float, "dropout in the transformer"),
    "num_queries": (int, "object queries"),
    "num_feature_levels": (int, "feature levels (Deformable DETR, DINO)"),
    "dn_number": (int, "denoising queries (DINO)"),
}
TRAIN_FLAGS = ("batch_size", "epochs", "lr_drop", "lr", "lr_backbone", "weight_decay",
               "clip_max_norm")


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--variant", default=None,
                   choices=["detr", "conditional_detr", "dab_detr", "deformable_detr", "dino"],
                   help="the detector (default: the preset's, else deformable_detr)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model size and schedule for CPU runs on the embedded data")
    for name, (typ, help_) in MODEL_FLAGS.items():
        flag = name.replace("_", "-")
        names = [f"--{flag}"] + ([f"--{name}"] if flag != name else [])
        g.add_argument(*names, dest=name, type=typ, default=None, help=help_)
    g.add_argument("--with-box-refine", "--with_box_refine", dest="with_box_refine",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="iterative box refinement (Deformable DETR)")
    g.add_argument("--two-stage", "--two_stage", dest="two_stage",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="two-stage proposals (Deformable DETR)")
    return parser


def add_train_args(parser):
    g = parser.add_argument_group("training")
    g.add_argument("--output-dir", "--output_dir", dest="output_dir", default=None,
                   help="checkpoint.pth and log.txt go here")
    g.add_argument("--resume", default=None, help="continue from this checkpoint.pth")
    g.add_argument("--eval", action="store_true", help="evaluate --resume's model only")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None)
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--lr-drop", "--lr_drop", dest="lr_drop", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--lr-backbone", "--lr_backbone", dest="lr_backbone", type=float,
                   default=None)
    g.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float,
                   default=None)
    g.add_argument("--clip-max-norm", "--clip_max_norm", dest="clip_max_norm", type=float,
                   default=None)
    g.add_argument("--num-workers", "--num_workers", dest="num_workers", type=int, default=2)
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (losses in fp32)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--max-iters", dest="max_iters", type=int, default=None,
                   help="stop each epoch (and evaluation) after this many iterations (smoke runs)")
    g.add_argument("--print-every", dest="print_every", type=int, default=10)
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to OUTPUT_DIR/tensorboard: every loss "
                        "and KD term, its weight and lr per iteration, AP per epoch (needs the "
                        "tensorboard package)")
    return parser


def build_parser(description):
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(parser)
    add_train_args(parser)
    add_data_args(parser)
    return parser


def resolve(args, default_variant="deformable_detr"):
    """Fill unset flags from the preset, then from the variant's config. Returns
    (args, model_overrides)."""
    args.model_from_flags = bool(args.variant or args.preset or any(
        getattr(args, n) is not None for n in list(MODEL_FLAGS) + ["with_box_refine",
                                                                   "two_stage"]))
    preset = dict(PRESETS[args.preset]) if args.preset else {}
    if args.variant is None:
        args.variant = preset.get("variant", default_variant)
    cfg = CONFIGS[args.variant]()
    overrides = {}
    for name in list(MODEL_FLAGS) + ["with_box_refine", "two_stage"]:
        value = getattr(args, name)
        if value is not None and not hasattr(cfg, name):
            raise ValueError(f"--{name.replace('_', '-')} does not apply to {args.variant}")
        if value is None and name in preset and hasattr(cfg, name):
            value = preset[name]  # a preset's field that the variant lacks is skipped
        if value is not None:
            overrides[name] = value
    for name in TRAIN_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, getattr(cfg, name, None) if name != "batch_size"
                                           else 2))
    if args.eval and not args.resume:
        raise ValueError("--eval needs --resume CHECKPOINT (the model to evaluate)")
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume}: no such file")
    args.model_overrides = overrides
    return args, overrides
