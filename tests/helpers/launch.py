"""Helpers for the launcher tests: a stand-in training job and a throw-away one-node Slurm cluster.

Stand-in job (what the launchers start until `training.pretrain` exists; same CLI contract):

    python -m tests.helpers.launch --out DIR [--steps N] [--set train.micro_batch_size=B] [--resume]

It trains a tiny linear model on deterministic data with plain data parallelism, so the final loss
of W ranks with micro-batch B equals one rank with micro-batch W*B. Rank 0 writes DIR/metrics.jsonl;
every rank writes DIR/checkpoints/step_S/rank_R.pt. SIGUSR1/SIGTERM: checkpoint at the next step
and exit 75, like the real job.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

STANDIN = [sys.executable, "-m", "tests.helpers.launch"]


# ---------------------------------------------------------------- stand-in job


def _batch(step: int, rank: int, micro: int, world: int):
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(micro * world, 8, generator=g)
    y = x.sum(dim=1, keepdim=True) * 0.5 + 1.0
    return x[rank * micro:(rank + 1) * micro], y[rank * micro:(rank + 1) * micro]


def job(argv: Optional[list[str]] = None) -> int:
    from training import dist as tdist
    from training.errors import exit_on_user_error

    return exit_on_user_error(_job)(argv, tdist)


def _job(argv, tdist) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="accepted and ignored: same command line as training.pretrain")
    p.add_argument("--set", action="append", default=[], help="only train.micro_batch_size is used")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--step-sleep", type=float, default=0.0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--lock-wait", type=float, default=0.0, help="accepted and ignored, as --config")
    p.add_argument("--heartbeat-timeout", type=float, default=30.0)
    p.add_argument("--die-rank", type=int, default=-1, help="this rank fails at --die-step")
    p.add_argument("--die-step", type=int, default=2)
    p.add_argument("--die-mode", choices=["exit", "raise", "freeze"], default="exit",
                   help="os._exit(3), raise RuntimeError, or SIGSTOP itself")
    p.add_argument("--config-tag", default="", help="mixed into the config hash (mismatch tests)")
    tdist.add_launcher_args(p)
    args = p.parse_args(argv)
    for kv in args.set:
        if kv.startswith("train.micro_batch_size="):
            args.micro_batch = int(kv.split("=", 1)[1])

    import torch
    import torch.distributed as dist

    env = tdist.init_distributed(timeout_s=120)
    print(f"launcher={env.launcher} rank={env.rank} world={env.world_size} local_rank={env.local_rank} "
          f"local_world={env.local_world_size} host={socket.gethostname()}", flush=True)
    config = json.dumps({"mb": args.micro_batch, "tag": args.config_tag}, sort_keys=True)
    tdist.check_consistent(hashlib.sha256(config.encode()).hexdigest()[:16], env.world_size)
    stop = {"signal": 0}
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.update(signal=s))

    out = Path(args.out)
    ckpt = out / "checkpoints"
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    # Plain SGD by hand: torch.optim imports torch._dynamo, seconds per process on a small box.
    start = 0
    if args.resume and (ckpt / "latest").exists():
        start = int((ckpt / "latest").read_text())
        state = torch.load(ckpt / f"step_{start}" / f"rank_{env.rank}.pt")
        model.load_state_dict(state["model"])
        print(f"rank {env.rank} resumed from step {start}", flush=True)

    def save(step: int) -> None:
        d = ckpt / f"step_{step}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict()}, d / f"rank_{env.rank}.pt")
        if env.world_size > 1:
            dist.barrier()
        if env.is_main:
            (ckpt / "latest").write_text(str(step))

    with tdist.start_watchdog(env, args.heartbeat_timeout):
        for step in range(start + 1, args.steps + 1):
            if step == args.die_step and env.rank == args.die_rank:
                print(f"rank {env.rank} failing on purpose ({args.die_mode})", flush=True)
                if args.die_mode == "raise":
                    raise RuntimeError("boom on purpose")
                if args.die_mode == "freeze":
                    os.kill(os.getpid(), signal.SIGSTOP)
                os._exit(3)
            x, y = _batch(step, env.rank, args.micro_batch, env.world_size)
            model.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            flag = torch.tensor([loss.item(), float(stop["signal"] != 0)])
            if env.world_size > 1:
                for prm in model.parameters():
                    dist.all_reduce(prm.grad)
                    prm.grad /= env.world_size
                dist.all_reduce(flag)  # mean loss, and "anyone signalled?" so all ranks stop together
                flag[0] /= env.world_size
            with torch.no_grad():
                for prm in model.parameters():
                    prm -= 0.05 * prm.grad
            print(f"rank {env.rank} step {step} loss {flag[0].item():.6f}", flush=True)
            if env.is_main:
                out.mkdir(parents=True, exist_ok=True)
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, "stage": "standin", "loss": flag[0].item(),
                                        "world_size": env.world_size}) + "\n")
            if flag[1] > 0:
                save(step)
                print(f"rank {env.rank} checkpointed at step {step} after a signal; exit 75", flush=True)
                sys.exit(tdist.EXIT_REQUEUE)
            time.sleep(args.step_sleep)
        save(args.steps)
    tdist.shutdown()
    return 0


def final_loss(out_dir) -> float:
    lines = [json.loads(x) for x in Path(out_dir, "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [m for m in lines if "loss" in m][-1]["loss"]


# ---------------------------------------------------------------- one-node Slurm cluster


def slurm_unavailable_reason() -> Optional[str]:
    """None when a local Slurm can be run here (installing it with apt if needed), else why not."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None if os.geteuid() == 0 else "slurm daemons need root"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm is not installed and cannot be installed (needs root and apt-get)"
    return None


def install_slurm() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    if subprocess.run(cmd, env=env, capture_output=True, timeout=900).returncode != 0:  # stale package lists?
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=900)
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=900)


class Started:
    """A context manager over start()/stop(): stop() also when start() fails half-way (a daemon already up)."""

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class SlurmCluster(Started):
    """slurmctld + slurmd (+ munged) for this host only, all state in `root`. Use as a context manager."""

    def __init__(self, root):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.client: list[str] = []  # prefix of client commands (sbatch, scontrol...): where they run

    def _write_conf(self) -> None:
        for d in ("state", "spool", "munge", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        mem_mb = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]) // 1024
        ctl_port, d_port = _free_port(), _free_port()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=testcluster
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
NodeName={self.host} CPUs={os.cpu_count()} RealMemory={max(256, mem_mb - 1024)} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        key = Path("/etc/munge/munge.key")
        self.key = key if key.exists() else self.root / "munge" / "munge.key"
        if not self.key.exists():
            self.key.write_bytes(os.urandom(128))
            self.key.chmod(0o600)

    def start(self, timeout_s: float = 60) -> "SlurmCluster":
        install_slurm()
        self._write_conf()
        m = self.root / "munge"
        self._spawn(["munged", "-F", "--force", f"--socket={m}/munge.socket", f"--key-file={self.key}",
                     f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed"])
        self._wait(lambda: (m / "munge.socket").exists(), 15, "munged did not start")
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn(["slurmd", "-D", "-f", str(self.conf)])

        def idle() -> bool:
            out = subprocess.run([*self.client, "sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True,
                                 text=True)
            return out.returncode == 0 and bool(out.stdout.split()) and set(out.stdout.split()) <= {"idle", "mix"}

        self._wait(idle, timeout_s, "the Slurm node did not become idle")
        return self

    def _spawn(self, cmd: list[str], prefix: tuple = (), name: str = "") -> None:
        log = open(self.root / "log" / f"{name or cmd[0]}.out", "w")
        proc = subprocess.Popen([*prefix, *cmd], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        proc.name = name or cmd[0]
        self.procs.append(proc)

    def _wait(self, ok, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ok():
            dead = [p.name for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what} (exited: {dead}); logs in {self.root / 'log'}:\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*")))

    def submit(self, script, *args: str, env: Optional[dict] = None, cwd=None) -> str:
        """sbatch a script (extra sbatch flags in args); returns the job id."""
        proc = subprocess.run([*self.client, "sbatch", "--parsable", *args, str(script)],
                              env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict:
        out = subprocess.run([*self.client, "scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True,
                             text=True).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, timeout_s: float = 300) -> dict:
        """Wait for the job to end (like `sbatch --wait`, but polling every 0.5 s instead of back-off)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                        "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
                return info
            time.sleep(0.5)
        subprocess.run([*self.client, "scancel", job_id], env=self.env)
        raise TimeoutError(f"job {job_id} still {self.job_info(job_id).get('JobState')} after {timeout_s}s")

    def sbatch(self, script, *args: str, env: Optional[dict] = None, timeout_s: float = 300, cwd=None) -> dict:
        """Submit and wait; returns `scontrol show job` fields (JobState, ExitCode '0:0', Restarts...)."""
        return self.wait(self.submit(script, *args, env=env, cwd=cwd), timeout_s)

    def stop(self) -> None:
        # Jobs of this cluster still running (a failed test) would outlive slurmd in their slurmstepd.
        if any(p.name == "slurmctld" and p.poll() is None for p in self.procs):
            jobs = subprocess.run([*self.client, "squeue", "-h", "-o", "%i"], env=self.env, capture_output=True,
                                  text=True, timeout=30).stdout.split()
            if jobs:
                subprocess.run([*self.client, "scancel", *jobs], env=self.env, capture_output=True, timeout=30)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and subprocess.run(
                        [*self.client, "squeue", "-h", "-o", "%i"], env=self.env, capture_output=True,
                        text=True).stdout.strip():
                    time.sleep(0.5)
        for p in reversed(self.procs):  # slurmd, slurmctld, munged: only the processes we started
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


try:  # a fixture other test modules can import: `from tests.helpers.launch import slurm_cluster`
    import pytest

    @pytest.fixture(scope="session")
    def slurm_cluster():
        reason = slurm_unavailable_reason()
        if reason:
            pytest.skip(reason)
        try:
            install_slurm()
        except (OSError, subprocess.SubprocessError) as err:
            pytest.skip(f"could not install slurm-wlm and munge with apt-get: {err}")
        root = Path(tempfile.mkdtemp(prefix="slurm-test-"))
        try:
            with SlurmCluster(root) as cluster:
                yield cluster
        finally:
            shutil.rmtree(root, ignore_errors=True)
except ImportError:  # pragma: no cover - the stand-in job runs without pytest too
    pass


if __name__ == "__main__":
    sys.exit(job())
