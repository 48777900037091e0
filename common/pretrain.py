"""Backbone pretraining on object crops: the stand-in for ImageNet weights on CPU.

Every DETR in the papers starts from an ImageNet-pretrained ResNet; from a random backbone a DETR
needs a very long schedule before its classification moves at all (detr#125, detr#169; on the
embedded data a from-scratch tiny backbone stays near chance-level class error for epochs). No
ImageNet weights exist for the small CPU backbones, and none can be downloaded here, so this
module gives them a short classification pretraining instead: the backbone plus a linear head
learns to name square crops cut around the training split's ground-truth boxes, with an extra
"background" class for crops that hold no object. It takes about a minute on one CPU core and
uses nothing but the training annotations (no validation image is seen).

    path = ensure_crop_pretrained(train_set, val_set, width=32, cache_root=...)  # cached file
    python -m common.pretrain --width 32                  # the same, on the embedded data

The file holds the backbone body's state dict (conv1, bn1, layer1..layer4), which
``common.backbone.Backbone(..., backbone_weights=path)`` loads like a torchvision checkpoint.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # python common/pretrain.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.backbone import _tiny_resnet  # noqa: E402
from common.checkpoint import save_checkpoint  # noqa: E402
from common.data import (CocoDetection, add_data_args, build_dataset,  # noqa: E402
                         default_cache_dir)

__all__ = ["crop_dataset", "pretrain_backbone", "ensure_crop_pretrained", "PRETRAIN_VERSION"]

PRETRAIN_VERSION = 2


def _square_crop(image, cx, cy, side, size):
    """Crop the square (cx, cy, side) in pixels out of image (3, H, W), zero-padded where it
    leaves the image, and resize it to (3, size, size)."""
    _, H, W = image.shape
    # affine_grid works in [-1, 1] coordinates of the input (align_corners=False)
    theta = torch.tensor([[side / W, 0.0, 2 * cx / W - 1], [0.0, side / H, 2 * cy / H - 1]],
                         dtype=image.dtype)
    grid = F.affine_grid(theta[None], (1, 3, size, size), align_corners=False)
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)[0]


def crop_dataset(dataset, crops_per_object=2, size=32, seed=0):
    """Square crops of ``dataset`` (a common.data.CocoDetection built without augmentation):
    ``crops_per_object`` jittered crops around every box (label = its class) and as many crops of
    background (label = num_classes) that hold less than a quarter of any box.
    Returns images (N, 3, size, size) float32 and labels (N,) int64."""
    g = np.random.default_rng(seed)
    images, labels = [], []
    K = dataset.num_classes
    for i in range(len(dataset)):
        image, target = dataset[i]                              # normalised (3, H, W)
        H, W = image.shape[-2:]
        boxes = target["boxes"] * torch.tensor([W, H, W, H])    # (T, 4) cxcywh in pixels
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        for (cx, cy, w, h), c in zip(boxes.tolist(), target["labels"].tolist()):
            for _ in range(crops_per_object):
                side = max(w, h) * g.uniform(1.1, 1.6)
                jx, jy = g.uniform(-0.12, 0.12, 2) * side
                images.append(_square_crop(image, cx + jx, cy + jy, side, size))
                labels.append(c)
        for _ in range(crops_per_object * max(1, len(boxes))):
            for _try in range(20):                              # background: no box inside
                side = g.uniform(16, min(H, W) * 0.6)
                cx, cy = g.uniform(side / 2, W - side / 2), g.uniform(side / 2, H - side / 2)
                lo = torch.tensor([cx - side / 2, cy - side / 2])
                inter = (torch.minimum(xyxy[:, 2:], lo + side) - torch.maximum(xyxy[:, :2], lo)
                         ).clamp(min=0).prod(1)                 # (T,) box area inside the crop
                if len(xyxy) == 0 or (inter / boxes[:, 2:].prod(1)).max() < 0.25:
                    images.append(_square_crop(image, cx, cy, side, size))
                    labels.append(K)
                    break
    return torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.int64)


class CropClassifier(nn.Module):
    """The tiny backbone body, global average pooling and a linear layer over K + 1 classes."""

    def __init__(self, width, num_classes):
        super().__init__()
        self.body = _tiny_resnet(width)
        self.fc = nn.Linear(8 * width, num_classes + 1)

    def forward(self, x):
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def pretrain_backbone(train_crops, val_crops, width, num_classes, epochs=8, batch_size=128,
                      lr=2e-3, seed=0, verbose=True):
    """Train ``CropClassifier`` on (images, labels) crops with AdamW and a cosine schedule.
    Returns (body state dict, {"train_acc", "val_acc", "seconds"})."""
    torch.manual_seed(seed)
    x, y = train_crops
    model = CropClassifier(width, num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        correct = 0
        for s in range(0, len(x), batch_size):
            idx = perm[s:s + batch_size]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y[idx]).sum())
        val_acc = accuracy(model, *val_crops)
        if verbose:
            print(f"pretrain epoch {epoch}: train acc {correct / len(x):.3f}, "
                  f"val acc {val_acc:.3f} ({time.time() - t0:.0f} s)", flush=True)
    stats = {"train_acc": correct / len(x), "val_acc": val_acc, "seconds": time.time() - t0}
    return model.body.state_dict(), stats


@torch.no_grad()
def accuracy(model, images, labels, batch_size=512):
    model.eval()
    hits = sum(int((model(images[s:s + batch_size]).argmax(1) == labels[s:s + batch_size]).sum())
               for s in range(0, len(images), batch_size))
    return hits / max(len(images), 1)


def ensure_crop_pretrained(train, val, width, cache_root, verbose=True):
    """The cached crop-pretrained tiny backbone of ``width`` for the training split ``train``
    (a common.data.CocoDetection; ``val`` gives the un-augmented transform, and 200 images for
    the reported accuracy), trained now when missing; cached under ``cache_root``/backbones.
    Returns its path. No collective calls: under torchrun only the main process calls this."""
    key = {"version": PRETRAIN_VERSION, "width": width,
           "train": str(train.ann_file), "info": train.coco.dataset.get("info", {}),
           "num_images": len(train)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = os.path.join(str(cache_root), "backbones", f"tiny{width}-crops-{digest}.pth")
    if os.path.isfile(path):
        return path
    if verbose:
        print(f"backbone: pretraining the tiny backbone (width {width}) on object crops of the "
              f"training split, cached at {path}", flush=True)
    plain = CocoDetection(train.img_folder, train.ann_file, val.transforms)  # no augmentation
    train_crops = crop_dataset(plain, seed=0)
    val_crops = crop_dataset(_Head(val, min(len(val), 200)), seed=1)  # only to report accuracy
    state, stats = pretrain_backbone(train_crops, val_crops, width, plain.num_classes,
                                     verbose=verbose)
    save_checkpoint(state, path)
    with open(path + ".json", "w") as f:
        json.dump({**key, **stats, "num_crops": len(train_crops[1])}, f, indent=1, default=str)
    return path


class _Head:
    """The first n items of a dataset, with its num_classes (for the validation crops)."""

    def __init__(self, dataset, n):
        self.dataset, self.n, self.num_classes = dataset, n, dataset.num_classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.dataset[i]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32, help="base width of the tiny backbone")
    parser.add_argument("--threads", type=int, default=None)
    add_data_args(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(ensure_crop_pretrained(build_dataset("train", args), build_dataset("val", args),
                                 args.width, args.data_cache or default_cache_dir()))


if __name__ == "__main__":
    main()
