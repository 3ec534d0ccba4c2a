"""Dynamic MLM (+ optional whole-word masking and NSP) collation of packed rows.

Randomness is drawn PER SAMPLE from a torch.Generator seeded by (seed, sample key), so a sample is
masked identically whatever batch, rank or process history it is collated in: a resumed run, or a
2-rank run, re-masks exactly like the original/1-rank run. Draws are taken in a small per-sample
loop (about 10 us each); all masking logic is vectorised over the batch.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Sequence

import numpy as np
import torch

MASK64 = (1 << 64) - 1
SPECIAL_RE = re.compile(r"^\[.*\]$")  # [PAD] [CLS] ... and bert-base's [unused*]: never random targets


def seed_for(seed: int, key: int, stream: int = 0) -> int:
    """Well-mixed 63-bit seed from (seed, key, stream) (splitmix64 finaliser)."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(key) * 0xBF58476D1CE4E5B9 + int(stream) * 0x94D049BB133111EB
         + 0x632BE59BD9B4E019) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


# Partner source for NSP: maps per-sample uniforms u in [0,1) -> (input_ids [B,S], sep_index [B]).
PartnerSource = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


class MLMCollator:
    def __init__(self, vocab: Sequence[str], *, mlm_probability: float = 0.15, mask_ratio: float = 0.8,
                 random_ratio: float = 0.1, whole_word: bool = False, nsp: bool = False,
                 nsp_probability: float = 0.5, seed: int = 0):
        if not 0.0 < mlm_probability < 1.0 or mask_ratio + random_ratio > 1.0:
            raise ValueError("need 0 < mlm_probability < 1 and mask_ratio + random_ratio <= 1")
        ids = {tok: i for i, tok in enumerate(vocab)}
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            ids[t] for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))
        self.vocab_size = len(vocab)
        bracketed = torch.tensor([bool(SPECIAL_RE.match(t)) for t in vocab])
        self.special = torch.zeros(len(vocab), dtype=torch.bool)
        self.special[[self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id]] = True
        # Lookup tables over the vocab, so per-token tests are one gather.
        self.continuation = torch.tensor([t.startswith("##") for t in vocab])
        self.random_pool = torch.nonzero(~bracketed).flatten()
        self.mlm_probability, self.mask_ratio, self.random_ratio = mlm_probability, mask_ratio, random_ratio
        self.whole_word, self.nsp, self.nsp_probability, self.seed = whole_word, nsp, nsp_probability, seed

    def random_pool_mask(self) -> torch.Tensor:
        """Bool [vocab]: the tokens a random replacement may draw (not bracketed like [PAD] or [unused0])."""
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        mask[self.random_pool] = True
        return mask

    @classmethod
    def from_tokenizer_dir(cls, tokenizer_dir: str, **kwargs) -> "MLMCollator":
        with open(os.path.join(tokenizer_dir, "vocab.txt"), encoding="utf-8") as f:
            return cls([line.rstrip("\n") for line in f], **kwargs)

    # -- randomness ------------------------------------------------------------------------------
    def draws(self, keys: torch.Tensor, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
        """All random numbers for the samples with these keys: one generator draw per sample,
        written straight into the batch buffer (the loop is ~10 us per sample)."""
        g = torch.Generator()
        u = torch.empty(len(keys), 3 * seq_len + 2)
        for i, key in enumerate(keys.tolist()):
            g.manual_seed(seed_for(seed, key))
            torch.rand(3 * seq_len + 2, generator=g, out=u[i])
        pool = len(self.random_pool)
        token = (u[:, 2 + 2 * seq_len:] * pool).long().clamp_(max=pool - 1)
        return {"swap": u[:, 0], "partner": u[:, 1], "select": u[:, 2:2 + seq_len],
                "action": u[:, 2 + seq_len:2 + 2 * seq_len], "random_token": self.random_pool[token]}

    # -- collation -------------------------------------------------------------------------------
    def __call__(self, input_ids, sep_index=None, *, batch_key: int = 0, sample_keys=None,
                 seed: int | None = None, partner_source: PartnerSource | None = None) -> dict:
        """Collate rows [B,S] (padded with [PAD] at the end if shorter) into a masked batch.

        sep_index: position of each row's A/B [SEP] (default: the first [SEP]).
        sample_keys: per-sample keys for the random draws; default (batch_key, position in batch).
        partner_source: where NSP takes random B segments from (default: another row of the batch).
        """
        ids = torch.as_tensor(np.asarray(input_ids) if not torch.is_tensor(input_ids) else input_ids).long()
        bsz, seq_len = ids.shape
        if sep_index is None:
            sep_index = (ids == self.sep_id).int().argmax(dim=1)
        sep = torch.as_tensor(np.asarray(sep_index) if not torch.is_tensor(sep_index) else sep_index).long()
        if sample_keys is None:
            sample_keys = [seed_for(batch_key, i, stream=1) for i in range(bsz)]
        keys = torch.as_tensor(np.asarray(sample_keys, dtype=np.int64)).long()
        r = self.draws(keys, seq_len, self.seed if seed is None else seed)

        out = {}
        if self.nsp:
            ids, swap = self._nsp(ids, sep, r, partner_source)
            out["next_sentence_label"] = swap.long()
        pos = torch.arange(seq_len)
        length = (ids != self.pad_id).sum(dim=1, keepdim=True)
        attention = pos < length
        token_type = (pos > sep[:, None]) & attention

        special = self.special[ids] | ~attention
        select_u, action_u = r["select"], r["action"]
        if self.whole_word:
            # A word = a token plus its following ## continuations: every token takes the draws of
            # its word's first token, so whole words are selected and treated alike.
            starts = ~self.continuation[ids] | special
            start_pos = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values
            select_u, action_u = select_u.gather(1, start_pos), action_u.gather(1, start_pos)
        selected = (select_u < self.mlm_probability) & ~special
        to_mask = selected & (action_u < self.mask_ratio)
        to_random = selected & (action_u >= self.mask_ratio) & (action_u < self.mask_ratio + self.random_ratio)

        masked = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        masked = torch.where(to_random, r["random_token"], masked)
        out.update(input_ids=masked, attention_mask=attention.long(), token_type_ids=token_type.long(),
                   labels=torch.where(selected, ids, torch.full_like(ids, -100)))
        return out

    def _nsp(self, ids, sep, r, partner_source):
        """With p=nsp_probability replace segment B by another row's B; keep length S (truncate/pad)."""
        bsz, seq_len = ids.shape
        swap = r["swap"] < self.nsp_probability
        if partner_source is not None:
            p_ids, p_sep = partner_source(r["partner"])
            p_ids, p_sep = torch.as_tensor(p_ids).long(), torch.as_tensor(p_sep).long()
        elif bsz > 1:  # another row of this batch, uniformly among the others
            other = (r["partner"] * (bsz - 1)).long().clamp(max=bsz - 2)
            idx = (torch.arange(bsz) + 1 + other) % bsz
            p_ids, p_sep = ids[idx], sep[idx]
        else:
            return ids, torch.zeros(bsz, dtype=torch.bool)
        p_len = (p_ids != self.pad_id).sum(dim=1)
        b_len = p_len - p_sep - 1                              # partner's B incl. its final [SEP]
        new_len = torch.minimum(sep + 1 + b_len, torch.full_like(sep, seq_len))
        pos = torch.arange(seq_len)[None, :]
        src = (pos - sep[:, None] - 1 + p_sep[:, None] + 1).clamp(0, seq_len - 1)
        swapped = torch.where(pos <= sep[:, None], ids, p_ids.gather(1, src))
        swapped = torch.where(pos == (new_len - 1)[:, None], torch.full_like(ids, self.sep_id), swapped)
        swapped = torch.where(pos < new_len[:, None], swapped, torch.full_like(ids, self.pad_id))
        return torch.where(swap[:, None], swapped, ids), swap
