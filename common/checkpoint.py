"""All checkpoint I/O: the official checkpoints of the DETR family, and this project's own.

This project's files (the last section): ``save_checkpoint`` writes atomically,
``read_checkpoint`` reads any file with clear errors, ``check_state_fits`` names what does not
fit, ``trainable_state`` / ``load_trainable_state`` are the student-side state a training
checkpoint keeps, and ``load_detector`` rebuilds a detector from a file of ours or an official
one.

Official files: a ``torch.load``-able dict whose weights sit under
``'model'`` (or a bare state dict), often next to ``optimizer``, ``lr_scheduler``, ``epoch`` and
``args``, an ``argparse.Namespace``; DINO may add ``ema_model``. Keys follow DETR's names
(``backbone.0.body.*``, ``input_proj``, ``transformer.*``, ``class_embed``, ``bbox_embed``), and so
do ours (common/transformer.py keeps the official module names), so each variant's mapping is
three rules, written out per variant in ``official_layout``:

1. Alias copies. Refinement and two-stage models hand their heads to the decoder
   (``transformer.decoder.bbox_embed = self.bbox_embed``), so the file holds every head twice.
   The ``transformer.decoder.{bbox,class}_embed.*`` copies are dropped after checking that they
   equal the top-level ones.
2. Heads per layer. DETR, Conditional DETR and DAB-DETR save one ``class_embed`` / ``bbox_embed``
   that every decoder layer uses; our model keeps a ``ModuleList`` over layers holding that one
   module, so the single head is replicated to ``class_embed.{i}``. Where the official model
   shares one module over indices (Deformable DETR without refinement, DINO) every index must
   hold the same values, since loading different values into a shared module would silently
   keep the last one.
3. Nothing else is renamed. Key sets and shapes are then asserted equal to the model's
   (``load_state_dict`` strict, never ``strict=False``), and a misfit names the keys.

COCO's classes: official COCO models index classes by raw category id, 91 slots (1-90 used,
with gaps; DETR adds a no-object row, DINO's ``label_enc`` has ``dn_labelbook_size + 1`` rows).
``coco_slots_to_classes`` slices those rows for a data set's classes (its ``label_to_category``
list), to fine-tune or evaluate an official model on a subset.

Not covered, and refused by name: DAB-DETR's "3 pat" models (``transformer.patterns.weight``),
single-scale Deformable DETR and DINO-5scale (other ``input_proj`` / ``level_embed`` shapes).
The key lists follow the module definitions.

Usage::

    model = load_official("checkpoint0011_4scale.pth", "dino")                    # 91 slots
    model = load_official("r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage"
                          "-checkpoint.pth", "deformable_detr", with_box_refine=True,
                          two_stage=True, category_ids=dataset.label_to_category)
"""
import argparse
import math
import operator
import os
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from common.detr import CONFIGS, DETRModel, build_model

__all__ = ["OfficialLayout", "official_layout", "read_checkpoint", "extract_state_dict",
           "strip_module_prefix", "official_to_ours", "ours_to_official", "coco_slots_to_classes",
           "check_state_fits", "load_official", "COCO_NUM_SLOTS", "COCO_80_CATEGORY_IDS",
           "save_checkpoint", "trainable_state", "load_trainable_state", "load_detector",
           "unwrap", "official_model_args", "merge_official_args"]

COCO_NUM_SLOTS = 91  # category ids 0..90 (0 and ten others unused) in every official COCO head
# the 80 category ids COCO uses, in sorted order (label -> category id for the 80 classes)
COCO_80_CATEGORY_IDS = ([*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66),
                         67, 70, *range(72, 83), *range(84, 91)])

StateDict = Dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------
# The layout of each variant's official file
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OfficialLayout:
    """How an official file stores the prediction heads (the rest of the keys equals ours).

    heads:    "single"    one ``class_embed.*`` / ``bbox_embed.*`` used by every layer
              "shared"    ``class_embed.{i}.*`` for every index, one module, equal values
              "per_layer" ``class_embed.{i}.*``, an independent copy per index
    num_pred: heads per model: decoder layers, +1 for the two-stage proposal head (the last)
    aliases:  (alias prefix, original prefix) pairs: the decoder's copies of the heads
    """
    variant: str
    heads: str
    num_pred: int
    aliases: Tuple[Tuple[str, str], ...] = ()
    two_stage: bool = False


_DEC_BBOX = ("transformer.decoder.bbox_embed.", "bbox_embed.")
_DEC_CLASS = ("transformer.decoder.class_embed.", "class_embed.")


def official_layout(variant: str, dec_layers: int = 6, with_box_refine: bool = False,
                    two_stage: bool = False) -> OfficialLayout:
    """The explicit mapping of each variant."""
    if not (isinstance(dec_layers, int) and dec_layers > 0):
        raise ValueError(f"dec_layers must be a positive int, got {dec_layers!r}")
    if variant != "deformable_detr" and (with_box_refine or two_stage):
        raise ValueError(f"with_box_refine / two_stage are Deformable DETR flags, not {variant}'s")
    L = dec_layers
    if variant == "detr":  # sec. 7.2: models/detr.py, one head pair, no alias
        return OfficialLayout(variant, "single", L)
    if variant == "conditional_detr":  # sec. 7.3: as DETR
        return OfficialLayout(variant, "single", L)
    if variant == "dab_detr":  # sec. 7.4: iter_update hands bbox_embed to the decoder
        return OfficialLayout(variant, "single", L, (_DEC_BBOX,))
    if variant == "deformable_detr":  # sec. 7.5: deformable_detr.py, DeformableDETR.__init__
        aliases = ((_DEC_BBOX,) if with_box_refine else ()) + ((_DEC_CLASS,) if two_stage else ())
        return OfficialLayout(variant, "per_layer" if with_box_refine else "shared",
                              L + 1 if two_stage else L, aliases, two_stage)
    if variant == "dino":  # sec. 7.6: dec_pred_{class,bbox}_embed_share=True, both handed over
        return OfficialLayout(variant, "shared", L, (_DEC_BBOX, _DEC_CLASS))
    raise ValueError(f"variant must be one of {sorted(CONFIGS)}, got {variant!r}")


def _flags_of(variant: str, overrides: dict) -> dict:
    """``official_layout``'s arguments for a model built with ``overrides``."""
    if variant not in CONFIGS:
        raise ValueError(f"variant must be one of {sorted(CONFIGS)}, got {variant!r}")
    cfg = CONFIGS[variant]()
    flags = dict(dec_layers=overrides.get("dec_layers", cfg.dec_layers))
    if variant == "deformable_detr":
        flags.update(with_box_refine=overrides.get("with_box_refine", cfg.with_box_refine),
                     two_stage=overrides.get("two_stage", cfg.two_stage))
    return flags


# ------------------------------------------------------------------------------------------
# The training args an official file stores: the model it holds
# ------------------------------------------------------------------------------------------

# official argparse name -> our config field, where the meaning is the same (each repo's
# main.py; DINO's config/DINO/DINO_4scale.py, merged into its args)
_SAME_NAME = ("backbone", "dilation", "hidden_dim", "nheads", "enc_layers", "dec_layers",
              "dim_feedforward", "dropout", "num_queries", "focal_alpha", "eos_coef",
              "num_select", "with_box_refine", "two_stage", "num_feature_levels",
              "enc_n_points", "dec_n_points", "dn_number", "dn_box_noise_scale",
              "dn_label_noise_ratio")
# official settings our models do not build: (name, the value ours implies, for which variants)
_MUST_BE = (("position_embedding", "sine", None), ("pre_norm", False, None),
            ("masks", False, None), ("num_patterns", 0, None),
            ("position_embedding_scale", 2 * math.pi, None),
            ("two_stage_type", "standard", ("dino",)), ("query_dim", 4, ("dino",)),
            ("dec_pred_bbox_embed_share", True, ("dino",)),
            ("dec_pred_class_embed_share", True, ("dino",)),
            ("two_stage_bbox_embed_share", False, ("dino",)),
            ("two_stage_class_embed_share", False, ("dino",)),
            ("embed_init_tgt", True, ("dino",)), ("dec_layer_number", None, ("dino",)),
            ("decoder_sa_type", "sa", ("dino",)), ("return_interm_indices", [1, 2, 3], ("dino",)))


def official_model_args(variant: str, stored) -> Dict[str, Tuple[object, str]]:
    """The model settings an official checkpoint's stored ``args`` (an argparse.Namespace, or
    a dict) fix: ``{config field: (value, "official_name=raw value")}``.

    Names follow each official main.py (DETR, Conditional DETR, Deformable DETR, DAB-DETR) and
    DINO's config files: the shared ones keep their names (``dilation``, ``hidden_dim``,
    ``num_queries``, ``with_box_refine``, ...); DAB-DETR and DINO's ``pe_temperatureH/W`` give
    ``pos_temperature`` and ``transformer_activation`` gives ``activation``; the matcher's
    ``set_cost_*`` and the losses' ``*_loss_coef`` give ``matcher_weights`` and
    ``loss_weights``. A setting that the models here do not build (pre-norm, learned position
    encoding, DAB-DETR's patterns, DINO-5scale, other DINO query schemes) is a ValueError naming
    it. Names absent from ``stored`` fix nothing; unknown names are ignored (data, schedule)."""
    if variant not in CONFIGS:
        raise ValueError(f"variant must be one of {sorted(CONFIGS)}, got {variant!r}")
    a = dict(vars(stored)) if isinstance(stored, argparse.Namespace) else dict(stored)
    cfg = CONFIGS[variant]()
    if "modelname" in a and a["modelname"] != variant:  # DAB-DETR's and DINO's main.py name it
        raise ValueError(f"the checkpoint's args say modelname={a['modelname']!r}, not "
                         f"{variant}: pass the variant it was trained as (e.g. --teacher-variant "
                         f"{a['modelname']}); the models here build {sorted(CONFIGS)}")
    for name, expected, variants in _MUST_BE:
        if name in a and (variants is None or variant in variants):
            value = a[name]
            same = (math.isclose(value, expected) if isinstance(expected, float) and
                    isinstance(value, (int, float)) else
                    list(value) == expected if isinstance(expected, list) and
                    isinstance(value, (list, tuple)) else value == expected)
            if not same:
                raise ValueError(f"the checkpoint was trained with {name}={value!r}; the "
                                 f"{variant} built here has {name}={expected!r}, so its "
                                 f"weights would compute something else")
    out = {}
    for name in _SAME_NAME:
        if name in a and hasattr(cfg, name):
            out[name] = (a[name], f"{name}={a[name]!r}")
    if "backbone" in out and out["backbone"][0] not in ("resnet18", "resnet34", "resnet50",
                                                         "resnet101"):
        raise ValueError(f"the checkpoint's backbone is {out['backbone'][0]!r}; the models "
                         f"here build torchvision ResNet-18/34/50/101 only")
    if "pe_temperatureH" in a or "pe_temperatureW" in a:
        h, w = a.get("pe_temperatureH"), a.get("pe_temperatureW", a.get("pe_temperatureH"))
        h = w if h is None else h
        if h != w:
            raise ValueError(f"the checkpoint uses pe_temperatureH={h} and pe_temperatureW={w}; "
                             f"the models here use one temperature for both axes")
        if hasattr(cfg, "pos_temperature"):
            out["pos_temperature"] = (float(h), f"pe_temperatureH={h!r}, pe_temperatureW={w!r}")
    if "transformer_activation" in a and hasattr(cfg, "activation"):
        out["activation"] = (a["transformer_activation"],
                             f"transformer_activation={a['transformer_activation']!r}")
    costs = ("set_cost_class", "set_cost_bbox", "set_cost_giou")
    if all(c in a for c in costs):
        out["matcher_weights"] = (tuple(float(a[c]) for c in costs),
                                  ", ".join(f"{c}={a[c]!r}" for c in costs))
    coefs = ("cls_loss_coef", "bbox_loss_coef", "giou_loss_coef")
    if all(c in a for c in coefs[1:]):
        cls = a.get("cls_loss_coef", 1.0)  # DETR has none: its class loss weighs 1
        out["loss_weights"] = ((float(cls), float(a[coefs[1]]), float(a[coefs[2]])),
                               ", ".join(f"{c}={a[c]!r}" for c in coefs if c in a))
    return out


def merge_official_args(variant: str, stored, overrides: Optional[dict] = None,
                        what: str = "the checkpoint") -> dict:
    """``overrides`` completed with the settings ``stored`` (the file's args) fixes. A given
    setting that contradicts the file is a ValueError naming both values; one the file does
    not fix is kept."""
    overrides = dict(overrides or {})
    for name, (value, raw) in official_model_args(variant, stored).items():
        if name in overrides and not _same_setting(overrides[name], value):
            raise ValueError(f"{name}={overrides[name]!r} contradicts the args stored in {what}: "
                             f"it was trained with {raw} ({name}={value!r}); leave {name} unset "
                             f"and the file's value is used")
        overrides[name] = value
    return overrides


def _same_setting(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and \
            not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def stored_args(ckpt):
    """The training args an official file keeps under "args" (None when absent)."""
    a = ckpt.get("args") if isinstance(ckpt, Mapping) else None
    return a if isinstance(a, (argparse.Namespace, Mapping)) else None


# ------------------------------------------------------------------------------------------
# Reading a file
# ------------------------------------------------------------------------------------------

def read_checkpoint(path: str, allow_unsafe_pickle: bool = False) -> dict:
    """``torch.load`` a checkpoint (ours or an official one) on the CPU with
    ``weights_only=True``.

    Official training checkpoints pickle their ``args`` as an ``argparse.Namespace``, which
    ``weights_only=True`` (the default since PyTorch 2.6) refuses; it is then loaded again with
    that one class allowlisted (``torch.serialization.safe_globals``). Anything else the file
    pickles is refused unless ``allow_unsafe_pickle=True``, which loads with
    ``weights_only=False`` and so runs whatever code the file carries: only for trusted files.
    A missing file is a FileNotFoundError; an empty, truncated or foreign file a ValueError
    naming the file.
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file {path!r}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path!r} is empty (0 bytes): was its save interrupted?")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04" and head[:1] != b"\x80":  # torch's zip format, or legacy pickle
        raise ValueError(f"checkpoint {path!r} cannot be read: it is damaged or not a torch "
                         f"checkpoint (it starts with {head!r})")

    def load(**kw):
        try:
            return torch.load(path, map_location="cpu", **kw)
        except pickle.UnpicklingError:
            raise
        except Exception as e:  # noqa: BLE001 - torch.load's errors on a damaged file vary
            raise ValueError(f"checkpoint {path!r} cannot be read: it is truncated, damaged or "
                             f"not a torch checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from e
    try:
        return load(weights_only=True)
    except pickle.UnpicklingError:
        pass  # most likely the argparse.Namespace under 'args': allow that one class
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return load(weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported operand" in str(e):  # not a refused class: bytes that are no pickle
            raise ValueError(f"checkpoint {path!r} cannot be read: it is truncated or damaged "
                             f"(its pickled data is not valid)") from e
        if not allow_unsafe_pickle:
            raise ValueError(
                f"checkpoint {path!r} pickles objects that torch.load(weights_only=True) refuses "
                f"even with argparse.Namespace allowed ({str(e).splitlines()[0]}); if you trust "
                f"the file, pass allow_unsafe_pickle=True (it runs any code the file pickled)"
            ) from e
    warnings.warn(f"loading {path!r} with weights_only=False (allow_unsafe_pickle=True): the "
                  f"file can run arbitrary code", stacklevel=2)
    return load(weights_only=False)


def extract_state_dict(ckpt, which: str = "model") -> StateDict:
    """The weights of a loaded checkpoint: ``ckpt[which]`` when present (official files keep
    them under 'model'; DINO's may also hold 'ema_model'), else ``ckpt`` itself when it is a
    bare state dict. Every value must be a tensor."""
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint must be a dict, got {type(ckpt).__name__}")
    if which in ckpt:
        state = ckpt[which]
        if not isinstance(state, Mapping):
            raise ValueError(f"checkpoint[{which!r}] must be a state dict, got "
                             f"{type(state).__name__}")
    elif ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state = ckpt
    else:
        raise ValueError(f"checkpoint has no {which!r} entry and is not a bare state dict; its "
                         f"top-level keys: {sorted(map(str, ckpt))[:10]}")
    for k, v in state.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
    return dict(state)


def strip_module_prefix(state: Mapping) -> StateDict:
    """Drop the leading ``module.`` that (Distributed)DataParallel adds, as DINO's loader does."""
    out = {}
    for k, v in state.items():
        name = k[len("module."):] if k.startswith("module.") else k
        if name in out:
            raise ValueError(f"state dict holds both {name!r} and 'module.{name}'")
        out[name] = v
    return out


# ------------------------------------------------------------------------------------------
# The mapping, both ways
# ------------------------------------------------------------------------------------------

_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\d+)\.(.+)$")      # ours: class_embed.3.weight
_SINGLE_HEAD = re.compile(r"^(class_embed|bbox_embed)\.(\D.*)$")     # single: class_embed.weight


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True  # one tensor saved twice (a shared module): torch.load keeps the storage
    return torch.equal(a, b)


def _check_shared(state: StateDict, layout: OfficialLayout):
    """Every index of a shared head must hold index 0's values."""
    for k, v in state.items():
        m = _HEAD.match(k)
        if m and m.group(2) != "0":
            first = f"{m.group(1)}.0.{m.group(3)}"
            if first in state and not _equal(v, state[first]):
                raise ValueError(
                    f"{k} differs from {first}, but {layout.variant} shares one head over all "
                    f"layers here (with_box_refine=False): was the file trained with box "
                    f"refinement?")


def official_to_ours(state: Mapping, variant: str, dec_layers: int = 6,
                     with_box_refine: bool = False, two_stage: bool = False) -> StateDict:
    """Map an official state dict (``module.`` prefixes allowed) to our key names.

    The result still has to match the model's key set and shapes (``load_official`` asserts
    that); this function applies the variant's three rules and refuses what cannot be mapped.
    """
    layout = official_layout(variant, dec_layers, with_box_refine, two_stage)
    out = strip_module_prefix(state)
    # 1. files with one head pair have no per-layer head keys
    if layout.heads == "single":
        for k in out:
            if _HEAD.match(k):
                raise ValueError(f"official {variant} files have one head pair "
                                 f"(class_embed.weight, bbox_embed.layers.*), not per-layer "
                                 f"keys like {k}: is this a checkpoint of this project? (load "
                                 f"those with model.load_state_dict)")
    # 2. the decoder's alias copies of the heads: check, then drop
    for alias, original in layout.aliases:
        keys = [k for k in out if k.startswith(alias)]
        if not keys:
            flags = (f" with_box_refine={with_box_refine}, two_stage={two_stage}"
                     if variant == "deformable_detr" else "")
            raise ValueError(f"official {variant} files{flags} hold the alias copies {alias}*; "
                             f"none found" + (" (are those the file's flags?)" if flags else ""))
        for k in keys:
            orig = original + k[len(alias):]
            if orig not in out:
                raise ValueError(f"alias {k} has no original {orig} in the state dict")
            if not _equal(out[k], out[orig]):
                raise ValueError(f"{k} must be an alias of {orig}, but their values differ")
            del out[k]
    # 3. heads per layer
    if layout.heads == "single":
        for k in list(out):
            m = _SINGLE_HEAD.match(k)
            if m:
                v = out.pop(k)
                for i in range(layout.num_pred):  # the same tensor for every layer
                    out[f"{m.group(1)}.{i}.{m.group(2)}"] = v
    elif layout.heads == "shared":
        _check_shared(out, layout)
    # 4. every other name is already ours
    return out


def ours_to_official(state: Mapping, variant: str, dec_layers: int = 6,
                     with_box_refine: bool = False, two_stage: bool = False) -> StateDict:
    """The inverse of ``official_to_ours``: our state dict in the official layout (single heads
    collapsed, the decoder's alias copies added), e.g. to compare with or run official code."""
    layout = official_layout(variant, dec_layers, with_box_refine, two_stage)
    out = strip_module_prefix(state)
    if layout.heads in ("single", "shared"):
        _check_shared(out, layout)
    if layout.heads == "single":
        for k in list(out):
            m = _HEAD.match(k)
            if m:
                v = out.pop(k)
                if m.group(2) == "0":
                    out[f"{m.group(1)}.{m.group(3)}"] = v
    for alias, original in layout.aliases:
        for k in [k for k in out if k.startswith(original)]:
            out[alias + k[len(original):]] = out[k]
    return out


# ------------------------------------------------------------------------------------------
# COCO's 91 slots -> a data set's classes
# ------------------------------------------------------------------------------------------

_CLASS_ROWS = re.compile(r"^(transformer\.decoder\.)?class_embed\.(?:(\d+)\.)?(weight|bias)$"
                         r"|^transformer\.enc_out_class_embed\.(weight|bias)$")


def coco_slots_to_classes(state: Mapping, category_ids: Sequence[int], variant: str,
                          dec_layers: int = 6, with_box_refine: bool = False,
                          two_stage: bool = False, num_slots: int = COCO_NUM_SLOTS) -> StateDict:
    """Keep the class rows of ``category_ids`` (label -> official class slot, e.g. a data set's
    ``label_to_category``, or ``COCO_80_CATEGORY_IDS``), so label i is slot category_ids[i].

    Works on the official layout or ours. Rows sliced (others untouched):
      * every class head (``class_embed``, its decoder alias, DINO's ``enc_out_class_embed``):
        ``num_slots`` rows, plus DETR's no-object row, which is kept last;
      * DINO's ``label_enc``: ``dn_labelbook_size + 1`` rows (dn_labelbook_size >= num_slots);
        the denoising labels index rows 0..num_classes-1, so those become the chosen slots, and
        the extra last row is kept last;
      * Deformable two-stage: the proposal head (the last index) scores tokens with channel 0
        alone (the official encoder loss makes every target class 0), so its channel 0 keeps
        slot 0 (the ``category_ids[0]`` row is not used there). With a head shared by every
        layer (two-stage without refinement) this cannot be done and is refused.
    """
    layout = official_layout(variant, dec_layers, with_box_refine, two_stage)
    given = list(category_ids)
    try:  # ints, numpy or torch integers; not floats, not bools
        ids = [operator.index(i) for i in given if not isinstance(i, bool)]
    except TypeError:
        ids = []
    if not ids or len(ids) != len(given):
        raise ValueError(f"category_ids must be a non-empty list of ints, got {category_ids!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"category_ids must be distinct, got {ids}")
    if min(ids) < 0 or max(ids) >= num_slots:
        raise ValueError(f"category_ids must lie in [0, {num_slots}), got {ids}")
    if layout.two_stage and layout.heads == "shared":
        raise ValueError("a two-stage Deformable DETR without refinement shares one class head "
                         "between the decoder and the proposals, whose channel 0 is objectness: "
                         "its classes cannot be sliced without changing the proposals; load all "
                         f"{num_slots} slots and map labels after post-processing")
    extra = 1 if CONFIGS[variant]().class_loss == "softmax" else 0  # DETR's no-object row
    proposal_index = str(layout.num_pred - 1) if layout.two_stage else None
    out = strip_module_prefix(state)
    for k, v in out.items():
        m = _CLASS_ROWS.match(k)
        if m:
            if v.shape[0] != num_slots + extra:
                raise ValueError(f"{k} has {v.shape[0]} rows, expected {num_slots + extra} "
                                 f"({num_slots} class slots{' + no-object' if extra else ''})")
            is_proposal_head = m.group(2) is not None and m.group(2) == proposal_index
            rows = [0] + ids[1:] if is_proposal_head else ids
            rows = rows + list(range(num_slots, num_slots + extra))
            out[k] = v[rows].clone()
        elif k == "label_enc.weight":
            if v.shape[0] < num_slots + 1:
                raise ValueError(f"{k} has {v.shape[0]} rows; DINO's label_enc has "
                                 f"dn_labelbook_size + 1 >= {num_slots + 1}")
            out[k] = v[ids + [v.shape[0] - 1]].clone()
    return out


# ------------------------------------------------------------------------------------------
# The loader
# ------------------------------------------------------------------------------------------

def check_state_fits(module: torch.nn.Module, state: Mapping, what: str = "checkpoint"):
    """Refuse a state dict that does not fit ``module`` with a message naming the differences
    (missing and unexpected keys, mis-shaped tensors), before ``load_state_dict``'s strict
    error deep in a stack trace, and never a silent ``strict=False``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = [k for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    shapes = [f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})" for k in misshaped]
    if not (missing or unexpected or shapes):
        return

    def names(xs):
        return ", ".join(xs[:10]) + (f" (+{len(xs) - 10} more)" if len(xs) > 10 else "")
    parts = [f"{len(xs)} {kind}: {names(xs)}" for kind, xs in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)) if xs]
    hint = " (was it made with another variant or size?)"
    class_rows = ("class_embed.", "label_enc.", "transformer.enc_out_class_embed.")
    if misshaped and all(k.startswith(class_rows) and state[k].shape[1:] == own[k].shape[1:]
                         for k in misshaped):
        hint = (" (class rows differ: pass num_classes to match the file, or category_ids to "
                "select a data set's classes)")
    raise ValueError(f"the {what} does not fit this model{hint}: " + "; ".join(parts))


def load_official(source, variant: str, num_classes: Optional[int] = None,
                  category_ids: Optional[Sequence[int]] = None, which: str = "model",
                  allow_unsafe_pickle: bool = False, **model_overrides) -> DETRModel:
    """Build ``variant`` with ``model_overrides`` (as ``build_model``) and fill it from an
    official checkpoint: a path, a loaded checkpoint dict, or a bare state dict.

    num_classes:  the file's class slots (default 91, COCO; DETR's extra no-object row is
                  implied by its softmax head). With ``category_ids`` it defaults to their
                  number: the heads are sliced by ``coco_slots_to_classes``.
    The settings the file's stored ``args`` fix (``official_model_args``: dilation, position
    temperature, with_box_refine, two_stage, sizes, ...) are used; ``model_overrides`` may add
    others but not contradict them (a ValueError names both values). A file without args needs
    its structural flags in ``model_overrides`` (Deformable DETR: ``with_box_refine=True``,
    ``two_stage=True``).
    Returns the model in eval mode. Any misfit raises a ValueError naming the keys.
    """
    if isinstance(source, Mapping):
        ckpt = source
    elif isinstance(source, (str, os.PathLike)):
        ckpt = read_checkpoint(source, allow_unsafe_pickle)
    else:
        raise TypeError(f"source must be a path or a (state) dict, got {type(source).__name__}")
    if stored_args(ckpt) is not None:  # the file says what it was trained with
        model_overrides = merge_official_args(variant, stored_args(ckpt), model_overrides)
    flags = _flags_of(variant, model_overrides)
    layout = official_layout(variant, **flags)
    state = official_to_ours(extract_state_dict(ckpt, which), variant, **flags)
    if category_ids is not None:
        if num_classes is not None and num_classes != len(category_ids):
            raise ValueError(f"num_classes={num_classes} but {len(category_ids)} category_ids")
        num_classes = len(category_ids)
        state = coco_slots_to_classes(state, category_ids, variant, **flags)
    elif num_classes is None:
        num_classes = COCO_NUM_SLOTS
    if variant == "dino" and "label_enc.weight" in state and \
            state["label_enc.weight"].shape[0] > num_classes + 1:
        # dn_labelbook_size > num_classes: rows num_classes..dn_labelbook_size-1 are never
        # indexed (denoising labels are < num_classes); keep the first ones and the last
        w = state["label_enc.weight"]
        state["label_enc.weight"] = torch.cat([w[:num_classes], w[-1:]])
    model = build_model(variant, num_classes, **model_overrides)
    shared = model.class_embed[0] is model.class_embed[-1]
    if len(model.class_embed) != layout.num_pred or shared != (layout.heads != "per_layer"):
        raise RuntimeError("common/checkpoint.py's layout of the heads no longer matches "
                           "common/detr.py: update official_layout")
    check_state_fits(model, state, f"official {variant} state dict")
    model.load_state_dict(state)  # strict: key sets and shapes were checked just above
    return model.eval()


# ------------------------------------------------------------------------------------------
# Checkpoints of this project: atomic save, the student-side state, rebuilding a detector
# ------------------------------------------------------------------------------------------

def save_checkpoint(obj, path):
    """torch.save to ``path`` atomically: a temporary file in the same folder, fsync, rename.
    A crash mid-write leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel (the module itself otherwise)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) \
        else module


def trainable_state(module: torch.nn.Module) -> dict:
    """What a checkpoint keeps of a training module (``.student`` plus the method's own
    modules): the student under "model" (it loads into ``methods/baseline.py --eval``), the
    other student-side entries under "extra"; never the teacher."""
    m = unwrap(module)
    extra = {k: v for k, v in m.state_dict().items()
             if not k.startswith("student.") and not k.startswith("teacher.")}
    return {"model": m.student.state_dict(), "extra": extra}


def load_trainable_state(module: torch.nn.Module, ckpt: Mapping, what: str,
                         strict_extra: bool = True):
    """Load ``trainable_state``'s entries back into a training module. The student must fit
    exactly; the "extra" entries too unless ``strict_extra=False`` (evaluating a student saved
    by another method: its student-side modules play no part in the student's answers)."""
    m = unwrap(module)
    check_state_fits(m.student, ckpt["model"], what)
    state = m.state_dict()  # the teacher's entries stay as they are
    extra = dict(ckpt.get("extra", {}))
    unknown = sorted(set(extra) - set(state))
    if unknown and strict_extra:
        raise ValueError(f"the {what} has student-side modules this run does not have: "
                         f"{', '.join(unknown[:5])} (was it made by another method?)")
    state.update({f"student.{k}": v for k, v in ckpt["model"].items()})
    state.update({k: v for k, v in extra.items() if k in state})
    m.load_state_dict(state)


def load_detector(path, num_classes, device="cpu", *, variant=None, overrides=None,
                  category_ids=None, allow_unsafe_pickle=False) -> DETRModel:
    """Rebuild a detector from a checkpoint of this project, or an official one.

    Ours (methods/baseline.py's, or a method script's: its "model" entry is the student) record
    the variant and model settings under "args"; ``variant`` and ``overrides`` must then be
    unset (or name the recorded variant). Any other file is read as an official checkpoint
    (``load_official``) of ``variant``, built from the ``args`` the file stores plus
    ``overrides`` (settings the file does not record, as ``build_model``'s; one that
    contradicts the file's args is a ValueError naming both values); its COCO class slots
    ``category_ids`` (the data set's ``label_to_category``, one per class) become the
    ``num_classes`` classes, or with ``category_ids=None`` the file must have ``num_classes``
    class rows. ``variant=None`` with an official file is a ValueError saying what to pass.
    Files are read with ``torch.load(weights_only=True)`` (official ones: argparse.Namespace
    allowed); ``allow_unsafe_pickle`` as in ``read_checkpoint``.
    """
    try:
        ckpt = read_checkpoint(path, allow_unsafe_pickle)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load's errors on a non-checkpoint file vary
        raise ValueError(f"could not read {path} as a checkpoint ({type(e).__name__}: {e})") \
            from e
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    a = ckpt.get("args")
    if "model" in ckpt and isinstance(a, Mapping) and "variant" in a:
        if overrides or (variant is not None and variant != a["variant"]):
            raise ValueError(f"{path} is a checkpoint of this project ({a['variant']}): it "
                             f"records its variant and settings; --teacher-variant and "
                             f"--teacher-arg are for official checkpoints")
        # the checkpoint holds every weight: the backbone's starting point is not needed again
        ours = {k: v for k, v in a.get("model_overrides", {}).items()
                if k not in ("backbone_weights", "pretrained")}
        model = build_model(a["variant"], num_classes, **ours)
        check_state_fits(model, ckpt["model"], f"checkpoint {path}")
        model.load_state_dict(ckpt["model"])
        return model.to(device)
    if variant is None:
        raise ValueError(
            f"{path} is not a checkpoint of this project's training scripts (it needs 'model' "
            f"and 'args' with the variant). If it is an official checkpoint, pass "
            f"--teacher-variant {{{','.join(sorted(CONFIGS))}}} and, for the settings it was "
            f"trained with, --teacher-arg NAME=VALUE (e.g. with_box_refine=true two_stage=true "
            f"for Deformable DETR +refine / two-stage)")
    if category_ids is not None and len(category_ids) != num_classes:
        raise ValueError(f"{len(category_ids)} category ids for {num_classes} classes")
    overrides = dict(overrides or {})
    if stored_args(ckpt) is not None:  # refused here, with the file named, before building
        overrides = merge_official_args(variant, stored_args(ckpt), overrides, path)
    try:
        model = load_official(ckpt, variant, num_classes=num_classes, category_ids=category_ids,
                              **overrides)
    except ValueError as e:
        raise ValueError(f"{path} is neither a checkpoint of this project nor an official "
                         f"{variant} checkpoint with these settings ({overrides or {}}): "
                         f"{e}") from e
    return model.to(device)
