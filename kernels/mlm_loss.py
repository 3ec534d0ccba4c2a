"""Fused MLM head loss: mean CE of (hidden @ W^T + b) vs labels, without the [N, V] logits.

Forward (Triton): each program owns a block of rows and streams vocab blocks, keeping an
online logsumexp, the label's logit and the running argmax (for the accuracy count).
Backward (chunked PyTorch, not Triton): recomputes logits for a chunk of rows at a time,
forms softmax - onehot with the saved lse, and does the two grad matmuls with cuBLAS;
peak extra memory is one [chunk, V] fp32 tile instead of [N, V].
"""
import torch

from ._common import HAS_TRITON, INTERPRET, dot_precision, maybe_autotune, triton_available

if HAS_TRITON:
    import triton
    import triton.language as tl

    def _cfg(bn, bv, bk, w, s):
        return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk}, num_warps=w, num_stages=s)

    _CONFIGS = [_cfg(64, 128, 64, 4, 3), _cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 4, 3),
                _cfg(64, 256, 64, 8, 3)]

    @maybe_autotune(_CONFIGS, ["K"])
    @triton.jit
    def _mlm_fwd(Hd, W, Bv, LBL, LSE, TGT, ARG, N, V, K, sh, sw,
                 PREC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        lbl = tl.load(LBL + offs_n, mask=n_ok, other=-1)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_N], tl.float32)
        tgt = tl.zeros([BLOCK_N], tl.float32)
        arg = tl.zeros([BLOCK_N], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            v_ok = offs_v < V
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_ok = offs_k < K
                h = tl.load(Hd + offs_n[:, None].to(tl.int64) * sh + offs_k[None, :],
                            mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                wT = tl.load(W + offs_v[None, :].to(tl.int64) * sw + offs_k[:, None],
                             mask=v_ok[None, :] & k_ok[:, None], other=0.0)
                acc = tl.dot(h, wT, acc, input_precision=PREC)
            logits = acc + tl.load(Bv + offs_v, mask=v_ok, other=0.0).to(tl.float32)[None, :]
            logits = tl.where(v_ok[None, :], logits, float("-inf"))
            bmax = tl.max(logits, 1)
            arg = tl.where(bmax > m, tl.argmax(logits, 1).to(tl.int32) + v0, arg)  # first max wins
            m_new = tl.maximum(m, bmax)
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), 1)
            m = m_new
            tgt += tl.sum(tl.where(offs_v[None, :] == lbl[:, None], logits, 0.0), 1)
        tl.store(LSE + offs_n, m + tl.log(l), mask=n_ok)
        tl.store(TGT + offs_n, tgt, mask=n_ok)
        tl.store(ARG + offs_n, arg, mask=n_ok)


def mlm_loss_available(device, dtype):
    return triton_available(device, dtype)


# Rows per backward chunk: keep the [chunk, V] fp32 tile near 256 MiB.
_CHUNK_BYTES = 256 * 2**20


class _MLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index):
        N, K = hidden.shape
        V = weight.shape[0]
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        tgt = torch.empty_like(lse)
        arg = torch.empty(N, dtype=torch.int32, device=hidden.device)
        blocks = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=32) if INTERPRET else {}
        lbl = labels.to(torch.int32)
        _mlm_fwd[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
            hidden, weight, bias, lbl, lse, tgt, arg, N, V, K, hidden.stride(0), weight.stride(0),
            PREC=dot_precision(hidden.dtype), **blocks)
        valid = labels != ignore_index
        count = valid.sum()
        # mean over real labels; 0 (not NaN) when there are none
        loss = torch.where(valid, lse - tgt, 0.0).sum() / count.clamp_min(1)
        correct = ((arg.long() == labels) & valid).sum()
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, valid, count)
        return loss, correct

    @staticmethod
    def backward(ctx, dloss, _dcorrect):
        hidden, weight, bias, labels, lse, valid, count = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        scale = dloss / count.clamp_min(1)
        dh = torch.empty_like(hidden)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        db = torch.zeros(V, dtype=torch.float32, device=weight.device)
        chunk = max(1, _CHUNK_BYTES // (4 * V))
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            h = hidden[s:e]
            logits = (h @ weight.t()).float() + bias.float()
            g = torch.exp(logits - lse[s:e, None])  # softmax, via the forward's lse
            rows = torch.arange(e - s, device=h.device)
            lbl = torch.where(valid[s:e], labels[s:e], 0)
            g[rows, lbl] -= 1.0
            g *= valid[s:e].float()[:, None]
            db += g.sum(0)
            # scale (1/count, maybe ~1e-5) applied after the matmuls: fp16 g would underflow
            g = g.to(hidden.dtype)
            dh[s:e] = ((g @ weight).float() * scale).to(dh.dtype)
            dw += (g.t() @ h).float()
        dw *= scale
        db *= scale
        return dh, dw.to(weight.dtype), db.to(bias.dtype), None, None


def fused_mlm_loss(hidden, weight, bias, labels, ignore_index=-100):
    """(mean cross-entropy, number of correct argmax predictions) over labels != ignore_index.

    hidden [N, H] (masked positions only), weight [V, H] (e.g. tied embeddings), bias [V],
    labels [N] int. Differs from F.cross_entropy only in returning 0 (not NaN) for no labels.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N,H] and weight [V,H], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}")
    ok, why = triton_available(hidden.device, hidden.dtype)
    if not ok:
        raise RuntimeError(f"fused_mlm_loss unavailable: {why}")
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # e.g. fp32 master embeddings with bf16 activations
    return _MLMLoss.apply(hidden.contiguous(), weight.contiguous(), bias.contiguous(), labels,
                          ignore_index)
