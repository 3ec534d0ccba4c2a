"""Fused y = LayerNorm(x + dropout(r)) (post-LN BERT residual), forward and backward.

One row per program in forward (row fits one block: hidden <= 16k). The dropout mask
is regenerated from (seed, row*N + col) in backward, so neither it nor x + dropout(r)
is stored: only per-row mean and rstd. dW/db are reduced per program then summed.
"""
import torch

from ._common import HAS_TRITON, INTERPRET, draw_seed, triton_available

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _ln_fwd(X, R, W, Bi, Y, MEAN, RSTD, N, sx, sr, sy, eps, p_drop, seed,
                DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + row * sr + cols, mask=mask, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = tl.rand(seed, row * N + cols) >= p_drop
            r = tl.where(keep, r * (1.0 / (1.0 - p_drop)), 0.0)
        h = x + r
        mean = tl.sum(h, 0) / N
        hc = tl.where(mask, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(hc * hc, 0) / N + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(Bi + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * sy + cols, (hc * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + row, mean)
        tl.store(RSTD + row, rstd)

    @triton.jit
    def _ln_bwd(DY, X, R, W, MEAN, RSTD, DX, DR, DWP, DBP, M, N, sdy, sx, sr, p_drop, seed,
                DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr):
        # Each program walks rows pid, pid+G, ... and keeps dW/db partials in registers.
        pid = tl.program_id(0)
        G = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], tl.float32)
        db = tl.zeros([BLOCK_N], tl.float32)
        for i in range(pid, M, G):
            row = tl.cast(i, tl.int64)
            x = tl.load(X + row * sx + cols, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(R + row * sr + cols, mask=mask, other=0.0).to(tl.float32)
            if DROPOUT:
                keep = tl.rand(seed, row * N + cols) >= p_drop
                r = tl.where(keep, r * (1.0 / (1.0 - p_drop)), 0.0)
            rstd = tl.load(RSTD + row)
            xhat = tl.where(mask, (x + r - tl.load(MEAN + row)) * rstd, 0.0)
            dy = tl.load(DY + row * sdy + cols, mask=mask, other=0.0).to(tl.float32)
            dw += dy * xhat
            db += dy
            wdy = w * dy
            dh = rstd * (wdy - (xhat * (tl.sum(xhat * wdy, 0) / N) + tl.sum(wdy, 0) / N))
            tl.store(DX + row * N + cols, dh.to(DX.dtype.element_ty), mask=mask)
            if DROPOUT:
                dh = tl.where(keep, dh * (1.0 / (1.0 - p_drop)), 0.0)
            tl.store(DR + row * N + cols, dh.to(DR.dtype.element_ty), mask=mask)
        tl.store(DWP + pid * N + cols, dw, mask=mask)
        tl.store(DBP + pid * N + cols, db, mask=mask)

    @triton.jit
    def _keep_flat(OUT, n, seed, p_drop, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(OUT + offs, (tl.rand(seed, offs) >= p_drop).to(tl.int8), mask=offs < n)


def layernorm_available(device, dtype):
    return triton_available(device, dtype)


def _rows(t, N):
    t = t.reshape(-1, N)
    return t if t.stride(-1) == 1 else t.contiguous()


class _AddDropoutLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, r, weight, bias, eps, p_drop, seed):
        shape, N = x.shape, x.shape[-1]
        x2, r2 = _rows(x, N), _rows(r, N)
        M = x2.shape[0]
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(N)
        _ln_fwd[(M,)](x2, r2, weight, bias, y, mean, rstd, N, x2.stride(0), r2.stride(0),
                      y.stride(0), eps, p_drop, seed, DROPOUT=p_drop > 0.0, BLOCK_N=block,
                      num_warps=min(max(block // 256, 1), 8))
        ctx.save_for_backward(x2, r2, weight, mean, rstd)
        ctx.args = (shape, r.dtype, bias.dtype, p_drop, seed, block)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, r2, weight, mean, rstd = ctx.saved_tensors
        shape, r_dtype, b_dtype, p_drop, seed, block = ctx.args
        M, N = x2.shape
        dy2 = _rows(dy, N)
        G = min(M, 4 if INTERPRET else 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count)
        dx = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
        dr = torch.empty((M, N), dtype=r_dtype, device=x2.device)
        dwp = torch.empty((G, N), dtype=torch.float32, device=x2.device)
        dbp = torch.empty_like(dwp)
        _ln_bwd[(G,)](dy2, x2, r2, weight, mean, rstd, dx, dr, dwp, dbp, M, N, dy2.stride(0),
                      x2.stride(0), r2.stride(0), p_drop, seed, DROPOUT=p_drop > 0.0,
                      BLOCK_N=block, num_warps=min(max(block // 256, 1), 8))
        return (dx.view(shape), dr.view(shape), dwp.sum(0).to(weight.dtype),
                dbp.sum(0).to(b_dtype), None, None, None)


def fused_add_dropout_layernorm(x, r, weight, bias, dropout_p=0.0, eps=1e-12, seed=None):
    """LayerNorm(x + dropout(r)) over the last dim; fp32 statistics. Grads for x, r, weight, bias."""
    if x.shape != r.shape or weight.numel() != x.shape[-1] or bias.numel() != x.shape[-1]:
        raise ValueError("x and r must match; weight/bias must have size x.shape[-1]")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    ok, why = triton_available(x.device, x.dtype)
    if not ok:
        raise RuntimeError(f"fused_add_dropout_layernorm unavailable: {why}")
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed()
    return _AddDropoutLN.apply(x, r, weight.contiguous(), bias.contiguous(), float(eps),
                               float(dropout_p), int(seed or 0))


def layernorm_dropout_mask(seed, shape, dropout_p, device):
    """The kernel's dropout multiplier on r for `seed` (0 or 1/(1-p)); for tests/debugging."""
    n = 1
    for s in shape:
        n *= s
    keep = torch.empty(n, dtype=torch.int8, device=device)
    _keep_flat[(triton.cdiv(n, 1024),)](keep, n, int(seed), float(dropout_p), BLOCK=1024)
    return (keep.float() / (1.0 - dropout_p)).view(shape)
