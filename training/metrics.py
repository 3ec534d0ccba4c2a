"""Metrics: OUT/metrics.jsonl (rank 0) and the loggers through one DeepSpeed monitor (`MetricsWriter`, made once per
run: `run_metrics`), what a resume keeps of the file (`truncate_metrics`), the training records and their
throughput window (`TrainLog`), and the MFU denominator."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def make_monitor(blocks: dict, out_dir: Path):
    """One DeepSpeed MonitorMaster for the whole run (rank 0 writes), from ds_config.monitor_blocks; None when no
    logger is asked for. W&B gets offline mode and OUT as its directory unless the environment says otherwise."""
    if not blocks:
        return None
    import os

    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster

    if "wandb" in blocks:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(out_dir))
        os.environ.setdefault("WANDB_NAME", out_dir.name)
    return MonitorMaster(get_monitor_config(blocks))


class MetricsWriter:
    """Appends one JSON object per line; only rank 0 writes. Resumed runs append to the same file, cut first
    to what it held when the checkpoint was written (`size()` at the save, `truncate_metrics` at the resume).
    `monitor`: a DeepSpeed monitor, or a function making one at the first record (so a process that records
    nothing, e.g. a finished run resumed, opens no events file)."""

    def __init__(self, path: Path, enabled: bool, monitor=None):
        self.path = path
        self.enabled = enabled
        self._monitor = monitor

    @property
    def monitor(self):
        if callable(self._monitor) and not hasattr(self._monitor, "write_events"):
            self._monitor = self._monitor()
        return self._monitor

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: one line (a resume cuts a half-written record: truncate_metrics)
            from training.errors import UserError
            from training.outdir import oserror_line
            raise UserError(oserror_line(str(self.path), err)) from None
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            kind = record.get("kind", "train")
            events = [(f"{kind}/{k}", float(v), record["step"]) for k, v in record.items()
                      if isinstance(v, (int, float)) and k not in ("step", "kind")]
            self.monitor.write_events(events)

    def size(self) -> Optional[int]:
        """Bytes written so far (rank 0; None elsewhere): what a checkpoint records, see truncate_metrics."""
        if not self.enabled:
            return None
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


def truncate_metrics(path: Path, step: int, size: Optional[int] = None) -> None:
    """On resume, drop the records a killed process wrote after the checkpoint: they are re-done, so each record
    is in the file once. `size`: the file's length when the checkpoint was written (its meta.json's
    metrics_bytes): the file is cut there, which drops exactly the records written after the save, also those of
    the checkpoint's own step (the stage transition that follows a checkpoint at a stage's end, re-entered on
    resume). Without it (checkpoints from before it was recorded, or a file that no longer matches it), records
    with a step after `step` go; step -1 (a --resume that starts from scratch) drops every record."""
    from training.outdir import write_atomic

    if not path.is_file():
        return
    if size is not None and _is_line_end(path, size):
        os.truncate(path, size)
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except ValueError:
            continue  # a line cut short by the kill
        kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept))


def _is_line_end(path: Path, size: int) -> bool:
    """Whether `size` bytes of `path` end a line (or are none): a record boundary the file still has."""
    if not isinstance(size, int) or size < 0 or size > path.stat().st_size:
        return False
    if size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


def run_metrics(cfg, out_dir: Path, rank: int) -> MetricsWriter:
    """The run's one writer, made before any engine: rank 0 writes OUT/metrics.jsonl and, through one monitor for
    the whole run (opened at its first record), the loggers of run.report_to, whose curves go on across engine
    rebuilds."""
    from training.engine.ds_config import monitor_blocks

    if rank != 0:
        return MetricsWriter(out_dir / "metrics.jsonl", False)
    blocks = monitor_blocks(cfg, out_dir)
    return MetricsWriter(out_dir / "metrics.jsonl", True, lambda: make_monitor(blocks, out_dir))


class TrainLog:
    """The training records and when they are written: every run.log_every steps and at each stage's end, the
    loss, LR, tokens, and the throughput of the window since the previous record (tokens/s, FLOPs per token as
    computed, MFU against `peak_tflops`), evaluation and checkpoint time left out (`paused`); the run's wall clock
    (`wall_s`, which a resumed run continues); the progress bar; and, with model.compile, each stage's first step
    (`compile` records: compilation is part of the transition's cost)."""

    def __init__(self, writer: MetricsWriter, run, peak_tflops: float, world_size: int, rank: int):
        self.writer, self.run, self.peak_tflops, self.world_size = writer, run, peak_tflops, world_size
        self.show = rank == 0 and run.progress
        self._bar = None
        self._start_wall = time.perf_counter()
        self._compiling = False
        self._window(time.perf_counter())

    def _window(self, now: float) -> None:
        self._window_start, self._tokens, self._flops = now, 0, 0.0

    @contextlib.contextmanager
    def running(self, state, total_steps: int) -> Iterator["TrainLog"]:
        """The progress bar and the wall clock while the loop runs (from the wall time the state holds)."""
        self._bar = tqdm(total=total_steps, initial=state.step, disable=not self.show, unit="step",
                         dynamic_ncols=True)
        self._start_wall = time.perf_counter() - state.wall_s
        try:
            yield self
        finally:
            self._bar.close()

    def wall_s(self) -> float:
        return time.perf_counter() - self._start_wall

    def stage(self, index: int, count: int, name: str) -> None:
        """A stage (re)starts: the bar says which, and a new throughput window begins."""
        self._bar.set_description(f"stage {index + 1}/{count} {name}")
        self._window(time.perf_counter())

    def expect_compile(self) -> None:
        self._compiling = True  # the next step compiles the layers of a new module

    def stepped(self, step: int, stage: str, seconds: float, tokens: int, flops_per_token: float) -> None:
        """Optimizer step `step` took `seconds` and trained `tokens` at `flops_per_token`."""
        if self._compiling:
            self._compiling = False
            self.writer.write({"kind": "compile", "step": step, "stage": stage, "seconds": seconds})
            log.info("stage %s: first step with model.compile took %.1f s (compiling the layers)", stage, seconds)
        self._tokens += tokens
        self._flops += tokens * flops_per_token
        self._bar.update(1)

    def should_log(self, step: int, stage_end: bool) -> bool:
        return step % self.run.log_every == 0 or stage_end

    def write(self, state, stage, loss: float, lr: float, last_eval: dict) -> None:
        """The `train` record of the window that ends at `state`'s step (`stage`: its StagePlan)."""
        elapsed = time.perf_counter() - self._window_start
        tokens_per_s = self._tokens / max(elapsed, 1e-9)
        fpt = self._flops / max(self._tokens, 1)  # the window's token-weighted mean
        mfu = fpt * tokens_per_s / (self.peak_tflops * 1e12 * self.world_size)
        state.wall_s = self.wall_s()
        self.writer.write({"kind": "train", "step": state.step, "stage": stage.name, "loss": loss, "lr": lr,
                           "tokens": state.tokens, "samples": state.samples, "tokens_per_s": tokens_per_s,
                           "wall_s": state.wall_s, "mfu": mfu, "flops_per_token": fpt, "seq_len": stage.seq_len})
        self._bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                              **({"eval": f"{last_eval['heldout_loss']:.3f}"} if last_eval else {}))
        self._window(time.perf_counter())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time in the block (an evaluation, a checkpoint) is not training: the window leaves it out."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - start


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """A square matmul's best rate of `repeats` trials on this device and dtype: the MFU denominator when
    run.peak_tflops is unset. The best, not the mean, so a stall during one trial does not lower the peak
    (and inflate MFU). On a GPU prefer setting run.peak_tflops to the datasheet's dense number."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12
