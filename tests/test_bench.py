"""Smoke tests of bench/kernels.py: the quick run works end to end, its parity checks pass,
its JSON parses, and the checks it relies on do catch wrong answers. No timing asserts."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
import torch
from torchvision.ops import box_convert, generalized_box_iou

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "kernels.py")


def _load(name):
    path = os.path.join(ROOT, "bench", f"{name}.py")
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(os.path.dirname(path))
    return mod


@pytest.fixture(scope="module")
def kernels():
    return _load("kernels")


@pytest.fixture(scope="module")
def anchors():
    return _load("anchors")


@pytest.mark.slow
def test_quick_run_passes_parity_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--device", "cpu", "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torch.set_num_threads(1)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["threads"] == 1 and data["meta"]["quick"] is True
    sections = {r["section"] for r in data["results"]}
    assert sections == {"msda", "cost", "lsa", "match"}
    # Every row is either timed or says why not; the baselines always run.
    for r in data["results"]:
        assert (r["status"] == "ok") == (r["median_s"] is not None), r
        if r["status"] == "ok":
            assert r["median_s"] > 0 and r["reps"] >= 1
        else:
            assert r["note"], r
    for contender in ("fallback", "compact eager (fallback)", "scipy loop",
                      "reference DETR matcher"):
        assert any(r["contender"] == contender and r["status"] == "ok"
                   for r in data["results"]), contender
    assert all(p["passed"] is not False for p in data["parity"]), data["parity"]
    # Our ops are either checked (and passed) or reported unavailable, never silently skipped.
    for section in ("msda", "cost", "lsa", "match"):
        ours = [p for p in data["parity"] if p["section"] == section and p["contender"] == "ours"]
        assert ours, section
    # Interleaved groups (the targets' ratios): every contender timed in every round.
    if data["paired"]:
        assert {g["section"] for g in data["paired"]} == {"msda", "lsa"}
        for g in data["paired"]:
            assert g["baseline"] in g["times"] and "ours" in g["times"]
            assert all(len(t) == g["rounds"] and min(t) > 0 for t in g["times"].values())


def test_paired_ratio_is_the_median_of_per_round_ratios(kernels):
    class Args:
        threads, slow_reps, quick = 1, 3, True
    bench = kernels.KernelBench.__new__(kernels.KernelBench)
    bench.args, bench.paired = Args(), []
    # rounds where the machine is 1x, 2x and 3x slower: the per-round ratios stay put
    times = {"ours": [1.0, 2.0, 3.0, 1.0, 1.0], "a": [4.0, 8.0, 15.0, 3.0, 4.0],
             "b": [5.0, 7.0, 12.0, 5.0, 2.0]}
    bench.paired.append(dict(section="lsa", case="c", variant="", threads=1, times=times,
                             baseline="a", rounds=5))
    r = bench.paired_ratio("lsa", "c", ["a"], "ours")
    assert (r["median"], r["min"], r["max"], r["rounds"]) == (4.0, 3.0, 5.0, 5)
    r = bench.paired_ratio("lsa", "c", ["a", "b"], "ours")  # the faster of a and b per round
    assert (r["median"], r["min"], r["max"]) == (3.5, 2.0, 4.0)
    assert bench.paired_ratio("lsa", "c", ["lapx"], "ours") is None
    assert bench.paired_ratio("msda", "c", ["a"], "ours") is None


def test_bad_arguments_give_clear_errors(kernels, capsys):
    for argv in (["--only", "msda,nope"], ["--threads", "0"], ["--reps", "0"]):
        with pytest.raises(SystemExit) as e:
            kernels.parse_args(argv)
        assert e.value.code == 2
        assert argv[0] in capsys.readouterr().err
    args = kernels.parse_args(["--only", "lsa,match", "--quick"])
    assert args.sections == ["lsa", "match"] and args.threads == 1


def test_reference_matcher_agrees_with_independent_float64_cost(anchors, kernels):
    """The anchor reproduces DETR's cost: check one image block against a float64 formula
    written out here, and the assignment against scipy on that float64 cost."""
    torch.manual_seed(0)
    logits, boxes, targets = kernels.match_inputs(3, 30, 6, "cpu", seed=1)
    for class_cost in ("focal", "softmax"):
        kw = kernels.cost_weights(class_cost)
        full = anchors.detr_matcher_cost(logits, boxes, targets, **kw)  # (B, Q, sum T)
        assert full.shape == (3, 30, 18)
        b = 1
        lg, bx, t = logits[b].double(), boxes[b].double(), targets[b]
        if class_cost == "focal":
            p = lg.sigmoid()[:, t["labels"]]
            cls = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p ** 2 * -torch.log(
                1 - p + 1e-8)
        else:
            cls = -lg.softmax(-1)[:, t["labels"]]
        l1 = torch.cdist(bx, t["boxes"].double(), p=1)
        giou = generalized_box_iou(box_convert(bx, "cxcywh", "xyxy"),
                                   box_convert(t["boxes"].double(), "cxcywh", "xyxy"))
        ref = kw["w_class"] * cls + 5 * l1 - 2 * giou
        torch.testing.assert_close(full[b, :, 6:12].double(), ref, rtol=1e-5, atol=1e-5)
        compact = anchors.compact_costs(logits, boxes, targets, **kw, dtype=torch.float64)
        torch.testing.assert_close(compact[b], ref, rtol=1e-12, atol=1e-12)
        got = anchors.detr_matcher(logits, boxes, targets, **kw)
        r, c = scipy.optimize.linear_sum_assignment(ref.numpy())
        assert np.array_equal(got[b][0].numpy(), r) and np.array_equal(got[b][1].numpy(), c)


def test_parity_checks_catch_wrong_results(kernels):
    """The msda parity check fails on a kernel that is slightly off, and the assignment
    comparison notices a swapped pair: the bench's gates can fail."""
    from common import ops

    class FakeBench:
        def __init__(self):
            self.rows = []

        def check(self, *a, **k):
            self.rows.append((a, k))
            return a[4]

    inp = kernels.msda_inputs([(6, 5), (3, 4)], 1, 7, "uniform", encoder=False)
    ref = kernels._msda_reference(inp, "cpu", torch.float32)
    fb = FakeBench()

    def exact(v, s, i, loc, w):
        return ops.ms_deform_attn_fallback(v, s, loc, w)

    def off(v, s, i, loc, w):
        return ops.ms_deform_attn_fallback(v, s, loc, w) * (1 + 1e-3)
    assert kernels._msda_parity(fb, "c", "uniform", "exact", exact, inp, ref, "cpu",
                                torch.float32, 1) is True
    assert kernels._msda_parity(fb, "c", "uniform", "off", off, inp, ref, "cpu",
                                torch.float32, 1) is False
    a = [(torch.tensor([0, 1]), torch.tensor([1, 0]))]
    b = [(torch.tensor([0, 1]), torch.tensor([0, 1]))]
    assert kernels._assignments_equal(a, a) and not kernels._assignments_equal(a, b)


def test_msda_inputs_cover_borders_and_outside(kernels):
    levels = [(6, 5), (3, 4)]
    inp = kernels.msda_inputs(levels, 1, 40, "uniform", encoder=False)
    loc = inp["sampling_locations"]
    assert loc.shape == (1, 40, 8, 2, 4, 2)
    assert (loc < 0).any() and (loc > 1).any()  # points outside the map
    assert (loc == 0).any() and (loc == 1).any()  # exactly on its borders
    w = inp["attention_weights"].flatten(-2).sum(-1)
    torch.testing.assert_close(w, torch.ones_like(w), rtol=0, atol=1e-12)
    enc = kernels.msda_inputs(levels, 1, 42, "clustered", encoder=True)
    assert enc["value"].shape == (1, 42, 8, 32)
    # clustered: most points within a few pixels of their own token's centre
    centres = torch.cat([kernels._token_centres(h, w) for h, w in levels])  # (S, 2)
    dist = (enc["sampling_locations"][0] - centres[:, None, None, None, :]).abs()
    px = dist * torch.tensor([[5.0, 6.0], [4.0, 3.0]])[None, None, :, None, :]
    assert px.median() < 3


def test_run_fails_on_wrong_assignment_or_error(kernels, monkeypatch, capsys):
    """End to end: an assignment op that returns a worse matching, or that raises, makes the
    run report it and exit 1 (while other contenders still run)."""
    from common import ops
    if ops.backend("cpu") != "ext":
        pytest.skip("our rows are unavailable without the extension")
    real = ops.linear_sum_assignment

    def swapped(cost, sizes=None, validate=True):
        out = real(cost, sizes, validate)
        return [(r, torch.cat([c[1:2], c[:1], c[2:]])) for r, c in out]
    monkeypatch.setattr(ops, "linear_sum_assignment", swapped)
    assert kernels.main(["--quick", "--only", "lsa"]) == 1
    assert "parity FAIL ours" in capsys.readouterr().out

    def broken(*a, **k):
        raise ValueError("deliberately broken")
    monkeypatch.setattr(ops, "linear_sum_assignment", broken)
    assert kernels.main(["--quick", "--only", "lsa"]) == 1
    out = capsys.readouterr().out
    assert "deliberately broken" in out and "scipy loop" in out


# ------------------------------------------------------------------------------------------
# bench/distill.py
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def distill_bench():
    return _load("distill")


def test_distill_run_specs(distill_bench):
    assert distill_bench.parse_run("qskd") == ("qskd", "qskd", [])
    assert distill_bench.parse_run("no-feat=qskd:--no-feature-kd --seed-x 1") == \
        ("no-feat", "qskd", ["--no-feature-kd", "--seed-x", "1"])
    with pytest.raises(ValueError, match="must be one of"):
        distill_bench.parse_run("fitnet")


def test_distill_summary_mean_spread_and_gain(distill_bench):
    rec = [dict(label=l, method=m, seed=s, AP=ap, AP50=ap50, iter_time_s=t, peak_mem_mb=mb)
           for l, m, s, ap, ap50, t, mb in [
               ("baseline", "baseline", 0, 0.10, 0.30, 0.2, 500),
               ("baseline", "baseline", 1, 0.12, 0.34, 0.3, 510),
               ("baseline", "baseline", 2, 0.11, 0.32, 0.1, 505),
               ("kd", "qskd", 0, 0.125, 0.36, 0.5, 700),
               ("kd", "qskd", 1, 0.125, 0.36, 0.4, 720),
               ("kd", "qskd", 2, 0.125, 0.36, 0.6, 710),
               ("weak", "gdetkd", 0, 0.12, 0.33, 0.9, 900),
               ("weak", "gdetkd", 1, 0.11, 0.33, 0.9, 900),
               ("weak", "gdetkd", 2, 0.13, 0.33, 0.9, 900),
               ("strong", "detrdistill", 0, 0.14, 0.40, 0.8, 800),
               ("strong", "detrdistill", 1, 0.17, 0.40, 0.8, 800),
               ("strong", "detrdistill", 2, 0.15, 0.40, 0.8, 800)]]
    table, text = distill_bench.summarize(rec, {"test_AP": 0.3, "test_AP50": 0.6})
    rows = {t["label"]: t for t in table}
    # hand-computed: baseline AP 10, 12, 11 -> mean 11, sample sd 1; AP50 30, 34, 32 -> 32, 2
    assert rows["baseline"]["AP"] == pytest.approx((11.0, 1.0))
    assert rows["baseline"]["AP50"] == pytest.approx((32.0, 2.0))
    assert rows["baseline"]["iter_time_s"] == 0.2 and rows["baseline"]["peak_mem_mb"] == 510
    # paired by seed: kd - baseline = 2.5, 0.5, 1.5 -> mean 1.5, sd 1; weak: 2, -1, 2 -> 1, sd
    # sqrt(3); p from the paired t statistic mean / (sd / sqrt(n)) with n - 1 = 2 degrees of
    # freedom, computed here from the t distribution's closed form for 2 d.o.f.:
    # p = 1 - |t| / sqrt(2 + t^2)
    assert rows["kd"]["gain"] == pytest.approx((1.5, 1.0))
    assert rows["weak"]["gain"] == pytest.approx((1.0, 3 ** 0.5))
    t_kd, t_weak = 1.5 / (1.0 / 3 ** 0.5), 1.0 / (3 ** 0.5 / 3 ** 0.5)
    assert rows["kd"]["p"] == pytest.approx(1 - t_kd / (2 + t_kd ** 2) ** 0.5)
    assert rows["weak"]["p"] == pytest.approx(1 - t_weak / (2 + t_weak ** 2) ** 0.5)
    assert rows["kd"]["wins"] == (3, 3) and rows["weak"]["wins"] == (2, 3)
    # clear needs every seed won and p < 0.05: kd wins 3/3 but p = 0.12; weak loses a seed;
    # strong: 4, 5, 4 -> mean 13/3, sd 1/sqrt(3), t = 13, p = 1 - 13 / sqrt(171) = 0.006
    assert not rows["kd"]["clear"] and not rows["weak"]["clear"]
    assert rows["strong"]["p"] == pytest.approx(1 - 13 / 171 ** 0.5) and rows["strong"]["clear"]
    # two seeds are never called clear, however small p is
    two, _ = distill_bench.summarize([r for r in rec if r["seed"] < 2], None)
    assert not {t["label"]: t for t in two}["strong"]["clear"]
    assert "gain" not in rows["baseline"]
    assert "| teacher | 30.0 | 60.0 |" in text and "| kd | 12.5 ± 0.0 |" in text
    assert "| +1.5 ± 1.0 | 3/3 |" in text


@pytest.mark.slow
def test_distill_bench_end_to_end_and_reuse(tmp_path, distill_bench, monkeypatch):
    """Two tiny runs (baseline and CLoCKDistill) through the real scripts, then the same command
    again reuses them without training."""
    cache = str(tmp_path / "cache")
    data = ["--synth-num-train", "4", "--synth-num-val", "2", "--data-cache", cache,
            "--max-iters", "1", "--num-workers", "0"]
    sys.path.insert(0, os.path.join(ROOT, "methods"))
    import baseline
    baseline.main(["--preset", "cpu-tiny", "--output-dir", str(tmp_path / "teacher"),
                   "--threads", "1"] + data)
    argv = ["--runs", "baseline", "kd=clockdistill:--no-lcmd", "--seeds", "3",
            "--student-preset", "cpu-tiny", "--teacher", str(tmp_path / "teacher" / "checkpoint.pth"),
            "--output-dir", str(tmp_path / "bench"), "--threads", "1", "--num-workers", "0",
            "--json", str(tmp_path / "out.json")] + data[:-2]
    table = distill_bench.main(argv)
    assert [t["label"] for t in table] == ["baseline", "kd"]
    assert all(len(t["AP_per_seed"]) == 1 for t in table) and "gain" in table[1]
    log = json.load(open(tmp_path / "out.json"))
    assert [r["seed"] for r in log["records"]] == [3, 3] and log["teacher_stats"]["test_AP"] >= 0
    assert all("--seed 3" in r["command"] for r in log["records"])
    assert all(r["iter_time_s"] > 0 and r["peak_mem_mb"] > 0 for r in log["records"])
    monkeypatch.setattr(distill_bench.subprocess, "run",
                        lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = distill_bench.main(argv)
    assert [t["AP"] for t in again] == [t["AP"] for t in table]


# ------------------------------------------------------------------------------------------
# bench/clockdistill_probe.py
# ------------------------------------------------------------------------------------------

class _TinySet(torch.utils.data.Dataset):
    """Three images with 2, 0 and 3 objects (normalised cxcywh), 5 classes."""
    num_classes = 5

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.items = []
        for n in (2, 0, 3):
            c = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
            wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
            self.items.append((torch.rand(3, 64, 80, generator=g),
                               dict(labels=torch.randint(0, 5, (n,), generator=g),
                                    boxes=torch.cat([c, wh], 1), size=torch.tensor([64, 80]))))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_clockdistill_probe_reads_each_objects_own_query(monkeypatch):
    """With two query groups and extra random queries in the pass, every object is scored by the
    answer to its own group-0 query: a decoder that answers each query with its reference box
    gives IoU 1 for all of them (a wrong slot would read another object or a random box)."""
    probe = _load("clockdistill_probe")
    from common.detr import build_model
    teacher = build_model("deformable_detr", 5, backbone="tiny", width=8, hidden_dim=32,
                          nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64,
                          num_queries=10, num_feature_levels=3, with_box_refine=True).eval()
    cfg = probe.clockdistill.CLoCKConfig(query_groups=2, extra_random_queries=3)

    def echo(model, enc, queries):  # (L,N,C) logits, (L,N,4) boxes: each query's own box
        boxes = torch.cat([q.reference[0] for q in queries if q.content.shape[1]])
        L = model.cfg.dec_layers
        return torch.zeros(L, len(boxes), 5), boxes[None].repeat(L, 1, 1)
    monkeypatch.setattr(probe.clockdistill.CLoCKDistiller, "decode_each", staticmethod(echo))
    rows = probe.probe(teacher, _TinySet(), cfg, "cpu", batch_size=3)
    assert len(rows["target-aware"]) == len(rows["own queries"]) == 5
    for w, correct, iou in rows["target-aware"]:
        assert w == 0.5 and correct in (True, False) and abs(iou - 1.0) < 1e-6
    for w, correct, iou in rows["own queries"]:
        assert 0.0 <= w <= 1.0 and 0.0 <= iou <= 1.0
    text = probe.summary(rows)
    assert "| target-aware | 5 | 0.500 |" in text and "100.0% |" in text
