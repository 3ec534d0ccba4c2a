"""The hook protocol as the runner uses it: a static list of Hook classes, one instance per stage holding its
typed arguments, and the load-time checks living in stages/plan.py (the config package knows no hook)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from training.config import read_config
from training.errors import UserError
from training.stages.hooks import HOOKS, make_hook
from training.stages.plan import Plan, load_config
from training.stages.protocol import Hook
from tests.helpers import paths as PATHS

ROOT = PATHS.TRAINING
STACKS = """
model: {vocab_size: 64, hidden_size: 16, num_layers: 1, num_heads: 2, ffn_size: 32, max_position: 16}
train: {micro_batch_size: 2}
stages:
  - {name: a, steps: 2, model: {num_layers: 1}}
  - {name: b, steps: 2, model: {num_layers: 2}, hook: stack}
  - {name: c, steps: 2, model: {num_layers: 4}, hook: stack}
"""


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_every_listed_hook_is_a_hook_class_under_its_own_name():
    assert HOOKS, "no hooks listed"
    for name, cls in HOOKS.items():
        assert isinstance(cls, type) and issubclass(cls, Hook) and cls.name == name
        assert cls.transform is not Hook.transform, f"{name} has no transform"


def test_each_stage_gets_its_own_instance(tmp_path):
    cfg = load_config(_write(tmp_path, STACKS))
    plan = Plan(cfg, data_seq_len=16, world_size=1)
    assert plan[0].hook is None
    assert type(plan[1].hook) is type(plan[2].hook) is HOOKS["stack"]
    assert plan[1].hook is not plan[2].hook


def test_prune_args_are_typed_on_the_instance_and_the_ticket_is_its_own():
    one = make_hook(type("S", (), {"hook": "prune", "hook_args": {"rewind": "keep", "ratio_ffn": 0.25}})())
    other = HOOKS["prune"]({"rewind": "keep"})
    assert one.args.ratio_ffn == 0.25 and other.args.ratio_ffn == 0.4 and one.args.rewind == "keep"
    assert one.ticket is None and other.ticket is None  # drawn at its own boundary (resolve), not shared


def test_a_hook_without_arguments_refuses_some(tmp_path):
    text = STACKS.replace("hook: stack}\n  - {name: c", "hook: stack, hook_args: {k: 2}}\n  - {name: c")
    with pytest.raises(UserError, match=r"stage 'b': stack: stack takes no hook_args, got \['k'\]"):
        load_config(_write(tmp_path, text))


def test_transitions_are_checked_by_the_plan_not_by_the_config(tmp_path):
    shrink = _write(tmp_path, STACKS.replace("num_layers: 4}, hook: stack", "num_layers: 1}, hook: stack"))
    cfg = read_config(shrink)  # the schema alone: sections valid, stages unchecked
    assert cfg.stages[2].model == {"num_layers": 1}
    with pytest.raises(UserError, match="stage 'c': stack"):
        load_config(shrink)


def test_the_config_package_imports_no_higher_layer():
    upper = ("training.stages", "training.engine", "training.bench", "training.pretrain", "training.run_setup")
    found = []
    for path in sorted((ROOT / "config").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found += [f"{path.name} imports {n}" for n in names if n.startswith(upper)]
    assert found == []


@pytest.mark.parametrize("shape", [{}, {"nsp": True, "norm": "pre"}, {"attention": "linear", "ffn_rank": 4},
                                   {"slimming": True}, {"heads_per_layer": [1, 2], "ffn_per_layer": [8, 32]}])
def test_the_new_module_of_a_transition_holds_the_weights_without_drawing_an_initialisation(shape):
    """transfer.rebuild builds the entered module with BertForPreTraining.from_weights: the same model as a
    randomly initialised one loaded with the weights (outputs, tied decoder), and no random number drawn."""
    import torch

    from training.model.bert import BertForPreTraining
    from training.model.config import ModelConfig

    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, ffn_size=32, max_position=16,
                      **shape)
    torch.manual_seed(7)
    ref = BertForPreTraining(cfg).eval()
    weights = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    rng = torch.get_rng_state()
    model = BertForPreTraining.from_weights(cfg, weights).eval()
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    assert len(list(model.parameters())) == len(list(ref.parameters()))
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(ids)["logits"], ref(ids)["logits"], rtol=0, atol=0)
