"""The training record of a run: a console line, ``log.txt`` JSON lines, optional TensorBoard.

    logger = Logger(output_dir, tensorboard=args.tensorboard, print_every=10)
    logger.start_epoch(epoch, num_iters)
    for it, batch in enumerate(loader):
        ...
        logger.iteration(step, {"loss": total, **losses, "lr": lr}, weight_dict)
    means = logger.means()              # running means of this epoch (every process keeps them)
    logger.epoch({"epoch": epoch, "train_loss": ..., "test_AP": ..., "n_parameters": ...})
    logger.close()

Every process keeps the running means (they are averaged over processes afterwards); only the
main process (rank 0) prints and writes.

- The console line shows the weighted total ``loss``, the last decoder layer's detection terms
  (``loss_ce``, ``loss_bbox``, ``loss_giou``), every distillation (KD) term of the last layer,
  ``kd`` = the weighted sum of all KD terms (every layer), and ``lr``. Auxiliary-layer terms
  (``_0``, ``_1``, ..., ``_enc``, ``_dn``) are left out of the console (they are in the other two
  records).
- ``log.txt`` gets one JSON line per epoch with the keys of the DETR repositories, so their
  ``util/plot_utils.plot_logs`` reads it: ``epoch``, ``n_parameters``, ``train_<name>`` (the epoch
  means, ``train_loss`` included), ``test_<stat>`` and ``test_coco_eval_bbox`` (the 12 COCOeval
  stats in COCOeval's order: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl).
- TensorBoard (``--tensorboard``; the optional ``tensorboard`` package) under
  ``<output_dir>/tensorboard``: per iteration ``train/<name>`` (each loss unweighted, KD terms
  included), ``train_weighted/<name>`` (loss x weight), ``train/lr``; ``weight/<name>`` at the
  first iteration of each epoch and whenever a weight changes; per epoch ``test/<stat>`` (AP,
  AP50, ...) and ``epoch/<name>`` (the epoch means).
"""
import datetime
import json
import math
import os
import re
import sys
import time

from common.criterion import LOSS_NAMES
from common.distributed import is_main_process
from common.evaluate import STAT_NAMES

# a term of an auxiliary decoder layer ("_0", "_1"), of the encoder proposals ("_enc",
# "_interm") or of the denoising groups ("_dn", "_dn_0"): kept out of the console line
_AUX = re.compile(r"_(\d+|enc|interm|dn)(_\d+)?$")
_DETECTION = re.compile(r"^(%s)(_|$)" % "|".join(LOSS_NAMES))


def is_detection_term(name: str) -> bool:
    """The detector's own DETR losses (``loss_ce``, ``loss_bbox``, ``loss_giou`` and their
    auxiliary-layer copies); every other weighted loss of a distiller is a KD term."""
    return bool(_DETECTION.match(name))


def is_aux_term(name: str) -> bool:
    return bool(_AUX.search(name))


def detr_log_line(stats: dict) -> dict:
    """``stats`` with the keys DETR's tools read: ``test_coco_eval_bbox`` (the 12 COCOeval stats
    as a list, in COCOeval's order) when the ``test_<stat>`` entries are all there."""
    out = dict(stats)
    if all(f"test_{name}" in stats for name in STAT_NAMES):
        out["test_coco_eval_bbox"] = [float(stats[f"test_{name}"]) for name in STAT_NAMES]
    return out


class Logger:
    """Console line, ``log.txt`` and optional TensorBoard of one training run (see the top of
    this file). ``enabled`` (default: this is the main process) says whether this process prints
    and writes, ``console`` whether it prints; the running means are kept either way."""

    def __init__(self, output_dir=None, tensorboard=False, *, print_every=10, enabled=None,
                 console=True, stream=None):
        self.output_dir = output_dir
        self.enabled = is_main_process() if enabled is None else bool(enabled)
        self.console = bool(console)
        self.print_every = max(1, int(print_every))
        self.stream = stream if stream is not None else sys.stdout
        self.writer = None
        self._weights_seen = {}
        self.start_epoch(0, None)
        if tensorboard:
            if not output_dir:
                raise ValueError("--tensorboard writes under --output-dir: give an output "
                                 "folder")
            try:  # optional dependency: only --tensorboard needs it
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError(f"--tensorboard needs the tensorboard package "
                                 f"(pip install tensorboard): {e}") from None
            if self.enabled:
                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    # -- per iteration ------------------------------------------------------------------------

    def start_epoch(self, epoch, num_iters):
        """Reset the running means; ``num_iters`` (or None) sizes the console's ETA."""
        self.epoch_index, self.total = epoch, num_iters
        self.sums, self.count = {}, 0
        self.start = time.time()
        self._first_of_epoch = True

    def iteration(self, step, values, weights=None):
        """One optimiser step. ``values``: name -> float (the weighted total under "loss", each
        unweighted loss, "lr"); ``weights``: the training module's weight_dict. ``step`` is the
        global iteration index (the TensorBoard x axis)."""
        values = {k: float(v) for k, v in values.items()}
        weights = dict(weights or {})
        kd = {k: values[k] * weights[k] for k in values
              if k in weights and not is_detection_term(k)}
        if kd:
            values["kd"] = math.fsum(kd.values())
        self.count += 1
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        if not self.enabled:
            return
        if self.writer is not None:
            self._tensorboard_iteration(step, values, weights)
        if self.console and (self.count % self.print_every == 0 or self.count == self.total):
            self.stream.write(self.console_line() + "\n")
            self.stream.flush()

    def _tensorboard_iteration(self, step, values, weights):
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, step)
            if k in weights:
                self.writer.add_scalar(f"train_weighted/{k}", v * weights[k], step)
        for k, w in weights.items():
            if self._first_of_epoch or self._weights_seen.get(k) != w:
                self.writer.add_scalar(f"weight/{k}", float(w), step)
                self._weights_seen[k] = w
        self._first_of_epoch = False

    def means(self) -> dict:
        """The running means of this epoch so far (every process keeps them)."""
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def shown(self) -> list:
        """The names the console line shows, in order."""
        names = [k for k in self.sums if k == "loss"]
        names += [k for k in self.sums if k.startswith("loss_") and not is_aux_term(k)]
        names += [k for k in ("kd", "lr") if k in self.sums]
        return names

    def console_line(self) -> str:
        means = self.means()
        total = f"/{self.total}" if self.total else ""
        line = f"Epoch [{self.epoch_index}] [{self.count}{total}] " + " ".join(
            f"{k} {means[k]:.4f}" if k != "lr" else f"lr {means[k]:.2e}" for k in self.shown())
        if self.total:
            eta = (time.time() - self.start) / self.count * (self.total - self.count)
            line += f" eta {datetime.timedelta(seconds=int(eta))}"
        return line

    # -- per epoch ----------------------------------------------------------------------------

    def epoch(self, stats: dict, write_log=True) -> dict:
        """Write the epoch's line (``stats`` plus DETR's keys) to log.txt (unless
        ``write_log=False``: the training engine rewrites log.txt from the checkpoint) and
        TensorBoard, print its AP; returns the line."""
        line = detr_log_line(stats)
        if not self.enabled:
            return line
        if self.output_dir and write_log:
            os.makedirs(self.output_dir, exist_ok=True)
            with open(os.path.join(self.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps(line) + "\n")
        epoch = int(stats.get("epoch", self.epoch_index))
        if self.writer is not None:
            for k, v in stats.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool) or k == "epoch":
                    continue
                if k.startswith("test_"):
                    self.writer.add_scalar(f"test/{k[5:]}", v, epoch)
                else:
                    self.writer.add_scalar(f"epoch/{k}", v, epoch)
            self.writer.flush()
        if self.console and "test_AP" in stats:
            self.stream.write(f"epoch {epoch}: train loss {stats.get('train_loss', math.nan):.4f}, "
                              f"test AP {stats['test_AP']:.4f}, AP50 "
                              f"{stats.get('test_AP50', math.nan):.4f}\n")
            self.stream.flush()
        return line

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
