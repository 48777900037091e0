"""The one training loop shared by methods/baseline.py and every distillation method.

What it trains is a *training module*: an nn.Module whose ``forward(images, masks, targets)``
returns a dict of named, unweighted losses, with

    .weight_dict   {loss name: weight}; the loss that is minimised is
                   sum(losses[k] * weight_dict[k] for k in losses if k in weight_dict)
    .student       the detector that is evaluated and deployed (for methods/baseline.py the
                   detector itself, for a distiller the student; a teacher is never saved)

The job (the end of this file) is two calls: ``run = prepare(args)`` (threads, processes,
seeds, the output folder, both data splits, the student, its evaluation) and
``train(run, module)``. The loop above them is ``fit`` / ``train_one_epoch``; what a run
prints and records per iteration and epoch (console, log.txt, TensorBoard) is
common/logger.py's.

Conventions kept from the DETR repositories: ``--output-dir`` holds ``checkpoint.pth`` (model,
optimizer, lr_scheduler, epoch, args, RNG state) and ``log.txt`` (one JSON line per epoch);
``--resume PATH`` continues exactly where the checkpoint stopped; torchrun sets RANK /
WORLD_SIZE / LOCAL_RANK and we run single-process when they are unset.

Exact resume: the data order of epoch e depends only on (seed, e) (a DistributedSampler seeded
with the run's seed, the loader's generator seeded with (seed, e, rank)), and every RNG the model
and the augmentations draw from (torch CPU and CUDA, numpy, random) is saved in the checkpoint
and restored, so an interrupted run resumed from epoch k ends bit-for-bit where an uninterrupted
run ends (on CPU; CUDA atomics make the last digits noisy on GPU). Under torchrun every process
has its own RNG stream: the checkpoint holds the list of every rank's state (gathered to rank
0) and each rank restores its own.

Never losing a run. The output folder holds one run: ``prepare`` refuses a folder that already
holds ``checkpoint.pth``, a kept copy or ``log.txt`` unless ``--resume`` names a checkpoint in
it (the run continues) or ``--overwrite`` is given (the old run's files are deleted first); a
teacher's folder is refused by the method scripts whatever the flags. At the end of each epoch,
in this order: the kept copy ``checkpointNNNN.pth`` when one is due (the epoch before each lr
drop, and every ``--save-every`` epochs), then ``checkpoint.pth``, each written atomically
(temporary file, fsync, rename), then ``log.txt``, rewritten atomically as a whole. The log's
lines travel inside the checkpoint (its "log" entry), so log.txt is always a function of the
last checkpoint: a kill before the rename keeps the previous checkpoint and the previous log; a
kill between the checkpoint and the log leaves a log one line short, which ``--resume``
rewrites from the checkpoint. Temporary files of dead processes (``.NAME.tmp-PID``) are removed
when the next run starts in the folder.
"""
import json
import os
import random
import re
import resource
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from common.checkpoint import (load_detector, load_trainable_state,
                               read_checkpoint, save_checkpoint, trainable_state, unwrap)
from common.criterion import build_postprocess
from common.data import ImageDecodeError, build_dataset, collate, default_cache_dir
from common.detr import CONFIGS, build_model
from common import distributed
from common.distributed import (DistInfo, all_gather_objects, barrier, init_distributed,
                                reduce_mean)
from common.evaluate import CocoEvaluator
from common.logger import Logger, detr_log_line
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


def restore_rng(saved, dist_info: DistInfo = None):
    """Restore this process's RNG state from a checkpoint's "rng" entry: the list of every
    rank's state (one per process of the run that saved it; a single dict in checkpoints from
    before that). With another number of processes than at saving, the resume cannot be exact:
    rank 0 takes the saved rank 0 state, the others a stream derived from it, with a warning."""
    info = dist_info or DistInfo(rank=distributed.rank(), world_size=distributed.world_size())
    states = list(saved) if isinstance(saved, (list, tuple)) else [saved]
    if len(states) == info.world_size:
        set_rng_state(states[info.rank])
        return
    if info.is_main:
        warnings.warn(f"the checkpoint was saved by {len(states)} process(es), this run has "
                      f"{info.world_size}: the data shards and random streams differ, so the "
                      f"resumed run is not bit-exact", stacklevel=2)
    set_rng_state(states[0])
    if info.rank:
        seed_everything(int(torch.randint(2**31 - 1, ())), info.rank)


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

def to_device(images, masks, targets, device):
    images = images.to(device, non_blocking=True).contiguous()  # NCHW, never channels-last
    masks = masks.to(device, non_blocking=True)
    targets = [{k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in t.items()} for t in targets]
    return images, masks, targets


def train_one_epoch(module, loader, optimizer, device, epoch, *, clip_max_norm=0.1, amp=False,
                    print_every=10, max_iters=None, verbose=True, logger=None):
    """One pass over ``loader``; returns the epoch means of the losses (averaged over
    processes), the weighted total under "loss", the weighted KD terms under "kd" and the
    learning rate under "lr". ``logger`` (common.logger.Logger) prints the running means and
    writes TensorBoard; by default a console-only one (printing when ``verbose``)."""
    module.train()
    teacher = getattr(unwrap(module), "teacher", None)
    if teacher is not None:
        teacher.eval()  # the frozen teacher never trains: no dropout, no denoising groups
    weight_dict = unwrap(module).weight_dict
    n = len(loader) if max_iters is None else min(len(loader), max_iters)
    log = logger or Logger(print_every=print_every, enabled=verbose)
    log.start_epoch(epoch, n)
    iter_times, t_last = [], time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    for it, (images, masks, targets) in enumerate(named_decode_errors(loader)):
        if it >= n:
            break
        images, masks, targets = to_device(images, masks, targets, device)
        try:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                                enabled=amp and device.type == "cuda"):
                losses = module(images, masks, targets)
        except (ValueError, RuntimeError) as e:
            # a diverged model (non-finite weights or outputs) first trips the matcher's check
            # of its cost: report it as what it is
            if not ("finite" in str(e) or "nan" in str(e).lower() or not params_finite(module)):
                raise
            raise FloatingPointError(
                f"epoch {epoch} iteration {it}: the model diverged (its outputs are not finite: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); the lr is {lr:g}: "
                f"lower --lr, or clip the gradient harder (a smaller --clip-max-norm)") from e
        loss = sum(losses[k].float() * weight_dict[k] for k in losses if k in weight_dict)
        if not torch.isfinite(loss):
            bad = {k: float(v) for k, v in losses.items() if not torch.isfinite(v)}
            raise FloatingPointError(f"epoch {epoch} iteration {it}: the loss is {float(loss.detach())}; "
                                     f"non-finite terms: {bad or 'none (overflow in the sum)'}; "
                                     f"the lr is {lr:g}: the model diverged, lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the gradient's norm (clip_grad_norm_ with an infinite bound only measures it)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            module.parameters(), clip_max_norm if clip_max_norm and clip_max_norm > 0
            else float("inf"))
        if not torch.isfinite(grad_norm):
            raise FloatingPointError(f"epoch {epoch} iteration {it}: the gradient is not finite "
                                     f"(norm {float(grad_norm)}) while the loss is "
                                     f"{loss.item():.4g}; the lr is {lr:g}: the model diverged, "
                                     f"lower --lr")
        optimizer.step()
        log.iteration(epoch * n + it, {"loss": loss.item(),
                                       **{k: v.item() for k, v in losses.items()},
                                       "lr": optimizer.param_groups[0]["lr"]}, weight_dict)
        now = time.perf_counter()
        iter_times.append(now - t_last)  # data loading included
        t_last = now
    stats = reduce_mean(log.means())
    # median seconds per iteration (the first is left out: warm-up) and the peak memory so far
    stats["iter_time_s"] = float(np.median(iter_times[1:] or iter_times or [0.0]))
    stats["peak_mem_mb"] = peak_memory_mb(device)
    return stats


def params_finite(module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def named_decode_errors(loader):
    """Iterate ``loader``; an image that fails to decode stops the run with the dataset's one
    line naming the file (a DataLoader worker wraps it in its traceback: this unwraps it)."""
    try:
        yield from loader
    except ImageDecodeError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if "ImageDecodeError: " in last:            # re-raised by a worker process
            last = last.split("ImageDecodeError: ", 1)[1]
        raise ImageDecodeError(last) from None


def peak_memory_mb(device):
    """Peak memory of this process: CUDA memory allocated by torch on a GPU, else the peak
    resident set size of the process (Linux and macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, else KiB


@torch.no_grad()
def evaluate(model, postprocess, loader, evaluator, device, *, amp=False, max_iters=None,
             lr=None):
    """COCO evaluation of ``model`` over ``loader``: post-processed detections of every process
    are gathered by ``evaluator`` (common.evaluate.CocoEvaluator) and scored with COCOeval.
    Non-finite predictions (a model that diverged) are a FloatingPointError naming ``lr``."""
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
        results = postprocess(fp32(outputs), orig_sizes)
        if not all(bool(torch.isfinite(r[k]).all()) for r in results for k in ("scores", "boxes")
                   if k in r):
            raise FloatingPointError(
                "evaluation: the model's predictions are not finite: the model diverged"
                + (f"; the lr is {lr:g}: lower --lr" if lr is not None else ""))
        evaluator.update(targets, results)
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
        print_every=10, verbose=True, history=(), save_every=0, meta=None):
    """Train epochs [start_epoch, epochs); after each: evaluate, then (see the top of this file)
    the kept copy when due, ``checkpoint.pth`` and ``log.txt``. ``evaluate_fn(student) -> dict``
    returns the COCO stats (or None). ``history``: the log lines of the epochs before
    ``start_epoch`` (a resumed checkpoint's "log" entry). Kept copies ``checkpointNNNN.pth``:
    after epoch NNNN when the lr drops after it (DETR's convention) and, with ``save_every``
    N > 0, after every N-th epoch. ``meta``: more top-level checkpoint entries (e.g. the data
    set's "categories", which methods/predict.py names its detections with)."""
    n_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if verbose and dist_info.is_main:
        print(f"trainable parameters: {n_params:,}; total batch size "
              f"{dist_info.world_size} x {train_loader.batch_sampler.batch_size}", flush=True)
    log = [dict(line) for line in history]
    step_size = getattr(lr_scheduler, "step_size", 0)
    logger = Logger(output_dir, tensorboard=getattr(args, "tensorboard", False),
                    print_every=print_every, enabled=dist_info.is_main, console=verbose)
    stats = {}
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.time()
            train_loader.set_epoch(epoch)
            train_stats = train_one_epoch(module, train_loader, optimizer, dist_info.device, epoch,
                                          clip_max_norm=clip_max_norm, amp=amp,
                                          print_every=print_every, max_iters=max_iters,
                                          verbose=verbose and dist_info.is_main, logger=logger)
            lr_scheduler.step()
            test_stats = evaluate_fn(unwrap(module).student) if evaluate_fn else None
            stats = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in (test_stats or {}).items()},
                     "n_parameters": n_params, "epoch_time_s": round(time.time() - t0, 2)}
            log.append(detr_log_line(stats))       # + DETR's test_coco_eval_bbox list
            logger.epoch(stats, write_log=False)   # log.txt is written from the checkpoint below
            if output_dir:
                rng = all_gather_objects(get_rng_state())  # every rank's stream, for exact resume
                if dist_info.is_main:
                    keep = ((step_size and (epoch + 1) % step_size == 0) or
                            (save_every and (epoch + 1) % save_every == 0))
                    save_epoch(output_dir, {
                        **trainable_state(module), "optimizer": optimizer.state_dict(),
                        "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch,
                        "args": dict(vars(args)) if args is not None else {}, "rng": rng,
                        "log": log, **(meta or {})}, keep)
    finally:
        logger.close()
    return stats


def kept_copy_name(epoch: int) -> str:
    return f"checkpoint{epoch:04d}.pth"


def save_epoch(output_dir, state, keep_copy=False):
    """Write one epoch's files in the order that keeps them consistent through a kill at any
    moment: the kept copy (when due), ``checkpoint.pth``, then ``log.txt`` from the
    checkpoint's "log" entry."""
    if keep_copy:
        write_checkpoint(state, os.path.join(output_dir, kept_copy_name(state["epoch"])))
    write_checkpoint(state, os.path.join(output_dir, "checkpoint.pth"))
    write_log(output_dir, state["log"])


def _first_os_error(e):
    """The OSError at the root of an exception chain (torch.save wraps a failed write)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _write_failed(path, e):
    """One clear error for a file that could not be written: the reason (disk full,
    read-only, ...) and the free space, instead of torch's chained serializer error."""
    root = _first_os_error(e)
    if root is not None and root.strerror:
        reason = root.strerror
    elif "write failed" in str(e) or "unexpected pos" in str(e):
        reason = "the write failed (most often: the disk is full)"
    else:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    try:
        free = f"; {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:.0f} " \
               f"MiB free on that disk"
    except OSError:
        free = ""
    return OSError(f"could not write {path}: {reason}{free}; the previous file is intact")


def write_checkpoint(state, path):
    try:
        save_checkpoint(state, path)
    except (OSError, RuntimeError) as e:
        raise _write_failed(path, e) from e


def write_log(output_dir, lines):
    """Rewrite ``log.txt`` (one JSON line per epoch) atomically from ``lines``."""
    path = os.path.join(output_dir, "log.txt")
    tmp = os.path.join(output_dir, f".log.txt.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise _write_failed(path, e) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def log_history(ckpt, path):
    """The log lines a checkpoint carries (epochs 0..its epoch); for a checkpoint from before
    the log travelled inside it, the lines of the log.txt beside it up to its epoch."""
    if "log" in ckpt:
        return list(ckpt["log"])
    log = os.path.join(os.path.dirname(os.path.abspath(path)), "log.txt")
    if not os.path.isfile(log):
        return []
    with open(log) as f:
        lines = [json.loads(x) for x in f.read().splitlines() if x.strip()]
    return [x for x in lines if int(x.get("epoch", -1)) <= int(ckpt["epoch"])]


_TRAINING_KEYS = ("model", "optimizer", "lr_scheduler", "epoch", "rng")


def check_training_checkpoint(ckpt, path):
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a training checkpoint")
    for key in _TRAINING_KEYS:
        if key not in ckpt:
            raise ValueError(f"{path} is not a training checkpoint of this project (no "
                             f"'{key}' entry); for weights only, use the model loader")


def resume(module, optimizer, lr_scheduler, checkpoint, dist_info: DistInfo = None):
    """Restore a checkpoint written by ``fit`` (a path, or the dict read from one); returns the
    epoch to start from. Refuses a checkpoint of another model with a message naming what
    differs. Each process restores its own RNG state (``restore_rng``).

    The rule for flags changed on resume: the learning rates and lr-drop period this run's
    optimizer and scheduler were built with (from ``--lr``, ``--lr-backbone``, ``--lr-drop``)
    win over the saved ones: the saved optimizer state (AdamW's moments) is kept, and each lr
    is set to its new base value times the drops already taken, gamma^(last_epoch // period)."""
    path = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else "the checkpoint"
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) \
        else checkpoint
    check_training_checkpoint(ckpt, path)
    load_trainable_state(module, ckpt, f"checkpoint {path}")
    new_lrs = [g["lr"] for g in optimizer.param_groups]   # as this run's flags set them
    new_period = getattr(lr_scheduler, "step_size", None)
    optimizer.load_state_dict(ckpt["optimizer"])
    lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
    if new_period is not None and (list(lr_scheduler.base_lrs) != new_lrs or
                                   lr_scheduler.step_size != new_period):
        old = (list(lr_scheduler.base_lrs), lr_scheduler.step_size)
        lr_scheduler.base_lrs, lr_scheduler.step_size = list(new_lrs), new_period
        drops = lr_scheduler.last_epoch // new_period
        for group, base in zip(optimizer.param_groups, new_lrs):
            group["initial_lr"] = base
            group["lr"] = base * lr_scheduler.gamma ** drops
        lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        if dist_info is None or dist_info.is_main:
            print(f"resume: lr {old[0][0]:g} with drops every {old[1]} epochs in the "
                  f"checkpoint, now lr {new_lrs[0]:g} with drops every {new_period} epochs "
                  f"(this run's flags): epoch {lr_scheduler.last_epoch} starts at lr "
                  f"{optimizer.param_groups[0]['lr']:g}", flush=True)
    restore_rng(ckpt["rng"], dist_info)
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
    # pretraining now draws random numbers that reading the cached file does not: put the RNG
    # back, so a run is the same whether the backbone was cached before it or not
    rng = get_rng_state()
    if info.is_main:
        try:
            path = ensure_crop_pretrained(dataset_train, dataset_val, width, root)
        finally:
            barrier()               # the others wait until it is cached (or failed)
    else:
        barrier()
        path = ensure_crop_pretrained(dataset_train, dataset_val, width, root, verbose=False)
    set_rng_state(rng)
    overrides["backbone_weights"] = path
    return overrides


_RUN_FILE = re.compile(r"^(checkpoint\.pth|checkpoint\d{4}\.pth|log\.txt)$")
_TMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True     # another user's process
    return True


def remove_stale_tmp(folder):
    """Remove the temporary files (``.NAME.tmp-PID``) that killed processes left in
    ``folder``; those of running processes stay. Returns the names removed."""
    removed = []
    for name in os.listdir(folder):
        m = _TMP_FILE.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


def prepare_output_dir(args, info: DistInfo = None):
    """The output-folder policy (see the top of this file), applied by the main process before
    anything is loaded: the folder is created and checked writable, stale temporary files are
    removed, and a folder holding another run is refused unless ``--resume`` names a
    checkpoint in it or ``--overwrite`` is given. Without ``--output-dir`` a training run saves
    nothing, which is said once."""
    info = info or DistInfo()
    out = getattr(args, "output_dir", None)
    if getattr(args, "eval", False) or not info.is_main:
        return
    if not out:
        print("warning: no --output-dir: nothing of this run (checkpoint, log) will be saved",
              file=sys.stderr, flush=True)
        return
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--output-dir {out} is a file, not a folder")
    probe = os.path.join(out, f".write-test.tmp-{os.getpid()}")
    try:
        os.makedirs(out, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(f"--output-dir {out} is not writable: {e.strerror or e}") from None
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    removed = remove_stale_tmp(out)
    if removed:
        print(f"output: removed {len(removed)} temporary file(s) of killed runs in {out}",
              flush=True)
    held = sorted(n for n in os.listdir(out) if _RUN_FILE.match(n))
    if not held:
        return
    resume_path = getattr(args, "resume", None)
    if resume_path and os.path.samefile(os.path.dirname(os.path.abspath(resume_path)), out):
        return                                             # this run continues the folder's run
    if getattr(args, "overwrite", False):
        for name in held:
            os.remove(os.path.join(out, name))
        print(f"output: --overwrite: deleted {', '.join(held)} of the previous run in {out}",
              flush=True)
        return
    hint = (f"--resume {resume_path} continues that run in its own folder, not in this one"
            if resume_path else
            f"to continue it pass --resume {os.path.join(out, 'checkpoint.pth')}")
    raise ValueError(f"--output-dir {out} already holds a run ({', '.join(held)}): {hint}; "
                     f"to replace it pass --overwrite, or choose another folder")


def read_resume_checkpoint(args, info: DistInfo):
    """``--resume``'s checkpoint, read and checked before any data is loaded (None without
    ``--resume``): a training checkpoint for training; for ``--eval`` any file holding the
    model's weights, and without model flags one that records how the model was built."""
    path = getattr(args, "resume", None)
    if not path:
        return None
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"--resume {path} holds a {type(ckpt).__name__}, not a checkpoint")
    if not args.eval:
        check_training_checkpoint(ckpt, f"--resume {path}")
        done = int(ckpt["epoch"]) + 1
        if args.epochs <= done:
            raise ValueError(f"--resume {path} has already trained {done} epoch(s) (0..{done - 1}) "
                             f"and --epochs is {args.epochs}: nothing is left to train; give "
                             f"--epochs larger than {done} to train on")
        return ckpt
    recorded = isinstance(ckpt.get("args"), Mapping) and "variant" in ckpt["args"]
    if not args.model_from_flags and not ("model" in ckpt and recorded):
        raise ValueError(f"--resume {path} does not record how its model was built (a bare "
                         f"state dict, or a checkpoint made by other code): give the model "
                         f"flags it was trained with (--variant, --preset or --hidden-dim, "
                         f"--num-queries, ...) to evaluate it")
    return ckpt


def check_splits(args, info, dataset_train, dataset_val):
    """Refuse a training split too small for one batch per process (it would train nothing) and
    an empty validation split."""
    if len(dataset_val) == 0:
        raise ValueError("the validation split has no images")
    if args.eval:
        return
    per_process = -(-len(dataset_train) // info.world_size)       # DistributedSampler's shard
    if per_process < args.batch_size:
        raise ValueError(f"the training split has {len(dataset_train)} image(s): "
                         f"{per_process} per process, fewer than --batch-size "
                         f"{args.batch_size}, so not one iteration would run; lower "
                         f"--batch-size (or use fewer processes)")


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
    checkpoint: dict = None   # --resume's checkpoint, read and checked by prepare

    @property
    def num_classes(self):
        return self.dataset_train.num_classes

    @property
    def device(self):
        return self.info.device

    @property
    def categories(self):
        """The data set's categories in label order, [{"id", "name"}]: saved in checkpoints so
        that a detector's labels can be named without the annotation file."""
        cats = self.dataset_train.coco.cats
        return [{"id": int(c), "name": cats[c]["name"]} for c in self.dataset_train.label_to_category]

    def evaluate(self, model):
        return evaluate(model, build_postprocess(model), self.val_loader, self.evaluator,
                        self.device, amp=self.args.amp, max_iters=self.args.max_iters,
                        lr=None if self.args.eval else self.args.lr)

    def report(self, name="val"):
        """After an evaluation: COCOeval's full table and the per-class AP on the main
        process, and the detections as COCO results JSON in ``--output-dir``
        (``detections_<name>.json``; every process takes part in gathering them)."""
        if self.info.is_main:
            print(self.evaluator.summary_table(), flush=True)
            print("per-class AP:\n" + self.evaluator.per_class_table(), flush=True)
        if self.args.output_dir:
            path = os.path.join(self.args.output_dir, f"detections_{name}.json")
            n = self.evaluator.write_detections(path)
            if self.info.is_main:
                print(f"detections: {n} written to {path}", flush=True)


def prepare(args) -> Run:
    """The job's setup, shared by methods/baseline.py and every method script: threads and
    processes, seeds, the output folder (``prepare_output_dir``) and ``--resume``'s checkpoint
    (checked first, before anything heavy), both data splits, the student detector (built from
    the flags, or with ``--eval`` and no model flags rebuilt as the checkpoint records it) and
    its evaluation. The flags were checked by common.cli.validate."""
    if args.threads:
        torch.set_num_threads(args.threads)
    info = init_distributed(args.device)
    seed_everything(args.seed, info.rank)
    prepare_output_dir(args, info)
    checkpoint = read_resume_checkpoint(args, info)
    dataset_train = build_dataset("train", args)
    dataset_val = build_dataset("val", args)
    check_splits(args, info, dataset_train, dataset_val)
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
               CocoEvaluator.from_dataset(dataset_val), checkpoint)


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
    ckpt, run.checkpoint = run.checkpoint, None   # read by prepare; not kept in memory
    if ckpt is None and args.resume:
        ckpt = read_resume_checkpoint(args, info)
    if args.eval:
        if "model" not in ckpt:                    # a bare state dict of the detector
            ckpt = {"model": ckpt}
        load_trainable_state(module, ckpt, f"checkpoint {args.resume}", strict_extra=False)
        stats = run.evaluate(student)
        run.report()
        if info.is_main:
            print("eval: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()), flush=True)
        return stats

    optimizer = torch.optim.AdamW(
        param_groups(module, args.lr, args.lr_backbone, student.cfg.lr_linear_proj_mult),
        weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    start_epoch, history = 0, []
    if ckpt is not None:
        start_epoch = resume(module, optimizer, lr_scheduler, ckpt, info)
        history = log_history(ckpt, args.resume)
        del ckpt
        if args.output_dir and info.is_main:
            write_log(args.output_dir, history)    # the log as the checkpoint knows it
    if info.distributed:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    train_loader = make_loader(run.dataset_train, args.batch_size, collate, train=True,
                               seed=args.seed, num_workers=args.num_workers, dist_info=info)
    stats = fit(module, optimizer, lr_scheduler, train_loader, args=args, dist_info=info,
                evaluate_fn=run.evaluate, output_dir=args.output_dir, start_epoch=start_epoch,
                epochs=args.epochs, clip_max_norm=args.clip_max_norm, amp=args.amp,
                max_iters=args.max_iters, print_every=args.print_every, history=history,
                save_every=getattr(args, "save_every", 0),
                meta={"categories": run.categories})
    if stats and "test_AP" in stats:
        run.report()                               # the last epoch's evaluation
    if info.is_main and stats:
        print("final: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()
                                   if k.startswith("test_")), flush=True)
    return stats


def main_guard(fn):
    """Run ``fn()``; on a clear user error print it without a traceback and exit 2."""
    try:
        return fn()
    except (OSError, ValueError, FloatingPointError) as e:  # ImageDecodeError is a ValueError
        if os.environ.get("DETRKD_TRACEBACK"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
