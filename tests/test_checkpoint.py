"""Official checkpoint loading (common/checkpoint.py).

No file can be downloaded here, so the official state dicts are synthetic:
  * at full size (R50, D=256, COCO), built from a key -> shape manifest written below from
    the official repositories' models (the backbone from torchvision's ResNet-50), not from
    our model: the mapping must turn each into exactly our default model's keys and shapes;
  * at tiny sizes, our model's state dict taken to the official layout and back, where the
    loaded model must give the same outputs as the one it came from.
"""
import argparse
import fractions
import functools
import pickle
import re

import pytest
import torch
import torchvision

from common.checkpoint import (COCO_80_CATEGORY_IDS, coco_slots_to_classes, extract_state_dict,
                               load_official, official_layout, official_to_ours,
                               ours_to_official, read_checkpoint)
from common.detr import build_model

# ------------------------------------------------------------------------------------------
# The official manifests, read from the official models (R50, D = 256, 6 + 6 layers)
# ------------------------------------------------------------------------------------------

D = 256


def lin(name, o, i):
    return {f"{name}.weight": (o, i), f"{name}.bias": (o,)}


def norm(name, d=D):
    return {f"{name}.weight": (d,), f"{name}.bias": (d,)}


def mlp(name, dims):
    out = {}
    for j, (i, o) in enumerate(zip(dims[:-1], dims[1:])):
        out.update(lin(f"{name}.layers.{j}", o, i))
    return out


def mha(name):  # nn.MultiheadAttention: packed in-projection
    return {f"{name}.in_proj_weight": (3 * D, D), f"{name}.in_proj_bias": (3 * D,),
            **lin(f"{name}.out_proj", D, D)}


def msda(name):  # 8 heads x 4 levels x 4 points
    return {**lin(f"{name}.sampling_offsets", 8 * 4 * 4 * 2, D),
            **lin(f"{name}.attention_weights", 8 * 4 * 4, D),
            **lin(f"{name}.value_proj", D, D), **lin(f"{name}.output_proj", D, D)}


@functools.lru_cache(maxsize=None)
def _resnet50_shapes():
    with torch.device("meta"):  # shapes only
        sd = torchvision.models.resnet50(weights=None).state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


def backbone():  # torchvision's ResNet-50 body, no fc, no num_batches_tracked
    sd = _resnet50_shapes()
    return {f"backbone.0.body.{k}": shape for k, shape in sd.items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def dense_encoder(prelu=False):
    m = {}
    for i in range(6):
        p = f"transformer.encoder.layers.{i}"
        m.update(mha(f"{p}.self_attn"), **lin(f"{p}.linear1", 2048, D),
                 **lin(f"{p}.linear2", D, 2048), **norm(f"{p}.norm1"), **norm(f"{p}.norm2"))
        if prelu:
            m[f"{p}.activation.weight"] = (1,)
    return m


def conditional_decoder(prelu=False):
    m = {}
    for i in range(6):
        p = f"transformer.decoder.layers.{i}"
        for n in ("sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj",
                  "sa_v_proj", "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj",
                  "ca_v_proj", "ca_qpos_sine_proj") + (("ca_qpos_proj",) if i == 0 else ()):
            m.update(lin(f"{p}.{n}", D, D))
        m.update(lin(f"{p}.self_attn.out_proj", D, D), **lin(f"{p}.cross_attn.out_proj", D, D),
                 **lin(f"{p}.linear1", 2048, D), **lin(f"{p}.linear2", D, 2048),
                 **norm(f"{p}.norm1"), **norm(f"{p}.norm2"), **norm(f"{p}.norm3"))
        if prelu:
            m[f"{p}.activation.weight"] = (1,)
    return m


def deformable_body(ffn):
    m = backbone()
    for lvl, c in enumerate((512, 1024, 2048)):
        m.update({f"input_proj.{lvl}.0.weight": (D, c, 1, 1), f"input_proj.{lvl}.0.bias": (D,)})
    m.update({"input_proj.3.0.weight": (D, 2048, 3, 3), "input_proj.3.0.bias": (D,)})
    for lvl in range(4):
        m.update(norm(f"input_proj.{lvl}.1"))
    m["transformer.level_embed"] = (4, D)
    for i in range(6):
        p = f"transformer.encoder.layers.{i}"
        m.update(msda(f"{p}.self_attn"), **norm(f"{p}.norm1"), **lin(f"{p}.linear1", ffn, D),
                 **lin(f"{p}.linear2", D, ffn), **norm(f"{p}.norm2"))
        p = f"transformer.decoder.layers.{i}"
        m.update(msda(f"{p}.cross_attn"), **norm(f"{p}.norm1"), **mha(f"{p}.self_attn"),
                 **norm(f"{p}.norm2"), **lin(f"{p}.linear1", ffn, D),
                 **lin(f"{p}.linear2", D, ffn), **norm(f"{p}.norm3"))
    return m


def heads(n, classes=91, prefix=""):
    m = {}
    for i in range(n):
        m.update(lin(f"{prefix}class_embed.{i}", classes, D),
                 **mlp(f"{prefix}bbox_embed.{i}", [D, D, D, 4]))
    return m


def official_manifest(name):
    """name -> {key: shape} of the official R50 COCO file."""
    if name == "detr":  # 7.2
        m = backbone()
        m.update({"input_proj.weight": (D, 2048, 1, 1), "input_proj.bias": (D,),
                  "query_embed.weight": (100, D)}, **dense_encoder())
        for i in range(6):
            p = f"transformer.decoder.layers.{i}"
            m.update(mha(f"{p}.self_attn"), **mha(f"{p}.multihead_attn"),
                     **lin(f"{p}.linear1", 2048, D), **lin(f"{p}.linear2", D, 2048),
                     **norm(f"{p}.norm1"), **norm(f"{p}.norm2"), **norm(f"{p}.norm3"))
        m.update(norm("transformer.decoder.norm"), **lin("class_embed", 92, D),
                 **mlp("bbox_embed", [D, D, D, 4]))
        return m
    if name == "conditional_detr":  # 7.3
        m = backbone()
        m.update({"input_proj.weight": (D, 2048, 1, 1), "input_proj.bias": (D,),
                  "query_embed.weight": (300, D)}, **dense_encoder(), **conditional_decoder())
        m.update(norm("transformer.decoder.norm"),
                 **mlp("transformer.decoder.query_scale", [D, D, D]),
                 **mlp("transformer.decoder.ref_point_head", [D, D, 2]),
                 **lin("class_embed", 91, D), **mlp("bbox_embed", [D, D, D, 4]))
        return m
    if name == "dab_detr":  # 7.4
        m = backbone()
        m.update({"input_proj.weight": (D, 2048, 1, 1), "input_proj.bias": (D,),
                  "refpoint_embed.weight": (300, 4)}, **dense_encoder(prelu=True),
                 **conditional_decoder(prelu=True))
        m.update(mlp("transformer.encoder.query_scale", [D, D, D]),
                 **mlp("transformer.decoder.query_scale", [D, D, D]),
                 **mlp("transformer.decoder.ref_point_head", [2 * D, D, D]),
                 **mlp("transformer.decoder.ref_anchor_head", [D, D, 2]),
                 **norm("transformer.decoder.norm"), **lin("class_embed", 91, D),
                 **mlp("bbox_embed", [D, D, D, 4]),
                 **mlp("transformer.decoder.bbox_embed", [D, D, D, 4]))  # alias
        return m
    if name.startswith("deformable_detr"):  # 7.5
        refine = name in ("deformable_detr_refine", "deformable_detr_refine_two_stage")
        two_stage = name.endswith("two_stage")
        m = deformable_body(1024)
        if two_stage:
            m.update(lin("transformer.enc_output", D, D), **norm("transformer.enc_output_norm"),
                     **lin("transformer.pos_trans", 2 * D, 2 * D),
                     **norm("transformer.pos_trans_norm", 2 * D))
        else:
            m.update(lin("transformer.reference_points", 2, D))
            m["query_embed.weight"] = (300, 2 * D)
        n = 7 if two_stage else 6
        m.update(heads(n))
        alias = heads(n, prefix="transformer.decoder.")
        m.update({k: s for k, s in alias.items() if (refine and "bbox" in k) or
                  (two_stage and "class" in k)})
        return m
    if name == "dino":  # 7.6
        m = deformable_body(2048)
        m.update(norm("transformer.decoder.norm"),
                 **mlp("transformer.decoder.ref_point_head", [2 * D, D, D]),
                 **{"transformer.tgt_embed.weight": (900, D), "label_enc.weight": (92, D)},
                 **lin("transformer.enc_output", D, D), **norm("transformer.enc_output_norm"),
                 **lin("transformer.enc_out_class_embed", 91, D),
                 **mlp("transformer.enc_out_bbox_embed", [D, D, D, 4]),
                 **heads(6), **heads(6, prefix="transformer.decoder."))
        return m
    raise KeyError(name)


# name -> (variant, flags, how the file shares its heads)
OFFICIAL = {
    "detr": ("detr", {}, "single"),
    "conditional_detr": ("conditional_detr", {}, "single"),
    "dab_detr": ("dab_detr", {}, "single"),
    "deformable_detr": ("deformable_detr", {}, "shared"),
    "deformable_detr_refine": ("deformable_detr", dict(with_box_refine=True), "per_layer"),
    "deformable_detr_two_stage": ("deformable_detr", dict(two_stage=True), "shared"),
    "deformable_detr_refine_two_stage": ("deformable_detr",
                                         dict(with_box_refine=True, two_stage=True), "per_layer"),
    "dino": ("dino", {}, "shared"),
}


def canonical(key, sharing):
    """The key whose value an official file repeats under ``key``: the top-level head for the
    decoder's aliases, index 0 for a head shared over layers (the official layout, stated here independently)."""
    key = re.sub(r"^transformer\.decoder\.(class_embed|bbox_embed)\.", r"\1.", key)
    if sharing == "shared":
        key = re.sub(r"^(class_embed|bbox_embed)\.\d+\.", r"\1.0.", key)
    return key


def synthetic(manifest, sharing):
    """A value per key, distinct between keys (a broadcast scalar: no memory at full size);
    aliases and shared heads repeat their original."""
    state = {}
    for k in sorted(manifest, key=lambda k: canonical(k, sharing) != k):  # originals first
        c = canonical(k, sharing)
        state[k] = state[c] if c != k else torch.tensor(float(len(state) + 1)).expand(manifest[k])
    return state


def value_of(t):
    """The constant a synthetic tensor holds (its first element: no pass over 25M values)."""
    return float(t[(0,) * t.dim()])


def test_manifests_follow_the_official_layout():
    """Spot checks of the hand-written manifests against the official names and shapes."""
    bb = backbone()
    assert bb["backbone.0.body.conv1.weight"] == (64, 3, 7, 7)
    for layer, blocks in zip((1, 2, 3, 4), (3, 4, 6, 3)):  # 3/4/6/3 bottlenecks
        assert f"backbone.0.body.layer{layer}.{blocks - 1}.conv3.weight" in bb
        assert f"backbone.0.body.layer{layer}.{blocks}.conv1.weight" not in bb
        assert f"backbone.0.body.layer{layer}.0.downsample.1.running_var" in bb
    assert not any("num_batches_tracked" in k or ".fc." in k for k in bb)
    m = official_manifest("conditional_detr")
    assert "transformer.decoder.layers.0.ca_qpos_proj.weight" in m
    assert "transformer.decoder.layers.1.ca_qpos_proj.weight" not in m
    assert m["transformer.decoder.ref_point_head.layers.1.weight"] == (2, 256)
    m = official_manifest("dab_detr")
    assert m["transformer.decoder.ref_point_head.layers.0.weight"] == (256, 512)
    assert m["transformer.decoder.layers.3.activation.weight"] == (1,)
    assert "transformer.decoder.bbox_embed.layers.2.weight" in m
    m = official_manifest("deformable_detr_refine_two_stage")
    assert m["input_proj.3.0.weight"] == (256, 2048, 3, 3)
    assert m["transformer.encoder.layers.5.self_attn.attention_weights.weight"] == (128, 256)
    assert "class_embed.6.weight" in m and "transformer.decoder.class_embed.6.bias" in m
    assert "query_embed.weight" not in m and m["transformer.pos_trans.weight"] == (512, 512)
    plain = official_manifest("deformable_detr")
    assert "transformer.decoder.bbox_embed.0.layers.0.weight" not in plain
    m = official_manifest("dino")
    assert m["transformer.decoder.layers.0.linear1.weight"] == (2048, 256)
    assert m["label_enc.weight"] == (92, 256) and m["transformer.tgt_embed.weight"] == (900, 256)
    assert "transformer.decoder.norm.weight" in m
    assert official_manifest("detr")["class_embed.weight"] == (92, 256)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_full_size_maps(name):
    """The R50 COCO file of each variant maps onto our default model exactly: equal key sets
    and shapes, every value where the official layout puts it; and back to the official layout."""
    variant, flags, sharing = OFFICIAL[name]
    official = synthetic(official_manifest(name), sharing)
    ours = official_to_ours({"module." + k: v for k, v in official.items()}, variant, **flags)
    with torch.device("meta"):  # shapes only
        model = build_model(variant, 91, **flags)
    own = model.state_dict()
    assert set(ours) == set(own)
    assert all(ours[k].shape == own[k].shape for k in own)
    for k in own:
        src = re.sub(r"^(class_embed|bbox_embed)\.\d+\.", r"\1.", k) if sharing == "single" else k
        assert value_of(ours[k]) == value_of(official[src]), k
    back = ours_to_official(ours, variant, **flags)
    assert set(back) == set(official)
    assert all(back[k].shape == official[k].shape and value_of(back[k]) == value_of(official[k])
               for k in official)


def test_official_full_size_loads():
    official = synthetic(official_manifest("dino"), "shared")
    model = load_official({"model": official, "epoch": 11}, "dino")
    assert not model.training
    assert torch.equal(model.class_embed[5].bias, official["class_embed.5.bias"])
    assert torch.equal(model.label_enc.weight, official["label_enc.weight"])
    assert torch.equal(model.backbone[0].body.layer4[2].bn3.running_var,
                       official["backbone.0.body.layer4.2.bn3.running_var"])


# ------------------------------------------------------------------------------------------
# Tiny models: round trip, outputs, errors
# ------------------------------------------------------------------------------------------

SMALL = dict(backbone="tiny", width=8, hidden_dim=32, nheads=4, enc_layers=2, dec_layers=3,
             dim_feedforward=48, num_queries=10, dropout=0.0)
NC = 5
CASES = [(n, v, f, s) for n, (v, f, s) in OFFICIAL.items()]


def tiny(variant, num_classes=NC, seed=0, **flags):
    """A tiny model with every parameter random, so no value is a copy of another by chance
    (the official init zeroes the last box layer) and per-layer heads all differ."""
    torch.manual_seed(seed)
    model = build_model(variant, num_classes, **SMALL, **flags).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and
                                                                  p.shape[0] == 1 else 0.0))
        for b in list(model.backbone.modules()):  # FrozenBN buffers: positive variances
            if hasattr(b, "running_var"):
                b.running_var.uniform_(0.5, 1.5, generator=g)
                b.running_mean.normal_(0, 0.1, generator=g)
    return model


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 48, 64, generator=g)
    m = torch.zeros(2, 48, 64, dtype=torch.bool)
    m[1, :, 40:] = True
    return x, m


def outputs(model):
    with torch.no_grad():
        out = model(*images())
    return out["pred_logits"], out["pred_boxes"]


@pytest.mark.parametrize("name,variant,flags,sharing", CASES, ids=list(OFFICIAL))
def test_round_trip_and_same_outputs(name, variant, flags, sharing):
    model = tiny(variant, **flags)
    ours = model.state_dict()
    official = ours_to_official(ours, variant, dec_layers=3, **flags)
    # the official layout's structure: single heads unindexed, aliases present
    has = lambda pat: any(re.match(pat, k) for k in official)
    assert has(r"^class_embed\.weight$") == (sharing == "single")
    assert has(r"^class_embed\.\d+\.") == (sharing != "single")
    assert has(r"^transformer\.decoder\.bbox_embed\.") == (
        variant in ("dab_detr", "dino") or flags.get("with_box_refine", False))
    assert has(r"^transformer\.decoder\.class_embed\.") == (
        variant == "dino" or flags.get("two_stage", False))
    back = official_to_ours(official, variant, dec_layers=3, **flags)
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    loaded = load_official(official, variant, num_classes=NC, **SMALL, **flags)
    for a, b in zip(outputs(model), outputs(loaded)):
        assert torch.equal(a, b)


def test_module_prefix_and_file_with_namespace(tmp_path):
    model = tiny("dino")
    official = ours_to_official(model.state_dict(), "dino", dec_layers=3)
    path = tmp_path / "checkpoint0011_4scale.pth"
    torch.save({"model": {"module." + k: v for k, v in official.items()},
                "args": argparse.Namespace(lr=1e-4, dn_labelbook_size=NC, coco_path="/data"),
                "epoch": 11}, path)
    with pytest.raises(pickle.UnpicklingError):  # why the loader needs its allowlist
        torch.load(path, weights_only=True)
    ckpt = read_checkpoint(str(path))
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].lr == 1e-4
    loaded = load_official(path, "dino", num_classes=NC, **SMALL)
    for a, b in zip(outputs(model), outputs(loaded)):
        assert torch.equal(a, b)
    # a bare state dict file, and the 'ema_model' entry
    torch.save(official, tmp_path / "bare.pth")
    for state in (extract_state_dict(read_checkpoint(tmp_path / "bare.pth")),
                  extract_state_dict({"ema_model": official, "model": {}}, "ema_model")):
        assert set(state) == set(official)
        assert all(torch.equal(state[k], official[k]) for k in state)
    with pytest.raises(ValueError, match="both 'transformer.level_embed' and 'module.transformer"):
        level_embed = official["transformer.level_embed"]
        official_to_ours({**official, "module.transformer.level_embed": level_embed}, "dino",
                         dec_layers=3)


def test_stored_args_build_the_model(tmp_path):
    """A Deformable DETR +refine +two-stage file whose args record the flags (and the sizes,
    under the official names) loads without any flag, and computes what its source computes;
    a flag that contradicts the file names both values."""
    flags = dict(with_box_refine=True, two_stage=True)
    model = tiny("deformable_detr", **flags)
    official = ours_to_official(model.state_dict(), "deformable_detr", dec_layers=3, **flags)
    stored = argparse.Namespace(**{k: v for k, v in SMALL.items() if k not in ("backbone",
                                                                              "width")},
                                **flags, num_feature_levels=4, position_embedding="sine",
                                lr=2e-4, epochs=50)
    path = tmp_path / "r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.pth"
    torch.save({"model": official, "args": stored}, path)
    loaded = load_official(path, "deformable_detr", num_classes=NC, backbone="tiny", width=8)
    assert (loaded.cfg.with_box_refine, loaded.cfg.two_stage, loaded.cfg.dec_layers) == (
        True, True, 3)
    for a, b in zip(outputs(model), outputs(loaded)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="two_stage=False contradicts the args stored in the "
                                         "checkpoint: it was trained with two_stage=True"):
        load_official(path, "deformable_detr", num_classes=NC, backbone="tiny", width=8,
                      two_stage=False)


def test_unsafe_pickle_needs_consent(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="allow_unsafe_pickle=True"):
        read_checkpoint(path)
    with pytest.warns(UserWarning, match="weights_only=False"):
        ckpt = read_checkpoint(path, allow_unsafe_pickle=True)
    assert ckpt["ratio"] == fractions.Fraction(1, 3)
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pth")


def official_tiny(variant, seed=0, **flags):
    return ours_to_official(tiny(variant, seed=seed, **flags).state_dict(), variant, dec_layers=3,
                            **flags)


def test_misfit_files_are_refused_by_key():
    official = official_tiny("dab_detr")
    load = lambda sd, **kw: load_official(sd, "dab_detr", num_classes=NC, **SMALL, **kw)
    gone = "transformer.decoder.ref_anchor_head.layers.0.bias"
    with pytest.raises(ValueError, match="1 missing: " + re.escape(gone)):
        load({k: v for k, v in official.items() if k != gone})
    with pytest.raises(ValueError, match=r"1 unexpected: transformer\.patterns\.weight"):
        load({**official, "transformer.patterns.weight": torch.zeros(3, 32)})  # a "3 pat" model
    with pytest.raises(ValueError, match=re.escape("mis-shaped: refpoint_embed.weight (11, 4) "
                                                   "(model (10, 4))")):
        load({**official, "refpoint_embed.weight": torch.zeros(11, 4)})
    with pytest.raises(ValueError, match="class rows differ"):
        load_official(official, "dab_detr", num_classes=NC + 1, **SMALL)
    with pytest.raises(ValueError, match="is this a checkpoint of this project"):
        load(tiny("dab_detr").state_dict())
    with pytest.raises(ValueError, match="no 'model' entry"):
        load({"epoch": 3, "args": None})
    with pytest.raises(ValueError, match="'epoch' is a int"):
        load({"model": {**official, "epoch": 3}})


def test_aliases_and_shared_heads_are_checked():
    official = official_tiny("dino")
    bad = dict(official)
    bad["transformer.decoder.bbox_embed.1.layers.2.bias"] = bad["bbox_embed.1.layers.2.bias"] + 1
    msg = "transformer.decoder.bbox_embed.1.layers.2.bias must be an alias of bbox_embed.1.layers."
    with pytest.raises(ValueError, match=re.escape(msg)):
        official_to_ours(bad, "dino", dec_layers=3)
    bad = dict(official)
    for k in ("class_embed.2.bias", "transformer.decoder.class_embed.2.bias"):
        bad[k] = official[k] + 1
    with pytest.raises(ValueError, match=r"class_embed\.2\.bias differs from class_embed\.0\.bias"):
        official_to_ours(bad, "dino", dec_layers=3)
    # Deformable files: the flags must be the file's
    refine = official_tiny("deformable_detr", with_box_refine=True)
    with pytest.raises(ValueError, match="differs from"):
        official_to_ours(refine, "deformable_detr", dec_layers=3)
    plain = official_tiny("deformable_detr")
    with pytest.raises(ValueError, match=re.escape("alias copies transformer.decoder.bbox_embed.*; "
                                                   "none found")):
        official_to_ours(plain, "deformable_detr", dec_layers=3, with_box_refine=True)
    with pytest.raises(ValueError, match="Deformable DETR flags"):
        official_layout("dino", with_box_refine=True)


# ------------------------------------------------------------------------------------------
# COCO's 91 slots -> a data set's classes
# ------------------------------------------------------------------------------------------

def rows(n, d=3):
    """A head whose row r holds r everywhere, so a slice shows which slots it kept."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).clone()


def test_coco_80_ids():
    assert len(COCO_80_CATEGORY_IDS) == 80 == len(set(COCO_80_CATEGORY_IDS))
    unused = set(range(1, 91)) - set(COCO_80_CATEGORY_IDS)
    assert unused == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert COCO_80_CATEGORY_IDS == sorted(COCO_80_CATEGORY_IDS)


def test_class_slots_hand_built():
    ids = [1, 3, 90]
    # DETR (official layout): 91 slots + no-object, kept last
    out = coco_slots_to_classes({"class_embed.weight": rows(92), "query_embed.weight": rows(4),
                                 "class_embed.bias": torch.arange(92.)}, ids, "detr")
    assert out["class_embed.weight"][:, 0].tolist() == [1, 3, 90, 91]
    assert out["class_embed.bias"].tolist() == [1, 3, 90, 91]
    assert torch.equal(out["query_embed.weight"], rows(4))
    # DINO (our layout): heads, encoder head, label_enc with dn_labelbook_size = 100
    sd = {"class_embed.0.weight": rows(91), "transformer.decoder.class_embed.2.weight": rows(91),
          "transformer.enc_out_class_embed.bias": torch.arange(91.), "label_enc.weight": rows(101)}
    out = coco_slots_to_classes(sd, ids, "dino", dec_layers=3)
    assert out["class_embed.0.weight"][:, 0].tolist() == [1, 3, 90]
    assert out["transformer.enc_out_class_embed.bias"].tolist() == [1, 3, 90]
    assert out["transformer.decoder.class_embed.2.weight"][:, 0].tolist() == [1, 3, 90]
    assert out["label_enc.weight"][:, 0].tolist() == [1, 3, 90, 100]
    # Deformable two-stage: the proposal head (index 3 of 3 layers + 1) keeps slot 0 first
    sd = {f"class_embed.{i}.weight": rows(91) for i in range(4)}
    out = coco_slots_to_classes(sd, ids, "deformable_detr", dec_layers=3, with_box_refine=True,
                                two_stage=True)
    assert out["class_embed.2.weight"][:, 0].tolist() == [1, 3, 90]
    assert out["class_embed.3.weight"][:, 0].tolist() == [0, 3, 90]
    with pytest.raises(ValueError, match="objectness"):
        coco_slots_to_classes(sd, ids, "deformable_detr", dec_layers=3, two_stage=True)
    out = coco_slots_to_classes(sd, torch.tensor([5, 2]), "dino", dec_layers=3)  # tensor ids
    assert out["class_embed.0.weight"][:, 0].tolist() == [5, 2]
    for bad, msg in (([], "non-empty"), ([1, 1], "distinct"), ([91], r"\[0, 91\)"),
                     ([-1], r"\[0, 91\)"), ([1.0], "ints")):
        with pytest.raises(ValueError, match=msg):
            coco_slots_to_classes(sd, bad, "dino", dec_layers=3)
    with pytest.raises(ValueError, match="class_embed.weight has 91 rows, expected 92"):
        coco_slots_to_classes({"class_embed.weight": rows(91)}, ids, "detr")


@pytest.mark.parametrize("variant,flags,extra", [
    ("detr", {}, [91]),
    ("conditional_detr", {}, []),
    ("deformable_detr", dict(with_box_refine=True, two_stage=True), []),
])
def test_subset_model_scores_the_same_classes(variant, flags, extra):
    """A model loaded with category_ids gives the full 91-slot model's logits at those slots
    (DETR: plus no-object), the same boxes, and for two-stage the same proposals."""
    ids = [1, 3, 90, 17]
    full = tiny(variant, num_classes=91, **flags)
    official = ours_to_official(full.state_dict(), variant, dec_layers=3, **flags)
    sub = load_official({"model": official}, variant, category_ids=ids, **SMALL, **flags)
    assert sub.num_classes == 4
    with torch.no_grad():
        enc_f, enc_s = full.encode(*images()), sub.encode(*images())
        dec_f, dec_s = full.decode(enc_f), sub.decode(enc_s)
    if enc_f.proposals is not None:
        assert torch.equal(enc_f.proposals.topk_index, enc_s.proposals.topk_index)
    torch.testing.assert_close(dec_s.boxes, dec_f.boxes, rtol=1e-5, atol=1e-6)
    # (a head with fewer rows may sum in another order: equal to rounding)
    torch.testing.assert_close(dec_s.logits, dec_f.logits[..., ids + extra], rtol=1e-5, atol=1e-6)


def test_dino_label_enc_rows():
    """dn_labelbook_size beyond num_classes: label_enc keeps the used rows and the last one."""
    official = ours_to_official(tiny("dino", num_classes=91).state_dict(), "dino", dec_layers=3)
    w = torch.randn(101, 32)  # a file with dn_labelbook_size = 100
    model = load_official({**official, "label_enc.weight": w}, "dino", **SMALL)
    assert torch.equal(model.label_enc.weight, torch.cat([w[:91], w[-1:]]))
    model = load_official({**official, "label_enc.weight": w}, "dino", category_ids=[4, 1], **SMALL)
    assert torch.equal(model.label_enc.weight, w[[4, 1, 100]])
