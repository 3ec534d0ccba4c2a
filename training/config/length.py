"""One way to set a staged run's length: `train.max_steps` (`pretrain --max-steps N`).

Without `stages`, train.max_steps is the one stage's length (schema.RunConfig). With `stages`, a train.max_steps
that differs from the stages' total scales the whole schedule to it, in proportion:

- every stage's steps: stage i gets max_steps * steps_i / total, rounded by largest remainder (each stage its
  floor, the steps left over to the largest fractions, earlier stages first on ties), so that the stages add up
  to exactly max_steps, and every stage keeps at least 1 step;
- each stage's `warmup_steps` (and `optimizer.warmup_steps`, the first stage's) by its stage's own factor,
  rounded half up, at least 1 where it was at least 1, at most the stage's new steps;
- `train.locality_bias.steps` (a count of global steps) by the run's factor, rounded half up, at least 1.

`optimizer.warmup_fraction` is a fraction already; hook arguments are not step counts. A stage given in `tokens`
is refused with a line saying how: its steps depend on the global batch and sequence length, known only when
the run starts. The config stays frozen: the scaled one is a copy (model_copy).
"""
from __future__ import annotations

import math
from typing import Optional

from training.config.schema import RunConfig
from training.errors import UserError


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def split_steps(steps: list[int], target: int) -> list[int]:
    """`steps` scaled to add up to `target` (largest remainder, each at least 1; see the module docstring)."""
    total = sum(steps)
    quotas = [s * target / total for s in steps]
    new = [max(1, math.floor(q)) for q in quotas]
    by_fraction = sorted(range(len(steps)), key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))
    while sum(new) < target:
        for i in by_fraction:
            if sum(new) == target:
                break
            new[i] += 1
    while sum(new) > target:  # the 1-step minimum took steps: give them back from the longest stages
        longest = max(range(len(new)), key=lambda i: (new[i], -i))
        new[longest] -= 1
    return new


def _scaled_warmup(warmup: int, old: int, new: int) -> int:
    if warmup == 0:
        return 0
    return min(new, max(1, _half_up(warmup * new / old)))


def scale_to_max_steps(cfg: RunConfig) -> tuple[RunConfig, Optional[str]]:
    """(cfg with its stages scaled to train.max_steps, a line saying what changed) or (cfg, None) when
    train.max_steps is unset or already the stages' total. UserError when it cannot be done."""
    target = cfg.train.max_steps
    if target is None:
        return cfg, None
    for i, stage in enumerate(cfg.stages):
        if stage.steps is None:
            raise UserError(f"train.max_steps={target} cannot scale stage '{stage.name}', which is given in tokens "
                            f"(stages.{i}.tokens={stage.tokens}): its steps depend on the global batch and sequence "
                            f"length; give every stage in steps, or shorten it with --set stages.{i}.tokens=N")
    old = [s.steps for s in cfg.stages]
    total = sum(old)
    if total == target:
        return cfg, None
    if target < len(old):
        raise UserError(f"train.max_steps={target}: the config has {len(old)} stages and each needs at least 1 step; "
                        f"give train.max_steps >= {len(old)}")
    new = split_steps(old, target)
    stages = []
    parts = []
    for stage, o, n in zip(cfg.stages, old, new):
        warmup = _scaled_warmup(stage.warmup_steps, o, n)
        stages.append(stage.model_copy(update={"steps": n, "warmup_steps": warmup}))
        parts.append(f"{stage.name} {o} -> {n}" + (f" (warmup {stage.warmup_steps} -> {warmup})"
                                                   if stage.warmup_steps else ""))
    update: dict = {"stages": stages}
    opt = cfg.optimizer
    if opt.warmup_steps:
        warmup = _scaled_warmup(opt.warmup_steps, old[0], new[0])
        update["optimizer"] = opt.model_copy(update={"warmup_steps": warmup})
        parts.append(f"optimizer.warmup_steps {opt.warmup_steps} -> {warmup}")
    aid = cfg.train.locality_bias
    train = cfg.train
    if aid is not None:
        steps = max(1, _half_up(aid.steps * target / total))
        train = train.model_copy(update={"locality_bias": aid.model_copy(update={"steps": steps})})
        parts.append(f"train.locality_bias.steps {aid.steps} -> {steps}")
    update["train"] = train
    note = (f"train.max_steps={target} scales the schedule's {total} steps by {target / total:.4g}: "
            + "; ".join(parts))
    return cfg.model_copy(update=update), note


def aid_outlasts_run(cfg: RunConfig, total_steps: int) -> Optional[str]:
    """A warning when a locality aid is still on at the run's last step: evaluation and export score the model
    without it, so a run that never trains without it is scored on a model it never was. None otherwise."""
    aid = cfg.train.locality_bias
    if aid is not None and aid.steps >= total_steps:
        return (f"train.locality_bias.steps={aid.steps} lasts as long as the run's {total_steps} steps or longer: "
                "the model trains with the locality aid to its last step, but evaluation and export score it "
                "without the aid; shorten train.locality_bias.steps (the default job's is a third of its steps)")
    last = cfg.stages[-1]
    if last.locality_bias is not None and last.locality_bias.end > 0:
        return (f"stage '{last.name}' (the last) ends with locality_bias.end={last.locality_bias.end:g}: the model "
                "trains with the locality aid to its last step, but evaluation and export score it without the aid")
    return None
