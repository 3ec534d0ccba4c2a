"""The training job under each real launcher: mpirun, deepspeed, torchrun, and a local Slurm cluster.

Two ranks with micro-batch B must end with the same loss as one process with micro-batch 2B. The
job is `training.pretrain` on the tiny config when it exists (LAUNCH_TEST_JOB=standin forces the
stand-in of tests/helpers/launch.py). The pre-emption test always uses the stand-in: it needs the
exit-75 contract and a job slow enough to be signalled mid-run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launch import final_loss, slurm_cluster  # noqa: F401  (slurm_cluster is a fixture)
from training.dist import free_port
from tests.helpers import paths as PATHS

pytestmark = [pytest.mark.slow, pytest.mark.launchers]

REPO = PATHS.REPO
MICRO = 4
USE_PRETRAIN = (os.environ.get("LAUNCH_TEST_JOB", "auto") != "standin"
                and (REPO / "training" / "pretrain.py").is_file() and (REPO / "configs" / "tiny.yaml").is_file())


@dataclasses.dataclass
class Job:
    module: str
    config: str
    sets: list[str]
    extra: list[str]

    def args(self, out: Path, micro: int) -> list[str]:
        sets = self.sets + [f"train.micro_batch_size={micro}"]
        return ["--config", self.config, "--out", str(out), *[a for s in sets for a in ("--set", s)], *self.extra]


def clean_env(**extra: str) -> dict:
    """No launcher variables inherited from whatever runs pytest (a Slurm job, an MPI shell...)."""
    drop = ("SLURM_", "OMPI_", "PMI", "PMIX", "MPI_", "TORCHELASTIC", "HYDRA_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and
           k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def run(cmd: list[str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}"
    return out


def train_loss(out: Path) -> float:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "loss" in r and r.get("kind", "train") == "train"][-1]["loss"]


@pytest.fixture(scope="module")
def job(request) -> Job:
    if USE_PRETRAIN:
        data = request.getfixturevalue("tiny_data")
        # No dropout: it is seeded per rank, so it would differ between 1 and 2 processes.
        return Job("training.pretrain", "configs/tiny.yaml",
                   [f"data.dir={data}", "run.export_hf=false", "model.dropout=0", "model.attention_dropout=0"], [])
    return Job("tests.helpers.launch", "configs/none.yaml", [], ["--steps", "8"])


@pytest.fixture(scope="module")
def reference_loss(job, tmp_path_factory) -> float:
    out = tmp_path_factory.mktemp("reference") / "out"
    run([sys.executable, "-m", job.module, *job.args(out, 2 * MICRO)])
    return train_loss(out)


def check_two_rank_run(out: Path, log: str, launcher: str, reference: float) -> None:
    assert f"launcher={launcher} rank=0 world_size=2" in log, log[-4000:]
    assert train_loss(out) == pytest.approx(reference, rel=1e-4, abs=1e-5)
    assert (out / "checkpoints" / "latest").is_file()


def need(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} is not installed")
    return path


def test_mpirun(job, reference_loss, tmp_path):
    mpirun = need("mpirun")
    log = run([mpirun, "-n", "2", sys.executable, "-m", job.module, *job.args(tmp_path / "out", MICRO)])
    check_two_rank_run(tmp_path / "out", log, "mpi", reference_loss)


def test_deepspeed_launcher(job, reference_loss, tmp_path):
    deepspeed = need("deepspeed")
    log = run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", job.module,
               *job.args(tmp_path / "out", MICRO)])
    check_two_rank_run(tmp_path / "out", log, "deepspeed", reference_loss)


def test_torchrun(job, reference_loss, tmp_path):
    torchrun = need("torchrun")
    log = run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", job.module,
               *job.args(tmp_path / "out", MICRO)])
    check_two_rank_run(tmp_path / "out", log, "torchrun", reference_loss)


def slurm_job_env(job: Job, out: Path, **extra: str) -> dict:
    return clean_env(CONFIG=job.config, OUT_DIR=str(out), MODULE=job.module, PROJECT_DIR=str(REPO),
                     SET=" ".join(job.sets + [f"train.micro_batch_size={MICRO}"]), EXTRA_ARGS=" ".join(job.extra),
                     **extra)


def slurm_log(tmp_path: Path, job_id: str) -> str:
    return (tmp_path / f"job-{job_id}.out").read_text()


def test_slurm_pretrain_sbatch(slurm_cluster, job, reference_loss, tmp_path):  # noqa: F811
    info = slurm_cluster.sbatch(REPO / "slurm" / "pretrain.sbatch", "--ntasks-per-node=2",
                                f"--output={tmp_path}/job-%j.out", env=slurm_job_env(job, tmp_path / "out"),
                                cwd=REPO, timeout_s=300)
    log = slurm_log(tmp_path, info["JobId"])
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]
    assert "1 node(s) x 2 task(s)" in log
    check_two_rank_run(tmp_path / "out", log, "slurm", reference_loss)


def test_slurm_deepspeed_sbatch(slurm_cluster, job, reference_loss, tmp_path):  # noqa: F811
    env = slurm_job_env(job, tmp_path / "out", GPUS_PER_NODE="0", NPROC_PER_NODE="2")
    info = slurm_cluster.sbatch(REPO / "slurm" / "pretrain_deepspeed.sbatch", "--cpus-per-task=2",
                                f"--output={tmp_path}/job-%j.out", env=env, cwd=REPO, timeout_s=300)
    log = slurm_log(tmp_path, info["JobId"])
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]
    check_two_rank_run(tmp_path / "out", log, "deepspeed", reference_loss)


def metrics_rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return rows


def test_slurm_preemption_checkpoints_requeues_and_resumes(slurm_cluster, job, tmp_path):  # noqa: F811
    if USE_PRETRAIN:  # long enough to be signalled mid-run; exact resume is tested in test_reliability
        total = 300
        job = dataclasses.replace(job, sets=job.sets + [f"train.max_steps={total}", "run.save_every=100"])
    else:
        total = 30
        job = dataclasses.replace(job, extra=["--steps", str(total), "--step-sleep", "0.3"])
    out = tmp_path / "out"
    job_id = slurm_cluster.submit(REPO / "slurm" / "pretrain.sbatch", "--ntasks-per-node=2",
                                  f"--output={tmp_path}/job-%j.out", env=slurm_job_env(job, out), cwd=REPO)
    log_file = tmp_path / f"job-{job_id}.out"
    deadline = time.monotonic() + 180
    while not any(r.get("step", 0) >= 3 for r in metrics_rows(out)):
        assert time.monotonic() < deadline and slurm_cluster.job_info(job_id).get("JobState") in (
            "PENDING", "RUNNING"), f"the job did not reach step 3:\n{log_file.read_text()[-4000:]}"
        time.sleep(0.2)
    # What Slurm does at the time limit with --signal=B:USR1@120: signal the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=slurm_cluster.env, check=True)
    while slurm_cluster.job_info(job_id).get("Restarts", "0") == "0":
        assert time.monotonic() < deadline, f"not requeued:\n{log_file.read_text()[-4000:]}"
        time.sleep(0.5)
    # Slurm holds a requeued job for ~2 minutes (its credential expiry) before it may start again; skip the
    # wait, but not within the second of the requeue: slurmd revoked the job's credential when it killed the
    # first run, and rejects a new one created in that same second ("Job N already killed, do not launch
    # batch job": revocation and creation times are whole seconds, compared with <=). Seen about 1 run in 8.
    while slurm_cluster.job_info(job_id).get("JobState") != "PENDING":
        assert time.monotonic() < deadline, f"requeued job not pending:\n{log_file.read_text()[-4000:]}"
        time.sleep(0.2)
    time.sleep(2.0)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=slurm_cluster.env, check=True)
    info = slurm_cluster.wait(job_id, timeout_s=240)
    log = log_file.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        f"{info}\n{log[-6000:]}\n{slurm_cluster.logs()}"
    assert "exit 75" in log and f"scontrol requeue {job_id}" in log, log[-6000:]
    assert "restart 1:" in log and "--resume" in log.split("restart 1:")[1], log[-6000:]
    assert (out / "checkpoints" / "latest").is_file()
    assert metrics_rows(out)[-1]["step"] == total
    if not USE_PRETRAIN:  # the stand-in resumes exactly: same loss as an uninterrupted run
        assert "rank 0 resumed from step" in log and "rank 1 resumed from step" in log
        ref = tmp_path / "uninterrupted"
        run([sys.executable, "-m", job.module, *job.args(ref, 2 * MICRO)[:-2]])  # without --step-sleep
        assert final_loss(out) == pytest.approx(final_loss(ref), rel=1e-5)


def test_slurm_glue_sweep_sbatch(slurm_cluster, tmp_path):  # noqa: F811
    """slurm/glue_sweep.sbatch as an array job, with local tasks standing in for GLUE (which needs the hub): one
    array task per entry of TASKS, each its own OUT/<task>; an index past TASKS is one error line, exit 2."""
    from tests.helpers.finetune import export_tiny, genre_corpora, write_genre_task, write_rows

    corpora = genre_corpora()
    model = export_tiny(tmp_path / "model", corpora["wiki"][0][:300] + corpora["news"][0][:300], "post")
    train, held = write_genre_task(tmp_path, 40, 10)
    rows = [{"text": a, "text_pair": b, "label": i % 2}
            for i, (a, b) in enumerate(zip(corpora["wiki"][0][:40], corpora["news"][0][:40]))]
    pairs = write_rows(tmp_path / "pairs.csv", rows, fields=("text", "text_pair", "label"))
    out = tmp_path / "sweep"
    env = clean_env(MODEL=str(model), TASKS=f"csv:{train},{held} {pairs}", OUT=str(out), SEEDS="0 1",
                    BATCH_SIZE="8", EXTRA_ARGS="--max-steps 2", PROJECT_DIR=str(REPO), HF_HUB_OFFLINE="1",
                    TOKENIZERS_PARALLELISM="false")
    job_id = slurm_cluster.submit(REPO / "slurm" / "glue_sweep.sbatch", "--array=0-2",
                                  f"--output={tmp_path}/job-%A_%a.out", env=env, cwd=REPO)
    infos = [slurm_cluster.wait(f"{job_id}_{i}", timeout_s=600) for i in range(3)]
    logs = [(tmp_path / f"job-{job_id}_{i}.out").read_text() for i in range(3)]
    for info, log in zip(infos[:2], logs):
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-6000:]
    genre = json.loads((out / "genre" / "results.json").read_text())
    assert genre["complete"] and set(genre["tasks"]["genre"]["seeds"]) == {"0", "1"}
    assert set(json.loads((out / "pairs" / "results.json").read_text())["tasks"]) == {"pairs"}
    assert "python -m training.finetune" in logs[0] and "--seed 0 1" in logs[0]
    assert (infos[2]["JobState"], infos[2]["ExitCode"]) == ("FAILED", "2:0"), logs[2]
    errors = [line for line in logs[2].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "array index 2" in errors[0], logs[2]
