"""EarlyBERT's slimming coefficients as tensors of the model (stages/earlybert.py trains and prunes with them):
their names, reading them from a module or a state dict, and folding them into the Linear that consumes what
they scale, which leaves a plain BERT computing the same function (what export_hf writes for a slimming model)."""
from __future__ import annotations

import re
from typing import Optional

import torch

from training.model.config import ModelConfig

Tensors = dict[str, torch.Tensor]

HEAD_COEF = "attention.self.head_coef"
NEURON_COEF = "intermediate.neuron_coef"
_COEF_RE = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(attention\.self\.head_coef|intermediate\.neuron_coef)$")


def _layer(i: int) -> str:
    return f"bert.encoder.layer.{i}."


def coefficients(source) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head coefficients per layer, neuron coefficients per layer), fp32 CPU copies.

    `source`: a name -> tensor dict, a module, or such a (heads, neurons) pair (returned as it is)."""
    if isinstance(source, tuple):
        return source
    if isinstance(source, dict):
        named = source.items()
    else:
        named = source.named_parameters()
    heads: dict[int, torch.Tensor] = {}
    neurons: dict[int, torch.Tensor] = {}
    for name, t in named:
        m = _COEF_RE.match(name)
        if m:
            (heads if m.group(2) == HEAD_COEF else neurons)[int(m.group(1))] = t.detach().float().cpu().clone()
    if not heads or sorted(heads) != list(range(len(heads))) or sorted(neurons) != sorted(heads):
        raise ValueError("no slimming coefficients (model.slimming: true) found, or not one per layer")
    return [heads[i] for i in sorted(heads)], [neurons[i] for i in sorted(neurons)]


def _column_scale(c: torch.Tensor, dtype: torch.dtype, moment: int) -> torch.Tensor:
    """The factor a folded column gets: c for the weight (moment 0); (1/c)**moment for a moment, as its
    gradient gets 1/c. Where c == 0 the search model's gradient of that column was identically 0, so
    there is nothing to carry: 0 (a fresh moment)."""
    c = c.to(dtype)
    if moment == 0:
        return c
    dead = c == 0
    inverse = torch.where(dead, torch.zeros_like(c), 1 / torch.where(dead, torch.ones_like(c), c))
    return inverse ** moment


def fold_slimming(tensors: Tensors, cfg: ModelConfig, coefs: Optional[tuple] = None, moment: int = 0) -> Tensors:
    """Multiply each coefficient into the Linear that consumes what it scales, and drop the coefficients.

    Head h of layer i: columns [h*D, (h+1)*D) of attention.output.dense.weight; neuron j: column j of
    output.dense.weight (output.dense_u.weight for a low-rank FFN). The function is unchanged.
    moment 0 (weights): those columns x c. Moments follow the gradients (growth.py): the search model's
    column reads c*a, the folded one reads a, so the folded column's gradient is the old one x 1/c, and
    exp_avg (moment 1) gets 1/c, exp_avg_sq (moment 2) 1/c**2 (a column with c == 0: 0, see
    _column_scale). Every other tensor's gradient is unchanged (x 1): the folded Linear passes the same
    gradient back to its input as the coefficient did.
    `coefs`: the coefficient values when `tensors` are optimizer moments (they hold no coefficients).
    """
    heads, neurons = coefficients(coefs if coefs is not None else tensors)
    out = dict(tensors)
    for i in range(cfg.num_layers):
        p = _layer(i)
        out.pop(p + HEAD_COEF, None)
        out.pop(p + NEURON_COEF, None)
        key = p + "attention.output.dense.weight"
        if key in out:
            scale = _column_scale(heads[i].repeat_interleave(cfg.head_dim), out[key].dtype, moment)
            out[key] = out[key] * scale[None, :]
        key = p + ("output.dense.weight" if cfg.ffn_rank is None else "output.dense_u.weight")
        if key in out:
            out[key] = out[key] * _column_scale(neurons[i], out[key].dtype, moment)[None, :]
    return out
