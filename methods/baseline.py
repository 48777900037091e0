"""Train and evaluate a DETR without distillation: the teachers, and the baseline students that
every distillation result is compared against (same seed, same schedule).

    python methods/baseline.py --preset cpu-teacher --output-dir outputs/teacher
    python methods/baseline.py --data coco --coco-path /data/coco --variant dino --output-dir out
    python methods/baseline.py --eval --resume out/checkpoint.pth
    torchrun --nproc_per_node=8 methods/baseline.py --data coco --coco-path /data/coco ...

The checkpoint (``--output-dir``/checkpoint.pth) holds the detector under "model"; a distilled
student's checkpoint has the same layout, so ``--eval --resume`` evaluates either (the model is
rebuilt from the settings stored in the checkpoint unless model flags are given).
"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cli, engine  # noqa: E402
from common.criterion import build_criterion  # noqa: E402
from common.evaluate import CocoEvaluator  # noqa: E402,F401  (tests spy on it)


class Detector(nn.Module):
    """The training module of a plain detector: its own DETR losses, nothing else."""

    def __init__(self, model, criterion):
        super().__init__()
        self.student = model
        self.criterion = criterion
        self.weight_dict = criterion.weight_dict

    def forward(self, images, masks, targets):
        outputs = self.student(images, masks, targets)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.criterion(engine.fp32(outputs), targets)


def main(argv=None):
    parser = cli.build_parser(__doc__)
    args, _ = cli.resolve(parser.parse_args(argv))
    run = engine.prepare(args)
    return engine.train(run, Detector(run.student, build_criterion(run.student, run.num_classes)))


if __name__ == "__main__":
    engine.main_guard(main)
