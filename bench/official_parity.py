"""Side-by-side check of our DETR-family models against the official code, on the CPU.

For each case, the official repository's own model is built from its own argument defaults
(its ``main.py`` parser, plus DINO's ``config/DINO/DINO_4scale.py``), given random weights,
and saved the way its training script saves checkpoints (``{"model": state_dict, "args":
Namespace, "epoch"}``). That file is loaded into our model through
``common.checkpoint.load_official``. Both models then run on the same padded batch (image 1
smaller than image 0, so masks, valid ratios and padded tokens matter) and the script prints the
largest absolute difference of every output: class logits and boxes of every decoder layer, and
the encoder proposals (Deformable two-stage ``enc_outputs``, DINO ``interm_outputs``). It also
runs the official matcher on the official outputs and ours on ours, layer by layer, with the
same targets, and counts differing assignments.

Nothing of the official code is part of this repository: clone it yourself and pass the folder.
The official repositories pin old torchvision versions and need the CUDA op
MultiScaleDeformableAttention; at run time only (their files are not edited) this script

* reports torchvision as 0.9 while their ``util/misc.py`` is imported (their version tests
  parse "0.29" as 0.2 and then import helpers that torchvision has since removed);
* reports torch as 1.13 while Conditional DETR's models are imported (its version test reads
  2.x as older than 1.9 and imports ``_LinearWithBias``, removed since);
* builds their ResNet without ImageNet weights (their backbone asks torchvision to download
  them; the weights here are random anyway);
* replaces their CUDA ``MSDeformAttnFunction`` with their own pure-PyTorch
  ``ms_deform_attn_core_pytorch`` (Deformable DETR, DINO);
* sets their frozen BatchNorm statistics from the batch itself (a calibration pass), so that a
  random ResNet-50 keeps its activations of order 1.

Usage (one official checkout per run; the repositories' package names collide):

    python bench/official_parity.py detr             PATH/detr
    python bench/official_parity.py conditional_detr PATH/ConditionalDETR
    python bench/official_parity.py dab_detr         PATH/DAB-DETR
    python bench/official_parity.py deformable_detr  PATH/Deformable-DETR
    python bench/official_parity.py dino             PATH/DINO

Needs scipy (their matchers) and, for DINO, timm (imported by its Swin / ConvNeXt backbones).
CPU only, no network. ``--json FILE`` writes the numbers.
"""
import argparse
import ast
import json
import os
import sys
import tempfile
import types
from dataclasses import replace

import numpy as np
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common.checkpoint import load_official  # noqa: E402
from common.criterion import build_criterion  # noqa: E402

# (name, official argument changes, our model overrides, extra)
CASES = {
    "detr": [("DETR R50", {}, {}, {})],
    "conditional_detr": [("Conditional DETR R50", {}, {}, {})],
    "dab_detr": [("DAB-DETR R50", {}, {}, {}),
                 ("DAB-DETR R50-DC5", {"dilation": True}, {"dilation": True}, {}),
                 ("DAB-DETR R50, saturated anchors", {}, {}, {"saturate_anchors": True}),
                 # what our inverse_sigmoid eps of 1e-5 gave before it followed DAB-DETR's 1e-3
                 ("DAB-DETR R50, saturated anchors, eps 1e-5 in ours", {},
                  {"inverse_sigmoid_eps": 1e-5}, {"saturate_anchors": True})],
    "deformable_detr": [
        ("Deformable DETR", {}, {}, {}),
        ("Deformable DETR + refine", {"with_box_refine": True}, {"with_box_refine": True}, {}),
        ("Deformable DETR + refine + two-stage", {"with_box_refine": True, "two_stage": True},
         {"with_box_refine": True, "two_stage": True}, {})],
    "dino": [("DINO-4scale R50", {}, {}, {}),
             ("DINO-4scale R50, eps 1e-5 in ours", {}, {"inverse_sigmoid_eps": 1e-5}, {})],
}
REQUIRED_ARGS = {"dab_detr": ["-m", "dab_detr", "--coco_path", "unused"],
                 "dino": ["-c", "config/DINO/DINO_4scale.py"]}

# the batch: image 0 fills 224 x 320, image 1 is 96 x 128 inside it; at the four DINO levels
# that is 1490 tokens for image 0 and 256 valid ones for image 1, fewer than DINO's 900 queries
H, W, H1, W1 = 224, 320, 96, 128


# ------------------------------------------------------------------------------------------
# The official code, imported from a checkout
# ------------------------------------------------------------------------------------------

def official_args(repo, variant, changes):
    """The official argparse defaults, from ``get_args_parser`` in their main.py, run alone
    (importing main.py would import their data sets and training loop), and DINO's config."""
    src = open(os.path.join(repo, "main.py")).read()
    tree = ast.parse(src)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_args_parser")
    ns = {"argparse": argparse, "np": np, "DictAction": argparse.Action}
    exec(compile(ast.Module([fn], []), "main.py", "exec"), ns)
    args = ns["get_args_parser"]().parse_args(REQUIRED_ARGS.get(variant, []))
    if variant == "dino":  # main.py: SLConfig.fromfile(config) merged into args
        cfg = {}
        path = os.path.join(repo, args.config_file)
        for name in ["coco_transformer.py", os.path.basename(path)]:
            mod = {}
            exec(open(os.path.join(os.path.dirname(path), name)).read(), mod)
            cfg.update({k: v for k, v in mod.items() if not k.startswith("_")})
        for k, v in cfg.items():
            if hasattr(args, k):
                raise ValueError(f"DINO config key {k} is also an argument")
            setattr(args, k, v)
    args.device = "cpu"
    for k, v in changes.items():
        if not hasattr(args, k):
            raise ValueError(f"the official {variant} has no argument {k}")
        setattr(args, k, v)
    return args


def import_official(repo, variant):
    """Their build function, matcher builder and NestedTensor, with the run-time substitutions
    named in the module docstring."""
    sys.path.insert(0, repo)
    real_version = torchvision.__version__
    torchvision.__version__ = "0.9.0"
    try:
        import util.misc as misc
    finally:
        torchvision.__version__ = real_version
    # their CUDA op's module, imported by Deformable DETR, DINO and DAB-DETR (whose package also
    # holds a deformable variant) when their models are imported; never called here
    sys.modules["MultiScaleDeformableAttention"] = types.ModuleType(
        "MultiScaleDeformableAttention")
    if variant == "detr":
        from models import build_model as build
        from models.matcher import build_matcher
    elif variant == "conditional_detr":
        # its attention.py reads torch 2.x as older than 1.9 (the version test compares a bool
        # with 9) and imports names torch has since removed: it is shown torch as 1.13
        real_version = torch.__version__
        torch.__version__ = "1.13.0"
        try:
            from models import build_model as build
        finally:
            torch.__version__ = real_version
        from models.matcher import build_matcher
    elif variant == "dab_detr":
        from models import build_DABDETR as build
        from models.DAB_DETR.matcher import build_matcher
    elif variant == "deformable_detr":
        from models import build_model as build
        from models.matcher import build_matcher
        import models.ops.modules.ms_deform_attn as msda_module
        from models.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch as core
    else:
        from models.dino.dino import build_dino as build
        from models.dino.matcher import build_matcher
        import models.dino.ops.modules.ms_deform_attn as msda_module
        from models.dino.ops.functions.ms_deform_attn_func import \
            ms_deform_attn_core_pytorch as core
    if variant in ("deformable_detr", "dino"):
        class CoreFunction:  # their CUDA autograd Function's signature, their PyTorch core
            @staticmethod
            def apply(value, shapes, level_start_index, locations, weights, im2col_step):
                return core(value, shapes, locations, weights)
        msda_module.MSDeformAttnFunction = CoreFunction
    return no_download(build), build_matcher, misc.NestedTensor


def no_download(build):
    """``build`` with torchvision's ResNets made without ImageNet weights: their backbone asks
    for ``pretrained=True`` (a download)."""
    def wrapped(args):
        names = ("resnet18", "resnet34", "resnet50", "resnet101")
        real = {n: getattr(torchvision.models, n) for n in names}
        for n in names:
            setattr(torchvision.models, n,
                    lambda *a, _real=real[n], pretrained=False, **kw: _real(*a, weights=None, **kw))
        try:
            return build(args)
        finally:
            for n in names:
                setattr(torchvision.models, n, real[n])
    return wrapped


# ------------------------------------------------------------------------------------------
# Weights, batch, targets
# ------------------------------------------------------------------------------------------

def randomise(model, images, masks, NestedTensor, seed, saturate_anchors=False):
    """Random weights around the official init (every parameter + N(0, 0.05^2), so the zero
    initialised box deltas and sampling offsets are not zero), frozen-BN statistics from the
    batch, and for ``saturate_anchors`` DAB-DETR anchors far in the sigmoid's tails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        if saturate_anchors:  # every other anchor at logits +-(7..12): sigmoid beyond 1e-3 of 0/1
            w = model.refpoint_embed.weight
            sign = torch.randint(0, 2, w[::2].shape, generator=g) * 2 - 1
            w[::2] = sign * (7 + 5 * torch.rand(w[::2].shape, generator=g))

    def calibrate(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))
    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules()
             if type(m).__name__ == "FrozenBatchNorm2d"]
    with torch.no_grad():
        model.eval()(NestedTensor(images, masks))
    for h in hooks:
        h.remove()


def make_batch(seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, H, W, generator=g)
    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[1, H1:] = True
    masks[1, :, W1:] = True
    images[1][:, masks[1]] = 0.0  # padding is zero, as nested_tensor_from_tensor_list makes it
    targets = []
    for n in (6, 3):
        cxcy = 0.15 + 0.7 * torch.rand(n, 2, generator=g)
        wh = 0.05 + 0.25 * torch.rand(n, 2, generator=g)
        labels = torch.randint(1, 91, (n,), generator=g)  # COCO category ids, as the slots
        targets.append({"labels": labels, "boxes": torch.cat([cxcy, wh], -1)})
    return images, masks, targets


# ------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------

def layers_of(out):
    """[(name, {"pred_logits", "pred_boxes"})] from the first decoder layer to the last, then
    the encoder proposals if any (official key names)."""
    res = [(f"layer {i}", a) for i, a in enumerate(out.get("aux_outputs", []))]
    res.append((f"layer {len(res)}", out))
    for key in ("enc_outputs", "interm_outputs"):
        if isinstance(out.get(key), dict):
            res.append(("proposals", out[key]))
    return res


def _pairs_differ(q_theirs, j_theirs, q_ours, j_ours):
    """(query, target) pairs of one image that the two assignments do not share."""
    theirs = set(zip(q_theirs.tolist(), j_theirs.tolist()))
    return len(theirs - set(zip(q_ours.tolist(), j_ours.tolist())))


def run_case(variant, repo, name, changes, overrides, extra, build, build_matcher, NestedTensor,
             seed=0):
    torch.manual_seed(seed)
    args = official_args(repo, variant, changes)
    built = build(args)
    official = built[0]
    images, masks, targets = make_batch(seed)
    randomise(official, images, masks, NestedTensor, seed + 1, **extra)
    official.eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint.pth")
        # as their main.py saves: model, optimizer, lr_scheduler, epoch, args (no optimizer here)
        torch.save({"model": official.state_dict(), "args": args, "epoch": 0}, path)
        ours = load_official(path, variant, **overrides)
    with torch.no_grad():
        theirs_out = official(NestedTensor(images, masks))
        ours_out = ours(images, masks)
    their_matcher = build_matcher(args)
    our_matcher = build_criterion(ours, ours.num_classes).matcher
    rows = compare(theirs_out, ours_out, targets, their_matcher, our_matcher, variant)
    info = {}
    for b in range(images.shape[0]):  # end to end, image by image, all outputs
        info[f"image {b}: max |d logits| / |d boxes| over all outputs"] = "%.3g / %.3g" % tuple(
            max((t[k][b] - o[k][b]).abs().max().item()
                for (_, t), (_, o) in zip(layers_of(theirs_out), layers_of(ours_out)))
            for k in ("pred_logits", "pred_boxes"))
    if variant == "dino" or overrides.get("two_stage"):  # selected references at 1.0: padding
        with torch.no_grad():
            enc = ours.encode(images, masks)
        info["image 1: valid tokens"] = int((~enc.mask_flatten[1]).sum())
        info["image 1: queries at padded proposals (reference 1.0)"] = \
            int((enc.proposals.topk_boxes[1] == 1.0).all(-1).sum())
    if variant == "dino":
        # The top-900 of about 1500 encoder scores has near-ties (a few 1e-7 apart), whose order
        # float rounding decides; a swapped pair changes two queries' anchors and, through the
        # decoder's self-attention, a little of every query. Which token each official query
        # took is read off its interm box; our decoder then also runs on that selection.
        p = enc.proposals
        picked = []
        for b in range(images.shape[0]):
            dist = torch.cdist(theirs_out["interm_outputs"]["pred_boxes"][b].double(),
                               p.boxes[b].double())
            best = dist.min(-1)
            if best.values.max() > 1e-4:
                raise RuntimeError("an official interm box matches none of our proposals")
            # a padded proposal's box is the same for every padded token: keep ours there
            ours_dist = dist[torch.arange(len(dist)), p.topk_index[b]]
            picked.append(torch.where(ours_dist <= best.values, p.topk_index[b], best.indices))
        picked = torch.stack(picked)  # (B,K)
        info["queries whose token differs from the official selection"] = \
            int((picked != p.topk_index).sum())
        gather = lambda x: torch.gather(x, 1, picked[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        q = ours.init_queries(enc)
        with torch.no_grad():
            dec = ours.decode(enc, replace(q, reference=gather(p.boxes)))
            same = ours.outputs(enc, dec)
        same["enc_outputs"] = {"pred_logits": gather(p.logits), "pred_boxes": gather(p.boxes)}
        rows += [dict(r, output=r["output"] + "*") for r in
                 compare(theirs_out, same, targets, their_matcher, our_matcher, variant)]
    if extra.get("saturate_anchors"):
        ref = ours.refpoint_embed.weight.sigmoid()
        info["anchor coordinates outside [1e-3, 1 - 1e-3]"] = \
            int(((ref < 1e-3) | (ref > 1 - 1e-3)).sum())
    return {"case": name, "rows": rows, "info": info}


def compare(theirs_out, ours_out, targets, their_matcher, our_matcher, variant):
    """Max abs differences and matcher disagreements, output by output."""
    their_layers, our_layers = layers_of(theirs_out), layers_of(ours_out)
    if [n for n, _ in their_layers] != [n for n, _ in our_layers]:
        raise RuntimeError(f"different outputs: {[n for n, _ in their_layers]} vs "
                           f"{[n for n, _ in our_layers]}")
    rows = []
    for (lname, t), (_, o) in zip(their_layers, our_layers):
        # two-stage Deformable DETR matches its proposals class-agnostically (all labels 0)
        tg = targets
        if lname == "proposals" and variant == "deformable_detr":
            tg = [dict(x, labels=torch.zeros_like(x["labels"])) for x in targets]
        with torch.no_grad():
            mt, mo = their_matcher(t, tg), our_matcher(o, tg)
        rows.append({"output": lname,
                     "logit_scale": t["pred_logits"].abs().max().item(),
                     "logits": (t["pred_logits"] - o["pred_logits"]).abs().max().item(),
                     "boxes": (t["pred_boxes"] - o["pred_boxes"]).abs().max().item(),
                     "pairs": sum(len(q) for q, _ in mt),
                     "pairs_differ": sum(_pairs_differ(qt, jt, qo, jo)
                                         for (qt, jt), (qo, jo) in zip(mt, mo))})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(CASES))
    parser.add_argument("official", help="a checkout of the variant's official repository")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    repo = os.path.abspath(a.official)
    if not os.path.isfile(os.path.join(repo, "main.py")):
        parser.error(f"{repo} does not look like an official checkout (no main.py)")
    torch.set_grad_enabled(True)
    build, build_matcher, NestedTensor = import_official(repo, a.variant)
    results = []
    for name, changes, overrides, extra in CASES[a.variant]:
        r = run_case(a.variant, repo, name, changes, overrides, extra, build, build_matcher,
                     NestedTensor, a.seed)
        results.append(r)
        print(f"\n{name}")
        print(f"  {'output':<10} {'max |logits|':>13} {'max |d logits|':>15} "
              f"{'max |d boxes|':>14} {'matched pairs':>14} {'pairs differ':>13}")
        for row in r["rows"]:
            print(f"  {row['output']:<10} {row['logit_scale']:>13.3g} {row['logits']:>15.3g} "
                  f"{row['boxes']:>14.3g} {row['pairs']:>14} {row['pairs_differ']:>13}")
        if any(row["output"].endswith("*") for row in r["rows"]):
            print("  *: our decoder on the official selection of encoder tokens")
        for k, v in r["info"].items():
            print(f"  {k}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"variant": a.variant, "official": repo, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
