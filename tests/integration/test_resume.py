"""Resume. A run killed with SIGKILL at a random step and resumed with --resume ends with parameters and
optimizer state bit-identical to an uninterrupted run (CPU, fp32, fixed seed). Resume checks what it resumes
into (issue 15, item 6): a checkpoint records the precision, the stage's sequence length and the data's
identity it was trained with, and --resume refuses another (one `error:` line; the rows live in
tests/integration/test_bad_input.py: resume-other-precision, -data, -seq-len). A --resume that finds no
checkpoint starts from scratch without the stale metrics of the attempt before."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from tests.helpers.reliability import (RESUME_CONFIGS, SIGKILL, assert_bit_identical, metrics,  # noqa: F401
                                       reference_run, run_pretrain, start_and_signal, tiny_data, total_steps,
                                       write_config)
from training.engine import checkpoint
from training.errors import UserError


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


# ------------------------------------------------------------------------- resume without a checkpoint

@pytest.mark.slow
def test_resume_without_a_checkpoint_starts_over_without_stale_metrics(tmp_path, tiny_data):
    """An attempt killed before its first checkpoint leaves metrics.jsonl; --resume starts from scratch and
    the metrics are this run's alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".bert-run").write_text(json.dumps({"written_by": "training.pretrain", "replaces": []}))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"kind": "train", "step": s, "loss": 99.0, "stale": 1})
                                               + "\n" for s in range(1, 6)))
    config = write_config(tmp_path / "c.yaml", tiny_data, out,
                          {"train": {"max_steps": 2}, "optimizer": {"warmup_steps": 1}})
    proc = run_pretrain(config, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "starting from scratch" in proc.stderr
    records = metrics(out)
    assert records and not any(r.get("stale") for r in records)
    assert [r["step"] for r in records if r.get("kind") == "train"] == [1, 2]


# -------------------------------------------------------------------------------- what a checkpoint records

BASE_ID, BASE = RESUME_CONFIGS[0]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_data) -> Path:
    return reference_run(tmp_path_factory, tiny_data, BASE_ID, BASE).parent.parent


def _meta(run: Path) -> dict:
    tag = (run / "checkpoints" / "latest").read_text().strip()
    return json.loads((run / "checkpoints" / tag / "meta.json").read_text())


def test_a_checkpoint_records_what_it_was_trained_with(good_run, tiny_data):
    from training.data.loader import PretrainingData

    run = _meta(good_run)["run"]
    assert run["precision"] == "fp32" and run["seq_len"] == 32 and run["stage"] == "main"
    assert run["data"] == PretrainingData(str(tiny_data)).identity()
    assert run["data"]["rows"]["train"] > 0 and len(run["data"]["vocab_sha256"]) == 64


def test_the_same_data_moved_elsewhere_is_accepted(good_run, tiny_data, tmp_path):
    from training.data.loader import PretrainingData

    moved = tmp_path / "moved"
    shutil.copytree(tiny_data, moved)
    meta = _meta(good_run)
    now = {**meta["run"], "data": PretrainingData(str(moved)).identity()}
    assert now["data"]["path"] != meta["run"]["data"]["path"]
    checkpoint.check_resumable(meta, now, good_run)  # no error: same rows, tokens and vocabulary


@pytest.mark.parametrize("change, expected", [
    ({"precision": "bf16"}, "trained with train.precision=fp32, the config says train.precision=bf16"),
    ({"seq_len": 16}, "trained with seq_len 32 (stage 'main')"),
    ({"data": {"rows": {"train": 1, "heldout": 1}}}, "rows.heldout: checkpoint"),
    ({"data": {"vocab_sha256": "0" * 64}}, "vocab_sha256: checkpoint"),
])
def test_a_mismatch_is_one_line_naming_both_values(good_run, change, expected):
    meta = _meta(good_run)
    now = json.loads(json.dumps(meta["run"]))
    for key, value in change.items():
        now[key] = {**now[key], **value} if isinstance(value, dict) else value
    with pytest.raises(UserError) as err:
        checkpoint.check_resumable(meta, now, good_run / "checkpoints" / "x")
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_checkpoint_from_before_the_record_resumes_as_before(good_run):
    meta = _meta(good_run)
    old = {k: v for k, v in meta.items() if k != "run"}
    checkpoint.check_resumable(old, {"precision": "bf16", "seq_len": 8, "data": {}}, good_run)
