"""Every training modifier a stage may use (protocol.Modifier: how a stage trains, not its model), one line each,
and the stage's instances. A new modifier is its module and its line here."""
from __future__ import annotations

from typing import Optional

from training.registry import Registry
from training.stages.layerdrop import LayerDrop
from training.stages.locality import Locality
from training.stages.protocol import Modifier

MODIFIERS = Registry("training modifier", (
    LayerDrop, Locality,
))


def stage_modifiers(cfg, index: int) -> list[Modifier]:
    """The modifiers stage `index` trains with, as instances, in the order listed."""
    return [cls(args) for cls in MODIFIERS.values() if (args := cls.configured(cfg, index)) is not None]


def check_modifiers(cfg, starts: Optional[list[int]] = None) -> None:
    """Every stage's modifiers, checked (ValueError, one line): names it gives under `modifiers`, their arguments,
    and each modifier's own check (`starts`: the stages' first global steps, where known)."""
    for index, stage in enumerate(cfg.stages):
        for name in stage.modifiers:
            try:
                cls = MODIFIERS.lookup(name)
            except ValueError as err:
                raise ValueError(f"stage '{stage.name}': modifiers: {err}") from None
            if cls.field is not None:
                raise ValueError(f"stage '{stage.name}': modifiers.{name}: give it as the stage's {cls.field}")
        for cls in MODIFIERS.values():
            try:
                cls.configured(cfg, index)
            except ValueError as err:
                raise ValueError(f"stage '{stage.name}': modifiers.{cls.name}: {err}") from None
            cls.check(cfg, index, starts[index] if starts is not None else None)
