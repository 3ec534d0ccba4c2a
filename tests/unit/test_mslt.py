"""MSLT (training/stages/mslt.py): config checks, which layers are copied and frozen, the forward-only frozen
prefix, frozen parameters untouched through real training steps, resume inside a frozen stage, and (slow, 2
gloo ranks) the gradient collectives carrying exactly the trainable parameters."""

import pytest
import torch

from tests.helpers.tiny_run import tiny_config
from training.config import StageSection
from training.errors import UserError
from training.model.bert import BertForPreTraining
from training.model.config import ModelConfig
from training.stages import mslt
from tests.helpers import paths as PATHS
from tests.helpers.mslt import LAYER, frozen_model, tiny_batch, tiny_cfg

REPO = PATHS.REPO

EMBEDDING_NAMES = ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
                   "bert.embeddings.token_type_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                   "bert.embeddings.LayerNorm.bias")


def _stage(name="s", **args):
    return StageSection(name=name, steps=1, hook="mslt", hook_args=args)


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
    old, new = tiny_cfg(3), tiny_cfg(5)
    tensors = {f"{LAYER.format(i)}output.dense.bias": torch.full((2,), float(i)) for i in range(3)}
    tensors["bert.embeddings.LayerNorm.bias"] = torch.full((2,), -1.0)
    out = mslt.copy_top_layers(tensors, old, new)
    got = [float(out[f"{LAYER.format(i)}output.dense.bias"][0]) for i in range(5)]
    assert got == [0, 1, 2, 1, 2]  # layers 3, 4 copy old 1, 2 (not 0, 1 as stacking would)
    assert out["bert.embeddings.LayerNorm.bias"] is tensors["bert.embeddings.LayerNorm.bias"]
    assert out[f"{LAYER.format(3)}output.dense.bias"].data_ptr() != tensors[f"{LAYER.format(1)}output.dense.bias"].data_ptr()


def test_exactly_the_expected_parameters_train_in_a_frozen_stage():
    model = frozen_model(num_layers=3, train_top=1, nsp=True)
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)
                if n.startswith((LAYER.format(2), "cls.predictions.transform.", "bert.pooler.", "cls.seq_relationship."))}
    expected |= {"cls.predictions.bias", "cls.predictions.decoder.bias"}  # the output bias (tied)
    assert trainable == expected
    for name in EMBEDDING_NAMES + ("cls.predictions.decoder.weight",):
        assert not dict(model.named_parameters(remove_duplicate=False))[name].requires_grad
    assert model.bert.encoder.frozen_prefix() == 2
    # Pre-LN: the final LayerNorm sits on top of the trainable layers and trains.
    pre = frozen_model(num_layers=2, train_top=1, norm="pre")
    assert pre.bert.encoder.final_layer_norm.weight.requires_grad
    mslt.unfreeze(model)
    assert all(p.requires_grad for p in model.parameters()) and model.bert.encoder.frozen_prefix() == 0


def test_prepare_reads_the_stage_and_refuses_an_unresolved_one():
    model = BertForPreTraining(tiny_cfg(4))
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
    model = frozen_model(num_layers=3, train_top=1)
    seen, hooks = _grad_modes(model)
    out = model(**tiny_batch())
    for h in hooks:
        h.remove()
    assert seen == [("emb", False, False), ("L0", False, False), ("L1", False, False), ("L2", True, True)]
    out["mlm_loss"].backward()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_trainable_embeddings_keep_backward_through_frozen_layers():
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_cfg(3))
    mslt.freeze(model, train_top=1, freeze_embeddings=False)
    seen, hooks = _grad_modes(model)
    model(**tiny_batch())["mlm_loss"].backward()
    for h in hooks:
        h.remove()
    assert all(grad_on for _, grad_on, _ in seen)  # nothing may run under no_grad: the embeddings train
    assert model.bert.embeddings.word_embeddings.weight.grad is not None
    assert all(p.grad is None for p in model.bert.encoder.layer[0].parameters())


def test_no_grad_prefix_gives_the_same_gradients_as_a_full_backward():
    model = frozen_model(num_layers=3, train_top=1, dropout=0.0, attention_dropout=0.0)
    model(**tiny_batch())["mlm_loss"].backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    reference = frozen_model(num_layers=3, train_top=1, dropout=0.0, attention_dropout=0.0)
    mslt.unfreeze(reference)  # everything on the tape; compare only the MSLT-trainable gradients
    reference(**tiny_batch())["mlm_loss"].backward()
    ref = dict(reference.named_parameters())
    for name, grad in got.items():
        torch.testing.assert_close(grad, ref[name].grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------- in the runner


# ------------------------------------------------------------------- collectives, 2 ranks (slow)


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
