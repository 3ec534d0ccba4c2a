"""Stage hooks: what happens to the model when a stage is entered, and the list of them (HOOKS).

A hook is a small record of functions, so that one transformation serves the weights and the optimizer
moments alike. `moment` says which: 0 the weights (transfer.WEIGHTS), 1 `exp_avg`, 2 `exp_avg_sq`
(transfer.MOMENT_POWER). Moments are copied/cut like their weights but scaled like their *gradients*:
where the new model's gradient of a tensor is g times the old one, exp_avg gets g and exp_avg_sq g**2
(growth.py explains the width rule; earlybert.fold_slimming and core.refine_ffn state theirs).

- validate(old, new, stage): called when the config is loaded; raise ValueError for nonsense.
- resolve(old, new, tensors, ctx): the new stage's model config; most hooks return `new` as declared,
  a pruning hook decides per-layer sizes from the weights at run time.
- transform(tensors, old, new, moment, ctx): name -> tensor dict of the old model to the new one (the
  weights for moment 0, an optimizer moment for 1 and 2; a moment may drop a tensor it has no rule for,
  and that parameter then starts with fresh state).
- prepare(model, stage): after the new module holds its weights (e.g. freeze parameters).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping, Optional

from training.model.config import ModelConfig
from training.stages import core, earlybert, growth, mslt
# The protocol, named here too for callers that get hooks from this module.
from training.stages.protocol import Hook, HookContext, Tensors  # noqa: F401


def _growth_hook(name: str, kinds) -> Hook:
    def validate(old, new, stage):
        growth.validate_growth(kinds, old, new, seq_len=getattr(stage, "seq_len", None))

    def transform(tensors, old, new, moment, ctx):
        op = growth.compose(kinds) if isinstance(kinds, (list, tuple)) else growth.grow
        return op(tensors, old, new, moment=moment)

    return Hook(name=name, validate=validate, transform=transform)


def _grow_seq_validate(old: ModelConfig, new: ModelConfig, stage) -> None:
    # The data side (longer rows than the previous stage) is checked with the stage list in config/schema.py.
    if stage.seq_len is None:
        raise ValueError(f"stage '{stage.name}': hook grow_seq needs the stage's seq_len")
    if new.max_position != old.max_position:
        growth.validate_growth("seq", old, new, seq_len=stage.seq_len)
    elif old != new:
        raise ValueError(f"stage '{stage.name}': grow_seq changes only the sequence length (and max_position)")


def _grow_seq_transform(tensors, old, new, moment, ctx):
    # Same position table unless max_position grew: shorter early stages share it.
    return growth.grow_seq(tensors, old, new, moment=moment) if new.max_position != old.max_position else tensors


def _registry() -> dict[str, Hook]:
    hooks = [
        _growth_hook("stack", "stack"),
        _growth_hook("grow_ffn", "ffn"),
        _growth_hook("grow_hidden", "hidden"),
        _growth_hook("grow_width", ["hidden", "ffn"]),
        _growth_hook("compound", "compound"),
        Hook("grow_seq", _grow_seq_validate, _grow_seq_transform, reshapes=False),
        *mslt.HOOKS, *core.HOOKS, *earlybert.HOOKS,
    ]
    return {h.name: h for h in hooks}


# Every hook a stage may name, listed once, read-only (Hook records are frozen). A new method: a module with
# its HOOKS, one import and one entry above.
HOOKS: Mapping[str, Hook] = MappingProxyType(_registry())


def get_hook(name: Optional[str]) -> Optional[Hook]:
    if name is None:
        return None
    if name not in HOOKS:
        raise ValueError(f"unknown stage hook '{name}' (known: {', '.join(sorted(HOOKS))})")
    return HOOKS[name]
