"""Across nodes for real: two hosts made of network namespaces (tests/helpers/netns.py), launchers across them.

Every other launcher test runs its ranks on one host over loopback. Here node1 and node2 are separate
network namespaces on a bridge (data interface d0), each with a second interface (m0) that the other node
cannot reach, and each node's own name resolving to that second interface: a rank that picks its
interface from the host name (gloo's default) picks the wrong one and cannot be reached. The job is
`training.pretrain` on the tiny config, 2 ranks per node, 4 in all, with GLOO_SOCKET_IFNAME=d0 (the
README's advice); its losses are compared with a one-host 4-rank run of the same config (same global
batch): bit for bit, since gloo reduces in the same order whichever host a rank is on.

Covered: the interface pick (gloo by host name fails, GLOO_SOCKET_IFNAME=d0 works), torchrun c10d
multi-node, mpirun -hosts (Hydra over ssh), slurm/pretrain.sbatch and slurm/pretrain_deepspeed.sbatch
(pdsh over ssh) on a two-node Slurm cluster, and a node dying (on two namespaces of their own, since
they kill everything on node2): under torchrun, then --resume by hand; under Slurm, NODE_FAIL, requeue,
node2 back, the job resumes by itself. Not covered: requeue onto a *different* node (a third namespace).

Needs root, iproute2 and util-linux (skips otherwise); the Slurm tests also need Debian's slurm-wlm and
munge, the ssh ones openssh-server and pdsh: installed with apt-get on first use, like tests/helpers/launch.py.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.launch import install_slurm, slurm_unavailable_reason
from tests.helpers.netns import (DATA_IF, MGMT_NET, NetnsCluster, NetnsSlurmCluster, SshNodes,  # noqa: F401
                                  install_ssh,
                                  netns_cluster, ssh_unavailable_reason)
from tests.integration.test_launchers import REPO, Job, clean_env

pytestmark = [pytest.mark.slow, pytest.mark.launchers]

MICRO = 2  # per rank; 4 ranks: global batch 8, as the tiny config's one process with micro-batch 8
RDZV_PORT = 29400  # any port: nothing else listens inside the namespaces
VENV_BIN = str(Path(sys.executable).parent)


def node_env(**extra: str) -> dict:
    env = clean_env(**{"GLOO_SOCKET_IFNAME": DATA_IF, **extra})
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    return {k: v for k, v in env.items() if v is not None}


@pytest.fixture(scope="module")
def job(tiny_data) -> Job:
    # No dropout: it is seeded per rank.
    return Job("training.pretrain", "configs/tiny.yaml",
               [f"data.dir={tiny_data}", "run.export_hf=false", "model.dropout=0", "model.attention_dropout=0"], [])


def train_losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r and r.get("kind", "train") == "train"]


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory) -> list[tuple[int, float]]:
    """One host, 4 ranks (torchrun --nproc-per-node 4, loopback): the losses the 2-node runs must match."""
    out = tmp_path_factory.mktemp("reference4") / "out"
    env = node_env()
    env.pop("GLOO_SOCKET_IFNAME")
    from training.dist import free_port

    proc = subprocess.run([shutil.which("torchrun", path=env["PATH"]) or "torchrun", "--nproc-per-node", "4",
                           "--master-port", str(free_port()), "-m", job.module, *job.args(out, MICRO)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return train_losses(out)


def start_torchrun(net, node: str, job: Job, out: Path, log: Path, extra=(), env=None, run_id="t"):
    cmd = ["torchrun", "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"node1:{RDZV_PORT}", "--rdzv-id", run_id,
           "-m", job.module, *job.args(out, MICRO), *extra]
    return net.popen(node, cmd, cwd=REPO, env=env or node_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_all(procs: dict, logs: dict, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    codes = {}
    for node, proc in procs.items():
        try:
            codes[node] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{node} still running after {timeout_s}s:\n" + tails(logs))
    return codes


def tails(logs: dict, n: int = 4000) -> str:
    return "\n".join(f"== {node}\n{Path(p).read_text()[-n:]}" for node, p in logs.items())


# ---------------------------------------------------------------- 4: interface choice


def test_readme_and_slurm_script_name_the_interface_variables():
    readme = (REPO / "README.md").read_text()
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        assert var in readme, f"README.md does not say that {var} picks the network interface"
        assert var in (REPO / "slurm" / "common.sh").read_text(), f"slurm/common.sh does not pass {var} through"
    assert "SOCKET_IFNAME" in (REPO / "slurm" / "pretrain.sbatch").read_text()


PROBE = """
import os, sys, torch, torch.distributed as dist
from datetime import timedelta
dist.init_process_group("gloo", timeout=timedelta(seconds=8))
t = torch.ones(1)
dist.all_reduce(t)
print("sum", t.item(), flush=True)
dist.destroy_process_group()  # exiting with a live group aborts the interpreter
"""


def test_wrong_interface_shows_and_gloo_socket_ifname_fixes_it(netns_cluster, tmp_path):  # noqa: F811
    """Plain gloo, one rank per node: by host name a rank binds to the unreachable m0 (the other side then
    fails at once); with GLOO_SOCKET_IFNAME=d0 both connect."""
    def attempt(tag: str, **extra):
        procs, logs = {}, {}
        for rank, node in enumerate(netns_cluster.nodes):
            env = node_env(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="node1", MASTER_PORT=str(RDZV_PORT), **extra)
            if not extra:
                env.pop("GLOO_SOCKET_IFNAME")
            logs[node] = tmp_path / f"{tag}-{node}.log"
            procs[node] = netns_cluster.popen(node, [sys.executable, "-c", PROBE], env=env, cwd=REPO,
                                              stdout=open(logs[node], "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        # The side that cannot connect fails at once; its peer would wait for gloo's connect timeout.
        while any(p.poll() is None for p in procs.values()) and not any(p.poll() for p in procs.values()):
            assert time.monotonic() < deadline, tails(logs)
            time.sleep(0.1)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        return {node: p.returncode for node, p in procs.items()}, "\n".join(Path(p).read_text() for p in logs.values())

    codes, out = attempt("default")
    assert any(codes.values()), f"gloo connected without GLOO_SOCKET_IFNAME: the wrong pick did not show\n{out}"
    assert re.search(r"Network is unreachable|No route to host", out), out[-4000:]
    codes, out = attempt("d0", GLOO_SOCKET_IFNAME=DATA_IF)
    assert codes == {"node1": 0, "node2": 0}, out[-4000:]
    assert out.count("sum 2.0") == 2, out[-4000:]


# ---------------------------------------------------------------- 2: torchrun multi-node


def test_torchrun_two_nodes_matches_one_node(netns_cluster, job, reference, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    logs = {n: tmp_path / f"{n}.log" for n in netns_cluster.nodes}
    procs = {n: start_torchrun(netns_cluster, n, job, out, logs[n]) for n in netns_cluster.nodes}
    codes = wait_all(procs, logs, 300)
    assert codes == {"node1": 0, "node2": 0}, tails(logs)
    log1 = logs["node1"].read_text()
    assert "launcher=torchrun rank=0 world_size=4 local_rank=0 local_world_size=2 master=node1:" in log1, log1[-4000:]
    assert train_losses(out) == reference  # bit for bit
    assert (out / "checkpoints" / "latest").is_file()


@pytest.fixture(scope="module")
def ssh_nodes(netns_cluster):  # noqa: F811
    reason = ssh_unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        install_ssh()
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"could not install openssh-server and pdsh with apt-get: {err}")
    root = Path(tempfile.mkdtemp(prefix="ssh-netns-"))
    try:
        with SshNodes(root, netns_cluster) as nodes:
            yield nodes
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_mpirun_two_hosts_matches_one_node(netns_cluster, ssh_nodes, job, reference, tmp_path):  # noqa: F811
    """The README's MPICH command (Hydra over ssh), plus `-iface d0`: MPI's own start-up traffic (mpi4py
    sends rank 0's address) otherwise tries the unreachable interface first (~100 s here instead of ~20)."""
    out = tmp_path / "out"
    env = node_env()
    env["PATH"] = f"{ssh_nodes.bin}{os.pathsep}{env['PATH']}"
    if not shutil.which("mpirun", path=env["PATH"]):
        pytest.skip("mpirun is not installed")
    cmd = ["mpirun", "-iface", DATA_IF, "-n", "4", "-ppn", "2", "-hosts", "node1,node2",
           "python", "-m", job.module, *job.args(out, MICRO)]
    proc = netns_cluster.run("node1", cmd, env=env, cwd=REPO, check=False, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "launcher=mpi rank=0 world_size=4 local_rank=0 local_world_size=2 master=node1:" in log, log[-4000:]
    assert train_losses(out) == reference  # bit for bit


# ---------------------------------------------------------------- 3: a node dies


@pytest.fixture
def own_cluster(netns_cluster):  # noqa: F811
    """Two fresh nodes for a test that kills everything on one (the shared cluster's sshd and slurmd live on)."""
    net = NetnsCluster(tag=f"{netns_cluster.tag}-{os.urandom(2).hex()}")
    with net:
        yield net


def test_node_dies_others_exit_then_resume(own_cluster, job, tmp_path):
    """SIGKILL every process of node2 mid-run: node1's ranks name a dead rank and exit non-zero within the
    watchdog bound; `--resume` on both nodes continues from the last checkpoint."""
    netns_cluster = own_cluster
    heartbeat, total, every = 5.0, 100, 30
    job = Job(job.module, job.config,
              job.sets + [f"train.max_steps={total}", f"run.save_every={every}",
                          f"dist.heartbeat_timeout_s={heartbeat}"], job.extra)
    out = tmp_path / "out"
    logs = {n: tmp_path / f"{n}.log" for n in netns_cluster.nodes}
    procs = {n: start_torchrun(netns_cluster, n, job, out, logs[n], run_id="die") for n in netns_cluster.nodes}
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    saved = 0
    while True:
        assert all(p.poll() is None for p in procs.values()) and time.monotonic() < deadline, \
            "the run ended (or stalled) before its first checkpoint:\n" + tails(logs)
        steps = [s for s, _ in train_losses(out)] if (out / "metrics.jsonl").exists() else []
        saved = int(re.sub(r"\D", "", latest.read_text()) or 0) if latest.exists() else 0
        if saved >= every and steps and steps[-1] > saved:
            break
        time.sleep(0.1)
    killed = netns_cluster.kill_node("node2")
    t_kill = time.monotonic()
    assert killed
    rc = procs["node1"].wait(timeout=120)
    elapsed = time.monotonic() - t_kill
    procs["node2"].wait(timeout=10)
    log1 = logs["node1"].read_text()
    assert rc != 0, log1[-4000:]
    assert re.search(r"error: rank [23] stopped responding \(last heartbeat \d+s ago\); exiting", log1), log1[-6000:]
    # heartbeat_timeout_s, plus the monitor's interval and the process teardown, on a loaded 2-core machine
    assert elapsed < heartbeat + 25, f"node1 took {elapsed:.0f}s to give up\n{log1[-4000:]}"
    assert not netns_cluster.pids("node2")

    logs2 = {n: tmp_path / f"{n}-resume.log" for n in netns_cluster.nodes}
    procs = {n: start_torchrun(netns_cluster, n, job, out, logs2[n], extra=["--resume"], run_id="resume")
             for n in netns_cluster.nodes}
    codes = wait_all(procs, logs2, 300)
    assert codes == {"node1": 0, "node2": 0}, tails(logs2)
    log = logs2["node1"].read_text()
    m = re.search(r"resumed from \S+ at step (\d+)", log)
    assert m, log[-4000:]
    assert int(m.group(1)) >= saved, f"resumed at step {m.group(1)}, but step {saved} was checkpointed before the kill"
    steps = [s for s, _ in train_losses(out)]
    assert steps[-1] == total and steps == sorted(set(steps)), steps  # records after the checkpoint re-done once


# ---------------------------------------------------------------- 1: Slurm, two nodes


@pytest.fixture(scope="module")
def netns_slurm(netns_cluster):  # noqa: F811
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    try:
        install_slurm()
    except (OSError, subprocess.SubprocessError) as err:
        pytest.skip(f"could not install slurm-wlm and munge with apt-get: {err}")
    root = Path(tempfile.mkdtemp(prefix="slurm-netns-"))
    try:
        with NetnsSlurmCluster(root, netns_cluster) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


def slurm_env(job: Job, out: Path, **extra: str) -> dict:
    env = node_env(CONFIG=job.config, OUT_DIR=str(out), MODULE=job.module, PROJECT_DIR=str(REPO),
                   SET=" ".join(job.sets + [f"train.micro_batch_size={MICRO}"]), EXTRA_ARGS=" ".join(job.extra),
                   **extra)
    env.pop("GLOO_SOCKET_IFNAME")  # the script's SOCKET_IFNAME must set it
    return env


def test_slurm_pretrain_sbatch_two_nodes(netns_slurm, job, reference, tmp_path):
    env = slurm_env(job, tmp_path / "out", SOCKET_IFNAME=DATA_IF)
    info = netns_slurm.sbatch(REPO / "slurm" / "pretrain.sbatch", "--nodes=2", "--ntasks-per-node=2",
                              f"--output={tmp_path}/job-%j.out", env=env, cwd=REPO, timeout_s=300)
    log = (tmp_path / f"job-{info['JobId']}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{log[-6000:]}\n{netns_slurm.logs()}"
    assert "2 node(s) x 2 task(s)" in log and "rendezvous node1:" in log, log[-4000:]
    assert "nodes node[1-2]; GLOO_SOCKET_IFNAME=d0 NCCL_SOCKET_IFNAME=d0" in log, log[-4000:]
    assert "launcher=slurm rank=0 world_size=4 local_rank=0 local_world_size=2 master=node1:" in log, log[-4000:]
    assert train_losses(tmp_path / "out") == reference  # bit for bit


def test_slurm_deepspeed_sbatch_two_nodes(netns_slurm, ssh_nodes, job, reference, tmp_path):
    """One Slurm task per node; the DeepSpeed runner reaches both nodes with pdsh over ssh (hostfile from
    the allocation), the job's environment handed over through its DS_ENV_FILE."""
    env = slurm_env(job, tmp_path / "out", SOCKET_IFNAME=DATA_IF, GPUS_PER_NODE="0", NPROC_PER_NODE="2",
                    HOSTFILE=str(tmp_path / "hostfile"))
    env["PATH"] = f"{ssh_nodes.bin}{os.pathsep}{env['PATH']}"  # the test's ssh key: in ~/.ssh/config on a cluster
    env.pop("OMP_NUM_THREADS")  # the script's own choice must reach node2 too
    info = netns_slurm.sbatch(REPO / "slurm" / "pretrain_deepspeed.sbatch", "--nodes=2", "--cpus-per-task=2",
                              f"--output={tmp_path}/job-%j.out", env=env, cwd=REPO, timeout_s=300)
    log = (tmp_path / f"job-{info['JobId']}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{log[-6000:]}\n{netns_slurm.logs()}"
    assert (tmp_path / "hostfile").read_text().split("\n")[:2] == ["node1 slots=2", "node2 slots=2"]
    handed = (tmp_path / f"deepspeed_env-{info['JobId']}").read_text()
    assert "GLOO_SOCKET_IFNAME=d0" in handed and "DS_ACCELERATOR=cpu" in handed, handed
    assert "launcher=deepspeed rank=0 world_size=4 local_rank=0 local_world_size=2 master=node1:" in log, log[-4000:]
    assert train_losses(tmp_path / "out") == reference  # bit for bit


def test_slurm_node_dies_job_requeued_and_resumes(own_cluster, job, tmp_path):
    """Two-node Slurm job, every process of node2 killed mid-run: node1's ranks name the dead rank and exit;
    Slurm marks node2 down and requeues the job (NODE_FAIL, the script asks for --requeue); once node2 is
    back the job runs again with --resume from the last checkpoint and completes."""
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    heartbeat, total, every = 5.0, 100, 30
    job = Job(job.module, job.config,
              job.sets + [f"train.max_steps={total}", f"run.save_every={every}",
                          f"dist.heartbeat_timeout_s={heartbeat}"], job.extra)
    out = tmp_path / "out"
    root = Path(tempfile.mkdtemp(prefix="slurm-die-"))  # short: the munge socket path must fit in 108 bytes
    try:
        with NetnsSlurmCluster(root, own_cluster, slurmd_timeout_s=10) as cluster:
            job_id = cluster.submit(REPO / "slurm" / "pretrain.sbatch", "--nodes=2", "--ntasks-per-node=2",
                                    f"--output={tmp_path}/job-%j.out", env=slurm_env(job, out, SOCKET_IFNAME=DATA_IF),
                                    cwd=REPO)
            log_file = tmp_path / f"job-{job_id}.out"

            def log() -> str:
                return log_file.read_text() if log_file.exists() else ""

            latest = out / "checkpoints" / "latest"
            deadline = time.monotonic() + 240
            while True:
                assert cluster.job_info(job_id).get("JobState") in ("PENDING", "RUNNING") and \
                    time.monotonic() < deadline, f"no checkpoint before the end:\n{log()[-4000:]}"
                steps = [s for s, _ in train_losses(out)] if (out / "metrics.jsonl").exists() else []
                saved = int(re.sub(r"\D", "", latest.read_text()) or 0) if latest.exists() else 0
                if saved >= every and steps and steps[-1] > saved:
                    break
                time.sleep(0.1)
            assert own_cluster.kill_node("node2")
            while cluster.job_info(job_id).get("Restarts", "0") == "0":
                assert time.monotonic() < deadline, f"not requeued:\n{log()[-4000:]}\n{cluster.logs()}"
                time.sleep(0.5)
            assert re.search(r"error: rank [23] stopped responding \(last heartbeat \d+s ago\); exiting", log()), \
                log()[-6000:]
            assert "Node failure on node2" in log() or "NODE FAILURE" in log(), log()[-4000:]
            cluster.restart_slurmd("node2")  # the node comes back
            # The requeued job is held ~2 minutes; release it, not within the second of the requeue (see
            # test_launchers.test_slurm_preemption_checkpoints_requeues_and_resumes).
            time.sleep(2.0)
            subprocess.run([*cluster.client, "scontrol", "update", f"JobId={job_id}", "StartTime=now"],
                           env=cluster.env, check=True, capture_output=True, timeout=30)
            info = cluster.wait(job_id, timeout_s=240)
            text = log()
            assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
                f"{info}\n{text[-6000:]}\n{cluster.logs()}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert "restart 1:" in text and "--resume" in text.split("restart 1:")[1], text[-4000:]
    m = re.search(r"resumed from \S+ at step (\d+)", text.split("restart 1:")[1])
    assert m and int(m.group(1)) >= saved, f"step {saved} was checkpointed before the kill\n{text[-4000:]}"
    steps = [s for s, _ in train_losses(out)]
    assert steps[-1] == total and steps == sorted(set(steps)), steps
