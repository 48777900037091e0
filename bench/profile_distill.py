"""Where one distillation training iteration spends its time: teacher, student, the method's terms.

    python bench/profile_distill.py                          # all methods, 1 thread, 5 iterations
    python bench/profile_distill.py --methods qskd gdetkd --iters 10 --threads 2
    python bench/profile_distill.py --teacher ~/.cache/detrkd/teachers/.../checkpoint.pth

Setting: the CPU presets (teacher "cpu-teacher", student "cpu-student", common/cli.py), a batch
of 8 training images of the embedded data (training transform), each method with its default
config. The teacher is randomly initialised unless ``--teacher`` gives a checkpoint of ours:
for timing the weights matter little, but methods that select queries or regions by the
teacher's scores can do more or less work with a trained teacher.

An iteration is what the training loop does: ``losses = distiller(images, masks, targets)``,
weighted sum, ``backward``, gradient clipping and the AdamW step. The parts are timed from
outside, by wrapping at run time (nothing in the method files changes):
    teacher fwd      every ``teacher.encode`` / ``teacher.decode`` call (no_grad)
    student fwd      the student's own ``encode`` and ``decode`` (the one without given queries)
    student extra    further ``student.decode`` calls with given queries (a method's KD passes)
    det. loss        the first SetCriterion call (the student's own Hungarian loss)
    KD terms fwd     the rest of the forward: the method's own losses, matchers, projections
    backward         ``loss.backward()`` (the student's and the KD terms' gradients together)
    step             clipping + AdamW
"method terms" = iteration - teacher fwd - the baseline student's iteration: the time the
method adds beyond running its teacher. Targets recorded: iteration <= 2x the baseline's, and
method terms <= 25% of the iteration.
"""
import argparse
import functools
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "methods"))
import baseline  # noqa: E402
import clockdistill  # noqa: E402
import detrdistill  # noqa: E402
import gdetkd  # noqa: E402
import qskd  # noqa: E402
from common import cli, ops  # noqa: E402
from common.criterion import SetCriterion, build_criterion  # noqa: E402
from common.data import build_dataset, collate  # noqa: E402
from common.detr import CONFIGS, build_model  # noqa: E402
from common.distill import freeze, load_detector  # noqa: E402

METHODS = {
    "clockdistill": lambda t, s, c: clockdistill.CLoCKDistiller(clockdistill.CLoCKConfig(), t, s, c),
    "detrdistill": lambda t, s, c: detrdistill.DETRDistill(detrdistill.DETRDistillConfig(), t, s, c),
    "qskd": lambda t, s, c: qskd.QSKD(qskd.QSKDConfig(), t, s, c),
    "gdetkd": lambda t, s, c: gdetkd.GDetKD(gdetkd.GDetKDConfig(), t, s, c),
}
PARTS = ("teacher fwd", "student fwd", "student extra", "det. loss", "KD terms fwd", "backward",
         "step")


def preset_model(name, num_classes):
    p = cli.PRESETS[name]
    cfg = CONFIGS[p["variant"]]()
    kw = {k: v for k, v in p.items() if hasattr(cfg, k) and k not in ("variant", "backbone_weights")}
    return build_model(p["variant"], num_classes, **kw)


class Timers:
    """Seconds per part for the current iteration; wrappers add to it."""

    def __init__(self):
        self.now = defaultdict(float)
        self.calls = defaultdict(int)

    def reset(self):
        self.now, self.calls = defaultdict(float), defaultdict(int)

    def wrap(self, obj, name, part_of):
        """Replace ``obj.name`` (an instance attribute shadowing the method) by a timed call;
        ``part_of(args, kwargs, call_index) -> part``."""
        original = getattr(obj, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            part = part_of(args, kwargs, self.calls[(id(obj), name)])
            self.calls[(id(obj), name)] += 1
            t0 = time.perf_counter()
            try:
                with torch.profiler.record_function(part):  # named in --top-ops tables
                    return original(*args, **kwargs)
            finally:
                self.now[part] += time.perf_counter() - t0
        setattr(obj, name, timed)


def instrument(distiller, timers):
    timers.wrap(distiller.student, "encode", lambda a, k, i: "student fwd")
    timers.wrap(distiller.student, "decode", lambda a, k, i: "student extra" if (
        k.get("queries") is not None or len(a) > 1) else "student fwd")
    teacher = getattr(distiller, "teacher", None)
    if teacher is not None and "encode" not in vars(teacher):  # the shared teacher: once
        timers.wrap(teacher, "encode", lambda a, k, i: "teacher fwd")
        timers.wrap(teacher, "decode", lambda a, k, i: "teacher fwd")
    criteria = [m for m in distiller.children() if isinstance(m, SetCriterion)]
    for c in criteria[:1]:
        timers.wrap(c, "forward", lambda a, k, i: "det. loss" if i == 0 else "KD terms fwd")


def batch_of(dataset, size):
    return collate([dataset[i] for i in range(size)])


class Runner:
    """One method's training iteration on a fixed batch, timed part by part."""

    def __init__(self, distiller, batch, timers):
        self.distiller, self.batch, self.timers = distiller, batch, timers
        self.params = [p for p in distiller.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-4)
        self.weights = distiller.weight_dict if hasattr(distiller, "weight_dict") else \
            distiller.criterion.weight_dict
        instrument(distiller, timers)
        distiller.train()
        if getattr(distiller, "teacher", None) is not None:
            distiller.teacher.eval()

    def loss(self):
        losses = self.distiller(*self.batch)
        return sum(v * self.weights[k] for k, v in losses.items() if k in self.weights)

    def step(self):
        """One iteration -> {part: seconds}."""
        self.timers.reset()
        t0 = time.perf_counter()
        loss = self.loss()
        t_fwd = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t_bwd = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.params, 0.1)
        self.optimizer.step()
        t_end = time.perf_counter()
        part = dict(self.timers.now)
        # the forward's remainder, outside every wrapped call, belongs to the method's terms
        part["KD terms fwd"] = part.get("KD terms fwd", 0.0) + (t_fwd - t0) - sum(
            part.get(p, 0.0) for p in ("teacher fwd", "student fwd", "student extra", "det. loss",
                                       "KD terms fwd"))
        part["backward"], part["step"], part["iteration"] = t_bwd - t_fwd, t_end - t_bwd, t_end - t0
        return part

    def top_ops(self, name, k):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            self.loss().backward()
        print(f"{name}: top {k} ops of one iteration by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=k))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (after a warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    parser.add_argument("--teacher", default=None,
                        help="a cpu-teacher checkpoint of ours (default: random weights)")
    parser.add_argument("--top-ops", dest="top_ops", type=int, default=0,
                        help="also print the K ops with the most self CPU time of one "
                             "iteration of each method (torch.profiler)")
    parser.add_argument("--data-cache", dest="data_cache", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = build_dataset("train", data="synthetic", data_cache=args.data_cache)
    C = dataset.num_classes
    torch.manual_seed(0)
    batch = batch_of(dataset, args.batch_size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), ops backend "
          f"{ops.backend('cpu')}; batch of {args.batch_size} training images "
          f"{tuple(batch[0].shape[2:])}; teacher cpu-teacher "
          f"({'from ' + args.teacher if args.teacher else 'random weights'}), student "
          f"cpu-student; median of {args.iters} iterations after a warm-up (ms)")
    header = f"{'method':14s} " + " ".join(f"{p:>13s}" for p in PARTS) + \
        f" {'iteration':>10s} {'x baseline':>10s} {'method terms':>13s}"

    def student():
        torch.manual_seed(1)
        return preset_model("cpu-student", C)

    timers = Timers()
    runners = {"baseline": Runner(baseline.Detector(s := student(), build_criterion(s, C)),
                                  batch, timers)}
    teacher = load_detector(args.teacher, C) if args.teacher else preset_model("cpu-teacher", C)
    freeze(teacher)
    for name in args.methods:
        torch.manual_seed(2)
        runners[name] = Runner(METHODS[name](teacher, student(), C), batch, timers)
    # round robin, one iteration of each method in turn, so that a change in the machine's
    # load during the run affects every method alike; the first round is a warm-up
    rows = {name: [] for name in runners}
    for it in range(args.iters + 1):
        for name, runner in runners.items():
            part = runner.step()
            if it > 0:
                rows[name].append(part)
    results = {name: {k: statistics.median(r.get(k, 0.0) for r in rs) * 1e3
                      for k in PARTS + ("iteration",)} for name, rs in rows.items()}
    b_iter = results["baseline"]["iteration"]
    if args.top_ops:
        for name, runner in runners.items():
            runner.top_ops(name, args.top_ops)
    print(header)
    for name, r in results.items():
        terms = r["iteration"] - r["teacher fwd"] - b_iter
        line = f"{name:14s} " + " ".join(f"{r[p]:13.1f}" for p in PARTS) + \
            f" {r['iteration']:10.1f} {r['iteration'] / b_iter:9.2f}x"
        line += f" {terms:7.1f} ({100 * terms / r['iteration']:3.0f}%)" if name != "baseline" else ""
        print(line)
    print("targets: iteration <= 2.00x baseline, method terms <= 25% of the iteration")
    for name, r in results.items():
        if name == "baseline":
            continue
        terms = r["iteration"] - r["teacher fwd"] - b_iter
        misses = [f"iteration {r['iteration'] / b_iter:.2f}x > 2x"] * (r["iteration"] > 2 * b_iter)
        misses += [f"method terms {100 * terms / r['iteration']:.0f}% > 25%"] * (
            terms > 0.25 * r["iteration"])
        print(f"  {name:14s} {'met' if not misses else 'missed: ' + '; '.join(misses)}")


if __name__ == "__main__":
    main()
