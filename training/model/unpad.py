"""Unpadded batches: a padded batch's real tokens, gathered once before the encoder and scattered back once
after it, so every token-wise op (embeddings, projections, FFN, LayerNorm, dropout) runs on real tokens only.

Attention is the one op that needs the rows: on CUDA with `model.attention: fused` the varlen Triton kernel
(`kernels.attention.fused_attention_varlen`) runs on the packed tokens directly; everywhere else the rows are
grouped by length into buckets (lengths rounded up to a multiple of BUCKET_ROUND), each bucket padded only to
its own longest row, and the configured attention runs per bucket with its key-padding mask. A padded key is
masked in both forms, so each real token's output is the padded model's (tests/unit/test_unpad.py: forward and
every gradient). Pre-training rows are packed full (no padding): there `pack` returns None and nothing changes.

Everything here depends on the batch's mask only; it is computed once per batch (one host sync for the
lengths) and shared by every layer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

BUCKET_ROUND = 16  # rows whose lengths round up to the same multiple share a bucket


@dataclass
class Bucket:
    # [rows, L] packed index of each row's j-th real token; past its end 0, any token: those keys are masked and
    # those queries' outputs never read
    gather: torch.Tensor
    key_padding: torch.Tensor  # [rows, L] bool, True = real token
    real: torch.Tensor  # flat indices into rows*L of the real tokens, in packed order within the bucket


@dataclass
class Packed:
    """The real tokens of a padded [batch, seq] batch, in row order (row-major), and how to reach the rows."""
    indices: torch.Tensor  # [total] flat positions b * seq + s of the real tokens
    batch: int
    seq: int
    total: int
    cu_seqlens: torch.Tensor  # [batch + 1] int32, flash-attention's convention
    max_seqlen: int
    buckets: list[Bucket]
    order: torch.Tensor  # [total]: packed position -> position in the buckets' concatenated outputs

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, ...] -> [total, ...]."""
        return x.reshape(self.batch * self.seq, *x.shape[2:]).index_select(0, self.indices)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """[total, ...] -> [batch, seq, ...], zeros at the padding."""
        out = x.new_zeros(self.batch * self.seq, *x.shape[1:])
        return out.index_copy(0, self.indices, x).view(self.batch, self.seq, *x.shape[1:])

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attend: Callable[..., torch.Tensor]) -> torch.Tensor:
        """q, k, v [total, H, D] -> [total, H, D]; `attend(q, k, v, key_padding)` takes [rows, H, L, D] and a bool
        [rows, L] mask (True = real) and returns [rows, H, L, D]."""
        outs = []
        for b in self.buckets:
            rows, length = b.gather.shape
            qb, kb, vb = (t.index_select(0, b.gather.reshape(-1)).view(rows, length, *t.shape[1:]).transpose(1, 2)
                          for t in (q, k, v))
            ob = attend(qb, kb, vb, b.key_padding)  # [rows, H, L, D]
            outs.append(ob.transpose(1, 2).reshape(rows * length, *ob.shape[1:2], ob.shape[-1])
                        .index_select(0, b.real))
        return torch.cat(outs).index_select(0, self.order)


def pack(attention_mask: torch.Tensor) -> Optional[Packed]:
    """The Packed form of a [batch, seq] 0/1 mask, or None when no position is padding (nothing to gain)."""
    mask = attention_mask.bool()
    if bool(mask.all()):
        return None
    batch, seq = mask.shape
    device = mask.device
    lengths = mask.sum(1)
    lengths_host = lengths.tolist()  # the one host sync: bucket shapes are Python ints
    indices = mask.reshape(-1).nonzero().squeeze(1)
    total = indices.numel()
    cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(lengths, 0)
    starts = cu[:-1].long()

    by_bucket: dict[int, list[int]] = {}
    for row, n in enumerate(lengths_host):
        if n:
            by_bucket.setdefault(-(-n // BUCKET_ROUND), []).append(row)
    buckets, dests = [], []
    for key in sorted(by_bucket):
        rows = torch.tensor(by_bucket[key], device=device)
        length = max(lengths_host[r] for r in by_bucket[key])
        j = torch.arange(length, device=device)
        real = j[None, :] < lengths[rows][:, None]  # [rows, L]
        gather = torch.where(real, starts[rows][:, None] + j[None, :], torch.zeros_like(real, dtype=torch.long))
        flat_real = real.reshape(-1).nonzero().squeeze(1)
        buckets.append(Bucket(gather=gather, key_padding=real, real=flat_real))
        dests.append(gather.reshape(-1).index_select(0, flat_real))
    concatenated = torch.cat(dests) if dests else torch.zeros(0, dtype=torch.long, device=device)
    order = torch.empty_like(concatenated)
    order[concatenated] = torch.arange(concatenated.numel(), device=device)
    return Packed(indices=indices, batch=batch, seq=seq, total=total, cu_seqlens=cu,
                  max_seqlen=max(lengths_host), buckets=buckets, order=order)
