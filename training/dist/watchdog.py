"""A dead or frozen rank ends every rank in bounded time, naming it (heartbeats through the rendezvous store)."""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Optional

from training.dist.discovery import DistEnv

# Exit code meaning "checkpointed after a pre-emption signal, please requeue" (EX_TEMPFAIL).
EXIT_REQUEUE = 75


class Watchdog:
    """Heartbeats through the rendezvous TCPStore so a dead peer ends every rank in bounded time.

    Each rank bumps a counter `hb/<rank>` every `interval_s`. Rank 0 watches every rank, the others
    watch rank 0 (and the store itself, which lives in rank 0 except under torchrun): a counter that
    has not moved for `heartbeat_timeout_s` (by the watcher's own clock, so clock skew is harmless)
    means that rank is dead or frozen. The first failure is recorded in the store (`fail/1`) and
    every rank prints `error: ...; exiting` and leaves with os._exit(1) (not sys.exit: the main
    thread may be stuck inside a collective). Hangs between live ranks (mismatched collectives) are
    left to the backend timeout of init_distributed.

    Use as a context manager around training: an exception in the block is recorded so peers stop
    at once (after a communication error it first gives the monitor time to name the peer that
    died); a normal exit, sys.exit(0) or sys.exit(75) is a clean finish, where every rank waits
    (bounded by finish_wait_s, still watching) until all have finished. A process that exits
    without leaving the block counts as failed (atexit), since its peers would otherwise wait for it.
    """

    def __init__(self, env: DistEnv, heartbeat_timeout_s: float = 120.0, *, interval_s: Optional[float] = None,
                 startup_grace_s: Optional[float] = None, finish_wait_s: float = 600.0, store=None, exit_fn=os._exit):
        self.env, self.timeout = env, float(heartbeat_timeout_s)
        self.interval = interval_s or min(5.0, max(0.2, self.timeout / 5))
        # A peer may reach start_watchdog later than we do (slow data loading, imports).
        self.startup_grace = max(self.timeout, startup_grace_s if startup_grace_s is not None else 120.0)
        self.finish_wait, self.exit_fn = finish_wait_s, exit_fn
        self.prefix = f"dsbert_watchdog/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._store, self._lock = store, threading.Lock()
        self._stop, self._state = threading.Event(), "new"  # new -> running -> done | failed
        self._thread: Optional[threading.Thread] = None
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (counter, local time it last changed)

    # -- store helpers (one lock: the main thread and the monitor share one client connection)
    def _op(self, name: str, *args):
        with self._lock:
            return getattr(self._store, name)(self.prefix + args[0], *args[1:])

    def start(self) -> "Watchdog":
        if self.env.world_size == 1 or self._state != "new":
            return self
        if self._store is None:
            import torch.distributed as dist

            self._store = dist.TCPStore(self.env.master_addr, self.env.master_port, None, False,
                                        timedelta(seconds=self.timeout), wait_for_workers=False)
        self._op("add", f"hb/{self.env.rank}", 1)
        self._state, self._started = "running", time.monotonic()
        self._thread = threading.Thread(target=self._run, name="dist-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self._atexit)
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._op("add", f"hb/{self.env.rank}", 1)
                if self._op("add", "nfail", 0) > 0:
                    return self._die(self._op("get", "fail/1").decode(), ack=True)
                watched = range(1, self.env.world_size) if self.env.is_main else [0]
                for rank in watched:
                    self._check(rank)
                    if self._state != "running":
                        return
            except Exception as err:  # the store lives in rank 0: unreachable means rank 0 is gone
                if self._stop.is_set():
                    return
                if self.env.is_main:
                    return self._die(f"rank 0 lost its rendezvous store ({_one_line(err)})")
                where = f"{self.env.master_addr}:{self.env.master_port}"
                return self._die(f"rank 0 stopped responding (store {where} unreachable: {_one_line(err)})")

    def _check(self, rank: int) -> None:
        now, value = time.monotonic(), self._op("add", f"hb/{rank}", 0)
        last_value, since = self._seen.get(rank, (0, self._started))
        if value != last_value:
            self._seen[rank] = (value, now)
            return
        limit = self.timeout if value > 0 else self.startup_grace
        if now - since > limit and self._op("add", f"done/{rank}", 0) == 0:
            what = f"last heartbeat {now - since:.0f}s ago" if value else f"no heartbeat in {now - since:.0f}s"
            self._record(f"rank {rank} stopped responding ({what})", readers=self.env.world_size - 2)
            self._die(f"rank {rank} stopped responding ({what})")

    def _record(self, text: str, readers: int) -> None:
        """Publish the first failure (peers report the first one recorded)."""
        index = self._op("add", "nfail", 1)
        self._op("set", f"fail/{index}", text)
        if self.env.is_main:  # keep the store alive until the `readers` live peers have read why
            deadline = time.monotonic() + 2 * self.interval + 2
            while time.monotonic() < deadline and self._op("add", "acks", 0) < readers:
                time.sleep(0.1)

    def _die(self, text: str, ack: bool = False) -> None:
        self._state = "failed"
        if ack:
            try:
                self._op("add", "acks", 1)
            except Exception:
                pass
        print(f"error: {text}; exiting", file=sys.stderr, flush=True)
        sys.stdout.flush()
        self.exit_fn(1)

    def fail(self, reason: str) -> None:
        """This rank is going down with `reason`: tell the others so they stop now."""
        if self._state != "running":
            return
        self._state = "failed"
        self._stop.set()
        try:
            if self._op("add", "nfail", 0) == 0:
                self._record(f"rank {self.env.rank} failed: {reason}", readers=self.env.world_size - 1)
        except Exception:
            pass

    def stop(self) -> None:
        """Clean finish: a soft barrier (still watching) so no rank leaves while others still work.

        Launchers kill the remaining ranks as soon as one exits non-zero (DeepSpeed's on any code,
        e.g. 75 after a pre-emption checkpoint), and rank 0 hosts the store; leaving together
        avoids both problems.
        """
        if self._state != "running":
            return
        self._op("add", f"done/{self.env.rank}", 1)
        self._op("add", "ndone", 1)
        deadline = time.monotonic() + self.finish_wait
        while self._state == "running":
            try:
                finished, failed = self._op("add", "ndone", 0), self._op("add", "nfail", 0)
            except Exception:  # rank 0 only leaves once everyone is done
                break
            if failed:
                self._stop.set()
                self._die(self._op("get", "fail/1").decode(), ack=True)
            if finished >= self.env.world_size:
                self._linger_until_peers_left()
                break
            if time.monotonic() > deadline:
                print(f"warning: rank {self.env.rank} finished; gave up waiting for the other ranks "
                      f"after {self.finish_wait:.0f}s", file=sys.stderr, flush=True)
                break
            time.sleep(0.1)
        self._state = "done"
        self._stop.set()

    def _linger_until_peers_left(self) -> None:
        """Rank 0 hosts the store: leave only after the others read "all done" (bounded)."""
        if not self.env.is_main:
            self._op("add", "nleft", 1)
            return
        deadline = time.monotonic() + 2 * self.interval + 2
        while self._op("add", "nleft", 0) < self.env.world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.05)

    def _wait_for_verdict(self) -> None:
        """A collective failed here: usually a peer died. Let the monitor name it (bounded)."""
        deadline = time.monotonic() + self.timeout + 3 * self.interval
        while time.monotonic() < deadline and self._state == "running" and self._thread.is_alive():
            time.sleep(0.1)

    def _atexit(self) -> None:
        self.fail("exited without finishing the run (sys.exit or an error outside the watchdog block)")

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or (exc_type is SystemExit and exc.code in (0, None, EXIT_REQUEUE)):
            self.stop()
            return
        if self._state == "running" and _is_comm_error(exc):
            self._wait_for_verdict()
        self.fail(f"{exc_type.__name__}: {_one_line(exc)}")


def _is_comm_error(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(w in text for w in ("gloo", "nccl", "connection", "peer"))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else repr(exc))[:300]


def start_watchdog(env: DistEnv, heartbeat_timeout_s: float = 120.0, **kwargs) -> Watchdog:
    """Start heartbeating now; returns the Watchdog (also usable as `with start_watchdog(...):`)."""
    return Watchdog(env, heartbeat_timeout_s, **kwargs).start()
