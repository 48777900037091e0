"""What the four method scripts share around their distiller: the teacher and the command line.

A method script defines its config, its losses and one *distiller*: an nn.Module with
``.teacher`` (frozen, eval mode, used under no_grad), ``.student``, ``.weight_dict``, and
``forward(images, masks, targets) -> dict`` of named losses (the student's own detection losses
plus each KD term under its own key). Its ``main()`` is

    parser = add_my_method_flags(distill.build_parser(__doc__))  # shared flags + --teacher
    args = distill.resolve(parser.parse_args(argv))
    run = engine.prepare(args)                      # data, student, evaluation
    teacher = distill.load_teacher(args, run)       # frozen; ours or an official file
    stats = engine.train(run, MyDistiller(cfg, teacher, run.student, run.num_classes))
    distill.print_summary(args, run, teacher, stats)

The checkpoint keeps the student (and the method's student-side modules), never the teacher;
its "model" entry loads into ``methods/baseline.py --eval``. The teacher is a checkpoint of this
project or an official one (``--teacher-variant``: built from the training args the file
stores; ``--teacher-arg`` for what they do not say; see ``common.checkpoint.load_detector``),
whose COCO class slots are mapped to the data set's categories. On real data the teacher is
required, and a recipe (common/recipes.py) refuses a teacher of another family than its own.
A distiller's constructor declares the pairs it takes with ``check_pair`` (one family, the
supported variants, the same classes, class loss, feature levels, stride), which refuses the
others naming both variants and the rule.
"""
import argparse
import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

from dataclasses import fields

from torch import nn

from common import cli, recipes
from common.checkpoint import load_detector
from common.data import default_cache_dir
from common.detr import CONFIGS
from common.distributed import is_main_process

BASELINE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "methods", "baseline.py")
# teachers shipped with the repository: <preset>.pth (weights) and <preset>.json (how it was
# trained, its sha256, the cache entry it stands for, its recorded AP); methods/teachers/pack.py
SHIPPED_TEACHERS = os.path.join(os.path.dirname(BASELINE), "teachers")


def build_parser(doc, default_preset="cpu-student"):
    parser = cli.build_parser(doc)
    g = parser.add_argument_group("teacher")
    g.add_argument("--teacher", default=None,
                   help="teacher checkpoint.pth from methods/baseline.py, or an official one "
                        "(with --teacher-variant); on the embedded data a missing teacher is "
                        "trained first (--teacher-preset) and cached")
    g.add_argument("--teacher-preset", dest="teacher_preset", default="cpu-teacher",
                   choices=sorted(cli.PRESETS),
                   help="preset of the teacher trained when --teacher is not given")
    g.add_argument("--baseline", action="store_true",
                   help="also train (or reuse the cached) baseline student: the same student, "
                        "seed and schedule without distillation, shown beside the result. It "
                        "trains beside the distillation, in its own process on 1 CPU thread "
                        "(its output in the cache folder's stdout.txt); it is the cheaper of "
                        "the two, so the distillation keeps --threads")
    g.add_argument("--teacher-variant", dest="teacher_variant", default=None,
                   choices=sorted(CONFIGS),
                   help="--teacher is an official checkpoint (DETR, Conditional DETR, DAB-DETR, "
                        "Deformable DETR, DINO-4scale) of this variant, built from the training "
                        "args the file stores; its 91 COCO class slots are mapped to the data "
                        "set's categories. Checkpoints of this project record their variant: "
                        "leave it unset for those")
    g.add_argument("--teacher-arg", dest="teacher_arg", action="append", default=None,
                   metavar="NAME=VALUE",
                   help="repeatable, with --teacher-variant: a model setting the official file "
                        "was trained with (a field of the variant's config in common/config.py), "
                        "e.g. with_box_refine=true and two_stage=true for Deformable DETR "
                        "+refine / two-stage, dilation=true for DC5, num_queries=300. Only "
                        "needed for what the file's stored training args do not say: those are "
                        "read from the file, and a setting that contradicts them is refused")
    parser.set_defaults(default_preset=default_preset)
    return parser


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
# the official file holds every weight: nothing is loaded into the backbone first
_NOT_TEACHER_ARGS = ("pretrained", "backbone_weights")


def parse_model_args(variant, items):
    """``["with_box_refine=true", "num_queries=300"]`` -> ``{"with_box_refine": True,
    "num_queries": 300}``: model overrides of ``variant``, each value typed by the config
    field's default (bools: true/false, yes/no, on/off, 1/0; tuples: comma-separated)."""
    if variant not in CONFIGS:
        raise ValueError(f"variant must be one of {sorted(CONFIGS)}, got {variant!r}")
    defaults = {f.name: getattr(CONFIGS[variant](), f.name) for f in fields(CONFIGS[variant])}
    out = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ValueError(f"--teacher-arg {item!r}: expected NAME=VALUE, e.g. "
                             f"with_box_refine=true")
        if name in _NOT_TEACHER_ARGS:
            raise ValueError(f"--teacher-arg {name}: the official file holds every weight, "
                             f"the backbone's included")
        if name not in defaults:
            known = ", ".join(n for n in defaults if n not in _NOT_TEACHER_ARGS)
            raise ValueError(f"--teacher-arg {name}: {variant} has no such setting; its "
                             f"settings: {known}")
        default, text = defaults[name], text.strip()
        try:
            if isinstance(default, bool):
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError(f"{text!r} is not true or false")
                value = text.lower() in _TRUE
            elif isinstance(default, tuple):
                value = tuple(type(d)(v) for d, v in zip(default, text.split(","), strict=True))
            elif isinstance(default, (int, float)):
                value = type(default)(text)
            else:
                value = text
        except ValueError as e:
            raise ValueError(f"--teacher-arg {item!r}: {name} takes a "
                             f"{type(default).__name__} like {default!r} ({e})") from None
        out[name] = value
    return out


def resolve(args):
    """cli.resolve (flags > recipe > preset > the variant's defaults: on real data the method's
    headline recipe, on the embedded data the default CPU preset, unless model flags are given
    or the run only evaluates a checkpoint), then the recipe's loss weights as defaults of the
    method's config flags (a flag given explicitly wins), and the teacher's flags: the official
    teacher's ``--teacher-arg`` items become ``args.teacher_overrides``. Prints the resolved
    settings."""
    args, _ = cli.resolve(args, announce=False)
    explicit = set(args.explicit)
    recipe = recipes.RECIPES[args.recipe] if args.recipe else None
    for name in getattr(args, "method_fields", None) or ():
        if name in explicit:
            where = "flag"
        elif recipe is not None and name in recipe.weights:
            tagged = recipe.weights[name]
            setattr(args, name, tagged.value)
            where = f"recipe {args.recipe} [{tagged.source}]"
        else:
            where = f"{args.method} default" if getattr(args, "method", None) else "default"
        args.settings[name], args.sources[name] = getattr(args, name), where
    if recipe is not None:
        t = recipe.teacher
        args.settings["teacher_expected"] = " ".join(
            [t["variant"].value, t["backbone"].value] +
            [k for k in cli.BOOL_MODEL_FLAGS if t.get(k) and t[k].value])
        args.sources["teacher_expected"] = f"recipe {args.recipe}"
    if args.teacher_variant is None and args.teacher_arg:
        raise ValueError("--teacher-arg describes an official teacher checkpoint: it needs "
                         "--teacher-variant")
    if args.teacher_variant is not None and not args.teacher:
        raise ValueError("--teacher-variant is for an official checkpoint given as "
                         "--teacher PATH")
    if cli.real_data(args) and not args.teacher:
        raise ValueError(missing_teacher_message(args))
    args.teacher_overrides = parse_model_args(args.teacher_variant, args.teacher_arg) \
        if args.teacher_variant is not None else {}
    if (args.teacher and args.output_dir and not args.eval and os.path.isdir(args.output_dir)
            and os.path.samefile(args.output_dir,
                                 os.path.dirname(os.path.abspath(args.teacher)))):
        raise ValueError(f"--output-dir {args.output_dir} is the folder of the teacher "
                         f"{args.teacher}: the student's checkpoint would replace it; choose "
                         f"another folder")
    if args.teacher_variant is not None:
        check_teacher_fits_recipe(args, args.teacher_variant)
    cli.announce_settings(args)
    return args


def missing_teacher_message(args):
    text = "--teacher PATH is required with --data coco"
    if args.recipe:
        t = recipes.RECIPES[args.recipe].teacher
        flags = " ".join(f"--{k.replace('_', '-')}" for k in cli.BOOL_MODEL_FLAGS
                         if t.get(k) and t[k].value)
        text += (f": the recipe {args.recipe} expects a {t['variant'].value} "
                 f"{t['backbone'].value} teacher, an official checkpoint (--teacher FILE "
                 f"--teacher-variant {t['variant'].value}) or one trained with "
                 f"methods/baseline.py --data coco --variant {t['variant'].value} --backbone "
                 f"{t['backbone'].value} {flags}".rstrip() + ")")
    else:
        text += " (train a teacher with methods/baseline.py first)"
    return text


def check_teacher_fits_recipe(args, teacher_variant):
    """A recipe distils a student of one family from a teacher of the same family; a teacher
    of another family is refused with the flags that choose a fitting student."""
    if not args.recipe:
        return
    r = recipes.RECIPES[args.recipe]
    expected = r.teacher["variant"].value
    if teacher_variant == expected:
        return
    fitting = [n for n, x in recipes.RECIPES.items()
               if x.method == r.method and x.teacher["variant"].value == teacher_variant]
    choose = (f"--recipe {' or --recipe '.join(fitting)}" if fitting else
              f"--recipe none --variant {teacher_variant} (with the student's size flags)")
    raise ValueError(f"the recipe {args.recipe} distils a {r.student['variant'].value} student "
                     f"from a {expected} teacher, but the teacher is a {teacher_variant}: pass "
                     f"{choose}, or a {expected} teacher")


def add_config_args(parser, config_cls, title, help=None, choices=None, flags=None):
    """One flag per field of a method's config dataclass, defaulting to the dataclass's value:
    booleans as ``--name`` / ``--no-name``, the rest typed by the field (an Optional[int] field
    parses ints). ``help`` maps field names to help texts (else the field's metadata "help"),
    ``choices`` to allowed values, ``flags`` to a flag name other than the field's."""
    g = parser.add_argument_group(title)
    default = config_cls()
    method = next((m for m, c in recipes.METHOD_CONFIGS.items() if c == config_cls.__name__),
                  None)
    parser.set_defaults(method=method, method_fields=[f.name for f in fields(config_cls)])
    for f in fields(config_cls):
        flag = "--" + (flags or {}).get(f.name, f.name.replace("_", "-"))
        value = getattr(default, f.name)
        text = (help or {}).get(f.name) or f.metadata.get("help", " ")
        if isinstance(value, bool):
            g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                           default=value, help=text)
        else:
            typ = f.type if f.type in (int, float, str) else (
                type(value) if value is not None else int)
            g.add_argument(flag, dest=f.name, type=typ, default=value,
                           choices=(choices or {}).get(f.name), help=text)
    return g


def config_from_args(config_cls, args):
    return config_cls(**{f.name: getattr(args, f.name) for f in fields(config_cls)})


def teacher_layer_map(num_student: int, num_teacher: int, mode: str = "ceil"):
    """The 0-based teacher decoder layer each student layer learns from. ``ceil``: student
    layer i (1-based) -> teacher layer ceil(i L_T / L_S), monotonic, last -> last (DETRDistill's
    rule, used by every method here); ``last``: the last L_S teacher layers. Both are l -> l
    when the depths are equal."""
    if mode == "ceil":
        return [-(-(i + 1) * num_teacher // num_student) - 1 for i in range(num_student)]
    if mode == "last":
        if num_student > num_teacher:
            raise ValueError(f"layer_map='last' needs no more student decoder layers "
                             f"({num_student}) than teacher layers ({num_teacher}); use 'ceil'")
        return list(range(num_teacher - num_student, num_teacher))
    raise ValueError(f"layer_map must be 'ceil' or 'last', got {mode!r}")


def check_pair(method, teacher, student, *, supported, supported_reason=None,
               same_variant=True, same_classes=True, same_class_loss=True,
               same_levels=None, same_stride=None):
    """Refuse a teacher/student pair ``method`` cannot distil, with a ValueError naming both
    variants and the rule broken. Each rule is off (False/None), on (True), or on with its
    reason (a str, shown in the message):

    supported        both variants are among these (``supported_reason``: why not the others)
    same_variant     one DETR family
    same_classes     the same number of classes
    same_class_loss  the same class loss (softmax or focal)
    same_levels      the same num_feature_levels (1 for single-scale models)
    same_stride      single-scale models: the same backbone stride (dilation, DC5)

    The rules are checked in this order: family, support, classes, class loss, levels, stride."""
    def why(rule):
        return f" ({rule})" if isinstance(rule, str) else ""

    tv, sv = teacher.variant, student.variant
    pair = f"teacher {tv} -> student {sv}"
    if same_variant and tv != sv:
        raise ValueError(f"{method} needs teacher and student of the same DETR "
                         f"family{why(same_variant)}; got {pair}")
    unsupported = [v for v in dict.fromkeys((tv, sv)) if v not in supported]
    if unsupported:
        raise ValueError(f"{method} does not support {pair}{why(supported_reason)}: "
                         f"{'the family' if same_variant else 'both'} must be one of "
                         f"{', '.join(supported)}, not {', '.join(unsupported)}")
    if same_classes and teacher.num_classes != student.num_classes:
        raise ValueError(f"{method} needs teacher and student of the same classes"
                         f"{why(same_classes)}: teacher {tv} has {teacher.num_classes} classes, "
                         f"student {sv} has {student.num_classes}")
    if same_class_loss and teacher.cfg.class_loss != student.cfg.class_loss:
        raise ValueError(f"{method} needs teacher and student of the same class loss"
                         f"{why(same_class_loss)}: teacher {tv} uses {teacher.cfg.class_loss}, "
                         f"student {sv} uses {student.cfg.class_loss}")
    lv_t, lv_s = (getattr(m.cfg, "num_feature_levels", 1) for m in (teacher, student))
    if same_levels and lv_t != lv_s:
        raise ValueError(f"{method} needs teacher and student of the same num_feature_levels"
                         f"{why(same_levels)}: teacher {tv} has {lv_t}, student {sv} has {lv_s}")
    single_scale = not any(hasattr(m.cfg, "num_feature_levels") for m in (teacher, student))
    if same_stride and single_scale and teacher.cfg.dilation != student.cfg.dilation:
        raise ValueError(f"{method} needs teacher and student of the same stride"
                         f"{why(same_stride)}: teacher {tv} has dilation={teacher.cfg.dilation}, "
                         f"student {sv} has dilation={student.cfg.dilation} (DC5 halves the "
                         f"stride)")


def freeze(model: nn.Module) -> nn.Module:
    """The teacher: eval mode (no dropout, no denoising groups) and no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(args, run):
    """The frozen teacher of this run (``--teacher``, or on the embedded data the cached one,
    trained first when missing), its COCO class slots mapped to the data set's categories for
    an official file; with ``--baseline`` the baseline student is trained (or reused) too."""
    path = ensure_teacher(args)
    teacher = freeze(load_detector(
        path, run.num_classes, run.device, variant=args.teacher_variant,
        overrides=args.teacher_overrides, category_ids=run.dataset_train.label_to_category))
    check_teacher_fits_recipe(args, teacher.variant)
    teacher.path = path
    if args.baseline and not args.eval and run.info.is_main:
        start_baseline(args)  # the same student without distillation, for the summary
    return teacher


def teacher_cache_path(args):
    """Where the embedded data's teacher for these data settings and preset is cached."""
    key = {k: getattr(args, k) for k in ("synth", "synth_seed", "synth_num_train",
                                         "synth_num_val", "image_size", "max_size", "max_iters")}
    key.update(teacher_preset=args.teacher_preset, preset=cli.PRESETS[args.teacher_preset],
               seed=args.seed)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    root = args.data_cache or str(default_cache_dir())
    return os.path.join(root, "teachers", f"{args.teacher_preset}-{digest}", "checkpoint.pth")


def shipped_teacher(args):
    """The description (<preset>.json) of the teacher shipped in methods/teachers/ when it was
    trained with exactly this run's teacher settings (preset, seed, embedded-data settings: the
    same cache entry), else None."""
    meta_path = os.path.join(SHIPPED_TEACHERS, f"{args.teacher_preset}.json")
    if args.data != "synthetic" or not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        meta = json.load(f)
    name = os.path.basename(os.path.dirname(teacher_cache_path(args)))
    return meta if meta.get("cache_name") == name else None


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def install_shipped_teacher(meta, path):
    """Copy the shipped teacher (checked against its recorded sha256) and its training log into
    the cache entry ``path`` it stands for; the entry appears whole or not at all."""
    src = os.path.join(SHIPPED_TEACHERS, meta["file"])
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} is missing (its description {meta['file']} is there): "
                                f"restore it from the repository, or pass --teacher")
    digest = file_sha256(src)
    if digest != meta["sha256"]:
        raise ValueError(f"{src} has sha256 {digest}, not the recorded {meta['sha256']}: the "
                         f"file is damaged or was replaced; restore it from the repository")
    folder = os.path.dirname(path)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".shipped-", dir=os.path.dirname(folder))
    try:
        shutil.copyfile(src, os.path.join(work, "checkpoint.pth"))
        with open(os.path.join(work, "log.txt"), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in meta.get("log", []))
        try:
            os.replace(work, folder)
        except OSError:
            if not os.path.isfile(path):  # a real failure, not another process finishing first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def ensure_teacher(args):
    """The teacher checkpoint: --teacher, or on the embedded data the cached one; when none is
    cached, the teacher shipped in methods/teachers/ if it was trained with this run's teacher
    settings (copied into the cache), else one trained now with methods/baseline.py (its output
    is shown as it runs)."""
    if args.teacher:
        if not os.path.isfile(args.teacher):
            raise FileNotFoundError(f"--teacher {args.teacher}: no such file")
        return args.teacher
    if args.data != "synthetic":
        raise ValueError(missing_teacher_message(args))
    path = teacher_cache_path(args)
    if os.path.isfile(path):
        print(f"teacher: cached at {path}", flush=True)
        return path
    meta = shipped_teacher(args)
    if meta is not None:
        install_shipped_teacher(meta, path)
        stats = meta.get("recorded", {})
        print(f"teacher: the one shipped in methods/teachers/{meta['file']} (AP "
              f"{stats.get('AP', float('nan')):.3f}, AP50 {stats.get('AP50', float('nan')):.3f} "
              f"when it was trained; trained with: {meta['command']}), cached at {path}",
              flush=True)
        return path
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        raise ValueError(f"no cached teacher at {path}: run the same command once without "
                         f"torchrun to train it, or pass --teacher")
    folder = os.path.dirname(path)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".training-", dir=os.path.dirname(folder))
    cmd = [sys.executable, BASELINE, "--preset", args.teacher_preset, "--output-dir", work,
           "--seed", str(args.seed), "--device", args.device, "--num-workers",
           str(args.num_workers), "--synth", args.synth, "--synth-seed", str(args.synth_seed),
           "--synth-num-train", str(args.synth_num_train), "--synth-num-val",
           str(args.synth_num_val)]
    for flag, value in (("--data-cache", args.data_cache), ("--image-size", args.image_size),
                        ("--max-size", args.max_size), ("--threads", args.threads),
                        ("--max-iters", args.max_iters)):
        if value is not None:
            cmd += [flag, str(value)]
    print(f"teacher: none cached; training one with {' '.join(cmd[1:])}", flush=True)
    try:
        subprocess.run(cmd, check=True)
        os.replace(work, folder)  # the cache entry appears whole or not at all
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------------
# The summary a method script ends with: teacher, baseline student, distilled student
# ------------------------------------------------------------------------------------------

_STUDENT_KEYS = ("variant", "model_overrides", "epochs", "lr", "lr_backbone", "lr_drop",
                 "weight_decay", "clip_max_norm", "batch_size", "seed", "synth", "synth_seed",
                 "synth_num_train", "synth_num_val", "image_size", "max_size", "max_iters")


def baseline_cache_path(args):
    """Where the baseline student of these settings (same student, seed and schedule) is
    cached when the data is the embedded set."""
    key = {k: getattr(args, k, None) for k in _STUDENT_KEYS}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    root = args.data_cache or str(default_cache_dir())
    return os.path.join(root, "baselines", f"{args.variant}-{digest[:12]}", "checkpoint.pth")


_BASELINE_JOB = {}  # the baseline student training beside this process: path -> (process, folders)


def _baseline_command(args, output_dir, threads):
    """methods/baseline.py with this run's student, schedule, seed and data flags."""
    cmd = [sys.executable, BASELINE, "--variant", args.variant, "--output-dir", output_dir]
    for name, value in args.model_overrides.items():
        flag = "--" + name.replace("_", "-")
        cmd += ([flag] if value is True else [f"--no-{flag[2:]}"] if value is False
                else [flag, str(value)])
    for name in ("epochs", "lr", "lr_backbone", "lr_drop", "weight_decay", "clip_max_norm",
                 "batch_size", "seed", "synth", "synth_seed", "synth_num_train",
                 "synth_num_val", "image_size", "max_size", "max_iters", "data_cache",
                 "device", "num_workers"):
        value = getattr(args, name, None)
        if value is not None:
            cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd + ["--threads", str(threads)]


def start_baseline(args):
    """Start training the baseline student with methods/baseline.py (same flags, no
    distillation, 1 CPU thread) in a process beside this one, unless it is cached;
    ``wait_for_baseline`` collects it. Returns the checkpoint path it will have."""
    path = baseline_cache_path(args)
    if os.path.isfile(path) or path in _BASELINE_JOB:
        return path
    folder = os.path.dirname(path)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    work = tempfile.mkdtemp(prefix=".training-", dir=os.path.dirname(folder))
    cmd = _baseline_command(args, work, threads=1)
    out = os.path.join(work, "stdout.txt")
    print(f"baseline student: none cached; training it beside the distillation (1 thread, "
          f"output in {out}): {' '.join(cmd[1:])}", flush=True)
    with open(out, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    _BASELINE_JOB[path] = (proc, work, folder)
    atexit.register(_stop_baseline, proc, work)  # a distillation that stops early stops it too
    return path


def _stop_baseline(proc, work):
    if proc.poll() is None:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)


def wait_for_baseline(args):
    """Wait for the baseline student started by ``start_baseline`` and move it into the cache;
    returns its checkpoint path, or None when it failed (its output is named)."""
    path = baseline_cache_path(args)
    if path not in _BASELINE_JOB:
        return path if os.path.isfile(path) else None
    proc, work, folder = _BASELINE_JOB.pop(path)
    if proc.poll() is None:
        print("baseline student: waiting for it to finish ...", flush=True)
    if proc.wait() != 0:
        print(f"baseline student: training failed (exit {proc.returncode}); its output is in "
              f"{os.path.join(work, 'stdout.txt')}", flush=True)
        return None
    os.replace(work, folder)
    return path


def last_log_line(checkpoint_path):
    """The last JSON line of the log.txt beside a checkpoint (None when there is none)."""
    log = os.path.join(os.path.dirname(checkpoint_path), "log.txt")
    if not os.path.isfile(log):
        return None
    with open(log) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else None


def teacher_stats(teacher_path, evaluate_teacher, args):
    """The teacher's COCO stats on this validation set, cached beside its checkpoint; the key
    holds the data flags and the teacher file's size and modification time, so a replaced
    teacher is evaluated again."""
    st = os.stat(teacher_path)
    key = {k: getattr(args, k, None) for k in (
        "data", "coco_path", "val_ann", "val_images", "synth", "synth_seed", "synth_num_val",
        "image_size", "max_size", "max_iters")}
    key["teacher"] = [os.path.basename(teacher_path), st.st_size, st.st_mtime_ns]
    key = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    cache = os.path.join(os.path.dirname(teacher_path), f"eval-{key}.json")
    if os.path.isfile(cache):
        with open(cache) as f:
            return json.load(f)
    stats = evaluate_teacher()
    try:
        with open(cache, "w") as f:
            json.dump(stats, f)
    except OSError:  # a read-only teacher folder: evaluate again next time
        pass
    return stats


def print_summary(args, run, teacher, student_stats):
    """Teacher, baseline student (when cached) and distilled student AP after training; the
    teacher's stats are computed on every process (the evaluation gathers), printed on one."""
    if args.eval or not student_stats:
        return
    t_stats = teacher_stats(teacher.path, lambda: run.evaluate(teacher), args)
    if not is_main_process():
        return
    rows = [("teacher", t_stats.get("AP"), t_stats.get("AP50"))]
    baseline = wait_for_baseline(args) if args.data == "synthetic" else None
    if baseline is not None:
        last = last_log_line(baseline) or {}
        rows.append(("baseline student", last.get("test_AP"), last.get("test_AP50")))
    rows.append(("distilled student", student_stats.get("test_AP"),
                 student_stats.get("test_AP50")))
    print(f"\n{'':20s} {'AP':>7s} {'AP50':>7s}")
    for name, ap, ap50 in rows:
        fmt = lambda v: f"{v:7.4f}" if isinstance(v, (int, float)) else f"{'-':>7s}"  # noqa
        print(f"{name:20s} {fmt(ap)} {fmt(ap50)}")
    print(flush=True)
