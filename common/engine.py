"""The one training loop shared by methods/baseline.py and every distillation method.

What it trains is a *training module*: an nn.Module whose ``forward(images, masks, targets)``
returns a dict of named, unweighted losses, with

    .weight_dict   {loss name: weight}; the loss that is minimised is
                   sum(losses[k] * weight_dict[k] for k in losses if k in weight_dict)
    .student       the detector that is evaluated and deployed (for methods/baseline.py the
                   detector itself, for a distiller the student; a teacher is never saved)

Conventions kept from the DETR repositories: ``--output-dir`` holds ``checkpoint.pth`` (model,
optimizer, lr_scheduler, epoch, args, RNG state) and ``log.txt`` (one JSON line per epoch);
``--resume PATH`` continues exactly where the checkpoint stopped; torchrun sets RANK /
WORLD_SIZE / LOCAL_RANK and we run single-process when they are unset.

Exact resume: the data order of epoch e depends only on (seed, e) (a DistributedSampler seeded
with the run's seed, the loader's generator seeded with (seed, e, rank)), and every RNG the model
and the augmentations draw from (torch CPU and CUDA, numpy, random) is saved in the checkpoint
and restored, so an interrupted run resumed from epoch k ends bit-for-bit where an uninterrupted
run ends (on CPU; CUDA atomics make the last digits noisy on GPU).
"""
import datetime
import json
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# ------------------------------------------------------------------------------------------
# Distributed
# ------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device="auto") -> DistInfo:
    """Set up torch.distributed from torchrun's environment; one process when it is unset.

    ``device``: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N". nccl on CUDA, gloo on
    CPU. Each process uses the GPU of its LOCAL_RANK.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local_rank, device)


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process():
    """True in a single-process run and on rank 0 of a torchrun job (read from torchrun's RANK,
    so it holds before and after the process group exists): where one-off outputs, e.g. a
    script's --visualize figures, are written."""
    return int(os.environ.get("RANK", 0)) == 0


def reduce_mean(values: dict) -> dict:
    """Average a dict of floats over processes (for logging only)."""
    if world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: v / world_size() for k, v in zip(keys, t.tolist())}


# ------------------------------------------------------------------------------------------
# Seeds, RNG state, data loaders
# ------------------------------------------------------------------------------------------

def seed_everything(seed: int, rank: int = 0):
    """Seed torch, numpy and random; each process gets its own stream (seed + rank)."""
    s = seed + rank
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_loader(dataset, batch_size, collate_fn, *, train, seed=0, num_workers=0,
                dist_info: DistInfo = None):
    """A DataLoader whose order depends only on (seed, epoch): call ``loader.set_epoch(e)``.

    Every process reads its own shard (DistributedSampler also with one process, so one and N
    processes see the same global batches: N x batch b covers what 1 x batch N*b covers).
    """
    info = dist_info or DistInfo()
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=train, seed=seed,
        drop_last=False)
    batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=train)
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler,
                                         collate_fn=collate_fn, num_workers=num_workers,
                                         generator=generator)

    def set_epoch(epoch):
        sampler.set_epoch(epoch)
        generator.manual_seed(seed * 1_000_003 + epoch * 1009 + info.rank)

    loader.set_epoch = set_epoch
    set_epoch(0)
    return loader


# ------------------------------------------------------------------------------------------
# Optimiser
# ------------------------------------------------------------------------------------------

def param_groups(module, lr, lr_backbone, lr_linear_proj_mult=0.1,
                 linear_proj_names=("sampling_offsets", "reference_points")):
    """AdamW groups as in Deformable DETR: backbone at ``lr_backbone``, the deformable
    attention's sampling-offset and reference-point projections at ``lr * lr_linear_proj_mult``,
    everything else at ``lr``. Frozen parameters (requires_grad False) are left out."""
    groups = {"backbone": [], "linear_proj": [], "rest": []}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if "backbone." in name:
            groups["backbone"].append(p)
        elif any(k in name for k in linear_proj_names):
            groups["linear_proj"].append(p)
        else:
            groups["rest"].append(p)
    out = [{"params": groups["rest"], "lr": lr, "name": "rest"}]
    if groups["backbone"]:
        out.append({"params": groups["backbone"], "lr": lr_backbone, "name": "backbone"})
    if groups["linear_proj"]:
        out.append({"params": groups["linear_proj"], "lr": lr * lr_linear_proj_mult,
                    "name": "linear_proj"})
    return out


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------

def save_checkpoint(obj, path):
    """torch.save to ``path`` atomically: a temporary file in the same folder, fsync, rename.
    A crash mid-write leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file named
        raise RuntimeError(f"could not read checkpoint {path}: {e}") from e


def check_state_fits(module, state, what="checkpoint"):
    """Refuse a state dict from a different model with a message that names the differences
    (missing/unexpected keys, mismatched shapes), instead of load_state_dict's strict error
    deep in a stack trace or a silent strict=False."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def head(xs):
            return ", ".join(xs[:5]) + (f" (+{len(xs) - 5} more)" if len(xs) > 5 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} keys missing from the {what}: {head(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} keys the model does not have: {head(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} shapes differ: {head(shapes)}")
        raise ValueError(f"the {what} does not fit this model (was it made with another "
                         f"variant or size?): " + "; ".join(parts))


def unwrap(module):
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) \
        else module


def trainable_state(module):
    """What a checkpoint keeps of a training module: the student, and the other trainable
    (student-side) modules; never the teacher."""
    m = unwrap(module)
    extra = {k: v for k, v in m.state_dict().items()
             if not k.startswith("student.") and not k.startswith("teacher.")}
    return {"model": m.student.state_dict(), "extra": extra}


def load_trainable_state(module, ckpt, what):
    m = unwrap(module)
    check_state_fits(m.student, ckpt["model"], what)
    state = m.state_dict()  # the teacher's entries stay as they are
    extra = ckpt.get("extra", {})
    unknown = sorted(set(extra) - set(state))
    if unknown:
        raise ValueError(f"the {what} has student-side modules this run does not have: "
                         f"{', '.join(unknown[:5])}")
    state.update({f"student.{k}": v for k, v in ckpt["model"].items()})
    state.update(extra)
    m.load_state_dict(state)


# ------------------------------------------------------------------------------------------
# Training and evaluation
# ------------------------------------------------------------------------------------------

class SmoothedLog:
    """Running means of named floats with a one-line progress print."""

    def __init__(self, total, header, every, enabled):
        self.sums, self.count, self.total = {}, 0, total
        self.header, self.every, self.enabled = header, every, enabled
        self.start = time.time()

    def update(self, values):
        self.count += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        if self.enabled and (self.count % self.every == 0 or self.count == self.total):
            elapsed = time.time() - self.start
            eta = elapsed / self.count * (self.total - self.count)
            shown = " ".join(f"{k} {v / self.count:.4f}" for k, v in self.sums.items()
                             if k == "loss" or k == "lr" or not k.startswith("loss_") or
                             k.count("_") <= 1)
            print(f"{self.header} [{self.count}/{self.total}] {shown} "
                  f"eta {datetime.timedelta(seconds=int(eta))}", flush=True)

    def means(self):
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def to_device(images, masks, targets, device):
    images = images.to(device, non_blocking=True).contiguous()  # NCHW, never channels-last
    masks = masks.to(device, non_blocking=True)
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in t.items()} for t in targets]
    return images, masks, targets


def train_one_epoch(module, loader, optimizer, device, epoch, *, clip_max_norm=0.1, amp=False,
                    print_every=10, max_iters=None, verbose=True):
    """One pass over ``loader``; returns the epoch means of the losses (averaged over
    processes), the weighted total under "loss" and the learning rate under "lr"."""
    module.train()
    teacher = getattr(unwrap(module), "teacher", None)
    if teacher is not None:
        teacher.eval()  # the frozen teacher never trains: no dropout, no denoising groups
    weight_dict = unwrap(module).weight_dict
    n = len(loader) if max_iters is None else min(len(loader), max_iters)
    log = SmoothedLog(n, f"Epoch [{epoch}]", print_every, verbose)
    iter_times, t_last = [], time.perf_counter()
    for it, (images, masks, targets) in enumerate(loader):
        if it >= n:
            break
        images, masks, targets = to_device(images, masks, targets, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                            enabled=amp and device.type == "cuda"):
            losses = module(images, masks, targets)
        loss = sum(losses[k].float() * weight_dict[k] for k in losses if k in weight_dict)
        if not torch.isfinite(loss):
            bad = {k: float(v) for k, v in losses.items() if not torch.isfinite(v)}
            raise FloatingPointError(f"epoch {epoch} iteration {it}: the loss is {float(loss.detach())}; "
                                     f"non-finite terms: {bad or 'none (overflow in the sum)'}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_max_norm and clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip_max_norm)
        optimizer.step()
        log.update({"loss": loss.item(), **{k: v.item() for k, v in losses.items()},
                    "lr": optimizer.param_groups[0]["lr"]})
        now = time.perf_counter()
        iter_times.append(now - t_last)  # data loading included
        t_last = now
    stats = reduce_mean(log.means())
    # median seconds per iteration (the first is left out: warm-up) and the peak memory so far
    stats["iter_time_s"] = float(np.median(iter_times[1:] or iter_times or [0.0]))
    stats["peak_mem_mb"] = peak_memory_mb(device)
    return stats


def peak_memory_mb(device):
    """Peak memory of this process: CUDA memory allocated by torch on a GPU, else the peak
    resident set size of the process (Linux and macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, else KiB


@torch.no_grad()
def evaluate(model, postprocess, loader, evaluator, device, *, amp=False, max_iters=None):
    """COCO evaluation of ``model`` over ``loader``: post-processed detections of every process
    are gathered by ``evaluator`` (common.evaluate.CocoEvaluator) and scored with COCOeval."""
    model.eval()
    evaluator.reset()
    for it, (images, masks, targets) in enumerate(loader):
        if max_iters is not None and it >= max_iters:
            break
        images, masks, targets = to_device(images, masks, targets, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                            enabled=amp and device.type == "cuda"):
            outputs = model(images, masks)
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        evaluator.update(targets, postprocess(fp32(outputs), orig_sizes))
    return evaluator.summarize(verbose=False)


def fp32(x):
    """Cast the floating tensors of a (nested) output structure to float32: matcher, losses and
    post-processing run in fp32 under AMP."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: fp32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(fp32(v) for v in x)
    return x


def fit(module, optimizer, lr_scheduler, train_loader, *, args, dist_info, evaluate_fn=None,
        output_dir=None, start_epoch=0, epochs=1, clip_max_norm=0.1, amp=False, max_iters=None,
        print_every=10, verbose=True):
    """Train epochs [start_epoch, epochs); after each: evaluate, write log.txt and an atomic
    checkpoint.pth. ``evaluate_fn(student) -> dict`` returns the COCO stats (or None)."""
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if verbose and dist_info.is_main:
        print(f"trainable parameters: {n_params:,}; total batch size "
              f"{dist_info.world_size} x {train_loader.batch_sampler.batch_size}", flush=True)
    stats = {}
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        train_loader.set_epoch(epoch)
        train_stats = train_one_epoch(module, train_loader, optimizer, dist_info.device, epoch,
                                      clip_max_norm=clip_max_norm, amp=amp,
                                      print_every=print_every, max_iters=max_iters,
                                      verbose=verbose and dist_info.is_main)
        lr_scheduler.step()
        test_stats = evaluate_fn(unwrap(module).student) if evaluate_fn else None
        stats = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                 **{f"test_{k}": v for k, v in (test_stats or {}).items()},
                 "n_parameters": n_params, "epoch_time_s": round(time.time() - t0, 2)}
        if output_dir and dist_info.is_main:
            save_checkpoint({**trainable_state(module), "optimizer": optimizer.state_dict(),
                             "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch,
                             "args": dict(vars(args)) if args is not None else {},
                             "rng": get_rng_state()},
                            os.path.join(output_dir, "checkpoint.pth"))
            with open(os.path.join(output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(stats) + "\n")
    return stats


def resume(module, optimizer, lr_scheduler, path):
    """Restore a checkpoint written by ``fit``; returns the epoch to start from. Refuses a
    checkpoint of another model with a message naming what differs."""
    ckpt = load_checkpoint(path)
    for key in ("model", "optimizer", "lr_scheduler", "epoch", "rng"):
        if key not in ckpt:
            raise ValueError(f"{path} is not a training checkpoint of this project (no "
                             f"'{key}' entry); for weights only, use the model loader")
    load_trainable_state(module, ckpt, f"checkpoint {path}")
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]) + 1


def backbone_weights_ready(args, info, dataset_train, dataset_val):
    """``args.model_overrides`` with ``backbone_weights="crops"`` (the CPU presets) replaced by
    the path of the cached crop-pretrained tiny backbone (common/pretrain.py), which the main
    process trains first when it is missing."""
    overrides = dict(args.model_overrides)
    if overrides.get("backbone_weights") != "crops":
        return overrides
    from common.data import default_cache_dir
    from common.detr import CONFIGS
    from common.pretrain import ensure_crop_pretrained
    cfg = CONFIGS[args.variant]()
    if overrides.get("backbone", cfg.backbone) != "tiny":
        raise ValueError("--backbone-weights crops pretrains the 'tiny' backbone only; give a "
                         "weights file for a ResNet")
    width = overrides.get("width", cfg.width)
    root = args.data_cache or default_cache_dir()
    if info.is_main:
        try:
            path = ensure_crop_pretrained(dataset_train, dataset_val, width, root)
        finally:
            if info.distributed:
                dist.barrier()               # the others wait until it is cached (or failed)
    else:
        dist.barrier()
        path = ensure_crop_pretrained(dataset_train, dataset_val, width, root, verbose=False)
    overrides["backbone_weights"] = path
    return overrides


def run_training(args, build_module, teacher_path=None):
    """The job of methods/baseline.py and of every method script: data, (teacher,) student,
    the training module, COCO evaluation, then ``fit`` (or ``--eval`` only).

    ``build_module(student, num_classes, teacher) -> training module`` (see the top of this
    file); ``teacher`` is None for the baseline, else the frozen teacher loaded from
    ``teacher_path``. Returns the last epoch's stats (or the evaluation's, with --eval).
    """
    from common.criterion import build_postprocess
    from common.data import build_dataset, collate
    from common.detr import build_model
    from common.distill import freeze, load_detector
    from common.evaluate import CocoEvaluator

    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    seed_everything(args.seed, info.rank)
    dataset_train = build_dataset("train", args)
    dataset_val = build_dataset("val", args)
    num_classes = dataset_train.num_classes
    if args.eval and not args.model_from_flags:
        student = load_detector(args.resume, num_classes, info.device)  # as the checkpoint says
    else:
        student = build_model(args.variant, num_classes,
                              **backbone_weights_ready(args, info, dataset_train,
                                                       dataset_val)).to(info.device)
    teacher = None
    if teacher_path is not None:
        teacher = freeze(load_detector(
            teacher_path, num_classes, info.device, variant=getattr(args, "teacher_variant", None),
            overrides=getattr(args, "teacher_overrides", None),
            category_ids=dataset_train.label_to_category))  # an official file's COCO slots
        if getattr(args, "baseline", False) and not args.eval and info.is_main:
            from common.distill import ensure_baseline
            ensure_baseline(args)  # the same student without distillation, for the summary
    module = build_module(student, num_classes, teacher).to(info.device)
    if teacher is not None and any(p.requires_grad for p in module.teacher.parameters()):
        raise RuntimeError("the teacher must stay frozen")
    postprocess = build_postprocess(student)
    if info.is_main:
        what = ", ".join(f"{k}={v}" for k, v in student.cfg.__dict__.items()
                         if k in args.model_overrides)
        print(f"{'student' if teacher else 'model'}: {student.variant} ({what}), "
              f"{num_classes} classes, device "
              f"{info.device}, world size {info.world_size}" +
              (f"; teacher: {teacher.variant} from {teacher_path}" if teacher else ""),
              flush=True)

    val_loader = make_loader(dataset_val, args.batch_size, collate, train=False,
                             num_workers=args.num_workers, dist_info=info)
    evaluator = CocoEvaluator.from_dataset(dataset_val)

    def evaluate_fn(model):
        return evaluate(model, postprocess, val_loader, evaluator, info.device, amp=args.amp,
                        max_iters=args.max_iters)

    optimizer = torch.optim.AdamW(
        param_groups(module, args.lr, args.lr_backbone, student.cfg.lr_linear_proj_mult),
        weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    start_epoch = 0
    if args.resume and args.eval:
        ckpt = load_checkpoint(args.resume)
        if "model" not in ckpt:
            raise ValueError(f"{args.resume} has no 'model' entry")
        check_state_fits(student, ckpt["model"], f"checkpoint {args.resume}")
        student.load_state_dict(ckpt["model"])
    elif args.resume:
        start_epoch = resume(module, optimizer, lr_scheduler, args.resume)
    if args.eval:
        stats = evaluate_fn(student)
        if info.is_main:
            print("eval: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()), flush=True)
        return stats

    if info.distributed:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    train_loader = make_loader(dataset_train, args.batch_size, collate, train=True,
                               seed=args.seed, num_workers=args.num_workers, dist_info=info)
    stats = fit(module, optimizer, lr_scheduler, train_loader, args=args, dist_info=info,
                evaluate_fn=evaluate_fn, output_dir=args.output_dir, start_epoch=start_epoch,
                epochs=args.epochs, clip_max_norm=args.clip_max_norm, amp=args.amp,
                max_iters=args.max_iters, print_every=args.print_every)
    if info.is_main and stats:
        print("final: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()
                                   if k.startswith("test_")), flush=True)
    if teacher is not None and stats:
        from common.distill import print_summary, teacher_stats
        t_stats = teacher_stats(teacher_path, lambda: evaluate(
            teacher, build_postprocess(teacher), val_loader, evaluator, info.device,
            amp=args.amp, max_iters=args.max_iters), args)
        if info.is_main:
            print_summary(args, t_stats, stats)
    return stats


def main_guard(fn):
    """Run ``fn()``; on a clear user error print it without a traceback and exit 2."""
    try:
        return fn()
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("DETRKD_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
