"""Issue 30 item 8: a local task is named after its file (or --task-name), the results say which class F1
counts as positive, evaluation runs during training and is logged to TensorBoard, and the GLUE metrics are
scikit-learn's."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.test_finetune import corpora, finetune, genre_task, results, tiny_models, write_genre_task  # noqa: F401


def test_a_split_named_file_takes_its_folders_name_and_task_name_wins(tiny_models, tmp_path):
    sst = tmp_path / "sst"
    sst.mkdir()
    train, held = write_genre_task(tmp_path, 40, 10)
    shutil.copy(train, sst / "train.csv")
    shutil.copy(held, sst / "dev.csv")
    out = tmp_path / "ft"
    with pytest.raises(SystemExit) as exit_:  # one name for two tasks: one line, nothing written
        finetune("--model", str(tiny_models["post"]), "--task", f"csv:{sst / 'train.csv'},{sst / 'dev.csv'}",
                 f"csv:{train}", "--task-name", "genre40", "--out", str(out), "--max-steps", "2", "--report-to")
    assert exit_.value.code == 2 and not out.exists()
    assert finetune("--model", str(tiny_models["post"]), "--task", f"csv:{sst / 'train.csv'},{sst / 'dev.csv'}",
                    "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--max-seq-len", "32",
                    "--report-to") == 0
    assert list(results(out)["tasks"]) == ["sst"]  # not "train"
    out2 = tmp_path / "ft2"
    assert finetune("--model", str(tiny_models["post"]), "--task", f"csv:{sst / 'train.csv'},{sst / 'dev.csv'}",
                    "--task-name", "genre_small", "--out", str(out2), "--max-steps", "2", "--batch-size", "8",
                    "--max-seq-len", "32", "--report-to") == 0
    assert list(results(out2)["tasks"]) == ["genre_small"] and (out2 / "genre_small" / "seed0").is_dir()


def test_positive_class_stated_eval_during_training_and_tensorboard(tiny_models, genre_task, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, held = genre_task
    out = tmp_path / "ft"
    assert finetune("--model", str(tiny_models["post"]), "--task", f"csv:{train},{held}", "--out", str(out),
                    "--max-steps", "20", "--eval-every", "10", "--log-every", "10", "--lr", "1e-3", "--batch-size", "16",
                    "--max-seq-len", "32") == 0
    task = results(out)["tasks"]["genre"]
    assert task["f1_positive_class"] == {"id": 1, "label": "wiki"}  # labels sorted: news 0, wiki 1
    events = list((out / "genre" / "seed0" / "runs").rglob("events.out.tfevents.*"))
    assert events and len({e.parent for e in events}) == 1  # the Trainer's TensorBoard dir of this seed
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    evals = [e.step for e in acc.Scalars("eval/loss")]
    assert evals[:2] == [10, 20]  # during training, every --eval-every steps
    assert "eval/accuracy" in acc.Tags()["scalars"] and "train/loss" in acc.Tags()["scalars"]


def test_metrics_are_scikit_learns():
    from sklearn.metrics import f1_score, matthews_corrcoef

    from training import finetune_tasks as ft

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert ft.f1_binary(p, y) == f1_score(y, p) and ft.matthews_corr(p, y) == matthews_corrcoef(y, p)
