"""Issue 30 items 2 and 3: train.max_steps scales a staged run; did-you-mean; --set with several pairs;
--print-config and --dry-run (no training, no run dir); configs found from another directory."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.config.length import aid_outlasts_run, split_steps
from training.errors import UserError
from training.stages.plan import load_config

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "configs" / "default.yaml"


def test_max_steps_scales_every_stage_warmup_and_the_locality_aid():
    notes = []
    cfg = load_config(DEFAULT, ["train.max_steps=100"], notes)
    assert [s.steps for s in cfg.stages] == [30, 70]  # 900:2100 of 3000
    assert cfg.stages[1].warmup_steps == 1  # 25 * 70/2100 = 0.83, half up, at least 1
    assert cfg.train.locality_bias.steps == 33  # 1000 * 100/3000
    assert notes and "900 -> 30" in notes[0] and "1000 -> 33" in notes[0]
    assert cfg.model_config["frozen"]
    # The README's example was silently ignored before: 3000 steps.
    assert sum(s.steps for s in load_config(DEFAULT).stages) == 3000


def test_max_steps_flag_is_the_same_override(tmp_path):
    from training.pretrain_cli import overrides, parse_args

    args = parse_args(["--config", str(DEFAULT), "--max-steps", "100", "--set", "run.seed=1", "optimizer.lr=1e-3"])
    assert overrides(args) == ["run.seed=1", "optimizer.lr=1e-3", "train.max_steps=100"]


@pytest.mark.parametrize("steps,target,expected", [
    ([900, 2100], 100, [30, 70]),
    ([1, 1, 1], 4, [2, 1, 1]),         # largest remainder, earlier stage first on a tie
    ([1000, 1, 1], 3, [1, 1, 1]),      # every stage keeps one step
    ([5, 5], 10, [5, 5]),
    ([3, 7], 1000, [300, 700]),        # longer as well as shorter
])
def test_split_steps_adds_up_exactly(steps, target, expected):
    assert split_steps(steps, target) == expected and sum(expected) == target


def test_max_steps_refused_with_how_when_it_cannot_scale(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stages:\n  - {name: a, tokens: 10000}\n  - {name: b, steps: 5}\n")
    with pytest.raises(UserError, match=r"stage 'a', which is given in tokens .*--set stages\.0\.tokens=N"):
        load_config(p, ["train.max_steps=3"])
    with pytest.raises(UserError, match="2 stages and each needs at least 1 step"):
        load_config(DEFAULT, ["train.max_steps=1"])


def test_a_warning_when_the_locality_aid_outlasts_the_run():
    cfg = load_config(DEFAULT, ["train.max_steps=100", "train.locality_bias.steps=500"])
    # --set applies before the scaling: 500 * 100/3000 = 17 steps, within the run
    assert aid_outlasts_run(cfg, 100) is None
    cfg = load_config(DEFAULT, ["train.locality_bias.steps=5000"])
    warning = aid_outlasts_run(cfg, 3000)
    assert "evaluation and export score it without the aid" in warning


@pytest.mark.parametrize("key,suggestion", [
    ("train.max_step=5", "did you mean train.max_steps?"),
    ("trian.max_steps=5", "did you mean train.max_steps?"),
    ("train.lr=1e-3", "did you mean optimizer.lr?"),
    ("stages.1.warmup=3", "did you mean stages.1.warmup_steps?"),
    ("deepspeed.tensorboard=false", "use run.report_to"),
])
def test_an_unknown_key_suggests_the_nearest(key, suggestion):
    with pytest.raises(UserError) as err:
        load_config(DEFAULT, [key])
    assert "unknown config key" in str(err.value) and suggestion in str(err.value)


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


def test_a_missing_config_names_the_nearest_shipped_one(tmp_path):
    with pytest.raises(UserError, match=r"config file not found: configs/defualt.yaml \(did you mean "
                                        r"configs/default.yaml\?\)"):
        load_config("configs/defualt.yaml")
