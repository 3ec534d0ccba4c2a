"""Bytes to text, as every reader of a corpus decodes them (training/data/sources.py, hf_input.py)."""
from __future__ import annotations


def decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 decode replacing bad bytes with U+FFFD (like errors='replace'), counting the bytes."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    parts, bad, pos = [], 0, 0
    while True:
        try:
            parts.append(raw[pos:].decode("utf-8"))
            return "".join(parts), bad
        except UnicodeDecodeError as err:
            parts.append(raw[pos:pos + err.start].decode("utf-8"))
            parts.append("\ufffd")
            bad += err.end - err.start
            pos += err.end
