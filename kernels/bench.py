"""Benchmark the fused kernels against PyTorch eager (and SDPA for attention) on a CUDA GPU.

    python -m kernels.bench [--out bench.json] [--quick]

Prints one table; times are medians from triton.testing.do_bench. TFLOP/s use the usual
conventions (attention fwd 4*B*H*S^2*D, bwd 2.5x fwd; MLM fwd 2*N*V*H, bwd 2x fwd) and
'%peak' is relative to a bf16 matmul measured in the same run. Elementwise kernels
(bias-GeLU, LayerNorm) are memory bound, so they report GB/s instead.
"""
import argparse
import json
import math
import sys

import torch
import torch.nn.functional as F

DT = torch.bfloat16
DEV = "cuda"
# (B, S, H, D); BERT-base/large phase-1 (S=128) and phase-2 (S=512) shapes
ATTN_SHAPES = [(256, 128, 12, 64), (128, 128, 16, 64), (64, 512, 12, 64), (64, 512, 16, 64)]
PADDED_SHAPE = (64, 512, 16, 64)
TOKENS = 64 * 512
MLM_CASES = [(4915, 768, 30522), (4915, 1024, 30522)]  # ~15% of 64x512 tokens masked


def _need_gpu():
    if torch.cuda.is_available():
        return False
    print("kernels.bench: no CUDA GPU found; timings need a GPU, nothing measured.\n"
          "Correctness on CPU: TRITON_INTERPRET=1 pytest tests/unit/test_kernels_*.py")
    return True


def _bench(fn):
    from triton.testing import do_bench
    fn()  # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _fwd_bwd(fn, inputs):
    """Callable running fn() forward and backward w.r.t. inputs (autograd.grad: no accumulation)."""
    out = fn()
    grad = torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)  # made once, untimed
    del out

    def run():
        torch.autograd.grad(fn(), inputs, grad)
    return run


def _peak_tflops():
    n = 8192
    a = torch.randn(n, n, device=DEV, dtype=DT)
    b = torch.randn(n, n, device=DEV, dtype=DT)
    return 2 * n**3 / (_bench(lambda: a @ b) * 1e-3) / 1e12


def _eager_attention(q, k, v, mask, p):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return F.dropout(torch.softmax(s, -1), p) @ v


def _sdpa(q, k, v, mask, p):
    m = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p)


def _row(rows, kernel, case, impl, fwd=None, fwdbwd=None, flops=None, nbytes=None, peak=None):
    """Time fwd / fwd+bwd callables; failures (OOM, compile errors) become a note, not a crash."""
    r = dict(kernel=kernel, case=case, impl=impl)
    for name, fn, mult in (("fwd", fwd, 1.0), ("fwdbwd", fwdbwd, None)):
        if fn is None:
            continue
        try:
            ms = _bench(fn)
        except Exception as e:  # noqa: BLE001 - keep the table going
            r[name + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
            torch.cuda.empty_cache()
            continue
        r[name + "_ms"] = ms
        if flops is not None:
            f = flops if name == "fwd" else flops * FWD_BWD_FACTOR[kernel]
            r[name + "_tflops"] = f / (ms * 1e-3) / 1e12
            r[name + "_pct_peak"] = 100 * r[name + "_tflops"] / peak
        if nbytes is not None and name == "fwd":
            r["fwd_gbps"] = nbytes / (ms * 1e-3) / 1e9
    rows.append(r)
    print(_fmt(r), flush=True)


FWD_BWD_FACTOR = {"attention": 3.5, "attention_padded": 3.5, "mlm_loss": 3.0}


def _fmt(r):
    def c(key, f="{:8.3f}"):
        return f.format(r[key]) if key in r else " " * (len(f.format(0.0)))
    err = "  ".join(r[k] for k in ("fwd_error", "fwdbwd_error") if k in r)
    return (f"{r['kernel']:<16} {r['case']:<26} {r['impl']:<10} {c('fwd_ms')} {c('fwd_tflops', '{:7.1f}')}"
            f" {c('fwd_pct_peak', '{:6.1f}')} {c('fwd_gbps', '{:7.0f}')}  {c('fwdbwd_ms')}"
            f" {c('fwdbwd_tflops', '{:7.1f}')} {c('fwdbwd_pct_peak', '{:6.1f}')}  {err}")


HEADER = (f"{'kernel':<16} {'case':<26} {'impl':<10} {'fwd ms':>8} {'TFLOP/s':>7} {'%peak':>6}"
          f" {'GB/s':>7}  {'f+b ms':>8} {'TFLOP/s':>7} {'%peak':>6}")


def bench_attention(rows, peak, quick):
    from .attention import fused_attention, fused_attention_varlen, unpad_input
    for B, S, H, D in ATTN_SHAPES[:2] if quick else ATTN_SHAPES:
        for p in (0.0, 0.1):
            qkv = [torch.randn(B, H, S, D, device=DEV, dtype=DT, requires_grad=True) for _ in range(3)]
            flops = 4 * B * H * S * S * D
            case = f"B{B} S{S} H{H} D{D} p{p}"
            for impl, f in (("triton", lambda: fused_attention(*qkv, dropout_p=p)),
                            ("eager", lambda: _eager_attention(*qkv, None, p)),
                            ("sdpa", lambda: _sdpa(*qkv, None, p))):
                _row(rows, "attention", case, impl, f, _fwd_bwd(f, qkv), flops, peak=peak)
            del qkv
            torch.cuda.empty_cache()
    # Padded batch, ~50% padding: varlen runs on real tokens only; TFLOP/s count real work only.
    B, S, H, D = PADDED_SHAPE
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, S + 1, (B,), generator=g)
    mask = (torch.arange(S)[None, :] < lens[:, None]).to(DEV)
    flops = 4 * H * D * int((lens.double() ** 2).sum())
    case = f"B{B} S{S} H{H} pad{100 * (1 - lens.sum().item() / (B * S)):.0f}%"
    qkv = [torch.randn(B, H, S, D, device=DEV, dtype=DT, requires_grad=True) for _ in range(3)]
    packed = [unpad_input(t.detach().transpose(1, 2), mask)[0].requires_grad_() for t in qkv]
    _, _, cu, max_s = unpad_input(qkv[0].detach().transpose(1, 2), mask)
    for impl, f, inp in (
            ("varlen", lambda: fused_attention_varlen(*packed, cu, max_s), packed),
            ("triton", lambda: fused_attention(*qkv, key_padding_mask=mask), qkv),
            ("eager", lambda: _eager_attention(*qkv, mask, 0.0), qkv),
            ("sdpa", lambda: _sdpa(*qkv, mask, 0.0), qkv)):
        _row(rows, "attention_padded", case, impl, f, _fwd_bwd(f, inp), flops, peak=peak)


def bench_pointwise(rows, peak, quick):
    from .bias_gelu import fused_bias_gelu
    from .layernorm import fused_add_dropout_layernorm
    T = TOKENS // (4 if quick else 1)
    for N in (3072, 4096):
        x = torch.randn(T, N, device=DEV, dtype=DT, requires_grad=True)
        b = torch.randn(N, device=DEV, dtype=DT, requires_grad=True)
        nbytes = 2 * x.numel() * x.element_size()  # read x, write y
        for impl, f in (("triton", lambda: fused_bias_gelu(x, b)), ("eager", lambda: F.gelu(x + b))):
            _row(rows, "bias_gelu", f"T{T} N{N}", impl, f, _fwd_bwd(f, [x, b]), nbytes=nbytes)
    for N in (768, 1024):
        x, r = (torch.randn(T, N, device=DEV, dtype=DT, requires_grad=True) for _ in range(2))
        w = torch.ones(N, device=DEV, dtype=DT, requires_grad=True)
        b = torch.zeros(N, device=DEV, dtype=DT, requires_grad=True)
        nbytes = 3 * x.numel() * x.element_size()  # read x, r, write y
        for impl, f in (("triton", lambda: fused_add_dropout_layernorm(x, r, w, b, 0.1)),
                        ("eager", lambda: F.layer_norm(x + F.dropout(r, 0.1), (N,), w, b, 1e-12))):
            _row(rows, "add_drop_ln", f"T{T} N{N} p0.1", impl, f, _fwd_bwd(f, [x, r, w, b]), nbytes=nbytes)


def bench_mlm(rows, peak, quick):
    from .mlm_loss import fused_mlm_loss
    for N, Hd, V in MLM_CASES[:1] if quick else MLM_CASES:
        h = torch.randn(N, Hd, device=DEV, dtype=DT, requires_grad=True)
        W = (0.02 * torch.randn(V, Hd, device=DEV, dtype=DT)).requires_grad_()
        b = torch.zeros(V, device=DEV, dtype=DT, requires_grad=True)
        lbl = torch.randint(0, V, (N,), device=DEV)
        flops = 2 * N * V * Hd
        for impl, f in (("triton", lambda: fused_mlm_loss(h, W, b, lbl)[0]),
                        ("eager", lambda: F.cross_entropy(F.linear(h, W, b).float(), lbl))):
            _row(rows, "mlm_loss", f"N{N} H{Hd} V{V}", impl, f, _fwd_bwd(f, [h, W, b]), flops, peak=peak)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer/smaller cases")
    args = ap.parse_args(argv)
    if _need_gpu():
        return 0
    import triton
    peak = _peak_tflops()
    dev = torch.cuda.get_device_name()
    print(f"{dev} | torch {torch.__version__} | triton {triton.__version__} | "
          f"bf16 matmul peak (8192^3, measured) {peak:.0f} TFLOP/s | dtype bf16 | median of do_bench")
    print(HEADER)
    rows = []
    bench_attention(rows, peak, args.quick)
    bench_pointwise(rows, peak, args.quick)
    bench_mlm(rows, peak, args.quick)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=dev, torch=torch.__version__, triton=triton.__version__,
                           dtype="bf16", peak_bf16_tflops=peak, rows=rows), f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
