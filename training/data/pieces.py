"""Long documents in pieces, so `prepare`'s memory is bounded by the piece size, not by the longest document.

Training the tokenizer on one document, and encoding it, held state for the whole document at once (offsets,
alignments, token strings: many bytes per character), so one 50 MB line made `prepare` peak at 6.5 GB (numbers
in docs/reliability.md). Here a document longer than PIECE_CHARS is handed
on as consecutive pieces (`cont` True on every piece but its last), read from a .txt file without ever holding
the whole line (`read_lines`), and each piece is tokenised on its own; the packer joins a document's pieces
without a [SEP] between them (packing.py), and every piece gets its whole document's held-out score (prepare.py),
so the rows are those the whole document would give:

* a cut falls just before an ASCII space, tab or newline that follows a non-space character, so no word is cut
  (WordPiece and byte-level tokenizers alike see the same words: the next piece begins with the space) and the
  pieces joined are exactly the document, stripped, as prepare always saw it (its held-out hash is unchanged);
* only a run of more than PIECE_CHARS characters without such a space (no real text has one) is cut inside,
  where its (single, already unknown) word becomes two.
"""
from __future__ import annotations

from typing import BinaryIO, Iterator

PIECE_CHARS = 1 << 16  # characters per piece
LINE_CHUNK = 1 << 20  # bytes of a .txt line read at a time
_CUT_BEFORE = " \t\n\r"


class Document:
    """One document given in parts (`add`), handed out as (piece, cont) pairs: stripped like str.strip(), each
    piece at most about `limit` characters, the last with cont False (see the module doc). Call `end()` once."""

    def __init__(self, limit: int | None = None):
        self.limit = limit or PIECE_CHARS
        self.buf = ""  # text not handed out yet (after the leading whitespace)
        self.ready: str | None = None  # a cut piece, held until it is known whether another follows

    def add(self, text: str) -> Iterator[tuple[str, bool]]:
        if not self.buf and self.ready is None:
            text = text.lstrip()
        self.buf += text
        while len(self.buf) > self.limit:
            cut = self._cut()
            if self.ready is not None:
                yield self.ready, True
            self.ready, self.buf = self.buf[:cut], self.buf[cut:]

    def _cut(self) -> int:
        """The last position <= limit before a space that follows a non-space; `limit` when there is none."""
        buf, k = self.buf, self.limit
        while k > 0 and not (buf[k] in _CUT_BEFORE and not buf[k - 1].isspace()):
            k -= 1
        return k or self.limit

    def end(self) -> Iterator[tuple[str, bool]]:
        last = self.buf.rstrip()
        if self.ready is not None:
            yield (self.ready if last else self.ready.rstrip()), bool(last)
        if last:
            yield last, False
        self.buf, self.ready = "", None


def text_pieces(text: str, limit: int | None = None) -> Iterator[tuple[str, bool]]:
    """A document already in memory, as (piece, cont) pairs (nothing for a blank one)."""
    if len(text) <= (limit or PIECE_CHARS):
        if text.strip():
            yield text.strip(), False
        return
    doc = Document(limit)
    yield from doc.add(text)
    yield from doc.end()


def read_lines(f: BinaryIO, chunk: int | None = None) -> Iterator[tuple[bytes, bool]]:
    """(bytes, ends_line) of a binary file: a line shorter than `chunk` whole, a longer one in parts of at most
    `chunk` bytes, each cut after a complete UTF-8 character (the rest starts the next part)."""
    carry, chunk = b"", chunk or LINE_CHUNK
    while True:
        data = f.readline(chunk)
        if not data:
            if carry:
                yield carry, True
            return
        data, ends = carry + data, data.endswith(b"\n")
        carry = b""
        if not ends:
            cut = _utf8_boundary(data)
            data, carry = data[:cut], data[cut:]
        yield data, ends


def _utf8_boundary(data: bytes) -> int:
    """len(data), less a multi-byte UTF-8 sequence cut short at its end (up to 3 bytes)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for the lead byte
            continue
        if byte >= 0xC0:  # a lead byte: its sequence is 2, 3 or 4 bytes long
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - back if need > back else len(data)
        return len(data)
    return len(data)
