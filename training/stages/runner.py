"""The stage runner: a run is a list of stages; each stage trains for its steps on one DeepSpeed engine, and a
stage hook (growth, freezing, pruning) enters the next one by rebuilding the engine in the same process.

The loop (`run`) reads as batch -> step -> log -> eval -> save, and a transition at each stage's end. It has no
cadence, state or method of its own: each component decides its own timing and holds its own state:

- the stage schedule (stages/schedule.py): stages, boundaries (an early end announced by a watcher), the LR;
- the stage's training modifiers (stages/modifiers.py): each step's forward arguments and FLOPs;
- the fault counter (engine/faults.py), the evaluator (engine/evaluator.py), the checkpointer
  (engine/checkpoint.py Checkpointer, which gathers the components' state into each checkpoint) and the
  training log (metrics.py TrainLog), all writing through the run's one metrics writer, made before any engine.
"""
from __future__ import annotations

import functools
import gc
import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from training.config import RunConfig
from training.engine import checkpoint, inject
from training.engine.build import build_engine, set_lr
from training.engine.checkpoint import Checkpointer, TrainState
from training.engine.ds_config import deepspeed_json
from training.engine.evaluator import Evaluator
from training.engine.faults import FaultCounter
from training.engine.step import StepResult, all_reduce_scalars, optimizer_step
from training.errors import UserError
from training.metrics import MetricsWriter, TrainLog, run_metrics
from training.model.bert import BertForPreTraining
from training.model.config import ModelConfig
from training.model.flops import trainable_parts
from training.signals import preemption
from training.stages import transfer
from training.stages.modifiers import StageTraining
from training.stages.plan import Plan
from training.stages.protocol import Boundary, HookContext, StepContext, enter_without_hook
from training.stages.schedule import StageSchedule

log = logging.getLogger(__name__)


class StageRunner:
    def __init__(self, cfg: RunConfig, data, out_dir: Path, rank: int, world_size: int, device: torch.device,
                 peak_tflops: float, metrics: Optional[MetricsWriter] = None):
        self.cfg, self.data, self.out_dir = cfg, data, out_dir
        self.ckpt_dir = out_dir / "checkpoints"
        self.rank, self.world_size, self.device = rank, world_size, device
        self.model: Optional[torch.nn.Module] = None
        self.model_cfg: Optional[ModelConfig] = None  # the current stage's model (after hooks resolved it)
        self.engine = None
        self.state = TrainState()
        self.preempted: Optional[str] = None  # the signal's name once the run stopped for a pre-emption
        self.stopped_wall_s: Optional[float] = None  # wall_s at the step that stopped it (run.max_wall_s)
        self.metrics = metrics or run_metrics(cfg, out_dir, rank)  # one writer (and monitor) for the whole run
        self.schedule = StageSchedule(Plan(cfg, data.seq_len, world_size, cfg.data.dir))  # the plan, built once
        self.training: Optional[StageTraining] = None  # the current stage's modifiers (stages/modifiers.py)
        self.faults = FaultCounter(cfg.run, cfg.train.precision, self.metrics.write)
        self.evaluator = Evaluator(cfg.run, data, cfg.data.dir, device, rank, world_size)
        self.checkpointer = Checkpointer(self.ckpt_dir, cfg.run, {"schedule": self.schedule})
        self.log = TrainLog(self.metrics, cfg.run, peak_tflops, world_size, rank)
        # The DeepSpeed JSON, rendered once: it depends on the run config and world size, not on the model.
        self.ds_config = deepspeed_json(cfg, world_size, out_dir)
        self._after_first_step: list[Callable[[], None]] = []

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def last_eval(self) -> dict:
        return self.evaluator.last

    @property
    def stopped_below(self) -> Optional[float]:
        return self.evaluator.stopped_below

    def after_first_step(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, after the next optimizer step (pretrain: the previous run goes once this one
        has trained)."""
        self._after_first_step.append(callback)

    # ------------------------------------------------------------------------------------ the loop

    def run(self) -> TrainState:
        """Train to the end of the schedule, or until a pause (run.stop_at_step, run.stop_below_unigram,
        run.max_wall_s, a pre-emption: checkpointed first)."""
        if self.engine is None:
            self.build()
        state, schedule = self.state, self.schedule
        with self.log.running(state, schedule.total_steps):
            while True:
                stream = self._begin_stage()
                while not schedule.stage_over(state):
                    micro = [next(stream) for _ in range(self.cfg.train.grad_accum)]  # batch
                    result, lr = self.step(micro)  # step
                    stage, stage_end, run_end = schedule[state.stage_index], schedule.stage_over(state), \
                        schedule.run_over(state)
                    if self.log.should_log(state.step, stage_end or result.stop):  # log
                        loss = all_reduce_scalars([result.loss])[0]
                        self.log.write(state, stage, loss, lr, self.evaluator.last)
                    if self.evaluator.should_eval(state.step, run_end or result.stop, stage_end):  # eval
                        with self.log.paused():  # (a run stopped by its clock is scored where it stops)
                            self._evaluate(stage)
                    if result.stop:
                        self._out_of_time()
                    pause = state.step == self.cfg.run.stop_at_step or result.preempt or \
                        self.evaluator.stopped_below is not None or result.stop
                    if self.checkpointer.should_save(state.step, run_end or pause, self.faults.streak):  # save
                        state.wall_s = self.log.wall_s()
                        with self.log.paused():
                            self.save()
                    if result.preempt:
                        self._preempted()
                    if pause:
                        return state
                if schedule.is_last(state.stage_index):
                    return state
                state.stage_step = 0
                self.enter_stage(state.stage_index + 1)  # transition

    def _begin_stage(self) -> Iterator[dict]:
        """A stage (re)starts: its modifiers, its FLOPs (frozen parts from requires_grad), its watcher, its data."""
        index = self.state.stage_index
        stage = self.schedule[index]
        self.training = StageTraining(self.cfg, index, self.model_cfg, stage.seq_len, trainable_parts(self.model))
        stream = self.batches()
        self.schedule.start_watching(self.state, self.engine, HookContext(self.state.step, self.out_dir),
                                     self.metrics.write, self.rank)
        self.log.stage(index, len(self.schedule), stage.name)
        return stream

    def batches(self) -> Iterator[dict]:
        """The data stream, positioned by samples consumed so that resume continues exactly where it was."""
        t = self.cfg.train
        return self.data.train_batches(t.micro_batch_size, self.rank, self.world_size, self.cfg.run.seed,
                                       start_sample=self.state.samples,
                                       seq_len=self.schedule[self.state.stage_index].seq_len)

    def step_context(self) -> StepContext:
        state = self.state
        return StepContext(state.step, state.stage_step, self.schedule[state.stage_index].steps, self.model_cfg,
                           self.cfg.run.seed)

    def step(self, micro: list[dict]) -> tuple[StepResult, float]:
        """One optimizer step at the current position: the LR, the stage's modifiers' forward arguments, the step;
        the state advanced, a non-finite step counted, the stage's watcher told. Returns (result, LR)."""
        state = self.state
        lr = self.schedule.lr(state.step)
        set_lr(self.engine, lr)
        kwargs = self.training.forward_kwargs(self.step_context())
        out_of_time = self.cfg.run.max_wall_s is not None and self.log.wall_s() >= self.cfg.run.max_wall_s
        start = time.perf_counter()
        result = self.train_step(micro, stop_requested=out_of_time, **kwargs)
        while self._after_first_step:
            self._after_first_step.pop(0)()
        self.log.stepped(state.step + 1, self.schedule[state.stage_index].name, time.perf_counter() - start,
                         result.tokens, self.training.flops(kwargs))
        state.step += 1
        state.stage_step += 1
        state.tokens += result.tokens
        state.samples += result.samples
        self.faults.check(result, state)
        self.schedule.observe(state, self.engine)
        return result, lr

    def train_step(self, micro_batches: list[dict], stop_requested: bool = False, **forward_kwargs) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches (training/engine/step.py: the global token-mean
        loss, the agreed fault, pre-emption and stop flags)."""
        injector = inject.injector(self.rank)
        nan_factor = injector.loss_factor(self.state.step + 1)
        result = optimizer_step(self.engine, micro_batches, self.device, world_size=self.world_size,
                                fp16=self.cfg.train.precision == "fp16", forward_kwargs=forward_kwargs,
                                loss_factor=nan_factor, preempt_requested=preemption().requested,
                                stop_requested=stop_requested)
        if nan_factor is not None:
            injector.fired(self.state.step + 1)
        return result

    def evaluate(self, **forward_kwargs) -> dict:
        return self.evaluator.evaluate(self.engine.module, **forward_kwargs)

    def _evaluate(self, stage) -> None:
        """The run's score now, beside what the stage's modifiers add (the model as it trains, during the locality
        anneal), as an `eval` record."""
        score = self.evaluator.score(self.engine.module, self.state.step)
        extra = self.training.eval_record(self.step_context(), self.evaluate)
        self.metrics.write({"kind": "eval", "step": self.state.step, "stage": stage.name, "tokens": self.state.tokens,
                            **score, **extra, "wall_s": self.log.wall_s()})

    def _out_of_time(self) -> None:
        self.stopped_wall_s = self.log.wall_s()
        log.info("step %d: the training loop has run %.1f s (run.max_wall_s=%g): stopping after a checkpoint",
                 self.state.step, self.stopped_wall_s, self.cfg.run.max_wall_s)

    def _preempted(self) -> None:
        self.preempted = preemption().name() if preemption().requested else "a peer's signal"
        log.warning("pre-emption (%s): checkpointed at step %d; exiting for a requeue", self.preempted,
                    self.state.step)

    def save(self) -> None:
        self.checkpointer.save(self.engine, self.state, self.model_cfg, self.run_info(self.state.stage_index),
                               metrics_bytes=self.metrics.size())

    # ------------------------------------------------------------------------------------ engines

    def set_model(self, model: torch.nn.Module, model_cfg: ModelConfig) -> None:
        self.model, self.model_cfg = model, model_cfg

    def build(self) -> None:
        """(Re)build the DeepSpeed engine around self.model for the current stage, in the existing process group."""
        self.engine = self._engine_for(self.model, self.state.stage_index)

    def _engine_for(self, model: torch.nn.Module, stage_index: int):
        """A DeepSpeed engine for `model` as stage `stage_index` trains it (its hook prepares the module first,
        e.g. freezes layers: before the optimizer sees the parameters)."""
        hook = self.schedule[stage_index].hook
        if hook is not None:
            hook.prepare(model)
        model.to(self.device)
        if model.cfg.compile:
            self.log.expect_compile()  # the first step on this module compiles its layers
        engine, _ = build_engine(model, self.cfg, self.world_size, self.out_dir, self.ds_config)
        return engine

    def enter_stage(self, index: int) -> float:
        """The boundary into stage `index`, in one place: the hook gets the old model's fp32 weights and (with
        optimizer_state: carry) its moments as one Boundary and returns the new model, weights and moments;
        transfer.rebuild makes the new module and engine from them. Same process, same process group.
        Returns seconds taken."""
        start = time.perf_counter()
        stage, hook = self.cfg.stages[index], self.schedule[index].hook
        moments, steps = transfer.optimizer_moments(self.engine) if stage.optimizer_state == "carry" else ({}, {})
        boundary = Boundary(step=self.state.step, out_dir=self.out_dir, old=self.model_cfg,
                            declared=self.schedule[index].model, weights=transfer.fp32_weights(self.engine),
                            moments=moments)
        entered = hook.enter(boundary) if hook is not None else enter_without_hook(boundary)
        del boundary
        self.engine = None  # the old engine (and its optimizer state) goes before the new one is built
        gc.collect()
        self.state.stage_index = index
        self.engine, model, carried = transfer.rebuild(entered, steps, lambda m: self._engine_for(m, index))
        self.set_model(model, entered.model)
        seconds = time.perf_counter() - start
        self.metrics.write({"kind": "transition", "step": self.state.step, "stage": stage.name,
                            "hook": stage.hook, "seconds": seconds, "carried_state_params": carried,
                            "optimizer_state": stage.optimizer_state,
                            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)})
        log.info("entered stage %s (hook %s) in %.2f s; optimizer state %s for %d params", stage.name,
                 stage.hook, seconds, stage.optimizer_state, carried)
        return seconds

    # ------------------------------------------------------------------------------------ checkpoints

    @functools.cached_property
    def _data_identity(self) -> Optional[dict]:
        identity = getattr(self.data, "identity", None)
        return identity() if callable(identity) else None

    def run_info(self, stage_index: int) -> dict:
        """What a checkpoint records of how it was trained (checkpoint.check_resumable compares it on resume)."""
        stage = self.schedule[stage_index]
        return {"precision": self.cfg.train.precision, "stage": stage.name, "seq_len": stage.seq_len,
                "data": self._data_identity}

    def check_resume(self, tag: str) -> dict:
        """The checkpoint's meta.json, once it is known to fit this config and data (UserError otherwise)."""
        meta = checkpoint.read_meta(self.ckpt_dir, tag)
        stage_index = meta["train_state"]["stage_index"]
        if stage_index >= len(self.schedule):
            raise UserError(f"{self.ckpt_dir / tag} is at stage {stage_index}, but the config has only "
                            f"{len(self.schedule)} stages")
        checkpoint.check_compatible(meta, self.schedule.planned[stage_index].model, self.ckpt_dir / tag)
        checkpoint.check_resumable(meta, self.run_info(stage_index), self.ckpt_dir / tag)
        return meta

    def resume(self, tag: str) -> dict:
        """Load a checkpoint taken anywhere (mid-stage, at a stage's end, right after a transition): the model it
        holds, the train position, and each component's state (the schedule's early ends). Returns its meta."""
        meta = self.check_resume(tag)
        stage_index = meta["train_state"]["stage_index"]
        # The saved model config is the truth: a hook may have resolved per-layer sizes at run time. Whether to
        # compile is not the model's: the config resumed with says.
        compile_layers = self.cfg.stage_model(stage_index).compile
        model_cfg = ModelConfig.model_validate({**meta["model"], "compile": compile_layers})
        self.state.stage_index = stage_index
        self.set_model(BertForPreTraining(model_cfg), model_cfg)
        self.build()
        self.state = self.checkpointer.load(self.engine, tag, meta)
        log.info("resumed from %s at step %d (stage %s)", tag, self.state.step, self.schedule[stage_index].name)
        return meta
