"""The training-time locality bias: its values, both attention backends against a reference, the stage schedule."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers.tiny_run import make_runner, tiny_config
from training.model.bert import BertForPreTraining
from training.model.ops import eager_attention, locality_bias, sdpa_attention
from training.model.config import ModelConfig


def test_bias_is_minus_strength_times_slope_times_distance_with_padding_excluded():
    pad = torch.tensor([[True, True, True, False]])
    b = locality_bias(pad, 4, 3, 2.0, torch.float32, torch.device("cpu"))
    assert b.shape == (1, 3, 4, 4)
    for h, slope in enumerate((2.0, 1.0, 0.5)):
        for i in range(4):
            for j in range(3):
                assert b[0, h, i, j] == -slope * abs(i - j)
    assert torch.isinf(b[..., 3]).all() and (b[..., 3] < 0).all()


@pytest.mark.parametrize("backend", [eager_attention, sdpa_attention])
def test_backends_with_the_bias_match_a_reference_forward_and_backward(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.ones(2, 7, dtype=torch.bool)
    pad[1, 5:] = False
    bias = locality_bias(pad, 7, 3, 0.7, torch.float64, torch.device("cpu"))
    out = backend(q, k, v, bias, 0.0, 0.5)
    scores = (q @ k.transpose(-1, -2)) * 0.5 + bias
    ref = torch.softmax(scores, dim=-1) @ v
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def _batch(vocab, seq=12):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, vocab, (2, seq), generator=gen)
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def test_strength_zero_is_plain_bert_and_a_positive_strength_changes_the_loss():
    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_heads=2, num_layers=2, ffn_size=32, max_position=16,
                      dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg)
    b = _batch(cfg.vocab_size)
    plain = model(**b)["loss"]
    assert torch.equal(model(**b, locality=0.0)["loss"], plain)
    assert not torch.allclose(model(**b, locality=1.0)["loss"], plain)


def test_a_fused_or_linear_attention_stage_refuses_the_bias(tmp_path, tiny_data):
    from training.errors import UserError

    text = "stages:\n  - {name: a, steps: 2, locality_bias: {start: 1.0}}\n"
    for attention in ("fused", "linear"):
        with pytest.raises(UserError, match="locality_bias needs model.attention eager or sdpa"):
            tiny_config(tmp_path, tiny_data, [f"model.attention={attention}"], yaml_text=text)
    with pytest.raises(UserError, match="locality_bias.start must be a finite number >= 0"):
        tiny_config(tmp_path, tiny_data, yaml_text="stages:\n  - {name: a, steps: 2, locality_bias: {start: -1}}\n")


def _strengths(runner) -> tuple[list[float], list[float]]:
    """(the strength of each training forward, of each evaluation forward) over the run."""
    seen, forward = [], BertForPreTraining.forward

    def spy(module, *args, locality=0.0, **kwargs):
        seen.append((module.training, locality))
        return forward(module, *args, locality=locality, **kwargs)

    BertForPreTraining.forward = spy
    try:
        runner.run()
    finally:
        BertForPreTraining.forward = forward
    return [s for training, s in seen if training], [s for training, s in seen if not training]


def _train_strengths(runner) -> list[float]:
    train, evals = _strengths(runner)
    assert 0.0 in evals  # the plain model is scored at every eval (test below: beside the as-trained score)
    return train


def test_the_strength_falls_linearly_over_its_stage_and_evaluation_scores_the_plain_model(tmp_path, tiny_data,
                                                                                          dist_single):
    text = ("stages:\n  - {name: local, steps: 4, locality_bias: {start: 2.0, end: 0.0}}\n"
            "  - {name: plain, steps: 2}\n")
    runner = make_runner(tiny_config(tmp_path, tiny_data, ["run.eval_every=2"], yaml_text=text))
    train, evals = _strengths(runner)
    assert train == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    # Evals at steps 2, 4 (the stage's end) and 6, one batch each: the plain model every time, and at step 2,
    # while the bias is still on, also the model as it trains (the strength of step 3).
    assert evals == [0.0, 1.0, 0.0, 0.0]
    records = [json.loads(line) for line in (runner.out_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in ev] == [2, 4, 6]
    assert ev[0]["locality"] == 1.0 and "heldout_loss_as_trained" not in ev[1] and "locality" not in ev[2]
    assert ev[0]["heldout_loss_as_trained"] != ev[0]["heldout_loss"]
    assert ev[0]["heldout_below_unigram_as_trained"] == pytest.approx(
        ev[0]["heldout_unigram_loss"] - ev[0]["heldout_loss_as_trained"])


def test_the_runs_schedule_falls_by_global_step_across_a_stack_growth(tmp_path, tiny_data, dist_single):
    text = ("train: {locality_bias: {start: 2.0, end: 0.0, steps: 4}}\n"
            "stages:\n  - {name: one, steps: 3, model: {num_layers: 1}}\n"
            "  - {name: two, steps: 3, hook: stack}\n")
    runner = make_runner(tiny_config(tmp_path, tiny_data, ["run.eval_every=2", "model.num_layers=2"], yaml_text=text))
    assert _train_strengths(runner) == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]  # step 3 is the grown model's first
    assert runner.model_cfg.num_layers == 2


def test_the_runs_schedule_refuses_a_linear_attention_stage_it_covers_and_a_stage_schedule_beside_it(
        tmp_path, tiny_data, dist_single):
    from training.errors import UserError

    core = ("train: {{locality_bias: {{start: 1.0, steps: {n}}}}}\n"
            "stages:\n  - {{name: relaxed, steps: 3, model: {{attention: linear}}}}\n"
            "  - {{name: refined, steps: 2, hook: core_refine}}\n")
    with pytest.raises(UserError, match="train.locality_bias covers stage 'relaxed' .*linear"):
        make_runner(tiny_config(tmp_path, tiny_data, yaml_text=core.format(n=2)))
    with pytest.raises(UserError, match="give either train.locality_bias .* or stages\\[\\].locality_bias"):
        tiny_config(tmp_path, tiny_data, yaml_text="train: {locality_bias: {steps: 2}}\n"
                    "stages:\n  - {name: a, steps: 2, locality_bias: {start: 1.0}}\n")
    with pytest.raises(UserError, match="train.locality_bias.steps"):
        tiny_config(tmp_path, tiny_data, yaml_text="train: {locality_bias: {steps: 0}}\n")


def test_sinusoidal_position_init_is_the_scaled_sine_cosine_table():
    import math

    cfg = ModelConfig(vocab_size=50, hidden_size=16, num_heads=2, num_layers=1, ffn_size=32, max_position=20,
                      position_init="sinusoidal")
    table = BertForPreTraining(cfg).bert.embeddings.position_embeddings.weight.detach().double()
    scale = cfg.initializer_range / math.sqrt(0.5)
    for p in (0, 3, 19):
        for i in range(8):
            freq = 10000.0 ** (-2 * i / 16)
            assert table[p, 2 * i].item() == pytest.approx(scale * math.sin(p * freq), abs=1e-7)
            assert table[p, 2 * i + 1].item() == pytest.approx(scale * math.cos(p * freq), abs=1e-7)
    normal = BertForPreTraining(cfg.model_copy(update={"position_init": "normal"}))
    assert not torch.allclose(normal.bert.embeddings.position_embeddings.weight.double(), table)
