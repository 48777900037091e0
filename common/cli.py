"""Command-line arguments shared by methods/baseline.py and the method scripts, and how a run's
settings are resolved from them.

DETR spellings are kept (``--lr_backbone`` works as well as ``--lr-backbone``). Each setting
comes, in this order of precedence, from:

1. a flag given on the command line (always wins);
2. the recipe (``--recipe NAME``, common/recipes.py: a paper's table row). On real data
   (``--data coco``, any COCO-format folder) a method script without ``--variant`` /
   ``--preset`` runs its headline recipe; ``--recipe none`` turns that off;
3. the CPU preset (``--preset``): on the embedded data a method script without model flags
   uses ``cpu-student``; on real data a preset applies only when named;
4. the variant's official default (common/config.py).

torchvision ResNets start from their ImageNet weights (torchvision's cache only, never a
download; ``--no-pretrained`` for random weights, ``--backbone-weights PATH`` for a file).
The resolved settings, with where each one came from, are printed at start and kept in
``args.settings`` / ``args.sources``: ``checkpoint.pth`` stores them under "args", and
engine.prepare writes them to ``settings.json`` beside ``log.txt``.
"""
import argparse
import math
import os
import warnings

from common import recipes
from common.backbone import cached_imagenet_weights
from common.data import add_data_args
from common.detr import CONFIGS
from common.distributed import is_main_process

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
# the first run of the README: the cpu-student on a 2-epoch schedule (the lr drops after the
# first), so that installing, building, distilling and a baseline beside it fit 15 minutes on
# 2 CPU cores
PRESETS["cpu-demo"] = dict(PRESETS["cpu-student"], epochs=2, lr_drop=1)

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
BOOL_MODEL_FLAGS = ("with_box_refine", "two_stage")
TRAIN_FLAGS = ("batch_size", "epochs", "lr_drop", "lr", "lr_backbone", "weight_decay",
               "clip_max_norm")


class _ListRecipes(argparse.Action):
    """``--list-recipes``: print the recipes (the script's own first) and exit, like --help."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(format_recipes(parser.get_default("method")))
        parser.exit()


def add_model_args(parser):
    g = parser.add_argument_group("model")
    g.add_argument("--recipe", default=None, choices=sorted(recipes.RECIPES) + ["none"],
                   help="a paper's setting (model, schedule, loss weights; --list-recipes). On "
                        "real data a method script runs its headline recipe unless --variant "
                        "or --preset is given; 'none' applies no recipe. Flags given "
                        "explicitly override its fields")
    g.add_argument("--recipe-model", dest="recipe_model", default="student",
                   choices=["student", "teacher"],
                   help="methods/baseline.py: train the recipe's student (its baseline, no "
                        "distillation) or the teacher it expects (same schedule)")
    g.add_argument("--list-recipes", action=_ListRecipes,
                   help="print the recipes with the papers' numbers and exit")
    g.add_argument("--variant", default=None,
                   choices=["detr", "conditional_detr", "dab_detr", "deformable_detr", "dino"],
                   help="the detector (default: the recipe's or preset's, else deformable_detr)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model size and schedule for CPU runs on the embedded data (the "
                        "default there); on real data only when named. cpu-teacher: the "
                        "teacher, 10 epochs; cpu-student: the student, 5 epochs; cpu-demo: "
                        "the student, 2 epochs (the README's first run); cpu-tiny: the "
                        "smallest model, 1 epoch (checks the pipeline, AP about 0)")
    g.add_argument("--pretrained", dest="pretrained", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="start a torchvision ResNet from its ImageNet weights, read from "
                        "torchvision's cache (torch.hub.get_dir()/checkpoints), never downloaded "
                        "(default: on); --no-pretrained starts from random weights")
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
    g.add_argument("--resume", default=None,
                   help="continue from this checkpoint.pth (the flags given now win over the "
                        "ones it was trained with; a changed --lr or --lr-drop is applied "
                        "from the next epoch on, with the lr drops already taken)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output-dir that holds another run (its "
                        "checkpoints and log.txt are deleted first)")
    g.add_argument("--save-every", "--save_every", dest="save_every", type=int, default=0,
                   help="also keep checkpointNNNN.pth every N epochs (0: only the copies "
                        "kept before each lr drop)")
    g.add_argument("--eval", action="store_true", help="evaluate --resume's model only")
    g.add_argument("--seed", type=int, default=42,
                   help="seed of every random stream (each torchrun process adds its rank)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None,
                   help="images per process and iteration")
    g.add_argument("--epochs", type=int, default=None, help="training epochs")
    g.add_argument("--lr-drop", "--lr_drop", dest="lr_drop", type=int, default=None,
                   help="the lr is multiplied by 0.1 every this many epochs")
    g.add_argument("--lr", type=float, default=None,
                   help="AdamW learning rate of the transformer and heads, for the total batch "
                        "(processes x --batch-size)")
    g.add_argument("--lr-backbone", "--lr_backbone", dest="lr_backbone", type=float,
                   default=None, help="learning rate of the backbone")
    g.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float,
                   default=None, help="AdamW weight decay")
    g.add_argument("--clip-max-norm", "--clip_max_norm", dest="clip_max_norm", type=float,
                   default=None, help="gradient clipping by total norm (0: off)")
    g.add_argument("--num-workers", "--num_workers", dest="num_workers", type=int, default=2,
                   help="data loading processes per training process")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (losses in fp32)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--max-iters", dest="max_iters", type=int, default=None,
                   help="stop each epoch (and evaluation) after this many iterations (smoke runs)")
    g.add_argument("--print-every", dest="print_every", type=int, default=10,
                   help="print the running losses every this many iterations")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to OUTPUT_DIR/tensorboard: every loss "
                        "and KD term, its weight and lr per iteration, AP per epoch (needs the "
                        "tensorboard package)")
    return parser


class ArgumentParser(argparse.ArgumentParser):
    """argparse, recording which options the command line gave: ``args.explicit`` lists their
    destinations, so a recipe or preset never overrides a flag the user typed, even one that
    repeats a default."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        ns.explicit = sorted(self._given(args))
        return ns, extras

    def _given(self, args):
        saved = [(a, a.default) for a in self._actions]
        saved_defaults = self._defaults
        try:  # parse again with every default suppressed: what remains was typed
            for a in self._actions:
                a.default = argparse.SUPPRESS
            self._defaults = {}
            probe, _ = super().parse_known_args(args, argparse.Namespace())
        finally:
            for a, default in saved:
                a.default = default
            self._defaults = saved_defaults
        return set(vars(probe))


# flags whose value, when not given, comes from the recipe, the preset or the variant
RESOLVED_FLAGS = set(MODEL_FLAGS) | {"variant", "with_box_refine", "two_stage", "pretrained",
                                     "batch_size", "epochs", "lr_drop", "lr", "lr_backbone",
                                     "weight_decay", "clip_max_norm"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with the default actually used: its value, or for the settings
    that the recipe, the preset or the variant decide, where the value comes from (the run
    prints every resolved value at start). The description and epilog keep their lines."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default is argparse.SUPPRESS \
                or not action.option_strings or action.required:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text + " (default: off)"  # a switch: given means on
        if action.default is None:
            if action.dest in RESOLVED_FLAGS:
                return text + " (default: the recipe's, the preset's or the variant's; the " \
                              "values used are printed at start)"
            return text + " (default: not set)"
        return text + " (default: %(default)s)"


def epilog_from(doc):
    """The example commands (indented lines that run python or torchrun) and the paper lines of
    a script's docstring, for the end of its --help."""
    lines = (doc or "").splitlines()
    examples = [ln.strip() for ln in lines
                if ln.startswith("    ") and ln.strip().startswith(("python ", "torchrun "))]
    paper = []
    for ln in lines:
        if ln.startswith("Paper:") or (paper and ln.strip() and not ln.startswith(
                ("Official code", "    ")) and len(paper) < 4 and not paper[-1].endswith(").")):
            paper.append(ln.strip())
        elif paper:
            break
    out = []
    if examples:
        out += ["examples:"] + [f"  {e}" for e in examples]
    if paper:
        out += ["", " ".join(paper)]
    return "\n".join(out) or None


def build_parser(doc):
    """The shared flags; ``doc``: the script's docstring (its first line is the description,
    its example commands and paper reference the epilog)."""
    parser = ArgumentParser(description=(doc or "").strip().splitlines()[0],
                            epilog=epilog_from(doc), formatter_class=HelpFormatter)
    add_model_args(parser)
    add_train_args(parser)
    add_data_args(parser)
    return parser


# ------------------------------------------------------------------------------------------
# Resolution: flags > recipe > preset > the variant's defaults
# ------------------------------------------------------------------------------------------

def explicit_flags(args):
    """The destinations given on the command line (``ArgumentParser`` records them); for a
    namespace built another way, every model and training setting that is not None."""
    given = getattr(args, "explicit", None)
    if given is not None:
        return set(given)
    names = list(MODEL_FLAGS) + list(BOOL_MODEL_FLAGS) + list(TRAIN_FLAGS) + [
        "variant", "preset", "recipe", "pretrained"]
    return {n for n in names if getattr(args, n, None) is not None}


def real_data(args):
    return getattr(args, "data", "synthetic") != "synthetic"


def choose_recipe(args, explicit):
    """The recipe of this run (a name or None): ``--recipe``, else on real data the method's
    headline when neither --variant nor --preset is given (and the run is not --eval)."""
    method = getattr(args, "method", None)
    name = args.recipe
    if name == "none":
        return None
    if name is None:
        if not (real_data(args) and method in recipes.HEADLINE and not args.eval
                and "variant" not in explicit and "preset" not in explicit):
            return None
        name = recipes.HEADLINE[method]
        args.recipe_is_headline = True
    recipe = recipes.RECIPES[name]
    if method is not None and recipe.method != method:
        own = ", ".join(n for n, r in recipes.RECIPES.items() if r.method == method)
        raise ValueError(f"--recipe {name} is a recipe of methods/{recipe.method}.py, not of "
                         f"methods/{method}.py; this script's recipes: {own}")
    if getattr(args, "recipe_model", "student") == "teacher" and method is not None:
        raise ValueError("--recipe-model teacher is for methods/baseline.py (it trains the "
                         "teacher a recipe expects); a method script distils the student")
    if args.preset is not None:
        raise ValueError(f"--recipe {name} and --preset {args.preset} both set the model and "
                         f"schedule: a preset is for CPU runs on the embedded data; give one "
                         f"of them (or --recipe none with the preset)")
    return name


def choose_preset(args, explicit, recipe):
    """The CPU preset (a name or None): ``--preset``, else on the embedded data the script's
    default preset (``default_preset``) when no model flag is given. Never by default on real
    data."""
    if args.preset is not None or recipe is not None:
        return args.preset
    model_given = explicit & (set(MODEL_FLAGS) | set(BOOL_MODEL_FLAGS) | {"variant"})
    default = getattr(args, "default_preset", None)
    if default and not real_data(args) and not model_given and not args.eval:
        return default
    return None


def resolve(args, default_variant="deformable_detr", announce=True):
    """Fill every unset setting: flags > recipe > preset > the variant's config. Sets
    ``args.recipe``, ``args.preset``, ``args.variant``, the training settings,
    ``args.model_overrides`` (what build_model gets), ``args.settings`` / ``args.sources``
    (each resolved value and where it came from) and ``args.model_from_flags``. Returns
    (args, model_overrides). ``announce`` prints the recipe line and the settings."""
    explicit = explicit_flags(args)
    args.explicit = sorted(explicit)
    args.recipe_is_headline = False
    recipe_name = choose_recipe(args, explicit)
    args.recipe = recipe_name
    args.preset = choose_preset(args, explicit, recipe_name)
    recipe = recipes.RECIPES[recipe_name] if recipe_name else None
    preset = dict(PRESETS[args.preset]) if args.preset else {}
    sources = {}

    model_group = "teacher" if getattr(args, "recipe_model", "student") == "teacher" \
        else "student"

    def source_of(name, group):
        group = model_group if group == "student" else group
        if recipe is not None and name in getattr(recipe, group):
            return getattr(recipe, group)[name], f"recipe {recipe_name}"
        if name in preset:
            return recipes.Tagged(preset[name], ""), f"preset {args.preset}"
        return None, None

    # the variant
    if args.variant is not None:
        sources["variant"] = "flag"
    else:
        tagged, where = source_of("variant", "student")
        args.variant = tagged.value if tagged else default_variant
        sources["variant"] = f"{where} [{tagged.source}]" if tagged and tagged.source else (
            where or "default")
    cfg = CONFIGS[args.variant]()
    args.model_from_flags = bool(recipe or args.preset or explicit & (
        set(MODEL_FLAGS) | set(BOOL_MODEL_FLAGS) | {"variant"}))

    # model settings
    overrides = {}
    for name in list(MODEL_FLAGS) + list(BOOL_MODEL_FLAGS):
        value = getattr(args, name)
        if value is not None:
            if not hasattr(cfg, name):
                raise ValueError(f"--{name.replace('_', '-')} does not apply to {args.variant}")
            overrides[name], sources[name] = value, "flag"
            continue
        tagged, where = source_of(name, "student")
        if tagged is not None and hasattr(cfg, name):  # a field the variant lacks is skipped
            overrides[name] = tagged.value
            sources[name] = f"{where} [{tagged.source}]" if tagged.source else where
    _resolve_backbone_init(args, cfg, overrides, sources, explicit)

    # training settings
    for name in TRAIN_FLAGS:
        if getattr(args, name) is not None:
            sources[name] = "flag"
            continue
        tagged, where = source_of(name, "train")
        if tagged is not None:
            setattr(args, name, tagged.value)
            sources[name] = f"{where} [{tagged.source}]" if tagged.source else where
        else:
            setattr(args, name, getattr(cfg, name, None) if name != "batch_size" else 2)
            sources[name] = f"{args.variant} default"
    for name in list(MODEL_FLAGS) + list(BOOL_MODEL_FLAGS) + ["pretrained"]:
        sources.setdefault(name, f"{args.variant} default")
    if args.eval and not args.resume:
        raise ValueError("--eval needs --resume CHECKPOINT (the model to evaluate)")
    if args.resume and not os.path.isfile(args.resume):
        raise FileNotFoundError(f"--resume {args.resume}: no such file")
    args.model_overrides = overrides
    sources["recipe"] = ("flag" if "recipe" in explicit else
                         "the method's headline on real data" if recipe_name else "none")
    sources["preset"] = ("flag" if "preset" in explicit else
                         "the default on the embedded data" if args.preset else "none")
    tiny = overrides.get("backbone", cfg.backbone) == "tiny"
    args.settings = {"recipe": recipe_name, "preset": args.preset, "variant": args.variant,
                     **{k: overrides.get(k, getattr(cfg, k, None)) for k in
                        list(MODEL_FLAGS) + list(BOOL_MODEL_FLAGS) + ["pretrained"]
                        if hasattr(cfg, k) and (k != "width" or tiny)},
                     "backbone_init": args.backbone_init,
                     **{k: getattr(args, k) for k in TRAIN_FLAGS}}
    sources.setdefault("backbone_init", sources.get("pretrained", sources.get(
        "backbone_weights", sources.get("backbone", "default"))))
    args.sources = sources
    validate(args)
    if announce:
        announce_settings(args)
    return args, overrides


def _resolve_backbone_init(args, cfg, overrides, sources, explicit):
    """Where the backbone starts: torchvision's ImageNet file for a ResNet (default; checked in
    the cache now, before any data is read), random weights with --no-pretrained, a file with
    --backbone-weights, or (the tiny backbone on the embedded data) crop pretraining. Sets
    ``overrides["pretrained"]`` and ``args.backbone_init``."""
    backbone = overrides.get("backbone", cfg.backbone)
    weights = overrides.get("backbone_weights")
    if weights == "crops" and real_data(args):
        if "backbone_weights" in explicit:
            raise ValueError("--backbone-weights crops pretrains the tiny CPU backbone on object "
                             "crops of the embedded data set only; on real data start a ResNet "
                             "from ImageNet (the default) or give a weights file")
        del overrides["backbone_weights"]  # from a named CPU preset: not on real data
        sources.pop("backbone_weights", None)
        weights = None
        warnings.warn(f"--preset {args.preset} on real data: its tiny backbone starts from "
                      f"random weights (crop pretraining is for the embedded data only)",
                      stacklevel=3)
    pretrained = args.pretrained
    if backbone == "tiny":
        if pretrained:
            raise ValueError("--pretrained loads torchvision's ImageNet weights of a ResNet; "
                             "the tiny backbone has none (--backbone-weights crops or a file)")
        args.backbone_init = ("crop-pretrained (embedded data)" if weights == "crops" else
                              f"file {weights}" if weights else "random")
        return
    if weights is not None:
        if pretrained:
            raise ValueError("--pretrained and --backbone-weights both choose the backbone's "
                             "starting weights: give one")
        args.backbone_init = f"file {weights}"
        return
    if pretrained is False:
        overrides["pretrained"], sources["pretrained"] = False, "flag"
        args.backbone_init = "random (--no-pretrained)"
        if real_data(args) and not args.eval:
            warnings.warn(f"--no-pretrained: the {backbone} backbone starts from random weights; "
                          f"every paper's student and teacher start from ImageNet", stacklevel=3)
        return
    if args.eval or args.resume:  # every weight comes from the checkpoint
        args.backbone_init = f"from the checkpoint {args.resume}"
        return
    path = cached_imagenet_weights(backbone)  # a missing file stops the run here
    overrides["pretrained"] = True
    sources["pretrained"] = "flag" if pretrained else "default (ImageNet)"
    args.backbone_init = f"ImageNet {os.path.basename(path)}"


def announce_settings(args, extra=None):
    """Print the recipe line (which recipe, and that flags override it) and the resolved
    settings with their sources, on the main process. ``extra``: more (name, value, source)
    rows, e.g. the method's loss weights."""
    if not is_main_process():
        return
    if args.recipe:
        r = recipes.RECIPES[args.recipe]
        why = (f"the headline recipe of methods/{r.method}.py on real data"
               if args.recipe_is_headline else "--recipe")
        print(f"recipe: {args.recipe} ({why}): {r.row}; {recipes.PAPERS.get(r.method, '')}. "
              f"Flags given explicitly override its fields; --list-recipes shows all, "
              f"--recipe none turns it off", flush=True)
        total = r.train["batch_size"].value * r.train["gpus"].value
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world * args.batch_size != total and "lr" not in set(args.explicit):
            print(f"note: the recipe's lr {args.lr:g} is for a total batch of {total} "
                  f"({r.train['gpus'].value} GPUs x {r.train['batch_size'].value}); this run's "
                  f"is {world * args.batch_size} ({world} process(es) x {args.batch_size}). "
                  f"Scale --lr and --lr-backbone by {world * args.batch_size}/{total} (linear "
                  f"scaling, README 'Reproducing the papers') or run with the recipe's total",
                  flush=True)
    if args.eval and not args.model_from_flags:
        print(f"settings: evaluation only, the model as {args.resume} records it", flush=True)
        return
    rows = [(k, v, args.sources.get(k, "default")) for k, v in args.settings.items()]
    rows += list(extra or ())
    print("settings:", flush=True)
    for name, value, where in rows:
        print(f"  {name:24s} {value!s:28s} {where}", flush=True)


# ------------------------------------------------------------------------------------------
# --list-recipes
# ------------------------------------------------------------------------------------------

def _ap(tagged):
    return "-" if tagged is None or tagged.value is None else f"{tagged.value} [{tagged.source}]"


def format_recipes(method=None):
    """The recipe table: the script's own recipes (all for methods/baseline.py), each with
    every field and its source, and the papers' AP."""
    names = [n for n, r in recipes.RECIPES.items() if method in (None, r.method)]
    out = ["Recipes (--recipe NAME). Sources: [paper] the paper or the authors' README, [code] "
           "official code or configs, [3p] a third-party re-implementation, [recon] our "
           "reconstruction. lr is for the total batch; AP is COCO val2017 box AP as reported, "
           "not measured here.", ""]
    for name in names:
        r = recipes.RECIPES[name]
        head = " (headline)" if recipes.HEADLINE.get(r.method) == name else ""
        out.append(f"{name}{head}: methods/{r.method}.py, {r.row}")
        for group in ("student", "teacher", "train", "weights"):
            items = getattr(r, group)
            if items:
                out.append(f"  {group:9s} " + ", ".join(f"{k}={v}" for k, v in items.items()))
        total = r.train["batch_size"].value * r.train["gpus"].value
        out.append(f"  {'batch':9s} {r.train['batch_size'].value} per GPU x "
                   f"{r.train['gpus'].value} GPUs = {total}")
        out.append(f"  {'AP':9s} teacher {_ap(r.reported.get('teacher_ap'))}, baseline "
                   f"{_ap(r.reported.get('baseline_ap'))}, distilled "
                   f"{_ap(r.reported.get('distilled_ap'))}"
                   + (f" ({r.source})" if r.source else ""))
        if r.note:
            out.append(f"  {'note':9s} {r.note}")
        out.append("")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------
# Validation of every flag, before anything is loaded or trained
# ------------------------------------------------------------------------------------------

# model settings that must be >= 1 (enc_layers may be 0: the decoder then reads the features)
_AT_LEAST_ONE = ("width", "hidden_dim", "nheads", "dec_layers", "dim_feedforward",
                 "num_queries", "num_feature_levels")
_DATA_PATH_FLAGS = ("coco_path", "train_ann", "train_images", "val_ann", "val_images")


def validate(args):
    """Refuse a bad flag with one line that names it, before any data, model or checkpoint is
    loaded (the setup itself, output folder, data files, checkpoints, is checked by
    common.engine.prepare before the first iteration). Called at the end of ``resolve``."""
    def flag(name):
        return "--" + name.replace("_", "-")

    def need(ok, message):
        if not ok:
            raise ValueError(message)

    for name in ("batch_size", "epochs", "lr_drop", "print_every"):
        value = getattr(args, name, None)
        need(value is None or value >= 1, f"{flag(name)} must be at least 1, got {value}")
    for name in ("max_iters", "threads"):
        value = getattr(args, name, None)
        need(value is None or value >= 1,
             f"{flag(name)} must be at least 1 when given, got {value}")
    for name in ("num_workers", "save_every", "lr_backbone", "weight_decay", "clip_max_norm"):
        value = getattr(args, name, None)
        need(value is None or (value >= 0 and math.isfinite(value)),
             f"{flag(name)} must be a finite number >= 0, got {value}")
    lr = getattr(args, "lr", None)
    need(lr is None or (lr > 0 and math.isfinite(lr)), f"--lr must be a finite number > 0, "
                                                       f"got {lr}")

    # the model: every setting as the model will be built (flags, preset, variant defaults)
    cfg = CONFIGS[args.variant]()
    model = {**{k: getattr(cfg, k) for k in MODEL_FLAGS if hasattr(cfg, k)},
             **getattr(args, "model_overrides", {})}
    for name in _AT_LEAST_ONE:
        if name in model:
            need(model[name] >= 1, f"{flag(name)} must be at least 1, got {model[name]}")
    need(model.get("enc_layers", 0) >= 0,
         f"--enc-layers must be 0 or more, got {model.get('enc_layers')}")
    need(model.get("dn_number", 0) >= 0,
         f"--dn-number must be 0 or more, got {model.get('dn_number')}")
    need(0 <= model.get("dropout", 0.0) < 1,
         f"--dropout must be in [0, 1), got {model.get('dropout')}")
    need(model["hidden_dim"] % model["nheads"] == 0,
         f"--hidden-dim {model['hidden_dim']} must be a multiple of --nheads {model['nheads']} "
         f"(each head gets hidden_dim / nheads channels)")

    # the data flags: a path given for another data set would be silently ignored
    data = getattr(args, "data", "synthetic")
    given = [flag(n) for n in _DATA_PATH_FLAGS if getattr(args, n, None) is not None]
    need(data == "coco" or not given,
         f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --data coco, but the "
         f"data set is --data {data}: add --data coco to train on that folder")
    for name in ("synth_num_train", "synth_num_val"):
        value = getattr(args, name, None)
        need(value is None or value >= 1, f"{flag(name)} must be at least 1, got {value}")
    size, max_size = getattr(args, "image_size", None), getattr(args, "max_size", None)
    need(size is None or size >= 8, f"--image-size must be at least 8 pixels, got {size}")
    need(max_size is None or size is None or max_size >= size,
         f"--max-size {max_size} must be at least --image-size {size}")
    need(not (getattr(args, "overwrite", False) and getattr(args, "resume", None)
              and not getattr(args, "eval", False)),
         "--overwrite starts a new run and --resume continues one: give only one of them")
