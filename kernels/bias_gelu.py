"""Fused bias + erf-GeLU: y = gelu(x + b), forward and backward in one pass each.

Saves only x (already alive) and recomputes x + b in backward, so the pre-activation
is never stored. db is a column sum of dx, done by torch in fp32.
"""
import torch

from ._common import HAS_TRITON, INTERPRET, triton_available

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _bias_gelu_fwd(X, B, Y, n, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + \
            tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _bias_gelu_bwd(DY, X, B, DX, n, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + \
            tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1/sqrt(2*pi)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, (dy * (cdf + z * pdf)).to(DX.dtype.element_ty), mask=mask)


def bias_gelu_available(device, dtype):
    return triton_available(device, dtype)


def _block():
    return 256 if INTERPRET else 1024


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x = x.contiguous()
        y = torch.empty_like(x)
        n, N = x.numel(), bias.numel()
        _bias_gelu_fwd[(triton.cdiv(n, _block()),)](x, bias, y, n, N, BLOCK=_block())
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n, N = x.numel(), bias.numel()
        _bias_gelu_bwd[(triton.cdiv(n, _block()),)](dy, x, bias, dx, n, N, BLOCK=_block())
        db = dx.view(-1, N).sum(0, dtype=torch.float32).to(bias.dtype)
        return dx, db


def fused_bias_gelu(x, bias):
    """gelu(x + bias) with exact (erf) GeLU; x [..., N], bias [N]."""
    if x.shape[-1] != bias.numel():
        raise ValueError(f"bias size {bias.numel()} != last dim of x {x.shape[-1]}")
    ok, why = triton_available(x.device, x.dtype)
    if not ok:
        raise RuntimeError(f"fused_bias_gelu unavailable: {why}")
    return _BiasGelu.apply(x, bias.contiguous())
