"""The stage runner: a run is a list of stages; each stage trains for its steps on one DeepSpeed engine.

Stage hooks (growth, freezing, pruning) plug in at stage boundaries: they reshape `self.model` and the
runner rebuilds the engine in the same process. The spine ships a single stage.
"""
from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from training.config import RunConfig
from training.engine.ds_config import deepspeed_json, monitor_blocks
from training.errors import UserError
from training.engine import checkpoint
from training.engine.build import build_engine, set_lr
from training.engine import faults, inject
from training.engine.checkpoint import TrainState
from training.engine.schedule import lr_at
from training.engine.step import StepResult, all_reduce_scalars, optimizer_step
from training.metrics import MetricsWriter, make_monitor
from training.model.bert import BertForPreTraining
from training.model.config import ModelConfig
from training.model.flops import flops_per_token, trainable_parts
from training.stages import layerdrop, transfer
from training.stages.protocol import Boundary, HookContext, enter_without_hook
from training.stages.plan import Plan, StagePlan
from training.signals import preemption

log = logging.getLogger(__name__)


class StageRunner:
    def __init__(self, cfg: RunConfig, data, out_dir: Path, rank: int, world_size: int, device: torch.device,
                 peak_tflops: float):
        self.cfg = cfg
        self.data = data
        self.out_dir = out_dir
        self.ckpt_dir = out_dir / "checkpoints"
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.peak_tflops = peak_tflops
        self.model: Optional[torch.nn.Module] = None
        self.model_cfg: Optional[ModelConfig] = None  # the current stage's model (after hooks resolved it)
        self.engine = None
        self._compiling = False  # set by _engine_for when model.compile is on
        self.metrics: Optional[MetricsWriter] = None
        self.state = TrainState()
        self.plan = Plan(cfg, data.seq_len, world_size, cfg.data.dir)  # what will happen when (stages/plan.py)
        # The DeepSpeed JSON, rendered once: it depends on the run config and world size, not on the model.
        self.ds_config = deepspeed_json(cfg, world_size, out_dir)
        self.last_eval: dict = {}

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    # ------------------------------------------------------------------------------------ set-up

    def _stage_watch(self, index: int):
        """The watcher the next stage's hook puts on stage `index` (EarlyBERT's search), or None."""
        hook = self.plan[index + 1].hook if index + 1 < len(self.plan) else None
        if hook is None:
            return None
        return hook.watch(HookContext(step=self.state.step, out_dir=self.out_dir), self.metrics.write, self.rank)

    def set_model(self, model: torch.nn.Module, model_cfg: ModelConfig) -> None:
        self.model, self.model_cfg = model, model_cfg

    def _build(self) -> None:
        """(Re)build the DeepSpeed engine around self.model for the current stage, in the existing process group."""
        self.engine = self._engine_for(self.model, self.state.stage_index)

    def _engine_for(self, model: torch.nn.Module, stage_index: int):
        """A DeepSpeed engine for `model` as stage `stage_index` trains it (its hook prepares the module first,
        e.g. freezes layers: before the optimizer sees the parameters)."""
        hook = self.plan[stage_index].hook
        if hook is not None:
            hook.prepare(model)
        model.to(self.device)
        self._compiling = model.cfg.compile  # the first step on this module compiles its layers
        engine, _ = build_engine(model, self.cfg, self.world_size, self.out_dir, self.ds_config)
        if self.metrics is None:  # one monitor for the run: its curves go on across engine rebuilds
            blocks = monitor_blocks(self.cfg, self.out_dir)
            self.metrics = MetricsWriter(self.out_dir / "metrics.jsonl", self.rank == 0,
                                         (lambda: make_monitor(blocks, self.out_dir)) if self.rank == 0 else None)
        return engine

    def run_info(self, stage_index: int) -> dict:
        """What a checkpoint records of how it was trained (checkpoint.check_resumable compares it on resume)."""
        plan = self.plan[stage_index]
        if not hasattr(self, "_data_identity"):
            identity = getattr(self.data, "identity", None)
            self._data_identity = identity() if callable(identity) else None
        return {"precision": self.cfg.train.precision, "stage": plan.name, "seq_len": plan.seq_len,
                "data": self._data_identity}

    def check_resume(self, tag: str) -> dict:
        """The checkpoint's meta.json, once it is known to fit this config and data (UserError otherwise)."""
        meta = checkpoint.read_meta(self.ckpt_dir, tag)
        stage_index = meta["train_state"]["stage_index"]
        if stage_index >= len(self.plan):
            raise UserError(f"{self.ckpt_dir / tag} is at stage {stage_index}, but the config has only "
                            f"{len(self.plan)} stages")
        checkpoint.check_compatible(meta, self.plan[stage_index].model, self.ckpt_dir / tag)
        checkpoint.check_resumable(meta, self.run_info(stage_index), self.ckpt_dir / tag)
        return meta

    def resume(self, tag: str) -> dict:
        """Load a checkpoint taken anywhere: mid-stage, at a stage's end, or right after a transition. Returns its
        meta.json."""
        meta = self.check_resume(tag)
        stage_index = meta["train_state"]["stage_index"]
        # The saved model config is the truth: a hook may have resolved per-layer sizes at run time. Whether to
        # compile is not the model's: the config resumed with says.
        compile_layers = self.cfg.stage_model(stage_index).compile
        model_cfg = ModelConfig.model_validate({**meta["model"], "compile": compile_layers})
        self.state.stage_index = stage_index
        self.set_model(BertForPreTraining(model_cfg), model_cfg)
        self._build()
        self.state = checkpoint.load(self.engine, self.ckpt_dir, tag)
        self.plan = Plan(self.cfg, self.data.seq_len, self.world_size, self.cfg.data.dir)  # as configured, then
        if stage_index > 0:  # the actual start of the current stage
            self.plan.move_boundary(stage_index, self.state.step - self.state.stage_step)
        log.info("resumed from %s at step %d (stage %s)", tag, self.state.step, self.plan[stage_index].name)
        return meta

    def _enter_stage(self, index: int) -> float:
        """The boundary into stage `index`, in one place: the hook gets the old model's fp32 weights and (with
        optimizer_state: carry) its moments as one Boundary and returns the new model, weights and moments;
        transfer.rebuild makes the new module and engine from them. Same process, same process group.
        Returns seconds taken."""
        start = time.perf_counter()
        stage, hook = self.cfg.stages[index], self.plan[index].hook
        moments, steps = transfer.optimizer_moments(self.engine) if stage.optimizer_state == "carry" else ({}, {})
        boundary = Boundary(step=self.state.step, rank=self.rank, out_dir=self.out_dir, stage=stage,
                            old=self.model_cfg, declared=self.plan[index].model,
                            weights=transfer.fp32_weights(self.engine), moments=moments,
                            write_metrics=self.metrics.write)
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

    # ------------------------------------------------------------------------------------ training

    def _micro_batches(self) -> Iterator[dict]:
        """The data stream, positioned by samples consumed so that resume continues exactly where it was."""
        t = self.cfg.train
        return self.data.train_batches(t.micro_batch_size, self.rank, self.world_size, self.cfg.run.seed,
                                       start_sample=self.state.samples,
                                       seq_len=self.plan[self.state.stage_index].seq_len)

    _bad_streak: int = 0  # consecutive non-finite steps (see training/engine/faults.py)
    preempted: Optional[str] = None  # the signal's name once the run stopped for a pre-emption
    stopped_below: Optional[float] = None  # nats below unigram at the eval that stopped it (run.stop_below_unigram)
    stopped_wall_s: Optional[float] = None  # wall_s at the step that stopped it (run.max_wall_s)

    def _reached_target(self, target: Optional[float]) -> Optional[float]:
        """The fresh eval's distance below the unigram reference if it reaches `target` (every rank holds the same
        all-reduced eval, so all ranks stop at the same step), else None."""
        below = self.last_eval["heldout_below_unigram"]
        if target is None or below < target:
            return None
        log.info("step %d: held-out loss %.3f is %.3f nats below the unigram reference (run.stop_below_unigram=%g): "
                 "stopping after a checkpoint", self.state.step, self.last_eval["heldout_loss"], below, target)
        return below

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

    def _check_faults(self, result: StepResult) -> None:
        """Count consecutive non-finite steps; after run.max_bad_steps, restore or stop (faults.py)."""
        if not result.bad:
            self._bad_streak = 0
            return
        self._bad_streak += 1
        if self.cfg.train.precision != "fp16":
            self.state.skipped_steps += 1
        run = self.cfg.run
        log.warning("step %d: non-finite loss or gradient on some rank; optimizer step skipped (%d in a row)",
                    self.state.step, self._bad_streak)
        self.metrics.write({"kind": "fault", "step": self.state.step, "what": "non-finite loss/gradient",
                            "consecutive": self._bad_streak, "skipped_total": self.state.skipped_steps})
        if self._bad_streak >= run.max_bad_steps:
            self._bad_streak = 0
            what = f"{run.max_bad_steps} consecutive steps with a non-finite loss or gradient (last: step {self.state.step})"
            if run.on_nan == "restore":
                raise faults.RestoreRequested(what)
            raise faults.NumericalFault(f"{what}; stopping (run.on_nan=stop)")

    @torch.no_grad()
    def evaluate(self, **forward_kwargs) -> dict:
        """The held-out yardstick: MLM loss and accuracy at the fixed all-[MASK] positions (training/data/
        loader.py FIXED_MASK_*, the same for every run and checkpoint), beside the unigram table's loss on the
        same positions and how far below it the model is (nats; <= 0 means nothing learned from context).
        `forward_kwargs` score the model as it trains instead (the locality bias at its current strength)."""
        module = self.engine.module
        was_training = module.training
        module.eval()
        loss_sum = correct = count = unigram = 0.0
        batches = self.data.heldout_batches(self.cfg.run.eval_batch_size, max_batches=self.cfg.run.eval_batches)
        for i, batch in enumerate(batches):
            if i % self.world_size != self.rank:  # each rank takes its share of the fixed held-out batches
                continue
            out = module(**{k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, **forward_kwargs)
            loss_sum += float(out["mlm_loss"].float()) * float(out["mlm_count"])
            correct += float(out["mlm_correct"])
            count += float(out["mlm_count"])
            unigram += self.data.unigram_nll(batch["labels"])
        module.train(was_training)
        loss_sum, correct, count, unigram = all_reduce_scalars([loss_sum, correct, count, unigram])
        if count == 0:  # a loss over nothing would read as a perfect 0.000
            raise UserError(f"data.dir={self.cfg.data.dir}: the held-out evaluation has no masked token")
        loss, unigram = loss_sum / count, unigram / count
        return {"heldout_loss": loss, "heldout_acc": correct / count, "heldout_unigram_loss": unigram,
                "heldout_below_unigram": unigram - loss}

    def _lr(self, step: int) -> float:
        return lr_at(self.plan.lr_segments, step)

    def _save(self) -> None:
        if getattr(self, "_saved_step", None) == self.state.step:
            return  # e.g. a pre-emption signal at a step that was just saved
        checkpoint.save(self.engine, self.ckpt_dir, self.state, self.model_cfg, self.cfg.run.keep_last,
                        run_info=self.run_info(self.state.stage_index), metrics_bytes=self.metrics.size())
        self._saved_step = self.state.step

    def _locality(self, stage, plan: StagePlan) -> dict:
        """Forward kwargs for the locality bias (training/model/ops.py locality_bias): the stage's own, its
        strength falling linearly from `start` at the stage's first step to `end` after its last, or the run's
        (train.locality_bias), falling from `start` at global step 0 to `end` at step `steps`, then off.
        Evaluations never get it: they score the plain BERT the run delivers."""
        bias, schedule = stage.locality_bias, self.cfg.train.locality_bias
        if bias is not None:
            strength = bias.start + (bias.end - bias.start) * self.state.stage_step / max(plan.steps, 1)
        elif schedule is not None and self.state.step < schedule.steps:
            strength = schedule.start + (schedule.end - schedule.start) * self.state.step / schedule.steps
        else:
            return {}
        return {"locality": strength} if strength > 0 else {}

    def _as_trained(self, stage, plan: StagePlan) -> dict:
        """While the locality bias is on, the held-out score of the model as it trains (the bias at the strength
        of the next step) beside the plain one: how much of a curve during the anneal is the aid."""
        locality = self._locality(stage, plan)
        if not locality:
            return {}
        ev = self.evaluate(**locality)
        return {"locality": locality["locality"], "heldout_loss_as_trained": ev["heldout_loss"],
                "heldout_acc_as_trained": ev["heldout_acc"],
                "heldout_below_unigram_as_trained": ev["heldout_below_unigram"]}

    def _layer_drop(self, stage) -> dict:
        """Forward kwargs for progressive layer dropping: the same keep decisions on every rank (layerdrop.py)."""
        return layerdrop.forward_kwargs(stage.layer_drop, self.state.step, self.model_cfg.num_layers, self.cfg.run.seed)

    def _record_compile(self, stage: str, seconds: float) -> None:
        """model.compile: the stage's first step, compilation included, is part of its transition cost."""
        self._compiling = False
        self.metrics.write({"kind": "compile", "step": self.state.step + 1, "stage": stage, "seconds": seconds})
        log.info("stage %s: first step with model.compile took %.1f s (compiling the layers)", stage, seconds)

    def run(self) -> TrainState:
        if self.engine is None:
            self._build()
        cfg, run = self.cfg, self.cfg.run
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=self.rank != 0 or not run.progress,
                   unit="step", dynamic_ncols=True)
        start_wall = time.perf_counter() - self.state.wall_s
        while self.state.stage_index < len(self.plan):
            plan = self.plan[self.state.stage_index]
            stage = cfg.stages[plan.index]
            bar.set_description(f"stage {plan.index + 1}/{len(self.plan)} {plan.name}")
            # FLOPs as computed: frozen parts (MSLT) from requires_grad, dropped layers by this step's keep probs.
            trainable = trainable_parts(self.model)
            stage_flops = flops_per_token(self.model_cfg, plan.seq_len, cfg.data.mlm_probability, trainable)
            stream = self._micro_batches()
            watch = self._stage_watch(plan.index)  # True from start/observe: end this stage now
            if watch is not None and watch.start(self.state.step, self.state.stage_step, self.engine):
                self.plan.move_boundary(plan.index + 1, self.state.step)
            window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
            while self.state.stage_step < plan.steps:
                micro = [next(stream) for _ in range(cfg.train.grad_accum)]
                lr = self._lr(self.state.step)
                set_lr(self.engine, lr)
                drop = self._layer_drop(stage)
                step_start = time.perf_counter()
                out_of_time = run.max_wall_s is not None and step_start - start_wall >= run.max_wall_s
                result = self.train_step(micro, stop_requested=out_of_time, **drop, **self._locality(stage, plan))
                if self._compiling:
                    self._record_compile(plan.name, time.perf_counter() - step_start)
                self.state.step += 1
                self.state.stage_step += 1
                self.state.tokens += result.tokens
                self.state.samples += result.samples
                window_tokens += result.tokens
                window_flops += result.tokens * (stage_flops if not drop else flops_per_token(
                    self.model_cfg, plan.seq_len, cfg.data.mlm_probability, trainable, drop["layer_keep_prob"]))
                bar.update(1)
                try:
                    self._check_faults(result)
                except faults.RestoreRequested:
                    bar.close()
                    raise
                if watch is not None and watch.observe(self.state.step, self.engine):
                    self.plan.move_boundary(plan.index + 1, self.state.step)
                stage_done = self.state.stage_step == plan.steps
                if self.state.step % run.log_every == 0 or stage_done or result.stop:
                    loss = all_reduce_scalars([result.loss])[0]
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / max(elapsed, 1e-9)
                    fpt = window_flops / max(window_tokens, 1)  # the window's token-weighted mean
                    mfu = fpt * tokens_per_s / (self.peak_tflops * 1e12 * self.world_size)
                    self.state.wall_s = time.perf_counter() - start_wall
                    self.metrics.write({"kind": "train", "step": self.state.step, "stage": plan.name,
                                        "loss": loss, "lr": lr, "tokens": self.state.tokens,
                                        "samples": self.state.samples,
                                        "tokens_per_s": tokens_per_s, "wall_s": self.state.wall_s, "mfu": mfu,
                                        "flops_per_token": fpt, "seq_len": plan.seq_len})
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                    **({"eval": f"{self.last_eval['heldout_loss']:.3f}"} if self.last_eval else {}))
                    window_start, window_tokens, window_flops = time.perf_counter(), 0, 0.0
                done = self.state.step == self.total_steps
                if (self.state.step % run.eval_every == 0 or done or (stage_done and run.eval_at_stage_end)
                        or result.stop):  # a run stopped by its clock is scored where it stops
                    paused = time.perf_counter()
                    self.last_eval = self.evaluate()
                    self.metrics.write({"kind": "eval", "step": self.state.step, "stage": plan.name,
                                        "tokens": self.state.tokens, **self.last_eval,
                                        **self._as_trained(stage, plan), "wall_s": time.perf_counter() - start_wall})
                    window_start += time.perf_counter() - paused  # eval time is not training throughput
                    self.stopped_below = self._reached_target(run.stop_below_unigram)
                if result.stop:
                    self.stopped_wall_s = time.perf_counter() - start_wall
                    log.info("step %d: the training loop has run %.1f s (run.max_wall_s=%g): stopping after a "
                             "checkpoint", self.state.step, self.stopped_wall_s, run.max_wall_s)
                pause = (self.state.step == run.stop_at_step or result.preempt or self.stopped_below is not None
                         or result.stop)
                periodic = run.save_every and self.state.step % run.save_every == 0 and not self._bad_streak
                if periodic or done or pause:
                    self.state.wall_s = time.perf_counter() - start_wall
                    paused = time.perf_counter()
                    self._save()
                    window_start += time.perf_counter() - paused  # nor is checkpoint time
                if result.preempt:
                    self.preempted = preemption().name() if preemption().requested else "a peer's signal"
                    log.warning("pre-emption (%s): checkpointed at step %d; exiting for a requeue",
                                self.preempted, self.state.step)
                if pause:
                    bar.close()
                    return self.state
            if self.state.stage_index + 1 < len(self.plan):
                self.state.stage_step = 0
                self._enter_stage(self.state.stage_index + 1)
            else:
                break
        bar.close()
        return self.state
