"""`build-default`: the project's default corpus from the Wikipedia sample that gensim ships.

gensim's test data holds a shortened enwiki dump (~200 pages, about half of them redirects).
`WikiCorpus.get_texts` would give lowercased token lists; we want prose, so we use its lower-level
helpers: `extract_pages` (XML -> raw wikitext) and `filter_wiki` (strip markup), then keep only
paragraph lines (drop headings, lists, tables, short captions) and remove bold/italic quotes.

raw/enwiki-gensim.txt format: one paragraph per line, a blank line between articles, so `prepare`
treats each article as one document.
"""
from __future__ import annotations

import bz2
import importlib.resources
import json
import os
import re
import shutil

from training.errors import UserError

DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
RAW_NAME = "enwiki-gensim.txt"
MIN_PARAGRAPH_WORDS = 8
NON_PROSE_START = tuple("=*#:;|!{}")  # headings, list items, indents, table rows


def gensim_dump() -> str:
    try:
        path = importlib.resources.files("gensim").joinpath(DUMP)
    except ModuleNotFoundError:
        raise UserError("build-default needs the gensim package (pip install gensim)")
    if not path.is_file():
        raise UserError(f"build-default: gensim's Wikipedia sample not found at {path}")
    return str(path)


def clean_paragraph(line: str) -> str | None:
    text = line.strip()
    if not text or text.startswith(NON_PROSE_START):
        return None
    text = re.sub(r"'{2,}", "", text)            # ''italic'' / '''bold'''
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "()" left where templates were removed
    text = re.sub(r"\s+([,.;:])", r"\1", text)    # "word ," left by removed references
    text = re.sub(r"\s{2,}", " ", text).strip()
    return text if len(text.split()) >= MIN_PARAGRAPH_WORDS else None


def articles(dump: str):
    """(title, [paragraphs]) for every non-redirect main-namespace article with prose."""
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(dump, "rb") as f:
        for title, wikitext, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if wikitext.lstrip()[:9].lower() == "#redirect":
                continue
            paragraphs = [p for p in map(clean_paragraph, filter_wiki(wikitext).splitlines()) if p]
            if paragraphs:
                yield title, paragraphs


def write_raw(path: str) -> int:
    """Write the corpus file; returns the number of articles."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for _title, paragraphs in articles(gensim_dump()):
            f.write(("\n" if count else "") + "\n".join(paragraphs) + "\n")
            count += 1
    return count


def build_default(out: str, seq_len: int = 128, vocab: int = 2048, heldout_fraction: float | None = None,
                  seed: int = 0, num_proc: int | None = None) -> dict:
    from training.data.prepare import DEFAULT_HELDOUT_FRACTION, prepare

    if heldout_fraction is None:
        heldout_fraction = DEFAULT_HELDOUT_FRACTION

    params = {"builder": "build-default", "seq_len": seq_len, "tokenizer": f"train:{vocab}",
              "heldout_fraction": heldout_fraction, "seed": seed}
    stats_path = os.path.join(out, "stats.json")
    existing = None
    if os.path.isfile(stats_path):
        try:
            with open(stats_path) as f:
                existing = json.load(f)
        except (OSError, ValueError):
            existing = None
    if existing and all(existing.get(k) == v for k, v in params.items()):
        print(f"{out} is up to date (build-default, seq_len {seq_len}, vocab train:{vocab}); skipping")
        return existing
    # Rebuild only over our own earlier output (or nothing): never wipe an unrelated directory.
    if os.path.isdir(out) and os.listdir(out) and (existing or {}).get("builder") != "build-default":
        raise UserError(f"--out {out}: exists, is not empty and is not a build-default output")

    raw_dir = f"{os.path.abspath(out)}.raw-{os.getpid()}"
    shutil.rmtree(raw_dir, ignore_errors=True)
    os.makedirs(raw_dir)
    try:
        raw = os.path.join(raw_dir, RAW_NAME)
        n = write_raw(raw)
        print(f"extracted {n} articles ({os.path.getsize(raw) / 1e6:.2f} MB) from gensim's enwiki sample")
        return prepare([raw], out, seq_len, f"train:{vocab}", heldout_fraction=heldout_fraction,
                       num_proc=num_proc, overwrite=True, seed=seed, move_in={"raw": raw_dir},
                       extra_stats=params, doc_sep="blank")  # its format: a blank line between articles
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
