"""`pretrain --resume [TAG|PATH]`: which checkpoint, and what a user should hear about it.

- `--resume` alone: the latest checkpoint that verifies (training/engine/checkpoint_verify.resume_tag).
- `--resume TAG` (`step00001000`) or `--resume PATH` (a checkpoint dir of this run, OUT/checkpoints/TAG): that
  one, verified. Checkpoints newer than it are kept aside as `<tag>.abandoned` once the run is claimed (never
  resumed or pruned, nothing deleted), and `latest` names the one resumed.
- A schedule that differs from the one the run was started with (OUT/config.resolved.json): the changes the
  run will see, e.g. `LR at step 900: 1.2e-03 -> 3e-04; total steps 3000 -> 1000`, as a warning.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from training.cli import nearest
from training.engine import checkpoint_verify
from training.errors import UserError

log = logging.getLogger("training.pretrain")
ABANDONED_SUFFIX = ".abandoned"


def choose(ckpt_dir: Path, choice: Optional[str]) -> tuple[Optional[str], list[str], list[str]]:
    """(tag to resume from, corrupt newer tags passed over, newer good tags the choice abandons)."""
    if choice is None:
        return None, [], []
    if choice == "latest":
        tag, bad = checkpoint_verify.resume_tag(ckpt_dir)
        return tag, bad, []
    tags = checkpoint_verify._tags(ckpt_dir)
    path = Path(choice)
    if path.is_dir() and (path / "meta.json").is_file():
        if path.resolve().parent != ckpt_dir.resolve():
            raise UserError(f"--resume {choice}: a checkpoint of another run ({path.resolve().parent}); --resume "
                            f"continues the run in {ckpt_dir.parent}: pass that run's --out (or run.out_dir)")
        tag = path.name
    elif choice in tags:
        tag = choice
    else:
        digits = "".join(c for c in path.name if c.isdigit())
        close = min(tags, key=lambda t: abs(int(t[4:]) - int(digits))) if digits and tags else nearest(choice, tags)
        have = f"it has {', '.join(tags)}" if tags else "it has none"
        raise UserError(f"--resume {choice}: no such checkpoint in {ckpt_dir} ({have})"
                        + (f"; did you mean {close}?" if close else ""))
    checkpoint_verify.read_meta(ckpt_dir, tag)  # verified: sizes and checksums (CorruptCheckpoint, one line)
    return tag, [], [t for t in tags if t > tag]


def set_aside(ckpt_dir: Path, newer: list[str], tag: str) -> None:
    """Rank 0, after resuming from an older `tag`: the newer checkpoints kept as <tag>.abandoned."""
    if newer:
        checkpoint_verify.quarantine(ckpt_dir, newer, tag, suffix=ABANDONED_SUFFIX,
                                     why=f"newer than {tag}, which --resume chose")


def _previous_config(out: Path):
    """The config the run was last started with (OUT/config.resolved.json), or None when it cannot be read."""
    from pydantic import ValidationError

    from training.config import RunConfig

    try:
        raw = json.loads((out / "config.resolved.json").read_text())
        raw.get("deepspeed", {}).pop("tensorboard", None)  # a key of older runs (now run.report_to)
        return RunConfig.model_validate(raw)
    except (OSError, ValueError, ValidationError, AttributeError):
        return None


def schedule_changes(old_plan, new_plan, step: int) -> list[str]:
    """What differs, at and after `step`, between the plan the run was started with and this one."""
    from training.engine.schedule import lr_at

    changes = []
    if old_plan.total_steps != new_plan.total_steps:
        changes.append(f"total steps {old_plan.total_steps} -> {new_plan.total_steps}")
    for old, new in zip(old_plan, new_plan):
        if (old.name, old.steps) != (new.name, new.steps):
            changes.append(f"stage {old.index} '{old.name}' {old.steps} steps -> '{new.name}' {new.steps} steps")
    if len(old_plan) != len(new_plan):
        changes.append(f"{len(old_plan)} stages -> {len(new_plan)}")
    old_lr, new_lr = lr_at(old_plan.lr_segments, step), lr_at(new_plan.lr_segments, step)
    if abs(old_lr - new_lr) > 1e-12 + 1e-6 * max(abs(old_lr), abs(new_lr)):
        changes.insert(0, f"LR at step {step}: {old_lr:.3g} -> {new_lr:.3g}")
    old_aid, new_aid = old_plan.cfg.train.locality_bias, new_plan.cfg.train.locality_bias
    if old_aid != new_aid:
        changes.append(f"train.locality_bias {old_aid.model_dump() if old_aid else None} -> "
                       f"{new_aid.model_dump() if new_aid else None}")
    return changes


def report_schedule_change(runner, out: Path, step: int) -> Optional[str]:
    """The warning for a resume whose schedule differs from the run's (None when it is the same or unknown)."""
    from training.stages.plan import Plan

    old_cfg = _previous_config(out)
    if old_cfg is None:
        return None
    try:
        old_plan = Plan(old_cfg, runner.data.seq_len, runner.world_size, old_cfg.data.dir)
    except (UserError, ValueError):
        return None
    changes = schedule_changes(old_plan, runner.schedule.plan, step)
    if not changes:
        return None
    return (f"--resume at step {step} with a schedule that differs from the one this run was started with "
            f"({out / 'config.resolved.json'}): " + "; ".join(changes))


def score_of_finished(runner) -> dict:
    """A resumed run that is already finished trained nothing: its held-out score, measured now (every rank
    takes part in the evaluation's all-reduce)."""
    if runner.evaluator.last or runner.state.step < runner.total_steps:
        return runner.evaluator.last
    log.info("the run was already finished at step %d: evaluating its last checkpoint", runner.state.step)
    runner.evaluator.last = runner.evaluate()
    return runner.evaluator.last
