"""Restoring the last good checkpoint in-process when the step loop asks for it (engine/faults.py)."""
from __future__ import annotations

import logging

from training.engine import checkpoint_verify
from training.engine.faults import NumericalFault, RestoreRequested

log = logging.getLogger(__name__)


def run_with_recovery(runner, max_restores: int = 3):
    """`runner.run()`, restoring the latest checkpoint in-process when the step loop asks for it.

    Replaying from a checkpoint is deterministic, so a fault that comes from the data or the model comes
    back at the same step; restoring the same checkpoint twice therefore stops the run instead of looping.
    """
    restored: list[str] = []
    while True:
        try:
            return runner.run()
        except RestoreRequested as req:
            tag = checkpoint_verify.latest_tag(runner.ckpt_dir)
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
