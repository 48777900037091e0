"""Distillation benchmark on the embedded data: teacher, baseline student and each method over
several seeds; AP / AP50 mean and spread, time per iteration and peak memory.

    python bench/distill.py                                  # baseline student, seeds 0 1 2
    python bench/distill.py --runs baseline qskd detrdistill clockdistill gdetkd
    python bench/distill.py --runs baseline "qskd-no-feat=qskd:--no-feature-kd"   # an ablation
    python bench/distill.py --jobs 2 --threads 1             # two runs at a time, 1 thread each

A run is ``LABEL=METHOD:ARGS`` or just ``METHOD`` (baseline, detrdistill, qskd, clockdistill,
gdetkd): ``methods/METHOD.py --preset STUDENT_PRESET --seed S --teacher T ARGS`` (the baseline
gets no teacher). Every run of a table uses the same student preset, schedule, data and seeds;
the teacher is trained once with ``methods/baseline.py --preset TEACHER_PRESET`` and cached
(common.distill.ensure_teacher), or given with ``--teacher``. Finished runs are reused (their
command is stored beside log.txt) unless ``--force``. The last epoch's COCO AP of each run is
read from its log.txt, with ``iter_time_s`` (median seconds per training iteration, data
loading included) and ``peak_mem_mb`` (peak resident memory of the process, CUDA memory on a
GPU) that common/engine.py logs.

Spread is the sample standard deviation over seeds. A method's gain is paired by seed: its AP
minus the baseline's AP at the same seed, over the seeds both have; the table gives the mean and
sample standard deviation of those differences, how many seeds the method won, and the two-sided
p-value of a paired t-test (scipy.stats.ttest_rel; with few seeds it says little, and a gain is
only called clear when it has at least 3 seeds, wins on every one and p < 0.05).
"""
import argparse
import concurrent.futures
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import scipy.stats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import cli, distill  # noqa: E402

METHODS = ("baseline", "detrdistill", "qskd", "clockdistill", "gdetkd")


def parse_run(spec):
    """'qskd' or 'label=qskd:--flag value' -> (label, method, [args])."""
    head, _, extra = spec.partition(":")
    label, _, method = head.partition("=")
    method = method or label
    if method not in METHODS:
        raise ValueError(f"run {spec!r}: the method must be one of {', '.join(METHODS)}")
    return label, method, shlex.split(extra)


def run_one(label, method, extra, seed, teacher, args):
    """Train (or reuse) one run; returns its record."""
    out = os.path.join(args.output_dir, label, f"seed{seed}")
    cmd = [sys.executable, os.path.join(ROOT, "methods", f"{method}.py"),
           "--preset", args.student_preset, "--seed", str(seed), "--output-dir", out,
           "--threads", str(args.threads), "--num-workers", str(args.num_workers),
           "--print-every", "100"] + args.common + extra
    if method != "baseline":
        cmd += ["--teacher", teacher]
    shown = " ".join(shlex.quote(c) for c in ["python", os.path.relpath(cmd[1], ROOT)] + cmd[2:])
    log_file, cmd_file = os.path.join(out, "log.txt"), os.path.join(out, "command.json")
    done = (os.path.isfile(cmd_file) and _read_json(cmd_file) == cmd[1:]
            and os.path.isfile(log_file) and _epochs_done(log_file) >= _epochs(args, extra))
    if args.force or not done:
        if os.path.isdir(out):
            for name in ("log.txt", "checkpoint.pth", "command.json"):
                if os.path.exists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
        os.makedirs(out, exist_ok=True)
        print(f"[{label} seed {seed}] {shown}", flush=True)
        t0 = time.time()
        with open(os.path.join(out, "stdout.txt"), "w") as f:
            # --overwrite: a rerun replaces the folder's previous run (kept copies included)
            proc = subprocess.run(cmd + ["--overwrite"], stdout=f, stderr=subprocess.STDOUT,
                                  cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"[{label} seed {seed}] failed (exit {proc.returncode}); see "
                               f"{os.path.join(out, 'stdout.txt')}")
        with open(cmd_file, "w") as f:
            json.dump(cmd[1:], f)
        with open(os.path.join(out, "wall_s.txt"), "w") as f:
            f.write(f"{time.time() - t0:.1f}\n")
    last = distill.last_log_line(os.path.join(out, "checkpoint.pth"))
    wall = os.path.join(out, "wall_s.txt")
    return {"label": label, "method": method, "seed": seed, "command": shown,
            "AP": last["test_AP"], "AP50": last["test_AP50"],
            "iter_time_s": last.get("train_iter_time_s"), "peak_mem_mb": last.get("train_peak_mem_mb"),
            "wall_s": float(_read_json(wall)) if os.path.isfile(wall) else None}


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _epochs_done(log_file):
    with open(log_file) as f:
        return sum(1 for line in f if line.strip())


def _epochs(args, extra):
    for flags in (extra, args.common):
        if "--epochs" in flags:
            return int(flags[flags.index("--epochs") + 1])
    return cli.PRESETS[args.student_preset]["epochs"]


def summarize(records, teacher_stats):
    """Rows of mean / spread per label, with the gain over the baseline."""
    rows = {}
    for r in records:
        rows.setdefault(r["label"], []).append(r)

    def ms(values):
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    table = []
    for label, rs in rows.items():
        ap, ap50 = ms([100 * r["AP"] for r in rs]), ms([100 * r["AP50"] for r in rs])
        table.append({"label": label, "method": rs[0]["method"], "seeds": [r["seed"] for r in rs],
                      "AP": ap, "AP50": ap50, "AP_per_seed": [100 * r["AP"] for r in rs],
                      "iter_time_s": statistics.median([r["iter_time_s"] for r in rs
                                                        if r["iter_time_s"] is not None] or [0]),
                      "peak_mem_mb": max([r["peak_mem_mb"] or 0 for r in rs])})
    base = next((t for t in table if t["method"] == "baseline"), None)
    base_ap = {r["seed"]: 100 * r["AP"] for r in rows[base["label"]]} if base else {}
    for t in table:
        if base is None or t is base:
            continue
        mine = {r["seed"]: 100 * r["AP"] for r in rows[t["label"]]}
        seeds = [s for s in sorted(mine) if s in base_ap]       # the seeds both have
        if not seeds:
            continue
        ours, theirs = [mine[s] for s in seeds], [base_ap[s] for s in seeds]
        diffs = [a - b for a, b in zip(ours, theirs)]
        t["gain"] = ms(diffs)
        t["wins"] = (sum(d > 0 for d in diffs), len(diffs))
        t["p"] = (float(scipy.stats.ttest_rel(ours, theirs).pvalue) if len(diffs) > 1
                  else None)
        t["clear"] = (len(diffs) >= 3 and t["wins"][0] == len(diffs) and t["p"] is not None
                      and t["p"] < 0.05)
    lines = ["| run | AP (mean ± sd) | AP50 (mean ± sd) | AP per seed | paired gain (mean ± sd) "
             "| won | p | clear | s/iter | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if teacher_stats:
        lines.append(f"| teacher | {100 * teacher_stats['test_AP']:.1f} | "
                     f"{100 * teacher_stats['test_AP50']:.1f} | | | | | | "
                     f"{teacher_stats.get('train_iter_time_s', 0) or 0:.3f} | "
                     f"{teacher_stats.get('train_peak_mem_mb', 0) or 0:.0f} |")
    for t in table:
        if "gain" in t:
            gain = f"{t['gain'][0]:+.1f} ± {t['gain'][1]:.1f}"
            won = f"{t['wins'][0]}/{t['wins'][1]}"
            p = ("-" if t["p"] is None else f"{t['p']:.3f}" if t["p"] >= 0.001 else "< 0.001")
            clear = "yes" if t["clear"] else "no"
        else:
            gain = won = p = clear = ""
        lines.append(f"| {t['label']} | {t['AP'][0]:.1f} ± {t['AP'][1]:.1f} | "
                     f"{t['AP50'][0]:.1f} ± {t['AP50'][1]:.1f} | "
                     f"{' / '.join(f'{a:.1f}' for a in t['AP_per_seed'])} | {gain} | {won} | "
                     f"{p} | {clear} | {t['iter_time_s']:.3f} | {t['peak_mem_mb']:.0f} |")
    return table, "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--runs", nargs="+", default=["baseline"],
                        help="METHOD or LABEL=METHOD:ARGS (see above)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teacher", default=None, help="teacher checkpoint (default: cached)")
    parser.add_argument("--teacher-preset", default="cpu-teacher", choices=sorted(cli.PRESETS))
    parser.add_argument("--student-preset", default="cpu-student", choices=sorted(cli.PRESETS))
    parser.add_argument("--output-dir", default=os.path.join(ROOT, "outputs", "bench_distill"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--num-workers", type=int, default=1, help="data loader workers per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--force", action="store_true", help="rerun finished runs")
    parser.add_argument("--json", default=None, help="also write the records and table here")
    args, common = parser.parse_known_args(argv)
    args.common = common  # other flags (e.g. --epochs 4, --synth hard) go to every run
    runs = [parse_run(s) for s in args.runs]
    if len({label for label, _, _ in runs}) != len(runs):
        raise ValueError("two runs share a label; name them LABEL=METHOD:ARGS")

    teacher, teacher_stats = args.teacher, None
    if any(m != "baseline" for _, m, _ in runs) or teacher is None:
        # a teacher trained here gets all the threads the runs share
        # (the data flags among ``common`` select the teacher's data; ensure_teacher takes
        # the schedule from the teacher preset)
        targs, _ = distill.build_parser("teacher").parse_known_args(
            common + ["--teacher-preset", args.teacher_preset, "--threads",
                      str(args.threads * args.jobs), "--num-workers", str(args.num_workers)]
            + (["--teacher", teacher] if teacher else []))
        targs = distill.resolve(targs)
        t0 = time.time()
        teacher = distill.ensure_teacher(targs)
        if time.time() - t0 > 10:
            print(f"teacher: trained in {time.time() - t0:.0f} s wall "
                  f"({args.threads * args.jobs} threads)", flush=True)
        teacher_stats = distill.last_log_line(teacher)

    jobs = [(label, method, extra, seed, teacher, args)
            for label, method, extra in runs for seed in args.seeds]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        records = list(pool.map(lambda j: run_one(*j), jobs))
    table, text = summarize(records, teacher_stats)
    print(f"\nteacher: {teacher}\nstudent preset {args.student_preset}, seeds {args.seeds}, "
          f"{args.threads} thread(s) per run, {args.jobs} run(s) at a time\n")
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"teacher": teacher, "teacher_stats": teacher_stats, "records": records,
                       "table": table}, f, indent=1)
    return table


if __name__ == "__main__":
    main()
