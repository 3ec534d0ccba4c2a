"""Numerical faults (NaN/Inf loss or gradients) and the debug hooks that inject faults in tests.

Policy (see `StageRunner.train_step`):

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

Debug hooks (environment variables, read once per process; for tests and fire drills):

* DSBERT_FAULT_NAN_AT="STEP[,STEP...][@RANK]": multiply the loss of global step STEP (1-based: the step
  that ends with state.step == STEP) by NaN, on RANK only (default: every rank). Fires once per step per
  process, so a restored run does not hit the same injected fault again.
* DSBERT_FAULT_KILL_IN_SAVE="STEP": SIGKILL this process in the middle of writing the checkpoint of STEP
  (after DeepSpeed wrote its files, before the checkpoint is published).
* DSBERT_FAULT_SLEEP_IN_SAVE="SECONDS": sleep that long at the same point (to signal/kill from outside).
* DSBERT_FAULT_ENOSPC_IN_SAVE="STEP": raise OSError(ENOSPC) at the same point (a disk that filled up).
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import signal
import time
from typing import Iterable, Optional

import torch

log = logging.getLogger(__name__)

EXIT_NUMERICAL = 3  # the run stopped because of repeated non-finite steps (not bad input, not a crash)


class NumericalFault(RuntimeError):
    """Training cannot continue: repeated non-finite losses/gradients, or non-finite parameters."""


class RestoreRequested(RuntimeError):
    """Raised out of the step loop (on every rank at the same step) to reload the last good checkpoint."""


def run_with_recovery(runner, max_restores: int = 3):
    """`runner.run()`, restoring the latest checkpoint in-process when the step loop asks for it.

    Replaying from a checkpoint is deterministic, so a fault that comes from the data or the model comes
    back at the same step; restoring the same checkpoint twice therefore stops the run instead of looping.
    """
    from training.engine import checkpoint

    restored: list[str] = []
    while True:
        try:
            return runner.run()
        except RestoreRequested as req:
            tag = checkpoint.latest_tag(runner.ckpt_dir)
            if tag is None:
                raise NumericalFault(f"{req}; no checkpoint to restore yet (run.on_nan=restore)") from None
            if tag in restored or len(restored) >= max_restores:
                raise NumericalFault(f"{req}; already restored {tag} once and the fault came back, so it is "
                                     "not transient: stopping (inspect the data/LR, or set run.on_nan=stop)") from None
            restored.append(tag)
            log.warning("%s: restoring the last good checkpoint %s in-process", req, tag)
            runner.resume(tag)
            if getattr(runner, "metrics", None) is not None:  # the records after this one replay those steps
                runner.metrics.write({"kind": "restore", "step": runner.state.step, "tag": tag, "why": str(req)})


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


# ---------------------------------------------------------------------------------------- debug hooks

def _parse_nan_spec(spec: str) -> tuple[set[int], Optional[int]]:
    steps_part, _, rank_part = spec.partition("@")
    steps = {int(s) for s in steps_part.split(",") if s.strip()}
    return steps, (int(rank_part) if rank_part.strip() else None)


class FaultInjector:
    """Reads the DSBERT_FAULT_* variables once; does nothing (and costs nothing) when they are unset."""

    def __init__(self, rank: int, environ=None):
        e = os.environ if environ is None else environ
        self.rank = rank
        self.nan_steps, self.nan_rank = _parse_nan_spec(e.get("DSBERT_FAULT_NAN_AT", ""))
        self.kill_in_save = int(e["DSBERT_FAULT_KILL_IN_SAVE"]) if e.get("DSBERT_FAULT_KILL_IN_SAVE") else None
        self.sleep_in_save = float(e.get("DSBERT_FAULT_SLEEP_IN_SAVE") or 0)
        self.enospc_in_save = int(e["DSBERT_FAULT_ENOSPC_IN_SAVE"]) if e.get("DSBERT_FAULT_ENOSPC_IN_SAVE") else None
        self._fired: set[int] = set()

    def loss_factor(self, step: int) -> Optional[float]:
        """NaN for the (1-based) global step `step` when injection is asked for here, else None."""
        if step in self.nan_steps and step not in self._fired and self.nan_rank in (None, self.rank):
            return math.nan
        return None

    def fired(self, step: int) -> None:
        self._fired.add(step)

    def in_save(self, step: int) -> None:
        if self.sleep_in_save:
            time.sleep(self.sleep_in_save)
        if self.kill_in_save == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.enospc_in_save == step:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(DSBERT_FAULT_ENOSPC_IN_SAVE)")


_injector: Optional[FaultInjector] = None


def injector(rank: int = 0) -> FaultInjector:
    global _injector
    if _injector is None or _injector.rank != rank:
        _injector = FaultInjector(rank)
    return _injector


def all_finite(values: Iterable[float]) -> bool:
    return all(math.isfinite(v) for v in values)
