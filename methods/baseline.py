"""Train and evaluate a DETR without distillation: the teachers, and the baseline students that
every distillation result is compared against (same seed, same schedule).

    python methods/baseline.py --preset cpu-teacher --output-dir outputs/teacher
    python methods/baseline.py --data coco --coco-path /data/coco --variant dino --output-dir out
    python methods/baseline.py --eval --resume out/checkpoint.pth
    torchrun --nproc_per_node=8 methods/baseline.py --data coco --coco-path /data/coco ...

The checkpoint (``--output-dir``/checkpoint.pth) holds the detector under "model"; a distilled
student's checkpoint has the same layout, so ``--eval --resume`` evaluates either.
"""
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import cli, engine  # noqa: E402
from common.criterion import build_criterion, build_postprocess  # noqa: E402
from common.data import build_dataset, collate  # noqa: E402
from common.detr import build_model  # noqa: E402
from common.evaluate import CocoEvaluator  # noqa: E402


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
    parser = cli.build_parser(__doc__.splitlines()[0])
    args, overrides = cli.resolve(parser.parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    info = engine.init_distributed(args.device)
    engine.seed_everything(args.seed, info.rank)

    dataset_train = build_dataset("train", args)
    dataset_val = build_dataset("val", args)
    num_classes = dataset_train.num_classes
    model = build_model(args.variant, num_classes, **overrides).to(info.device)
    criterion = build_criterion(model, num_classes).to(info.device)
    postprocess = build_postprocess(model)
    module = Detector(model, criterion)
    if info.is_main:
        print(f"{args.variant} ({', '.join(f'{k}={v}' for k, v in overrides.items())}), "
              f"{num_classes} classes, device {info.device}, world size {info.world_size}",
              flush=True)

    val_loader = engine.make_loader(dataset_val, args.batch_size, collate, train=False,
                                    num_workers=args.num_workers, dist_info=info)
    evaluator = CocoEvaluator.from_dataset(dataset_val)

    def evaluate_fn(student):
        return engine.evaluate(student, postprocess, val_loader, evaluator, info.device,
                               amp=args.amp, max_iters=args.max_iters)

    groups = engine.param_groups(module, args.lr, args.lr_backbone,
                                 model.cfg.lr_linear_proj_mult)
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    start_epoch = 0
    if args.resume:
        if args.eval:
            ckpt = engine.load_checkpoint(args.resume)
            if "model" not in ckpt:
                raise ValueError(f"{args.resume} has no 'model' entry")
            engine.check_state_fits(model, ckpt["model"], f"checkpoint {args.resume}")
            model.load_state_dict(ckpt["model"])
        else:
            start_epoch = engine.resume(module, optimizer, lr_scheduler, args.resume)
    if args.eval:
        stats = evaluate_fn(model)
        if info.is_main:
            print("eval: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()), flush=True)
        return stats

    if info.distributed:
        module = torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
    train_loader = engine.make_loader(dataset_train, args.batch_size, collate, train=True,
                                      seed=args.seed, num_workers=args.num_workers,
                                      dist_info=info)
    stats = engine.fit(module, optimizer, lr_scheduler, train_loader, args=args, dist_info=info,
                       evaluate_fn=evaluate_fn, output_dir=args.output_dir,
                       start_epoch=start_epoch, epochs=args.epochs,
                       clip_max_norm=args.clip_max_norm, amp=args.amp,
                       max_iters=args.max_iters, print_every=args.print_every)
    if info.is_main and stats:
        print("final: " + " ".join(f"{k} {v:.4f}" for k, v in stats.items()
                                   if k.startswith("test_")), flush=True)
    return stats


if __name__ == "__main__":
    engine.main_guard(main)
