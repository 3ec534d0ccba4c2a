"""A run's metrics.jsonl as curves, and the arithmetic the time-to-target comparison does on them: reading the
records, cumulative FLOPs over tokens, and the first crossing of a target loss.

Pure functions of the records; the definitions they implement (time axis, FLOPs integral, interpolated
crossing) are in training/bench/report.py's module doc and BENCHMARKS.md. report.py builds the run summaries
and the compare report from them; plateau.py reads runs with them too.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


# ------------------------------------------------------------------------------------------ reading

def read_jsonl(path: str | Path) -> list[dict]:
    """metrics.jsonl records; a torn last line (run still writing / killed) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def split_records(records: Sequence[dict]) -> tuple[list[dict], list[dict]]:
    """(train lines, eval lines), each sorted by step; a step logged twice (a resumed run appends to
    the same file) keeps its last record."""
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    for r in records:
        kind = r.get("kind", "train")
        if kind in by_kind and "step" in r:
            by_kind[kind][int(r["step"])] = r
    return ([by_kind["train"][s] for s in sorted(by_kind["train"])],
            [by_kind["eval"][s] for s in sorted(by_kind["eval"])])


# ------------------------------------------------------------------------------------------ FLOPs

def cumulative_flops(train: Sequence[dict], default_fpt: Optional[float]) -> tuple[list[tuple[int, float]], str]:
    """[(tokens, cumulative FLOPs)] at each train line, starting with (0, 0), and the source used.

    The segment ending at a train line is charged that line's `flops_per_token` (tokens of one logging
    window all belong to the line's stage: the runner always logs the last step of a stage), or
    `default_fpt` when the line has none.
    """
    points = [(0, 0.0)]
    sources = set()
    total = 0.0
    prev_tokens = 0
    for r in train:
        tokens = int(r.get("tokens", prev_tokens))
        fpt = r.get("flops_per_token")
        if fpt is None:
            fpt = default_fpt
            sources.add("config")
        else:
            sources.add("metrics")
        if fpt is None:
            return [], "unknown"
        total += max(tokens - prev_tokens, 0) * float(fpt)
        prev_tokens = max(tokens, prev_tokens)
        points.append((prev_tokens, total))
    source = "+".join(sorted(sources)) or ("config" if default_fpt is not None else "unknown")
    return points, source


def flops_at(tokens: float, points: Sequence[tuple[int, float]], last_fpt: Optional[float]) -> Optional[float]:
    """Cumulative FLOPs after `tokens` tokens, linear within a segment; beyond the last train line at
    `last_fpt` per token."""
    if not points:
        return None
    for (t0, f0), (t1, f1) in zip(points, points[1:]):
        if tokens <= t1:
            if t1 == t0:
                return f1
            return f0 + (f1 - f0) * (tokens - t0) / (t1 - t0)
    t_last, f_last = points[-1]
    if last_fpt is None:
        return f_last if tokens <= t_last else None
    return f_last + (tokens - t_last) * last_fpt


# ------------------------------------------------------------------------------------ time to target

@dataclass
class Crossing:
    reached: bool
    wall_s: Optional[float] = None
    tokens: Optional[float] = None
    flops: Optional[float] = None
    step: Optional[float] = None


def time_to_target(evals: Sequence[dict], target: float, flops_of_tokens=None) -> Crossing:
    """First crossing of `target` by the held-out loss curve, interpolated linearly (see module doc).

    `evals` are eval records (keys wall_s, tokens, step, heldout_loss) sorted by step;
    `flops_of_tokens(tokens)` maps tokens to cumulative FLOPs (None: FLOPs not reported).
    """
    prev = None
    for e in evals:
        loss = e.get("heldout_loss")
        if loss is None or not math.isfinite(loss):
            prev = None
            continue
        if loss <= target:
            if prev is None or prev["heldout_loss"] == loss:
                frac = 1.0
                prev = e
            else:
                frac = (prev["heldout_loss"] - target) / (prev["heldout_loss"] - loss)
            def lerp(key):
                return prev[key] + frac * (e[key] - prev[key])
            tokens = lerp("tokens")
            return Crossing(True, wall_s=lerp("wall_s"), tokens=tokens, step=lerp("step"),
                            flops=flops_of_tokens(tokens) if flops_of_tokens else None)
        prev = e
    return Crossing(False)
