"""Bad input: one-line UserErrors naming the file/flag; CLI exit code 2; no half-written output."""
from __future__ import annotations

import json
import os

import pytest

from tests.helpers.data import make_docs, quiet_prepare, write_lines
from training.errors import UserError


@pytest.fixture
def corpus(tmp_path):
    return write_lines(tmp_path / "c.txt", make_docs(20))


def expect_error(match, *args, **kw):
    with pytest.raises(UserError) as info:
        quiet_prepare(*args, **kw)
    msg = str(info.value)
    assert match in msg and "\n" not in msg, msg
    return msg


def test_missing_file_and_empty_glob(tmp_path):
    expect_error("nope.txt", [tmp_path / "nope.txt"], tmp_path / "o", seq_len=16, tokenizer="train:100")
    expect_error("--input", [tmp_path / "*.jsonl"], tmp_path / "o", seq_len=16, tokenizer="train:100")


def test_directory_input(tmp_path):
    expect_error(str(tmp_path), [tmp_path], tmp_path / "o", seq_len=16, tokenizer="train:100")


def test_empty_corpus_leaves_nothing_behind(tmp_path):
    empty = tmp_path / "blank.txt"
    empty.write_text("\n   \n\n")
    expect_error("empty (no documents)", [empty], tmp_path / "o", seq_len=16, tokenizer="train:100")
    assert sorted(os.listdir(tmp_path)) == ["blank.txt"]  # no o/, no o.tmp-*


def test_seq_len_too_small(corpus, tmp_path):
    expect_error("--seq-len", [corpus], tmp_path / "o", seq_len=4, tokenizer="train:100")


def test_existing_out_dir_needs_overwrite(corpus, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    expect_error("--overwrite", [corpus], out, seq_len=16, tokenizer="train:100")
    # --overwrite replaces only what prepare made (its .bert-data marker): someone's directory is kept.
    expect_error("no .bert-data marker", [corpus], out, seq_len=16, tokenizer="train:100", overwrite=True)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    (out / "keep.txt").unlink()
    quiet_prepare([corpus], out, seq_len=16, tokenizer="train:100")
    stats = quiet_prepare([corpus], out, seq_len=16, tokenizer="train:100", overwrite=True, seed=1)
    assert json.load(open(out / "stats.json")) == stats and stats["seed"] == 1


def test_bad_tokenizer(corpus, tmp_path):
    expect_error("--tokenizer", [corpus], tmp_path / "o", seq_len=16, tokenizer=str(tmp_path / "none"))
    expect_error("--tokenizer train:abc", [corpus], tmp_path / "o", seq_len=16, tokenizer="train:abc")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    expect_error(str(bad), [corpus], tmp_path / "o", seq_len=16, tokenizer=str(bad))
    (tmp_path / "emptydir").mkdir()
    expect_error("neither tokenizer.json nor vocab.txt", [corpus], tmp_path / "o", seq_len=16,
                 tokenizer=str(tmp_path / "emptydir"))


def test_bad_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine document"}\n{"body": "no text"}\n')
    expect_error(f"{path}:2", [path], tmp_path / "o", seq_len=16, tokenizer="train:100")


