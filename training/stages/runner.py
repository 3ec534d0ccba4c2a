"""The stage runner: a run is a list of stages; each stage trains for its steps on one DeepSpeed engine.

Stage hooks (growth, freezing, pruning) plug in at stage boundaries: they reshape `self.model` and the
runner rebuilds the engine in the same process. The spine ships a single stage.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from training.config import RunConfig
from training.engine import checkpoint
from training.engine.build import build_engine, set_lr
from training.engine.checkpoint import TrainState
from training.engine.schedule import warmup_poly_decay
from training.metrics import MetricsWriter
from training.model.flops import flops_per_token

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: float  # global token-mean MLM loss (+ NSP) of this optimizer step
    tokens: int  # tokens in this optimizer step, all ranks


def _all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class StageRunner:
    def __init__(self, cfg: RunConfig, model: torch.nn.Module, data, out_dir: Path, rank: int,
                 world_size: int, device: torch.device, peak_tflops: float):
        self.cfg = cfg
        self.model = model
        self.data = data
        self.out_dir = out_dir
        self.ckpt_dir = out_dir / "checkpoints"
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.peak_tflops = peak_tflops
        self.engine = None
        self.metrics: Optional[MetricsWriter] = None
        self.state = TrainState()

    # ------------------------------------------------------------------------------------ set-up

    def _build(self) -> None:
        self.engine, ds_config = build_engine(self.model, self.cfg, self.world_size, self.out_dir)
        self.metrics = MetricsWriter(self.out_dir / "metrics.jsonl", self.rank == 0,
                                     getattr(self.engine, "monitor", None))
        self.ds_config = ds_config

    def resume(self, tag: str) -> None:
        checkpoint.check_compatible(checkpoint.read_meta(self.ckpt_dir, tag), self.cfg.model, self.ckpt_dir / tag)
        if self.engine is None:
            self._build()
        self.state = checkpoint.load(self.engine, self.ckpt_dir, tag)
        log.info("resumed from %s at step %d", tag, self.state.step)

    # ------------------------------------------------------------------------------------ training

    def _micro_batches(self) -> Iterator[dict]:
        """The data stream, positioned by the global step so that resume continues exactly where it was."""
        t = self.cfg.train
        return self.data.train_batches(t.micro_batch_size, self.rank, self.world_size, self.cfg.run.seed,
                                       start_step=self.state.step * t.grad_accum)

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches.

        The loss is normalised by the masked-token count of the whole global batch (all ranks, all
        micro-batches: one scalar all-reduce), so the gradient is the same token-mean however the batch is
        split across ranks and micro-batches. DeepSpeed divides by grad_accum and averages over ranks; the
        factor world * accum undoes that.
        """
        counts = [float((b["labels"] != -100).sum()) for b in micro_batches]
        samples = float(sum(b["input_ids"].shape[0] for b in micro_batches))
        global_count, global_samples = _all_reduce_sum([sum(counts), samples])
        scale = self.world_size * len(micro_batches)
        loss_sum = 0.0
        for batch in micro_batches:
            out = self.engine(**_to_device(batch, self.device))
            loss = out["mlm_loss"].float() * out["mlm_count"] / max(global_count, 1.0)
            if "nsp_loss" in out:
                loss = loss + out["nsp_loss"].float() * batch["input_ids"].shape[0] / global_samples
            self.engine.backward(loss * scale)
            self.engine.step()
            loss_sum += float(loss.detach())
        tokens = int(sum(b["input_ids"].numel() for b in micro_batches)) * self.world_size
        return StepResult(loss=loss_sum, tokens=tokens)

    @torch.no_grad()
    def evaluate(self) -> dict:
        module = self.engine.module
        was_training = module.training
        module.eval()
        loss_sum = correct = count = 0.0
        batches = self.data.heldout_batches(self.cfg.run.eval_batch_size, max_batches=self.cfg.run.eval_batches)
        for i, batch in enumerate(batches):
            if i % self.world_size != self.rank:  # each rank takes its share of the fixed held-out batches
                continue
            out = module(**_to_device(batch, self.device))
            loss_sum += float(out["mlm_loss"].float()) * float(out["mlm_count"])
            correct += float(out["mlm_correct"])
            count += float(out["mlm_count"])
        module.train(was_training)
        loss_sum, correct, count = _all_reduce_sum([loss_sum, correct, count])
        return {"heldout_loss": loss_sum / max(count, 1.0), "heldout_acc": correct / max(count, 1.0)}

    def _lr(self, step: int) -> float:
        o = self.cfg.optimizer
        return warmup_poly_decay(step, total_steps=self.cfg.total_steps, warmup_steps=self.cfg.warmup_steps(),
                                 peak_lr=o.lr, end_lr=o.end_lr, power=o.decay_power)

    def _save(self) -> None:
        checkpoint.save(self.engine, self.ckpt_dir, self.state, self.cfg.model, self.cfg.run.keep_last)

    def run(self) -> TrainState:
        if self.engine is None:
            self._build()
        cfg, run = self.cfg, self.cfg.run
        stages = cfg.stages
        bar = tqdm(total=cfg.total_steps, initial=self.state.step, disable=self.rank != 0 or not run.progress,
                   unit="step", dynamic_ncols=True)
        start_wall = time.perf_counter() - self.state.wall_s
        last_eval: dict = {}
        while self.state.stage_index < len(stages):
            stage = stages[self.state.stage_index]
            seq_len = self.data.seq_len
            stage_flops = flops_per_token(self.cfg.model, seq_len)
            stream = self._micro_batches()
            window_start, window_tokens = time.perf_counter(), 0
            while self.state.stage_step < stage.steps:
                micro = [next(stream) for _ in range(cfg.train.grad_accum)]
                lr = self._lr(self.state.step)
                set_lr(self.engine, lr)
                result = self.train_step(micro)
                self.state.step += 1
                self.state.stage_step += 1
                self.state.tokens += result.tokens
                window_tokens += result.tokens
                bar.update(1)
                if self.state.step % run.log_every == 0 or self.state.stage_step == stage.steps:
                    loss = _all_reduce_sum([result.loss])[0]
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / max(elapsed, 1e-9)
                    mfu = stage_flops * tokens_per_s / (self.peak_tflops * 1e12 * self.world_size)
                    self.state.wall_s = time.perf_counter() - start_wall
                    self.metrics.write({"kind": "train", "step": self.state.step, "stage": stage.name,
                                        "loss": loss, "lr": lr, "tokens": self.state.tokens,
                                        "tokens_per_s": tokens_per_s, "wall_s": self.state.wall_s, "mfu": mfu})
                    bar.set_postfix(stage=stage.name, loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                                    **({"eval": f"{last_eval['heldout_loss']:.3f}"} if last_eval else {}))
                    window_start, window_tokens = time.perf_counter(), 0
                done = self.state.step == cfg.total_steps
                if self.state.step % run.eval_every == 0 or done:
                    last_eval = self.evaluate()
                    self.metrics.write({"kind": "eval", "step": self.state.step, "stage": stage.name,
                                        "tokens": self.state.tokens, **last_eval,
                                        "wall_s": time.perf_counter() - start_wall})
                pause = self.state.step == run.stop_at_step
                if (run.save_every and self.state.step % run.save_every == 0) or done or pause:
                    self.state.wall_s = time.perf_counter() - start_wall
                    self._save()
                if pause:
                    bar.close()
                    self.last_eval = last_eval
                    return self.state
            self.state.stage_index += 1
            self.state.stage_step = 0
        bar.close()
        self.last_eval = last_eval
        return self.state
