"""Every training modifier a stage may use (protocol.Modifier: how a stage trains, not its model), one line each;
a stage's modifiers together (`StageTraining`), and their checks. A new modifier is its module and its line here."""
from __future__ import annotations

import functools
from typing import Callable, Optional

from training.model.flops import Trainable, flops_per_token

from training.registry import Registry
from training.stages.layerdrop import LayerDrop
from training.stages.locality import Locality
from training.stages.protocol import Modifier, StepContext

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


class StageTraining:
    """Stage `index` as its modifiers train it: a step's forward arguments, the FLOPs per token it computes (the
    stage's count, `flops_per_token` of its model, sequence length and trainable parts, as the modifiers change
    it), and what an evaluation adds. The runner and the throughput tool ask this, never a modifier by name."""

    def __init__(self, cfg, index: int, model_cfg, seq_len: int, trainable: Optional[Trainable] = None):
        self.modifiers = stage_modifiers(cfg, index)
        self._flops = functools.partial(flops_per_token, model_cfg, seq_len, cfg.data.mlm_probability, trainable)
        self._stage_flops = self._flops()

    def forward_kwargs(self, at: StepContext) -> dict:
        return {k: v for m in self.modifiers for k, v in m.forward_kwargs(at).items()}

    def flops(self, kwargs: dict) -> float:
        extra = {k: v for m in self.modifiers for k, v in m.flops_args(kwargs).items()}
        flops = self._flops(**extra) if extra else self._stage_flops
        for m in self.modifiers:
            flops *= m.flops_factor(kwargs)
        return flops

    def eval_record(self, at: StepContext, evaluate: Callable[..., dict]) -> dict:
        record: dict = {}
        for m in self.modifiers:
            record.update(m.eval_record(at, evaluate))
        return record
