"""Issue 30 items 6 and 7, end to end with `python -m training.pretrain` on the tiny data: loggers through one
DeepSpeed monitor per run (curves that go on across a stage boundary, one events file, CSV), a missing logger
package refused before the run dir exists, --resume TAG, a changed schedule said, a finished run's score."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import yaml

from tests.helpers.reliability import metrics, run_pretrain
from tests.helpers.tiny_run import TINY_MODEL

pytestmark = pytest.mark.slow


def _config(root: Path, tiny_data: Path, **run) -> Path:
    config = {"run": {"out_dir": str(root / "run"), "progress": False, "peak_tflops": 1.0, "log_every": 1,
                      "eval_every": 1000, "eval_batches": 1, "eval_batch_size": 8, "save_every": 2,
                      "export_hf": False, "report_to": ["tensorboard", "csv"], **run},
              "data": {"dir": str(tiny_data)}, "model": {**TINY_MODEL},
              "train": {"precision": "fp32", "micro_batch_size": 4}, "optimizer": {"warmup_steps": 1},
              "stages": [{"name": "a", "steps": 3, "model": {"num_layers": 1}},
                         {"name": "b", "steps": 3, "hook": "stack", "warmup_steps": 1}]}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory, tiny_data):
    root = tmp_path_factory.mktemp("features")
    config = _config(root, tiny_data)
    proc = run_pretrain(config, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, config, proc


def test_one_monitor_whose_curves_go_on_across_the_stage_boundary(staged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, proc = staged_run
    out = root / "run"
    files = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert [f.parent for f in files] == [out / "tensorboard" / "run"]  # one file, in a folder named after the run
    events = EventAccumulator(str(files[0]))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/lr")]
    samples = [e.value for e in events.Scalars("train/samples")]
    assert steps == [1, 2, 3, 4, 5, 6]  # by global step, through the growth at step 3
    assert samples == [4.0 * s for s in steps]  # global samples go on: DeepSpeed's own restarted at the rebuild
    assert not any(tag.startswith("Train/Samples") for tag in events.Tags()["scalars"])
    with open(out / "csv" / "run" / "train_lr.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "lr"] and [int(r[0]) for r in rows[1:]] == steps
    assert f"tensorboard: {out / 'tensorboard' / 'run'}" in proc.stdout


def test_a_missing_logger_package_is_one_line_before_the_run_dir(tmp_path, tiny_data):
    missing = next((m for m, pkg in (("comet", "comet_ml"), ("wandb", "wandb")) if importlib.util.find_spec(pkg) is None),
                   None)
    if missing is None:
        pytest.skip("wandb and comet_ml are both installed here")
    config = _config(tmp_path, tiny_data, report_to=["tensorboard", missing])
    proc = run_pretrain(config, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: run.report_to: {missing} needs the ") and "pip install" in lines[-1]
    assert not (tmp_path / "run").exists()


def test_a_finished_run_resumed_prints_its_score_and_opens_no_events_file(staged_run):
    root, config, first = staged_run
    proc = run_pretrain(config, "--resume", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [line for line in proc.stdout.splitlines() if line.startswith("done:")]
    assert done and "held-out MLM loss" in done[0] and "nats below it" in done[0]
    assert done[0].split(", held-out")[1] == [x for x in first.stdout.splitlines() if x.startswith("done:")][0] \
        .split(", held-out")[1]  # the same checkpoint, the same score
    assert len(list((root / "run" / "tensorboard").rglob("events.out.tfevents.*"))) == 1


def test_resume_a_tag_with_a_changed_schedule(staged_run):
    from training.errors import UserError
    from training.resume import choose

    root, config, _ = staged_run
    ckpt = root / "run" / "checkpoints"
    # --resume PATH: a checkpoint dir of this run, verified; the newer ones are what it abandons
    assert choose(ckpt, str(ckpt / "step00000004")) == ("step00000004", [], ["step00000006"])
    assert choose(ckpt, "latest") == ("step00000006", [], [])
    other = root / "elsewhere" / "checkpoints"
    other.mkdir(parents=True)
    (other / "step00000002").mkdir()
    (other / "step00000002" / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="a checkpoint of another run"):
        choose(ckpt, str(other / "step00000002"))
    proc = run_pretrain(config, "--resume", "step00000003", timeout=120)  # not a checkpoint: one line, nearest
    assert proc.returncode == 2 and "did you mean step00000002?" in proc.stderr
    proc = run_pretrain(config, "--resume", "step00000002", "--set", "optimizer.lr=1e-2", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--resume at step 2 with a schedule that differs" in proc.stderr
    assert "LR at step 2: 0.0016 -> 0.008" in proc.stderr  # warm-up over, linear decay: 2e-3 * 4/5, 1e-2 * 4/5
    # the newer checkpoints of the old schedule are kept aside, never resumed or pruned
    assert (ckpt / "step00000004.abandoned").is_dir() and (ckpt / "step00000006.abandoned").is_dir()
    assert (ckpt / "latest").read_text().strip() == "step00000006"
    train = [r for r in metrics(root / "run") if r.get("kind") == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # the old steps 3-6 were re-done, not appended
