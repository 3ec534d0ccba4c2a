"""Deterministic resume: a run killed with SIGKILL at a random step and resumed with --resume ends with
parameters and optimizer state bit-identical to an uninterrupted run (CPU, fp32, fixed seed)."""
from __future__ import annotations

import os
import random

import pytest

from tests.helpers.reliability import (RESUME_CONFIGS, SIGKILL, assert_bit_identical, metrics,  # noqa: F401
                                            reference_run, run_pretrain, start_and_signal, tiny_data,
                                            total_steps, write_config)


@pytest.mark.parametrize("cfg_id,overrides", RESUME_CONFIGS, ids=[c[0] for c in RESUME_CONFIGS])
def test_sigkill_at_random_step_then_resume_is_bit_identical(tmp_path, tmp_path_factory, tiny_data, cfg_id,
                                                             overrides):
    ref = reference_run(tmp_path_factory, tiny_data, cfg_id, overrides)
    total = total_steps(overrides)
    # After the first checkpoint (step 2), before the end; RELIABILITY_KILL_STEP pins it to reproduce.
    kill_at = int(os.environ.get("RELIABILITY_KILL_STEP") or random.randint(3, total - 2))
    out = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", tiny_data, out, overrides)
    _, rc, err = start_and_signal(config, kill_at, SIGKILL)
    assert rc == -9, f"kill at step {kill_at}: rc {rc}\n{err[-2000:]}"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest and (out / "checkpoints" / latest / "meta.json").is_file()

    proc = run_pretrain(config, "--resume")
    assert proc.returncode == 0, f"(killed at step {kill_at})\n{proc.stderr[-3000:]}"
    assert f"resumed from {latest}" in proc.stderr
    assert_bit_identical(ref, out / "checkpoints" / f"step{total:08d}")
    # The metrics read as one run: records written after the checkpoint by the killed process are dropped.
    steps = [r["step"] for r in metrics(out) if r.get("kind") == "train"]
    assert steps == list(range(1, total + 1)), f"(killed at step {kill_at}) {steps}"
    ref_loss = [r["loss"] for r in metrics(ref.parent.parent) if r.get("kind") == "train"]
    assert [r["loss"] for r in metrics(out) if r.get("kind") == "train"] == ref_loss
