"""The locality bias as a training modifier (protocol.Modifier): a training-time attention bias toward near tokens
(training/model/ops.py locality_bias), whose strength falls linearly, either over one stage
(`stages[].locality_bias: {start, end}`: from `start` at the stage's first step to `end` after its last) or over
the run's first global steps whatever the stages (`train.locality_bias: {start, end, steps}`, then off), so that
every method of a comparison gets the same aid at the same steps. Evaluations score the plain model; while the
bias is on, an evaluation also records the model as it trains (`*_as_trained`, and the strength it had), which
says how much of a curve during the anneal is the aid.
"""
from __future__ import annotations

from typing import Callable, Optional

from training.config.schema import LocalityScheduleSection
from training.model.config import check_locality
from training.stages.protocol import Modifier, StepContext


class Locality(Modifier):
    name, field = "locality_bias", "locality_bias"

    @classmethod
    def configured(cls, cfg, index: int):
        """The stage's own schedule, or the run's (it may cover this stage), or None."""
        return cfg.stages[index].locality_bias or cfg.train.locality_bias

    @classmethod
    def check(cls, cfg, index: int, start_step: Optional[int]) -> None:
        """Each stage the bias reaches needs an attention that takes it (eager or sdpa): a stage of its own
        schedule always; with the run's schedule, a stage that starts before the schedule ends (known once the
        stages' lengths are: `start_step`)."""
        stage, schedule = cfg.stages[index], cfg.train.locality_bias
        if stage.locality_bias is not None and schedule is not None:
            raise ValueError(f"stage '{stage.name}': give either train.locality_bias (the run's schedule) or "
                             "stages[].locality_bias, not both")
        attention = cfg.stage_model(index).attention
        try:
            if stage.locality_bias is not None:
                check_locality(attention)
            elif schedule is not None and start_step is not None and start_step < schedule.steps:
                check_locality(attention)
        except ValueError as err:
            if stage.locality_bias is not None:
                raise ValueError(f"stage '{stage.name}': {err}") from None
            raise ValueError(f"train.locality_bias covers stage '{stage.name}' (from step {start_step}): {err} (or "
                             "a shorter train.locality_bias.steps)") from None

    def strength(self, at: StepContext) -> float:
        bias = self.args
        if isinstance(bias, LocalityScheduleSection):  # the run's schedule, by global step
            if at.step >= bias.steps:
                return 0.0
            return bias.start + (bias.end - bias.start) * at.step / bias.steps
        return bias.start + (bias.end - bias.start) * at.stage_step / max(at.stage_steps, 1)

    def forward_kwargs(self, at: StepContext) -> dict:
        strength = self.strength(at)
        return {"locality": strength} if strength > 0 else {}

    def eval_record(self, at: StepContext, evaluate: Callable[..., dict]) -> dict:
        """While the bias is on, the held-out score of the model as it trains (the strength of the next step)."""
        kwargs = self.forward_kwargs(at)
        if not kwargs:
            return {}
        ev = evaluate(**kwargs)
        return {"locality": kwargs["locality"], "heldout_loss_as_trained": ev["heldout_loss"],
                "heldout_acc_as_trained": ev["heldout_acc"],
                "heldout_below_unigram_as_trained": ev["heldout_below_unigram"]}
