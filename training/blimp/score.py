"""Sentence scores for minimal pairs: a masked LM's pseudo-log-likelihood, and the two count models that stand
beside it as the "no context" yardsticks (as the unigram table stands beside the held-out loss).

Pseudo-log-likelihood (Salazar et al. 2020): the sum over the sentence's word pieces of log p(piece | the
sentence with that piece masked). `word` is Kauf & Ivanova's (2023) PLL-word-l2r: when a piece is scored, the
later pieces of the same word are masked too, so a word split into pieces is not scored by copying its own
continuation ("##ing" from "sleep" + "##ing"). Every masked copy of a sentence is one row; rows of sentences of
similar length share a batch (sorted by length, padded at the end with an attention mask), and only the masked
position of each row goes through the MLM head.

Transformers' `pipeline`/evaluate packages have no PLL scorer for a masked LM, and minicons (which has one)
is not installed here; the rows and the head call are a few lines on our own model.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

PLL_VARIANTS = ("token", "word")


def encode(tokenizer, sentences: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids with [CLS] ... [SEP], word index per position, -1 at special tokens) per sentence."""
    out = []
    for enc in tokenizer.encode_batch(list(sentences)):
        words = np.array([-1 if w is None or s else w for w, s in zip(enc.word_ids, enc.special_tokens_mask)],
                         dtype=np.int64)
        out.append((np.asarray(enc.ids, dtype=np.int64), words))
    return out


def masked_copies(ids: np.ndarray, words: np.ndarray, variant: str, mask_id: int):
    """(rows [n, L], target positions [n], target ids [n]): one row per non-special piece, that piece masked
    (and with `word`, the later pieces of its word too)."""
    positions = np.nonzero(words >= 0)[0]
    rows = np.repeat(ids[None, :], len(positions), axis=0)
    cols = np.arange(len(ids))[None, :]
    mask = cols == positions[:, None]
    if variant == "word":
        same_word = words[None, :] == words[positions][:, None]
        mask |= same_word & (cols > positions[:, None])
    rows[mask] = mask_id
    return rows, positions, ids[positions]


@torch.no_grad()
def pll(model, encoded: list[tuple[np.ndarray, np.ndarray]], variant: str, mask_id: int, pad_id: int,
        rows_per_batch: int = 2048, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Pseudo-log-likelihood (nats, float64) of each encoded sentence under `model` (our BertForPreTraining, eval
    mode). `progress(k)` is called with the number of sentences finished after every batch."""
    if variant not in PLL_VARIANTS:
        raise ValueError(f"unknown PLL variant {variant!r}; expected one of {PLL_VARIANTS}")
    device = next(model.parameters()).device
    scores = np.zeros(len(encoded), dtype=np.float64)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    start = 0
    while start < len(order):
        batch, rows_in = [], 0
        while start < len(order):
            n = int((encoded[order[start]][1] >= 0).sum())
            if batch and rows_in + n > rows_per_batch:
                break
            batch.append(order[start])
            rows_in += n
            start += 1
        width = max(len(encoded[i][0]) for i in batch)
        parts = [masked_copies(*encoded[i], variant, mask_id) for i in batch]
        rows = np.full((sum(len(p[1]) for p in parts), width), pad_id, dtype=np.int64)
        owner = np.repeat(np.array(batch), [len(p[1]) for p in parts])
        r = 0
        for p in parts:
            rows[r:r + len(p[1]), :p[0].shape[1]] = p[0]
            r += len(p[1])
        positions = np.concatenate([p[1] for p in parts])
        targets = np.concatenate([p[2] for p in parts])
        input_ids = torch.from_numpy(rows).to(device)
        lengths = torch.tensor([len(encoded[i][0]) for i in owner], device=device)
        attention = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
        hidden, _ = model.bert.encode(input_ids, attention)
        picked = hidden[torch.arange(len(positions), device=device), torch.from_numpy(positions).to(device)]
        logp = torch.log_softmax(model.cls.predictions(picked).float(), dim=-1)
        target_logp = logp.gather(1, torch.from_numpy(targets).to(device)[:, None]).squeeze(1).double().cpu()
        np.add.at(scores, owner, target_logp.numpy())
        if progress is not None:
            progress(len(batch))
    return scores


class CountModels:
    """A unigram and a bigram model of token counts in a training split, the "no context" yardsticks.

    unigram: log p(t) with add-one smoothing over the vocabulary, summed over the sentence's pieces.
    bigram: Witten-Bell interpolation with the unigram (Chen & Goodman 1998's form: p(w|v) = (c(v,w) + T(v)
    p1(w)) / (c(v) + T(v)), T(v) the number of distinct followers of v), over [CLS] piece ... piece [SEP], so
    the first piece is scored after [CLS] and the end of the sentence by p([SEP] | last piece). Pairs are
    counted within each training row, [PAD] excluded. No smoothing constant to tune: nothing here is fitted on
    BLiMP."""

    def __init__(self, train_ids: np.ndarray, vocab_size: int, pad_id: int):
        ids = np.asarray(train_ids, dtype=np.int64).reshape(len(train_ids), -1)
        flat = ids[ids != pad_id]
        counts = np.bincount(flat, minlength=vocab_size)[:vocab_size].astype(np.float64)
        counts[pad_id] = 0.0
        smoothed = counts + 1.0
        smoothed[pad_id] = 0.0
        with np.errstate(divide="ignore"):
            self.unigram_logp = np.log(smoothed / smoothed.sum())
        self.vocab_size = vocab_size
        left, right = ids[:, :-1].reshape(-1), ids[:, 1:].reshape(-1)
        keep = (left != pad_id) & (right != pad_id)
        codes = left[keep] * vocab_size + right[keep]
        self.keys, pair_counts = np.unique(codes, return_counts=True)
        self.pair_counts = pair_counts.astype(np.float64)
        heads = self.keys // vocab_size
        self.context_count = np.bincount(heads, weights=self.pair_counts, minlength=vocab_size)
        self.followers = np.bincount(heads, minlength=vocab_size).astype(np.float64)

    def unigram(self, encoded: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        return np.array([self.unigram_logp[ids[words >= 0]].sum() for ids, words in encoded], dtype=np.float64)

    def bigram(self, encoded: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        out = np.zeros(len(encoded), dtype=np.float64)
        p1 = np.exp(self.unigram_logp)
        for i, (ids, _) in enumerate(encoded):
            v, w = ids[:-1], ids[1:]
            codes = v * self.vocab_size + w
            at = np.searchsorted(self.keys, codes).clip(max=len(self.keys) - 1)
            c_vw = np.where(self.keys[at] == codes, self.pair_counts[at], 0.0)
            c_v, t_v = self.context_count[v], self.followers[v]
            p = np.where(c_v > 0, (c_vw + t_v * p1[w]) / np.maximum(c_v + t_v, 1.0), p1[w])
            out[i] = np.log(p).sum()
        return out
