"""Issue 30 item 6: run.report_to builds DeepSpeed's monitor blocks; W&B is offline unless told otherwise; the
run's one monitor writes through every logger by global step. W&B and Comet are faked (not installed here): the
fakes record what DeepSpeed's WandbMonitor / CometMonitor hand them."""
import os
import sys
import types

import pytest

from training.config import RunConfig
from training.engine.ds_config import check_report_to, monitor_blocks
from training.errors import UserError


def _cfg(*loggers):
    return RunConfig.model_validate({"train": {"max_steps": 2}, "run": {"report_to": list(loggers)}})


def test_report_to_makes_the_monitor_blocks(tmp_path):
    blocks = monitor_blocks(_cfg("tensorboard", "csv", "wandb", "comet"), tmp_path / "myrun")
    assert blocks["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "myrun" / "tensorboard"),
                                     "job_name": "myrun"}
    assert blocks["csv_monitor"]["output_path"] == str(tmp_path / "myrun" / "csv")
    assert blocks["wandb"] == {"enabled": True, "project": "run"} and blocks["comet"]["experiment_name"] == "myrun"
    assert monitor_blocks(_cfg(), tmp_path) == {}


def test_a_missing_logger_package_is_refused(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"run.report_to: wandb needs the wandb package, which is not installed"):
        check_report_to(_cfg("tensorboard", "wandb"))
    check_report_to(_cfg("tensorboard", "csv"))


def test_wandb_logs_offline_through_the_runs_monitor(tmp_path, monkeypatch, dist_single):
    from training.metrics import MetricsWriter, make_monitor

    seen = {}
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: seen.update(init=kw, mode=os.environ.get("WANDB_MODE"), dir=os.environ.get("WANDB_DIR"))
    fake.log = lambda data, step=None, commit=None: seen.setdefault("log", []).append((data, step))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for key in ("WANDB_MODE", "WANDB_DIR", "WANDB_NAME"):  # set, then unset: monkeypatch restores them after
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    out = tmp_path / "myrun"
    out.mkdir()
    writer = MetricsWriter(out / "metrics.jsonl", True, lambda: make_monitor(monitor_blocks(_cfg("wandb"), out), out))
    writer.write({"kind": "train", "step": 7, "loss": 2.5, "lr": 1e-3, "samples": 224})
    assert seen["mode"] == "offline" and seen["dir"] == str(out) and seen["init"]["project"] == "run"
    assert ({"train/loss": 2.5}, 7) in seen["log"] and ({"train/samples": 224.0}, 7) in seen["log"]
