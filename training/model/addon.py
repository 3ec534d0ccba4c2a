"""What a model add-on is: a method that adds parameters to BertForPreTraining without the model knowing the
method (EarlyBERT's slimming coefficients, training/model/slimming.py). `addons.py` lists them, one line each.

An add-on
- says when a model has it (`enabled(cfg)`: by default when `model.addons` names it, with its arguments there);
- `attach`es its parameters to the built model (on whatever submodule they belong to) and any forward hooks that
  use them, so the encoder's code stays plain BERT;
- declares the names it adds (`ROLES`: (part, pattern, axes) rows in training/model/params.py's terms), so
  growth, MSLT, pruning and export know what each of its tensors is;
- may return named auxiliary losses in training mode (`aux_losses`): the model returns them beside its MLM loss
  and the optimizer step adds them to what it trains on without knowing what they are (engine/step.py);
- `fold`s its tensors away for the Hugging Face export, leaving a plain BERT that computes the same function
  (or says why it cannot).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from training.errors import UserError
from training.model import params

Tensors = dict[str, torch.Tensor]


class Addon:
    name: ClassVar[str]
    # (part, pattern, axes): part "layer" patterns match the name inside an encoder layer ("attention.self.x"),
    # the others the whole name (params.py).
    ROLES: ClassVar[tuple[tuple[str, str, tuple[str, ...]], ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if isinstance(getattr(cls, "name", None), str):
            params.register_roles(cls.name, cls.ROLES)

    def __init__(self, cfg):
        self.args: dict[str, Any] = dict(cfg.addons.get(self.name, {}))

    @classmethod
    def enabled(cls, cfg) -> bool:
        return cls.name in cfg.addons

    def attach(self, model: nn.Module) -> None:
        raise NotImplementedError(f"model add-on {self.name} attaches nothing")

    def aux_losses(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Named losses to train on beside the MLM loss (training mode, labels given); {} for none."""
        return {}

    def fold(self, tensors: Tensors, cfg) -> Tensors:
        """The tensors of a plain BERT computing the same function (the export's); UserError when there is none."""
        raise UserError(f"cannot export to HF: model add-on {self.name} has no plain-BERT form")
