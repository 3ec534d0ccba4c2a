"""`prepare`: raw text -> tokenizer + packed train/heldout Arrow datasets + stats.json.

Everything is written into `OUT.tmp-<pid>` and renamed to OUT only when complete, so an OUT that
exists always holds a finished build. Documents live in `datasets` Arrow caches on disk (inside the
staging dir), never all in memory; only the per-document held-out scores (8 bytes each) are.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training import outdir
from training.data import hf_input, packing, sources, tokenizer as tokmod, verify
from training.errors import UserError

FORMAT_VERSION = 1
# The held-out share of `prepare` and `build-default` alike: run_mlm.py's validation_split_percentage (5).
DEFAULT_HELDOUT_FRACTION = 0.05
# A held-out split further than this from --heldout-fraction (in tokens) is warned about: it takes whole
# documents, so a few long ones make it coarse.
HELDOUT_TOLERANCE = 0.03
DOC_SEPS = sources.DOC_SEPS
DOCS_PER_PROC = 2000  # below this, extra map processes cost more (fork + pickling) than they save


def default_num_proc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def ids_dtype(vocab_size: int):
    return np.int16 if vocab_size <= np.iinfo(np.int16).max + 1 else np.int32


def check_out_dir(out: str, overwrite: bool, inputs=(), locked: bool = False) -> None:
    """An existing non-empty OUT needs --overwrite, and --overwrite replaces only a data dir this command made
    (its .bert-data marker; or build-default's stats.json, from before the marker) that no live process holds
    (OUT/.lock). OUT may not be, hold or lie inside an input (`inputs`: (what, path) pairs)."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise UserError(f"--out {out}: exists and is not a directory")
        if not locked:
            outdir.check_unlocked(Path(out), "--out")
    outdir.check_no_clash("--out", Path(out), inputs)
    if os.path.exists(out):
        if outdir.entries(Path(out)):
            if not overwrite:
                raise UserError(f"--out {out}: directory exists and is not empty (pass --overwrite to replace it)")
            if not _ours(out):
                raise UserError(f"--out {out}: has no {outdir.DATA_MARKER} marker, so it is not recognisably a data "
                                "dir of `training.data prepare` (those prepared before the marker existed have none "
                                "either) and --overwrite will not delete it: delete it by hand, or pick another --out")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: parent directory {parent} is missing or not writable")


def _ours(out: str) -> bool:
    if outdir.read_marker(Path(out), outdir.DATA_MARKER) is not None:
        return True
    try:  # build-default's outputs from before the marker: it always recognised its own
        with open(os.path.join(out, "stats.json")) as f:
            return json.load(f).get("builder") == "build-default"
    except (OSError, ValueError, AttributeError):
        return False


def prepare(inputs: list[str], out: str, seq_len: int, tokenizer: str,
            heldout_fraction: float = DEFAULT_HELDOUT_FRACTION, num_proc: int | None = None,
            max_docs: int | None = None, overwrite: bool = False, seed: int = 0, move_in: dict[str, str] | None = None,
            extra_stats: dict | None = None, quiet: bool = False, require_rows: bool = True,
            text_column: str = "text", pack: bool = True, doc_sep: str = "auto") -> dict:
    """Build OUT; returns the stats dict. `inputs`: files, globs and `hf:` datasets (training/data/hf_input.py,
    whose `text_column` holds the text). `move_in` maps names to paths moved into OUT (build-default's raw/).
    A split without rows (the train split; the held-out one when heldout_fraction > 0) is a UserError, before
    anything reaches OUT, unless `require_rows` is False (pack_text, whose caller says so itself). `pack`
    False: one padded document per row (packing.RowPerDocument) instead of packed `[CLS] A [SEP] B [SEP]` rows.
    `doc_sep` (line, blank, auto: sources.choose_doc_sep) says how .txt files hold documents; auto's choice per
    file is printed (unless quiet) and kept in stats.json. A held-out share of the tokens further than
    HELDOUT_TOLERANCE from `heldout_fraction` is warned about."""
    start = time.time()
    if seq_len < 8:
        raise UserError(f"--seq-len {seq_len}: must be at least 8")
    if not 0.0 <= heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction {heldout_fraction}: must be in [0, 1)")
    if num_proc is not None and num_proc < 1:
        raise UserError(f"--num-proc {num_proc}: must be at least 1")
    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max-docs {max_docs}: must be at least 1")
    if not text_column:
        raise UserError("--text-column: must not be empty")
    if doc_sep not in DOC_SEPS:
        raise UserError(f"--doc-sep {doc_sep}: want one of {', '.join(DOC_SEPS)}")
    files = sources.resolve_inputs(inputs, text_column)
    seps = sources.doc_seps(files, doc_sep, None if quiet else _say)
    vocab_target = tokmod.parse_spec(tokenizer)
    tok = None if vocab_target else tokmod.load(tokenizer)  # fail fast, before reading the corpus
    inputs = [("--input", f) for f in sources.input_paths(files)] + \
        [("--tokenizer", tokenizer)] * (not vocab_target) + \
        [("moved-in input", src) for src in (move_in or {}).values()]
    check_out_dir(out, overwrite, inputs)

    out = os.path.abspath(out)
    created = not os.path.exists(out)
    lock = outdir.DirLock(Path(out), "--out").acquire()  # a second prepare of OUT exits 2 naming us
    staging = f"{out}.tmp-{os.getpid()}"
    try:
        check_out_dir(out, overwrite, inputs, locked=True)  # again, under the lock
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        stats = _build(staging, files, seq_len, tok, vocab_target, heldout_fraction,
                       num_proc or default_num_proc(), max_docs, seed, quiet, text_column, pack, seps)
        if require_rows:
            _check_rows(stats, files, heldout_fraction)
        stats.update(tokenizer=tokenizer if vocab_target else os.path.abspath(tokenizer),
                     heldout_fraction=heldout_fraction, seed=seed, max_docs=max_docs,
                     input_files=files, format_version=FORMAT_VERSION, doc_sep=seps)
        share = heldout_share(stats)
        stats["heldout_share"] = round(share, 4)
        if heldout_fraction > 0 and abs(share - heldout_fraction) > HELDOUT_TOLERANCE:
            _say(f"warning: the held-out split holds {share:.1%} of the tokens, not the {heldout_fraction:.1%} "
                 f"--heldout-fraction asks for: it takes whole documents, and {stats['documents']['heldout']:,} of "
                 f"{stats['documents']['train'] + stats['documents']['heldout']:,} are too few or too uneven to "
                 "split that finely (more documents, or --doc-sep for .txt files, make it finer)")
        if any(map(hf_input.is_hf, files)):
            stats["text_column"] = text_column
        stats.update(extra_stats or {})
        for name, src in (move_in or {}).items():
            shutil.move(src, os.path.join(staging, name))
            stats["input_files"] = [f.replace(os.path.abspath(src), os.path.join(out, name))
                                    for f in stats["input_files"]]
        stats["digests"] = verify.record(staging)  # checked whenever a run opens the data (data/verify.py)
        stats["seconds"] = round(time.time() - start, 2)
        with open(os.path.join(staging, "stats.json"), "w") as f:
            json.dump(stats, f, indent=2)
        outdir.write_marker(Path(staging), outdir.DATA_MARKER, written_by="training.data prepare",
                            format_version=FORMAT_VERSION)
        _commit(staging, out)
    except Exception as err:  # noqa: BLE001 - disk full, read-only, ...: one line, nothing left behind
        reason = outdir.fs_failure(err, staging)  # datasets wraps a full disk's OSError in its own errors
        if reason is None:
            raise
        raise UserError(f"--out {out}: {reason}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.release()
        if created and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)  # made only to hold the lock of a build that failed
    if not quiet:
        print(summary_line(out, stats), flush=True)
    return stats


def _say(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)


def heldout_share(stats: dict) -> float:
    """The held-out split's share of the tokens."""
    total = stats["tokens"]["train"] + stats["tokens"]["heldout"]
    return stats["tokens"]["heldout"] / total if total else 0.0


def _check_rows(stats: dict, files: list[str], heldout_fraction: float) -> None:
    """A data dir with an empty train split trains nothing, and an empty held-out split would evaluate to 0."""
    for split in ("train",) + (("heldout",) if heldout_fraction > 0 else ()):
        if stats["rows"][split] == 0:
            hint = ("give more text or a shorter --seq-len" if split == "train" else
                    "give more documents (the held-out split takes whole documents), a larger --heldout-fraction, "
                    "or --heldout-fraction 0")
            raise UserError(f"--input {' '.join(files)}: the {split} split has no rows of --seq-len "
                            f"{stats['seq_len']} ({stats['documents'][split]:,} documents, "
                            f"{stats['tokens'][split]:,} tokens); {hint}")


def pack_text(inputs: list[str], tokenizer: str, seq_len: int, seed: int = 0,
              num_proc: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Raw text through `prepare` (read, tokenise with an existing tokenizer, pack `[CLS] A [SEP] B [SEP]` rows
    of seq_len) with every document kept (no held-out split), built in a temporary dir and returned in memory:
    (input_ids [N, seq_len], sep_index [N], stats). For scoring text with a trained model; never trains a
    tokenizer."""
    import tempfile

    import datasets

    from training.data.loader import _rows

    if tokmod.parse_spec(tokenizer) is not None:
        raise UserError(f"pack_text needs an existing tokenizer, not {tokenizer!r}")
    with tempfile.TemporaryDirectory(prefix="pack-text-") as tmp:
        out = os.path.join(tmp, "data")
        stats = prepare(inputs, out, seq_len, tokenizer, heldout_fraction=0.0, num_proc=num_proc, seed=seed,
                        quiet=True, require_rows=False)
        ids, sep = _rows(datasets.load_from_disk(os.path.join(out, "train")))
        ids, sep = np.array(ids), np.array(sep)  # copies: the memory-mapped files go with the temp dir
    return ids, sep, stats


def summary_line(out: str, s: dict) -> str:
    def split(name):
        return (f"{name} {s['documents'][name]:,} docs / {s['tokens'][name]:,} tokens / "
                f"{s['rows'][name]:,} rows")
    return (f"prepared {out}: {split('train')}; {split('heldout')}; seq_len {s['seq_len']}, "
            f"vocab {s['vocab_size']:,}, replaced bytes {s['replaced_bytes']:,}, dropped tokens "
            f"{sum(s['dropped_tokens'].values()):,}, {s['seconds']:.1f} s")


def _commit(staging: str, out: str) -> None:
    """Swap the finished staging dir into place; the old OUT is removed only after the rename."""
    old = None
    if os.path.exists(out):
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(staging, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


ENCODE_CHARS = 1 << 18  # characters per tokenizer call: its state for them is freed after each call
BATCH_ROWS = 256  # documents (or pieces of one, up to 64 Ki characters each) tokenised or packed at a time


def _encode(batch, tokenizer):
    """Token ids of a batch of documents (or pieces of one), as int32 arrays. The tokenizer is called on at
    most ENCODE_CHARS characters at a time, so a batch of long pieces (training/data/pieces.py) never has its
    encoding state for all of them at once."""
    # encode_special_tokens: a literal "[SEP]" in the text must not become a real separator
    tokenizer.encode_special_tokens = True
    texts, ids, start = batch["text"], [], 0
    while start < len(texts):
        end, chars = start, 0
        while end < len(texts) and (end == start or chars + len(texts[end]) <= ENCODE_CHARS):
            chars += len(texts[end])
            end += 1
        enc = tokenizer.encode_batch_fast(texts[start:end], add_special_tokens=False)
        ids += [np.asarray(e.ids, dtype=np.int32) for e in enc]
        start = end
    return {"input_ids": ids}


def _build(staging, files, seq_len, tok, vocab_target, heldout_fraction, num_proc, max_docs, seed, quiet,
           text_column="text", pack=True, seps=None):
    import datasets

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        return _build_datasets(staging, files, seq_len, tok, vocab_target, heldout_fraction, num_proc,
                               max_docs, seed, quiet, text_column, pack, seps)
    finally:
        if quiet and bars_were_on:
            datasets.enable_progress_bars()


def _build_datasets(staging, files, seq_len, tok, vocab_target, heldout_fraction, num_proc, max_docs,
                    seed, quiet, text_column="text", pack=True, seps=None):
    import datasets

    cache = os.path.join(staging, "cache")
    features = datasets.Features(text=datasets.Value("string"), replaced=datasets.Value("int64"),
                                 score=datasets.Value("float64"), error=datasets.Value("string"),
                                 cont=datasets.Value("bool"))
    gen_procs = 1 if (max_docs or len(files) == 1) else min(num_proc, len(files))
    # Every input, an hf: stream too, is read exactly once, here, into an Arrow cache in the staging dir; the
    # tokenizer trains on that cache below and the encoding reads it again. So a stream is never fetched twice
    # (nor has to come back in the same order), and its documents are on disk, not in memory.
    docs = datasets.Dataset.from_generator(
        sources.generate_documents, features=features, cache_dir=cache, num_proc=gen_procs,
        writer_batch_size=BATCH_ROWS,
        gen_kwargs={"files": files, "seed": seed, "max_docs": max_docs, "text_column": text_column,
                    "doc_seps": seps})
    errors = docs.data.column("error").drop_null()
    if len(errors):
        raise UserError(errors[0].as_py())
    replaced = int(pc.sum(docs.data.column("replaced")).as_py() or 0)
    scores, cont = docs.data.column("score").to_numpy(), docs.data.column("cont").to_numpy(zero_copy_only=False)
    keep = np.nonzero(scores < 1.0)[0]  # blank documents carry score 1.0
    if len(keep) == 0:
        raise UserError(f"--input {' '.join(files)}: no non-blank documents")
    docs, cont = docs.select(keep).select_columns(["text", "cont"]), cont[keep]
    is_heldout = _heldout_rows(scores[keep], cont, heldout_fraction)

    if tok is None:
        train_text = docs.select(np.nonzero(~is_heldout)[0])
        batches = (b["text"] for b in train_text.iter(batch_size=64))  # at most 64 pieces of 64 Ki characters
        tok = tokmod.train(batches, vocab_target)
    tokmod.save(tok, os.path.join(staging, "tokenizer"))
    vocab_size = tok.get_vocab_size()
    cls_id, sep_id, pad_id = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))

    procs = max(1, min(num_proc, math.ceil(len(docs) / DOCS_PER_PROC)))
    ids = docs.map(_encode, batched=True, batch_size=BATCH_ROWS, writer_batch_size=BATCH_ROWS, num_proc=procs,
                   fn_kwargs={"tokenizer": tok}, remove_columns=["text"],
                   new_fingerprint=f"encode-{os.getpid()}-{time.time_ns()}",
                   features=datasets.Features(cont=datasets.Value("bool"),
                                              input_ids=datasets.List(datasets.Value("int32"))),
                   desc="tokenizing")

    stats = {"seq_len": seq_len, "vocab_size": vocab_size, "dtype": np.dtype(ids_dtype(vocab_size)).name,
             "replaced_bytes": replaced, "documents": {}, "tokens": {}, "rows": {}, "dropped_tokens": {},
             "packed": pack, **({} if pack else {"padding": {}})}
    for split, mask in (("train", ~is_heldout), ("heldout", is_heldout)):
        part = ids.select(np.nonzero(mask)[0])
        if pack:
            packer = packing.Packer(seq_len, cls_id, sep_id, seed=[seed, int(split == "heldout")],
                                    dtype=ids_dtype(vocab_size))
        else:
            packer = packing.RowPerDocument(seq_len, cls_id, sep_id, pad_id, dtype=ids_dtype(vocab_size))
        arrow = os.path.join(cache, f"packed-{split}.arrow")
        _pack_to_arrow(part, packer, arrow, quiet, split)
        packed = datasets.Dataset.from_file(arrow)
        # An empty split saved with 0 shards cannot be loaded back: always write at least one.
        packed.save_to_disk(os.path.join(staging, split), num_shards=1 if len(packed) == 0 else None)
        stats["documents"][split] = int(np.count_nonzero(~cont[mask]))  # a long document's pieces: one
        stats["tokens"][split] = packer.doc_tokens
        stats["rows"][split] = packer.rows
        stats["dropped_tokens"][split] = packer.dropped_tokens()
        if not pack:  # the share of positions that are [PAD]
            stats["padding"][split] = round(packer.padding / max(packer.rows * seq_len, 1), 4)
    del docs, ids, part
    shutil.rmtree(cache, ignore_errors=True)
    return stats


def _heldout_rows(scores: np.ndarray, cont: np.ndarray, fraction: float) -> np.ndarray:
    """Per row, whether it is held out: every piece of a long document goes where its whole document does,
    decided by the score on its last piece (sources.generate_documents)."""
    last = np.nonzero(~cont)[0]
    doc_of_row = np.searchsorted(last, np.arange(len(scores)))
    return _heldout_mask(scores[last], fraction)[doc_of_row]


def _heldout_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Documents scoring below `fraction` are held out; keep both splits non-empty when possible."""
    mask = scores < fraction
    if fraction > 0 and len(scores) >= 2:
        if not mask.any():
            mask[np.argmin(scores)] = True
        if mask.all():
            mask[np.argmax(scores)] = False
    return mask


def _pack_to_arrow(ds, packer, path: str, quiet: bool, split: str) -> None:
    from tqdm.auto import tqdm

    seq_len = packer.seq_len
    value_type = pa.from_numpy_dtype(packer.dtype)
    schema = pa.schema([("input_ids", pa.list_(value_type, seq_len)), ("sep_index", pa.int32())])
    rows, seps = [], []

    def flush(writer):
        if rows:
            values = pa.array(np.concatenate(rows), type=value_type)
            writer.write_batch(pa.record_batch(
                [pa.FixedSizeListArray.from_arrays(values, seq_len), pa.array(seps, type=pa.int32())],
                schema=schema))
            rows.clear()
            seps.clear()

    with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
            tqdm(total=len(ds), desc=f"packing {split}", unit="docs", disable=quiet) as bar:
        for table in ds.with_format("arrow").iter(batch_size=BATCH_ROWS):
            col = table.column("input_ids").combine_chunks()
            offsets = col.offsets.to_numpy()
            values = col.flatten().to_numpy()
            cont = table.column("cont").to_numpy()
            for row, sep in packer.feed(np.split(values, offsets[1:-1] - offsets[0]), cont):
                rows.append(row)
                seps.append(sep)
                if len(rows) >= 4096:
                    flush(writer)
            bar.update(table.num_rows)
        flush(writer)
