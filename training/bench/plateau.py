"""`python -m training.bench plateau --runs DIR... --out DIR`: where each run leaves the unigram plateau.

Reads the eval records of finished or running runs (any `python -m training.pretrain` output dir; train them
with `--resume` to extend a run across sessions) and reports, per run, the tokens and seconds at which the
held-out loss first gets 0.25, 0.5 and 1.0 nats below the unigram reference (`heldout_below_unigram`, the
fixed all-[MASK] evaluation: training/stages/runner.py), linearly interpolated between eval points, with the
final distance and accuracy. Writes plateau.json, plateau.md and gap_vs_tokens.png (one curve per run).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from training.bench.curves import read_jsonl, split_records
from training.errors import UserError

THRESHOLDS = (0.25, 0.5, 1.0)  # nats below the unigram reference


def add_arguments(p) -> None:
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR", help="run directories (metrics.jsonl)")
    p.add_argument("--out", required=True, help="output directory (plateau.json, plateau.md, gap_vs_tokens.png)")
    p.add_argument("--names", nargs="+", default=None, help="labels (default: the run directories' names)")
    p.add_argument("--note", action="append", default=[], help="free text for the report (e.g. the commands)")


def crossing(points: Sequence[tuple[float, float, float]], threshold: float) -> Optional[tuple[float, float]]:
    """(tokens, seconds) where the distance below unigram first reaches `threshold`; points are
    (tokens, seconds, below) in step order. Linear between the eval points around the crossing."""
    prev = None
    for tokens, seconds, below in points:
        if below >= threshold:
            if prev is None or prev[2] >= below:
                return tokens, seconds
            f = (threshold - prev[2]) / (below - prev[2])
            return prev[0] + f * (tokens - prev[0]), prev[1] + f * (seconds - prev[1])
        prev = (tokens, seconds, below)
    return None


def summarise(name: str, run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"--runs {run_dir}: no metrics.jsonl")
    _, evals = split_records(read_jsonl(path))
    evals = [e for e in evals if e.get("heldout_below_unigram") is not None]
    if not evals:
        raise UserError(f"--runs {run_dir}: no eval record with heldout_below_unigram (a run from before the "
                        "fixed-mask evaluation?)")
    points = [(float(e["tokens"]), float(e.get("wall_s", 0.0)), float(e["heldout_below_unigram"])) for e in evals]
    out = {"name": name, "run_dir": str(run_dir), "evals": len(evals), "tokens": points[-1][0],
           "wall_s": points[-1][1], "final_below_unigram": points[-1][2], "final_acc": evals[-1].get("heldout_acc"),
           "final_loss": evals[-1]["heldout_loss"], "unigram": evals[-1].get("heldout_unigram_loss"),
           "best_below_unigram": max(p[2] for p in points),
           "curve": [{"tokens": t, "wall_s": s, "below_unigram": b} for t, s, b in points]}
    for th in THRESHOLDS:
        hit = crossing(points, th)
        out[f"tokens_to_{th:g}"], out[f"wall_s_to_{th:g}"] = hit if hit else (None, None)
    return out


def _fmt(x, kind: str = "") -> str:
    if x is None:
        return "–"
    if kind == "tok":
        return f"{x / 1e6:.2f} M"
    if kind == "s":
        return f"{x:,.0f}"
    return f"{x:.3f}"


def markdown(rows: list[dict], notes: Sequence[str] = ()) -> str:
    head = ["run", "tokens seen", "final loss", "unigram", "final below unigram", "best below", "final acc"]
    head += [f"tokens to {th:g}" for th in THRESHOLDS] + [f"s to {th:g}" for th in THRESHOLDS]
    lines = ["# Leaving the unigram plateau", "",
             "Distance below the unigram reference, in nats, at the fixed all-[MASK] held-out evaluation; '–' = "
             "not reached. Seconds are the runs' own training-loop clocks (compare them only between runs made "
             "side by side).", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], _fmt(r["tokens"], "tok"), _fmt(r["final_loss"]), _fmt(r["unigram"]),
                 _fmt(r["final_below_unigram"]), _fmt(r["best_below_unigram"]), _fmt(r["final_acc"])]
        cells += [_fmt(r[f"tokens_to_{th:g}"], "tok") for th in THRESHOLDS]
        cells += [_fmt(r[f"wall_s_to_{th:g}"], "s") for th in THRESHOLDS]
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: the default cycle repeats after 10 runs
    for i, r in enumerate(rows):
        ax.plot([c["tokens"] / 1e6 for c in r["curve"]], [c["below_unigram"] for c in r["curve"]], marker=".",
                markersize=4, linewidth=1.5, label=r["name"], color=colours[(2 * i) % 20 + (2 * i) // 20 % 2],
                linestyle="-" if i < 20 else "--")
    ax.axhline(0.0, color="black", linestyle=":", linewidth=1.2, label="unigram table (no context)")
    for th in THRESHOLDS[1:]:
        ax.axhline(th, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("nats below the unigram reference (fixed-mask held-out)")
    ax.set_title("Leaving the unigram plateau")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(args) -> dict[str, Path]:
    dirs = [Path(d) for d in args.runs]
    names = args.names or [d.name for d in dirs]
    if len(names) != len(dirs):
        raise UserError(f"--names has {len(names)} entries for {len(dirs)} runs")
    rows = [summarise(n, d) for n, d in zip(names, dirs)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "plateau.json", "md": out / "plateau.md", "png": out / "gap_vs_tokens.png"}
    paths["json"].write_text(json.dumps({"runs": rows, "notes": list(args.note)}, indent=1))
    paths["md"].write_text(markdown(rows, args.note))
    plot(rows, paths["png"])
    print(f"plateau report: {paths['md']}  ({paths['png'].name})")
    return paths
