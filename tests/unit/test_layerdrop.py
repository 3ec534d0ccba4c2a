"""Progressive layer dropping: the schedule, and the model's use of it."""
from __future__ import annotations

import math

import pytest
import torch

from training.errors import UserError
from training.model import BertForPreTraining, ModelConfig
from training.stages.layerdrop import check_layerdrop, expected_layers, keep_ratio, layer_keep_probs

SMALL = dict(vocab_size=100, hidden_size=32, num_heads=2, num_layers=4, ffn_size=64, max_position=16,
             dropout=0.0, attention_dropout=0.0, norm="pre")


def model(seed: int = 0, **over) -> BertForPreTraining:
    torch.manual_seed(seed)
    m = BertForPreTraining(ModelConfig(**{**SMALL, **over}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.train()  # dropping happens only in training mode; dropout is 0, so forwards are deterministic


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- schedule

def test_keep_ratio_follows_the_paper():
    assert keep_ratio(0) == 1.0
    assert keep_ratio(1000) == pytest.approx(0.5 * math.exp(-1) + 0.5, rel=1e-12)
    assert keep_ratio(10**6) == pytest.approx(0.5)
    assert keep_ratio(200, theta_bar=0.8, gamma=0.01) == pytest.approx(0.2 * math.exp(-2) + 0.8, rel=1e-12)
    ratios = [keep_ratio(s) for s in range(0, 5000, 100)]
    assert all(a > b for a, b in zip(ratios, ratios[1:]))


def test_layer_keep_probs_drop_deeper_layers_more():
    assert layer_keep_probs(0, 6) == [1.0] * 6
    theta = keep_ratio(3000)
    probs = layer_keep_probs(3000, 6)
    assert probs == pytest.approx([1 - (i / 6) * (1 - theta) for i in range(1, 7)], rel=1e-12)
    assert probs[-1] == pytest.approx(theta)  # the top layer is kept with theta(t)
    assert all(a > b for a, b in zip(probs, probs[1:]))
    assert expected_layers(3000, 6) == pytest.approx(sum(probs))


@pytest.mark.parametrize("kwargs", [dict(step=-1), dict(theta_bar=0.0), dict(theta_bar=1.5),
                                    dict(gamma=-1e-3)])
def test_schedule_rejects_bad_parameters(kwargs):
    args = dict(step=10, theta_bar=0.5, gamma=0.001) | kwargs
    with pytest.raises(ValueError, match="layer drop"):
        layer_keep_probs(args.pop("step"), 4, **args)


def test_layerdrop_needs_pre_ln():
    check_layerdrop(ModelConfig(**SMALL))
    with pytest.raises(ValueError, match="norm: pre"):
        check_layerdrop(ModelConfig(**{**SMALL, "norm": "post"}))
    with pytest.raises(UserError, match="norm: pre"):
        model(norm="post")(ids(), layer_keep_prob=[1.0] * 4)


# ---------------------------------------------------------------------------------------- the model

def test_keep_prob_one_is_a_normal_forward():
    m = model()
    torch.manual_seed(5)
    plain = m(ids())["logits"]
    state = torch.get_rng_state()
    dropped = m(ids(), layer_keep_prob=layer_keep_probs(0, 4))["logits"]
    assert torch.equal(plain, dropped)
    assert torch.equal(state, torch.get_rng_state())  # p = 1 draws nothing


def test_eval_mode_runs_every_layer():
    m = model().eval()
    assert torch.equal(m(ids())["logits"], m(ids(), layer_keep_prob=[1e-6] * 4)["logits"])


def test_a_skipped_layer_is_the_identity():
    m = model()
    got = m(ids(), layer_keep_prob=[1e-12] * 4)["logits"]  # every layer skipped (draws are never < 1e-12)
    with torch.no_grad():
        x = m.bert.embeddings(ids(), None)
        expected = m.cls.predictions(m.bert.encoder.final_layer_norm(x))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_skip_counts_and_branch_scales_match_the_schedule():
    m = model()
    probs = layer_keep_probs(5000, 4)  # ~[0.88, 0.75, 0.63, 0.50]
    calls, scales = [0] * 4, [set() for _ in range(4)]

    def counter(i):
        def hook(module, args, kwargs):
            calls[i] += 1
            scales[i].add(kwargs.get("branch_scale", 1.0))
        return hook

    for i, layer in enumerate(m.encoder_layers):
        layer.register_forward_pre_hook(counter(i), with_kwargs=True)
    torch.manual_seed(0)
    n = 400
    with torch.no_grad():
        for _ in range(n):
            m(ids(), layer_keep_prob=probs)
    for i, p in enumerate(probs):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(calls[i] - n * p) < 4.5 * sigma, (i, calls[i], n * p)
        # A kept layer gets branch_scale 1/p: its residual branches are scaled up.
        assert len(scales[i]) == 1 and scales[i].pop() == pytest.approx(1 / p)
    skipped, expected = 4 * n - sum(calls), n * (4 - expected_layers(5000, 4))
    assert abs(skipped - expected) < 4.5 * math.sqrt(n * sum(p * (1 - p) for p in probs))
