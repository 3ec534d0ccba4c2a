"""Fused attention vs the eager fp32 reference (Triton interpreter on CPU, compiled on CUDA).

Tolerances are relative Frobenius-norm errors ||x - ref|| / ||ref||:
fp32 1e-4, fp16 2e-3, bf16 (CUDA only) 1.6e-2.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (via kernels)


import pytest  # noqa: E402

from tests.helpers.kernels_testing import rel_err, setup_kernels_for_tests  # noqa: E402

DEV = setup_kernels_for_tests()

from kernels.attention import (attention_dropout_mask, fused_attention,  # noqa: E402
                               fused_attention_available, fused_attention_varlen, pad_input,
                               unpad_input)
from tests.helpers.kernels_reference import reference_attention  # noqa: E402

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
cuda_only = pytest.mark.skipif(not torch.cuda.is_available() or DEV != "cuda",
                               reason="bf16 needs a CUDA GPU (interpreter bf16 dot is wrong)")


def _inputs(B, H, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=g).to(DEV, dtype).requires_grad_() for _ in range(3)]


def _padding_mask(B, S, seed, full_pad_row=None):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, S + 1, (B,), generator=g)
    mask = torch.arange(S)[None, :] < lens[:, None]
    if full_pad_row is not None:
        mask[full_pad_row] = False
    return mask.to(DEV)


def _check_against_reference(q, k, v, mask=None, p=0.0, scale=None, seed=0):
    out = fused_attention(q, k, v, mask, dropout_p=p, softmax_scale=scale, seed=seed)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    drop = attention_dropout_mask(seed, *q.shape[:3], p, q.device) if p > 0 else None
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_in, mask, dropout_mask=drop, softmax_scale=scale)
    rq, rk, rv = torch.autograd.grad(ref, ref_in, dout.float())
    tol = TOL[q.dtype]
    for name, a, b in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))
    return out, dq, dk, dv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D", [32, 64, 128])
def test_matches_reference_with_padding(dtype, D):
    q, k, v = _inputs(2, 2, 50, D, dtype, seed=D)  # 50: not a multiple of any block size
    _check_against_reference(q, k, v, _padding_mask(2, 50, seed=D))


@pytest.mark.parametrize("S", [2, 17, 64])
def test_sequence_lengths_no_mask(S):
    q, k, v = _inputs(1, 3, S, 32, torch.float32, seed=S)
    _check_against_reference(q, k, v)


def test_single_token_sequence():
    # one key: out == v and dq == 0 exactly in math (only rounding noise here), dv == dout
    q, k, v = _inputs(2, 2, 1, 32, torch.float32, seed=1)
    out = fused_attention(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert torch.allclose(out, v, atol=1e-6) and torch.allclose(dv, torch.ones_like(dv))
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5


def test_non_power_of_two_head_dim_and_custom_scale():
    q, k, v = _inputs(2, 2, 33, 48, torch.float32, seed=5)
    _check_against_reference(q, k, v, _padding_mask(2, 33, seed=5), scale=0.3)


def test_non_contiguous_inputs():
    # q/k/v as strided views into one fused [B, S, 3, H, D] projection, as a model produces them
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 40, 3, 2, 32, generator=g).to(DEV).requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check_against_reference(q, k, v, _padding_mask(2, 40, seed=3))


def test_fully_padded_rows_are_finite_with_zero_grads():
    B, H, S, D = 3, 2, 40, 32
    q, k, v = _inputs(B, H, S, D, torch.float32, seed=11)
    mask = _padding_mask(B, S, seed=11, full_pad_row=1)
    out, dq, dk, dv = _check_against_reference(q, k, v, mask)
    assert torch.all(out[1] == 0)  # batch row with no real key: zeros, not NaN
    assert torch.all(dq[1] == 0)
    pad = ~mask[:, None, :, None].expand_as(dk)
    assert torch.all(dk[pad] == 0) and torch.all(dv[pad] == 0)  # padded keys get no gradient
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_given_kernel_mask(dtype):
    q, k, v = _inputs(2, 2, 40, 32, dtype, seed=21)
    _check_against_reference(q, k, v, _padding_mask(2, 40, seed=21), p=0.2, seed=1234)


def test_dropout_reproducible_and_seeded_by_torch():
    q, k, v = _inputs(1, 2, 24, 32, torch.float32, seed=4)
    a = fused_attention(q, k, v, dropout_p=0.3, seed=99)
    assert torch.equal(a, fused_attention(q, k, v, dropout_p=0.3, seed=99))
    assert not torch.equal(a, fused_attention(q, k, v, dropout_p=0.3, seed=100))
    torch.manual_seed(7)
    b = fused_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(7)
    assert torch.equal(b, fused_attention(q, k, v, dropout_p=0.3))


def test_dropout_statistics():
    p = 0.1
    keep = attention_dropout_mask(5, 2, 2, 64, p, DEV) > 0  # 16384 draws, sd of rate ~0.0023
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    assert not torch.equal(keep[0, 0], keep[0, 1])  # heads get different streams
    # E[dropout output] == no-dropout output: average over seeds
    q, k, v = _inputs(1, 2, 32, 32, torch.float32, seed=8)
    with torch.no_grad():
        base = fused_attention(q, k, v)
        samples = [fused_attention(q, k, v, dropout_p=p, seed=s) for s in range(24)]
    one = rel_err(samples[0], base)
    mean = rel_err(torch.stack(samples).mean(0), base)
    assert mean < 0.35 * one, (mean, one)  # expected ratio 1/sqrt(24) ~ 0.2


@pytest.mark.parametrize("p", [0.0, 0.15])
def test_varlen_equals_padded(p):
    B, H, S, D = 3, 2, 40, 32
    mask = _padding_mask(B, S, seed=31)
    mask[0] = True  # longest sequence == S, so the dropout streams coincide too
    g = torch.Generator().manual_seed(31)
    x = torch.randn(B, S, 3, H, D, generator=g).to(DEV)
    packed, idx, cu, max_s = unpad_input(x, mask)
    assert cu.dtype == torch.int32 and cu[-1].item() == mask.sum().item() and max_s == S
    assert torch.equal(pad_input(packed, idx, B, S), x * mask[:, :, None, None, None])
    pq, pk, pv = (packed[:, i].clone().requires_grad_() for i in range(3))
    q, k, v = (x[:, :, i].transpose(1, 2).clone().requires_grad_() for i in range(3))
    out_v = fused_attention_varlen(pq, pk, pv, cu, max_s, dropout_p=p, seed=77)
    out_p = fused_attention(q, k, v, mask, dropout_p=p, seed=77)
    real = mask[:, None, :, None]
    assert rel_err(pad_input(out_v, idx, B, S).transpose(1, 2), out_p * real) < 1e-6
    dout = torch.randn(out_p.shape, generator=g).to(DEV) * real
    gp = torch.autograd.grad(out_p, (q, k, v), dout)
    gv = torch.autograd.grad(out_v, (pq, pk, pv), unpad_input(dout.transpose(1, 2), mask)[0])
    for a, b in zip(gv, gp):
        assert rel_err(pad_input(a, idx, B, S).transpose(1, 2), b) < 1e-6


def test_varlen_matches_reference_per_sequence():
    H, D = 2, 64
    lens = [5, 37, 20]
    g = torch.Generator().manual_seed(41)
    q, k, v = (torch.randn(sum(lens), H, D, generator=g).to(DEV).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, 5, 42, 62], dtype=torch.int32, device=DEV)
    out = fused_attention_varlen(q, k, v, cu, max(lens))
    for i, L in enumerate(lens):
        s = slice(cu[i].item(), cu[i + 1].item())
        ref = reference_attention(*(t[s].transpose(0, 1)[None] for t in (q, k, v)))
        assert rel_err(out[s], ref[0].transpose(0, 1)) < TOL[torch.float32]


def test_rejects_bad_inputs():
    q, k, v = _inputs(1, 2, 8, 32, torch.float32, seed=0)
    with pytest.raises(ValueError):
        fused_attention(q, k[:, :, :4], v)
    with pytest.raises(ValueError):
        fused_attention(q, k, v, torch.ones(1, 9, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError):
        fused_attention(q, k, v, dropout_p=1.0)


def test_available_reports_interpreter_dtypes():
    if DEV == "cpu":
        assert fused_attention_available("cpu", torch.float32)[0]
        assert fused_attention_available("cpu", torch.float16)[0]
        ok, why = fused_attention_available("cpu", torch.bfloat16)
        assert not ok and "interpreter" in why
    else:
        assert fused_attention_available("cuda", torch.float16)[0]


@cuda_only
@pytest.mark.parametrize("D", [64, 128])
def test_bf16_cuda(D):
    q, k, v = _inputs(2, 4, 200, D, torch.bfloat16, seed=D)
    _check_against_reference(q, k, v, _padding_mask(2, 200, seed=D, full_pad_row=1))
    _check_against_reference(q, k, v, _padding_mask(2, 200, seed=D), p=0.1, seed=3)
