"""BLiMP minimal-pair evaluation of a masked LM, beside unigram and bigram count models of its training data.

    python -m training.evaluate --model M --blimp DIR|hf:nyu-mll/blimp [--per-paradigm N] [--pll word|token|both]

A scorer passes a pair when it gives `sentence_good` the higher score; an exact tie (a count model on two
sentences of the same pieces) counts as half a pass, i.e. chance. A paradigm's score is its share of passed
pairs; the headline is the mean over paradigms (BabyLM's convention), and each field's and phenomenon's score is
the mean over its paradigms. The pairs are read by training/blimp/pairs.py, the scores computed by
training/blimp/score.py.
"""
from __future__ import annotations

import sys
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from training.blimp.pairs import Paradigm, load
from training.blimp.score import PLL_VARIANTS, CountModels, encode, pll

TIE_NATS = 1e-9  # |good - bad| at or under this (relative to the scores' size) is a tie: half a pass

__all__ = ["evaluate_blimp", "summary_text", "PLL_VARIANTS", "load"]


def pass_rate(good: np.ndarray, bad: np.ndarray) -> float:
    diff = good - bad
    tie = np.abs(diff) <= TIE_NATS * np.maximum(1.0, np.abs(good))
    return float(np.where(tie, 0.5, diff > 0).mean())


def _group_means(per_paradigm: dict, key: str, scorers: Sequence[str]) -> dict:
    groups = defaultdict(list)
    for row in per_paradigm.values():
        groups[row[key]].append(row)
    return {name: {"paradigms": len(rows), **{s: float(np.mean([r[s] for r in rows])) for s in scorers}}
            for name, rows in sorted(groups.items())}


def evaluate_blimp(model, tokenizer, source: str, *, per_paradigm: Optional[int] = None,
                   variants: Sequence[str] = ("word",), counts: Optional[CountModels] = None,
                   mask_id: int, pad_id: int, progress: bool = True,
                   paradigms: Optional[list[Paradigm]] = None) -> dict:
    """Score every pair of `source` with the model (one PLL per variant) and, given `counts`, the unigram and
    bigram count models. Returns the JSON-ready result (see the module doc for the means)."""
    from tqdm import tqdm

    paradigms = paradigms if paradigms is not None else load(source, per_paradigm)
    scorers = [f"pll_{v}" for v in variants] + (["unigram", "bigram"] if counts is not None else [])
    sentences = sum(2 * len(p.good) for p in paradigms)
    bar = tqdm(total=sentences * len(variants), desc="BLiMP", unit="sent", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    rows = {}
    try:
        for p in paradigms:
            encoded = encode(tokenizer, list(p.good) + list(p.bad))
            n = len(p.good)
            scores = {f"pll_{v}": pll(model, encoded, v, mask_id, pad_id, progress=bar.update) for v in variants}
            if counts is not None:
                scores.update(unigram=counts.unigram(encoded), bigram=counts.bigram(encoded))
            rows[p.uid] = {"field": p.field, "phenomenon": p.phenomenon, "pairs": n,
                           **{s: pass_rate(v[:n], v[n:]) for s, v in scores.items()}}
    finally:
        bar.close()
    return {
        "source": source, "paradigms": len(rows), "pairs": sum(r["pairs"] for r in rows.values()),
        "per_paradigm": per_paradigm, "scorers": scorers, "primary": scorers[0],
        "mean": {s: float(np.mean([r[s] for r in rows.values()])) for s in scorers},
        "fields": _group_means(rows, "field", scorers),
        "phenomena": _group_means(rows, "phenomenon", scorers),
        "per_paradigm_scores": rows,
        "tie_rule": f"|good - bad| <= {TIE_NATS:g} x max(1, |good|) nats counts as half a pass",
    }


def summary_text(b: dict) -> str:
    """`BLiMP 61.2% (pll_word; unigram 48.9%, bigram 51.3%) over 67 paradigms, 6,700 pairs`."""
    mean = b["mean"]
    others = ", ".join(f"{s} {100 * mean[s]:.1f}%" for s in b["scorers"][1:])
    return (f"BLiMP {100 * mean[b['primary']]:.1f}% ({b['primary']}" + (f"; {others}" if others else "")
            + f") over {b['paradigms']} paradigms, {b['pairs']:,} pairs")
