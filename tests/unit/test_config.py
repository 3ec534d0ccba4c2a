"""The run config: YAML, overrides, the schema's domains, `base:` inheritance and the shipped configs."""
import json

import pytest

from training.config import RunConfig, apply_overrides
from training.stages.plan import load_config
from training.engine.ds_config import deepspeed_json
from training.errors import UserError
from tests.helpers import paths as PATHS


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
    cfg = load_config(_write(tmp_path, "train: {max_steps: 5, micro_batch_size: 8, grad_accum: 2, grad_clip: 0.5, "
                                       "precision: bf16}\n"))
    ds = deepspeed_json(cfg, world_size=2, out_dir=tmp_path)
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 32 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["zero_optimization"]["stage"] == 0
    assert "optimizer" not in ds
    # The loggers are the run's one monitor (training/metrics.py), not each engine's: no monitor block here.
    assert not {"tensorboard", "wandb", "csv_monitor", "comet"} & set(ds)


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
    paths = sorted(PATHS.REPO.glob("configs/**/*.yaml"))  # bench and plateau too
    assert any(p.parent.name == "small" for p in paths)
    for path in paths:
        cfg = load_config(path)
        assert all(cfg.stage_model(i) for i in range(len(cfg.stages))), path


def test_configs_and_docs_name_no_path_of_a_particular_machine():
    """Paths in what we ship are relative to the repository or given by the user."""
    import re

    repo = PATHS.REPO
    machine_path = re.compile(r"(?<![\w.])/(work|home|root|mnt|scratch)/\w")
    shipped = [p for pattern in ("configs/**/*.yaml", "configs/**/*.md", "*.md", "docs/*.md", "slurm/*",
                                 "deepspeed_configs/*", "training/**/*.py", "training/**/*.md", "kernels/*")
               for p in repo.glob(pattern) if p.is_file()]
    assert len(shipped) > 30
    offenders = [f"{p.relative_to(repo)}:{i}" for p in shipped
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if machine_path.search(line)]
    assert not offenders, offenders


# -- every field has its domain in the schema: one line naming the field, nothing later crashes on it

_TEN = "train: {max_steps: 10}\n"
_THREE_STAGES = "stages: [{name: a, steps: 4}, {name: b, steps: 4}, {name: c, steps: 4}]\n"


@pytest.mark.parametrize("text,overrides,needle", [
    # non-finite numbers (NaN gradient clipping would silently clip nothing)
    (_TEN, ["optimizer.lr=.nan"], "optimizer.lr must be positive and finite, got nan"),
    (_TEN, ["train.grad_clip=.nan"], "train.grad_clip must be a finite number >= 0, got nan"),
    (_TEN, ["train.grad_clip=.inf"], "train.grad_clip must be a finite number >= 0, got inf"),
    (_TEN, ["optimizer.weight_decay=-.inf"], "optimizer.weight_decay must be a finite number >= 0"),
    (_TEN, ["model.initializer_range=.nan"], "model.initializer_range must be positive and finite"),
    (_TEN, ["dist.heartbeat_timeout_s=.inf"], "dist.heartbeat_timeout_s must be positive and finite, got inf"),
    ("stages: [{name: a, steps: 4, locality_bias: {end: .nan}}]\n", [],
     "stages.0.locality_bias.end must be a finite number >= 0, got nan"),
    # epsilons: > 0 (both are divided by when their variance is 0)
    (_TEN, ["optimizer.eps=-1.0e-8"], "optimizer.eps must be positive and finite, got -1e-08"),
    (_TEN, ["optimizer.eps=0"], "optimizer.eps must be positive and finite, got 0"),
    (_TEN, ["model.layer_norm_eps=-1.0e-12"], "model.layer_norm_eps must be positive and finite"),
    # token ids
    (_TEN, ["model.pad_token_id=8192"], "model.pad_token_id must be in [0, model.vocab_size=8192), got 8192"),
    (_TEN, ["model.vocab_size=100", "model.pad_token_id=100"],
     "model.pad_token_id must be in [0, model.vocab_size=100)"),
    (_TEN, ["model.pad_token_id=-1"], "model.pad_token_id must be >= 0, got -1"),
    # probabilities and rates
    (_TEN, ["data.mlm_probability=1.5"], "data.mlm_probability must be in (0, 1), got 1.5"),
    (_TEN, ["data.mlm_probability=0"], "data.mlm_probability must be in (0, 1), got 0"),
    (_TEN, ["model.dropout=1"], "model.dropout must be in [0, 1), got 1"),
    (_TEN, ["optimizer.betas=[0.9, 1.0]"], "optimizer.betas.1 must be in [0, 1), got 1.0"),
    ("model: {norm: pre}\nstages: [{name: a, steps: 4, layer_drop: {theta_bar: 1.5}}]\n", [],
     "stages.0.layer_drop.theta_bar must be in (0, 1], got 1.5"),
    ("model: {norm: pre}\nstages: [{name: a, steps: 4, layer_drop: {theta_bar: 0}}]\n", [],
     "stages.0.layer_drop.theta_bar must be in (0, 1], got 0"),
    ("stages: [{name: a, steps: 4, locality_bias: {start: -1}}]\n", [],
     "stages.0.locality_bias.start must be a finite number >= 0, got -1"),
    ("stages: [{name: a, steps: 4, model: {attention_dropout: 1.5}}]\n", [],
     "stage 'a': model.attention_dropout must be in [0, 1), got 1.5"),
    # timeouts
    (_TEN, ["dist.timeout_s=0"], "dist.timeout_s must be positive, got 0"),
    (_TEN, ["dist.heartbeat_timeout_s=0"], "dist.heartbeat_timeout_s must be positive and finite, got 0"),
    (_TEN, ["dist.heartbeat_timeout_s=-5"], "dist.heartbeat_timeout_s must be positive and finite, got -5"),
    # other numbers
    (_TEN, ["optimizer.decay_power=0"], "optimizer.decay_power must be positive and finite, got 0"),
    (_TEN, ["train.max_steps=true"], "train.max_steps must be an integer, got True"),
    (_TEN, ["train.max_steps=2.5"], "train.max_steps must be an integer, got 2.5"),
    (_TEN, ["run.seed=-1"], "run.seed must be in [0, 4294967296), got -1"),
    (_TEN, ["model.heads_per_layer=[4, 0, 4, 4]"], "model.heads_per_layer.1 must be positive, got 0"),
    ("stages: [{name: a, steps: 4, seq_len: 4}]\n", [], "stages.0.seq_len must be >= 8, got 4"),
    # deepspeed.extra: JSON values, and the documented type of a few keys
    (_TEN, ["deepspeed.extra=[1, 2]"], "deepspeed.extra must be a valid dictionary"),
    (_TEN, ["deepspeed.extra={x: .nan}"], "deepspeed.extra.x must be a finite number, got nan"),
    (_TEN, ["deepspeed.extra={x: [1, 2020-01-01]}"], "deepspeed.extra.x.1 must be a JSON value"),
    (_TEN, ["deepspeed.extra={x: !!binary aGk=}"], "deepspeed.extra.x must be a JSON value"),
    (_TEN, ["deepspeed.extra={fp16: true}"], "deepspeed.extra.fp16 must be a mapping, got True"),
    (_TEN, ["deepspeed.extra={prescale_gradients: 1}"], "deepspeed.extra.prescale_gradients must be true or false"),
    (_TEN, ["deepspeed.extra={zero_optimization: {overlap_comm: sure}}"],
     "deepspeed.extra.zero_optimization.overlap_comm must be true or false, got 'sure'"),
    (_TEN, ["deepspeed.extra={zero_optimization: {reduce_bucket_size: 5e8}}"],
     "deepspeed.extra.zero_optimization.reduce_bucket_size must be an integer >= 0, got '5e8' (a string to YAML"),
    # --set paths and values
    (_THREE_STAGES, ["stages.7.steps=1"], "--set stages.7.steps: stages has 3 entries (indices 0-2), no index 7"),
    (_THREE_STAGES, ["stages.first.steps=1"],
     "--set stages.first.steps: stages is a list, so 'first' must be an index"),
    (_TEN, ["stages.0.steps=1"], "--set stages.0.steps: stages is not set, so it has no index 0"),
    (_TEN, ["stages=[]", "stages.0=x"], "--set stages.0: stages has no entries, no index 0"),
    (_TEN, ["train.max_steps.x=1"], "--set train.max_steps.x: train.max_steps is 10, not a section or list"),
    (_TEN, ["train..max_steps=1"], "--set 'train..max_steps': expected a dotted key"),
    (_TEN, ["train.max_steps=["], "--set train.max_steps=[: not a valid YAML value (line 1, column 2"),
    (_TEN, ["deepspeed.extra={a: 1, a: 2}"], "--set deepspeed.extra={a: 1, a: 2}: not a valid YAML value"),
    # YAML: errors name the line; a key given twice is an error
    ("train:\n  max_steps: 10\n  grad_clip: 1.0\n  max_steps: 20\n", [],
     "c.yaml: line 4: duplicate key 'max_steps' (first at line 2)"),
    ("train: {max_steps: 10}\noptimizer: {lr: 1.0e-3}\noptimizer: {eps: 1.0e-6}\n", [],
     "c.yaml: line 3: duplicate key 'optimizer' (first at line 2)"),
    ("train:\n  max_steps: 10\n\tgrad_accum: 2\n", [], "c.yaml: not valid YAML (line 3, column 1:"),
    ("run:\n  name: x\ntrain: {max_steps: [\n", [], "c.yaml: not valid YAML (line 4,"),
    ("run: {name: \"a\x00\"}\n", [], "c.yaml: not valid YAML (line 1: unacceptable character"),
    # the first stage's LR warmup must fit in it (training/engine/schedule.py refuses it later otherwise)
    (_TEN, ["optimizer.warmup_steps=11"], "optimizer.warmup_steps=11 exceeds train.max_steps=10"),
    (_THREE_STAGES, ["optimizer.warmup_steps=5"], "optimizer.warmup_steps=5 exceeds stages.0.steps=4 (stage 'a')"),
    ("stages: [{name: a, steps: 2}, {name: b, steps: 100}]\n", [],
     "optimizer.warmup_fraction=0.06 of the run's 102 steps is 6 warmup steps, more than stages.0.steps=2"),
    (_THREE_STAGES, ["stages.2.warmup_steps=5"], "stages.2.warmup_steps=5 exceeds stages.2.steps=4 (stage 'c')"),
])
def test_out_of_domain_values_give_one_line_naming_the_field(tmp_path, text, overrides, needle):
    with pytest.raises(UserError) as err:
        load_config(_write(tmp_path, text), overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


@pytest.mark.parametrize("text,overrides", [
    (_TEN, ["optimizer.warmup_steps=10"]),  # a warmup as long as the run is allowed
    (_TEN, ["model.pad_token_id=8191", "train.grad_clip=0", "optimizer.weight_decay=0"]),
    (_TEN, ["dist.heartbeat_timeout_s=null", "model.dropout=0", "optimizer.betas=[0, 0.5]"]),
    ("train:\n", ["train.max_steps=3"]),  # an empty section in the file is a section --set can fill
    (_TEN, ["deepspeed.extra={zero_optimization: {reduce_bucket_size: 5.0e+8, overlap_comm: true}, x: [1, null]}"]),
    ("stages:\n  - &first {name: a, steps: 4}\n  - {<<: *first, name: b}\n", []),  # a merge may override
    ("stages: [{name: a, tokens: 100}, {name: b, steps: 2}]\n", ["optimizer.warmup_fraction=0.5"]),  # at run time
])
def test_values_at_the_edge_of_their_domain_load(tmp_path, text, overrides):
    load_config(_write(tmp_path, text), overrides)


def test_the_domains_are_in_the_json_schema():
    schema = RunConfig.model_json_schema()
    optimizer = schema["$defs"]["OptimizerSection"]["properties"]
    assert optimizer["lr"]["exclusiveMinimum"] == 0 and optimizer["eps"]["exclusiveMinimum"] == 0
    data = schema["$defs"]["DataSection"]["properties"]["mlm_probability"]
    assert data["exclusiveMinimum"] == 0 and data["exclusiveMaximum"] == 1


def test_every_shipped_config_loads_with_the_domains():
    configs = PATHS.REPO / "configs"
    paths = sorted([*configs.glob("*.yaml"), *configs.glob("bench/*/*.yaml"), *configs.glob("plateau/*.yaml")])
    assert len(paths) > 20
    for path in paths:
        cfg = load_config(path)
        assert all(cfg.stage_model(i) for i in range(len(cfg.stages))), path


def test_a_loaded_config_is_frozen(tmp_path):
    """Resolved once, then never changed: assignment is refused; a changed config is a model_copy."""
    import pydantic

    path = tmp_path / "c.yaml"
    path.write_text("train: {max_steps: 3}\n")
    cfg = load_config(path)
    with pytest.raises(pydantic.ValidationError):
        cfg.train.max_steps = 5
    with pytest.raises(pydantic.ValidationError):
        cfg.stages = []
    assert cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 5})}).train.max_steps == 5
    assert cfg.train.max_steps == 3 and [s.steps for s in cfg.stages] == [3]


# -- base: one config built on another

def test_a_config_builds_on_its_base_and_overrides_only_what_it_says(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "base.yaml").write_text("run: {seed: 7, eval_every: 50}\nmodel: {num_layers: 4, hidden_size: 64, "
                                        "num_heads: 2}\ntrain: {max_steps: 100}\n")
    (tmp_path / "bench" / "child.yaml").write_text(
        "base: ../base.yaml\nrun: {eval_every: 25}\ntrain: {max_steps: null}\n"
        "stages:\n  - {name: a, steps: 10, model: {num_layers: 2}}\n  - {name: b, steps: 20, hook: stack}\n")
    cfg = load_config(tmp_path / "bench" / "child.yaml")
    assert (cfg.run.seed, cfg.run.eval_every) == (7, 25)  # a mapping merges key by key
    assert (cfg.model.num_layers, cfg.model.hidden_size) == (4, 64)
    assert cfg.train.max_steps is None and [s.name for s in cfg.stages] == ["a", "b"]  # null and lists replace
    (tmp_path / "grandchild.yaml").write_text("base: bench/child.yaml\nrun: {seed: 8}\n")
    cfg = load_config(tmp_path / "grandchild.yaml", ["run.eval_every=5"])
    assert (cfg.run.seed, cfg.run.eval_every, len(cfg.stages)) == (8, 5, 2)  # --set still comes last


@pytest.mark.parametrize("text, message", [
    ("base: missing.yaml\n", r"x.yaml: base missing.yaml: config file not found: .*missing.yaml"),
    ("base: x.yaml\n", "x.yaml: base x.yaml leads back to itself"),
    ("base: [a.yaml]\n", "base must be the path of another config file"),
    ("base: y.yaml\n", r"x.yaml: base y.yaml: .*y.yaml: base x.yaml leads back to itself"),
])
def test_a_bad_base_is_one_line(tmp_path, text, message):
    (tmp_path / "x.yaml").write_text(text)
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(UserError, match=message):
        load_config(tmp_path / "x.yaml")


def test_shipped_configs_resolve_to_what_they_said_in_full():
    """The bench folders and method recipes name a `base:` instead of repeating its model, data and optimizer;
    each still resolves to exactly the config it was when written out in full (tests/data/
    shipped_configs_flat.json: every shipped file's whole mapping before the `base:` chains)."""

    from training.config import read_config

    repo = PATHS.REPO
    flat = json.loads((PATHS.DATA / "shipped_configs_flat.json").read_text())
    assert len(flat) >= 40
    for name, mapping in flat.items():
        assert read_config(repo / name) == RunConfig.model_validate(mapping), name
    based = [name for name in flat if name.startswith(("configs/bench/small/", "configs/bench/bert-base/"))
             and not name.endswith("/baseline.yaml")]
    assert based and all((repo / name).read_text().count("\nbase: ") == 1 for name in based)


def test_print_config_shows_a_based_config_merged():
    import io

    from training.pretrain_cli import print_config

    out = io.StringIO()
    print_config(load_config(PATHS.REPO / "configs/bench/small/stacking.yaml"), out)
    shown = out.getvalue()
    assert "vocab_size: 2048" in shown and "norm: pre" in shown  # from baseline.yaml
    assert "name: layers1" in shown and "out_dir: runs/bench/small/stacking" in shown  # its own
    assert "max_steps: null" in shown and "base" not in shown
