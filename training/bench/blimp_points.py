"""BLiMP along a compare run: its checkpoints scored after the run (training/blimp), kept in OUT/blimp/NAME.json.

`compare --blimp SRC` scores, for every run, the checkpoint at its target crossing (with --pause-at-target or
--stop-at-target), its last checkpoint, and with `--blimp-every K` one every K steps. The unigram and bigram count
models of the run's training data are scored once per data dir and stored beside the points: they are the "no
context" yardsticks, the same for every run of that data. A point already in the file is not scored again, so a
re-run of the report costs nothing and an interrupted compare resumes where it was.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from training.engine.checkpoint_verify import TAG_RE

POINTS_VERSION = 1


def _tags(run_dir: Path) -> list[Path]:
    ckpt = run_dir / "checkpoints"
    if not ckpt.is_dir():
        return []
    return sorted(p for p in ckpt.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name) and (p / "meta.json").is_file())


def points_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / "blimp" / f"{name}.json"


def read_points(out_dir: Path, name: str) -> Optional[dict]:
    try:
        return json.loads(points_path(out_dir, name).read_text())
    except (OSError, ValueError):
        return None


class Scorer:
    """Pairs read once; count models fitted once per training data dir."""

    def __init__(self, source: str, per_paradigm: Optional[int], progress: bool = True):
        from training.blimp import load

        self.source, self.per_paradigm, self.progress = source, per_paradigm, progress
        self.paradigms = load(source, per_paradigm)
        self._counts: dict[str, dict] = {}

    def count_models(self, data_dir: str, tokenizer, vocab: list[str]) -> dict:
        """The count models' BLiMP result for the training split of `data_dir` (cached)."""
        from training.blimp import evaluate_blimp
        from training.blimp.score import CountModels
        from training.data.loader import PretrainingData

        key = str(Path(data_dir).resolve())
        if key not in self._counts:
            data = PretrainingData(data_dir)
            counts = CountModels(data.train_rows, len(vocab), vocab.index("[PAD]"))
            self._counts[key] = evaluate_blimp(None, tokenizer, self.source, per_paradigm=self.per_paradigm,
                                               variants=(), counts=counts, mask_id=vocab.index("[MASK]"),
                                               pad_id=vocab.index("[PAD]"), progress=False,
                                               paradigms=self.paradigms)
        return self._counts[key]

    def score(self, tag_dir: Path) -> dict:
        from training.blimp import evaluate_blimp
        from training.data import tokenizer as tokenization
        from training.model_io import load_model, pick_device

        loaded = load_model(tag_dir, "--blimp checkpoint", pick_device("auto"))  # the GPU when there is one
        vocab = (Path(loaded.tokenizer_dir) / "vocab.txt").read_text(encoding="utf-8").splitlines()
        tok = tokenization.load(str(loaded.tokenizer_dir))
        result = evaluate_blimp(loaded.model, tok, self.source, per_paradigm=self.per_paradigm,
                                variants=("word",), counts=None, mask_id=vocab.index("[MASK]"),
                                pad_id=vocab.index("[PAD]"), progress=self.progress, paradigms=self.paradigms)
        return {"tag": tag_dir.name, "step": loaded.step, "mean": result["mean"]["pll_word"],
                "fields": {k: v["pll_word"] for k, v in result["fields"].items()},
                "tokens": _tokens(tag_dir), "_vocab": vocab, "_tok": tok}


def _tokens(tag_dir: Path) -> Optional[int]:
    try:
        return int(json.loads((tag_dir / "meta.json").read_text())["train_state"]["tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def score_run(scorer: Scorer, out_dir: Path, name: str, run_dir: Path, labels: dict[int, str]) -> dict:
    """Score every checkpoint of `run_dir` not scored yet; `labels` names special steps ("target"). Writes and
    returns OUT/blimp/NAME.json: {"source", "per_paradigm", "points": [{step, tokens, tag, mean, fields,
    label}], "count_models": {...}}."""
    from training import outdir

    previous = read_points(out_dir, name) or {}
    same = (previous.get("source"), previous.get("per_paradigm")) == (scorer.source, scorer.per_paradigm)
    points = {p["step"]: p for p in previous.get("points", [])} if same else {}
    counts = previous.get("count_models") if same else None
    for tag_dir in _tags(Path(run_dir)):
        step = int(tag_dir.name[4:])
        if step in points:
            points[step]["label"] = labels.get(step, points[step].get("label"))
            continue
        p = scorer.score(tag_dir)
        vocab, tok = p.pop("_vocab"), p.pop("_tok")
        if counts is None:
            data_dir = json.loads((Path(run_dir) / "config.resolved.json").read_text())["data"]["dir"]
            c = scorer.count_models(data_dir, tok, vocab)
            counts = {"data_dir": data_dir, "unigram": c["mean"]["unigram"], "bigram": c["mean"]["bigram"],
                      "fields": {k: {s: v[s] for s in ("unigram", "bigram")} for k, v in c["fields"].items()}}
        points[step] = {**p, "label": labels.get(step)}
    result = {"version": POINTS_VERSION, "source": scorer.source, "per_paradigm": scorer.per_paradigm,
              "scorer": "pll_word", "count_models": counts, "points": [points[s] for s in sorted(points)]}
    path = points_path(out_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    outdir.write_atomic(path, json.dumps(result, indent=1) + "\n")
    return result


def note(report: dict) -> str:
    """One paragraph for the report: what the BLiMP columns are, with the count models beside them."""
    with_points = [r["blimp"] for r in report["runs"] if r.get("blimp")]
    if not with_points:
        return ""
    b = with_points[0]
    counts = b.get("count_models") or {}
    per = f"{b['per_paradigm']} pairs of each paradigm" if b.get("per_paradigm") else "every pair"
    yard = (f"; the count models of the training split score unigram {100 * counts['unigram']:.1f}%, bigram "
            f"{100 * counts['bigram']:.1f}% (chance 50%)" if counts.get("unigram") is not None else "")
    return (f"BLiMP ({b['source']}, {per}): the mean over paradigms of the pairs whose good sentence gets the higher "
            f"pseudo-log-likelihood (word-level, Kauf & Ivanova 2023), at the checkpoint of the target crossing "
            f"and at the run's last{yard}.")


def plot_blimp_vs_flops(report: dict, path: Path) -> None:
    """BLiMP at each scored checkpoint against training FLOPs, one curve per run (target crossings ringed), with
    the count models' scores as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    counts = None
    for r in report["runs"]:
        points = [p for p in (r.get("blimp") or {}).get("points", []) if p.get("flops") is not None]
        if not points:
            continue
        counts = counts or r["blimp"].get("count_models")
        label = r["name"] + (" (baseline)" if r["name"] == report["baseline"] else "")
        (line,) = ax.plot([p["flops"] for p in points], [100 * p["mean"] for p in points], marker=".", label=label)
        for p in points:
            if p.get("label") == "target":
                ax.plot([p["flops"]], [100 * p["mean"]], marker="o", markersize=9, fillstyle="none",
                        color=line.get_color())
    for key, style in (("unigram", ":"), ("bigram", "-.")):
        if counts and counts.get(key) is not None:
            ax.axhline(100 * counts[key], color="black", linestyle=style, linewidth=1, label=f"{key} count model")
    ax.set_xlabel("training FLOPs (flops_per_token x tokens)")
    ax.set_ylabel("BLiMP, % of pairs (mean over paradigms)")
    ax.set_title("BLiMP vs FLOPs (o = the checkpoint at the target crossing)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
