"""Pre-emption: SIGTERM / SIGUSR1 / SIGINT ask the job to checkpoint at the next step boundary and exit 75.

Slurm sends SIGTERM (or, with `#SBATCH --signal=USR1@120`, SIGUSR1 a while before the time limit) before
it kills a job. The handler only sets a flag; the step loop folds the flag into its per-step all-reduce
(MAX), so every rank sees it at the same step, writes the same checkpoint and leaves with
EXIT_REQUEUE (75, EX_TEMPFAIL): "checkpointed after a pre-emption signal; requeue me". The Slurm scripts
requeue on 75, and `--resume` continues the run exactly.

Ctrl-C (SIGINT) is treated the same way: the run checkpoints at the next step and exits 75 with one line; a
second Ctrl-C before that raises KeyboardInterrupt at once, which the entry point turns into one line and exit
130 (training/errors.py).
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Optional

from training.dist import EXIT_REQUEUE  # noqa: F401  (re-exported: the code callers exit with)

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionFlag:
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handler(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            # No logging here: a handler may run while the logging lock is held by the main thread.
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C again: the user will not wait for the checkpoint

    def install(self) -> "PreemptionFlag":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "none"


_flag = PreemptionFlag()


def preemption() -> PreemptionFlag:
    """The process-wide flag (install it once, in the entry point)."""
    return _flag
