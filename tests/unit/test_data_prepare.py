"""prepare: reading formats, packing boundaries, held-out split, replaced bytes, tokenizers."""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re

import numpy as np
import pytest
from tokenizers import Tokenizer

from tests.helpers.data import MINILM, encode_docs, load_split, make_docs, quiet_prepare, small_data_dir, write_lines  # noqa: F401
from training.data import packing, sources


def check_rows_against_stream(rows, seps, doc_ids, cls_id, sep_id):
    """Every row is [CLS] A [SEP] B [SEP]; rows re-create the stream doc1 SEP doc2 SEP ... exactly."""
    stream = []
    for ids in doc_ids:
        if ids:
            stream += list(ids) + [sep_id]
    p = 0
    for row, s in zip(rows.tolist(), seps.tolist()):
        assert row[0] == cls_id and row[-1] == sep_id and row[s] == sep_id
        assert sep_id not in row[1:s], "sep_index must be the first [SEP]"
        assert 1 <= s - 1 and s < len(row) - 2, "A and B are non-empty"
        while stream[p] == sep_id:  # rows never start with a document separator
            p += 1
        body = row[1:-1]
        if stream[p:p + len(body)] == body:          # split at a document boundary
            p += len(body)
        else:                                         # inserted split [SEP]
            without = body[:s - 1] + body[s:]
            assert stream[p:p + len(without)] == without
            p += len(without)
    return sum(1 for t in stream[p:] if t != sep_id)  # document tokens left over (dropped)


@pytest.mark.parametrize("seed", range(20))
def test_packer_boundaries_random(seed):
    rng = np.random.default_rng(seed)
    docs = [list(rng.integers(5, 50, size=rng.integers(0, 25))) for _ in range(rng.integers(1, 60))]
    seq_len = int(rng.integers(8, 40))
    packer = packing.Packer(seq_len, cls_id=2, sep_id=3, seed=seed)
    out = []
    for i in range(0, len(docs), 7):  # feed in uneven batches: state must carry across feeds
        out += list(packer.feed(docs[i:i + 7]))
    rows = np.array([r for r, _ in out]).reshape(-1, seq_len)
    seps = np.array([s for _, s in out])
    dropped = check_rows_against_stream(rows, seps, docs, 2, 3)
    assert dropped == packer.dropped_tokens()
    assert packer.doc_tokens == sum(map(len, docs))
    assert dropped < seq_len


def test_prepare_rows_reconstruct_tokenised_docs(tmp_path):
    docs = make_docs(150, seed=1)
    corpus = write_lines(tmp_path / "c.txt", docs)
    stats = quiet_prepare([corpus], tmp_path / "out", seq_len=24, tokenizer="train:300", heldout_fraction=0.0)
    out = str(tmp_path / "out")
    rows, seps = load_split(out, "train")
    assert rows.shape == (stats["rows"]["train"], 24) and rows.dtype == np.int16
    doc_ids = encode_docs(out, docs)
    assert stats["tokens"]["train"] == sum(map(len, doc_ids))
    dropped = check_rows_against_stream(rows, seps, doc_ids, cls_id=2, sep_id=3)
    assert dropped == stats["dropped_tokens"]["train"]
    assert stats["documents"] == {"train": 150, "heldout": 0}
    # the saved tokenizer loads offline with transformers and agrees with ours
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    assert hf(docs[0], add_special_tokens=False)["input_ids"] == doc_ids[0]
    assert hf.pad_token_id == 0
    assert {"vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= set(
        os.listdir(os.path.join(out, "tokenizer")))


def test_heldout_split_is_disjoint_and_by_document(small_data_dir):
    out = small_data_dir
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer", "tokenizer.json"))
    markers = {}
    for split in ("train", "heldout"):
        rows, _ = load_split(out, split)
        content = [t for t in rows.reshape(-1).tolist() if t not in (2, 3)]
        markers[split] = set(re.findall(r"zq\d{4}x", tok.decode(content).replace(" ##", "")))
    assert markers["train"] and markers["heldout"]
    assert not markers["train"] & markers["heldout"]
    docs = make_docs(400)
    expected = {d.split()[0] for d in docs if sources.heldout_score(d, 3) < 0.1}
    assert markers["heldout"] <= expected and len(markers["heldout"]) >= len(expected) - 1
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["documents"]["train"] + stats["documents"]["heldout"] == 400


def test_decode_counts_replaced_bytes():
    text, bad = sources.decode(b"ok \xff\xfe and \xe2\x82 cut")
    assert bad == 4 and text.count("\ufffd") == 3 and text.startswith("ok ")
    assert sources.decode("héllo".encode()) == ("héllo", 0)


def test_formats_compression_and_replaced_bytes(tmp_path):
    docs = make_docs(40, seed=2)
    # blank-line separated blocks (multi-line documents) in a .gz
    with gzip.open(tmp_path / "a.txt.gz", "wt") as f:
        f.write("\n\n".join(d.replace(" the ", "\nthe ", 1) for d in docs[:10]) + "\n")
    with bz2.open(tmp_path / "b.jsonl.bz2", "wt") as f:
        for d in docs[10:20]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs[20:30]}), tmp_path / "c.parquet")
    with lzma.open(tmp_path / "d.txt.xz", "wb") as f:  # one doc per line, with undecodable bytes
        f.write(b"\n".join(d.encode() for d in docs[30:39]) + b"\nbroken \xff\xfe bytes \xc3 here ok\n")
    stats = quiet_prepare([tmp_path / "a.txt.gz", tmp_path / "b.jsonl.bz2", tmp_path / "c.parquet",
                           str(tmp_path / "d.*")], tmp_path / "out", seq_len=16, tokenizer="train:200",
                          heldout_fraction=0.0, max_docs=None)
    assert stats["documents"]["train"] == 40
    assert stats["replaced_bytes"] == 3
    assert len(stats["input_files"]) == 4


def test_max_docs(tmp_path):
    corpus = write_lines(tmp_path / "c.txt", make_docs(100))
    stats = quiet_prepare([corpus], tmp_path / "out", seq_len=16, tokenizer="train:200",
                          heldout_fraction=0.0, max_docs=30)
    assert stats["documents"]["train"] == 30


def test_minilm_vocab_loads(tmp_path):
    corpus = write_lines(tmp_path / "c.txt", make_docs(50))
    for i, spec in enumerate([os.path.join(MINILM, "vocab.txt"), MINILM]):
        stats = quiet_prepare([corpus], tmp_path / f"out{i}", seq_len=64, tokenizer=spec, heldout_fraction=0.0)
        assert stats["vocab_size"] == 30522 and stats["dtype"] == "int16"
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(MINILM)
    ours = AutoTokenizer.from_pretrained(str(tmp_path / "out0" / "tokenizer"))
    text = "Tokenization of unbelievable documentation, 2024!"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
