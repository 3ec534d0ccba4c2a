"""The CPU dropout (training/model/ops.py): PyTorch's dropout semantics (zero with probability p, scale the
rest so the expectation is kept, the same mask in backward) with a cheaper draw, checked against what the
draw must be: its keep rate, independence between neighbours and between the four 16-bit lanes of one
64-bit word, reproducibility under torch.manual_seed, and the gradient autograd measures."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.model.ops import Dropout, dropout, dropout_keep_mask, eager_attention, sdpa_attention


def _sigma(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.013])
def test_keep_rate_and_scale_keep_the_expectation(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of the four lanes of a 64-bit draw
    keep, scale = dropout_keep_mask(torch.Size([n]), p)
    assert keep.dtype == torch.uint8 and keep.shape == (n,) and set(keep.unique().tolist()) <= {0, 1}
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * _sigma(p, n), rate
    rounded_keep = 1 - round(p * 2 ** 16) / 2 ** 16
    assert scale * rounded_keep == pytest.approx(1.0, abs=1e-12)  # E[keep * scale] = 1 exactly for the rounded p
    assert abs(rounded_keep - (1 - p)) <= 2 ** -17


def test_draws_are_independent_across_neighbours_and_lanes():
    torch.manual_seed(1)
    p, n = 0.3, 2_000_000
    keep = dropout_keep_mask(torch.Size([n]), p)[0].double()
    for lane in range(4):  # each 16-bit lane of the 64-bit words keeps at the same rate
        sub = keep[lane::4]
        assert abs(sub.mean().item() - (1 - p)) < 5 * _sigma(p, sub.numel()), lane
    for lag in (1, 2, 3, 4, 5):  # P(both kept) = (1-p)^2: no correlation inside or across words
        both = (keep[:-lag] * keep[lag:]).mean().item()
        assert abs(both - (1 - p) ** 2) < 5 * _sigma((1 - p) ** 2, n - lag), lag


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_zeroes_or_scales_and_backward_uses_the_same_mask(dtype):
    torch.manual_seed(2)
    x = (torch.rand(7, 33, 19) + 0.5).to(dtype).requires_grad_()  # no zeros: zero output means dropped
    p = 0.25
    y = dropout(x, p)
    dropped = y == 0
    scale = 1 / (1 - round(p * 2 ** 16) / 2 ** 16)
    torch.testing.assert_close(y[~dropped], (x[~dropped].float() * scale).to(dtype))
    assert 0.15 < dropped.float().mean().item() < 0.35
    upstream = torch.randn_like(y)
    y.backward(upstream)
    expected = torch.where(dropped, torch.zeros_like(upstream), upstream * scale)  # what autograd must give
    torch.testing.assert_close(x.grad, expected)
    # the mask multiplies, so autograd's own gradient of that product is the same
    xr = x.detach().clone().requires_grad_()
    (xr * (~dropped).to(dtype) * scale).backward(upstream)
    torch.testing.assert_close(x.grad, xr.grad)


def test_seeded_draws_reproduce_and_successive_draws_differ():
    x = torch.ones(4096)
    torch.manual_seed(3)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.5), a) and torch.equal(dropout(x, 0.5), b)
    assert not torch.equal(a, b)


def test_identity_when_off_and_pytorchs_dropout_at_the_edges():
    x = torch.randn(10, 10)
    assert dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))  # PyTorch's: everything dropped, no inf scale
    module = Dropout(0.1)
    assert isinstance(module, nn.Dropout) and module.p == 0.1 and not list(module.state_dict())
    assert module.eval()(x) is x


def test_sdpa_with_dropout_on_cpu_is_the_eager_path_and_matches_without():
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[1, 6:] = False
    torch.manual_seed(5)
    a = sdpa_attention(q, k, v, pad, 0.2, 8 ** -0.5)
    torch.manual_seed(5)
    b = eager_attention(q, k, v, pad, 0.2, 8 ** -0.5)
    assert torch.equal(a, b)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :], scale=8 ** -0.5)
    torch.testing.assert_close(eager_attention(q, k, v, pad, 0.0, 8 ** -0.5), ref, atol=1e-5, rtol=1e-5)
    # averaged over many draws, attention with dropout on its probabilities is the one without
    torch.manual_seed(6)
    mean = torch.stack([sdpa_attention(q, k, v, pad, 0.2, 8 ** -0.5) for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, ref, atol=0.06, rtol=0)
