"""MSLT (training/stages/mslt.py): config checks, which layers are copied and frozen, the forward-only frozen
prefix, frozen parameters untouched through real training steps, resume inside a frozen stage, and (slow, 2
gloo ranks) the gradient collectives carrying exactly the trainable parameters."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_run import TINY_MODEL, make_runner, tiny_config
from training.config import StageSection
from training.engine import checkpoint
from training.errors import UserError
from training.model.bert import BertForPreTraining
from training.model.config import ModelConfig
from training.stages import mslt

REPO = Path(__file__).resolve().parent.parent

MSLT = """
stages:
  - {name: L1, steps: 2, model: {num_layers: 1}}
  - {name: L2, steps: 2, model: {num_layers: 2}, hook: mslt, optimizer_state: carry}
  - {name: L3, steps: 2, model: {num_layers: 3}, hook: mslt, hook_args: {train_top: 1}, optimizer_state: carry}
  - {name: joint, steps: 2, model: {num_layers: 3}, hook: mslt_joint, optimizer_state: carry}
"""
LAYER = "bert.encoder.layer.{}."
EMBEDDING_NAMES = ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                   "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                   "bert.embeddings.LayerNorm.bias")


def _cfg(num_layers=3, **over) -> ModelConfig:
    return ModelConfig(**{**TINY_MODEL, "num_layers": num_layers, **over})


def _stage(name="s", **args):
    return StageSection(name=name, steps=1, hook="mslt", hook_args=args)


def _frozen_model(num_layers=3, train_top=1, **over):
    torch.manual_seed(0)
    model = BertForPreTraining(_cfg(num_layers, **over))
    mslt.freeze(model, train_top)
    return model


def _batch(seed=0, batch=2, seq=16, vocab=TINY_MODEL["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# ------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("stages,needle", [
    ("[{name: a, steps: 2, model: {num_layers: 2}}, {name: b, steps: 2, hook: mslt, model: {num_layers: 2}}]",
     "must grow"),
    ("[{name: a, steps: 2, model: {num_layers: 1}}, {name: b, steps: 2, hook: mslt, model: {num_layers: 3}}]",
     "k <= the previous"),
    ("[{name: a, steps: 2, model: {num_layers: 1}}, {name: b, steps: 2, hook: mslt, "
     "model: {num_layers: 2, ffn_size: 128}}]", "not model.ffn_size"),
    ("[{name: a, steps: 2, model: {num_layers: 1}}, {name: b, steps: 2, hook: mslt, hook_args: {top: 1}}]",
     "unknown hook_args"),
    ("[{name: a, steps: 2, model: {num_layers: 1}}, {name: b, steps: 2, hook: mslt, hook_args: {train_top: 3}}]",
     "train_top must be in"),
    ("[{name: a, steps: 2, model: {num_layers: 1}}, {name: b, steps: 2, hook: mslt, hook_args: {train_top: '1'}}]",
     "must be int"),
    ("[{name: a, steps: 2, model: {num_layers: 1}}, {name: b, steps: 2, hook: mslt_joint}]", "without reshaping"),
    ("[{name: a, steps: 2}, {name: b, steps: 2, hook: mslt_joint, hook_args: {train_top: 1}}]", "no hook_args"),
    ("[{name: a, steps: 2, model: {num_layers: 2, heads_per_layer: [1, 2]}}, {name: b, steps: 2, hook: mslt, "
     "model: {num_layers: 3, heads_per_layer: [1, 2, 1]}}]", r"must become \[1, 2, 2\]"),
])
def test_nonsense_mslt_schedules_are_rejected_at_load(tmp_path, tiny_data, stages, needle):
    with pytest.raises(UserError, match=needle):
        tiny_config(tmp_path, tiny_data, yaml_text=f"stages: {stages}\n")


def test_train_top_defaults_to_the_added_layers(tmp_path, tiny_data):
    text = ("stages: [{name: a, steps: 2, model: {num_layers: 2}}, "
            "{name: b, steps: 2, hook: mslt, model: {num_layers: 4}}]\n")
    cfg = tiny_config(tmp_path, tiny_data, yaml_text=text)
    assert cfg.stages[1].hook_args == {"train_top": 2, "freeze_embeddings": True}


def test_shipped_configs_load():
    from training.stages.plan import load_config

    for name, layers, k in (("mslt_default", [1, 2, 3, 4, 4], 1), ("mslt_bert_base", [3, 6, 9, 12, 12], 3)):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert [cfg.stage_model(i).num_layers for i in range(len(cfg.stages))] == layers
        assert [s.hook for s in cfg.stages] == [None, "mslt", "mslt", "mslt", "mslt_joint"]
        assert all(s.hook_args["train_top"] == k for s in cfg.stages[1:4])
        total = sum(s.steps for s in cfg.stages)
        assert cfg.stages[-1].steps == round(0.1 * total)  # the joint stage: 10% of the steps
    base = load_config(REPO / "configs" / "mslt_bert_base.yaml").model
    assert (base.hidden_size, base.num_layers, base.num_heads, base.ffn_size) == (768, 12, 12, 3072)


def test_stage_list_builder():
    stages = mslt.mslt_stages(3, 3, 12, 40000)
    assert [s["model"]["num_layers"] for s in stages] == [3, 6, 9, 12, 12]
    assert [s["steps"] for s in stages] == [9000, 9000, 9000, 9000, 4000]
    assert [s.get("hook") for s in stages] == [None, "mslt", "mslt", "mslt", "mslt_joint"]
    assert sum(s["steps"] for s in mslt.mslt_stages(1, 1, 4, 601, 0.1)) == 601
    assert mslt.mslt_stages(2, 1, 3, 10, 0.0)[-1]["name"] == "L3"  # no joint stage
    with pytest.raises(ValueError, match="multiple of k"):
        mslt.mslt_stages(2, 2, 5, 100)


# ------------------------------------------------------------------------------- copy and freeze

def test_new_layers_are_copies_of_the_current_top_k_layers():
    old, new = _cfg(3), _cfg(5)
    tensors = {f"{LAYER.format(i)}output.dense.bias": torch.full((2,), float(i)) for i in range(3)}
    tensors["bert.embeddings.LayerNorm.bias"] = torch.full((2,), -1.0)
    out = mslt.copy_top_layers(tensors, old, new)
    got = [float(out[f"{LAYER.format(i)}output.dense.bias"][0]) for i in range(5)]
    assert got == [0, 1, 2, 1, 2]  # layers 3, 4 copy old 1, 2 (not 0, 1 as stacking would)
    assert out["bert.embeddings.LayerNorm.bias"] is tensors["bert.embeddings.LayerNorm.bias"]
    assert out[f"{LAYER.format(3)}output.dense.bias"].data_ptr() != tensors[f"{LAYER.format(1)}output.dense.bias"].data_ptr()


def test_exactly_the_expected_parameters_train_in_a_frozen_stage():
    model = _frozen_model(num_layers=3, train_top=1, nsp=True)
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)
                if n.startswith((LAYER.format(2), "cls.predictions.transform.", "bert.pooler.", "cls.seq_relationship."))}
    expected |= {"cls.predictions.bias", "cls.predictions.decoder.bias"}  # the output bias (tied)
    assert trainable == expected
    for name in EMBEDDING_NAMES + ("cls.predictions.decoder.weight",):
        assert not dict(model.named_parameters(remove_duplicate=False))[name].requires_grad
    assert model.bert.encoder.frozen_prefix() == 2
    # Pre-LN: the final LayerNorm sits on top of the trainable layers and trains.
    pre = _frozen_model(num_layers=2, train_top=1, norm="pre")
    assert pre.bert.encoder.final_layer_norm.weight.requires_grad
    mslt.unfreeze(model)
    assert all(p.requires_grad for p in model.parameters()) and model.bert.encoder.frozen_prefix() == 0


def test_prepare_reads_the_stage_and_refuses_an_unresolved_one():
    model = BertForPreTraining(_cfg(4))
    stage = _stage(train_top=2)
    mslt.Mslt(stage.hook_args).prepare(model)
    assert model.bert.encoder.frozen_prefix() == 2
    with pytest.raises(ValueError, match="train_top"):
        mslt.Mslt(_stage().hook_args).prepare(model)


# -------------------------------------------------------------------------- forward-only prefix

def _grad_modes(model):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.append(
        (name, torch.is_grad_enabled(), out.requires_grad))) for name, m in
        [("emb", model.bert.embeddings)] + [(f"L{i}", layer) for i, layer in enumerate(model.bert.encoder.layer)]]
    return seen, hooks


def test_frozen_prefix_runs_under_no_grad_and_keeps_no_activations():
    model = _frozen_model(num_layers=3, train_top=1)
    seen, hooks = _grad_modes(model)
    out = model(**_batch())
    for h in hooks:
        h.remove()
    assert seen == [("emb", False, False), ("L0", False, False), ("L1", False, False), ("L2", True, True)]
    out["mlm_loss"].backward()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_trainable_embeddings_keep_backward_through_frozen_layers():
    torch.manual_seed(0)
    model = BertForPreTraining(_cfg(3))
    mslt.freeze(model, train_top=1, freeze_embeddings=False)
    seen, hooks = _grad_modes(model)
    model(**_batch())["mlm_loss"].backward()
    for h in hooks:
        h.remove()
    assert all(grad_on for _, grad_on, _ in seen)  # nothing may run under no_grad: the embeddings train
    assert model.bert.embeddings.word_embeddings.weight.grad is not None
    assert all(p.grad is None for p in model.bert.encoder.layer[0].parameters())


def test_no_grad_prefix_gives_the_same_gradients_as_a_full_backward():
    model = _frozen_model(num_layers=3, train_top=1, dropout=0.0, attention_dropout=0.0)
    model(**_batch())["mlm_loss"].backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    reference = _frozen_model(num_layers=3, train_top=1, dropout=0.0, attention_dropout=0.0)
    mslt.unfreeze(reference)  # everything on the tape; compare only the MSLT-trainable gradients
    reference(**_batch())["mlm_loss"].backward()
    ref = dict(reference.named_parameters())
    for name, grad in got.items():
        torch.testing.assert_close(grad, ref[name].grad, rtol=1e-5, atol=1e-7)


def test_engine_never_touches_frozen_parameters(tmp_path, tiny_data, dist_single):
    from training.engine.build import build_engine

    cfg = tiny_config(tmp_path, tiny_data, yaml_text=MSLT)
    model = _frozen_model(num_layers=3, train_top=1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    engine, _ = build_engine(model, cfg, 1, tmp_path / "out")
    names = [n for g in engine.optimizer.param_groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for seed in range(3):
        engine.backward(engine(**_batch(seed))["mlm_loss"])
        assert all(p.grad is None for n, p in engine.module.named_parameters() if n in frozen)
        engine.step()
    for n, p in engine.module.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


# --------------------------------------------------------------------------------- in the runner

def _params(runner):
    return {n: p.detach().clone() for n, p in runner.engine.module.named_parameters()}


def _spy_transitions(runner) -> tuple[dict, dict]:
    """Weights just before each stage boundary (the previous stage's end) and right after it."""
    before, after = {}, {}
    enter = runner._enter_stage

    def spy(index):
        before[index] = _params(runner)
        seconds = enter(index)
        after[index] = _params(runner)
        return seconds

    runner._enter_stage = spy
    return before, after


def test_runner_trains_only_the_new_top_layer(tmp_path, tiny_data, dist_single):
    cfg = tiny_config(tmp_path, tiny_data, ["run.stop_at_step=6"], yaml_text=MSLT)
    runner = make_runner(cfg)
    before, snaps = _spy_transitions(runner)
    runner.run()  # L1, L2 (layer 0 frozen), L3 until step 6 (layers 0 and 1 frozen)
    end = _params(runner)
    # L2's new layer 1 is a copy of layer 0 as L1 left it; L3's layer 2 a copy of layer 1 as L2 left it.
    for name, t in before[1].items():
        if name.startswith(LAYER.format(0)):
            torch.testing.assert_close(snaps[1][name.replace(".0.", ".1.", 1)], t, rtol=0, atol=0)
    for name, t in before[2].items():
        if name.startswith(LAYER.format(1)):
            torch.testing.assert_close(snaps[2][name.replace(".1.", ".2.", 1)], t, rtol=0, atol=0)
    # Frozen since L1's end: embeddings, layer 0, the tied decoder weight. Since L2's end: layer 1.
    for name, t in end.items():
        if name.startswith(("bert.embeddings.", LAYER.format(0))):
            assert torch.equal(t, before[1][name]), name
        elif name.startswith(LAYER.format(1)):
            assert torch.equal(t, before[2][name]), name
            assert not torch.equal(t, snaps[1][name]), name  # it did train in L2
        else:  # layer 2 and the trainable head parts moved in L3
            assert not torch.equal(t, snaps[2][name]), name
    assert [p.requires_grad for p in runner.engine.module.bert.encoder.layer.parameters()][-1]
    assert runner.engine.module.bert.encoder.frozen_prefix() == 2
    transitions = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    trainable = [m["trainable_params"] for m in transitions if m["kind"] == "transition"]
    assert trainable[0] == trainable[1] < sum(p.numel() for p in runner.engine.module.parameters())


def test_joint_stage_trains_everything_again(tmp_path, tiny_data, dist_single):
    cfg = tiny_config(tmp_path, tiny_data, yaml_text=MSLT)
    runner = make_runner(cfg)
    _, snaps = _spy_transitions(runner)
    runner.run()
    assert all(p.requires_grad for p in runner.engine.module.parameters())
    assert runner.engine.module.bert.encoder.frozen_prefix() == 0
    end = _params(runner)
    assert all(not torch.equal(end[n], snaps[3][n]) for n in end if n != "bert.embeddings.token_type_embeddings.weight")


@pytest.mark.parametrize("stop_at", [3, 4, 5])  # mid L2, end of L2 (before the growth to L3), mid L3
def test_resume_in_a_frozen_stage_stays_frozen_and_matches(tmp_path, tiny_data, dist_single, stop_at):
    full = make_runner(tiny_config(tmp_path / "full", tiny_data, yaml_text=MSLT))
    full.run()
    expected = [m["loss"] for m in map(json.loads, (tmp_path / "full" / "out" / "metrics.jsonl").read_text()
                                       .splitlines()) if m["kind"] == "train"]

    make_runner(tiny_config(tmp_path / "cut", tiny_data, [f"run.stop_at_step={stop_at}"], yaml_text=MSLT)).run()
    resumed = make_runner(tiny_config(tmp_path / "cut", tiny_data, yaml_text=MSLT), seed=123)
    resumed.resume(checkpoint.latest_tag(tmp_path / "cut" / "out" / "checkpoints"))
    module = resumed.engine.module
    layers = resumed.model_cfg.num_layers
    assert module.bert.encoder.frozen_prefix() == layers - 1  # the requires_grad pattern is restored
    assert not any(p.requires_grad for p in module.bert.embeddings.parameters())
    optimized = {n for g in resumed.engine.optimizer.param_groups for n in g["names"]}
    assert optimized == {n for n, p in module.named_parameters() if p.requires_grad}
    resumed.run()
    got = [m["loss"] for m in map(json.loads, (tmp_path / "cut" / "out" / "metrics.jsonl").read_text()
                                  .splitlines()) if m["kind"] == "train"]
    assert got == expected
    for name, t in _params(full).items():
        torch.testing.assert_close(_params(resumed)[name], t, rtol=0, atol=0)


# ------------------------------------------------------------------- collectives, 2 ranks (slow)

BENCH_CONFIG = """
run: {seed: 7}
stages:
  - {name: L2, steps: 2, model: {num_layers: 2}}
  - {name: L4, steps: 2, model: {num_layers: 4}, hook: mslt, optimizer_state: reset}
"""


@pytest.mark.slow
@pytest.mark.parametrize("zero,optimizer,precision", [(0, "lamb", "fp32"), (0, "lamb", "bf16"), (1, "adamw", "fp32"),
                                                      (2, "adamw", "bf16"), (1, "lamb", "fp32"), (2, "lamb", "fp32")])
def test_gradient_collectives_carry_only_trainable_parameters(tmp_path, tiny_data, zero, optimizer, precision):
    """2 gloo ranks through `python -m training.bench mslt`: per step, the gradient all-reduce/reduce-scatter
    bytes equal the trainable parameters' gradient bytes, for the frozen stage and the full reference alike;
    frozen parameters get no .grad and do not change."""
    config = tmp_path / "mslt_tiny.yaml"
    model = "".join(f"  {k}: {v}\n" for k, v in TINY_MODEL.items())
    config.write_text(f"data: {{dir: {tiny_data}}}\nmodel:\n{model}train: {{micro_batch_size: 4, precision: "
                      f"{precision}, zero_stage: {zero}}}\noptimizer: {{name: {optimizer}}}\n" + BENCH_CONFIG)
    out = tmp_path / "bench"
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}  # dist_single exported them here
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "training.bench", "mslt", "--config", str(config), "--out", str(out),
                           "--ranks", "2", "--steps", "2", "--warmup", "1", "--repeats", "1", "--stages", "L4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "mslt.json").read_text())
    assert result["world_size"] == 2 and result["zero_stage"] == zero
    (stage,) = result["stages"]
    full, frozen = stage["full"], stage["mslt"]
    for r in (full, frozen):
        assert r["grad_reduce_dtype"] == ("bfloat16" if precision == "bf16" else "float32")
        size = 2 if precision == "bf16" else 4
        assert r["grad_reduce_bytes"] == r["trainable_parameters"] * size  # no padding at this size either
        assert r["grad_reduce_equals_trainable"] and r["grad_reduce_padding_elements"] == 0
        if zero > 0:  # ZeRO 1/2 all-gather the updated partitions: again only the trainable parameters
            gathered = sum(c["elements"] for k, c in r["collectives_per_step"].items()
                           if k.startswith("step:all_gather"))
            assert gathered == r["trainable_parameters"]
        assert r["frozen_params_changed"] == 0
        assert r["frozen_params_with_grad"] in (0, None)
    assert frozen["no_grad_layers"] == 2 and frozen["trainable_parameters"] < full["trainable_parameters"]
    assert frozen["saved_activation_bytes"] < full["saved_activation_bytes"]


def test_validation_changes_nothing_the_defaults_are_resolved_before_it():
    """hook_args defaults are filled in by resolve_args (a new dict, once, at config load); validate only checks."""
    from types import SimpleNamespace

    old = ModelConfig(vocab_size=64, hidden_size=32, num_heads=2, num_layers=2, ffn_size=64, max_position=16)
    new = old.model_copy(update={"num_layers": 3})
    stage = SimpleNamespace(name="L3", hook_args={})
    mslt.validate(old, new, stage)
    assert stage.hook_args == {}
    resolved = mslt.resolve_args(old, new, stage.hook_args)
    assert resolved == {"train_top": 1, "freeze_embeddings": True} and stage.hook_args == {}
    assert mslt.resolve_args(old, new, {"train_top": 2}) == {"train_top": 2, "freeze_embeddings": True}
