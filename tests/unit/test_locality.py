"""The training-time locality bias: its values, both attention backends against a reference, the stage schedule."""
from __future__ import annotations


import pytest
import torch

from tests.helpers.tiny_run import tiny_config
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
