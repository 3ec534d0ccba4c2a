"""training.dist: launcher discovery, start-up consistency check, the dead-peer watchdog."""
from __future__ import annotations

import time

import pytest

from training import dist as tdist
from training.dist import discovery
from training.errors import UserError


def fake_scontrol(tmp_path, hosts=("node7", "node8")) -> str:
    """A PATH holding only a fake `scontrol show hostnames` printing `hosts`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\nprintf '%s\\n' " +
                      " ".join(hosts) + "\n")
    script.chmod(0o755)
    return str(bin_dir)


# ---------------------------------------------------------------- discover()


def test_single_process_defaults():
    env = tdist.discover({}, argv=["x"])
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert env.launcher == "single" and env.master_addr == "127.0.0.1" and 0 < env.master_port < 65536


def test_torchrun():
    env = tdist.discover({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                          "MASTER_ADDR": "h0", "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "abc"}, argv=["x"])
    assert env == tdist.DistEnv(3, 4, 1, 2, "h0", 1234, "torchrun")


def test_deepspeed_launcher_env_and_local_rank_arg():
    e = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
         "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"}
    env = tdist.discover(e, argv=["-m", "training.pretrain", "--local_rank=1", "--config", "c.yaml"])
    assert env == tdist.DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, "deepspeed")
    assert tdist.discover(dict(e, LOCAL_RANK="1"), argv=["x"]).local_rank == 1
    assert tdist.discover({k: v for k, v in e.items() if not k.startswith(("CROSS", "LOCAL"))},
                          argv=["x", "--local_rank", "1"]).launcher == "deepspeed"


def test_manual_env_multi_node_needs_master_addr():
    with pytest.raises(UserError, match="MASTER_ADDR"):
        tdist.discover({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, argv=["x"])
    assert tdist.discover({"RANK": "0", "WORLD_SIZE": "2"}, argv=["x"]).master_addr == "127.0.0.1"


def slurm_step(**over) -> dict:
    e = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8",
         "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
         "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_STEP_NODELIST": "node[7-8]"}
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


def test_slurm_step(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_scontrol(tmp_path))
    env = tdist.discover(slurm_step(), argv=["x"])
    assert env == tdist.DistEnv(5, 8, 1, 4, "node7", 15000 + 123456 % 15000, "slurm")


@pytest.mark.parametrize("job_id", ["1", "14999", "15000", "29999", "123456789"])
def test_slurm_port_range(job_id):
    port = tdist.slurm_port(job_id)
    assert tdist.SLURM_PORT_BASE <= port < 32768  # below Linux's ephemeral range
    assert port == tdist.slurm_port(job_id)  # every task derives the same port


def test_slurm_master_port_override_and_uneven_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_scontrol(tmp_path))
    env = tdist.discover(slurm_step(MASTER_PORT="4242", SLURM_NODEID="3", SLURM_STEP_TASKS_PER_NODE="2(x3),1",
                                    SLURM_STEP_NUM_TASKS="7", SLURM_PROCID="6", SLURM_LOCALID="0"), argv=["x"])
    assert (env.master_port, env.local_world_size, env.world_size) == (4242, 1, 7)


def test_slurm_without_scontrol_parses_nodelist(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol at all
    env = tdist.discover(slurm_step(SLURM_STEP_NODELIST="gpu[003-005,9],cpu1"), argv=["x"])
    assert env.master_addr == "gpu003"
    assert tdist.first_host("single-node") == "single-node"


def test_slurm_batch_step_is_single_process():
    # The batch script itself (no srun) has SLURM_PROCID=0 and SLURM_NTASKS=8 but no step.
    e = slurm_step(SLURM_STEP_ID=None, SLURM_STEP_NUM_TASKS=None, SLURM_PROCID="0")
    assert tdist.discover(e, argv=["x"]).launcher == "single"


def test_explicit_rank_beats_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_scontrol(tmp_path))
    e = slurm_step(RANK="2", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="a", MASTER_PORT="1", CROSS_RANK="0")
    env = tdist.discover(e, argv=["x"])
    assert (env.launcher, env.rank, env.world_size) == ("deepspeed", 2, 4)


def test_openmpi_env():
    e = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
         "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "2000"}
    assert tdist.discover(e, argv=["x"]) == tdist.DistEnv(3, 4, 1, 2, "n1", 2000, "mpi")


class FakeComm:
    """mpi4py COMM_WORLD stand-in: bcast returns what rank 0 would send."""

    def __init__(self, root_value=None):
        self.root_value = root_value

    def bcast(self, value, root=0):
        return value if value is not None else self.root_value


def test_mpich_env_broadcasts_master_from_rank0(monkeypatch):
    e = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
    monkeypatch.setattr(discovery, "_mpi_comm", lambda: FakeComm())
    env0 = tdist.discover(e, argv=["x"])
    assert (env0.launcher, env0.rank, env0.world_size, env0.master_addr) == ("mpi", 0, 2, "127.0.0.1")
    monkeypatch.setattr(discovery, "_mpi_comm", lambda: FakeComm(("127.0.0.1", str(env0.master_port))))
    env1 = tdist.discover(dict(e, PMI_RANK="1", MPI_LOCALRANKID="1"), argv=["x"])
    assert (env1.rank, env1.local_rank, env1.master_port) == (1, 1, env0.master_port)


def test_mpi_multi_node_uses_rank0_hostname(monkeypatch):
    e = {"PMI_RANK": "0", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2", "MASTER_PORT": "7"}
    monkeypatch.setattr(discovery, "_mpi_comm", lambda: FakeComm())
    monkeypatch.setattr(tdist.socket, "getfqdn", lambda: "node1.cluster")
    assert tdist.discover(e, argv=["x"]).master_addr == "node1.cluster"


def test_mpirun_inside_slurm_allocation_trusts_mpi(tmp_path, monkeypatch):
    # mpirun's proxies run as one srun task per node: ranks inherit the proxy's SLURM_PROCID.
    monkeypatch.setenv("PATH", fake_scontrol(tmp_path))
    e = slurm_step(SLURM_PROCID="1", SLURM_STEP_NUM_TASKS="2", PMI_RANK="5", PMI_SIZE="8",
                   MPI_LOCALRANKID="1", MPI_LOCALNRANKS="4", MASTER_ADDR="node7", MASTER_PORT="9")
    env = tdist.discover(e, argv=["x"])
    assert (env.launcher, env.rank, env.world_size, env.local_world_size) == ("mpi", 5, 8, 4)
    # srun --mpi=pmi2 exports PMI ranks that agree with Slurm's: that is still a Slurm launch.
    agree = slurm_step(PMI_RANK="5", PMI_SIZE="8")
    assert tdist.discover(agree, argv=["x"]).launcher == "slurm"


def test_tasks_per_node_parser():
    assert tdist.expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert tdist.expand_tasks_per_node("8") == [8]


# ---------------------------------------------------------------- multi-process helpers


def _pair_of_watchdogs(timeout: float = 1.0):
    """Ranks 0 and 1 in this process, sharing an in-memory store; exit_fn records instead of exiting."""
    import torch.distributed as dist

    store, exits = dist.HashStore(), []
    dogs = [tdist.Watchdog(tdist.DistEnv(r, 2, r, 2, "127.0.0.1", 1, "single"), timeout, interval_s=0.1,
                           startup_grace_s=0, store=store, exit_fn=lambda code, r=r: exits.append((r, code)))
            for r in (0, 1)]
    return dogs, exits


def test_watchdog_unit_stale_heartbeat_is_reported_once(capsys):
    (rank0, rank1), exits = _pair_of_watchdogs()
    rank0.start(), rank1.start()
    rank1._stop.set()  # rank 1 "dies": its heartbeats stop, nothing is recorded
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits == [(0, 1)]
    assert "error: rank 1 stopped responding (last heartbeat 1s ago); exiting" in capsys.readouterr().err
    rank0._stop.set()


def test_watchdog_unit_clean_finish_and_failure_marker(capsys):
    import threading

    (rank0, rank1), exits = _pair_of_watchdogs()
    rank0.start(), rank1.start()
    time.sleep(0.3)
    stopping = threading.Thread(target=rank1.stop)  # stop() is a soft barrier: the ranks leave together
    stopping.start()
    time.sleep(1.5)  # longer than the heartbeat timeout: a finished rank is not "dead"
    assert stopping.is_alive() and rank1._state == "running"
    rank0.stop()
    stopping.join(5)
    assert exits == [] and rank0._state == rank1._state == "done"

    (rank0, rank1), exits = _pair_of_watchdogs(timeout=30)
    rank0.start(), rank1.start()
    with pytest.raises(ValueError):
        with rank1:
            raise ValueError("bad shard\nsecond line")
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits == [(0, 1)]  # well before the 30 s heartbeat timeout
    assert "error: rank 1 failed: ValueError: bad shard; exiting" in capsys.readouterr().err
