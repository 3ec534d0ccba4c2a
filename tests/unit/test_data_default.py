"""build-default: gensim's Wikipedia sample becomes real English prose, built idempotently."""
from __future__ import annotations

import json
import os
import re

import pytest

from training.data import wiki
from training.errors import UserError


def test_extracted_wikipedia_is_prose(tmp_path):
    path = tmp_path / "enwiki.txt"
    n = wiki.write_raw(str(path))
    text = path.read_text(encoding="utf-8")
    assert 80 <= n <= 210
    assert 2_000_000 < len(text.encode()) < 4_000_000
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) > 300_000
    common = {w: words.count(w) for w in ("the", "of", "and", "is", "was", "in")}
    assert all(c > 1000 for c in common.values()), common
    assert "Anarchism is a political philosophy" in text  # case and punctuation kept
    assert "[[" not in text and "'''" not in text and "{{" not in text  # markup stripped
    articles = text.split("\n\n")
    assert len(articles) == n and all(a.strip() for a in articles)


def test_build_default_is_idempotent(tmp_path, capsys):
    out = str(tmp_path / "default")
    stats = wiki.build_default(out, seq_len=64, vocab=1000, num_proc=1)
    assert stats["builder"] == "build-default" and stats["rows"]["train"] > 1000
    assert stats["rows"]["heldout"] > 0
    assert os.path.isfile(os.path.join(out, "raw", wiki.RAW_NAME))
    assert stats["input_files"] == [os.path.join(os.path.abspath(out), "raw", wiki.RAW_NAME)]
    capsys.readouterr()
    again = wiki.build_default(out, seq_len=64, vocab=1000)
    assert "up to date" in capsys.readouterr().out and again == stats
    assert json.load(open(os.path.join(out, "stats.json")))["vocab_size"] == 1000


def test_build_default_refuses_foreign_dir(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(UserError, match="--out"):
        wiki.build_default(str(tmp_path), seq_len=64, vocab=1000)
