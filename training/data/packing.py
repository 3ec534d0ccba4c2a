"""Pack a stream of tokenised documents into fixed-length `[CLS] A [SEP] B [SEP]` rows (or, for `prepare
--no-pack`, one padded document per row: RowPerDocument at the end).

The content stream is doc1 [SEP] doc2 [SEP] doc3 ... (RoBERTa full-sentences style, crossing
document boundaries). Each row holds exactly seq_len tokens and exactly one A/B separator at
`sep_index`, which is always the first [SEP] of the row:
  * if the row's window contains a document boundary (with >= 1 token on each side), that
    boundary's [SEP] is the A/B separator (so A never contains a [SEP]);
  * otherwise a [SEP] is inserted at a random split point (seeded), as in BERT's random A length.
A document separator that would start a row is skipped ([CLS] already marks a fresh start), so
rows never begin with [CLS] [SEP]. Every document token lands in exactly one kept row, in order;
only the tail of the stream that cannot fill a last row is dropped (and counted).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import numpy as np


class Packer:
    def __init__(self, seq_len: int, cls_id: int, sep_id: int, seed: int, dtype=np.int32):
        if seq_len < 8:
            raise ValueError("seq_len must be >= 8")
        self.seq_len, self.cls, self.sep, self.dtype = seq_len, cls_id, sep_id, dtype
        self.rng = np.random.default_rng(seed)
        self.buf = np.empty(0, dtype=np.int64)  # stream tokens not yet in a row
        self.doc_tokens = 0                     # document tokens fed in
        self.rows = 0
        self._open = False                      # a document's tokens fed, its closing [SEP] not yet

    def feed(self, docs: Iterable[list[int]],
             cont: Optional[Sequence[bool]] = None) -> Iterator[tuple[np.ndarray, int]]:
        """Add documents, yield the (row, sep_index) pairs that became complete. `cont[i]`: docs[i] is a piece of
        a long document whose next piece follows (training/data/pieces.py): no [SEP] after it."""
        parts = [self.buf]
        for i, ids in enumerate(docs):
            if len(ids):
                parts.append(np.asarray(ids, dtype=np.int64))
                self.doc_tokens += len(ids)
                self._open = True
            if self._open and (cont is None or not cont[i]):
                parts.append(np.array([self.sep], dtype=np.int64))
                self._open = False
        self.buf = np.concatenate(parts)
        yield from self._drain()

    def _drain(self) -> Iterator[tuple[np.ndarray, int]]:
        buf, pos, width = self.buf, 0, self.seq_len - 2  # width: tokens between [CLS] and final [SEP]
        is_sep = buf == self.sep
        while True:
            while pos < len(buf) and is_sep[pos]:
                pos += 1  # a document separator never starts a row
            if len(buf) - pos < width:
                break
            window = is_sep[pos + 1: pos + width - 1]  # boundary needs >= 1 token on both sides
            hit = int(np.argmax(window)) if window.any() else -1
            row = np.empty(self.seq_len, dtype=self.dtype)
            row[0], row[-1] = self.cls, self.sep
            if hit >= 0:
                split = hit + 1                        # A = buf[pos:pos+split], SEP at buf[pos+split]
                row[1:-1] = buf[pos: pos + width]
                pos += width
            else:
                split = int(self.rng.integers(1, width - 1))  # A length in [1, width-2]
                row[1: 1 + split] = buf[pos: pos + split]
                row[1 + split] = self.sep
                row[2 + split: -1] = buf[pos + split: pos + width - 1]
                pos += width - 1
            self.rows += 1
            yield row, 1 + split
        self.buf = buf[pos:]

    def dropped_tokens(self) -> int:
        """Document tokens left in the unfinished tail (call after the last feed)."""
        return int(np.count_nonzero(self.buf != self.sep))


class RowPerDocument:
    """`prepare --no-pack`: one document per row, `[CLS] doc [SEP]` then [PAD]s to seq_len (the shape of
    fine-tuning-style data). A document longer than a row continues in the next rows (nothing is dropped); only
    its last row is padded. `sep_index` is the row's [SEP] (segment A is the whole row: no segment B). Same
    interface as Packer."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, pad_id: int, dtype=np.int32):
        if seq_len < 8:
            raise ValueError("seq_len must be >= 8")
        self.seq_len, self.cls, self.sep, self.pad, self.dtype = seq_len, cls_id, sep_id, pad_id, dtype
        self.doc_tokens = 0
        self.rows = 0
        self.padding = 0  # [PAD] positions written
        self.pending = np.zeros(0, dtype=np.int64)  # tokens of a document in pieces not in a row yet

    def feed(self, docs: Iterable[list[int]],
             cont: Optional[Sequence[bool]] = None) -> Iterator[tuple[np.ndarray, int]]:
        """As Packer.feed; a document in pieces (`cont`) makes the rows the whole document would."""
        width = self.seq_len - 2
        for i, ids in enumerate(docs):
            ids = np.asarray(ids, dtype=np.int64)
            self.doc_tokens += len(ids)
            if len(self.pending):
                ids = np.concatenate([self.pending, ids])
            last = cont is None or not cont[i]
            full = len(ids) if last else max(len(ids) - 1, 0) // width * width  # a piece keeps its last row
            for start in range(0, full, width):
                yield self._row(ids[start: start + width], width)
            self.pending = ids[full:]

    def _row(self, chunk: np.ndarray, width: int) -> tuple[np.ndarray, int]:
        row = np.full(self.seq_len, self.pad, dtype=self.dtype)
        row[0] = self.cls
        row[1: 1 + len(chunk)] = chunk
        row[1 + len(chunk)] = self.sep
        self.rows += 1
        self.padding += width - len(chunk)
        return row, 1 + len(chunk)

    def dropped_tokens(self) -> int:
        return 0


def content_tokens(row: np.ndarray, sep_index: int, sep_id: int, pad_id: int = 0) -> list[int]:
    """Document tokens of a row, in order (drops [CLS], all [SEP]s and padding): for tests/debugging."""
    body = np.asarray(row)[1:]
    return [int(t) for t in body if t != sep_id and t != pad_id]
