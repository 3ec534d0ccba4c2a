"""Benchmark tooling: time-to-target maths, report files, and small end-to-end compare / throughput runs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from training.bench import report as R
from training.bench.compare import run_names
from training.errors import UserError
from tests.helpers import paths as PATHS

REPO = PATHS.REPO


# ------------------------------------------------------------------------------------------ maths

def _evals(points):
    """[(step, wall_s, tokens, loss)] -> eval records."""
    return [{"kind": "eval", "step": s, "wall_s": w, "tokens": t, "heldout_loss": l, "heldout_acc": 0.1}
            for s, w, t, l in points]


def test_time_to_target_interpolates_between_eval_points():
    evals = _evals([(10, 10.0, 1000, 8.0), (20, 20.0, 2000, 6.0), (30, 30.0, 3000, 5.0)])
    x = R.time_to_target(evals, 7.0, flops_of_tokens=lambda t: 2.0 * t)
    assert x.reached
    assert x.wall_s == pytest.approx(15.0)
    assert x.tokens == pytest.approx(1500)
    assert x.step == pytest.approx(15)
    assert x.flops == pytest.approx(3000)
    # exactly on a point
    assert R.time_to_target(evals, 6.0).wall_s == pytest.approx(20.0)
    # first crossing wins even if the curve goes back up later
    bumpy = _evals([(10, 10.0, 1000, 8.0), (20, 20.0, 2000, 6.5), (30, 30.0, 3000, 7.5), (40, 40.0, 4000, 6.0)])
    assert R.time_to_target(bumpy, 7.0).wall_s == pytest.approx(10 + 10 * (1.0 / 1.5))


def test_time_to_target_first_point_and_not_reached():
    evals = _evals([(10, 12.0, 1000, 5.0), (20, 20.0, 2000, 4.0)])
    x = R.time_to_target(evals, 6.0)  # already below at the first eval: no earlier point to interpolate from
    assert x.reached and x.wall_s == pytest.approx(12.0)
    y = R.time_to_target(evals, 3.0)
    assert not y.reached and y.wall_s is None
    z = R.time_to_target(_evals([(10, 1.0, 10, float("nan")), (20, 2.0, 20, 4.0)]), 5.0)
    assert z.reached and z.wall_s == pytest.approx(2.0)


def test_cumulative_flops_per_stage_and_fallback():
    train = [{"step": 1, "tokens": 100, "flops_per_token": 10.0, "stage": "a"},
             {"step": 2, "tokens": 200, "flops_per_token": 10.0, "stage": "a"},
             {"step": 3, "tokens": 300, "flops_per_token": 40.0, "stage": "b"}]
    points, source = R.cumulative_flops(train, default_fpt=None)
    assert source == "metrics"
    assert points == [(0, 0.0), (100, 1000.0), (200, 2000.0), (300, 6000.0)]
    assert R.flops_at(250, points, 40.0) == pytest.approx(4000.0)
    assert R.flops_at(400, points, 40.0) == pytest.approx(10000.0)
    bare = [{k: v for k, v in r.items() if k != "flops_per_token"} for r in train]
    points, source = R.cumulative_flops(bare, default_fpt=5.0)
    assert source == "config" and points[-1] == (300, 1500.0)
    assert R.cumulative_flops(bare, default_fpt=None) == ([], "unknown")


def _write_run(run_dir: Path, evals, fpt=10.0, stages=None, tokens_per_step=100):
    """A fake run dir: train lines every step (with a stage name), eval lines as given."""
    run_dir.mkdir(parents=True)
    lines = []
    last_step = max(e[0] for e in evals)
    for step in range(1, last_step + 1):
        stage = stages(step) if stages else "main"
        lines.append({"kind": "train", "step": step, "stage": stage, "loss": 1.0, "tokens": step * tokens_per_step,
                      "wall_s": float(step), "flops_per_token": fpt * (2 if stage == "big" else 1)})
        for e in evals:
            if e[0] == step:
                lines.append({"kind": "eval", "step": step, "stage": stage, "tokens": step * tokens_per_step,
                              "heldout_loss": e[1], "heldout_acc": e[2], "wall_s": step + 0.1})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_compare_runs_speedup_and_not_reached(tmp_path):
    _write_run(tmp_path / "base", [(10, 7.0, 0.1), (20, 6.0, 0.2), (30, 5.0, 0.3)])
    _write_run(tmp_path / "fast", [(10, 6.0, 0.2), (20, 4.0, 0.4)],
               stages=lambda s: "small" if s <= 10 else "big")
    _write_run(tmp_path / "slow", [(10, 8.0, 0.05), (20, 7.0, 0.1), (30, 6.0, 0.15)])
    runs = [R.summarise_run(n, f"{n}.yaml", tmp_path / n) for n in ("base", "fast", "slow")]
    rep = R.compare_runs(runs)
    assert rep["target_heldout_loss"] == 5.0
    base, fast, slow = rep["runs"]
    assert base["target"]["reached"] and base["target"]["wall_s"] == pytest.approx(30.1)
    assert base["target"]["speedup_wall_s"] == pytest.approx(1.0)
    # fast crosses 5.0 halfway between its evals at 10.1 s and 20.1 s
    assert fast["target"]["wall_s"] == pytest.approx(15.1)
    assert fast["target"]["tokens"] == pytest.approx(1500)
    assert fast["target"]["speedup_wall_s"] == pytest.approx(30.1 / 15.1)
    # FLOPs: 1000 tokens at 10/token, then 500 at 20/token (stage "big")
    assert fast["target"]["flops"] == pytest.approx(1000 * 10 + 500 * 20)
    assert fast["target"]["speedup_flops"] == pytest.approx(3000 * 10 / 20000)
    assert [s["name"] for s in fast["stages"]] == ["small", "big"]
    assert slow["target"]["reached"] is False and slow["target"]["speedup_wall_s"] is None
    assert slow["final_loss"] == 6.0 and slow["final_acc"] == 0.15


def test_speedups_against_a_control_run_and_the_as_trained_curve(tmp_path):
    """--control: each run's tokens/FLOPs to the baseline's target over the control's own (No Train No Gain's
    same-budget baseline); eval lines' *_as_trained scores travel into the curve and the plot."""
    _write_run(tmp_path / "base", [(10, 7.0, 0.1), (20, 6.0, 0.2), (30, 5.0, 0.3)])
    _write_run(tmp_path / "control", [(10, 7.0, 0.1), (20, 5.0, 0.3), (30, 4.5, 0.3)])
    _write_run(tmp_path / "fast", [(10, 5.0, 0.3), (20, 4.0, 0.4)])
    lines = (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if '"eval"' in line)
    ev = json.loads(lines[first])
    lines[first] = json.dumps({**ev, "locality": 0.5, "heldout_loss_as_trained": 4.5})
    (tmp_path / "fast" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    runs = [R.summarise_run(n, f"{n}.yaml", tmp_path / n) for n in ("base", "control", "fast")]
    rep = R.compare_runs(runs, 0, control_index=1)
    base, control, fast = rep["runs"]
    assert rep["control"] == "control"
    assert control["target"]["tokens"] == pytest.approx(2000)  # crosses 5.0 at its step-20 eval
    assert fast["target"]["tokens"] == pytest.approx(1000)
    assert fast["target"]["speedup_tokens"] == pytest.approx(3.0)
    assert fast["target"]["speedup_tokens_vs_control"] == pytest.approx(2.0)
    assert fast["target"]["speedup_flops_vs_control"] == pytest.approx(2.0)
    assert control["target"]["speedup_tokens_vs_control"] == pytest.approx(1.0)
    assert [c["loss_as_trained"] for c in fast["curve"]] == [4.5, None]
    paths = R.write_report(rep, tmp_path / "out")
    md = paths["md"].read_text()
    assert "vs control (tokens / FLOPs)" in md and "| 2.00x / 2.00x |" in md
    assert paths["png_flops"].stat().st_size > 5000


def test_each_stage_reports_its_tokens_per_second_and_token_weighted_mfu(tmp_path):
    """Stage speed: its tokens over its seconds (from the previous stage's end), MFU weighted by each line's tokens."""
    lines = [{"kind": "train", "step": 1, "stage": "small", "tokens": 100, "wall_s": 1.0, "mfu": 0.2},
             {"kind": "train", "step": 2, "stage": "small", "tokens": 400, "wall_s": 2.0, "mfu": 0.4},
             {"kind": "train", "step": 3, "stage": "big", "tokens": 500, "wall_s": 4.0, "mfu": 0.1},
             {"kind": "eval", "step": 3, "stage": "big", "tokens": 500, "heldout_loss": 5.0, "wall_s": 4.1}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    small, big = R.summarise_run("run", "run.yaml", tmp_path / "run").stages
    assert small["tokens_per_s"] == pytest.approx(400 / 2.0) and big["tokens_per_s"] == pytest.approx(100 / 2.0)
    assert small["mfu"] == pytest.approx((100 * 0.2 + 300 * 0.4) / 400) and big["mfu"] == pytest.approx(0.1)
    assert (small["start_step"], small["end_step"], big["start_step"], big["end_step"]) == (1, 2, 3, 3)
    report = R.compare_runs([R.summarise_run("run", "run.yaml", tmp_path / "run")])
    R.write_markdown(report, tmp_path / "report.md")
    assert "big (steps 3-3, ends 4.0 s, 50.0 tok/s, MFU 10.0%)" in (tmp_path / "report.md").read_text()


def test_only_the_final_stage_counts_towards_the_target(tmp_path):
    """A relaxed/smaller model that reaches the loss early (CoRe's linear-attention stage) is not the model the
    run delivers: the crossing is taken from the final stage's evals only (stages from config.resolved.json)."""
    _write_run(tmp_path / "base", [(10, 7.0, 0.1), (20, 5.0, 0.3)])
    _write_run(tmp_path / "core", [(10, 4.0, 0.2), (20, 6.0, 0.25), (30, 4.5, 0.4)],
               stages=lambda s: "relaxed" if s <= 10 else "big")
    (tmp_path / "core" / "config.resolved.json").write_text(json.dumps(
        {"run": {"eval_every": 10}, "stages": [{"name": "relaxed"}, {"name": "big"}]}))
    runs = [R.summarise_run(n, f"{n}.yaml", tmp_path / n) for n in ("base", "core")]
    assert runs[1].final_stage == "big"
    core = R.compare_runs(runs)["runs"][1]
    # 4.0 at step 10 (relaxed) does not count; the big model crosses 5.0 two thirds of the way from 20 to 30
    assert core["target"]["reached"] and core["target"]["step"] == pytest.approx(20 + 10 * (1 / 1.5))


def test_missing_baseline_and_failed_run(tmp_path):
    _write_run(tmp_path / "m", [(10, 6.0, 0.2)])
    runs = [R.summarise_run("base", "b.yaml", tmp_path / "nope", status="failed (exit 1)"),
            R.summarise_run("m", "m.yaml", tmp_path / "m")]
    rep = R.compare_runs(runs)
    assert rep["target_heldout_loss"] is None
    assert rep["runs"][1]["target"]["reached"] is None
    paths = R.write_report(rep, tmp_path / "out")
    assert "failed (exit 1)" in paths["md"].read_text()


def test_report_files_contain_every_method(tmp_path):
    _write_run(tmp_path / "baseline", [(10, 7.0, 0.1), (20, 5.0, 0.3)])
    _write_run(tmp_path / "stacking", [(10, 6.0, 0.2), (20, 4.5, 0.35)], stages=lambda s: "small" if s <= 10 else "big")
    _write_run(tmp_path / "worse", [(10, 8.0, 0.05), (20, 7.5, 0.1)])
    runs = [R.summarise_run(n, f"{n}.yaml", tmp_path / n) for n in ("baseline", "stacking", "worse")]
    rep = R.compare_runs(runs)
    paths = R.write_report(rep, tmp_path / "out", preamble="Command: `x`")
    data = json.loads(paths["json"].read_text())
    assert [r["name"] for r in data["runs"]] == ["baseline", "stacking", "worse"]
    md = paths["md"].read_text()
    for name in ("baseline (baseline)", "| stacking |", "| worse |", R.NOT_REACHED, "Stages:"):
        assert name in md
    for key in ("png", "png_flops"):
        png = paths[key].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_names_the_unigram_reference_and_each_run_s_distance_below_it(tmp_path):
    _write_run(tmp_path / "baseline", [(10, 7.0, 0.1), (20, 6.5, 0.3)])
    _write_run(tmp_path / "other", [(10, 6.0, 0.2), (20, 5.75, 0.35)])
    for name in ("baseline", "other"):  # eval lines as the runner writes them
        path = tmp_path / name / "metrics.jsonl"
        lines = [json.loads(x) for x in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({**r, "heldout_unigram_loss": 7.25} if r["kind"] == "eval" else r) + "\n"
                                for r in lines))
    rep = R.compare_runs([R.summarise_run(n, f"{n}.yaml", tmp_path / n) for n in ("baseline", "other")])
    assert R.unigram_reference(rep) == 7.25
    md = R.write_report(rep, tmp_path / "out")["md"].read_text()
    assert "nats below unigram" in md and "= 7.2500" in md
    assert "| baseline (baseline) | ok | 6.5000 | 0.7500 |" in md and "| other | ok | 5.7500 | 1.5000 |" in md


def test_torn_and_duplicate_metrics_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "eval", "step": 2, "heldout_loss": 5.0}\n{"kind": "eval", "step": 2, "heldout_loss": 4.0}\n'
                    '{"kind": "train", "step": 3, "tok')
    train, evals = R.split_records(R.read_jsonl(path))
    assert train == [] and [e["heldout_loss"] for e in evals] == [4.0]


def test_run_names():
    assert run_names(["a/baseline.yaml", "a/stacking.yaml"]) == ["baseline", "stacking"]
    assert run_names(["x/tiny.yaml", "y/tiny.yaml"]) == ["x-tiny", "y-tiny"]
    assert run_names(["x/tiny.yaml", "x/tiny.yaml"]) == ["x-tiny", "x-tiny-1"]


def test_planned_steps_counts_token_budget_stages(tmp_path):
    from training.bench.compare import planned_steps
    from training.stages.plan import load_config

    data = tmp_path / "data"
    data.mkdir()
    (data / "stats.json").write_text(json.dumps({"seq_len": 64}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": {"dir": str(data)}, "train": {"micro_batch_size": 4, "grad_accum": 2},
        "stages": [{"name": "a", "steps": 5, "seq_len": 32}, {"name": "b", "tokens": 1000, "hook": "grow_seq",
                                                                "seq_len": 64}]}))
    # stage b: ceil(1000 / (8 sequences x 64 tokens)) = 2 steps
    assert planned_steps(load_config(cfg)) == 7


def test_shipped_bench_configs_load():
    from training.stages.plan import load_config

    configs = sorted((REPO / "configs" / "bench").glob("*/*.yaml"))
    assert any(c.name == "baseline.yaml" for c in configs)
    for c in configs:
        cfg = load_config(c)
        assert cfg.run.eval_every > 0
    # what configs/bench/README.md promises: per folder, the same final model, batch and eval cadence, and
    # every method's step budget 1.5x the baseline's
    for folder in {c.parent for c in configs}:
        base = load_config(folder / "baseline.yaml")
        base_steps = sum(s.steps for s in base.stages)
        for c in sorted(folder.glob("*.yaml")):
            if c.name == "baseline.yaml":
                continue
            cfg = load_config(c)
            same = ("hidden_size", "num_layers", "num_heads", "ffn_size", "vocab_size")
            assert {k: getattr(cfg.model, k) for k in same} == {k: getattr(base.model, k) for k in same}, c
            assert (cfg.train.micro_batch_size, cfg.run.eval_every) == (base.train.micro_batch_size, base.run.eval_every)
            steps = sum(s.steps for s in cfg.stages)
            if c.name.startswith("baseline_"):  # controls: the baseline again, with another seed or the methods' budget
                assert cfg.stages[0].model == {} and len(cfg.stages) == 1, c
                assert (cfg.optimizer, cfg.train.locality_bias) == (base.optimizer, base.train.locality_bias), c
                assert (steps, cfg.run.seed) in ((base_steps, cfg.run.seed), (base_steps * 3 // 2, base.run.seed)), c
                assert steps != base_steps or cfg.run.seed != base.run.seed, c
            else:
                assert steps == base_steps * 3 // 2, c


# ------------------------------------------------------------------------------------------ end to end


def test_compare_status_names_the_stop():
    from training.bench.compare import _status

    assert _status("m", 0, None) == "ok"
    assert _status("m", 75, 40) == "stopped at target (step 40)"
    assert _status("m", 0, 40) == "stopped at target (step 40)"  # it ended on its own before the signal
    assert _status("m", -15, 40) == "stopped at target (step 40), exit -15 after the signal"  # e.g. via torchrun
    assert _status("m", 75, None).startswith("failed (exit 75")
    assert _status("m", 0, None, 40) == "ok (paused at target, step 40)"


def test_plateau_report_finds_where_each_run_leaves_the_unigram_level(tmp_path):
    from training.bench import plateau

    assert plateau.crossing([(100, 1, -0.1), (200, 2, 0.1), (300, 3, 0.4)], 0.25) == pytest.approx((250, 2.5))
    assert plateau.crossing([(100, 1, 0.6)], 0.5) == (100, 1)
    assert plateau.crossing([(100, 1, 0.2), (200, 2, 0.1)], 0.25) is None
    for name, gaps in (("flat", [-0.1, -0.05, 0.0]), ("leaves", [0.0, 0.3, 1.2])):
        d = tmp_path / name
        d.mkdir()
        d.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"kind": "eval", "step": 10 * (i + 1), "tokens": 1000 * (i + 1), "wall_s": 5.0 * (i + 1),
                        "heldout_loss": 7.0 - g, "heldout_acc": 0.1, "heldout_unigram_loss": 7.0,
                        "heldout_below_unigram": g}) + "\n" for i, g in enumerate(gaps)))
    args = argparse.Namespace(runs=[str(tmp_path / "flat"), str(tmp_path / "leaves")], out=str(tmp_path / "out"),
                              names=None, note=["made by a test"])
    paths = plateau.run(args)
    rows = json.loads(paths["json"].read_text())["runs"]
    assert rows[0]["tokens_to_0.25"] is None and rows[0]["final_below_unigram"] == 0.0
    assert rows[1]["tokens_to_0.25"] == pytest.approx(1000 + 1000 * 0.25 / 0.3)
    assert rows[1]["tokens_to_1"] == pytest.approx(2000 + 1000 * 0.7 / 0.9)
    md = paths["md"].read_text()
    assert "| leaves | 0.00 M |" in md and "made by a test" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "old"
    empty.mkdir()
    empty.joinpath("metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 1, "heldout_loss": 7.0}) + "\n")
    with pytest.raises(UserError, match="no eval record with heldout_below_unigram"):
        plateau.run(argparse.Namespace(runs=[str(empty)], out=str(tmp_path / "o2"), names=None, note=[]))


def test_ours_fused_asks_for_every_kernel_the_model_can_use_and_says_which_did_not_run(tmp_path, tiny_data,
                                                                                      fresh_fused_ops, monkeypatch):
    import torch

    # Plain CPU tensors, whatever kernel test module set TRITON_INTERPRET at collection (as test_unpad does).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    from tests.helpers.tiny_run import tiny_config
    from training.bench.throughput import kernel_caveats, variant_config
    from training.model.bert import BertForPreTraining

    post = tiny_config(tmp_path / "post", tiny_data).model
    fused_cfg, update = variant_config("ours_fused", post)
    assert (fused_cfg.attention, fused_cfg.fused_ops) == ("fused", ["bias_gelu", "residual_layernorm", "mlm_loss"])
    assert update["attention"] == "fused" and fused_cfg.hidden_size == post.hidden_size
    pre = tiny_config(tmp_path / "pre", tiny_data, ["model.norm=pre"]).model
    assert variant_config("ours_fused", pre)[0].fused_ops == ["bias_gelu", "mlm_loss"]  # LN kernel is post-LN only
    assert variant_config("ours_padded", post)[0].unpad is False and variant_config("ours", post)[0] == post

    assert kernel_caveats("ours_fused", fresh_fused_ops.ALL_OPS) == []
    model = BertForPreTraining(fused_cfg)  # plain CPU, no interpreter: every kernel falls back
    ids = torch.randint(5, fused_cfg.vocab_size, (2, 16))
    labels = torch.full((2, 16), -100)
    labels[:, 3] = 7
    model(ids, torch.ones_like(ids), labels=labels)["loss"].backward()
    lines = kernel_caveats("ours_fused", fresh_fused_ops.ALL_OPS)
    assert {line.split(" kernel")[0] for line in lines} == {
        "ours_fused: the attention", "ours_fused: the bias_gelu", "ours_fused: the residual_layernorm",
        "ours_fused: the mlm_loss"}
    assert all("CPU tensors need the triton interpreter" in line for line in lines)
