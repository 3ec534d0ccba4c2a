"""Timing one training step by its parts, for both benchmark tools: `timed_step` runs the step exactly as the
runner does (training/engine/step.py: token-normalised loss, scalar all-reduces, fault check) and reports
wall and CPU seconds per part."""
from __future__ import annotations

import argparse
import contextlib
import time
from typing import Callable, Optional

import torch

from training import cli_types
from training.engine.step import optimizer_step

# The step's parts (engine/step.py) as reported: the scalar all-reduces and the fault check count as "sync".
_REPORTED = {"forward": "forward", "backward": "backward", "step": "optimizer", "count": "sync", "check": "sync"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseClock:
    """The `phase` argument of optimizer_step: adds each part's wall and process-CPU seconds (the device
    synchronised at both ends) to `forward_s`, `backward_s`, `optimizer_s`, `sync_s`; `around(name)` may wrap
    each part in a context of the caller's (e.g. a collective counter's phase)."""

    def __init__(self, device: torch.device, around: Optional[Callable[[str], contextlib.AbstractContextManager]] = None):
        self.device, self.around = device, around
        self.wall = {k: 0.0 for k in set(_REPORTED.values())}
        self.cpu = dict(self.wall)

    @contextlib.contextmanager
    def __call__(self, name: str):
        key = _REPORTED[name]
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        with self.around(name) if self.around else contextlib.nullcontext():
            yield
            _sync(self.device)
        self.wall[key] += time.perf_counter() - t0
        self.cpu[key] += time.process_time() - c0

    def record(self) -> dict:
        rec = {f"{k}_s": v for k, v in self.wall.items()}
        rec.update({f"{k}_cpu_s": v for k, v in self.cpu.items()})
        rec["step_s"], rec["step_cpu_s"] = sum(self.wall.values()), sum(self.cpu.values())
        return rec


def timed_step(engine, micro_batches: list[dict], device: torch.device, world_size: int = 1, fp16: bool = False,
               around=None, forward_kwargs: Optional[dict] = None) -> dict:
    """One optimizer step as training runs it; seconds per part (PhaseClock.record) and the step's loss."""
    clock = PhaseClock(device, around)
    result = optimizer_step(engine, micro_batches, device, world_size=world_size, fp16=fp16,
                            forward_kwargs=forward_kwargs, phase=clock)
    return {**clock.record(), "loss": result.loss}


def add_block_arguments(p: argparse.ArgumentParser, steps: int, warmup: int, repeats: int, blocks: str) -> None:
    """--steps, --warmup and --repeats of a benchmark that times alternating blocks (throughput, mslt)."""
    p.add_argument("--steps", type=cli_types.positive_int("--steps"), default=steps,
                   help=f"timed optimizer steps per block (default {steps})")
    p.add_argument("--warmup", type=cli_types.non_negative_int("--warmup"), default=warmup,
                   help=f"untimed steps before every block (default {warmup})")
    p.add_argument("--repeats", type=cli_types.positive_int("--repeats"), default=repeats,
                   help=f"{blocks} (default {repeats})")
