"""What a parameter name of BertForPreTraining is: which part of the model, which layer, which role, which axes,
tied to what. One place answers it (Hugging Face's names, training/model/bert.py); growth, MSLT, EarlyBERT,
export and the FLOPs count ask here instead of keeping a regex each, and a model add-on (training/model/addons.py)
declares the names it adds in the same terms, so every one of them knows those too (`register_roles`).

Axes, one letter per tensor dimension: `H` the hidden size, `A` the attention width (heads x head_dim), `N` the
heads themselves (one entry per head), `F` the FFN's neurons, `""` an axis no width changes (vocabulary, rank,
a pair of NSP classes). Upper case is an output axis; lower case the input (fan-in) axis of a Linear, which
a widening that tiles it must divide (growth.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

LAYER_PREFIX = "bert.encoder.layer."
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"
POSITION_EMBEDDINGS = "bert.embeddings.position_embeddings.weight"
# The MLM decoder *is* the word embedding and the output bias (training/model/bert.py MLMHead.tie).
TIED = {"cls.predictions.decoder.weight": WORD_EMBEDDINGS, "cls.predictions.decoder.bias": "cls.predictions.bias"}
PARTS = ("embeddings", "layer", "final_norm", "mlm_transform", "mlm_bias", "decoder", "pooler", "nsp")


@dataclass(frozen=True)
class Param:
    name: str
    part: str  # one of PARTS
    role: str  # the name inside its layer (part "layer") or its part, e.g. "attention.self.query.weight"
    axes: tuple[str, ...]
    layer: Optional[int] = None  # encoder layer index (part "layer")
    tied_to: Optional[str] = None  # the tensor this one is (the decoder's weight and bias)
    addon: Optional[str] = None  # the model add-on that adds it (training/model/addons.py); None: BERT's own

    def axis(self, letter: str) -> Optional[int]:
        """The dimension whose axis is `letter` (either case), or None."""
        return next((d for d, a in enumerate(self.axes) if a.upper() == letter.upper() and a), None)


# Per-layer roles (after `bert.encoder.layer.<i>.`) and the rest, first match wins.
_LAYER_ROLES: list[tuple[str, tuple[str, ...]]] = [
    (r"attention\.self\.(query|key|value)\.weight", ("A", "h")),
    (r"attention\.self\.(query|key|value)\.bias", ("A",)),
    (r"attention\.output\.dense\.weight", ("H", "a")),
    (r"intermediate\.dense\.weight", ("F", "h")),
    (r"intermediate\.dense(_v)?\.bias", ("F",)),
    (r"intermediate\.dense_u\.weight", ("", "h")),  # low-rank FFN (model.ffn_rank): W = V U
    (r"intermediate\.dense_v\.weight", ("F", "")),
    (r"output\.dense\.weight", ("H", "f")),
    (r"output\.dense_u\.weight", ("", "f")),
    (r"output\.dense_v\.weight", ("H", "")),
    (r"(attention\.output|output)\.dense(_v)?\.bias", ("H",)),
    (r"(attention\.output|output)\.LayerNorm\.(weight|bias)", ("H",)),
]
_ROLES: list[tuple[str, str, tuple[str, ...]]] = [  # (pattern of the whole name, part, axes)
    (r"bert\.embeddings\.(word|position|token_type)_embeddings\.weight", "embeddings", ("", "H")),
    (r"bert\.embeddings\.LayerNorm\.(weight|bias)", "embeddings", ("H",)),
    (r"bert\.encoder\.final_layer_norm\.(weight|bias)", "final_norm", ("H",)),
    (r"cls\.predictions\.transform\.dense\.weight", "mlm_transform", ("H", "h")),
    (r"cls\.predictions\.transform\.(dense\.bias|LayerNorm\.weight|LayerNorm\.bias)", "mlm_transform", ("H",)),
    (r"cls\.predictions\.(decoder\.)?bias", "mlm_bias", ("",)),
    (r"cls\.predictions\.decoder\.weight", "decoder", ("", "H")),
    (r"bert\.pooler\.dense\.weight", "pooler", ("H", "h")),
    (r"bert\.pooler\.dense\.bias", "pooler", ("H",)),
    (r"cls\.seq_relationship\.weight", "nsp", ("", "h")),
    (r"cls\.seq_relationship\.bias", "nsp", ("",)),
]
_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.+)$")
_COMPILED_LAYER = [(re.compile(p + "$"), axes) for p, axes in _LAYER_ROLES]
_COMPILED = [(re.compile(p + "$"), part, axes) for p, part, axes in _ROLES]


def layer_name(index: int, role: str) -> str:
    """The full name of `role` in encoder layer `index`."""
    return f"{LAYER_PREFIX}{index}.{role}"


# (add-on, part, pattern, axes) of the names each model add-on adds: an Addon subclass registers its ROLES here
# when it is defined (training/model/addon.py), so whatever has the class knows its tensors.
_ADDON_ROLES: dict[str, tuple[tuple[str, str, tuple[str, ...]], ...]] = {}


def register_roles(addon: str, roles) -> None:
    _ADDON_ROLES[addon] = tuple(roles)


def _addon_roles() -> Iterable[tuple[str, str, str, tuple[str, ...]]]:
    for addon, roles in _ADDON_ROLES.items():
        for part, pattern, axes in roles:
            yield addon, part, pattern, axes


def describe(name: str) -> Param:
    """The parameter `name` (a state-dict or named_parameters name); ValueError for a name no part of the model
    (nor any registered add-on) has: failing beats treating an unknown tensor as something it is not."""
    m = _LAYER.match(name)
    if m is not None:
        index, role = int(m[1]), m[2]
        axes = next((a for pattern, a in _COMPILED_LAYER if pattern.fullmatch(role)), None)
        if axes is not None:
            return Param(name, "layer", role, axes, layer=index)
        for addon, part, pattern, axes in _addon_roles():
            if part == "layer" and re.fullmatch(pattern, role):
                return Param(name, "layer", role, axes, layer=index, addon=addon)
    else:
        for pattern, part, axes in _COMPILED:
            if pattern.fullmatch(name):
                return Param(name, part, name, axes, tied_to=TIED.get(name))
        for addon, part, pattern, axes in _addon_roles():
            if part != "layer" and re.fullmatch(pattern, name):
                return Param(name, part, name, axes, addon=addon)
    raise ValueError(f"no part of the model has a tensor named {name!r}")


def renumbered(name: str, layer: int) -> str:
    """`name`'s role in encoder layer `layer` (a per-layer name)."""
    param = describe(name)
    if param.layer is None:
        raise ValueError(f"{name!r} belongs to no encoder layer")
    return layer_name(layer, param.role)
