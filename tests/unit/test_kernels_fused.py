"""Fused bias-GeLU, residual+dropout+LayerNorm and MLM loss vs eager fp32 references.

Tolerances (relative Frobenius-norm error): fp32 1e-4, fp16 2e-3, bf16 (CUDA only) 1.6e-2.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (via kernels)


import pytest  # noqa: E402

from tests.helpers.kernels_testing import rel_err, setup_kernels_for_tests  # noqa: E402

DEV = setup_kernels_for_tests()

import kernels.mlm_loss as mlm_mod  # noqa: E402
from kernels.bias_gelu import bias_gelu_available, fused_bias_gelu  # noqa: E402
from kernels.layernorm import (fused_add_dropout_layernorm, layernorm_available,  # noqa: E402
                               layernorm_dropout_mask)
from kernels.mlm_loss import fused_mlm_loss, mlm_loss_available  # noqa: E402
from tests.helpers.kernels_reference import (reference_add_dropout_layernorm, reference_bias_gelu,  # noqa: E402
                               reference_mlm_loss)

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16]
cuda_only = pytest.mark.skipif(DEV != "cuda", reason="bf16 needs a CUDA GPU")


def _rand(g, *shape, dtype=torch.float32, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=g) * scale + shift).to(DEV, dtype).requires_grad_()


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _compare(pairs, tol):
    for name, a, b in pairs:
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < tol, (name, rel_err(a, b))


def _fp32_copies(*ts):
    return [t.detach().float().requires_grad_() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 100)])
def test_bias_gelu(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x, b = _rand(g, *shape, dtype=dtype, scale=2.0), _rand(g, shape[-1], dtype=dtype)
    y = fused_bias_gelu(x, b)
    dy = torch.randn(y.shape, generator=g).to(y)
    xf, bf = _fp32_copies(x, b)
    ref = reference_bias_gelu(xf, bf)
    _compare([("y", y, ref)] + list(zip(("dx", "db"), _grads(y, (x, b), dy),
                                        _grads(ref, (xf, bf), dy.float()))), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("N", [40, 128])
def test_add_dropout_layernorm(dtype, p, N):
    g = torch.Generator().manual_seed(N)
    x, r = _rand(g, 4, 7, N, dtype=dtype), _rand(g, 4, 7, N, dtype=dtype)
    w, b = _rand(g, N, scale=0.1, shift=1.0), _rand(g, N)
    y = fused_add_dropout_layernorm(x, r, w, b, dropout_p=p, eps=1e-5, seed=17)
    dy = torch.randn(y.shape, generator=g).to(y)
    mask = layernorm_dropout_mask(17, x.shape, p, DEV) if p > 0 else None
    xf, rf, wf, bf = _fp32_copies(x, r, w, b)
    ref = reference_add_dropout_layernorm(xf, rf, wf, bf, 1e-5, dropout_mask=mask)
    got = _grads(y, (x, r, w, b), dy)
    want = _grads(ref, (xf, rf, wf, bf), dy.float())
    _compare([("y", y, ref)] + list(zip(("dx", "dr", "dw", "db"), got, want)), TOL[dtype])


def test_layernorm_dropout_reproducible_and_rate():
    g = torch.Generator().manual_seed(0)
    x, r = _rand(g, 64, 256), _rand(g, 64, 256)
    w, b = torch.ones(256, device=DEV), torch.zeros(256, device=DEV)
    a = fused_add_dropout_layernorm(x, r, w, b, 0.1, seed=5)
    assert torch.equal(a, fused_add_dropout_layernorm(x, r, w, b, 0.1, seed=5))
    assert not torch.equal(a, fused_add_dropout_layernorm(x, r, w, b, 0.1, seed=6))
    keep = layernorm_dropout_mask(5, (64, 256), 0.1, DEV) > 0  # 16384 draws
    assert abs(keep.float().mean().item() - 0.9) < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,H,V", [(37, 40, 100), (16, 64, 64)])
def test_mlm_loss(dtype, N, H, V):
    g = torch.Generator().manual_seed(N * V)
    h, W, b = _rand(g, N, H, dtype=dtype), _rand(g, V, H, dtype=dtype, scale=0.3), _rand(g, V, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100  # ignored positions
    labels = labels.to(DEV)
    loss, correct = fused_mlm_loss(h, W, b, labels)
    hf, Wf, bf = _fp32_copies(h, W, b)
    ref_loss, ref_correct = reference_mlm_loss(hf, Wf, bf, labels)
    assert correct.item() == ref_correct.item()
    _compare([("loss", loss, ref_loss)] + list(zip(("dh", "dW", "db"), _grads(loss, (h, W, b), None),
                                                    _grads(ref_loss, (hf, Wf, bf), None))), TOL[dtype])


def test_mlm_loss_backward_chunks_and_accuracy(monkeypatch):
    # force several backward chunks; make the argmax predictable so `correct` is non-trivial
    monkeypatch.setattr(mlm_mod, "_CHUNK_BYTES", 4 * 70 * 6)  # 6 rows per chunk
    g = torch.Generator().manual_seed(3)
    N, H, V = 20, 32, 70
    W = _rand(g, V, H)
    labels = torch.randint(0, V, (N,), generator=g).to(DEV)
    h = (W.detach()[labels] * 3 + 0.1 * torch.randn(N, H, generator=g).to(DEV))
    h[:4] = torch.randn(4, H, generator=g).to(DEV)
    h.requires_grad_()
    b = _rand(g, V, scale=0.01)
    loss, correct = fused_mlm_loss(h, W, b, labels)
    hf, Wf, bf = _fp32_copies(h, W, b)
    ref_loss, ref_correct = reference_mlm_loss(hf, Wf, bf, labels)
    assert correct.item() == ref_correct.item() and correct.item() >= N - 4
    _compare([("loss", loss, ref_loss)] + list(zip(("dh", "dW", "db"), _grads(loss, (h, W, b), None),
                                                    _grads(ref_loss, (hf, Wf, bf), None))), 1e-4)


def test_mlm_loss_all_ignored_is_zero_not_nan():
    g = torch.Generator().manual_seed(1)
    h, W, b = _rand(g, 4, 32), _rand(g, 50, 32), _rand(g, 50)
    loss, correct = fused_mlm_loss(h, W, b, torch.full((4,), -100, device=DEV))
    assert loss.item() == 0.0 and correct.item() == 0
    assert all(torch.all(t == 0) for t in _grads(loss, (h, W, b), None))


def test_available_checks():
    for fn in (bias_gelu_available, layernorm_available, mlm_loss_available):
        assert fn(DEV, torch.float32)[0]
        ok, why = fn("cpu", torch.bfloat16)
        assert not ok and why


@cuda_only
def test_bf16_cuda():
    g = torch.Generator().manual_seed(0)
    tol = TOL[torch.bfloat16]
    x, b = _rand(g, 64, 3072, dtype=torch.bfloat16), _rand(g, 3072, dtype=torch.bfloat16)
    xf, bf = _fp32_copies(x, b)
    _compare([("gelu", fused_bias_gelu(x, b), reference_bias_gelu(xf, bf))], tol)
    x, r = _rand(g, 64, 1024, dtype=torch.bfloat16), _rand(g, 64, 1024, dtype=torch.bfloat16)
    w, bb = _rand(g, 1024, scale=0.1, shift=1.0), _rand(g, 1024)
    xf, rf, wf, bf = _fp32_copies(x, r, w, bb)
    y = fused_add_dropout_layernorm(x, r, w, bb)
    ref = reference_add_dropout_layernorm(xf, rf, wf, bf)
    dy = torch.randn(y.shape, generator=g).to(y)
    _compare([("ln", y, ref)] + list(zip(("dx", "dr", "dw", "db"), _grads(y, (x, r, w, bb), dy),
                                         _grads(ref, (xf, rf, wf, bf), dy.float()))), tol)
    h, W, bv = (_rand(g, 300, 768, dtype=torch.bfloat16), _rand(g, 1000, 768, dtype=torch.bfloat16, scale=0.05),
                _rand(g, 1000, dtype=torch.bfloat16))
    labels = torch.randint(0, 1000, (300,), generator=g).to(DEV)
    loss, _ = fused_mlm_loss(h, W, bv, labels)
    hf, Wf, bf = _fp32_copies(h, W, bv)
    ref_loss, _ = reference_mlm_loss(hf, Wf, bf, labels)
    _compare([("loss", loss, ref_loss)] + list(zip(("dh", "dW", "db"), _grads(loss, (h, W, bv), None),
                                                    _grads(ref_loss, (hf, Wf, bf), None))), tol)
