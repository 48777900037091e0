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
import resource
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from common.checkpoint import (check_state_fits, load_detector, load_trainable_state,
                               read_checkpoint, save_checkpoint, trainable_state, unwrap)
from common.criterion import build_postprocess
from common.data import build_dataset, collate, default_cache_dir
from common.detr import CONFIGS, build_model
from common.distributed import DistInfo, barrier, init_distributed, reduce_mean
from common.evaluate import CocoEvaluator
from common.pretrain import ensure_crop_pretrained

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
    ckpt = read_checkpoint(path)
    for key in ("model", "optimizer", "lr_scheduler", "epoch", "rng"):
        if key not in ckpt:
            raise ValueError(f"{path} is not a training checkpoint of this project (no "
                             f"'{key}' entry); for weights only, use the model loader")
    load_trainable_state(module, ckpt, f"checkpoint {path}")
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]) + 1




# ------------------------------------------------------------------------------------------
# The job: prepare(args) -> Run, then train(run, module)
# ------------------------------------------------------------------------------------------

def backbone_weights_ready(args, info, dataset_train, dataset_val):
    """``args.model_overrides`` with ``backbone_weights="crops"`` (the CPU presets) replaced by
    the path of the cached crop-pretrained tiny backbone (common/pretrain.py), which the main
    process trains first when it is missing."""
    overrides = dict(args.model_overrides)
    if overrides.get("backbone_weights") != "crops":
        return overrides
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
            barrier()               # the others wait until it is cached (or failed)
    else:
        barrier()
        path = ensure_crop_pretrained(dataset_train, dataset_val, width, root, verbose=False)
    overrides["backbone_weights"] = path
    return overrides


@dataclass
class Run:
    """What ``prepare`` sets up for one job: the process, the data, the student detector and
    its COCO evaluation. ``run.evaluate(model)`` scores any detector on the validation split."""
    args: object
    info: DistInfo
    dataset_train: object
    dataset_val: object
    student: torch.nn.Module
    val_loader: object
    evaluator: CocoEvaluator

    @property
    def num_classes(self):
        return self.dataset_train.num_classes

    @property
    def device(self):
        return self.info.device

    def evaluate(self, model):
        return evaluate(model, build_postprocess(model), self.val_loader, self.evaluator,
                        self.device, amp=self.args.amp, max_iters=self.args.max_iters)


def prepare(args) -> Run:
    """The job's setup, shared by methods/baseline.py and every method script: threads and
    processes, seeds, both data splits, the student detector (built from the flags, or with
    ``--eval`` and no model flags rebuilt as the checkpoint records it) and its evaluation."""
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
    val_loader = make_loader(dataset_val, args.batch_size, collate, train=False,
                             num_workers=args.num_workers, dist_info=info)
    if info.is_main and not args.eval and args.output_dir and hasattr(args, "settings"):
        os.makedirs(args.output_dir, exist_ok=True)  # beside log.txt: what cli.resolve chose
        with open(os.path.join(args.output_dir, "settings.json"), "w") as f:
            json.dump({"settings": args.settings, "sources": args.sources,
                       "command": sys.argv}, f, indent=1, default=str)
    return Run(args, info, dataset_train, dataset_val, student, val_loader,
               CocoEvaluator.from_dataset(dataset_val))


def train(run: Run, module: torch.nn.Module) -> dict:
    """Train ``module`` (a training module, see the top of this file, whose ``.student`` is
    ``run.student``) with the run's flags: AdamW, the lr drop, ``--resume``, DistributedDataParallel
    under torchrun, an evaluation, ``log.txt`` line and ``checkpoint.pth`` per epoch. With
    ``--eval`` it restores everything the checkpoint holds for ``module`` (the student and the
    method's student-side modules) and evaluates only. Returns the last stats."""
    args, info = run.args, run.info
    module = module.to(info.device)
    teacher = getattr(module, "teacher", None)
    if teacher is not None and any(p.requires_grad for p in teacher.parameters()):
        raise RuntimeError("the teacher must stay frozen")
    student = module.student
    if info.is_main:
        what = ", ".join(f"{k}={v}" for k, v in student.cfg.__dict__.items()
                         if k in args.model_overrides)
        print(f"{'student' if teacher else 'model'}: {student.variant} ({what}), "
              f"{run.num_classes} classes, device "
              f"{info.device}, world size {info.world_size}" +
              (f"; teacher: {teacher.variant}" if teacher is not None else ""), flush=True)
    if args.eval:
        load_trainable_state(module, read_checkpoint(args.resume),
                             f"checkpoint {args.resume}", strict_extra=False)
        stats = run.evaluate(student)
        if info.is_main:
            print("eval: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()), flush=True)
        return stats

    optimizer = torch.optim.AdamW(
        param_groups(module, args.lr, args.lr_backbone, student.cfg.lr_linear_proj_mult),
        weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    start_epoch = resume(module, optimizer, lr_scheduler, args.resume) if args.resume else 0
    if info.distributed:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    train_loader = make_loader(run.dataset_train, args.batch_size, collate, train=True,
                               seed=args.seed, num_workers=args.num_workers, dist_info=info)
    stats = fit(module, optimizer, lr_scheduler, train_loader, args=args, dist_info=info,
                evaluate_fn=run.evaluate, output_dir=args.output_dir, start_epoch=start_epoch,
                epochs=args.epochs, clip_max_norm=args.clip_max_norm, amp=args.amp,
                max_iters=args.max_iters, print_every=args.print_every)
    if info.is_main and stats:
        print("final: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()
                                   if k.startswith("test_")), flush=True)
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
