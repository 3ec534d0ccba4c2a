"""The stage schedule as the run goes: which stage is on, whether it is over, the LR at a step, and the one way a
boundary moves: a watcher of the stage (EarlyBERT's early-bird search, put there by the next stage's hook)
announces that the stage ends now (`end_stage`). The plan it starts from (stages/plan.py) is never changed; an
early end gives a new plan in force (`Plan.with_boundary`), so nothing the loop holds changes under it.

What the schedule decided at run time (the early ends) is its state: a checkpoint keeps it (`state_dict`) and a
resume restores it (`load_state_dict`) instead of rebuilding and replaying the plan.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

from training.engine.schedule import lr_at
from training.stages.plan import Plan, StagePlan
from training.stages.protocol import HookContext

log = logging.getLogger(__name__)


class StageSchedule:
    def __init__(self, plan: Plan):
        self.planned = plan  # as configured
        self.plan = plan  # in force: the planned one with the early ends applied
        self.ends: dict[int, int] = {}  # stage index -> the global step it ended at, where a watcher ended it early
        self._watch = None

    def __getitem__(self, index: int) -> StagePlan:
        return self.plan[index]

    def __len__(self) -> int:
        return len(self.plan)

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    def lr(self, step: int) -> float:
        """The LR at global `step`: a pure function of the step and the plan in force (engine/schedule.py)."""
        return lr_at(self.plan.lr_segments, step)

    def stage_over(self, state) -> bool:
        return state.stage_step >= self.plan[state.stage_index].steps

    def run_over(self, state) -> bool:
        return state.step >= self.plan.total_steps

    def is_last(self, index: int) -> bool:
        return index + 1 >= len(self.plan)

    # ------------------------------------------------------------------------------------- early ends

    def end_stage(self, index: int, step: int) -> None:
        """Stage `index` ends at global step `step` (before its planned end): the next one takes over its
        remaining steps, and its LR warmup moves with it."""
        if self.plan[index + 1].start_step == step:
            return
        self.ends[index] = step
        self.plan = self.plan.with_boundary(index + 1, step)
        log.info("stage %s ends at step %d, before its planned end", self.plan[index].name, step)

    def start_watching(self, state, engine, ctx: HookContext, write: Callable[[dict], None], rank: int) -> None:
        """At a stage's (re)start: the watcher the next stage's hook puts on it, if any; it may end the stage at
        once (a resume at the step the stage had ended)."""
        index = state.stage_index
        hook = self.plan[index + 1].hook if not self.is_last(index) else None
        self._watch = hook.watch(ctx, write, rank) if hook is not None else None
        if self._watch is not None and self._watch.start(state.step, state.stage_step, engine):
            self.end_stage(index, state.step)

    def observe(self, state, engine) -> None:
        """After an optimizer step: the watcher may end the stage now."""
        if self._watch is not None and self._watch.observe(state.step, engine):
            self.end_stage(state.stage_index, state.step)

    # ------------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"ends": {str(index): step for index, step in sorted(self.ends.items())}}

    def load_state_dict(self, saved: Optional[dict], state=None) -> None:
        """The early ends as a checkpoint recorded them. `saved` None (a checkpoint from before the schedule had
        state): the current stage's start as the train position says (`state`: step - stage_step)."""
        self.plan, self.ends = self.planned, {}
        if saved is not None:
            for index, step in sorted((int(i), s) for i, s in saved.get("ends", {}).items()):
                self.end_stage(index, step)
        elif state is not None and state.stage_index > 0:
            self.end_stage(state.stage_index - 1, state.step - state.stage_step)
