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

from training.data import hf_input
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
    """(non-blank lines, blocks of them separated by blank lines) of a .txt file."""
    lines = blocks = 0
    previous_blank = True
    with open_binary(path) as f:
        for line in f:
            if line.strip():
                lines += 1
                blocks += previous_blank
                previous_blank = False
            else:
                previous_blank = True
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
    blocks = choose_doc_sep(path, doc_sep)[0] == "blank"
    with open_binary(path) as f:
        buf, bad = [], 0
        for raw in f:
            text, n = decode(raw)
            bad += n
            if not blocks:
                yield text.strip(), bad
                bad = 0
            elif text.strip():
                buf.append(text.rstrip("\r\n"))
            elif buf:
                yield "\n".join(buf).strip(), bad
                buf, bad = [], 0
        if buf:
            yield "\n".join(buf).strip(), bad


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
        for batch in pf.iter_batches(columns=["text"], batch_size=1024):
            col = batch.column(0)
            if col.type not in ("string", "large_string"):
                # binary columns: decode ourselves so bad bytes are counted, not fatal
                for raw in col.to_pylist():
                    if raw is not None:
                        text, bad = decode(raw if isinstance(raw, bytes) else str(raw).encode())
                        yield text.strip(), bad
                continue
            for doc in col.to_pylist():
                if doc is not None:
                    yield doc.strip(), 0


def input_paths(files: list[str]) -> list[str]:
    """The local paths the resolved inputs read (an hf: input on the hub reads none of ours)."""
    return [hf_input.local_path(f) if hf_input.is_hf(f) else f for f in files]


def iter_documents(path: str, text_column: str = "text", doc_sep: str = "auto"):
    """(text, replaced_bytes) per document of one file or hf: stream; blank documents carry only their count.
    `doc_sep` (line, blank, auto) says how a .txt file holds its documents."""
    if hf_input.is_hf(path):
        yield from hf_input.documents(path, text_column)
        return
    fmt, _ = split_suffix(path)
    try:
        yield from _txt_docs(path, doc_sep) if fmt == ".txt" else \
            {".jsonl": _jsonl_docs, ".parquet": _parquet_docs}[fmt](path)
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise UserError(f"--input {path}: cannot read ({err})")


def heldout_score(text: str, seed: int) -> float:
    """Uniform [0,1) from a hash of (seed, text): a stable split that also keeps duplicates together."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def generate_documents(files: list[str], seed: int, max_docs: int | None = None, text_column: str = "text",
                       doc_seps: dict[str, str] | None = None):
    """`Dataset.from_generator` body: yields rows {text, replaced, score, error}.

    Blank documents are yielded with empty text (so their replaced bytes still count) and are
    filtered out afterwards; `doc_seps` holds each .txt file's --doc-sep choice (doc_seps()); `max_docs` counts
    non-blank documents only (and stops an hf: stream there, closing it: nothing past it is fetched). A UserError
    becomes a
    row with `error` set (exceptions from generator worker processes lose their type), which the
    caller re-raises.
    """
    kept = 0
    try:
        for path in files:
            for text, bad in iter_documents(path, text_column, (doc_seps or {}).get(path, "auto")):
                if text:
                    if max_docs is not None and kept >= max_docs:
                        return
                    kept += 1
                yield {"text": text, "replaced": bad, "score": heldout_score(text, seed) if text else 1.0,
                       "error": None}
    except UserError as err:
        yield {"text": "", "replaced": 0, "score": 1.0, "error": str(err)}
