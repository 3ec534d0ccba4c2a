"""EarlyBERT's slimming coefficients, a model add-on (training/model/addon.py; stages/earlybert.py trains and prunes
with them): a coefficient per attention head scaling that head's context output (`attention.self.head_coef`,
before attention.output.dense) and one per FFN neuron scaling its post-GELU activation (`intermediate.neuron_coef`),
all initialised to 1, on when `model.slimming` is; in training mode the model returns the L1 penalty
`slimming_l1 * sum|c|` as the auxiliary loss `slimming_penalty`. Also: reading the coefficients from a module or a
state dict, and folding them into the Linear that consumes what they scale, which leaves a plain BERT computing
the same function (what export_hf writes for a slimming model, and what the prune stage starts from)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from training.model import params
from training.model.addon import Addon
from training.model.config import ModelConfig

Tensors = dict[str, torch.Tensor]

HEAD_COEF = "attention.self.head_coef"
NEURON_COEF = "intermediate.neuron_coef"


class Slimming(Addon):
    name = "slimming"
    ROLES = (("layer", r"attention\.self\.head_coef", ("N",)), ("layer", r"intermediate\.neuron_coef", ("F",)))

    @classmethod
    def enabled(cls, cfg: ModelConfig) -> bool:
        return cfg.slimming

    def attach(self, model: nn.Module) -> None:
        for i, layer in enumerate(model.bert.encoder.layer):
            attention, intermediate = layer.attention.self, layer.intermediate
            attention.register_parameter("head_coef", nn.Parameter(torch.ones(model.cfg.layer_heads(i))))
            intermediate.register_parameter("neuron_coef", nn.Parameter(torch.ones(model.cfg.layer_ffn(i))))
            attention.register_forward_hook(_scale_heads)
            intermediate.register_forward_hook(_scale_neurons)

    def aux_losses(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if model.cfg.slimming_l1 <= 0:  # the coefficients train without the L1 pull
            return {}
        norm = sum(p.float().abs().sum() for name, p in model.named_parameters()
                   if name.endswith((HEAD_COEF, NEURON_COEF)))
        return {"slimming_penalty": model.cfg.slimming_l1 * norm}

    def fold(self, tensors: Tensors, cfg: ModelConfig) -> Tensors:
        return fold_slimming(tensors, cfg)


def _scale_heads(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    """Each head's context output [..., heads x head_dim] times its coefficient."""
    return out * module.head_coef.to(out.dtype).repeat_interleave(module.head_dim)


def _scale_neurons(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    return out * module.neuron_coef.to(out.dtype)


def coefficients(source) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head coefficients per layer, neuron coefficients per layer), fp32 CPU copies.

    `source`: a name -> tensor dict, a module, or such a (heads, neurons) pair (returned as it is)."""
    if isinstance(source, tuple):
        return source
    named = source.items() if isinstance(source, dict) else source.named_parameters()
    heads: dict[int, torch.Tensor] = {}
    neurons: dict[int, torch.Tensor] = {}
    for name, t in named:
        if name.endswith((HEAD_COEF, NEURON_COEF)) and name.startswith(params.LAYER_PREFIX):
            layer = params.describe(name)
            (heads if layer.role == HEAD_COEF else neurons)[layer.layer] = t.detach().float().cpu().clone()
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

    Head h of layer i: columns [h*D, (h+1)*D) of the tensor whose input axis is the layer's attention width
    (attention.output.dense.weight); neuron j: column j of the one whose input axis is the FFN's neurons
    (output.dense.weight, or output.dense_u.weight for a low-rank FFN): params.py says which. The function is
    unchanged. moment 0 (weights): those columns x c. Moments follow the gradients (growth.py): the search
    model's column reads c*a, the folded one reads a, so the folded column's gradient is the old one x 1/c, and
    exp_avg (moment 1) gets 1/c, exp_avg_sq (moment 2) 1/c**2 (a column with c == 0: 0, see _column_scale).
    Every other tensor's gradient is unchanged (x 1): the folded Linear passes the same gradient back to its
    input as the coefficient did.
    `coefs`: the coefficient values when `tensors` are optimizer moments (they hold no coefficients).
    """
    heads, neurons = coefficients(coefs if coefs is not None else tensors)
    out = {}
    for name, t in tensors.items():
        param = params.describe(name)
        if param.layer is None or param.layer >= cfg.num_layers:
            out[name] = t
        elif param.role not in (HEAD_COEF, NEURON_COEF):
            if param.axes[-1:] == ("a",):
                scale = heads[param.layer].repeat_interleave(cfg.head_dim)
            elif param.axes[-1:] == ("f",):
                scale = neurons[param.layer]
            else:
                out[name] = t
                continue
            out[name] = t * _column_scale(scale, t.dtype, moment)[None, :]
    return out
