"""Numerical faults (NaN/Inf loss or gradients): what counts as one, and how a step detects it.

Policy (see `training/engine/step.py`, `optimizer_step`):

* Every step, after the backward pass of the last micro-batch and before `engine.step()`, each rank
  computes a local "bad" flag (its loss is not finite, or its gradient norm is not finite) and all ranks
  agree on it through one small all-reduce (MAX) that also carries the pre-emption flag.
* fp16: DeepSpeed's loss scaler already skips overflowing steps and lowers the scale; we do not skip a
  second time. Only a non-finite *loss* (which no loss scale fixes) counts as a bad step.
* bf16/fp32: a bad step is skipped (no optimizer update, gradients dropped). The step still counts: its
  batch is consumed and the LR schedule moves on, exactly as DeepSpeed does for an fp16 overflow, so the
  data position and the LR stay pure functions of the step number.
* After `run.max_bad_steps` consecutive bad steps the run restores the last good checkpoint in-process
  (`run.on_nan: restore`) or stops (`run.on_nan: stop`) with exit code 3.
* A checkpoint is never written from non-finite parameters.

The debug hooks that inject faults in tests live in engine/inject.py; restoring in-process in engine/recovery.py.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)

EXIT_NUMERICAL = 3  # the run stopped because of repeated non-finite steps (not bad input, not a crash)


class NumericalFault(RuntimeError):
    """Training cannot continue: repeated non-finite losses/gradients, or non-finite parameters."""


class RestoreRequested(RuntimeError):
    """Raised out of the step loop (on every rank at the same step) to reload the last good checkpoint."""


# ---------------------------------------------------------------------------------------- detection

def local_grads(engine) -> list[torch.Tensor]:
    """The gradients this rank holds after the backward pass at the accumulation boundary.

    Without ZeRO these are the (already all-reduced) `param.grad`s. ZeRO 1/2 reduces them into flat
    partitions and frees `param.grad`; there the loss flag plus DeepSpeed's own invalid-norm check (it
    skips the step when the global norm is not finite) cover gradients.
    """
    return [p.grad for p in engine.module.parameters() if p.grad is not None]


def grads_finite(grads: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim bool tensor (no host sync): all gradients finite. One fused norm per dtype/device group."""
    if not grads:
        return torch.tensor(True)
    norms = torch._foreach_norm(grads)
    return torch.stack([n.float() for n in norms]).sum().isfinite()


def params_finite(module: torch.nn.Module) -> bool:
    params = [p.detach() for p in module.parameters()]
    return bool(grads_finite(params)) if params else True


@contextlib.contextmanager
def skipped_step(engine):
    """Inside this block `engine.step()` keeps DeepSpeed's bookkeeping (micro-step and global-step
    counters, gradient zeroing) but the optimizer does not update parameters or its state."""
    opt = engine.optimizer

    def no_update(*args, **kwargs):
        # What DeepSpeed's own overflow path does: drop the gradients, keep the parameters and moments.
        averaged = getattr(opt, "averaged_gradients", None)  # ZeRO 1/2 reduced partitions
        if isinstance(averaged, dict):
            for key in list(averaged):
                averaged[key] = None
        all_grads = getattr(opt, "all_grad_tensors", None)
        if isinstance(all_grads, dict):
            for key in list(all_grads):
                all_grads[key] = None
        release = getattr(opt, "_release_preflattened_grad_buffers", None)
        if callable(release):
            release()
        try:
            opt.zero_grad(set_to_none=True)
        except TypeError:
            opt.zero_grad()
        return None

    opt.step = no_update  # instance attribute shadows the class method for this one call
    try:
        yield
    finally:
        del opt.step
    engine._step_applied = False


class FaultCounter:
    """The policy above over a run: consecutive non-finite steps counted (a skipped bf16/fp32 step also in the
    train state's `skipped_steps`), each one a `fault` record, and after run.max_bad_steps in a row a restore of the
    last good checkpoint (RestoreRequested) or a stop (NumericalFault)."""

    def __init__(self, run, precision: str, write: Callable[[dict], None]):
        self.run, self.precision, self.write = run, precision, write
        self.streak = 0  # consecutive non-finite steps; no periodic checkpoint is taken inside a streak

    def check(self, result, state) -> None:
        if not result.bad:
            self.streak = 0
            return
        self.streak += 1
        if self.precision != "fp16":
            state.skipped_steps += 1
        log.warning("step %d: non-finite loss or gradient on some rank; optimizer step skipped (%d in a row)",
                    state.step, self.streak)
        self.write({"kind": "fault", "step": state.step, "what": "non-finite loss/gradient",
                    "consecutive": self.streak, "skipped_total": state.skipped_steps})
        if self.streak >= self.run.max_bad_steps:
            self.streak = 0
            what = (f"{self.run.max_bad_steps} consecutive steps with a non-finite loss or gradient "
                    f"(last: step {state.step})")
            if self.run.on_nan == "restore":
                raise RestoreRequested(what)
            raise NumericalFault(f"{what}; stopping (run.on_nan=stop)")


# ---------------------------------------------------------------------------------------- debug hooks

def all_finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)
