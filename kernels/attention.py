"""Flash-attention style fused attention (Triton forward + backward).

Forward: online softmax over key blocks with fp32 accumulators; stores the
row logsumexp (base 2) so backward can recompute P instead of storing [S, S].
Dropout is applied to the probabilities with a Philox stream indexed by
(batch*head, query, key), so backward regenerates exactly the same mask.
One kernel set serves both the padded [B,H,S,D] layout (key_padding_mask) and
the packed varlen [total,H,D] layout (cu_seqlens).
"""
import math

import torch

from ._common import (HAS_TRITON, INTERPRET, dot_precision, draw_seed,
                      maybe_autotune, triton_available)

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["fused_attention", "fused_attention_varlen", "fused_attention_available",
           "unpad_input", "pad_input", "attention_dropout_mask"]

LOG2E = 1.4426950408889634
# Small blocks under the interpreter so tiny test shapes still span several blocks
# (exercises the online-softmax rescaling and the ragged-edge masks).
INTERP_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16}


def fused_attention_available(device, dtype):
    return triton_available(device, dtype)


if HAS_TRITON:
    def _cfg(bm, bn, w, s):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)

    # Untuned starting points (no GPU in the session that wrote this); autotune picks per head dim.
    _FWD_CONFIGS = [_cfg(128, 64, 4, 3), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 3),
                    _cfg(128, 128, 8, 2), _cfg(128, 32, 4, 3)]
    _BWD_CONFIGS = [_cfg(64, 64, 4, 2), _cfg(32, 64, 4, 2), _cfg(64, 128, 8, 2),
                    _cfg(32, 128, 4, 2), _cfg(64, 32, 4, 2)]
    _KEY = ["BLOCK_D", "IS_VARLEN", "HAS_KPM", "DROPOUT"]  # not S: varlen max_s changes per batch

    @triton.jit
    def _seq_info(CU, b, S, IS_VARLEN: tl.constexpr):
        if IS_VARLEN:
            start = tl.load(CU + b).to(tl.int64)
            seqlen = (tl.load(CU + b + 1) - tl.load(CU + b)).to(tl.int32)
        else:
            start = 0
            seqlen = S
        return start, seqlen

    @triton.jit
    def _key_valid(KPM, b, s_kpm, offs_n, seqlen, HAS_KPM: tl.constexpr):
        valid = offs_n < seqlen
        if HAS_KPM:
            valid = valid & (tl.load(KPM + b * s_kpm + offs_n, mask=valid, other=0) != 0)
        return valid

    @triton.jit
    def _keep(seed, bh, max_s, offs_m, offs_n, p_drop, TRANS: tl.constexpr):
        # One random number per (bh, query, key); int64 so B*H*S*S may exceed 2^31.
        base = bh.to(tl.int64) * max_s * max_s
        if TRANS:
            idx = offs_m[None, :] * max_s + offs_n[:, None]
        else:
            idx = offs_m[:, None] * max_s + offs_n[None, :]
        return tl.rand(seed, base + idx) >= p_drop

    @maybe_autotune(_FWD_CONFIGS, _KEY)
    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, KPM, CU,
                  sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd, sob, soh, sos, sod,
                  s_kpm, H, S, D, max_s, qk_scale, p_drop, seed,
                  IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                  PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        start, seqlen = _seq_info(CU, b, S, IS_VARLEN)
        if pid_m * BLOCK_M >= seqlen:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < seqlen
        d_ok = offs_d < D
        q = tl.load(Q + b * sqb + h * sqh + (start + offs_m)[:, None] * sqs + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * skb + h * skh + start * sks
        v_base = V + b * svb + h * svh + start * svs
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, seqlen, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < seqlen
            kT = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0.0)
            s = tl.dot(q, kT, input_precision=PREC) * qk_scale
            s = tl.where(_key_valid(KPM, b, s_kpm, offs_n, seqlen, HAS_KPM)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no valid key so far has m = -inf; shift by 0 to avoid inf - inf = NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)  # normaliser uses the undropped probabilities
            if DROPOUT:
                p = tl.where(_keep(seed, bh, max_s, offs_m, offs_n, p_drop, False), p, 0.0)
            v = tl.load(v_base + offs_n[:, None] * svs + offs_d[None, :] * svd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        empty = l_i == 0.0  # fully padded query row: output 0, lse +inf (=> P = 0 in backward)
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]
        if DROPOUT:
            out = out * (1.0 / (1.0 - p_drop))
        tl.store(O + b * sob + h * soh + (start + offs_m)[:, None] * sos + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
        tl.store(LSE + bh * max_s + offs_m, tl.where(empty, float("inf"), m_i + tl.log2(l_safe)), mask=m_ok)

    @triton.jit
    def _attn_bwd_pre(O, DO, DELTA, CU, sob, soh, sos, sod, sdb, sdh, sds, sdd, H, S, D, max_s,
                      IS_VARLEN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
        # delta_i = sum_d dO_i * O_i  (= rowsum(P * dP), also with dropout)
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        start, seqlen = _seq_info(CU, b, S, IS_VARLEN)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < seqlen
        msk = m_ok[:, None] & (offs_d < D)[None, :]
        rows = (start + offs_m)[:, None]
        o = tl.load(O + b * sob + h * soh + rows * sos + offs_d[None, :] * sod, mask=msk, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + rows * sds + offs_d[None, :] * sdd, mask=msk, other=0.0)
        tl.store(DELTA + bh * max_s + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=m_ok)

    @maybe_autotune(_BWD_CONFIGS, _KEY)
    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU,
                       sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                       sdb, sdh, sds, sdd, sdkb, sdkh, sdks, sdkd, sdvb, sdvh, sdvs, sdvd,
                       s_kpm, H, S, D, max_s, qk_scale, sm_scale, p_drop, seed,
                       IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                       PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # One program per key block; loops over query blocks, works in transposed [N, M] tiles.
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        start, seqlen = _seq_info(CU, b, S, IS_VARLEN)
        if pid_n * BLOCK_N >= seqlen:
            return
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < seqlen
        d_ok = offs_d < D
        n_valid = _key_valid(KPM, b, s_kpm, offs_n, seqlen, HAS_KPM)
        nd = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * skb + h * skh + (start + offs_n)[:, None] * sks + offs_d[None, :] * skd,
                    mask=nd, other=0.0)
        v = tl.load(V + b * svb + h * svh + (start + offs_n)[:, None] * svs + offs_d[None, :] * svd,
                    mask=nd, other=0.0)
        q_base = Q + b * sqb + h * sqh + start * sqs
        do_base = DO + b * sdb + h * sdh + start * sds
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, seqlen, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seqlen
            qT = tl.load(q_base + offs_m[None, :] * sqs + offs_d[:, None] * sqd,
                         mask=m_ok[None, :] & d_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * sds + offs_d[None, :] * sdd,
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(LSE + bh * max_s + offs_m, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + bh * max_s + offs_m, mask=m_ok, other=0.0)
            sT = tl.dot(k, qT, input_precision=PREC) * qk_scale
            # Masking by where (not -inf in s) keeps padded keys/rows at exactly 0, never NaN.
            pT = tl.where(n_valid[:, None], tl.exp2(sT - lse[None, :]), 0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
            if DROPOUT:
                keep = _keep(seed, bh, max_s, offs_m, offs_n, p_drop, True)
                inv = 1.0 / (1.0 - p_drop)
                pdT = tl.where(keep, pT * inv, 0.0)
                dpT = tl.where(keep, dpT * inv, 0.0)
            else:
                pdT = pT
            dv += tl.dot(pdT.to(do.dtype), do, input_precision=PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PREC)
        dk = dk * sm_scale
        tl.store(DK + b * sdkb + h * sdkh + (start + offs_n)[:, None] * sdks + offs_d[None, :] * sdkd,
                 dk.to(DK.dtype.element_ty), mask=nd)
        tl.store(DV + b * sdvb + h * sdvh + (start + offs_n)[:, None] * sdvs + offs_d[None, :] * sdvd,
                 dv.to(DV.dtype.element_ty), mask=nd)

    @maybe_autotune(_BWD_CONFIGS, _KEY)
    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, KPM, CU,
                     sqb, sqh, sqs, sqd, skb, skh, sks, skd, svb, svh, svs, svd,
                     sdb, sdh, sds, sdd, sdqb, sdqh, sdqs, sdqd,
                     s_kpm, H, S, D, max_s, qk_scale, sm_scale, p_drop, seed,
                     IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr, DROPOUT: tl.constexpr,
                     PREC: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Separate dq pass (recomputes P once more) instead of atomics: deterministic.
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        start, seqlen = _seq_info(CU, b, S, IS_VARLEN)
        if pid_m * BLOCK_M >= seqlen:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < seqlen
        d_ok = offs_d < D
        md = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sqb + h * sqh + (start + offs_m)[:, None] * sqs + offs_d[None, :] * sqd,
                    mask=md, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + (start + offs_m)[:, None] * sds + offs_d[None, :] * sdd,
                     mask=md, other=0.0)
        lse = tl.load(LSE + bh * max_s + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * max_s + offs_m, mask=m_ok, other=0.0)
        k_base = K + b * skb + h * skh + start * sks
        v_base = V + b * svb + h * svh + start * svs
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, seqlen, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            nd = (offs_n < seqlen)[None, :] & d_ok[:, None]
            kT = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None] * skd, mask=nd, other=0.0)
            vT = tl.load(v_base + offs_n[None, :] * svs + offs_d[:, None] * svd, mask=nd, other=0.0)
            s = tl.dot(q, kT, input_precision=PREC) * qk_scale
            n_valid = _key_valid(KPM, b, s_kpm, offs_n, seqlen, HAS_KPM)
            p = tl.where(n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, vT, input_precision=PREC)
            if DROPOUT:
                keep = _keep(seed, bh, max_s, offs_m, offs_n, p_drop, False)
                dp = tl.where(keep, dp * (1.0 / (1.0 - p_drop)), 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC)
        dq = dq * sm_scale
        tl.store(DQ + b * sdqb + h * sdqh + (start + offs_m)[:, None] * sdqs + offs_d[None, :] * sdqd,
                 dq.to(DQ.dtype.element_ty), mask=md)

    @triton.jit
    def _dropout_mask_kernel(OUT, seed, max_s, p_drop, BLOCK: tl.constexpr):
        bh = tl.program_id(2)
        offs_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = _keep(seed, bh, max_s, offs_m, offs_n, p_drop, False)
        ptr = OUT + bh.to(tl.int64) * max_s * max_s + offs_m[:, None] * max_s + offs_n[None, :]
        tl.store(ptr, keep.to(tl.int8), mask=(offs_m < max_s)[:, None] & (offs_n < max_s)[None, :])


def _strides(t, varlen):
    """(batch, head, seq, dim) strides; packed varlen tensors have no batch axis."""
    if varlen:
        return 0, t.stride(1), t.stride(0), t.stride(2)
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _blocks():
    return dict(INTERP_BLOCKS) if INTERPRET else {}


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kpm, cu, B, S, max_s, p_drop, scale, seed):
        varlen = cu is not None
        H, D = q.shape[-2] if varlen else q.shape[1], q.shape[-1]
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((B, H, max_s), dtype=torch.float32, device=q.device)
        dummy = lse  # placeholder pointer for absent KPM / CU (never read)
        consts = dict(IS_VARLEN=varlen, HAS_KPM=kpm is not None, DROPOUT=p_drop > 0.0,
                      PREC=dot_precision(q.dtype), BLOCK_D=max(16, triton.next_power_of_2(D)))

        def grid(meta):
            return (triton.cdiv(max_s, meta["BLOCK_M"]), B * H)
        _attn_fwd[grid](q, k, v, o, lse, kpm if kpm is not None else dummy, cu if varlen else dummy,
                        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                        *_strides(o, varlen), kpm.stride(0) if kpm is not None else 0,
                        H, S, D, max_s, scale * LOG2E, p_drop, seed, **consts, **_blocks())
        ctx.save_for_backward(q, k, v, o, lse, kpm, cu)
        ctx.args = (B, S, H, D, max_s, p_drop, scale, seed, consts)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kpm, cu = ctx.saved_tensors
        B, S, H, D, max_s, p_drop, scale, seed, consts = ctx.args
        varlen = cu is not None
        dummy = lse
        cu_arg = cu if varlen else dummy
        kpm_arg = kpm if kpm is not None else dummy
        s_kpm = kpm.stride(0) if kpm is not None else 0
        delta = torch.empty_like(lse)
        pre_bm = 32 if INTERPRET else 64
        _attn_bwd_pre[(triton.cdiv(max_s, pre_bm), B * H)](
            o, do, delta, cu_arg, *_strides(o, varlen), *_strides(do, varlen), H, S, D, max_s,
            IS_VARLEN=varlen, BLOCK_D=consts["BLOCK_D"], BLOCK_M=pre_bm)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        qkvdo = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
                 *_strides(do, varlen))
        tail = (s_kpm, H, S, D, max_s, scale * LOG2E, scale, p_drop, seed)
        _attn_bwd_dkdv[lambda m: (triton.cdiv(max_s, m["BLOCK_N"]), B * H)](
            q, k, v, do, dk, dv, lse, delta, kpm_arg, cu_arg, *qkvdo, *_strides(dk, varlen),
            *_strides(dv, varlen), *tail, **consts, **_blocks())
        _attn_bwd_dq[lambda m: (triton.cdiv(max_s, m["BLOCK_M"]), B * H)](
            q, k, v, do, dq, lse, delta, kpm_arg, cu_arg, *qkvdo, *_strides(dq, varlen),
            *tail, **consts, **_blocks())
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _check(q, k, v, dropout_p):
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must have the same shape (self-attention), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    ok, why = triton_available(q.device, q.dtype)
    if not ok:
        raise RuntimeError(f"fused_attention unavailable: {why}")


def fused_attention(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None, seed=None):
    """softmax(q k^T * scale, keys masked where key_padding_mask is False) -> dropout -> @ v.

    q, k, v: [B, H, S, D] (any strides). key_padding_mask: [B, S] bool (or 0/1), True = real token.
    Query rows with no real key return 0 (and get zero grads). `seed` fixes the dropout
    stream (default: drawn from torch's CPU generator); see attention_dropout_mask.
    """
    _check(q, k, v, dropout_p)
    B, H, S, D = q.shape
    kpm = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (B, S):
            raise ValueError(f"key_padding_mask must be [B, S]={B, S}, got {tuple(key_padding_mask.shape)}")
        kpm = key_padding_mask.to(device=q.device, dtype=torch.uint8).contiguous()
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed()
    return _FlashAttention.apply(q, k, v, kpm, None, B, S, S, float(dropout_p), float(scale),
                                 int(seed or 0))


def fused_attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                           seed=None):
    """Attention over packed sequences: q, k, v [total, H, D]; cu_seqlens int32 [batch+1].

    With max_seqlen == S the dropout stream equals fused_attention's for the same seed.
    """
    _check(q, k, v, dropout_p)
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [batch+1]")
    B = cu_seqlens.numel() - 1
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if dropout_p > 0.0 and seed is None:
        seed = draw_seed()
    return _FlashAttention.apply(q, k, v, None, cu_seqlens.to(q.device).contiguous(), B,
                                 int(max_seqlen), int(max_seqlen), float(dropout_p), float(scale),
                                 int(seed or 0))


def attention_dropout_mask(seed, B, H, S, dropout_p, device):
    """The kernel's dropout multiplier for `seed`: [B, H, S, S] float, 0 or 1/(1-p).

    Debug/test path: tests/helpers/kernels_reference.py reference_attention(..., dropout_mask=this) reproduces the kernel.
    """
    keep = torch.empty((B, H, S, S), dtype=torch.int8, device=device)
    blk = 16
    _dropout_mask_kernel[(triton.cdiv(S, blk), triton.cdiv(S, blk), B * H)](
        keep, int(seed), S, float(dropout_p), BLOCK=blk)
    return keep.float() / (1.0 - dropout_p)


def unpad_input(hidden, attention_mask):
    """[B, S, ...] + mask [B, S] -> (packed [total, ...], indices, cu_seqlens int32, max_seqlen)."""
    mask = attention_mask.bool()
    seqlens = mask.sum(1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu = torch.nn.functional.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0  # host sync, once per batch
    packed = hidden.reshape(-1, *hidden.shape[2:]).index_select(0, indices)
    return packed, indices, cu, max_seqlen


def pad_input(packed, indices, B, S):
    """Inverse of unpad_input: scatter [total, ...] back to [B, S, ...], zeros at padding."""
    out = packed.new_zeros((B * S, *packed.shape[1:]))
    return out.index_copy(0, indices, packed).view(B, S, *packed.shape[1:])
