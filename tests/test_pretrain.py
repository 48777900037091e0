"""common/pretrain.py: the object-crop pretraining of the tiny backbone, and the tiny backbone
itself (GroupNorm, trained whole)."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from common import pretrain as P
from common.backbone import Backbone


def test_square_crop_at_pixel_alignment_is_a_slice():
    image = torch.arange(3 * 16 * 20, dtype=torch.float32).reshape(3, 16, 20)
    # the square centred at (8, 6) with side 4 covers pixels x 6..9, y 4..7; resized to 4 it is
    # exactly those pixels (bilinear sampling at their centres)
    torch.testing.assert_close(P._square_crop(image, 8.0, 6.0, 4.0, 4), image[:, 4:8, 6:10])
    # half of it outside the image: zeros there
    crop = P._square_crop(image, 0.0, 6.0, 4.0, 4)
    assert crop[:, :, :2].abs().max() < 1e-3
    torch.testing.assert_close(crop[:, :, 2:], image[:, 4:8, 0:2])


class _Fake:
    """Two 64x64 images: one 'bright' object (class 0) and one 'dark' one (class 1)."""
    num_classes = 2

    def __init__(self, n=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            image = 0.1 * torch.randn(3, 64, 64, generator=g)
            boxes, labels = [], []
            for c, value in ((0, 2.0), (1, -2.0)):
                x, y = (int(v) for v in torch.randint(4, 36, (2,), generator=g))
                image[:, y:y + 16, x:x + 16] = value
                boxes.append([(x + 8) / 64, (y + 8) / 64, 16 / 64, 16 / 64])
                labels.append(c)
            self.items.append((image, {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_crop_dataset_labels_and_background():
    images, labels = P.crop_dataset(_Fake(n=3), crops_per_object=2, size=16)
    assert images.shape == (len(labels), 3, 16, 16)
    # 2 crops per object of each class, and 2 per object of background (label K = 2)
    assert torch.bincount(labels).tolist() == [6, 6, 12]
    bright, dark, bg = (images[labels == k].mean() for k in range(3))
    assert bright > 0.5 and dark < -0.5 and bg.abs() < 0.3   # the crops hold their objects


def test_pretraining_learns_and_loads_into_the_backbone(tmp_path):
    train, val = P.crop_dataset(_Fake(n=24), size=32), P.crop_dataset(_Fake(n=8, seed=1), size=32)
    state, stats = P.pretrain_backbone(train, val, width=8, num_classes=2, epochs=15,
                                       batch_size=32, verbose=False)
    assert stats["val_acc"] > 0.9             # chance is about 0.5 (half the crops are background)
    path = tmp_path / "tiny8.pth"
    torch.save(state, path)
    backbone = Backbone("tiny", width=8, return_interm_layers=True, backbone_weights=str(path))
    loaded = dict(backbone.body.named_parameters())
    for k, v in state.items():
        if k in loaded:
            assert torch.equal(loaded[k], v), k


def test_ensure_crop_pretrained_caches(tmp_path, monkeypatch):
    from common.data import build_dataset
    args = SimpleNamespace(data="synthetic", data_cache=str(tmp_path), synth="easy",
                           synth_num_train=3, synth_num_val=2)
    train, val = build_dataset("train", args), build_dataset("val", args)
    path = P.ensure_crop_pretrained(train, val, 4, tmp_path, verbose=False)
    state = torch.load(path, weights_only=True)
    assert "layer4.0.conv1.weight" in state and not any(k.startswith("fc") for k in state)
    monkeypatch.setattr(P, "pretrain_backbone", lambda *a, **k: pytest.fail("retrained"))
    assert P.ensure_crop_pretrained(train, val, 4, tmp_path, verbose=False) == path


def test_tiny_backbone_uses_group_norm_and_trains_whole():
    b = Backbone("tiny", width=8, return_interm_layers=True)
    norms = [m for m in b.modules() if isinstance(m, (nn.GroupNorm, FrozenBatchNorm2d,
                                                      nn.BatchNorm2d))]
    assert norms and all(isinstance(m, nn.GroupNorm) for m in norms)
    assert all(p.requires_grad for p in b.parameters())
    assert not any(p.requires_grad for p in Backbone("tiny", width=8, train_backbone=False).parameters())
    # the torchvision ResNets keep the official recipe: frozen BN, stem and layer1 frozen
    r = Backbone("resnet18", return_interm_layers=True)
    frozen = {n.split(".")[1] for n, p in r.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}


def test_training_starts_from_the_cached_crop_backbone(tmp_path):
    """--backbone-weights crops through methods/baseline.py: the crop-pretrained backbone is
    made once and loaded; the checkpoint does not need the file again (--eval works without
    it), and 'crops' on a ResNet is a clear error."""
    import os
    import shutil
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "methods"))
    import baseline
    from common.checkpoint import load_detector
    common = ["--preset", "cpu-tiny", "--synth-num-train", "4", "--synth-num-val", "2",
              "--data-cache", str(tmp_path), "--num-workers", "0", "--max-iters", "1",
              "--threads", "1"]
    out = tmp_path / "run"
    baseline.main(common + ["--backbone-weights", "crops", "--lr-backbone", "0",
                            "--output-dir", str(out)])
    files = list((tmp_path / "backbones").glob("tiny8-crops-*.pth"))
    assert len(files) == 1
    state = torch.load(files[0], weights_only=True)
    model = load_detector(str(out / "checkpoint.pth"), 10)
    body = model.backbone[0].body
    # lr_backbone 0: after one step the backbone still equals the pretrained weights
    for k in ("conv1.weight", "layer2.0.conv1.weight", "layer4.0.bn2.weight"):
        assert torch.equal(dict(body.named_parameters())[k], state[k]), k
    shutil.rmtree(tmp_path / "backbones")
    stats = baseline.main([a for a in common if a not in ("--preset", "cpu-tiny")] +
                          ["--eval", "--resume", str(out / "checkpoint.pth")])
    assert "AP" in stats
    with pytest.raises(ValueError, match="tiny"):
        baseline.main(common + ["--backbone", "resnet18", "--backbone-weights", "crops",
                                "--output-dir", str(tmp_path / "r18")])
