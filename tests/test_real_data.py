"""The research workflow on real data: ``methods/<method>.py --data coco --coco-path DIR
--teacher CKPT`` runs the method's headline recipe (common/recipes.py), starts its ResNet from
torchvision's ImageNet file (read from torchvision's cache, never downloaded), and builds an
official teacher from the args stored in its file.

Nothing can be downloaded here, so:
  * the COCO-format folder is built in the test from real photos bundled with scikit-image
    (astronaut, coffee, chelsea), with boxes written by hand;
  * the "ImageNet" ResNet-18 file is a random torchvision ResNet-18 state dict placed under
    torchvision's own file name (from its weights metadata) in a temporary TORCH_HOME;
  * the official teachers are tiny models of ours taken to the official layout
    (``ours_to_official``) and saved as the official repositories save them: the weights under
    "model", the training args as an argparse.Namespace with the official argument names.
"""
import argparse
import json
import math
import os
import sys
import urllib.request

import pytest
import torch
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "methods"))
import baseline  # noqa: E402
import clockdistill  # noqa: E402
import detrdistill  # noqa: E402
import gdetkd  # noqa: E402
import qskd  # noqa: E402
from common import cli, distill, engine, recipes  # noqa: E402
from common.checkpoint import (load_detector, official_model_args,  # noqa: E402
                               ours_to_official)
from common.detr import CONFIGS, build_model  # noqa: E402

skimage_data = pytest.importorskip("skimage.data")

METHODS = {"detrdistill": detrdistill, "qskd": qskd, "clockdistill": clockdistill,
           "gdetkd": gdetkd}
R18_FILE = "resnet18-f37072fd.pth"  # torchvision's name for ResNet18_Weights.IMAGENET1K_V1
R18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"

# ------------------------------------------------------------------------------------------
# A COCO-format folder of real photos, boxes by hand (x, y, w, h in pixels)
# ------------------------------------------------------------------------------------------

PHOTOS = {  # name: (loader, [(category id, box)])
    "astronaut": (skimage_data.astronaut, [(1, [40, 0, 420, 512]), (47, [0, 0, 120, 190])]),
    "coffee": (skimage_data.coffee, [(47, [140, 40, 330, 280])]),
    "chelsea": (skimage_data.chelsea, [(17, [70, 10, 310, 290])]),
}
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 47, "name": "cup"}]
SPLITS = {"train": ["astronaut", "coffee", "chelsea"], "val": ["chelsea", "astronaut"]}


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    ann_id = 1
    for split, names in SPLITS.items():
        folder = root / f"{split}2017"
        folder.mkdir()
        images, anns = [], []
        for i, name in enumerate(names, start=1):
            loader, boxes = PHOTOS[name]
            pixels = loader()
            Image.fromarray(pixels).save(folder / f"{name}.jpg", quality=90)
            images.append({"id": i, "file_name": f"{name}.jpg", "height": pixels.shape[0],
                           "width": pixels.shape[1]})
            for cat, box in boxes:
                anns.append({"id": ann_id, "image_id": i, "category_id": cat, "bbox": box,
                             "area": box[2] * box[3], "iscrowd": 0})
                ann_id += 1
        with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": CATEGORIES}, f)
    return root


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache: TORCH_HOME points at a temporary folder."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    assert torch.hub.get_dir() == str(home / "hub")  # the cache follows TORCH_HOME
    return home


@pytest.fixture
def imagenet_r18(torch_home):
    """A random ResNet-18 state dict under torchvision's file name for the ImageNet weights."""
    name = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    assert name == R18_FILE
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(123)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, folder / name)
    return state


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to download fails the test."""
    def refuse(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


# ------------------------------------------------------------------------------------------
# Official teacher files: tiny models of ours, saved as the official repositories save them
# ------------------------------------------------------------------------------------------

TEACHER = dict(backbone="resnet18", hidden_dim=32, nheads=8, enc_layers=1, dec_layers=1,
               dim_feedforward=64, num_queries=10, dropout=0.0)


def official_args(variant, **extra):
    """The training args an official main.py stores, under the official names, for TEACHER."""
    a = dict(TEACHER, dilation=False, position_embedding="sine", pre_norm=False, masks=False,
             lr=1e-4, lr_backbone=1e-5, epochs=50, coco_path="/data/coco", aux_loss=True,
             set_cost_class=2.0, set_cost_bbox=5.0, set_cost_giou=2.0, cls_loss_coef=2.0,
             bbox_loss_coef=5.0, giou_loss_coef=2.0, focal_alpha=0.25)
    if variant == "deformable_detr":
        a.update(with_box_refine=False, two_stage=False, num_feature_levels=4, enc_n_points=4,
                 dec_n_points=4, position_embedding_scale=2 * math.pi)
    if variant == "dab_detr":
        a.update(modelname="dab_detr", pe_temperatureH=20, pe_temperatureW=20,
                 transformer_activation="prelu", num_patterns=0, num_select=300,
                 random_refpoints_xy=False, cls_loss_coef=1.0)
    a.update(extra)
    return argparse.Namespace(**a)


def official_teacher(path, variant, stored, **model):
    """Save a random tiny ``variant`` (91 COCO slots) built with TEACHER + ``model`` in the
    official layout with ``stored`` args; returns the model it came from."""
    torch.manual_seed(7)
    m = build_model(variant, 91, **{**TEACHER, **model}).eval()
    with torch.no_grad():
        for p in m.parameters():  # random everywhere: no value is a copy of another by chance
            p.normal_(0, 0.2)
    official = ours_to_official(m.state_dict(), variant, dec_layers=TEACHER["dec_layers"],
                                **{k: v for k, v in model.items()
                                   if k in ("with_box_refine", "two_stage")})
    torch.save({"model": official, "args": stored, "epoch": 49}, path)
    return m


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    paths = {}
    for variant in ("deformable_detr", "dab_detr"):
        paths[variant] = str(root / f"{variant}.pth")
        official_teacher(paths[variant], variant, official_args(variant))
    return paths


SIZE_FLAGS = ["--backbone", "resnet18", "--hidden-dim", "32", "--enc-layers", "1",
              "--dec-layers", "1", "--num-queries", "10", "--dim-feedforward", "64",
              "--image-size", "128", "--max-iters", "2", "--epochs", "1", "--batch-size", "1",
              "--num-workers", "0"]
EXPLICIT = {"backbone": "resnet18", "hidden_dim": 32, "enc_layers": 1, "dec_layers": 1,
            "num_queries": 10, "dim_feedforward": 64, "epochs": 1, "batch_size": 1}


def coco_flags(coco_dir):
    return ["--data", "coco", "--coco-path", str(coco_dir)]


# ------------------------------------------------------------------------------------------
# Every method's headline recipe, end to end
# ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_headline_recipe_on_real_data(method, coco_dir, teachers, imagenet_r18, no_network,
                                      tmp_path, capsys):
    name = recipes.HEADLINE[method]
    recipe = recipes.RECIPES[name]
    teacher_variant = recipe.teacher["variant"].value
    out = tmp_path / "run"
    stats = METHODS[method].main(
        coco_flags(coco_dir) + SIZE_FLAGS + ["--teacher", teachers[teacher_variant],
                                             "--teacher-variant", teacher_variant,
                                             "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert f"recipe: {name} (the headline recipe of methods/{method}.py on real data)" in printed
    assert "test_AP" in stats  # trained, then evaluated

    # the resolved settings, field by field against the recipe table (flags given win)
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    saved = json.loads((out / "settings.json").read_text())
    assert saved["settings"] == json.loads(json.dumps(ckpt["args"]["settings"], default=str))
    settings, sources = ckpt["args"]["settings"], ckpt["args"]["sources"]
    assert settings["recipe"] == name and settings["preset"] is None
    for group in ("student", "train", "weights"):
        for field, tagged in getattr(recipe, group).items():
            if field == "gpus":
                continue
            if field in EXPLICIT:
                assert settings[field] == EXPLICIT[field] and sources[field] == "flag", field
            else:
                assert settings[field] == tagged.value, field
                assert sources[field] == f"recipe {name} [{tagged.source}]", field
    assert settings["pretrained"] is True and settings["backbone_init"] == f"ImageNet {R18_FILE}"

    # the student started from exactly that file (the stem and layer1 stay frozen)
    model = ckpt["model"]
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight",
                "layer1.1.bn2.weight"):
        assert torch.equal(model[f"backbone.0.body.{key}"], imagenet_r18[key]), key
    assert not torch.equal(model["backbone.0.body.layer2.0.conv1.weight"],
                           imagenet_r18["layer2.0.conv1.weight"])  # layer2 trained

    # the distilled student loads into methods/baseline.py --eval
    ev = baseline.main(coco_flags(coco_dir) + ["--eval", "--resume", str(out / "checkpoint.pth"),
                                               "--image-size", "128", "--batch-size", "1",
                                               "--num-workers", "0"])
    assert ev["AP"] == pytest.approx(stats["test_AP"])


def test_missing_imagenet_file_stops_at_start(coco_dir, teachers, torch_home, no_network,
                                              monkeypatch):
    """No file in the cache: the run stops while resolving its flags (no data read, no model
    built, no download) with the file name, the folder and the URL."""
    def no_data(*a, **k):
        raise AssertionError("data was read before the missing weights were reported")
    monkeypatch.setattr(engine, "build_dataset", no_data)
    folder = os.path.join(str(torch_home), "hub", "checkpoints")
    with pytest.raises(FileNotFoundError) as e:
        detrdistill.main(coco_flags(coco_dir) + SIZE_FLAGS + [
            "--teacher", teachers["deformable_detr"], "--teacher-variant", "deformable_detr"])
    msg = str(e.value)
    assert f"put the file {R18_FILE} into the folder {folder}" in msg
    assert R18_URL in msg and "--no-pretrained" in msg


def test_no_pretrained_is_random_with_a_warning(coco_dir, teachers, torch_home):
    parser = qskd.add_qskd_args(distill.build_parser("t"))
    with pytest.warns(UserWarning, match="--no-pretrained: the resnet18 backbone starts from "
                                         "random weights"):
        args = distill.resolve(parser.parse_args(coco_flags(coco_dir) + SIZE_FLAGS + [
            "--no-pretrained", "--teacher", teachers["dab_detr"]]))
    assert args.model_overrides["pretrained"] is False
    assert args.settings["backbone_init"] == "random (--no-pretrained)"
    # a weights file keeps working, with no ImageNet file around
    path = torch_home.parent / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    args = distill.resolve(parser.parse_args(coco_flags(coco_dir) + SIZE_FLAGS + [
        "--backbone-weights", str(path), "--teacher", teachers["dab_detr"]]))
    assert args.model_overrides["backbone_weights"] == str(path)
    assert "pretrained" not in args.model_overrides


# ------------------------------------------------------------------------------------------
# Which settings apply: recipe, preset, flags
# ------------------------------------------------------------------------------------------

def resolve(module, argv):
    parser = {"qskd": lambda p: qskd.add_qskd_args(p), "detrdistill": detrdistill.add_method_args,
              "clockdistill": clockdistill.add_args, "gdetkd": gdetkd.add_args}[module](
        distill.build_parser("t"))
    return distill.resolve(parser.parse_args(argv))


def test_presets_only_on_the_embedded_data(coco_dir, teachers, imagenet_r18):
    teacher = ["--teacher", teachers["deformable_detr"]]
    # embedded data, no model flag: the CPU student preset, no recipe
    args = resolve("detrdistill", ["--synth-num-train", "4", "--synth-num-val", "2"])
    assert args.preset == "cpu-student" and args.recipe is None
    assert args.settings["backbone_weights"] == "crops" and args.hidden_dim is None
    # real data, no model flag: the headline recipe, never the CPU preset
    args = resolve("detrdistill", coco_flags(coco_dir) + teacher + ["--backbone", "resnet18"])
    assert args.recipe == "detrdistill-deformable-r50" and args.preset is None
    assert args.settings["hidden_dim"] == 256 and args.epochs == 50 and args.lr == 2e-4
    # real data with --variant: the variant's official settings, no recipe, no preset
    args = resolve("detrdistill", coco_flags(coco_dir) + teacher + [
        "--variant", "deformable_detr", "--backbone", "resnet18"])
    assert args.recipe is None and args.preset is None
    assert args.settings["hidden_dim"] == 256 and args.settings["num_queries"] == 300
    # --recipe none: the same
    args = resolve("detrdistill", coco_flags(coco_dir) + teacher + [
        "--recipe", "none", "--backbone", "resnet18"])
    assert args.recipe is None and args.preset is None
    # a preset named on real data applies, but its crop pretraining does not
    with pytest.warns(UserWarning, match="crop pretraining is for the embedded data only"):
        args = resolve("detrdistill", coco_flags(coco_dir) + teacher + ["--preset", "cpu-student"])
    assert args.preset == "cpu-student" and "backbone_weights" not in args.model_overrides
    with pytest.raises(ValueError, match="crops pretrains the tiny CPU backbone"):
        resolve("detrdistill", coco_flags(coco_dir) + teacher + [
            "--preset", "cpu-student", "--backbone-weights", "crops"])
    with pytest.raises(ValueError, match="--recipe .* and --preset cpu-student both"):
        resolve("detrdistill", coco_flags(coco_dir) + teacher + [
            "--recipe", "detrdistill-deformable-r18", "--preset", "cpu-student"])


def test_explicit_flags_override_the_recipe(coco_dir, teachers, imagenet_r18, monkeypatch):
    """A recipe's loss weight is the method flag's default: a flag given explicitly wins, even
    when it repeats the dataclass default."""
    test_recipe = recipes.Recipe(
        method="qskd", row="test", student={"variant": recipes.recon("dab_detr"),
                                            "backbone": recipes.recon("resnet18")},
        teacher={"variant": recipes.recon("dab_detr"), "backbone": recipes.recon("resnet101")},
        train={"lr": recipes.recon(5e-4), "batch_size": recipes.recon(4), "gpus": recipes.recon(2),
               "epochs": recipes.recon(7)},
        weights={"lambda_agfd": recipes.recon(3.0), "tau": recipes.recon(0.7)})
    monkeypatch.setitem(recipes.RECIPES, "qskd-test", test_recipe)
    base = coco_flags(coco_dir) + ["--teacher", teachers["dab_detr"], "--recipe", "qskd-test"]
    args = resolve("qskd", base)
    assert (args.lambda_agfd, args.tau, args.lr, args.epochs, args.batch_size) == (
        3.0, 0.7, 5e-4, 7, 4)
    assert args.sources["lambda_agfd"] == "recipe qskd-test [recon]"
    assert args.lr_backbone == CONFIGS["dab_detr"]().lr_backbone  # not in the recipe
    args = resolve("qskd", base + ["--lambda-agfd", "1.0", "--lr", "1e-4", "--epochs", "2"])
    assert (args.lambda_agfd, args.tau, args.lr, args.epochs) == (1.0, 0.7, 1e-4, 2)
    assert args.sources["lambda_agfd"] == "flag"
    cfg = distill.config_from_args(qskd.QSKDConfig, args)
    assert cfg.lambda_agfd == 1.0 and cfg.tau == 0.7
    # another method's recipe is refused
    with pytest.raises(ValueError, match="recipe of methods/detrdistill.py, not of "
                                         "methods/qskd.py"):
        resolve("qskd", coco_flags(coco_dir) + ["--teacher", teachers["dab_detr"], "--recipe",
                                                "detrdistill-deformable-r50"])


def test_teacher_of_another_family_is_refused(coco_dir, teachers, imagenet_r18):
    # QSKD's headline is DAB-DETR; a Deformable DETR teacher needs other flags
    with pytest.raises(ValueError, match="recipe qskd-dab-r18 distils a dab_detr student from "
                                         "a dab_detr teacher, but the teacher is a "
                                         "deformable_detr: pass --recipe none --variant "
                                         "deformable_detr"):
        resolve("qskd", coco_flags(coco_dir) + ["--teacher", teachers["deformable_detr"],
                                                "--teacher-variant", "deformable_detr"])
    with pytest.raises(ValueError, match="pass --recipe detrdistill-conditional-r50 or "
                                         "--recipe detrdistill-conditional-r18"):
        resolve("detrdistill", coco_flags(coco_dir) + ["--teacher", teachers["dab_detr"],
                                                       "--teacher-variant", "conditional_detr",
                                                       "--backbone", "resnet18"])
    # no teacher on real data: what the recipe expects and how to get it
    with pytest.raises(ValueError, match="expects a deformable_detr resnet101 teacher"):
        resolve("gdetkd", coco_flags(coco_dir) + ["--backbone", "resnet18"])


def test_list_recipes(capsys):
    with pytest.raises(SystemExit) as e:
        baseline.main(["--list-recipes"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in recipes.RECIPES:
        assert name in text
    assert "teacher 45.5 [paper], baseline 44.1 [paper], distilled 46.6 [paper]" in text
    with pytest.raises(SystemExit):
        qskd.main(["--list-recipes"])
    text = capsys.readouterr().out
    assert "qskd-dab-r18 (headline)" in text and "detrdistill-deformable-r50" not in text


def test_recipe_table():
    """Every recipe's fields are settings of its variant and method, its source tags are the
    documented ones, and the papers' numbers are the ones the method pages quote."""
    configs = {m: getattr(METHODS[m], c) for m, c in recipes.METHOD_CONFIGS.items()}
    for name, r in recipes.RECIPES.items():
        assert name.startswith(r.method + "-") and r.method in recipes.HEADLINE
        cfg = CONFIGS[r.student["variant"].value]()
        for field in r.student:
            assert field == "variant" or hasattr(cfg, field), (name, field)
        assert set(r.train) == set(cli.TRAIN_FLAGS) | {"gpus"}, name
        method_fields = configs[r.method].__dataclass_fields__
        assert all(f in method_fields for f in r.weights), name
        tags = [t.source for g in (r.student, r.teacher, r.train, r.weights, r.reported)
                for t in g.values()]
        assert set(tags) <= {"paper", "code", "3p", "recon"}, name
        assert r.teacher["variant"].value == r.student["variant"].value  # same family
    ap = {n: tuple(r.reported[k].value for k in ("teacher_ap", "baseline_ap", "distilled_ap"))
          for n, r in recipes.RECIPES.items()}
    assert ap["detrdistill-deformable-r50"] == (45.5, 44.1, 46.6)
    assert ap["detrdistill-deformable-r18"][1:] == (40.0, 43.3)
    assert ap["detrdistill-conditional-r50"] == (42.4, 40.7, 42.9)
    assert ap["qskd-conditional-r18"][1:] == (35.8, 39.9)
    assert ap["qskd-dab-r18"][1:] == (36.2, 41.5)
    assert ap["qskd-dino-r50"][1:] == (49.0, 51.4)
    assert ap["gdetkd-deformable-r50"] == (None, None, None)  # no DETR rows in the paper
    assert recipes.RECIPES["gdetkd-deformable-r50"].student["variant"].source == "recon"


# ------------------------------------------------------------------------------------------
# Official teachers: built from the args stored in the file
# ------------------------------------------------------------------------------------------

def test_official_teacher_from_its_stored_args(tmp_path):
    """A DAB-DETR file trained with positional temperature 10 (HF's converter uses 10 for the
    released R50-DC5 model) loads with --teacher-variant alone and computes what the model it
    came from computes; built with the default temperature 20 it would not."""
    path = str(tmp_path / "dab.pth")
    source = official_teacher(path, "dab_detr", official_args(
        "dab_detr", pe_temperatureH=10, pe_temperatureW=10, num_queries=12, num_select=50),
        pos_temperature=10.0, num_queries=12, num_select=50)
    ids = [1, 17, 47]
    teacher = load_detector(path, 3, variant="dab_detr", category_ids=ids)
    assert teacher.cfg.pos_temperature == 10.0 and teacher.cfg.num_queries == 12
    assert teacher.cfg.activation == "prelu" and teacher.cfg.backbone == "resnet18"
    assert teacher.cfg.matcher_weights == (2.0, 5.0, 2.0)
    assert teacher.cfg.loss_weights == (1.0, 5.0, 2.0)
    x = torch.randn(1, 3, 96, 128)
    m = torch.zeros(1, 96, 128, dtype=torch.bool)
    with torch.no_grad():
        ref, got = source(x, m), teacher(x, m)
    torch.testing.assert_close(got["pred_boxes"], ref["pred_boxes"])
    torch.testing.assert_close(got["pred_logits"], ref["pred_logits"][..., ids])
    # the same weights at temperature 20 compute something else: reading the args matters
    other = build_model("dab_detr", 91, **{**TEACHER, "num_queries": 12, "num_select": 50})
    other.eval()
    other.load_state_dict(source.state_dict())
    with torch.no_grad():
        assert not torch.allclose(other(x, m)["pred_boxes"], ref["pred_boxes"], atol=1e-4)


def test_contradicting_teacher_arg_is_refused(coco_dir, tmp_path, imagenet_r18):
    path = str(tmp_path / "dab.pth")
    official_teacher(path, "dab_detr", official_args("dab_detr", pe_temperatureH=10,
                                                     pe_temperatureW=10), pos_temperature=10.0)
    argv = coco_flags(coco_dir) + SIZE_FLAGS + ["--teacher", path, "--teacher-variant",
                                                "dab_detr", "--max-iters", "1"]
    with pytest.raises(ValueError, match=r"pos_temperature=20\.0 contradicts the args stored in "
                                         rf"{path}: it was trained with pe_temperatureH=10, "
                                         r"pe_temperatureW=10"):
        qskd.main(argv + ["--teacher-arg", "pos_temperature=20"])
    with pytest.raises(ValueError, match="num_queries=300 contradicts .* num_queries=10"):
        qskd.main(argv + ["--teacher-arg", "num_queries=300"])
    # the variant the file names (DAB-DETR's and DINO's main.py store modelname)
    with pytest.raises(ValueError, match="modelname='dab_detr', not conditional_detr"):
        load_detector(path, 3, variant="conditional_detr", category_ids=[1, 17, 47])


def test_official_args_names():
    """The official argument names each repository's main.py (DINO: its config file) uses."""
    ns = argparse.Namespace
    got = official_model_args("conditional_detr", ns(backbone="resnet101", dilation=True,
                                                     num_queries=300, set_cost_class=2,
                                                     set_cost_bbox=5, set_cost_giou=2, lr=1e-4))
    assert {k: v for k, (v, _) in got.items()} == {
        "backbone": "resnet101", "dilation": True, "num_queries": 300,
        "matcher_weights": (2.0, 5.0, 2.0)}
    got = official_model_args("deformable_detr", ns(with_box_refine=True, two_stage=True,
                                                    num_feature_levels=4, dec_n_points=4))
    assert {k: v for k, (v, _) in got.items()} == {
        "with_box_refine": True, "two_stage": True, "num_feature_levels": 4, "dec_n_points": 4}
    got = official_model_args("dino", ns(modelname="dino", pe_temperatureH=20,
                                         pe_temperatureW=20, transformer_activation="relu",
                                         dn_number=100, two_stage_type="standard",
                                         return_interm_indices=[1, 2, 3]))
    assert {k: v for k, (v, _) in got.items()} == {
        "pos_temperature": 20.0, "activation": "relu", "dn_number": 100}
    # the DETR loss: no cls_loss_coef, the class term weighs 1
    got = official_model_args("detr", ns(bbox_loss_coef=5, giou_loss_coef=2, eos_coef=0.1))
    assert got["loss_weights"][0] == (1.0, 5.0, 2.0) and got["eos_coef"][0] == 0.1
    for variant, bad, match in (
            ("dino", dict(return_interm_indices=[0, 1, 2, 3]), "return_interm_indices"),
            ("dab_detr", dict(num_patterns=3), "num_patterns=3"),
            ("detr", dict(pre_norm=True), "pre_norm=True"),
            ("dab_detr", dict(pe_temperatureH=20, pe_temperatureW=10), "one temperature"),
            ("dino", dict(backbone="swin_L_384_22k"), "swin_L_384_22k")):
        with pytest.raises(ValueError, match=match):
            official_model_args(variant, ns(**bad))


def test_baseline_trains_a_recipes_student_or_teacher(coco_dir, imagenet_r18, torch_home):
    """methods/baseline.py --recipe NAME: the recipe's student without distillation (the
    baseline row), or with --recipe-model teacher the teacher it expects."""
    parser = cli.build_parser("t")
    args, _ = cli.resolve(parser.parse_args(coco_flags(coco_dir) + ["--recipe", "qskd-dab-r18"]))
    assert args.variant == "dab_detr" and args.model_overrides["backbone"] == "resnet18"
    assert args.model_overrides["pretrained"] is True and args.epochs == 50
    with pytest.raises(FileNotFoundError, match="put the file resnet101-63fe2227.pth"):
        cli.resolve(parser.parse_args(coco_flags(coco_dir) + [
            "--recipe", "qskd-dab-r18", "--recipe-model", "teacher"]))
    args, _ = cli.resolve(parser.parse_args(coco_flags(coco_dir) + [
        "--recipe", "qskd-dab-r18", "--recipe-model", "teacher", "--backbone", "resnet18"]))
    assert args.variant == "dab_detr" and args.settings["num_queries"] == 300
    assert args.sources["variant"] == "recipe qskd-dab-r18 [paper]"
    with pytest.raises(ValueError, match="--recipe-model teacher is for methods/baseline.py"):
        resolve("qskd", coco_flags(coco_dir) + ["--recipe-model", "teacher", "--teacher",
                                                str(coco_dir)])
