"""Debug hooks that inject faults, for tests and fire drills (engine/faults.py says what a fault is).

Environment variables, read once per process:

* DSBERT_FAULT_NAN_AT="STEP[,STEP...][@RANK]": multiply the loss of global step STEP (1-based: the step
  that ends with state.step == STEP) by NaN, on RANK only (default: every rank). Fires once per step per
  process, so a restored run does not hit the same injected fault again.
* DSBERT_FAULT_KILL_IN_SAVE="STEP": SIGKILL this process in the middle of writing the checkpoint of STEP
  (after DeepSpeed wrote its files, before the checkpoint is published).
* DSBERT_FAULT_SLEEP_IN_SAVE="SECONDS": sleep that long at the same point (to signal/kill from outside).
* DSBERT_FAULT_ENOSPC_IN_SAVE="STEP": raise OSError(ENOSPC) at the same point (a disk that filled up).
"""
from __future__ import annotations

import errno
import math
import os
import signal
import time
from typing import Optional


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
