"""The KD losses' normalisers across processes: two gloo processes with one image each give the
same losses (averaged over the processes, as DDP averages gradients) as one process with both
images, for QSKD (LAPD pair count, AGFD sum(M) * d), CLoCKDistill (sum of weights in L_tcld)
and G-DetKD (the RoI count; the other process's current teacher embeddings as CKD negatives).
The two images differ in their GT count, so per-process normalisers would differ."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import clockdistill  # noqa: E402
import gdetkd  # noqa: E402
import qskd  # noqa: E402
from common.detr import build_model  # noqa: E402
from common.distill import freeze  # noqa: E402

SMALL = dict(backbone="tiny", width=8, hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
             dim_feedforward=64, num_queries=10, dropout=0.0, num_feature_levels=3)
NC = 4

# per method: the distiller built from a (teacher, student) pair and the KD losses compared
KEYS = {"qskd": ["loss_agfd", "loss_lapd", "loss_lapd_0"],
        "clockdistill": ["loss_lcmd", "loss_tcld_cls", "loss_tcld_bbox", "loss_tcld_giou"],
        "gdetkd": ["loss_sgfi", "loss_ckd"]}


def build(method):
    torch.manual_seed(0)
    teacher = freeze(build_model("deformable_detr", NC, **dict(SMALL, hidden_dim=48)))
    student = build_model("deformable_detr", NC, **SMALL)
    with torch.no_grad():  # boxes that are not the references, so box terms are non-trivial
        for m in (teacher, student):
            for head in m.bbox_embed:
                head.layers[-1].weight.normal_(0, 0.3)
    if method == "qskd":
        return qskd.QSKD(qskd.QSKDConfig(), teacher, student, NC)
    if method == "clockdistill":
        return clockdistill.CLoCKDistiller(clockdistill.CLoCKConfig(), teacher, student, NC)
    # every candidate RoI is kept (quota above the candidates): the RoI set does not depend on
    # the random sampling order, so one process and two see the same RoIs
    cfg = gdetkd.GDetKDConfig(rois_per_img=64, pos_fraction=1.0)
    return gdetkd.GDetKD(cfg, teacher, student, NC)


def data():
    """Two images of one size (no padding difference between 1 and 2 processes), 2 and 1 GT."""
    g = torch.Generator().manual_seed(5)
    images = torch.randn(2, 3, 64, 64, generator=g)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1, 2]), "size": torch.tensor([64, 64]),
                "boxes": torch.tensor([[0.3, 0.35, 0.3, 0.4], [0.7, 0.6, 0.35, 0.3]])},
               {"labels": torch.tensor([3]), "size": torch.tensor([64, 64]),
                "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.5]])}]
    return images, masks, targets


def losses_of(method, images, masks, targets):
    d = build(method).train()
    out = d(images, masks, targets)
    return {k: out[k].detach().double() for k in KEYS[method]}


def _worker(rank, port, method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        images, masks, targets = data()
        mine = losses_of(method, images[rank:rank + 1], masks[rank:rank + 1], targets[rank:rank + 1])
        for v in mine.values():  # the mean over processes, as DDP's gradient average
            dist.all_reduce(v)
            v /= 2
        torch.save(mine, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", sorted(KEYS))
def test_two_processes_equal_one_with_the_doubled_batch(method, tmp_path):
    # fork rather than spawn: the children inherit the imports (much faster)
    mp.start_processes(_worker, args=(_free_port(), method, str(tmp_path)), nprocs=2,
                       start_method="fork")
    two = torch.load(tmp_path / "0.pt")
    one = losses_of(method, *data())
    for k in KEYS[method]:
        assert float(one[k]) > 1e-4, k  # a term that is there
        torch.testing.assert_close(two[k], one[k], rtol=2e-5, atol=1e-7, msg=k)
