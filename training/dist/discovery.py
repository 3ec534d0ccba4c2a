"""Who am I: rank, world and rendezvous address from whatever launcher started this process.

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
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import subprocess
import sys
from typing import Mapping, Optional

from training.errors import UserError

log = logging.getLogger(__name__)

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
