"""Signals end runs cleanly everywhere, and metrics after a resume hold each record once (issue 29, items 7-8).

* Ctrl-C in pretrain checkpoints and exits 75 like SIGTERM (tests/integration/test_reliability.py's pre-emption test runs
  SIGINT too); a second Ctrl-C before the checkpoint exits 130 at once with one line, leaving no half checkpoint.
* finetune killed with SIGTERM during an --overwrite sweep puts the previous sweep back (training/errors.py turns
  the signal into an exception, the sweep's clean-up runs); after a SIGKILL, the next run names the previous
  sweep left at OUT.replaced-* and, with --overwrite, deletes it when it completes.
* A run killed right after a stage transition (its checkpoint at the stage's end, the transition record after
  it) and resumed writes the transition once: each checkpoint records metrics.jsonl's length, a resume cuts the
  file there (training/metrics.py truncate_metrics).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.reliability import (REPO, RESUME_CONFIGS, assert_bit_identical, env,  # noqa: F401
                                            hf_and_task, metrics, pretrain_cmd, reference_run, run_pretrain,
                                            tiny_data, total_steps, tree_digest, write_config)

BASE_ID, BASE = RESUME_CONFIGS[0]
STACK_ID, STACK = RESUME_CONFIGS[2]  # stages l1 (5 steps) then l2 (7 steps), a growth transition at step 5


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _signalled(cmd: list[str], stderr: Path, ready, what: str, signals: list[int], **env_extra: str) -> tuple:
    """Run `cmd` (stderr to a file), send `signals` one second apart once `ready()` holds; its exit code and
    stderr as (code, text)."""
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env(**env_extra), stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + 120
            while not ready():
                assert proc.poll() is None, f"ended (rc {proc.returncode}) before {what}:\n{stderr.read_text()}"
                assert time.monotonic() < deadline, f"no {what} in 120 s"
                time.sleep(0.02)
            for i, sig in enumerate(signals):
                time.sleep(1.0 if i else 0.0)
                proc.send_signal(sig)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rc, stderr.read_text()


# ------------------------------------------------------------------ 7. Ctrl-C and SIGTERM

@pytest.mark.slow  # a run interrupted in a 3 s save, then resumed to the end: ~30 s
def test_a_second_ctrl_c_exits_130_at_once_and_leaves_no_half_checkpoint(tmp_path, tmp_path_factory, tiny_data):
    ref = reference_run(tmp_path_factory, tiny_data, BASE_ID, BASE)
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out, BASE)
    # Every save pauses 3 s: the first Ctrl-C asks for a checkpoint, the second arrives while it is written.
    rc, stderr = _signalled(pretrain_cmd(config), tmp_path / "stderr",
                            lambda: any(r.get("kind") == "train" and r["step"] >= 3 for r in metrics(out)), "step 3",
                            [signal.SIGINT, signal.SIGINT], DSBERT_FAULT_SLEEP_IN_SAVE="3")
    assert rc == 130, stderr[-3000:]
    assert _error_lines(stderr) == ["error: interrupted by Ctrl-C (SIGINT); stopped (exit 130)"], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    ckpts = out / "checkpoints"
    assert not [p.name for p in ckpts.iterdir() if ".tmp" in p.name]  # the interrupted save removed its half
    latest = (ckpts / "latest").read_text().strip()
    assert (ckpts / latest / "meta.json").is_file()
    proc = run_pretrain(config, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_bit_identical(ref, ckpts / f"step{total_steps(BASE):08d}")


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory, tiny_data) -> tuple[Path, Path]:  # noqa: F811
    """(a tiny HF model: the reliability run exported, a two-class csv task)."""
    run = reference_run(tmp_path_factory, tiny_data, BASE_ID, BASE).parent.parent
    return hf_and_task(run, tmp_path_factory.mktemp("sweep"))


def _finetune_argv(model: Path, task: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--task", f"csv:{task}", "--out", str(out), "--batch-size", "4", *extra]


def test_finetune_sigterm_during_an_overwrite_puts_the_previous_sweep_back(tmp_path, sweep_inputs):
    from training.finetune import main

    model, task = sweep_inputs
    out = tmp_path / "ft"
    assert main(_finetune_argv(model, task, out, "--max-steps", "1")) == 0
    before = tree_digest(out)
    argv = _finetune_argv(model, task, out, "--max-steps", "1000000", "--overwrite")
    cmd = [sys.executable, "-m", "training.finetune", *argv]
    # Once it trains, with the previous sweep moved aside.
    rc, stderr = _signalled(cmd, tmp_path / "stderr", lambda: "fine-tuning task" in (tmp_path / "stderr").read_text()
                            and bool(list(tmp_path.glob("ft.replaced-*"))), "training", [signal.SIGTERM])
    assert rc == 143, stderr[-3000:]
    assert _error_lines(stderr) == ["error: interrupted by SIGTERM; stopped (exit 143)"], stderr[-3000:]
    assert "Traceback" not in stderr and f"the previous {out} is back" in stderr, stderr[-3000:]
    assert tree_digest(out) == before
    assert not list(tmp_path.glob("ft.replaced-*")) and list(tmp_path.glob("ft.failed-*"))


def test_finetune_names_a_previous_sweep_a_sigkill_left_aside_and_cleans_it_up(tmp_path, sweep_inputs, capsys):
    """The state a SIGKILL during an --overwrite leaves: OUT holds the killed sweep, its marker names the previous
    one at OUT.replaced-*."""
    from training.finetune import MARKER, main

    model, task = sweep_inputs
    out, aside = tmp_path / "ft", tmp_path / "ft.replaced-20260101-000000-4242"
    for d in (out, aside):
        d.mkdir()
        (d / "results.json").write_text('{"complete": false}\n')
    (aside / MARKER).write_text(json.dumps({"written_by": "training.finetune"}))
    (out / MARKER).write_text(json.dumps({"written_by": "training.finetune", "replaces": [str(aside)]}))
    with pytest.raises(SystemExit):
        main(_finetune_argv(model, task, out, "--max-steps", "1"))
    assert f"{aside} holds the sweep an interrupted --overwrite moved aside" in capsys.readouterr().err
    assert main(_finetune_argv(model, task, out, "--max-steps", "1", "--overwrite")) == 0
    assert f"warning: {aside}: a sweep of {out} an interrupted --overwrite moved aside" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]  # both earlier sweeps gone, this one complete
    assert json.loads((out / "results.json").read_text())["complete"] is True


# ------------------------------------------------------------------ 8. each metrics record once after a resume

def test_a_kill_right_after_a_stage_transition_leaves_each_record_once(tmp_path, tiny_data):  # noqa: F811
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out, {**STACK, "run": {"save_every": 1}})
    # Checkpoint at step 5 (stage l1's end), then the transition record, then SIGKILL inside step 6's save.
    proc = run_pretrain(config, DSBERT_FAULT_KILL_IN_SAVE="6")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["step"] for r in metrics(out) if r.get("kind") == "transition"] == [5]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000005"
    proc = run_pretrain(config, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [(r.get("kind"), r.get("step")) for r in metrics(out)]
    assert records.count(("transition", 5)) == 1
    assert len(records) == len(set(records)), [r for r in records if records.count(r) > 1]
    assert [s for k, s in records if k == "train"] == list(range(1, total_steps(STACK) + 1))


def test_truncate_metrics_cuts_at_the_checkpoints_length_else_by_step(tmp_path):
    from training.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    head = '{"kind": "train", "step": 5}\n{"kind": "eval", "step": 5}\n'
    tail = '{"kind": "transition", "step": 5}\n{"kind": "train", "step": 6}\n{"cut'
    path.write_text(head + tail)
    truncate_metrics(path, 5, len(head.encode()))  # the checkpoint of step 5 was written before the transition
    assert path.read_text() == head
    path.write_text(head + tail)
    truncate_metrics(path, 5, len(head.encode()) - 3)  # not a record boundary (the file was edited): by step
    assert path.read_text() == head + '{"kind": "transition", "step": 5}\n'
    path.write_text(head)
    truncate_metrics(path, 5, 10_000)  # longer than the file: by step
    assert path.read_text() == head
