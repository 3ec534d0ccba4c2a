"""Time-to-target analysis of finished runs (run summaries, the comparison against the baseline) and the
compare report (JSON, Markdown, PNG).

Everything here is a pure function of each run's `metrics.jsonl` (plus, as a fallback for FLOPs, its
`config.resolved.json` and the data dir's `stats.json`), so a report can be rebuilt from run
directories at any time (`python -m training.bench compare ... --report-only`). The arithmetic on one run's
curves (reading metrics.jsonl, cumulative FLOPs, the interpolated crossing of the target) is in
training/bench/curves.py.

Definitions (also in BENCHMARKS.md):

* time axis: the metrics' `wall_s`, i.e. seconds since the run's training loop started (process
  start-up, data loading, engine build and the final export are excluded; the in-loop held-out
  evaluations and checkpoints are included, at the same cadence for every method).
* held-out loss: the fixed evaluation mask (training/data/loader.py FIXED_MASK_*: 15% of the held-out
  positions, all [MASK], identical for every run), beside the unigram table's loss on the same positions.
* target: the baseline's held-out MLM loss at its final evaluation.
* time / tokens / FLOPs to target: the first crossing of the target by the run's eval curve *in its
  final stage*, linearly interpolated between the two eval points around it (an eval at or below the
  target with no earlier point in that stage is taken as is). Only the final stage counts because only
  it has the architecture the run delivers: a CoRe relaxed model (linear attention, low-rank FFN) or a
  half-depth stacking model that reaches the loss is not the BERT the baseline trained. "not reached"
  when no final-stage eval point gets to the target.
* FLOPs: the integral of flops_per_token over tokens, segment by segment between train lines (each
  segment at the `flops_per_token` of the line that ends it, or the config's value when lines lack it).
  The runner logs what each step computed (training/model/flops.py, FLOPS_COUNTING below): frozen
  layers forward-only, dropped layers by their keep probability, the tied decoder's weight gradient
  only while it trains.
* speedup: baseline's time to target / the method's time to target (same for FLOPs and tokens).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from training.bench.curves import Crossing, cumulative_flops, flops_at, read_jsonl, split_records, time_to_target

NOT_REACHED = "not reached"

FLOPS_COUNTING = (
    "FLOPs count what was computed (training/model/flops.py): matmuls only, 2 per multiply-add, and each "
    "gradient a matmul really has (w.r.t. its input, w.r.t. its weight) at the cost of its forward, so a fully "
    "trained layer costs 3x its forward. A frozen layer with nothing trainable below it (MSLT's frozen bottom, "
    "run under no_grad) costs its forward only, 1/3 of a trained layer; a frozen layer that gradients pass "
    "through costs its forward plus input gradients; the tied MLM decoder's weight gradient counts only while "
    "the word embeddings train; under progressive layer dropping each layer counts by that step's keep "
    "probability. Each train line's flops_per_token is its logging window's token-weighted mean, and FLOPs to "
    "target integrate it over tokens. Embedding lookups, LayerNorm, softmax and GELU are not counted.")


# ---------------------------------------------------------------------------------------- summaries

@dataclass
class RunSummary:
    name: str
    config: str
    run_dir: str
    status: str = "ok"  # ok | failed (...) | missing
    final_loss: Optional[float] = None
    final_acc: Optional[float] = None
    # The unigram table's loss on the same fixed held-out positions (a model that ignores context scores it).
    final_unigram: Optional[float] = None
    final_step: Optional[int] = None
    total_wall_s: Optional[float] = None
    total_tokens: Optional[int] = None
    total_flops: Optional[float] = None
    flops_source: str = "unknown"
    eval_every: Optional[int] = None
    final_stage: Optional[str] = None  # only its evals count towards the target (module doc)
    stages: list = field(default_factory=list)  # [{"name", "start_step", "end_step", "end_wall_s"}]
    curve: list = field(default_factory=list)  # [{"step", "wall_s", "tokens", "flops", "loss", "acc"}]
    target: Optional[dict] = None  # Crossing as dict + speedups, filled by compare_runs
    mean_tokens_per_s: Optional[float] = None
    flops_points: list = field(default_factory=list)  # [(tokens, cumulative FLOPs)] at the train lines
    last_flops_per_token: Optional[float] = None
    blimp: Optional[dict] = None  # BLiMP at checkpoints (training/bench/blimp_points.py), FLOPs filled in


def _stages(train: Sequence[dict]) -> list[dict]:
    """Each stage's steps, end (seconds, tokens) and speed: tokens/s over the stage (its tokens / its seconds,
    the transition into it included) and MFU, the token-weighted mean of its train lines' `mfu` (each line's
    window at the FLOPs it computed: frozen layers forward-only, dropped layers by keep probability)."""
    stages: list[dict] = []
    prev_tokens, prev_wall = 0, 0.0
    for r in train:
        name = r.get("stage", "main")
        if not stages or stages[-1]["name"] != name:
            start = stages[-1]["end_step"] + 1 if stages else 1  # the runner logs every stage's last step
            stages.append({"name": name, "start_step": start, "start_tokens": prev_tokens, "start_wall_s": prev_wall,
                           "_mfu_tokens": 0.0, "_mfu_sum": 0.0})
        st = stages[-1]
        st.update(end_step=r["step"], end_wall_s=r.get("wall_s"), end_tokens=r.get("tokens"))
        window = (r.get("tokens") or 0) - prev_tokens
        if r.get("mfu") is not None and window > 0:
            st["_mfu_tokens"] += window
            st["_mfu_sum"] += window * r["mfu"]
        prev_tokens, prev_wall = r.get("tokens") or prev_tokens, r.get("wall_s") or prev_wall
    for st in stages:
        mfu_tokens, mfu_sum = st.pop("_mfu_tokens"), st.pop("_mfu_sum")
        st["mfu"] = mfu_sum / mfu_tokens if mfu_tokens else None
        seconds = (st["end_wall_s"] or 0) - st["start_wall_s"]
        tokens = (st["end_tokens"] or 0) - st["start_tokens"]
        st["tokens_per_s"] = tokens / seconds if seconds > 0 and tokens > 0 else None
    return stages


def default_flops_per_token(run_dir: Path) -> Optional[float]:
    """flops_per_token of the run's resolved `model:` section at its data's seq_len (fallback only: it
    knows nothing of per-stage shapes)."""
    try:
        from training.model.config import ModelConfig
        from training.model.flops import flops_per_token

        resolved = json.loads((run_dir / "config.resolved.json").read_text())
        data_dir = Path(resolved["data"]["dir"])
        stats = json.loads((data_dir / "stats.json").read_text())
        return flops_per_token(ModelConfig(**resolved["model"]), int(stats["seq_len"]),
                               masked_fraction=float(resolved["data"].get("mlm_probability", 0.15)))
    except Exception:
        return None


def summarise_run(name: str, config: str, run_dir: str | Path, status: str = "ok") -> RunSummary:
    run_dir = Path(run_dir)
    s = RunSummary(name=name, config=str(config), run_dir=str(run_dir), status=status)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        if s.status == "ok":
            s.status = "missing (no metrics.jsonl)"
        return s
    train, evals = split_records(read_jsonl(path))
    fpt_default = default_flops_per_token(run_dir)
    points, s.flops_source = cumulative_flops(train, fpt_default)
    last_fpt = train[-1].get("flops_per_token", fpt_default) if train else fpt_default
    s.flops_points, s.last_flops_per_token = [list(p) for p in points], last_fpt
    s.stages = _stages(train)
    for st in s.stages:
        st["end_flops"] = flops_at(st["end_tokens"], points, last_fpt) if st.get("end_tokens") is not None else None
    for e in evals:
        s.curve.append({"step": e["step"], "wall_s": e.get("wall_s"), "tokens": e.get("tokens"),
                        "flops": flops_at(e.get("tokens", 0), points, last_fpt),
                        "loss": e.get("heldout_loss"), "acc": e.get("heldout_acc"), "stage": e.get("stage"),
                        "unigram": e.get("heldout_unigram_loss"), "loss_as_trained": e.get("heldout_loss_as_trained")})
    try:  # the cadence the run was configured with (stage-end evals come on top of it), and its last stage
        resolved = json.loads((run_dir / "config.resolved.json").read_text())
        s.final_stage = (resolved.get("stages") or [{}])[-1].get("name")
        s.eval_every = int(resolved["run"]["eval_every"])
    except (OSError, ValueError, KeyError, TypeError):
        gaps = [b["step"] - a["step"] for a, b in zip(evals, evals[1:])]
        s.eval_every = max(set(gaps), key=gaps.count) if gaps else None
    if evals:
        s.final_loss, s.final_acc, s.final_step = (evals[-1].get("heldout_loss"), evals[-1].get("heldout_acc"),
                                                   int(evals[-1]["step"]))
        s.final_unigram = evals[-1].get("heldout_unigram_loss")
    last = train[-1] if train else (evals[-1] if evals else None)
    if last is not None:
        ends = [r.get("wall_s") for r in (train[-1:] + evals[-1:]) if r.get("wall_s") is not None]
        s.total_wall_s = max(ends) if ends else None
        s.total_tokens = int(max([r.get("tokens", 0) for r in train[-1:] + evals[-1:]]))
        s.total_flops = flops_at(s.total_tokens, points, last_fpt)
        train_wall = train[-1].get("wall_s") if train else None
        if train_wall:
            s.mean_tokens_per_s = train[-1].get("tokens", 0) / train_wall
    if not evals and s.status == "ok":
        s.status = "no eval records"
    return s


def compare_runs(runs: list[RunSummary], baseline_index: int = 0, control_index: Optional[int] = None) -> dict:
    """Fill each run's `target` against the baseline's final held-out loss; return the report dict. With
    `control_index`, every speedup is also given against that run's own way to the same target
    (`speedup_*_vs_control`: the same-budget baseline of No Train No Gain)."""
    base = runs[baseline_index]
    target = base.final_loss if base.status == "ok" else None
    crossings: list[Optional[Crossing]] = []
    for r in runs:
        if target is None or not r.curve:
            crossings.append(None)
            continue
        def flops_of(tokens, r=r):
            return flops_at(tokens, r.flops_points, r.last_flops_per_token) if r.flops_points else None

        evals = [{"step": c["step"], "wall_s": c["wall_s"], "tokens": c["tokens"], "heldout_loss": c["loss"]}
                 for c in r.curve if r.final_stage is None or c.get("stage") in (None, r.final_stage)]
        crossings.append(time_to_target(evals, target, flops_of))
    base_x = crossings[baseline_index]
    control_x = crossings[control_index] if control_index is not None else None
    for r, x in zip(runs, crossings):
        if x is None:
            r.target = {"reached": None, "note": "no baseline target" if target is None else "no eval records"}
            continue
        d = {"reached": x.reached, "wall_s": x.wall_s, "tokens": x.tokens, "flops": x.flops, "step": x.step}
        for key in ("wall_s", "tokens", "flops"):
            b, m = (getattr(base_x, key) if base_x else None), getattr(x, key)
            d[f"speedup_{key}"] = (b / m) if (x.reached and b and m) else None
            if control_index is not None:
                c = getattr(control_x, key) if control_x is not None and control_x.reached else None
                d[f"speedup_{key}_vs_control"] = (c / m) if (x.reached and c and m) else None
        r.target = d
    for r in runs:
        if r.blimp:
            for p in r.blimp["points"]:
                p["flops"] = flops_at(p["tokens"], r.flops_points, r.last_flops_per_token) \
                    if p.get("tokens") is not None and r.flops_points else None
    return {
        "baseline": base.name,
        "control": runs[control_index].name if control_index is not None else None,
        "target_heldout_loss": target,
        "definitions": {
            "time": "metrics wall_s: seconds since the training loop started (excludes process start-up and "
                    "export; includes in-loop evals and checkpoints)",
            "target": "baseline's final held-out MLM loss at the fixed all-[MASK] evaluation positions",
            "unigram": "loss of the training split's token-frequency table on the same positions (no context)",
            "to_target": "first crossing of the target by an eval of the run's final stage (the architecture it "
                         "delivers), linear interpolation between eval points",
            "speedup": "baseline time (tokens, FLOPs) to target / method's",
            "flops": "integral of flops_per_token over tokens (metrics field when present, else the config's "
                     "model shape)",
        },
        "runs": [r.__dict__ for r in runs],
    }


# ------------------------------------------------------------------------------------------ writing

def _fmt(x, kind: str = "g") -> str:
    if x is None:
        return "–"
    if kind == "s":
        return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"
    if kind in ("tok", "flops"):
        units = [(1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")]
        scale, prefix = next(((s, p) for s, p in units if abs(x) >= s), (1, ""))
        return f"{x / scale:.3g} {prefix}" + ("FLOP" if kind == "flops" else "tok")
    if kind == "x":
        return f"{x:.2f}x"
    return f"{x:.4f}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def unigram_reference(report: dict) -> Optional[float]:
    """The unigram table's loss on the fixed held-out positions (the baseline's, else any run's)."""
    runs = sorted(report["runs"], key=lambda r: r["name"] != report["baseline"])
    return next((r["final_unigram"] for r in runs if r.get("final_unigram") is not None), None)


def _blimp_at(r: dict, label: str) -> Optional[float]:
    points = (r.get("blimp") or {}).get("points") or []
    if label == "end":
        return points[-1]["mean"] if points else None
    return next((p["mean"] for p in points if p.get("label") == label), None)


def markdown_table(report: dict) -> str:
    control = report.get("control")
    blimp = any(r.get("blimp") for r in report["runs"])
    head = ("| method | status | final held-out loss | nats below unigram | final MLM acc | train time s | "
            "process s | time to target s | tokens to target | FLOPs to target | speedup (time) | speedup (tokens) | "
            "speedup (FLOPs) |" + (f" vs {control} (tokens / FLOPs) |" if control else "")
            + (" BLiMP at target | BLiMP at end |" if blimp else ""))
    lines = [head, "|" + "|".join(["---"] * head.count(" |")) + "|"]
    for r in report["runs"]:
        t = r.get("target") or {}
        reached = t.get("reached")
        if reached is False:
            ttt = tok = fl = sp = spt = spf = vs = NOT_REACHED
        else:
            ttt, tok, fl = _fmt(t.get("wall_s"), "s"), _fmt(t.get("tokens"), "tok"), _fmt(t.get("flops"), "flops")
            sp, spt, spf = (_fmt(t.get(f"speedup_{k}"), "x") for k in ("wall_s", "tokens", "flops"))
            vs = f"{_fmt(t.get('speedup_tokens_vs_control'), 'x')} / {_fmt(t.get('speedup_flops_vs_control'), 'x')}"
        name = r["name"] + (" (baseline)" if r["name"] == report["baseline"] else "")
        below = (r["final_unigram"] - r["final_loss"]) if None not in (r.get("final_unigram"), r["final_loss"]) else None
        lines.append(f"| {name} | {r['status']} | {_fmt(r['final_loss'])} | {_fmt(below)} | {_fmt(r['final_acc'])} | "
                     f"{_fmt(r['total_wall_s'], 's')} | {_fmt(r.get('process_s'), 's')} | {ttt} | {tok} | {fl} | {sp} | "
                     f"{spt} | {spf} |" + (f" {vs} |" if control else "")
                     + (f" {_pct(_blimp_at(r, 'end' if r['name'] == report['baseline'] else 'target'))} | "
                        f"{_pct(_blimp_at(r, 'end'))} |" if blimp else ""))
    return "\n".join(lines)


def write_markdown(report: dict, path: str | Path, preamble: str = "") -> None:
    target = report.get("target_heldout_loss")
    text = ["# Method comparison\n", preamble.strip() + "\n" if preamble.strip() else "",
            f"Target: the baseline (`{report['baseline']}`) final held-out MLM loss = "
            f"{_fmt(target)}.\n",
            "Held-out loss: the fixed evaluation mask (15% of the held-out positions, every one [MASK], the same for "
            "every run); unigram = the loss of a table of the training split's token frequencies on the same "
            f"positions{' = ' + _fmt(unigram_reference(report)) if unigram_reference(report) is not None else ''}, "
            "what a model that learned nothing from context scores.\n",
            markdown_table(report), "",
            "Train time = the runs' `wall_s` (training loop only: no start-up or export; in-loop evals, "
            "checkpoints and stage transitions included); all to-target values use it. Process s = the whole "
            "subprocess (start-up, data loading, final checkpoint), for information. To-target values "
            "interpolate linearly between eval points; speedup = baseline / method.", "",
            FLOPS_COUNTING, ""]
    from training.bench.blimp_points import note as blimp_note

    if blimp_note(report):
        text += [blimp_note(report), ""]
    stage_lines = []
    for r in report["runs"]:
        parts = ", ".join(f"{s['name']} (steps {s['start_step']}-{s['end_step']}, ends {_fmt(s['end_wall_s'], 's')} s, "
                          f"{_fmt(s.get('tokens_per_s'), 's')} tok/s, MFU {_pct(s.get('mfu'))})" for s in r["stages"])
        if parts:
            stage_lines.append(f"- {r['name']}: {parts}")
    if stage_lines:
        text += ["Stages: tokens/s is the stage's tokens over its seconds, its entry transition included; MFU the "
                 "corrected FLOPs per second over the run's peak, token-weighted over the stage.",
                 *stage_lines, ""]
    notes = report.get("notes") or []
    if notes:
        text += ["Notes:", *[f"- {n}" for n in notes], ""]
    Path(path).write_text("\n".join(text))


X_AXES = {
    "wall_s": ("wall-clock seconds (training loop, metrics wall_s)", "end_wall_s", "time"),
    "flops": ("training FLOPs (flops_per_token x tokens)", "end_flops", "FLOPs"),
}


def plot_loss_vs_time(report: dict, path: str | Path, x: str = "wall_s") -> None:
    """Held-out loss against `x` ("wall_s" or "flops"), one curve per run, stage boundaries marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xlabel, boundary_key, what = X_AXES[x]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for r in report["runs"]:
        pts = [(c[x], c["loss"]) for c in r["curve"] if c.get(x) is not None and c["loss"] is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        label = r["name"] + (" (baseline)" if r["name"] == report["baseline"] else "")
        (line,) = ax.plot(xs, ys, marker=".", markersize=4, linewidth=1.5, label=label)
        trained = [(c[x], c["loss_as_trained"]) for c in r["curve"]
                   if c.get(x) is not None and c.get("loss_as_trained") is not None]
        if trained:  # the locality anneal: the model as it trains, the bias at its strength then
            ax.plot(*zip(*trained), linestyle="--", linewidth=1, color=line.get_color(), alpha=0.7)
        for s in r["stages"][:-1]:  # boundaries: the end of every stage but the last
            t = s.get(boundary_key)
            if t is None:
                continue
            y = _interp(t, xs, ys)
            ax.plot([t], [y], marker="|", markersize=14, markeredgewidth=2, color=line.get_color())
            ax.plot([t], [y], marker="o", markersize=5, color=line.get_color())
    target = report.get("target_heldout_loss")
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="target (baseline final)")
    unigram = unigram_reference(report)
    if unigram is not None:
        ax.axhline(unigram, color="black", linestyle=":", linewidth=1.2, label="unigram table (no context)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out MLM loss")
    ax.set_title(f"Held-out loss vs {what} (| = stage boundary"
                 + ("; dashed: as trained, with the locality bias)" if any(
                     c.get("loss_as_trained") is not None for r in report["runs"] for c in r["curve"]) else ")"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    if x <= xs[0]:
        return ys[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return y0 + (y1 - y0) * ((x - x0) / (x1 - x0) if x1 != x0 else 1.0)
    return ys[-1]


def write_report(report: dict, out_dir: str | Path, preamble: str = "") -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md", "png": out_dir / "loss_vs_time.png",
             "png_flops": out_dir / "loss_vs_flops.png"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    write_markdown(report, paths["md"], preamble)
    plot_loss_vs_time(report, paths["png"], "wall_s")
    plot_loss_vs_time(report, paths["png_flops"], "flops")
    if any(r.get("blimp") for r in report["runs"]):
        from training.bench.blimp_points import plot_blimp_vs_flops

        paths["png_blimp"] = out_dir / "blimp_vs_flops.png"
        plot_blimp_vs_flops(report, paths["png_blimp"])
    return paths
