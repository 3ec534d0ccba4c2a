"""CoRe: the relaxed model (linear attention, low-rank FFN), the core_refine hook, and a two-phase run."""

import pytest
import torch

from tests.helpers.tiny_run import tiny_config
from training.errors import UserError
from training.model import BertForPreTraining, ModelConfig
from training.model.flops import count_parameters, flops_per_token
from training.stages import core
from training.stages.hooks import HOOKS
from training.stages.protocol import HookContext

SMALL = dict(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position=32,
             dropout=0.0, attention_dropout=0.0)


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_refined_ffn_computes_exactly_the_factorised_product():
    relaxed_cfg = ModelConfig(**SMALL, attention="linear", ffn_rank=8)
    relaxed = _randomised(BertForPreTraining(relaxed_cfg), seed=0)
    # Same attention on both sides, so the whole forward isolates the FFN refinement.
    full_cfg = relaxed_cfg.model_copy(update={"ffn_rank": None})
    full = BertForPreTraining(full_cfg).eval()
    tensors = core.refine_ffn(transfer_state(relaxed), relaxed_cfg, full_cfg)
    full.load_state_dict(tensors)  # strict: exactly the full model's names
    layer = full.bert.encoder.layer[0]
    u = relaxed.bert.encoder.layer[0].intermediate.dense_u.weight
    v = relaxed.bert.encoder.layer[0].intermediate.dense_v.weight
    torch.testing.assert_close(layer.intermediate.dense.weight, (v.double() @ u.double()).float(), rtol=0, atol=0)

    x = torch.randn(3, 7, SMALL["hidden_size"], generator=torch.Generator().manual_seed(1))
    for i in range(SMALL["num_layers"]):
        a, b = relaxed.bert.encoder.layer[i], full.bert.encoder.layer[i]
        for fa, fb, inp in ((a.intermediate, b.intermediate, x),
                            (a.output.project, b.output.project, torch.randn(3, 7, SMALL["ffn_size"]))):
            with torch.no_grad():
                want, got = fa(inp), fb(inp)
            assert float((got - want).norm() / want.norm()) < 1e-6
    ids = torch.randint(1, SMALL["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = relaxed(ids)["logits"], full(ids)["logits"]
    assert float((got - want).norm() / want.norm()) < 1e-6


def transfer_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_exp_avg_sq_of_the_factors_is_dropped():
    cfg = ModelConfig(**SMALL, attention="linear", ffn_rank=8)
    full = cfg.model_copy(update={"attention": "sdpa", "ffn_rank": None})
    names = dict(BertForPreTraining(cfg).named_parameters())
    moments = {k: torch.ones_like(p) for k, p in names.items()}
    hook = HOOKS["core_refine"]()
    ctx = HookContext(step=0, out_dir=None)
    second = hook.transform(moments, cfg, full, 2, ctx)
    assert not any(".intermediate.dense" in k or ".output.dense." in k and "attention" not in k for k in second)
    assert "bert.encoder.layer.0.attention.self.query.weight" in second
    assert "bert.encoder.layer.1.output.LayerNorm.weight" in second


def test_relaxed_model_is_smaller_and_cheaper():
    full = ModelConfig(**SMALL)
    relaxed = core.relaxed_config(full)
    assert relaxed.ffn_rank == SMALL["hidden_size"] // 4 and relaxed.attention == "linear"
    p_full, p_relaxed = count_parameters(BertForPreTraining(full)), count_parameters(BertForPreTraining(relaxed))
    r, h, f, layers = relaxed.ffn_rank, SMALL["hidden_size"], SMALL["ffn_size"], SMALL["num_layers"]
    # Each FFN matrix h x f (2 per layer) becomes r x (h + f); biases unchanged.
    assert p_full - p_relaxed == layers * 2 * (h * f - r * (h + f))
    assert flops_per_token(relaxed, 32) < flops_per_token(full, 32)


@pytest.mark.parametrize("stages,needle", [
    ("[{name: a, steps: 2}, {name: b, steps: 2, hook: core_refine}]", "must be the relaxed model"),
    ("[{name: a, steps: 2, model: {attention: linear, ffn_rank: 8}}, "
     "{name: b, steps: 2, hook: core_refine, model: {ffn_rank: 8}}]", "full-rank softmax"),
    ("[{name: a, steps: 2, model: {attention: linear, ffn_rank: 8}}, "
     "{name: b, steps: 2, hook: core_refine, model: {ffn_size: 128}}]", "ffn_size 64 -> 128"),
])
def test_refine_schedule_checks(tmp_path, tiny_data, stages, needle):
    with pytest.raises(UserError, match=needle):
        tiny_config(tmp_path, tiny_data, yaml_text=f"stages: {stages}\n")


def test_shipped_configs_load():
    from training.stages.plan import load_config

    for name in ("core_default", "core_bert_base"):
        cfg = load_config(f"configs/{name}.yaml")
        relaxed, full = cfg.stage_model(0), cfg.stage_model(1)
        assert relaxed.attention == "linear" and relaxed.ffn_rank == cfg.model.hidden_size // 4
        assert full.attention == "sdpa" and full.ffn_rank is None
        assert cfg.stages[0].steps > 5 * cfg.stages[1].steps


def test_a_relaxed_checkpoint_is_not_exportable(tmp_path):
    from training.model.hf_export import export_hf

    cfg = ModelConfig(**SMALL, attention="linear", ffn_rank=8)
    with pytest.raises(UserError, match="linear attention"):
        export_hf(BertForPreTraining(cfg), cfg, tmp_path / "hf")
