"""Stage hooks: what happens to the model when a stage is entered, and the static list of them (HOOKS).

A hook is a `protocol.Hook` subclass; each stage that names one gets its own instance (`make_hook(stage)`),
holding the stage's typed `hook_args` and what the method decides at its boundary. One transformation serves
the weights and the optimizer moments alike: `moment` says which (0 the weights, transfer.WEIGHTS; 1
`exp_avg`, 2 `exp_avg_sq`, transfer.MOMENT_POWER). Moments are copied/cut like their weights but scaled like
their *gradients*: where the new model's gradient of a tensor is g times the old one, exp_avg gets g and
exp_avg_sq g**2 (growth.py explains the width rule; earlybert.fold_slimming and core.refine_ffn state theirs).
protocol.Hook documents each method a hook may define.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

from training.model.config import ModelConfig
from training.stages import core, earlybert, growth, mslt
from training.stages.protocol import Hook, HookContext, Tensors


class _Growth(Hook):
    """A growth operator of growth.py (`kinds`: one of its kinds, or several applied together)."""
    kinds: tuple[str, ...] | str

    def validate(self, old: ModelConfig, new: ModelConfig, stage) -> None:
        growth.validate_growth(self.kinds, old, new, seq_len=getattr(stage, "seq_len", None))

    def transform(self, tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int,
                  ctx: HookContext) -> Tensors:
        op = growth.compose(self.kinds) if isinstance(self.kinds, tuple) else growth.grow
        return op(tensors, old, new, moment=moment)


class Stack(_Growth):
    name, kinds = "stack", "stack"


class GrowFfn(_Growth):
    name, kinds = "grow_ffn", "ffn"


class GrowHidden(_Growth):
    name, kinds = "grow_hidden", "hidden"


class GrowWidth(_Growth):
    name, kinds = "grow_width", ("hidden", "ffn")


class Compound(_Growth):
    name, kinds = "compound", "compound"


class GrowSeq(Hook):
    """Longer sequences: the same model unless max_position grew (then the position table is extended)."""
    name = "grow_seq"

    def validate(self, old: ModelConfig, new: ModelConfig, stage) -> None:
        # The data side (longer rows than the previous stage) is checked with the stage list in plan.py.
        if stage.seq_len is None:
            raise ValueError(f"stage '{stage.name}': hook grow_seq needs the stage's seq_len")
        if new.max_position != old.max_position:
            growth.validate_growth("seq", old, new, seq_len=stage.seq_len)
        elif old != new:
            raise ValueError(f"stage '{stage.name}': grow_seq changes only the sequence length (and max_position)")

    def transform(self, tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int,
                  ctx: HookContext) -> Tensors:
        # Same position table unless max_position grew: shorter early stages share it.
        return growth.grow_seq(tensors, old, new, moment=moment) if new.max_position != old.max_position else tensors


# Every hook a stage may name, listed once, read-only. A new method: a module with its Hook subclass, one
# import and one entry here.
HOOKS: Mapping[str, type[Hook]] = MappingProxyType({h.name: h for h in (
    Stack, GrowFfn, GrowHidden, GrowWidth, Compound, GrowSeq,
    mslt.Mslt, mslt.MsltJoint, core.CoreRefine, earlybert.Prune,
)})


def hook_class(name: str) -> type[Hook]:
    if name not in HOOKS:
        raise ValueError(f"unknown stage hook '{name}' (known: {', '.join(sorted(HOOKS))})")
    return HOOKS[name]


def make_hook(stage) -> Optional[Hook]:
    """The hook instance of `stage` (a StageSection: its `hook` and `hook_args`), or None for a stage without."""
    return hook_class(stage.hook)(stage.hook_args) if stage.hook else None
