"""What will happen when: a run's stages resolved against its data and world size.

`Plan` owns the resolved schedule, built once per run and never changed: each stage's steps (a token budget
converted with the stage's own global batch x sequence length), its first global step, its sequence length,
its model as declared, its hook instance, and the LR segments of the whole run (a warmup per stage, one decay:
engine/schedule.py). A stage a watcher ends early (EarlyBERT's early-bird search) gives a new plan
(`with_boundary`: the next stage takes over the remaining steps, so the total is unchanged); the run's
StageSchedule (stages/schedule.py) holds the one in force.

The data-side sequence-length rules live here once (`seq_lens`): a stage's length is its own `seq_len` or the
prepared data's; it may not exceed the data's, nor the stage model's `max_position` (ModelConfig.check_seq_len,
the one place that decides it). `planned_steps` is the same arithmetic for tools that plan a run before it starts.

A run's config is loaded here too (`load_config`): the file as training.config reads it, then every stage checked
once (`check_stages`: each transition by its hook, which also resolves its arguments' defaults; each stage's
training modifiers) and the warmups, so that nothing after the load changes the config.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from training.config import RunConfig, read_config
from training.config.loading import find_config
from training.config.length import scale_to_max_steps
from training.engine.precision import resolve_precision
from training.engine.schedule import staged_segments
from training.errors import UserError
from training.model.addons import ADDONS
from training.model.config import ModelConfig
from training.stages.hooks import make_hook
from training.stages.modifiers import check_modifiers
from training.stages.protocol import Hook, Transition


@dataclass(frozen=True)
class StagePlan:
    """A stage resolved for this run: its steps (tokens converted), first global step and data length."""
    index: int
    name: str
    steps: int
    start_step: int
    seq_len: int
    model: ModelConfig  # as declared; a hook may resolve per-layer sizes at run time
    hook: Optional[Hook] = None  # the instance that enters this stage (none for the first stage)
    ended_early: bool = False  # a watcher ended it before `steps` (then shortened to the steps done)


def load_config(path, overrides: list[str] = (), notes: Optional[list[str]] = None) -> RunConfig:
    """The run's config, resolved and checked once (UserError, one line naming the file and the stage):
    training.config.read_config, then a staged run scaled to train.max_steps (training/config/length.py; what it
    changed is appended to `notes`), train.precision=auto, the hooks' argument defaults, the stage transitions
    and the warmups."""
    if path is not None:
        path, found = find_config(path)
        if found and notes is not None:
            notes.append(found)
    cfg = read_config(path, overrides)
    try:
        cfg, note = scale_to_max_steps(cfg)
    except UserError as err:
        raise UserError(f"{path if path is not None else 'config'}: {err}") from None
    if note and notes is not None:
        notes.append(note)
    if cfg.train.precision == "auto":  # the device's, once: every consumer then sees bf16 or fp32
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"precision": resolve_precision(cfg.train.precision)})})
    try:
        cfg = check_stages(cfg)
        check_warmups(cfg)
    except ValueError as err:
        raise UserError(f"{path if path is not None else 'config'}: {err}") from None
    return cfg


def check_stages(cfg: RunConfig) -> RunConfig:
    """Every stage, checked once (ValueError, one line naming the stage): its declared seq_len fits its model;
    the first stage names no hook; a later one names a hook if its model changes, and that hook accepts the
    transition (`Hook.validate`: the one place a transition is decided), with its arguments' defaults resolved
    from the shapes (`Hook.resolve_args`: MSLT's train_top); each stage's training modifiers suit it
    (modifiers.check_modifiers). Returns a new frozen config holding the resolved arguments."""
    stages = list(cfg.stages)
    prev_model, prev_seq = None, None
    for i, stage in enumerate(stages):
        model = cfg.stage_model(i)
        for name in model.addons:
            try:
                ADDONS.lookup(name)
            except ValueError as err:
                raise ValueError(f"stage '{stage.name}': model.addons: {err}") from None
        if stage.seq_len is not None:
            try:
                model.check_seq_len(stage.seq_len)
            except ValueError as err:
                raise ValueError(f"stage '{stage.name}': {err}") from None
        if i == 0 and stage.hook:
            raise ValueError(f"stage '{stage.name}': the first stage has no previous stage to hook from")
        if i > 0 and not stage.hook and model != prev_model:
            raise ValueError(f"stage '{stage.name}': the model shape changes but the stage names no hook")
        if i > 0 and stage.hook:
            stages[i] = _checked_transition(Transition(prev_model, model, stage, stages[i - 1], prev_seq))
        prev_model, prev_seq = model, stage.seq_len if stage.seq_len is not None else prev_seq
    cfg = cfg.model_copy(update={"stages": stages})
    starts = None if any(s.steps is None for s in stages) else [sum(s.steps for s in stages[:i])
                                                                    for i in range(len(stages))]
    check_modifiers(cfg, starts)  # stages in tokens: the run's plan checks what needs their start steps
    return cfg


def _checked_transition(t: Transition):
    """The stage of transition `t` with its hook's resolved arguments, once its hook accepts it."""
    stage = t.stage
    try:
        hook = make_hook(stage)
        args = hook.resolve_args(t)
        if args is not None:
            hook.args, stage = args, stage.model_copy(update={"hook_args": args.model_dump()})
        hook.validate(replace(t, stage=stage))
    except ValueError as err:
        raise ValueError(f"stage '{stage.name}': {stage.hook}: {err}") from None
    return stage


def check_warmups(cfg: RunConfig, steps: Optional[list[int]] = None) -> None:
    """Each stage's LR warmup must fit in the stage (training/engine/schedule.py refuses it otherwise). Checked
    when the config loads where the steps are known then (`steps` None: stages given in tokens are skipped),
    and again by Plan with every stage's steps, once the data's sequence length has converted the tokens."""
    steps = steps or [s.steps for s in cfg.stages]

    def where(i: int) -> str:
        stage = cfg.stages[i]
        if i == 0 and cfg.train.max_steps is not None and len(cfg.stages) == 1 and stage.name == "main":
            return f"train.max_steps={steps[0]}"
        given = f"stages.{i}.steps={steps[i]}" if stage.steps is not None else \
            f"stages.{i}.tokens={stage.tokens} ({steps[i]} optimizer steps at data.dir's sequence length)"
        return f"{given} (stage '{stage.name}')"

    if steps[0] is not None:
        if cfg.optimizer.warmup_steps is not None and cfg.optimizer.warmup_steps > steps[0]:
            raise ValueError(f"optimizer.warmup_steps={cfg.optimizer.warmup_steps} exceeds {where(0)}: the "
                             "first stage's LR warmup must fit in it")
        if cfg.optimizer.warmup_steps is None and all(n is not None for n in steps):
            total = sum(steps)
            warmup = cfg.warmup_steps(total)
            if warmup > steps[0]:
                raise ValueError(f"optimizer.warmup_fraction={cfg.optimizer.warmup_fraction:g} of the run's "
                                 f"{total} steps is {warmup} warmup steps, more than {where(0)}; set "
                                 "optimizer.warmup_steps")
    for i, stage in enumerate(cfg.stages[1:], 1):
        if steps[i] is not None and stage.warmup_steps > steps[i]:
            raise ValueError(f"stages.{i}.warmup_steps={stage.warmup_steps} exceeds {where(i)}: its LR warmup "
                             "must fit in it")


def seq_lens(cfg: RunConfig, data_seq_len: int, data_dir: Optional[str] = None) -> list[int]:
    """Each stage's sequence length, checked against the prepared data and the stage model's position table
    (UserError naming the stage or the data dir)."""
    data_dir = data_dir or cfg.data.dir
    lengths = []
    for i, stage in enumerate(cfg.stages):
        seq_len = stage.seq_len or data_seq_len
        if seq_len > data_seq_len:
            raise UserError(f"stage '{stage.name}': seq_len {seq_len} exceeds the prepared data's "
                            f"{data_seq_len} (data.dir={data_dir})")
        model = cfg.stage_model(i)
        try:
            model.check_seq_len(seq_len)
        except ValueError:
            where = f"stage '{stage.name}' seq_len" if stage.seq_len else f"data.dir={data_dir} has seq_len"
            raise UserError(f"{where} {seq_len}, more than model.max_position={model.max_position}; raise "
                            "model.max_position or prepare the data with a shorter --seq-len") from None
        lengths.append(seq_len)
    return lengths


def _steps(cfg: RunConfig, world_size: int, lengths: list[int]) -> list[int]:
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum * world_size
    return [stage.num_steps(global_batch * seq) for stage, seq in zip(cfg.stages, lengths)]


class Plan:
    """The run's stages as they will run (indexable: plan[i] is a StagePlan); never changed after it is made."""

    def __init__(self, cfg: RunConfig, data_seq_len: int, world_size: int, data_dir: Optional[str] = None):
        self.cfg = cfg
        lengths = seq_lens(cfg, data_seq_len, data_dir)
        stages: list[StagePlan] = []
        start = 0
        for i, (stage, steps, seq_len) in enumerate(zip(cfg.stages, _steps(cfg, world_size, lengths), lengths)):
            stages.append(StagePlan(i, stage.name, steps, start, seq_len, cfg.stage_model(i), make_hook(stage)))
            start += steps
        self.stages = tuple(stages)
        try:  # what needs every stage's steps (stages given in tokens: warmups) and start step (train.locality_bias)
            check_warmups(cfg, [p.steps for p in self.stages])
            check_modifiers(cfg, [p.start_step for p in self.stages])
        except ValueError as err:
            raise UserError(str(err)) from None
        self.lr_segments = self._lr_segments()

    def __getitem__(self, index: int) -> StagePlan:
        return self.stages[index]

    def __len__(self) -> int:
        return len(self.stages)

    def __iter__(self):
        return iter(self.stages)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.stages)

    def _lr_segments(self) -> list:
        cfg, total = self.cfg, self.total_steps
        warmups = [(p.start_step, cfg.warmup_steps(total) if p.index == 0 else cfg.stages[p.index].warmup_steps)
                   for p in self.stages]
        # A stage that ended early may have ended inside its warmup: its (past) segment is cut there.
        warmups = [(start, min(w, p.steps) if p.ended_early else w) for (start, w), p in zip(warmups, self.stages)]
        return staged_segments(total, cfg.optimizer.lr, warmups, cfg.optimizer.end_lr, cfg.optimizer.decay_power)

    def with_boundary(self, index: int, start: int) -> "Plan":
        """This plan with stage `index` starting at global step `start` instead (its previous stage ended early:
        EarlyBERT's early-bird ticket); it takes over the previous stage's remaining steps, so the run's total
        steps are unchanged, and its LR warmup moves with it. A new plan; this one is unchanged."""
        prev, cur = self.stages[index - 1], self.stages[index]
        shift = cur.start_step - start
        if not shift:
            return self
        moved = copy.copy(self)
        stages = list(self.stages)
        stages[index - 1] = replace(prev, steps=prev.steps - shift, ended_early=shift > 0)
        stages[index] = replace(cur, start_step=start, steps=cur.steps + shift)
        moved.stages = tuple(stages)
        moved.lr_segments = moved._lr_segments()
        return moved


def planned_steps(cfg: RunConfig, world_size: int = 1) -> Optional[int]:
    """Optimizer steps the run will take, before it starts: token-budget stages need the data's seq_len, read
    from data.dir/stats.json (None when it cannot be read there)."""
    lengths = [s.seq_len for s in cfg.stages]
    if any(n is None for n in lengths):
        try:
            data_seq = int(json.loads((Path(cfg.data.dir) / "stats.json").read_text())["seq_len"])
        except (OSError, ValueError, KeyError, TypeError):
            if any(s.steps is None and s.seq_len is None for s in cfg.stages):
                return None
            data_seq = 0  # only step-counted stages lack a length: it is not used
        lengths = [n or data_seq for n in lengths]
    return sum(_steps(cfg, world_size, lengths))
