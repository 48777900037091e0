"""Loss and AP curves of several runs in one PNG, read from their log.txt files.

    python bench/plot_logs.py outputs/baseline outputs/qskd --output curves.png
    python bench/plot_logs.py outputs/* --fields loss kd loss_ce --labels base qskd

Each RUN_DIR is a folder with the ``log.txt`` a training run writes (one JSON line per epoch; the
DETR repositories' format, so their logs work too). One panel per field: the training-loss
fields (``train_<field>``, epoch means) and the COCO AP fields (``test_<field>``), one line per
run. A field that a run does not have (e.g. ``kd`` for a baseline) is skipped for that run.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.evaluate import STAT_NAMES  # noqa: E402  (COCOeval's order of test_coco_eval_bbox)

DEFAULT_FIELDS = ("loss", "kd", "AP", "AP50")


def read_log(run_dir):
    """The epoch lines of ``run_dir``/log.txt (or of a log file given directly), in order."""
    path = os.path.join(run_dir, "log.txt") if os.path.isdir(run_dir) else run_dir
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no log.txt (give the output folder of a run)")
    lines = []
    with open(path) as f:
        for n, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not a JSON line ({e})") from None
    if not lines:
        raise ValueError(f"{path} is empty: the run has not finished an epoch yet")
    return lines


def series(lines, field):
    """(epochs, values) of one field: ``train_<field>`` or ``test_<field>`` (a COCO stat may also
    come from DETR's ``test_coco_eval_bbox`` list); empty lists when the run lacks it."""
    xs, ys = [], []
    for i, line in enumerate(lines):
        value = line.get(f"train_{field}", line.get(f"test_{field}", line.get(field)))
        if value is None and field in STAT_NAMES and "test_coco_eval_bbox" in line:
            value = line["test_coco_eval_bbox"][STAT_NAMES.index(field)]
        if isinstance(value, (int, float)):
            xs.append(int(line.get("epoch", i)))
            ys.append(float(value))
    return xs, ys


def plot_logs(run_dirs, output, fields=DEFAULT_FIELDS, labels=None):
    """Draw ``fields`` of every run into ``output`` (PNG); returns {label: {field: (x, y)}}."""
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    logs = [read_log(d) for d in run_dirs]
    fields = list(fields)
    drawn = {label: {} for label in labels}
    fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.2), squeeze=False)
    for ax, field in zip(axes[0], fields):
        for label, lines in zip(labels, logs):
            xs, ys = series(lines, field)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
                drawn[label][field] = (xs, ys)
        ax.set_title(field if field in STAT_NAMES else f"train {field}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if not any(drawn.values()):
        plt.close(fig)
        raise ValueError(f"none of the fields {fields} is in these logs")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return drawn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="output folders of runs (each with its log.txt)")
    parser.add_argument("--output", default="curves.png", help="the PNG to write")
    parser.add_argument("--fields", nargs="+", default=list(DEFAULT_FIELDS),
                        help="training losses (loss, kd, loss_ce, loss_agfd, ...) and COCO "
                             "stats (AP, AP50, AP75, APs, APm, APl, AR100, ...)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="legend names, one per run (default: the folder names)")
    args = parser.parse_args(argv)
    plot_logs(args.run_dirs, args.output, args.fields, args.labels)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
