"""One optimizer step the way training runs it; the runner and both benchmark tools call `optimizer_step`.

* The loss is normalised by the masked-token count of the whole global batch (all ranks, all micro-batches:
  one scalar all-reduce), so the gradient is the same token-mean however the batch is split across ranks and
  micro-batches. DeepSpeed divides by grad_accum and averages over ranks; the factor world * accum undoes that.
* After the last backward and before the optimizer step, a second small all-reduce (MAX) agrees on three
  flags: "some rank's loss or gradient is not finite", "some rank got a pre-emption signal" and "some rank's
  clock says stop" (run.max_wall_s). A
  non-finite bf16/fp32 step is skipped on every rank together; fp16 is left to DeepSpeed's loss scaler
  (engine/faults.py).

`phase(name)` (optional) wraps each part of the step in a context: "count" (the token-count all-reduce),
"forward", "backward" and "step" per micro-batch, "check" (the fault check and the flags all-reduce).
Benchmarks time the parts (and count collectives in them) through it; training passes nothing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.distributed as dist

from training.engine import faults

IGNORE_INDEX = -100
Phase = Callable[[str], ContextManager]


@dataclass
class StepResult:
    loss: float  # global token-mean MLM loss (+ NSP) of this optimizer step, without the auxiliary losses
    tokens: int  # tokens in this optimizer step, all ranks
    samples: int  # sequences in this optimizer step, all ranks
    bad: bool = False  # some rank's loss or gradient was not finite (agreed by all ranks)
    preempt: bool = False  # some rank got SIGTERM/SIGUSR1 (agreed by all ranks): checkpoint and exit 75
    stop: bool = False  # some rank asked to stop after this step (run.max_wall_s; agreed by all ranks)


def all_reduce_scalars(values: list[float], op=None) -> list[float]:
    """Sum (or `op`) a few Python floats over all ranks; the values as they are in a single process."""
    on_gpu = dist.is_initialized() and dist.get_backend() == "nccl"  # NCCL reduces only device tensors
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if on_gpu else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


def optimizer_step(engine, micro_batches: list[dict], device: torch.device, *, world_size: int, fp16: bool,
                   forward_kwargs: Optional[dict] = None, loss_factor: Optional[float] = None,
                   preempt_requested: bool = False, stop_requested: bool = False,
                   phase: Phase = _no_phase) -> StepResult:
    """One optimizer step over `micro_batches` (grad_accum of them) on a DeepSpeed engine.

    `loss_factor` multiplies the loss (fault injection in tests: NaN); `preempt_requested` and `stop_requested`
    are this rank's pre-emption and stop flags, agreed with the others in the step's flags all-reduce."""
    forward_kwargs = forward_kwargs or {}
    with phase("count"):
        counts = [float((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches]
        samples = float(sum(b["input_ids"].shape[0] for b in micro_batches))
        global_count, global_samples = all_reduce_scalars([sum(counts), samples])
    scale = world_size * len(micro_batches)
    losses, auxiliary = [], []
    for i, batch in enumerate(micro_batches):
        with phase("forward"):
            out = engine(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}, **forward_kwargs)
            weight = out["mlm_count"] / max(global_count, 1.0)
            # The model's auxiliary losses (an add-on's regulariser) train beside the MLM loss, weighted like it
            # (the weights of all micro-batches and ranks sum to 1: each enters the step once); not reported.
            aux = sum(a.float() for a in out.get("aux_losses", {}).values())
            loss = (out["mlm_loss"].float() + aux) * weight
            if "nsp_loss" in out:
                loss = loss + out["nsp_loss"].float() * batch["input_ids"].shape[0] / global_samples
            if loss_factor is not None:
                loss = loss * loss_factor
        with phase("backward"):
            engine.backward(loss * scale)
        losses.append(loss.detach())
        if torch.is_tensor(aux):  # trained on, but not part of the reported MLM loss
            auxiliary.append(aux.detach() * weight)
        if i < len(micro_batches) - 1:
            with phase("step"):
                engine.step()  # inside the accumulation: DeepSpeed only counts the micro-step
    with phase("check"):
        loss_t = torch.stack(losses).sum()
        ok = loss_t.isfinite()
        if not fp16:  # fp16 gradients are scaled; DeepSpeed checks them for overflow itself
            ok = ok & faults.grads_finite(faults.local_grads(engine)).to(ok.device)
        bad, preempt, stop = all_reduce_scalars([0.0 if bool(ok) else 1.0, float(preempt_requested),
                                                 float(stop_requested)], dist.ReduceOp.MAX)
    with phase("step"):
        if bad and not fp16:
            with faults.skipped_step(engine):
                engine.step()
        else:
            engine.step()
    tokens = int(sum(b["input_ids"].numel() for b in micro_batches)) * world_size
    reported = loss_t - torch.stack(auxiliary).sum() if auxiliary else loss_t
    return StepResult(loss=float(reported), tokens=tokens, samples=int(samples) * world_size,
                      bad=bad > 0, preempt=preempt > 0, stop=stop > 0)
