import json

import pytest

from training.config import RunConfig, apply_overrides, deepspeed_json, load_config
from training.errors import UserError


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_make_a_single_stage(tmp_path):
    cfg = load_config(_write(tmp_path, "train: {max_steps: 10}\n"))
    assert [s.name for s in cfg.stages] == ["main"] and cfg.stages[0].steps == 10


def test_a_stage_resets_the_optimizer_unless_it_asks_to_carry(tmp_path):
    # The default is what the stacking and CompoundGrow authors do at a growth: a fresh optimizer.
    text = ("model: {num_layers: 4}\nstages:\n  - {name: a, steps: 1, model: {num_layers: 1}}\n"
            "  - {name: b, steps: 1, model: {num_layers: 2}, hook: stack}\n"
            "  - {name: c, steps: 1, hook: stack, optimizer_state: carry}\n")
    cfg = load_config(_write(tmp_path, text))
    assert [s.optimizer_state for s in cfg.stages] == ["reset", "reset", "carry"]


@pytest.mark.parametrize("text,needle", [
    ("train: {max_steps: 10, bogus: 1}\n", "unknown config key 'train.bogus'"),
    ("nonsense: 1\ntrain: {max_steps: 10}\n", "unknown config key 'nonsense'"),
    ("train: {max_steps: 10}\nmodel: {hidden_size: 100, num_heads: 3}\n", "divisible by model.num_heads"),
    ("train: {max_steps: 0}\n", "train.max_steps must be positive"),
    ("train: {max_steps: 10}\noptimizer: {lr: -1}\n", "optimizer.lr must be positive"),
    ("train: {max_steps: 10, zero_stage: 2}\noptimizer: {fused: true}\n", "cannot see per-tensor boundaries"),
    ("train: {max_steps: 10, precision: fp8}\n", "train.precision"),
    ("train: {}\n", "set train.max_steps"),
    ("stages: []\n", "the list is empty"),
    ("stages: [{name: a, steps: 1}, {name: a, steps: 2}]\n", "names must be unique"),
    ("- just a list\n", "top level must be a mapping"),
    ("train: {max_steps: [\n", "not valid YAML"),
])
def test_bad_configs_give_one_clear_line(tmp_path, text, needle):
    with pytest.raises(UserError) as err:
        load_config(_write(tmp_path, text))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values():
    raw = apply_overrides({"train": {"max_steps": 3}}, ["train.max_steps=7", "optimizer.lr=1e-3",
                                                        "model.nsp=true", "optimizer.betas=[0.9, 0.98]"])
    cfg = RunConfig.model_validate(raw)
    assert cfg.train.max_steps == 7 and cfg.optimizer.lr == 1e-3 and cfg.model.nsp
    assert cfg.optimizer.betas == (0.9, 0.98)
    with pytest.raises(UserError, match="expected key=value"):
        apply_overrides({}, ["train.max_steps"])


def test_deepspeed_json_is_generated_from_the_yaml(tmp_path):
    cfg = load_config(_write(tmp_path, "train: {max_steps: 5, micro_batch_size: 8, grad_accum: 2, grad_clip: 0.5}\n"))
    ds = deepspeed_json(cfg, world_size=2, out_dir=tmp_path)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == 0
    assert ds["tensorboard"]["enabled"] and "optimizer" not in ds


def test_fp16_template_keeps_dynamic_loss_scaling(tmp_path):
    cfg = load_config(_write(tmp_path, "train: {max_steps: 5, precision: fp16}\n"))
    ds = deepspeed_json(cfg, world_size=1)
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and "bf16" not in ds


def test_template_may_not_set_owned_keys(tmp_path):
    tpl = tmp_path / "t.json"
    tpl.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": False}}))
    cfg = load_config(_write(tmp_path, f"train: {{max_steps: 5}}\ndeepspeed: {{template: {tpl}}}\n"))
    with pytest.raises(UserError, match="which the run config owns"):
        deepspeed_json(cfg, world_size=1)


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml")):
        cfg = load_config(path)
        assert all(cfg.stage_model(i) for i in range(len(cfg.stages))), path


def test_configs_and_docs_name_no_path_of_a_particular_machine():
    """Paths in what we ship are relative to the repository or given by the user."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    machine_path = re.compile(r"(?<![\w.])/(work|home|root|mnt|scratch)/\w")
    shipped = [p for pattern in ("configs/**/*.yaml", "configs/**/*.md", "*.md", "docs/*.md", "slurm/*",
                                 "deepspeed_configs/*", "training/**/*.py", "training/**/*.md", "kernels/*")
               for p in repo.glob(pattern) if p.is_file()]
    assert len(shipped) > 30
    offenders = [f"{p.relative_to(repo)}:{i}" for p in shipped
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if machine_path.search(line)]
    assert not offenders, offenders
