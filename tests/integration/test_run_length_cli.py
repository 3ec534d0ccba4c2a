"""`python -m training.pretrain` flags as a command: --print-config, --dry-run, the locality-aid warning."""
import subprocess
import sys

import pytest
import yaml

from tests.helpers import paths as PATHS
from training.config.length import aid_outlasts_run
from training.stages.plan import load_config

REPO = PATHS.REPO


DEFAULT = REPO / "configs" / "default.yaml"


def test_a_warning_when_the_locality_aid_outlasts_the_run():
    cfg = load_config(DEFAULT, ["train.max_steps=100", "train.locality_bias.steps=500"])
    # --set applies before the scaling: 500 * 100/3000 = 17 steps, within the run
    assert aid_outlasts_run(cfg, 100) is None
    cfg = load_config(DEFAULT, ["train.locality_bias.steps=5000"])
    warning = aid_outlasts_run(cfg, 3000)
    assert "evaluation and export score it without the aid" in warning


def _cli(args, cwd, timeout=120):
    import os
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "training.pretrain", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_print_config_prints_every_default_and_exits(tmp_path):
    proc = _cli(["--config", "configs/default.yaml", "--print-config", "--set", "train.max_steps=100",
                 "run.seed=5", "--out", str(tmp_path / "run")], cwd=tmp_path)  # run from elsewhere: shipped config
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["run"]["seed"] == 5 and printed["run"]["report_to"] == ["tensorboard"]
    assert [s["steps"] for s in printed["stages"]] == [30, 70]
    assert printed["optimizer"]["betas"] == [0.9, 0.999]  # a default the YAML never states
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_plan_without_a_run_dir(tmp_path, tiny_data):
    out = tmp_path / "run"
    proc = _cli(["--config", str(DEFAULT), "--max-steps", "100", "--out", str(out), "--dry-run", "--set",
                 f"data.dir={tiny_data}", "model.vocab_size=512", "model.max_position=64"], cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:6] == ["stage", "hook", "steps", "global", "steps", "tokens"]
    layers1, layers2 = lines[2].split(), lines[3].split()
    assert layers1[:6] == ["layers1", "-", "30", "0-30", "61,440", "64"]  # 30 steps x 32 rows x 64 tokens
    assert layers2[:4] == ["layers2", "stack", "70", "30-100"]
    assert int(layers2[6].replace(",", "")) > int(layers1[6].replace(",", ""))  # two layers: more parameters
    assert float(layers2[8]) == 0.0 and float(layers1[9]) == pytest.approx(2e-3)  # LR: warm-up from 0; the peak
    assert "1000 -> 33" in proc.stdout and "no run dir created" in proc.stdout
    assert not out.exists()
