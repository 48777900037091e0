"""common/logger.py (console line, log.txt with DETR's keys, TensorBoard) and bench/plot_logs.py,
checked against hand-computed values and against files read back with independent readers
(json, TensorBoard's own event reader, PIL)."""
import importlib.util
import io
import json
import math
import os

import pytest

from common.logger import Logger, detr_log_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# COCOeval.stats order for bbox, written out by hand from pycocotools' COCOeval.summarize()
COCO_ORDER = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm",
              "ARl"]

WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_ce_0": 2.0,
           "loss_bbox_0": 5.0, "loss_giou_0": 2.0, "loss_ce_enc": 2.0, "loss_lapd": 3.0,
           "loss_lapd_0": 3.0, "loss_agfd": 0.5}


def _values(i):
    v = {k: 0.1 * (j + 1) + 0.01 * i for j, k in enumerate(WEIGHTS)}
    v["loss"] = sum(v[k] * WEIGHTS[k] for k in WEIGHTS)
    v["lr"] = 1e-3
    return v


def _epoch_stats(epoch, ap):
    stats = {"epoch": epoch, "train_loss": 3.0 - epoch, "train_kd": 1.0 / (epoch + 1),
             "n_parameters": 1234}
    stats.update({f"test_{name}": ap + 0.01 * k for k, name in enumerate(COCO_ORDER)})
    return stats


def test_console_shows_kd_terms_and_hides_aux_layers():
    out = io.StringIO()
    log = Logger(None, print_every=2, enabled=True, stream=out)
    log.start_epoch(3, 4)
    for i in range(4):
        log.iteration(i, _values(i), WEIGHTS)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("Epoch [3] [2/4] ")
    words = lines[-1].split()
    shown = dict(zip(words[3::2], words[4::2]))  # "Epoch [3] [4/4] name value ..."
    assert list(shown)[:6] == ["loss", "loss_ce", "loss_bbox", "loss_giou", "loss_lapd",
                               "loss_agfd"]
    assert "kd" in shown and "lr" in shown
    for hidden in ("loss_ce_0", "loss_bbox_0", "loss_ce_enc", "loss_lapd_0"):
        assert hidden not in shown
    # kd = weighted sum of every KD term of every layer, averaged over the 4 iterations
    kd = sum(_values(i)[k] * WEIGHTS[k] for i in range(4)
             for k in ("loss_lapd", "loss_lapd_0", "loss_agfd")) / 4
    assert float(shown["kd"]) == pytest.approx(kd, abs=1e-4)
    assert float(shown["loss_lapd"]) == pytest.approx(
        sum(_values(i)["loss_lapd"] for i in range(4)) / 4, abs=1e-4)
    assert log.means()["kd"] == pytest.approx(kd, rel=1e-12)


def test_log_txt_has_detr_keys(tmp_path):
    log = Logger(str(tmp_path), enabled=True, stream=io.StringIO())
    for e in range(2):
        log.epoch(_epoch_stats(e, 0.1 * e))
    log.close()
    lines = [json.loads(t) for t in (tmp_path / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    for e, line in enumerate(lines):
        assert line["train_loss"] == 3.0 - e and line["n_parameters"] == 1234
        assert line["test_coco_eval_bbox"] == [0.1 * e + 0.01 * k for k in range(12)]
        assert line["test_coco_eval_bbox"][COCO_ORDER.index("AP50")] == line["test_AP50"]
    # no COCO stats (an epoch without evaluation): no list is made up
    assert "test_coco_eval_bbox" not in detr_log_line({"epoch": 0, "train_loss": 1.0})


def test_other_processes_keep_means_but_write_nothing(tmp_path):
    out = io.StringIO()
    log = Logger(str(tmp_path), tensorboard=False, print_every=1, enabled=False, stream=out)
    log.start_epoch(0, 2)
    log.iteration(0, {"loss": 1.0, "lr": 0.1}, {})
    log.iteration(1, {"loss": 3.0, "lr": 0.1}, {})
    log.epoch(_epoch_stats(0, 0.2))
    assert log.means() == {"loss": 2.0, "lr": 0.1}
    assert out.getvalue() == "" and not (tmp_path / "log.txt").exists()
    # the main process of a run without console output still writes log.txt
    quiet = Logger(str(tmp_path), print_every=1, enabled=True, console=False, stream=out)
    quiet.start_epoch(0, 1)
    quiet.iteration(0, {"loss": 1.0}, {})
    quiet.epoch(_epoch_stats(0, 0.2))
    assert out.getvalue() == "" and (tmp_path / "log.txt").exists()


def test_tensorboard_needs_an_output_folder():
    with pytest.raises(ValueError, match="output"):
        Logger(None, tensorboard=True, enabled=True)


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    log = Logger(str(tmp_path), tensorboard=True, print_every=100, enabled=True,
                 stream=io.StringIO())
    weights = dict(WEIGHTS)
    for epoch in range(2):
        log.start_epoch(epoch, 3)
        for it in range(3):
            step = epoch * 3 + it
            if step == 4:
                weights["loss_agfd"] = 0.25  # a weight that changes is recorded when it does
            log.iteration(step, _values(step), weights)
        log.epoch(_epoch_stats(epoch, 0.1 + 0.1 * epoch))
    log.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for k in WEIGHTS:
        assert f"train/{k}" in tags and f"train_weighted/{k}" in tags and f"weight/{k}" in tags
    assert {"train/loss", "train/lr", "train/kd", "test/AP", "test/AP50",
            "epoch/train_loss"} <= tags
    lapd = acc.Scalars("train/loss_lapd")
    assert [e.step for e in lapd] == list(range(6))
    assert [e.value for e in lapd] == pytest.approx([_values(s)["loss_lapd"] for s in range(6)])
    weighted = acc.Scalars("train_weighted/loss_agfd")
    assert [e.value for e in weighted] == pytest.approx(
        [_values(s)["loss_agfd"] * (0.5 if s < 4 else 0.25) for s in range(6)])
    agfd_w = [(e.step, e.value) for e in acc.Scalars("weight/loss_agfd")]
    assert agfd_w == [(0, 0.5), (3, 0.5), (4, 0.25)]  # each epoch's start, and the change
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("test/AP")] == [(0, 0.1), (1, 0.2)]


def _plot_logs():
    spec = importlib.util.spec_from_file_location("plot_logs",
                                                  os.path.join(ROOT, "bench", "plot_logs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_logs_draws_runs_from_their_log_txt(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image
    runs = []
    for name, aps in (("baseline", (0.05, 0.08)), ("qskd", (0.06, 0.11))):
        log = Logger(str(tmp_path / name), enabled=True, stream=io.StringIO())
        for e, ap in enumerate(aps):
            stats = _epoch_stats(e, ap)
            if name == "baseline":
                del stats["train_kd"]
            log.epoch(stats)
        runs.append(str(tmp_path / name))
    # a DETR-style line that has only the COCOeval list: AP comes from it
    detr = tmp_path / "detr"
    detr.mkdir()
    (detr / "log.txt").write_text(json.dumps({"epoch": 0, "train_loss": 2.0,
                                              "test_coco_eval_bbox": [0.3] + [0.0] * 11}) + "\n")
    plot = _plot_logs()
    png = tmp_path / "curves.png"
    drawn = plot.plot_logs(runs + [str(detr)], str(png))
    assert drawn["baseline"]["AP"] == ([0, 1], [0.05, 0.08])
    assert drawn["qskd"]["AP50"] == ([0, 1], [pytest.approx(0.07), pytest.approx(0.12)])
    assert "kd" not in drawn["baseline"] and drawn["qskd"]["kd"] == ([0, 1], [1.0, 0.5])
    assert drawn["detr"]["AP"] == ([0], [0.3])
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1] > 100
    with pytest.raises(FileNotFoundError, match="log.txt"):
        plot.plot_logs([str(tmp_path / "nowhere")], str(png))
    assert math.isfinite(drawn["qskd"]["loss"][1][0])
