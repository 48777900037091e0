"""torchrun and torch.distributed in one place: the process's rank, reductions, gathering.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything runs as one process and
every function here is the identity. nccl on CUDA, gloo on CPU. Losses that are normalised by a
count (boxes, pairs, mask mass) average that count over processes with ``mean_over_processes``,
so N processes x batch b train like one process x batch N*b.
"""
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_initialized() else 1


def rank():
    """This process's rank: torch.distributed's once the group exists, before that torchrun's
    RANK (so it holds while the job is being set up), 0 in a single-process run."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def is_main_process():
    """True in a single-process run and on rank 0 of a torchrun job: where one-off outputs
    (checkpoints, logs, figures, caches) are written."""
    return rank() == 0


def barrier():
    if world_size() > 1:
        dist.barrier()


def mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over processes (a no-op with one process); for loss normalisers."""
    if world_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size()


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


def gather_rows_per_process(x: torch.Tensor):
    """Every process's ``(n_p, ...)`` rows (n_p may differ), as a list in rank order, and this
    process's rank; ``([x], 0)`` with one process. Other processes' rows carry no gradient."""
    if world_size() == 1:
        return [x], 0
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x.detach()
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [p[:s] for p, s in zip(parts, sizes)], dist.get_rank()


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's ``(n_p, ...)`` rows concatenated in rank order, without gradient; the
    input itself with one process."""
    rows, _ = gather_rows_per_process(x)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def all_gather_objects(obj) -> list:
    """Every process's picklable ``obj``, in rank order (``[obj]`` with one process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
