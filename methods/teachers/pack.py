"""Package a teacher trained by methods/baseline.py as the one shipped with the repository.

    python methods/teachers/pack.py ~/.cache/detrkd/teachers/cpu-teacher-<digest>

writes ``methods/teachers/<preset>.pth`` (the weights and the settings they were trained with:
the checkpoint's "model", "args" and "epoch" entries, without the optimizer state and RNG state
that only resuming needs) and ``methods/teachers/<preset>.json``: the command that trained it,
the file's size and sha256, the teacher cache entry it stands for (the method scripts use it
when no --teacher is given and their teacher settings are the same: preset, seed, embedded-data
settings), its training log and the AP it reached, and its COCO stats on the first
``--subset`` validation images, which tests/test_shipped_teacher.py recomputes.
"""
import argparse
import json
import os
import shlex
import sys
import tempfile
from types import SimpleNamespace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from common import distill, engine  # noqa: E402
from common.checkpoint import load_detector, read_checkpoint, save_checkpoint  # noqa: E402
from common.criterion import build_postprocess  # noqa: E402
from common.data import build_dataset, collate  # noqa: E402
from common.evaluate import CocoEvaluator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# the flags of methods/baseline.py that decide what a teacher is (the cache key's and the data's)
COMMAND_FLAGS = ("preset", "seed", "synth", "synth_seed", "synth_num_train", "synth_num_val",
                 "image_size", "max_size", "max_iters", "threads")


def training_command(a):
    """The methods/baseline.py command line that trained a checkpoint whose args are ``a``."""
    cmd = ["python", "methods/baseline.py"]
    for name in COMMAND_FLAGS:
        if a.get(name) is not None:
            cmd += ["--" + name.replace("_", "-"), str(a[name])]
    return shlex.join(cmd + ["--output-dir", "OUT"])


def subset_stats(path, a, num_images, data_cache):
    """COCO stats of the teacher at ``path`` on the first ``num_images`` validation images of
    its embedded data set (drawn alone into ``data_cache``: image k of a split does not depend
    on how many images the set has)."""
    data = dict(data="synthetic", data_cache=data_cache, synth=a["synth"],
                synth_seed=a["synth_seed"], synth_num_train=1, synth_num_val=num_images,
                image_size=a.get("image_size"), max_size=a.get("max_size"))
    train, val = build_dataset("train", **data), build_dataset("val", **data)
    model = load_detector(path, train.num_classes, "cpu").eval()
    loader = engine.make_loader(val, 4, collate, train=False)
    return engine.evaluate(model, build_postprocess(model), loader,
                           CocoEvaluator.from_dataset(val), torch.device("cpu"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the teacher's folder: checkpoint.pth and log.txt")
    parser.add_argument("--subset", type=int, default=50,
                        help="validation images of the recorded check")
    parser.add_argument("--out-dir", default=HERE, help="where the .pth and .json go")
    args = parser.parse_args(argv)
    ckpt = read_checkpoint(os.path.join(args.run_dir, "checkpoint.pth"))
    a = dict(ckpt["args"])
    preset = a.get("preset")
    if not preset or a.get("data") != "synthetic":
        raise ValueError("only a teacher trained with a --preset on the embedded data is shipped")
    with open(os.path.join(args.run_dir, "log.txt")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    out = os.path.join(args.out_dir, f"{preset}.pth")
    save_checkpoint({"model": ckpt["model"], "args": a, "epoch": ckpt["epoch"]}, out)
    key = SimpleNamespace(**{**a, "teacher_preset": preset, "data_cache": None})
    with tempfile.TemporaryDirectory() as tmp:
        subset = subset_stats(out, a, args.subset, tmp)
    meta = {
        "preset": preset, "file": os.path.basename(out), "size_bytes": os.path.getsize(out),
        "sha256": distill.file_sha256(out), "command": training_command(a),
        "cache_name": os.path.basename(os.path.dirname(distill.teacher_cache_path(key))),
        "recorded": {k[5:]: v for k, v in log[-1].items() if k.startswith("test_") and
                     isinstance(v, float)},
        "subset": {"num_images": args.subset, "stats": subset},
        "log": log,
    }
    with open(os.path.join(args.out_dir, f"{preset}.json"), "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    print(f"wrote {out} ({meta['size_bytes']} bytes, sha256 {meta['sha256']}); AP "
          f"{meta['recorded'].get('AP')} on the full validation split, {subset['AP']:.4f} on "
          f"its first {args.subset} images; stands for the cache entry {meta['cache_name']}")


if __name__ == "__main__":
    engine.main_guard(main)
