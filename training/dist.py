"""Launch anywhere: find rank/world from whatever started us, initialise DeepSpeed, fail fast.

Supported launchers (`DistEnv.launcher`), checked in this order (first match wins):

1. explicit env:// variables RANK and WORLD_SIZE (+ LOCAL_RANK, MASTER_ADDR, MASTER_PORT):
   'torchrun' when TORCHELASTIC_RUN_ID is set, 'deepspeed' when the DeepSpeed launcher's
   CROSS_RANK is set (it also passes --local_rank), otherwise 'torchrun' (same convention).
   Setting these by hand therefore overrides every other detection.
2. Slurm task started by `srun` (SLURM_PROCID + SLURM_STEP_ID): 'slurm'. Master = first host of
   the step's node list (`scontrol show hostnames`), port = 15000 + job id % 15000 unless
   MASTER_PORT is set. The sbatch batch step itself (no srun) is treated as a single process.
   MPI rank variables that disagree with Slurm's (mpirun inside an allocation) win.
3. MPI (OMPI_COMM_WORLD_*, PMI_RANK/PMI_SIZE + MPI_LOCALRANKID from MPICH/Intel MPI, or
   mpi4py's COMM_WORLD when only PMIX_RANK is set): 'mpi'. Without MASTER_ADDR/MASTER_PORT,
   rank 0 broadcasts its address and a free port through mpi4py.
4. nothing: 'single' (world 1, 127.0.0.1, a free port).

Also here: check_consistent (ranks agree on config/world size/code at start-up) and Watchdog /
start_watchdog (a dead or frozen rank ends all ranks in bounded time, naming it).
"""
from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Mapping, Optional

from training.errors import UserError

log = logging.getLogger(__name__)

LAUNCHERS = ("deepspeed", "torchrun", "slurm", "mpi", "single")
# Exit code meaning "checkpointed after a pre-emption signal, please requeue" (EX_TEMPFAIL).
EXIT_REQUEUE = 75
# Ports derived from a Slurm job id stay below Linux's ephemeral range (32768+), so they do not
# collide with outgoing connections, and above the common service ports.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 15000


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# ---------------------------------------------------------------- discovery


def discover(environ: Optional[Mapping[str, str]] = None, argv: Optional[list[str]] = None) -> DistEnv:
    """Work out this process's place in the job from the launcher's environment (see module doc)."""
    e = dict(os.environ if environ is None else environ)
    argv = sys.argv if argv is None else argv
    if "RANK" in e and "WORLD_SIZE" in e:
        return _from_env_vars(e, argv)
    mpi = _mpi_env_rank_size(e)
    if "SLURM_PROCID" in e and "SLURM_STEP_ID" in e and not _slurm_batch_step(e):
        slurm = _from_slurm(e)
        # srun --mpi=pmi2/pmix also exports PMI ranks, which then agree with Slurm's. mpirun run
        # inside an allocation starts its proxies with srun, so each rank inherits the proxy's
        # SLURM_PROCID (a node index): there the MPI variables are the truth.
        if mpi is None or mpi == (slurm.rank, slurm.world_size):
            return slurm
    if mpi is None and e.get("PMIX_RANK"):  # PMIx exports no size: ask MPI itself.
        comm = _mpi_comm()
        mpi = comm.Get_rank(), comm.Get_size()
    if mpi is not None:
        return _from_mpi(e, *mpi)
    return DistEnv(0, 1, 0, 1, "127.0.0.1", int(e.get("MASTER_PORT") or free_port()), "single")


def _int(e: Mapping[str, str], *names: str, default: Optional[int] = None) -> Optional[int]:
    for name in names:
        if e.get(name, "").strip():
            return int(e[name])
    return default


def _argv_local_rank(argv: list[str]) -> Optional[int]:
    for i, arg in enumerate(argv):
        m = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", arg)
        if m:
            value = m.group(1) or (argv[i + 1] if i + 1 < len(argv) else "")
            return int(value) if value.isdigit() else None
    return None


def _from_env_vars(e: dict, argv: list[str]) -> DistEnv:
    rank, world = int(e["RANK"]), int(e["WORLD_SIZE"])
    local_rank = _int(e, "LOCAL_RANK", default=_argv_local_rank(argv))
    local_world = _int(e, "LOCAL_WORLD_SIZE", "LOCAL_SIZE", default=world)
    if local_rank is None:
        local_rank = rank % local_world
    if "TORCHELASTIC_RUN_ID" in e:
        launcher = "torchrun"
    elif "CROSS_RANK" in e or _argv_local_rank(argv) is not None:
        launcher = "deepspeed"
    else:
        launcher = "torchrun"
    addr = e.get("MASTER_ADDR") or _single_node_addr(world, local_world)
    return DistEnv(rank, world, local_rank, local_world, addr, int(e.get("MASTER_PORT") or 29500), launcher)


def _single_node_addr(world: int, local_world: int) -> str:
    if world == local_world:
        return "127.0.0.1"
    raise UserError("MASTER_ADDR is not set and the job spans several nodes: export MASTER_ADDR=<rank 0 host>")


def _slurm_batch_step(e: Mapping[str, str]) -> bool:
    # Inside the batch script itself (no srun) Slurm still exports SLURM_PROCID=0 and the job's
    # task count; only an srun step sets SLURM_STEP_NUM_TASKS. Treating the batch step as a job
    # of SLURM_NTASKS processes would wait forever for peers that were never started.
    return "SLURM_STEP_NUM_TASKS" not in e or e.get("SLURM_STEP_ID") in ("batch", "4294967294", "extern")


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compact task counts, e.g. '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise ValueError(f"cannot parse Slurm tasks-per-node {spec!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: `scontrol show hostnames`, or a parser where it is absent."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # 'gpu[003-005,9],cpu1' -> 'gpu003': the first entry and the first number of its range.
    m = re.match(r"([^,\[]+)(?:\[([^\]\-,]+))?", nodelist.strip())
    if not m:
        raise UserError(f"cannot read the Slurm node list {nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def slurm_port(job_id: str) -> int:
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


def _from_slurm(e: dict) -> DistEnv:
    rank = int(e["SLURM_PROCID"])
    world = _int(e, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", default=1)
    local_rank = _int(e, "SLURM_LOCALID", default=0)
    per_node = e.get("SLURM_STEP_TASKS_PER_NODE") or e.get("SLURM_TASKS_PER_NODE")
    if per_node:
        counts = expand_tasks_per_node(per_node)
        local_world = counts[min(_int(e, "SLURM_NODEID", default=0), len(counts) - 1)]
    else:
        local_world = _int(e, "SLURM_NTASKS_PER_NODE", default=world)
    addr = e.get("MASTER_ADDR") or first_host(e.get("SLURM_STEP_NODELIST") or e["SLURM_JOB_NODELIST"])
    port = int(e.get("MASTER_PORT") or slurm_port(e.get("SLURM_JOB_ID", "0")))
    return DistEnv(rank, world, local_rank, local_world, addr, port, "slurm")


def _mpi_env_rank_size(e: Mapping[str, str]) -> Optional[tuple[int, int]]:
    for r, s in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if e.get(r) and e.get(s):
            return int(e[r]), int(e[s])
    return None


def _mpi_comm():
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise UserError(f"started by an MPI launcher but mpi4py is unusable ({err}); "
                        "export MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE instead") from err
    return MPI.COMM_WORLD


def _from_mpi(e: dict, rank: int, world: int) -> DistEnv:
    local_rank = _int(e, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMIX_LOCAL_RANK")
    local_world = _int(e, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMIX_LOCAL_SIZE")
    addr, port = e.get("MASTER_ADDR"), e.get("MASTER_PORT")
    if local_rank is None or local_world is None or not addr or not port:
        comm = _mpi_comm()
        if local_rank is None or local_world is None:
            from mpi4py import MPI
            node = comm.Split_type(MPI.COMM_TYPE_SHARED)
            local_rank, local_world = node.Get_rank(), node.Get_size()
        if not addr or not port:
            # Rank 0 decides; a single-node job uses loopback because Debian-style hostnames
            # resolve to 127.0.1.1, which other nodes cannot reach but local ranks can.
            mine = None
            if rank == 0:
                mine = (addr or ("127.0.0.1" if local_world == world else socket.getfqdn()),
                        port or str(free_port()))
            addr, port = comm.bcast(mine, root=0)
    return DistEnv(rank, world, local_rank, local_world, addr, int(port), "mpi")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def add_launcher_args(parser) -> None:
    """Accept the `--local_rank N` that the DeepSpeed launcher appends to our command line."""
    import argparse

    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


# ---------------------------------------------------------------- initialisation

# Environment variables init_distributed overwrote, with their previous values (None: were unset).
_exported: dict[str, Optional[str]] = {}
_atexit_registered = False


def init_distributed(timeout_s: float = 1800, backend: Optional[str] = None) -> DistEnv:
    """Discover the launcher, export the env:// variables and initialise DeepSpeed's comms."""
    import torch

    env = discover()
    exports = dict(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                   LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                   MASTER_PORT=str(env.master_port))
    _exported.update({k: os.environ.get(k) for k in exports if k not in _exported})
    os.environ.update(exports)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend or ("nccl" if cuda else "gloo"), auto_mpi_discovery=False,
                               timeout=timedelta(seconds=timeout_s), verbose=False)
    # Exiting (e.g. sys.exit(2) on a UserError) with a live process group aborts the interpreter
    # (SIGABRT, "terminate called without an active exception"): tear it down first.
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(shutdown)
        _atexit_registered = True
    line = (f"distributed: launcher={env.launcher} rank={env.rank} world_size={env.world_size} "
            f"local_rank={env.local_rank} local_world_size={env.local_world_size} "
            f"master={env.master_addr}:{env.master_port} backend={backend or ('nccl' if cuda else 'gloo')}")
    if env.is_main:  # printed: callers usually configure logging only after this returns
        print(line, file=sys.stderr, flush=True)
    log.debug(line)
    return env


def shutdown() -> None:
    """Destroy the process group and undo init_distributed's exports (idempotent), so a later
    init_distributed in the same process (tests) starts clean. Through DeepSpeed when it is loaded,
    so that its cached process groups are released too."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm.comm")
        if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
    for key, value in list(_exported.items()):
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
        del _exported[key]


def config_hash(config) -> str:
    """Stable hash of a resolved config (pydantic model, dict, ...)."""
    if hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version() -> str:
    """Hash of the training package's sources: ranks on nodes with different code disagree."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


def check_consistent(config_hash: str, world_size: Optional[int] = None, code: Optional[str] = None) -> None:
    """All ranks must agree on config hash, world size and code version; else UserError on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    mine = {"config hash": config_hash, "world size": world_size or int(os.environ.get("WORLD_SIZE", 0)),
            "code version": code or code_version()}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    problems = []
    for key in mine:
        groups: dict = {}
        for rank, info in enumerate(everyone):
            groups.setdefault(info[key], []).append(rank)
        if len(groups) > 1:
            problems.append(f"{key}: " + "; ".join(
                f"{_ranks(r)} {'has' if len(r) == 1 else 'have'} {v}" for v, r in groups.items()))
    if problems:
        raise UserError("ranks disagree at start-up (same config and code on every node?): " + " | ".join(problems))


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


# ---------------------------------------------------------------- watchdog


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
