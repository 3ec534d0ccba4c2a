"""Raw-text inputs: resolve paths/globs, open (optionally compressed) files, yield documents; `hf:` inputs
(`datasets` streams) are handed to training/data/hf_input.py.

Every document is yielded with the number of undecodable bytes replaced by U+FFFD in it, so the
count survives the multi-process `datasets` generator and can be summed into stats.json.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import json
import lzma
import os
import shutil
import tempfile

from training.data import hf_input, pieces
from training.data.text import decode
from training.errors import UserError

COMPRESSION = {".xz": lzma.open, ".bz2": bz2.open, ".gz": gzip.open}
FORMATS = (".txt", ".jsonl", ".parquet")


def split_suffix(path: str) -> tuple[str, str]:
    """('.txt', '.xz') for 'a.txt.xz'; ('.jsonl', '') for 'a.jsonl'."""
    root, ext = os.path.splitext(path.lower())
    comp = ""
    if ext in COMPRESSION:
        comp, (root, ext) = ext, os.path.splitext(root)
    return ext, comp


def resolve_inputs(patterns: list[str], text_column: str = "text") -> list[str]:
    """Expand files/globs in the order given; every pattern must match at least one readable file.
    An `hf:` input (training/data/hf_input.py) is resolved now, through the same `load_dataset` call that
    streams it later, and kept as its spec string (a local path in it made absolute)."""
    files: list[str] = []
    for pat in patterns:
        if hf_input.is_hf(pat):
            files.append(hf_input.check(pat, text_column))
            continue
        matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not matches or not os.path.exists(matches[0]):
            what = "glob matches no file" if glob.has_magic(pat) else "no such file"
            raise UserError(f"--input {pat}: {what}")
        for path in matches:
            if os.path.isdir(path):
                raise UserError(f"--input {path}: is a directory (give files or a glob like DIR/*.txt)")
            fmt, _ = split_suffix(path)
            if fmt not in FORMATS:
                raise UserError(f"--input {path}: unsupported file type (want .txt/.jsonl/.parquet, "
                                "optionally .xz/.bz2/.gz)")
            if not os.access(path, os.R_OK):
                raise UserError(f"--input {path}: not readable")
            files.append(os.path.abspath(path))
    kinds = {path: "text" if hf_input.is_hf(path) else sniff(path) for path in files}
    for path, kind in kinds.items():
        if kind == "binary":
            raise UserError(f"--input {path}: looks like a binary file, not text")
    if all(kind == "empty" for kind in kinds.values()):
        raise UserError(f"--input {' '.join(patterns)}: empty (no documents)")
    # The same file twice would silently duplicate documents.
    return list(dict.fromkeys(files))


def sniff(path: str, size: int = 1 << 16) -> str:
    """'empty', 'binary' or 'text', from the first 64 KiB (decompressed). Binary: NUL bytes, or over a
    third of the bytes undecodable as UTF-8. A few bad bytes in real text are replaced and counted."""
    if split_suffix(path)[0] == ".parquet":
        return "text"  # columnar: pyarrow reports a broken file itself
    try:
        with open_binary(path) as f:
            head = f.read(size)
    except (OSError, EOFError, ValueError) as err:  # a corrupt .gz/.bz2/.xz stream
        raise UserError(f"--input {path}: cannot be read ({err})") from None
    if not head.strip():
        return "empty"
    _, bad = decode(head[: len(head) - 4] if len(head) == size else head)  # don't count a cut character
    return "binary" if b"\x00" in head or bad > len(head) / 3 else "text"


def open_binary(path: str):
    _, comp = split_suffix(path)
    return COMPRESSION[comp](path, "rb") if comp else open(path, "rb")


DOC_SEPS = ("auto", "line", "blank")
# --doc-sep auto: blank-line separated documents only when the blank lines cut the file into documents of at most
# this many lines on average. One stray blank line in a one-paragraph-per-line file (4,000 lines) would otherwise
# make it 2 documents, and the held-out split, which takes whole documents, half the data.
AUTO_MAX_LINES_PER_DOC = 100


def _txt_layout(path: str) -> tuple[int, int]:
    """(non-blank lines, blocks of them separated by blank lines) of a .txt file, read in parts of at most
    pieces.LINE_CHUNK bytes (no line is held whole)."""
    lines = blocks = 0
    previous_blank, line_text = True, False
    with open_binary(path) as f:
        for data, ends in pieces.read_lines(f):
            line_text = line_text or bool(data.strip())
            if not ends:
                continue
            if line_text:
                lines += 1
                blocks += previous_blank
            previous_blank, line_text = not line_text, False
    return lines, blocks


def choose_doc_sep(path: str, doc_sep: str = "auto") -> tuple[str, str]:
    """('line' or 'blank', why) for a .txt file under --doc-sep `doc_sep`."""
    if doc_sep != "auto":
        return doc_sep, f"--doc-sep {doc_sep}"
    try:
        lines, blocks = _txt_layout(path)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as err:
        raise UserError(f"--input {path}: cannot read ({err})") from None
    if blocks >= 2 and lines / blocks <= AUTO_MAX_LINES_PER_DOC:
        return "blank", (f"blank-line separated documents ({blocks:,} blocks of {lines / blocks:.1f} lines on "
                         "average)")
    why = (f"no blank line between its {lines:,} lines" if blocks < 2 else
           f"its blank lines would make {blocks:,} documents of {lines / blocks:,.0f} lines on average, more than "
           f"{AUTO_MAX_LINES_PER_DOC}")
    return "line", f"one document per line ({why}; --doc-sep blank to override)"


def doc_seps(files: list[str], doc_sep: str = "auto", say=None) -> dict[str, str]:
    """{.txt input: 'line' or 'blank'}, each choice passed to `say` (a print) with its reason."""
    chosen = {}
    for path in files:
        if not hf_input.is_hf(path) and split_suffix(path)[0] == ".txt":
            chosen[path], why = choose_doc_sep(path, doc_sep)
            if say is not None and doc_sep == "auto":
                say(f"--doc-sep auto: {path}: {why}")
    return chosen


def _txt_docs(path: str, doc_sep: str = "auto"):
    """(piece, replaced bytes, cont) of a .txt file's documents, a line or a blank-line block each (`doc_sep`:
    choose_doc_sep), read in parts of at most pieces.LINE_CHUNK bytes (training/data/pieces.py): no line is ever
    held whole."""
    blocks = choose_doc_sep(path, doc_sep)[0] == "blank"
    doc, bad = pieces.Document(), 0
    in_block, line_start, line_text = False, True, False  # blocks: a line of it added; at a line's start; text
    with open_binary(path) as f:
        for data, ends in pieces.read_lines(f):
            text, n = decode(data)
            bad += n
            if blocks:  # "\n".join of the block's lines, each without its line break
                line_text = line_text or bool(text.strip())
                part = text.rstrip("\r\n") if ends else text
                out = list(doc.add(("\n" if line_start and in_block else "") + part))
                if ends:
                    in_block = line_text
                    if not line_text:  # a blank line ends the block (its whitespace is trailing: stripped)
                        out += list(doc.end())
                    line_text = False
                line_start = ends
            else:
                out = list(doc.add(text)) + (list(doc.end()) if ends else [])
                if ends and not out:
                    out = [("", False)]  # a blank line: only its replaced bytes count
            for piece, cont in out:
                yield piece, bad, cont
                bad = 0
        for piece, cont in doc.end():
            yield piece, bad, cont
            bad = 0
    if bad:
        yield "", bad, False


def _jsonl_docs(path: str):
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            text, bad = decode(raw)
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
                doc = obj["text"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"--input {path}:{lineno}: not a JSON object with a 'text' field")
            if not isinstance(doc, str):
                raise UserError(f"--input {path}:{lineno}: field 'text' is not a string")
            yield doc.strip(), bad


def _parquet_docs(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        if split_suffix(path)[1]:  # parquet needs a seekable file: decompress to a temp copy
            plain = os.path.join(tmp, "input.parquet")
            with open_binary(path) as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst)
            path_ = plain
        else:
            path_ = path
        try:
            pf = pq.ParquetFile(path_)
        except Exception as err:  # pyarrow raises several types for corrupt files
            raise UserError(f"--input {path}: not a readable parquet file ({err})")
        if "text" not in pf.schema_arrow.names:
            raise UserError(f"--input {path}: parquet file has no 'text' column")
        kind = pf.schema_arrow.field("text").type
        binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        if not (binary or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"--input {path}: column 'text' holds {kind}, not text (strings)")
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            col = batch.column(0)
            if binary:  # decode ourselves so bad bytes are counted, not fatal
                for raw in col.to_pylist():
                    if raw is not None:
                        text, bad = decode(raw)
                        yield text.strip(), bad
                continue
            for doc in col.to_pylist():
                if doc is not None:
                    yield doc.strip(), 0


def input_paths(files: list[str]) -> list[str]:
    """The local paths the resolved inputs read (an hf: input on the hub reads none of ours)."""
    return [hf_input.local_path(f) if hf_input.is_hf(f) else f for f in files]


def iter_documents(path: str, text_column: str = "text", doc_sep: str = "auto"):
    """(piece, replaced_bytes, cont) per document of one file or hf: stream: a document longer than
    pieces.PIECE_CHARS comes in pieces, cont True on all but its last (training/data/pieces.py); a blank document
    is ("", its replaced bytes, False). `doc_sep` (line, blank, auto) says how a .txt file holds its documents."""
    if hf_input.is_hf(path):
        yield from _in_pieces(hf_input.documents(path, text_column))
        return
    fmt, _ = split_suffix(path)
    try:
        if fmt == ".txt":
            yield from _txt_docs(path, doc_sep)
        else:
            yield from _in_pieces({".jsonl": _jsonl_docs, ".parquet": _parquet_docs}[fmt](path))
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise UserError(f"--input {path}: cannot read ({err})")


def _in_pieces(docs):
    for text, bad in docs:
        out = list(pieces.text_pieces(text)) or [("", False)]
        for i, (piece, cont) in enumerate(out):
            yield piece, bad if i == 0 else 0, cont


def _hasher(seed: int):
    return hashlib.blake2b(digest_size=8, key=str(seed).encode())


def _score(hasher) -> float:
    return int.from_bytes(hasher.digest(), "little") / 2.0 ** 64


def heldout_score(text: str, seed: int) -> float:
    """Uniform [0,1) from a hash of (seed, text): a stable split that also keeps duplicates together."""
    h = _hasher(seed)
    h.update(text.encode("utf-8", "surrogatepass"))
    return _score(h)


def generate_documents(files: list[str], seed: int, max_docs: int | None = None, text_column: str = "text",
                       doc_seps: dict[str, str] | None = None):
    """`Dataset.from_generator` body: yields rows {text, replaced, score, error, cont}.

    Blank documents are yielded with empty text (so their replaced bytes still count) and are
    filtered out afterwards; `doc_seps` holds each .txt file's --doc-sep choice (doc_seps()); `max_docs` counts non-blank documents only (and stops an hf: stream there,
    closing it: nothing past it is fetched). A long document is several rows (`cont`: another piece of it
    follows); its score, a hash of the whole document, is on its last row (the caller gives it to every piece).
    A UserError becomes a row with `error` set (exceptions from generator worker processes lose their type),
    which the caller re-raises.
    """
    kept, hasher = 0, None
    try:
        for path in files:
            for text, bad, cont in iter_documents(path, text_column, (doc_seps or {}).get(path, "auto")):
                score = 1.0
                if text:
                    if hasher is None:  # a document starts
                        if max_docs is not None and kept >= max_docs:
                            return
                        kept += 1
                        hasher = _hasher(seed)
                    hasher.update(text.encode("utf-8", "surrogatepass"))
                    score = 0.0 if cont else _score(hasher)
                    hasher = hasher if cont else None
                yield {"text": text, "replaced": bad, "score": score, "error": None, "cont": cont}
    except UserError as err:
        yield {"text": "", "replaced": 0, "score": 1.0, "error": str(err), "cont": False}
