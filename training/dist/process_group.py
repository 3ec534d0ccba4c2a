"""Initialise the process group (through DeepSpeed) from the discovered launcher, tear it down, and check at
start-up that every rank runs the same config, world size and code."""
from __future__ import annotations

import atexit
import hashlib
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

from training.dist.discovery import DistEnv, discover
from training.errors import UserError

log = logging.getLogger(__name__)

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


def code_version() -> str:
    """Hash of the training package's sources: ranks on nodes with different code disagree."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent  # the training package
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
