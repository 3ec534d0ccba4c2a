"""Issue 30 items 2 and 3: train.max_steps scales a staged run; did-you-mean; --set with several pairs;
--print-config and --dry-run (no training, no run dir); configs found from another directory."""

import pytest

from training.config.length import split_steps
from training.errors import UserError
from training.stages.plan import load_config
from tests.helpers import paths as PATHS

REPO = PATHS.REPO
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


def test_a_missing_config_names_the_nearest_shipped_one(tmp_path):
    with pytest.raises(UserError, match=r"config file not found: configs/defualt.yaml \(did you mean "
                                        r"configs/default.yaml\?\)"):
        load_config("configs/defualt.yaml")
