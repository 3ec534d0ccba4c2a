"""Fine-tuning fixtures' makers (tests/integration/test_finetune.py, tests/integration/test_launchers.py): a
two-genre classification task from two real corpora installed packages ship (gensim's Wikipedia sample
against its Australian news text; held-out rows from other articles), and a tiny randomly initialised model
of ours exported with a WordPiece vocabulary trained on the training sentences."""
from __future__ import annotations

import csv
import functools
import json
import re
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS, EVAL_PER_CLASS = 1000, 150


TINY = dict(hidden_size=64, num_layers=2, num_heads=2, ffn_size=128, max_position=64, dropout=0.0,
            attention_dropout=0.0)


def _sentences(paragraphs) -> list[str]:
    return [s for p in paragraphs for s in re.split(r"(?<=[.!?])\s+", p.strip()) if len(s.split()) >= 8]


@functools.cache
def genre_corpora() -> dict:
    """{"wiki"|"news": (train sentences, held-out sentences)}, shuffled; every fifth article (document) is
    held out, so held-out sentences come from other articles than the training ones, on the same mix of topics."""
    from gensim.test.utils import datapath

    from training.data.wiki import articles, gensim_dump

    with open(datapath("lee_background.cor"), encoding="utf-8") as f:
        news_docs = [[line] for line in f if line.strip()]
    wiki_articles = [paragraphs for _title, paragraphs in articles(gensim_dump())]
    rng = np.random.default_rng(1)
    out = {}
    for name, docs in (("news", news_docs), ("wiki", wiki_articles)):
        train = _sentences([p for i, d in enumerate(docs) if i % 5 for p in d])
        held = _sentences([p for i, d in enumerate(docs) if i % 5 == 0 for p in d])
        assert len(train) >= TRAIN_PER_CLASS and len(held) >= EVAL_PER_CLASS, (name, len(train), len(held))
        out[name] = ([train[k] for k in rng.permutation(len(train))], [held[k] for k in rng.permutation(len(held))])
    return out


def write_rows(path: Path, rows: list[dict], fields=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)
    return path


def write_genre_task(root: Path, train_per_class: int = TRAIN_PER_CLASS,
                     eval_per_class: int = EVAL_PER_CLASS) -> tuple[Path, Path]:
    """(ROOT/genre.csv, ROOT/genre_eval.csv): label `news` or `wiki` (string labels: ids in sorted order)."""
    corpora, rng = genre_corpora(), np.random.default_rng(0)
    files = []
    for name, (i, n) in (("genre.csv", (0, train_per_class)), ("genre_eval.csv", (1, eval_per_class))):
        rows = [{"text": s, "label": label} for label in ("news", "wiki") for s in corpora[label][i][:n]]
        files.append(write_rows(root / name, [rows[k] for k in rng.permutation(len(rows))]))
    return files[0], files[1]


def export_tiny(out: Path, texts: list[str], norm: str, seed: int = 0) -> Path:
    """A randomly initialised tiny model of ours exported as a Hugging Face dir with a WordPiece vocab trained
    on `texts` (Post-LN: BertForMaskedLM family; Pre-LN: RobertaPreLayerNormForMaskedLM)."""
    import torch

    from training.data import tokenizer as wordpiece
    from training.model.bert import BertForPreTraining
    from training.model.config import ModelConfig
    from training.model.hf_export import export_hf

    tok = wordpiece.train(texts, 1024)
    wordpiece.save(tok, str(out.parent / f"{out.name}-tok"))
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), norm=norm, **TINY)
    torch.manual_seed(seed)
    export_hf(BertForPreTraining(cfg), cfg, out, tokenizer_dir=out.parent / f"{out.name}-tok")
    return out


def finetune(*args: str) -> int:
    from training.finetune import main

    return main(list(args))


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())
