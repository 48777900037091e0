"""Timing machinery of the benchmarks in bench/: wall-clock, interleaved (paired) and CUDA
timings of one function, and ``Bench``, which keeps a run's timed rows and parity checks,
prints them as tables and writes them as JSON. The benchmarks themselves (what is timed and
checked, on which shapes) live in bench/kernels.py.

    time_wall(fn, min_reps, min_time)   wall time of one call, one value per repetition
    time_paired(fns, rounds, min_time)  contenders interleaved round by round (drift-robust ratios)
    time_cuda_events(fn, reps)          CUDA-event time (optionally with the L2 flushed)
    time_cuda_device(fn, reps)          GPU busy time from the profiler (no launch overhead)
"""
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

L2_FLUSH_BYTES = 256 << 20  # > the 50 MB L2 of an H100


# ------------------------------------------------------------------------------------------
# Timing one function
# ------------------------------------------------------------------------------------------

class Unavailable(Exception):
    """A contender that cannot run here (not built, not implemented yet, wrong device)."""


def is_unavailable(err):
    """True for "cannot run here" (not built, not implemented yet), not for a real failure."""
    if isinstance(err, Unavailable):
        return True
    msg = str(err).lower()
    return isinstance(err, (RuntimeError, NotImplementedError)) and (
        "not implemented" in msg or "not compiled" in msg)


def first_line(err):
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def calls_per_repetition(warm):
    """How many calls of a function whose warm-up call took ``warm`` seconds make one timed
    repetition: enough to last >= 2 ms (perf_counter resolution and Python overhead then stay
    below 1 %)."""
    return 1 if warm >= 2e-3 else max(1, int(2e-3 / max(warm, 1e-7)))


def time_wall(fn, min_reps, min_time, sync=None):
    """Wall times of one call of ``fn`` (seconds), one per repetition.

    One warm-up call, then repetitions until ``min_reps`` and ``min_time`` are both reached.
    A repetition calls a fast ``fn`` several times so that it lasts >= 2 ms (perf_counter
    resolution and Python overhead then stay below 1 %). ``sync`` (e.g. cuda.synchronize) runs
    after each call inside the timed region: what the caller waits for.
    """
    def call():
        fn()
        if sync is not None:
            sync()
    t0 = time.perf_counter()
    call()
    number = calls_per_repetition(time.perf_counter() - t0)
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < 1000):
        t0 = time.perf_counter()
        for _ in range(number):
            call()
        times.append((time.perf_counter() - t0) / number)
    return times


def time_paired(fns, rounds, min_time):
    """Interleaved wall times: per round, each of ``fns`` (name -> fn) once, in an order that
    alternates from round to round. Returns name -> list of per-round seconds per call.

    On a shared machine the speed drifts over seconds; contenders timed one after the other
    (time_wall) see different drifts, while one round of interleaved calls sees about the same.
    So the ratio of two contenders within a round, taken as the median over rounds, is the
    stable number. A fast fn is called several times per round (calls_per_repetition).
    """
    number = {}
    for name, fn in fns.items():  # warm-up, and the calls per round
        t0 = time.perf_counter()
        fn()
        number[name] = calls_per_repetition(time.perf_counter() - t0)
    names = list(fns)
    times = {name: [] for name in names}
    start = time.perf_counter()
    r = 0
    while r < rounds or (time.perf_counter() - start < min_time and r < 200):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            for _ in range(number[name]):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / number[name])
        r += 1
    return times


def time_cuda_events(fn, reps, flush=None):
    """GPU times of ``fn`` (seconds, one per repetition) by CUDA events, after 3 warm-up calls. With
    ``flush`` (a large tensor) the L2 is evicted before each repetition, outside the timing."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in pairs]


def time_cuda_device(fn, reps, calls=5):
    """GPU busy time of one call of ``fn`` (seconds, one per repetition): the device activities
    (kernels, memsets, copies) the profiler records over ``calls`` calls, summed and divided by
    ``calls``. Unlike CUDA events around a call this leaves out the host's launch overhead and
    the gaps it opens on the GPU, which dominate calls of a few tens of microseconds (the
    decoder's deformable attention); it is the time the op costs once the GPU is kept busy."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
        busy_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
        times.append(busy_us / 1e6 / calls)
    return times


# ------------------------------------------------------------------------------------------
# A benchmark run: rows, parity checks, tables, JSON
# ------------------------------------------------------------------------------------------

class Bench:
    """Runs contenders, keeps result rows and parity rows, prints and writes them. ``titles``
    (section -> table title, in print order) is set by the benchmark that uses it."""

    titles = {}

    def __init__(self, args):
        self.args = args
        self.rows, self.parity = [], []
        self.paired = []  # interleaved ratios (time_paired), CPU only
        self.quick = args.quick
        self.flush = None

    # -- timing one contender --------------------------------------------------------------
    def measure(self, section, case, contender, fn, *, device, threads, dtype="fp32",
                variant="", items=None, unit="", baseline=None, slow=False, l2=None,
                use_events=False, note="", divide=1):
        """Time ``fn`` and add a row; ``divide`` reports the time per part of a call that does
        several parts at once (e.g. all decoder layers stacked)."""
        row = dict(section=section, case=case, variant=variant, contender=contender,
                   device=device, dtype=dtype, threads=threads if device == "cpu" else None,
                   timing=l2 or ("wall" if device == "cpu" or not use_events else "events"),
                   median_s=None, min_s=None, reps=0, items=items, unit=unit, baseline=baseline,
                   speedup=None, status="ok", note=note)
        reps = self.args.slow_reps if slow else self.args.reps
        min_time = 0.0 if slow else (0.05 if self.quick else 0.5)
        try:
            if device == "cuda" and l2 == "device":
                times = time_cuda_device(fn, max(reps, 7))
            elif device == "cuda" and use_events:
                flush = self._flush_buffer() if l2 == "L2 flushed" else None
                times = time_cuda_events(fn, max(reps, 20), flush)
            else:
                sync = torch.cuda.synchronize if device == "cuda" else None
                times = time_wall(fn, reps, min_time, sync)
            row["median_s"] = statistics.median(times) / divide
            row["min_s"], row["reps"] = min(times) / divide, len(times)
        except Exception as e:  # noqa: BLE001 - one contender's failure must not end the run
            row["status"] = "unavailable" if is_unavailable(e) else "error"
            row["note"] = first_line(e)
            if row["status"] == "error":
                print(f"    ERROR timing {contender} ({case} {variant}): {row['note']}",
                      flush=True)
        self.rows.append(row)
        self._echo(row)
        return row

    def pair(self, section, case, contenders, *, baseline, threads, variant="", dtype="fp32",
             slow=False):
        """Interleaved timing of ``contenders`` (name -> fn, the baseline among them) on the CPU
        (time_paired), kept as one group with every round's times. The targets are judged on
        ratios within rounds (paired_ratio)."""
        rounds = self.args.slow_reps + 2 if slow else 15
        min_time = 0.0 if slow else (0.05 if self.quick else 1.0)
        try:
            times = time_paired(contenders, rounds, min_time)
        except Exception as e:  # noqa: BLE001 - a contender's failure must not end the run
            print(f"    paired timing skipped ({case} {variant}): {first_line(e)}", flush=True)
            return
        group = dict(section=section, case=case, variant=variant, device="cpu", dtype=dtype,
                     threads=threads, baseline=baseline, rounds=len(times[baseline]),
                     times=times)
        self.paired.append(group)
        for name in times:
            if name != baseline:
                r = self.paired_ratio(section, case, [baseline], name, variant, group)
                print(f"      paired {name:22s} vs {baseline:18s} {r['median']:7.2f}x "
                      f"(rounds {r['rounds']}, range {r['min']:.2f}-{r['max']:.2f})", flush=True)

    def paired_ratio(self, section, case, slower, faster, variant="", group=None):
        """Median over the rounds of one interleaved group of min(times of ``slower``) / time of
        ``faster`` (e.g. the best lapx solver vs ours), with its range; None if not measured."""
        if group is None:
            group = next((g for g in self.paired
                          if (g["section"], g["case"], g["variant"]) == (section, case, variant)
                          and g["threads"] == self.args.threads), None)
        if group is None or faster not in group["times"] or \
                not all(n in group["times"] for n in slower):
            return None
        t = group["times"]
        ratios = sorted(min(t[n][i] for n in slower) / t[faster][i]
                        for i in range(len(t[faster])))
        return dict(median=statistics.median(ratios), min=ratios[0], max=ratios[-1],
                    rounds=len(ratios))

    def _flush_buffer(self):
        if self.flush is None:
            self.flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
        return self.flush

    def check_failed(self, section, case, contender, device, err, **kw):
        """A parity check whose contender raised: unavailable (not a failure) or an error."""
        if is_unavailable(err):
            return self.check(section, case, contender, device, None,
                              f"unavailable: {first_line(err)}", status="unavailable", **kw)
        return self.check(section, case, contender, device, False, f"error: {first_line(err)}",
                          status="error", **kw)

    def check(self, section, case, contender, device, passed, detail, variant="", dtype="",
              threads=None, status="ok", errors=None):
        row = dict(section=section, case=case, variant=variant, contender=contender,
                   device=device, dtype=dtype, threads=threads, passed=passed, detail=detail,
                   status=status, errors=errors)
        self.parity.append(row)
        flag = {True: "ok  ", False: "FAIL", None: "--  "}[passed]
        print(f"    parity {flag} {contender:24s} {variant:10s} {dtype:5s} {detail}", flush=True)
        return row

    def _echo(self, row):
        if self.args.verbose:
            t = "unavailable" if row["median_s"] is None else fmt_time(row["median_s"])
            print(f"      {row['contender']:24s} {row['variant']:20s} {t}", flush=True)

    # -- output -----------------------------------------------------------------------------
    def finish_ratios(self):
        """speedup = baseline median / row median, with the baseline from the same group."""
        index = {}
        for r in self.rows:
            key = (r["section"], r["case"], r["variant"], r["device"], r["dtype"],
                   r["threads"], r["timing"])
            index[key + (r["contender"],)] = r
        for r in self.rows:
            key = (r["section"], r["case"], r["variant"], r["device"], r["dtype"],
                   r["threads"], r["timing"])
            base = index.get(key + (r["baseline"],))
            if base and base["median_s"] and r["median_s"]:
                r["speedup"] = base["median_s"] / r["median_s"]

    def print_tables(self):
        for section, title in self.titles.items():
            rows = [r for r in self.rows if r["section"] == section]
            if not rows:
                continue
            base = rows[0]["baseline"]
            print(f"\n== {title}: medians; x = {base} time / row time ==")
            head = (f"{'device':6s} {'thr':>3s} {'case':31s} {'variant':18s} {'dtype':5s} "
                    f"{'timing':10s} {'contender':26s} {'median':>10s} {'reps':>4s} "
                    f"{'per item':>12s} {'x':>8s}")
            print(head)
            print("-" * len(head))
            for r in rows:
                thr = "-" if r["threads"] is None else str(r["threads"])
                if r["median_s"] is None:
                    tail = f"{'ERROR' if r['status'] == 'error' else 'unavailable'}: {r['note']}"
                else:
                    per = ""
                    if r["items"]:
                        scale = 1e6 if r["unit"].startswith("us") else 1e9
                        per = f"{r['median_s'] / r['items'] * scale:.1f} {r['unit']}"
                    x = f"{r['speedup']:.2f}x" if r["speedup"] else ""
                    tail = (f"{fmt_time(r['median_s']):>10s} {r['reps']:>4d} {per:>12s} "
                            f"{x:>8s}")
                print(f"{r['device']:6s} {thr:>3s} {r['case']:31s} {r['variant']:18s} "
                      f"{r['dtype']:5s} {r['timing']:10s} {r['contender']:26s} {tail}"
                      + (f"  ({r['note']})" if r["median_s"] is not None and r["note"] else ""))

    def print_parity(self):
        for r in self.rows:
            if r["status"] == "error":
                print(f"\n  ERROR while timing {r['contender']} ({r['device']} {r['case']} "
                      f"{r['variant']} {r['dtype']}): {r['note']}")
        fails = [p for p in self.parity if p["passed"] is False]
        print(f"\n== Parity: {len(self.parity)} checks, {len(fails)} failed ==")
        for p in fails:
            print(f"  FAIL {p['section']} {p['case']} {p['variant']} {p['dtype']} "
                  f"{p['contender']} ({p['device']}): {p['detail']}")

    def write_json(self, path, meta):
        """results, parity and paired groups as JSON, under ``meta`` (see machine_meta)."""
        with open(path, "w") as f:
            json.dump(dict(meta=meta, results=self.rows, parity=self.parity, paired=self.paired),
                      f, indent=1)
        print(f"\nwrote {path}")


def machine_meta():
    """The command, date, machine and library versions a JSON result is read against."""
    return dict(
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        machine=platform.node(), cpu=cpu_name(), cpu_count=os.cpu_count(),
        platform=platform.platform(), python=platform.python_version(),
        torch=torch.__version__, torch_cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        versions=library_versions())


def fmt_time(s):
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def library_versions():
    out = {}
    for name in ("numpy", "scipy", "torchvision", "lap"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - optional packages
            out[name] = None
    return out
