"""Reliability: atomic checkpoints and retention, NaN/Inf handling, pre-emption signals (exit 75)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.reliability import (REPO, RESUME_CONFIGS, SIGINT, SIGKILL, SIGTERM, SIGUSR1,  # noqa: F401
                                            assert_bit_identical, env, metrics, model_state, reference_run,
                                            run_pretrain, start_and_signal, tiny_data, total_steps, tree_digest,
                                            write_config)
from training.engine import faults, recovery

BASE_ID, BASE = RESUME_CONFIGS[0]
TOTAL = total_steps(BASE)


def ckpts(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def meta(out: Path, tag: str) -> dict:
    return json.loads((out / "checkpoints" / tag / "meta.json").read_text())


# ------------------------------------------------------------------------------ atomic checkpoints

def test_kill_during_save_keeps_the_previous_checkpoint_usable(tmp_path, tmp_path_factory, tiny_data):
    ref = reference_run(tmp_path_factory, tiny_data, BASE_ID, BASE)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out, BASE)
    proc = run_pretrain(config, DSBERT_FAULT_KILL_IN_SAVE="6")  # SIGKILL after DeepSpeed wrote step 6's files
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert latest(out) == "step00000004"
    assert "step00000006" not in ckpts(out) and "step00000006.tmp" in ckpts(out)  # partial, unpublished
    proc = run_pretrain(config, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from step00000004" in proc.stderr
    assert not [c for c in ckpts(out) if ".tmp" in c]  # leftovers cleaned by the next save
    assert_bit_identical(ref, out / "checkpoints" / f"step{TOTAL:08d}")


def test_keep_last_retention_and_manifest(tmp_path, tiny_data):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out,
                          {**BASE, "run": {"keep_last": 2, "save_every": 1}, "train": {"max_steps": 5}})
    proc = run_pretrain(config)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ckpts(out) == ["step00000004", "step00000005"] and latest(out) == "step00000005"
    m = meta(out, "step00000005")
    assert m["train_state"]["step"] == 5 and m["files"]
    for name, size in m["files"].items():  # every file DeepSpeed and we wrote, with its size
        assert (out / "checkpoints" / "step00000005" / name).stat().st_size == size
    assert "mp_rank_00_model_states.pt" in m["files"] and "rng_rank0.pt" in m["files"]


def test_corrupt_latest_is_passed_over_with_a_warning_and_kept(tmp_path, tmp_path_factory, tiny_data):
    """A truncated newest checkpoint: --resume names the bad file in a warning, resumes from the newest one that
    verifies (ending bit-identical to the clean run) and keeps the bad one as <tag>.corrupt."""
    ref = reference_run(tmp_path_factory, tiny_data, BASE_ID, BASE)
    out = tmp_path / "out"
    import shutil

    shutil.copytree(ref.parent.parent, out)
    config = write_config(tmp_path / "c.yaml", tiny_data, out, BASE)
    f = out / "checkpoints" / latest(out) / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[:1000])
    kept = tree_digest(f.parent)
    proc = run_pretrain(config, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:") and str(f) in line]
    assert warning and "truncated or corrupt" in warning[0] and "resuming from step00000010" in warning[0], \
        proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert tree_digest(out / "checkpoints" / f"{f.parent.name}.corrupt") == kept
    assert_bit_identical(ref, out / "checkpoints" / f"step{TOTAL:08d}")


# ------------------------------------------------------------------------------ numerical faults

def test_nan_step_is_skipped_and_training_continues(tmp_path, tiny_data):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out,
                          {**BASE, "run": {"save_every": 1, "keep_last": 20}, "train": {"max_steps": 7}})
    proc = run_pretrain(config, DSBERT_FAULT_NAN_AT="5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step00000005" not in ckpts(out)  # no checkpoint is written during a bad streak
    s4, s6 = (model_state(out / "checkpoints" / f"step0000000{i}") for i in (4, 6))
    assert all(torch.isfinite(v).all() for v in s6["module"].values())
    # Two steps later, but only one optimizer update: step 5 was skipped.
    opt_steps = [{float(st["step"]) for st in s["optimizer"]["state"].values()} for s in (s4, s6)]
    assert opt_steps == [{4.0}, {5.0}], opt_steps
    assert meta(out, "step00000007")["train_state"]["skipped_steps"] == 1
    fault = [r for r in metrics(out) if r.get("kind") == "fault"]
    assert [(r["step"], r["consecutive"]) for r in fault] == [(5, 1)]


def test_repeated_nan_stops_with_a_clear_message(tmp_path, tiny_data):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out,
                          {**BASE, "run": {"on_nan": "stop", "max_bad_steps": 3}, "train": {"max_steps": 10}})
    proc = run_pretrain(config, DSBERT_FAULT_NAN_AT="5,6,7,8")
    assert proc.returncode == faults.EXIT_NUMERICAL, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 consecutive steps with a non-finite loss or gradient (last: step 7)"), last
    assert "run.on_nan=stop" in last
    # No checkpoint during the bad streak: step 6 is not written; the latest is the last good one.
    assert latest(out) == "step00000004" and "step00000006" not in ckpts(out)


def test_transient_nan_restores_in_process_and_matches_the_clean_run(tmp_path, tmp_path_factory, tiny_data):
    ref = reference_run(tmp_path_factory, tiny_data, BASE_ID, BASE)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out, {**BASE, "run": {"max_bad_steps": 2}})
    proc = run_pretrain(config, DSBERT_FAULT_NAN_AT="5,6")  # on_nan: restore (default)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "restoring the last good checkpoint step00000004" in proc.stderr
    # The injected fault fires once; the replay from step 4 is the clean run, bit for bit.
    assert_bit_identical(ref, out / "checkpoints" / f"step{TOTAL:08d}")


class _FakeRunner:
    def __init__(self, ckpt_dir, fail_times):
        self.ckpt_dir, self.fail_times, self.resumed = ckpt_dir, fail_times, []

    def run(self):
        if self.fail_times:
            self.fail_times -= 1
            raise faults.RestoreRequested("5 consecutive steps with a non-finite loss or gradient")
        return "done"

    def resume(self, tag):
        self.resumed.append(tag)


def test_recovery_restores_once_per_checkpoint_then_stops(tmp_path):
    (tmp_path / "step00000004").mkdir()
    (tmp_path / "latest").write_text("step00000004")
    runner = _FakeRunner(tmp_path, 1)
    assert recovery.run_with_recovery(runner) == "done" and runner.resumed == ["step00000004"]
    runner = _FakeRunner(tmp_path, 2)  # the fault came back after restoring: deterministic, stop
    with pytest.raises(faults.NumericalFault, match="already restored step00000004"):
        recovery.run_with_recovery(runner)
    with pytest.raises(faults.NumericalFault, match="no checkpoint to restore"):
        recovery.run_with_recovery(_FakeRunner(tmp_path / "none", 1))


@pytest.fixture
def process_group(monkeypatch):
    """A one-rank process group in this process; the launcher variables it exports are undone after."""
    from training.dist import free_port, init_distributed, shutdown

    already = torch.distributed.is_initialized()  # e.g. by another module's in-process test
    if not already:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k, raising=False)  # undone last: init_distributed's exports go away too
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        init_distributed(timeout_s=60)
    yield
    if not already:
        shutdown()


def test_skipped_step_leaves_params_and_optimizer_state_alone(process_group):
    from tests.helpers.reliability import BASE_CONFIG
    from training.config import RunConfig
    from training.engine.build import build_engine
    from training.model.bert import BertForPreTraining
    cfg = RunConfig.model_validate({**BASE_CONFIG, "run": {**BASE_CONFIG["run"], "out_dir": "/nonexistent"}})
    torch.manual_seed(0)
    model = BertForPreTraining(cfg.model)
    engine, _ = build_engine(model, cfg, 1, "/nonexistent")
    ids = torch.randint(5, cfg.model.vocab_size, (2, 16))
    labels = ids.clone()
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    for _ in range(cfg.train.grad_accum):
        out = engine(input_ids=ids, labels=labels)
        engine.backward(out["mlm_loss"] * float("nan"))
        if engine.is_gradient_accumulation_boundary():
            assert not bool(faults.grads_finite(faults.local_grads(engine)))
            with faults.skipped_step(engine):
                engine.step()
        else:
            engine.step()
    after = engine.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not engine.optimizer.state or all(
        torch.isfinite(v).all() for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    assert all(p.grad is None for p in engine.module.parameters())
    # The next (finite) step trains normally.
    for _ in range(cfg.train.grad_accum):
        out = engine(input_ids=ids, labels=labels)
        engine.backward(out["mlm_loss"])
        engine.step()
    assert not all(torch.equal(before[k], engine.module.state_dict()[k]) for k in before)


# ------------------------------------------------------------------------------ pre-emption

@pytest.mark.parametrize("sig", [SIGTERM, SIGUSR1, SIGINT], ids=["SIGTERM", "SIGUSR1", "SIGINT"])
def test_preemption_signal_checkpoints_exits_75_and_resumes_exactly(tmp_path, tmp_path_factory, tiny_data, sig):
    """SIGINT is Ctrl-C: the same checkpoint and exit 75, no traceback (a second one: tests/integration/test_interrupts.py)."""
    ref = reference_run(tmp_path_factory, tiny_data, BASE_ID, BASE)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out, BASE)
    stdout, rc, err = start_and_signal(config, 5, sig)
    assert rc == 75, err[-2000:]
    assert "pre-empted" in stdout and "exit 75" in stdout, stdout
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    reached = max(r["step"] for r in metrics(out) if r.get("kind") == "train")
    assert latest(out) == f"step{reached:08d}"  # a checkpoint at the step reached, not the previous one
    assert meta(out, latest(out))["train_state"]["step"] == reached < TOTAL
    proc = run_pretrain(config, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_bit_identical(ref, out / "checkpoints" / f"step{TOTAL:08d}")


# ------------------------------------------------------------------------------ two ranks (slow)

def _start_ranks(config: Path, world: int, extra_env: dict, *args: str) -> list[subprocess.Popen]:
    from training.dist import free_port

    port = free_port()
    procs = []
    for rank in range(world):
        e = env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra_env)
        log = open(config.parent / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "training.pretrain", "--config", str(config), *args],
                                      cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, timeout=180) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.slow
def test_two_ranks_skip_a_nan_on_one_rank_together(tmp_path, tiny_data):
    """`deepspeed --num_gpus 2` (CPU accelerator: two processes): NaN on rank 1 only, both ranks skip step 4."""
    import shutil as sh

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out,
                          {**BASE, "run": {"save_every": 1, "keep_last": 20}, "train": {"max_steps": 6}})
    launcher = sh.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    from training.dist import free_port

    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "training.pretrain", "--config", str(config)], cwd=REPO,
                          env=env(DSBERT_FAULT_NAN_AT="4@1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "world_size=2" in text
    # Each rank logs the skip (rank 0 from the agreed flag: its own loss was finite).
    assert text.count("step 4: non-finite loss or gradient on some rank; optimizer step skipped") == 2, text[-3000:]
    assert "step00000004" not in ckpts(out)
    s3, s5 = (model_state(out / "checkpoints" / f"step0000000{i}") for i in (3, 5))
    opt_steps = [{float(st["step"]) for st in s["optimizer"]["state"].values()} for s in (s3, s5)]
    assert opt_steps == [{3.0}, {4.0}], opt_steps  # one update in steps 4-5 on rank 0 too: both skipped 4
    assert [r["step"] for r in metrics(out) if r.get("kind") == "fault"] == [4]
    assert meta(out, "step00000006")["train_state"]["skipped_steps"] == 1
    for rank in (0, 1):
        assert (out / "checkpoints" / "step00000006" / f"rng_rank{rank}.pt").is_file()


@pytest.mark.slow
def test_two_ranks_agree_on_a_signal_sent_to_one(tmp_path, tiny_data):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out, {**BASE, "train": {"max_steps": 40}})
    procs = _start_ranks(config, 2, {})
    deadline = time.monotonic() + 120
    while max((r["step"] for r in metrics(out) if r.get("kind") == "train"), default=0) < 3:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    procs[1].send_signal(SIGTERM)  # only rank 1 is signalled
    codes = _wait(procs)
    assert codes == [75, 75], (tmp_path / "rank0.log").read_text()[-3000:]
    tag = latest(out)
    assert meta(out, tag)["train_state"]["step"] < 40
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(meta(out, tag)["files"])  # both ranks saved that step
    assert meta(out, tag)["train_state"]["step"] == max(r["step"] for r in metrics(out) if r.get("kind") == "train")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["frozen", "killed"])
def test_a_dead_or_frozen_rank_ends_the_other_naming_it(tmp_path, tiny_data, how):
    """No silent hang: with the default watchdog on (dist.heartbeat_timeout_s, here 6 s), rank 0 leaves
    with an error line naming rank 1 well before the process-group timeout (600 s here), whether rank 1
    was SIGKILLed (its sockets close) or SIGSTOPped (nothing closes: only heartbeats can tell)."""
    import signal

    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out,
                          {**BASE, "train": {"max_steps": 100000}, "dist": {"timeout_s": 600, "heartbeat_timeout_s": 6}})
    procs = _start_ranks(config, 2, {})
    try:
        deadline = time.monotonic() + 120
        while max((r["step"] for r in metrics(out) if r.get("kind") == "train"), default=0) < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                (tmp_path / "rank0.log").read_text()[-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGSTOP if how == "frozen" else signal.SIGKILL)
        start = time.monotonic()
        code = procs[0].wait(timeout=60)
        took = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    log = (tmp_path / "rank0.log").read_text()
    assert code != 0, log[-3000:]
    assert "error: rank 1 stopped responding" in log, log[-3000:]
    assert took < 6 + 20, (took, log[-3000:])
