"""Deterministic, rank-sliced batches over a prepared data dir.

Sample order is a function of the seed only: the infinite stream is epoch 0's permutation, then
epoch 1's, ... (each seeded by (seed, epoch)). Global batch t is stream positions
[t*G, (t+1)*G) with G = micro_batch_size * world_size, and rank r takes the r-th slice of m. Masking
is keyed by (seed, stream position), so it does not depend on how samples are split over ranks, and
resuming at `start_step` is O(1): positions are computed, never iterated.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
import torch

from training.data import verify
from training.data.collator import MLMCollator, seed_for
from training.errors import UserError

PERM_STREAM, HELDOUT_STREAM = 11, 12
# The held-out yardstick: the same positions for every run, method, seed and checkpoint. 15% of the non-special
# positions of each held-out row (drawn from a fixed seed and the row's index), every one replaced by [MASK]:
# no kept token to copy and no random one, whatever masking the run trains with (data.mlm_probability, 80/10/10).
FIXED_MASK_SEED = 20261201
FIXED_MASK_PROBABILITY = 0.15


def _rows(ds) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids [N,S], sep_index [N]) as numpy views of the memory-mapped Arrow data."""
    table = ds.data
    chunks = table.column("input_ids").chunks
    seq_len = ds.features["input_ids"].length
    if not chunks:
        return np.zeros((0, max(seq_len, 0)), dtype=np.int32), np.zeros(0, dtype=np.int64)
    flat = [c.flatten().to_numpy(zero_copy_only=False) for c in chunks]
    ids = flat[0] if len(flat) == 1 else np.concatenate(flat)
    seps = table.column("sep_index").to_numpy()
    return ids.reshape(len(seps), -1), seps


def truncate(ids: torch.Tensor, sep: torch.Tensor, seq_len: int, sep_id: int, pad_id: int | None = None):
    """Cut rows to seq_len, still `[CLS] A [SEP] B [SEP]`: rows whose A/B [SEP] would not leave room
    for B get a new separator in the middle (content stays contiguous). A padded row (`prepare --no-pack`)
    whose content ends inside the window is only cut."""
    if seq_len >= ids.shape[1]:
        return ids, sep
    mid = (seq_len - 1) // 2
    keep = sep <= seq_len - 3
    if pad_id is not None:
        ends_inside = ids[:, seq_len - 1] == pad_id
        keep = keep | ends_inside
    pos = torch.arange(seq_len)[None, :]
    moved = torch.where(pos < mid, ids[:, :seq_len], ids[:, (pos - 1).clamp(min=0).squeeze(0)])
    moved[:, mid] = sep_id
    out = torch.where(keep[:, None], ids[:, :seq_len], moved)
    out[:, -1] = torch.where(ends_inside, out[:, -1], sep_id) if pad_id is not None else sep_id
    return out, torch.where(keep, sep, torch.full_like(sep, mid))


def fixed_mask_collator(tokenizer_dir: str) -> MLMCollator:
    """The collator of the held-out yardstick: FIXED_MASK_PROBABILITY of the non-special positions, all [MASK]."""
    return MLMCollator.from_tokenizer_dir(tokenizer_dir, mlm_probability=FIXED_MASK_PROBABILITY, mask_ratio=1.0,
                                          random_ratio=0.0)


def fixed_mask_batch(collator: MLMCollator, ids_np: np.ndarray, sep_np: np.ndarray, rows: torch.Tensor,
                     seq_len: int) -> dict:
    """Rows `rows` of packed (input_ids [N,S], sep_index [N]), cut to seq_len, under the fixed evaluation mask
    (`collator` from fixed_mask_collator): positions drawn from FIXED_MASK_SEED and each row's index, so they do
    not depend on the batch a row is in. The held-out evaluation and `python -m training.evaluate` use this."""
    ids, sep = truncate(torch.from_numpy(ids_np[rows.numpy()].astype(np.int64)),
                        torch.from_numpy(sep_np[rows.numpy()].astype(np.int64)), seq_len, collator.sep_id,
                        collator.pad_id)
    return collator(ids, sep, sample_keys=rows, seed=FIXED_MASK_SEED)


_PREPARE_AGAIN = "prepare the data dir again (`python -m training.data prepare`)"


def read_stats(data_dir: str) -> dict:
    """stats.json of a prepared data dir, checked for the fields a run reads (one UserError line naming it)."""
    stats_path = os.path.join(data_dir, "stats.json")
    if not os.path.isfile(stats_path):
        raise UserError(f"data dir {data_dir}: no stats.json (run `python -m training.data prepare` first)")
    try:
        with open(stats_path, "rb") as f:
            stats = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{stats_path}: truncated or corrupt (not valid JSON); {_PREPARE_AGAIN}") from None
    except OSError as err:
        raise UserError(f"{stats_path}: cannot be read ({err.strerror})") from None
    if not isinstance(stats, dict):
        raise UserError(f"{stats_path}: corrupt (not a JSON object); {_PREPARE_AGAIN}")
    for key in ("seq_len", "vocab_size"):
        value = stats.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"{stats_path}: {key} is {'missing' if value is None else repr(value)}, not a positive "
                            f"integer; {_PREPARE_AGAIN}")
    rows = stats.get("rows")
    if rows is not None and not (isinstance(rows, dict) and all(
            isinstance(rows.get(s), int) and not isinstance(rows.get(s), bool) for s in ("train", "heldout"))):
        raise UserError(f"{stats_path}: rows is {rows!r}, not {{train: N, heldout: N}}; {_PREPARE_AGAIN}")
    return stats


def _load_split(data_dir: str, split: str, stats: dict):
    """(input_ids, sep_index) of one split, every failure one line naming the file (a truncated .arrow file
    fails deep inside pyarrow without naming it)."""
    import datasets
    import pyarrow as pa

    path = os.path.join(data_dir, split)
    if not os.path.isdir(path):
        raise UserError(f"data dir {data_dir}: {split}/ is missing; {_PREPARE_AGAIN}")
    try:
        ids, sep = _rows(datasets.load_from_disk(path))
    except Exception as err:  # noqa: BLE001 - datasets/pyarrow raise many kinds for a damaged split
        culprit = path
        for name in sorted(os.listdir(path), key=lambda n: not n.endswith(".json")):
            try:
                if name.endswith(".json"):  # state.json, dataset_info.json
                    with open(os.path.join(path, name), "rb") as f:
                        json.loads(f.read().decode("utf-8"))
                elif name.endswith(".arrow"):
                    with pa.memory_map(os.path.join(path, name)) as source:
                        pa.ipc.open_stream(source).read_all()
            except Exception:  # noqa: BLE001
                culprit = os.path.join(path, name)
                break
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(f"{culprit}: cannot be read, truncated or corrupt ({first}); {_PREPARE_AGAIN}") from None
    want = (stats.get("rows") or {}).get(split)
    if want is not None and len(sep) != want:
        raise UserError(f"{path}: {len(sep)} rows, but {os.path.join(data_dir, 'stats.json')} says {want} "
                        f"(truncated or from another build); {_PREPARE_AGAIN}")
    if len(sep) and ids.shape[1] != stats["seq_len"]:
        raise UserError(f"{path}: rows of {ids.shape[1]} tokens, but {os.path.join(data_dir, 'stats.json')} says "
                        f"seq_len {stats['seq_len']}; {_PREPARE_AGAIN}")
    return ids, sep


def check_tokenizer_dir(data_dir: str, stats: dict) -> str:
    """data_dir/tokenizer with a vocab.txt of stats' vocab_size tokens; returns its path."""
    tokenizer_dir = os.path.join(data_dir, "tokenizer")
    vocab = os.path.join(tokenizer_dir, "vocab.txt")
    if not os.path.isdir(tokenizer_dir):
        raise UserError(f"data dir {data_dir}: tokenizer/ is missing; {_PREPARE_AGAIN}")
    try:
        with open(vocab, encoding="utf-8") as f:
            size = sum(1 for _ in f)
    except FileNotFoundError:
        raise UserError(f"{vocab}: missing; {_PREPARE_AGAIN}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{vocab}: cannot be read ({getattr(err, 'strerror', None) or 'not UTF-8'}); "
                        f"{_PREPARE_AGAIN}") from None
    if size != stats["vocab_size"]:
        raise UserError(f"{vocab}: {size} tokens, but {os.path.join(data_dir, 'stats.json')} says vocab_size "
                        f"{stats['vocab_size']}; {_PREPARE_AGAIN}")
    return tokenizer_dir


class PretrainingData:
    def __init__(self, data_dir: str, *, mlm_probability: float = 0.15, whole_word: bool = False,
                 nsp: bool = False, mask_ratio: float = 0.8, random_ratio: float = 0.1):
        # Verified as it is opened: stats.json, tokenizer/ and both splits (row counts against stats.json, every
        # file against its digest, token ids against the vocabulary: training/data/verify.py).
        data_dir = str(data_dir)
        self.stats = read_stats(data_dir)
        self.data_dir = data_dir
        self.tokenizer_dir = check_tokenizer_dir(data_dir, self.stats)
        self._train_ids, self._train_sep = _load_split(data_dir, "train", self.stats)
        self._held_ids, self._held_sep = _load_split(data_dir, "heldout", self.stats)
        verify.check(data_dir, self.stats)  # the files as prepare wrote them (digests in stats.json)
        for split, ids in (("train", self._train_ids), ("heldout", self._held_ids)):
            verify.check_ids(os.path.join(data_dir, split), ids, self.stats["vocab_size"])
        if len(self._train_sep) == 0:
            raise UserError(f"data dir {data_dir}: the train split has no rows (corpus too small for seq_len)")
        self.collator = MLMCollator.from_tokenizer_dir(
            self.tokenizer_dir, mlm_probability=mlm_probability, whole_word=whole_word, nsp=nsp,
            mask_ratio=mask_ratio, random_ratio=random_ratio)
        # No NSP swap either: segment B stays the row's own, so the positions do not depend on model.nsp.
        self.fixed_mask_collator = fixed_mask_collator(self.tokenizer_dir)
        self._unigram: torch.Tensor | None = None

    # -- metadata --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.collator.vocab_size

    @property
    def seq_len(self) -> int:
        return int(self.stats["seq_len"])

    @property
    def special_ids(self) -> dict[str, int]:
        c = self.collator
        return {"pad": c.pad_id, "unk": c.unk_id, "cls": c.cls_id, "sep": c.sep_id, "mask": c.mask_id}

    def identity(self) -> dict:
        """What makes this data dir the data a run trains on (recorded in each checkpoint, compared on resume):
        row length, vocabulary (its vocab.txt's SHA-256), rows and tokens per split. The path is kept for the
        message only: the same data moved elsewhere is the same data."""
        import hashlib

        with open(os.path.join(self.tokenizer_dir, "vocab.txt"), "rb") as f:
            vocab_sha = hashlib.sha256(f.read()).hexdigest()
        tokens = self.stats.get("tokens") if isinstance(self.stats.get("tokens"), dict) else {}
        return {"path": os.path.abspath(self.data_dir), "seq_len": self.seq_len, "vocab_size": self.vocab_size,
                "vocab_sha256": vocab_sha, "rows": {"train": self.num_train_rows, "heldout": self.num_heldout_rows},
                "tokens": {k: tokens.get(k) for k in ("train", "heldout")}}

    @property
    def num_train_rows(self) -> int:
        return len(self._train_sep)

    @property
    def num_heldout_rows(self) -> int:
        return len(self._held_sep)

    @property
    def train_rows(self) -> np.ndarray:
        """input_ids [N,S] of the train split, as prepared (memory-mapped)."""
        return self._train_ids

    @property
    def heldout_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids [N,S], sep_index [N]) of the held-out split, as prepared (memory-mapped)."""
        return self._held_ids, self._held_sep

    def unigram_log_probs(self) -> torch.Tensor:
        """log p(token) [vocab] of the unigram table: token frequencies of the train split, add-one smoothed
        over the non-special tokens (special tokens are never targets and get -inf). The cross-entropy of a
        model that ignores its context; a masked-LM loss near it means nothing was learned from context."""
        if self._unigram is None:
            counts = torch.from_numpy(np.bincount(self._train_ids.reshape(-1).astype(np.int64),
                                                  minlength=self.vocab_size)[: self.vocab_size].astype(np.float64))
            special = self.collator.special | ~self.collator.random_pool_mask()
            counts = torch.where(special, torch.zeros_like(counts), counts + 1.0)
            self._unigram = (counts / counts.sum()).log()
        return self._unigram

    # -- order -----------------------------------------------------------------------------------
    def epoch_permutation(self, seed: int, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed_for(seed, epoch, PERM_STREAM))
        return torch.randperm(self.num_train_rows, generator=g)

    def stream_positions(self, step: int, micro_batch_size: int, rank: int = 0, world_size: int = 1,
                         start_sample: int = 0):
        start = start_sample + step * micro_batch_size * world_size + rank * micro_batch_size
        return torch.arange(start, start + micro_batch_size)

    def train_rows_at(self, positions: torch.Tensor, seed: int, _cache: dict | None = None) -> torch.Tensor:
        """Dataset row index of each stream position."""
        n = self.num_train_rows
        cache = {} if _cache is None else _cache
        epochs, offsets = positions // n, positions % n
        rows = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            if epoch not in cache:
                if len(cache) >= 2:  # a batch spans at most two epochs
                    cache.pop(min(cache))
                cache[epoch] = self.epoch_permutation(seed, epoch)
            sel = epochs == epoch
            rows[sel] = cache[epoch][offsets[sel]]
        return rows

    # -- batches ---------------------------------------------------------------------------------
    def _collate(self, ids_np, sep_np, rows, keys, seed, seq_len):
        ids = torch.from_numpy(ids_np[rows.numpy()].astype(np.int64))
        sep = torch.from_numpy(sep_np[rows.numpy()].astype(np.int64))

        def partners(u: torch.Tensor):
            # Uniform over the other rows of the split; truncated like the sample itself.
            n = len(sep_np)
            j = (u * (n - 1)).long().clamp(max=max(n - 2, 0))
            j = j + (j >= rows).long() if n > 1 else rows
            return truncate(torch.from_numpy(ids_np[j.numpy()].astype(np.int64)),
                            torch.from_numpy(sep_np[j.numpy()].astype(np.int64)), seq_len, self.collator.sep_id,
                            self.collator.pad_id)

        ids, sep = truncate(ids, sep, seq_len, self.collator.sep_id, self.collator.pad_id)
        return self.collator(ids, sep, sample_keys=keys, seed=seed, partner_source=partners)

    def train_batches(self, micro_batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                      start_step: int = 0, seq_len: int | None = None, start_sample: int = 0) -> Iterator[dict]:
        """Infinite micro-batches for this rank, from global step `start_step` on, counted from stream
        position `start_sample` (samples consumed before: stages may change the batch size)."""
        if not 0 <= rank < world_size or micro_batch_size < 1:
            raise ValueError("need micro_batch_size >= 1 and 0 <= rank < world_size")
        seq_len = self._check_seq_len(seq_len)
        cache: dict = {}
        step = start_step
        while True:
            positions = self.stream_positions(step, micro_batch_size, rank, world_size, start_sample)
            rows = self.train_rows_at(positions, seed, cache)
            yield self._collate(self._train_ids, self._train_sep, rows, positions, seed, seq_len)
            step += 1

    def heldout_batches(self, batch_size: int, max_batches: int | None = None, seed: int = 0,
                        seq_len: int | None = None, fixed_mask: bool = True) -> Iterator[dict]:
        """Held-out rows in order. fixed_mask (the evaluation): the FIXED_MASK_* positions, all [MASK],
        identical for any batch size, run, seed or model; else the training masking, seeded by `seed`.
        `unigram_nll(batch["labels"])` scores a batch's targets with the unigram table."""
        seq_len = self._check_seq_len(seq_len)
        n = self.num_heldout_rows
        if n == 0:
            raise UserError(f"data dir {self.data_dir}: the held-out split has no rows; nothing to evaluate on")
        count = -(-n // batch_size)
        for b in range(count if max_batches is None else min(count, max_batches)):
            rows = torch.arange(b * batch_size, min(n, (b + 1) * batch_size))
            if fixed_mask:
                batch = fixed_mask_batch(self.fixed_mask_collator, self._held_ids, self._held_sep, rows, seq_len)
            else:
                batch = self._collate(self._held_ids, self._held_sep, rows, rows,
                                      seed_for(seed, 0, HELDOUT_STREAM), seq_len)
            yield batch

    def unigram_nll(self, labels: torch.Tensor) -> float:
        """Summed cross-entropy (nats) of the unigram table over the targets in `labels` (-100 = none)."""
        return float(-self.unigram_log_probs()[labels[labels != -100]].sum())

    def _check_seq_len(self, seq_len: int | None) -> int:
        if seq_len is None:
            return self.seq_len
        if not 8 <= seq_len <= self.seq_len:
            raise ValueError(f"seq_len must be in [8, {self.seq_len}] (the prepared length)")
        return seq_len
