"""Process groups of real processes: the config digest check across ranks, a clean two-rank run, the watchdog
naming a dead or frozen rank."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import paths as PATHS
from training import dist as tdist

REPO = PATHS.REPO


def _env_for(rank: int, world: int, port: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "MPI_"))}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO))
    return env


def start_pair(tmp_path, *job_args: str, heartbeat: float = 5.0, per_rank=((), ())):
    """Two stand-in jobs as ranks 0 and 1 (explicit env:// variables); logs in tmp_path/rankN.log."""
    port = tdist.free_port()
    procs = []
    for rank in (0, 1):
        log = open(tmp_path / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.launch", "--out", str(tmp_path / "out"),
             "--heartbeat-timeout", str(heartbeat), *job_args, *per_rank[rank]],
            env=_env_for(rank, 2, port), cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_all(procs, limit_s: float) -> list[int]:
    deadline = time.monotonic() + limit_s
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes


def test_check_consistent_names_the_ranks_that_differ(tmp_path):
    # Equal hashes pass check_consistent: test_clean_two_rank_run.
    codes = wait_all(start_pair(tmp_path, per_rank=((), ("--config-tag", "other"))), 60)
    assert codes == [2, 2]  # a UserError on every rank, not a hang
    for rank in (0, 1):
        log = (tmp_path / f"rank{rank}.log").read_text()
        assert "error: ranks disagree at start-up" in log and "config hash: rank 0 has" in log, log
        assert "; rank 1 has" in log and "world size" not in log, log


def test_clean_two_rank_run(tmp_path):
    codes = wait_all(start_pair(tmp_path, "--steps", "5"), 60)
    assert codes == [0, 0], (tmp_path / "rank0.log").read_text()
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text() == "5"


@pytest.mark.parametrize("dead, mode, expect", [
    (1, "exit", "error: rank 1 stopped responding (last heartbeat"),
    (0, "exit", "error: rank 0 stopped responding"),
    (1, "raise", "error: rank 1 failed: RuntimeError: boom on purpose; exiting"),
    (0, "raise", "error: rank 0 failed: RuntimeError: boom on purpose; exiting"),
])
def test_watchdog_ends_peers_naming_the_failed_rank(tmp_path, dead, mode, expect):
    procs = start_pair(tmp_path, "--steps", "1000", "--step-sleep", "0.05", "--die-rank", str(dead),
                       "--die-step", "5", "--die-mode", mode)
    t0 = time.monotonic()
    codes = wait_all(procs, 30)
    survivor = 1 - dead
    log = (tmp_path / f"rank{survivor}.log").read_text()
    assert expect in log, log
    assert codes[survivor] == 1 and time.monotonic() - t0 < 30


def test_watchdog_catches_a_frozen_rank(tmp_path):
    procs = start_pair(tmp_path, "--steps", "1000", "--step-sleep", "0.05", "--die-rank", "1",
                       "--die-step", "5", "--die-mode", "freeze")
    try:
        assert procs[0].wait(timeout=30) == 1
    finally:
        procs[1].send_signal(signal.SIGKILL)
        wait_all(procs, 10)
    log = (tmp_path / "rank0.log").read_text()
    assert "error: rank 1 stopped responding (last heartbeat" in log, log
