"""`python -m training.bench compare` and `throughput` end to end on a tiny config (subprocesses)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import paths as PATHS
from tests.helpers.bench import bench_config, bench_env

REPO = PATHS.REPO


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A tiny prepared corpus (vocab 300, seq_len 64), made here so the test does not rely on repo data."""
    import random

    root = tmp_path_factory.mktemp("bench_data")
    rng = random.Random(0)
    words = ("the of and to in is was for on that with as by at from which an be this are history language "
             "computer kernel parser runtime package manual install configure library module function").split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 90))).capitalize() + "." for _ in range(500)]
    (root / "corpus.txt").write_text("\n".join(docs) + "\n")
    subprocess.run([sys.executable, "-m", "training.data", "prepare", "--input", str(root / "corpus.txt"),
                    "--out", str(root / "prep"), "--seq-len", "64", "--tokenizer", "train:300",
                    "--heldout-fraction", "0.1", "--num-proc", "1"],
                   check=True, cwd=REPO, env=bench_env(), capture_output=True, text=True)
    return root / "prep"


@pytest.mark.slow
def test_compare_end_to_end(tmp_path, tiny_data):
    base = bench_config(tmp_path, "base", tiny_data, lr=1e-3)
    fast = bench_config(tmp_path, "fast", tiny_data, lr=1e-2)
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "training.bench", "compare", "--configs", str(base), str(fast),
                           "--out", str(out), "--eval-every", "3", "--set", "run.seed=7", "--no-progress"],
                          cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert [r["name"] for r in rep["runs"]] == ["base", "fast"]
    assert all(r["status"] == "ok" for r in rep["runs"])
    for r in rep["runs"]:
        assert [c["step"] for c in r["curve"]] == [3, 6, 9, 12]
        assert r["flops_source"] == "metrics" and r["total_flops"] > 0
        assert math.isfinite(r["final_loss"]) and 0 <= r["final_acc"] <= 1
        assert math.isfinite(r["final_unigram"])  # the fixed positions' unigram loss, the same for both runs
    assert rep["runs"][0]["final_unigram"] == rep["runs"][1]["final_unigram"]
    assert rep["target_heldout_loss"] == rep["runs"][0]["final_loss"]
    assert rep["runs"][0]["target"]["reached"]
    assert "run.seed=7" in rep["common_sets"] and "run.eval_every=3" in rep["common_sets"]
    md = (out / "report.md").read_text()
    assert "| base (baseline) |" in md and "| fast |" in md
    assert (out / "loss_vs_time.png").stat().st_size > 5000
    assert (out / "logs" / "fast.log").is_file()
    assert (out / "runs" / "fast" / "metrics.jsonl").is_file()
    # rebuild the report without training
    again = subprocess.run([sys.executable, "-m", "training.bench", "compare", "--configs", str(base), str(fast),
                            "--out", str(out), "--report-only"], cwd=REPO, env=bench_env(), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["target_heldout_loss"] == rep["target_heldout_loss"]


@pytest.mark.slow
def test_compare_stop_at_target_ends_a_method_at_the_baseline_loss(tmp_path, tiny_data):
    base = bench_config(tmp_path, "base", tiny_data, lr=1e-3)
    long = bench_config(tmp_path, "long", tiny_data, lr=1e-2)
    cfg = yaml.safe_load(long.read_text())
    cfg["train"]["max_steps"] = 3000  # minutes if it were not stopped; the test's timeout catches that
    long.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, "-m", "training.bench", "compare", "--configs", str(base), str(long),
                           "--out", str(out), "--eval-every", "3", "--stop-at-target", "--no-progress"],
                          cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    base_run, long_run = rep["runs"]
    assert base_run["status"] == "ok" and base_run["final_step"] == 12
    assert long_run["status"].startswith("stopped at target (step ")
    stopped_at = int(long_run["status"].split("step ")[1].rstrip(")"))
    # it ran on past the crossing for at most the few steps between the eval and the SIGTERM
    assert long_run["target"]["reached"] and long_run["target"]["step"] <= stopped_at < 3000
    assert long_run["final_step"] < 3000
    assert any("--stop-at-target" in n for n in rep["notes"])
    assert (out / "runs" / "long" / "checkpoints").is_dir()  # SIGTERM: it checkpointed on the way out


@pytest.mark.slow
def test_compare_pause_at_target_scores_blimp_there_and_at_the_end(tmp_path, tiny_data):
    """--pause-at-target: the method is checkpointed at its target crossing, BLiMP is scored there, and it is
    resumed to the end of its budget (bit-identical continuation: tests/integration/test_resume.py); BLiMP at every kept
    checkpoint (--blimp-every) with the count models beside it, in the report and its plot."""
    base = bench_config(tmp_path, "base", tiny_data, lr=1e-3)
    fast = bench_config(tmp_path, "fast", tiny_data, lr=1e-2)
    cfg = yaml.safe_load(fast.read_text())
    # Long enough that compare's twice-a-second poll sees the crossing while the run is still going, whatever
    # the load (30 steps of this model can pass between two polls).
    cfg["train"]["max_steps"] = 90
    fast.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "cmp"
    blimp = REPO / "tests" / "data" / "blimp"
    proc = subprocess.run([sys.executable, "-m", "training.bench", "compare", "--configs", str(base), str(fast),
                           "--out", str(out), "--eval-every", "3", "--pause-at-target", "--control", "base",
                           "--blimp", str(blimp), "--blimp-per-paradigm", "2", "--blimp-every", "30",
                           "--no-progress"], cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    base_run, fast_run = rep["runs"]
    assert fast_run["status"].startswith("ok (paused at target, step ")
    paused = int(fast_run["status"].split("step ")[1].rstrip(")"))
    assert fast_run["target"]["reached"] and fast_run["target"]["step"] <= paused < 90
    assert fast_run["final_step"] == 90  # resumed to the end of its budget
    steps = [c["step"] for c in fast_run["curve"]]
    assert steps == sorted(set(steps)) and steps[-1] == 90
    points = json.loads((out / "blimp" / "fast.json").read_text())
    labelled = [p for p in points["points"] if p["label"] == "target"]
    at = json.loads((out / "logs" / "fast.json").read_text())["target_checkpoint_step"]
    # The checkpoint the signal wrote: at the crossing's eval or the steps the run took before the signal arrived.
    assert len(labelled) == 1 and labelled[0]["step"] == at and paused <= at < 90
    assert [p["step"] for p in points["points"]] == sorted({30, 60, 90, at})
    assert all(0 <= p["mean"] <= 1 and p["tokens"] > 0 for p in points["points"])
    assert 0 <= points["count_models"]["unigram"] <= 1 and 0 <= points["count_models"]["bigram"] <= 1
    assert points["per_paradigm"] == 2 and points["source"] == str(blimp)
    assert all(p["flops"] > 0 for p in fast_run["blimp"]["points"])
    md = (out / "report.md").read_text()
    assert "BLiMP at target | BLiMP at end |" in md and "bigram" in md
    assert (out / "blimp_vs_flops.png").stat().st_size > 5000
    # The report again, without training or scoring: every point is cached.
    again = subprocess.run([sys.executable, "-m", "training.bench", "compare", "--configs", str(base), str(fast),
                            "--out", str(out), "--report-only", "--blimp", str(blimp), "--blimp-per-paradigm", "2",
                            "--control", "base"], cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "blimp" / "fast.json").read_text()) == points


def test_compare_only_with_an_unknown_name_fails_before_touching_out(tmp_path):
    from training.bench.__main__ import main

    cfg = REPO / "configs" / "bench" / "small" / "baseline.yaml"
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--out", str(tmp_path / "cmp"), "--configs", str(cfg), "--only", "zzz"])
    assert exit_.value.code == 2
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_throughput_end_to_end(tmp_path, tiny_data):
    cfg = bench_config(tmp_path, "tp", tiny_data, lr=1e-3)
    out = tmp_path / "tp"
    proc = subprocess.run([sys.executable, "-m", "training.bench", "throughput", "--config", str(cfg), "--out",
                           str(out), "--steps", "2", "--warmup", "1", "--repeats", "2", "--profile", "2",
                           "--models", "ours", "ours_fused", "hf"],
                          cwd=REPO, env=bench_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "throughput.json").read_text())
    assert set(res["models"]) == {"ours", "ours_fused", "hf"}
    assert "attention=fused" in res["models"]["ours_fused"]["label"]
    # No GPU here: the kernels fell back to PyTorch, and the output says so rather than passing it off as theirs.
    assert any(c.startswith("ours_fused: the attention kernel did not run (CPU tensors") for c in res["caveats"])
    assert "fused/ours" in proc.stdout and "caveat: ours_fused: the mlm_loss kernel did not run" in proc.stdout
    for name in ("ours", "ours_fused", "hf"):  # --profile: the operators by self time
        text = (out / f"profile-{name}.txt").read_text()
        assert res["profiles"][name] == str(out / f"profile-{name}.txt") and "aten::" in text and "Self CPU" in text
    for m in res["models"].values():
        assert m["tokens_per_s"] > 0 and m["samples_per_s"] > 0
        assert m["forward_s"] > 0 and m["backward_s"] > 0 and m["optimizer_s"] > 0
        assert m["peak_memory_bytes"] > 0 and m["mfu"] > 0
        assert len(m["blocks"]) == 2 and all(b["steps"] == 2 for b in m["blocks"])
    assert res["peak_source"] == "config run.peak_tflops"  # tiny.yaml sets it
    assert res["ratio_ours_over_hf"]["tokens_per_s"] > 0
    assert "ours/HF" in proc.stdout


def test_stop_at_target_never_reads_the_metrics_an_earlier_run_left(tmp_path):
    """Re-running a method over its old run dir (--overwrite): the old metrics.jsonl, below the target, is still
    there while the child starts; it must not stop the new run (it did, in half a second, before this test)."""
    import subprocess
    import sys

    from training.bench.compare import _file_id, _follow

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"kind": "train", "step": 10, "stage": "main", "loss": 1.0, "tokens": 10}) + "\n"
                       + json.dumps({"kind": "eval", "step": 10, "stage": "main", "heldout_loss": 1.0}) + "\n")
    stale = _file_id(metrics)

    def follow(stale):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
        stopped = _follow(proc, metrics, "m", 100, 0, progress=False, stop_below=5.0, poll_s=0.05, stale=stale)
        proc.wait()
        return stopped

    assert follow(stale) is None  # the old file is not this run's
    assert follow(None) == 10  # the same file, as the run's own, stops it

    def follow_total(total):
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.0)"])
        stopped = _follow(proc, metrics, "m", total, 0, progress=False, stop_below=5.0, poll_s=0.05)
        assert proc.wait() == 0  # never signalled
        return stopped

    assert follow_total(10) is None  # a crossing at the run's last step is its end, not a stop


def test_throughput_stage_trains_as_the_runner_does(tmp_path, tiny_data):
    """--stage NAME measures the stage as the runner trains it: MSLT's frozen lower layers (fewer FLOPs) and
    layer drop's keep probabilities from the stage's first global step, with the runner's per-step seeds."""
    import torch

    from tests.helpers.tiny_run import tiny_config
    from training.bench.throughput import select_stage, stage_training
    from training.model.bert import BertForPreTraining
    from training.model.flops import flops_per_token
    from training.stages import layerdrop

    cfg = tiny_config(tmp_path / "m", tiny_data, yaml_text=(
        "stages:\n  - {name: L1, steps: 3, model: {num_layers: 1}}\n"
        "  - {name: L2, steps: 3, model: {num_layers: 2}, hook: mslt, hook_args: {train_top: 1}}\n"))
    name, model_cfg, seq_len, index = select_stage(cfg, "L2", 32)
    assert (name, index, model_cfg.num_layers) == ("L2", 1, 2)
    model = BertForPreTraining(model_cfg)
    kwargs, trainable, keep = stage_training(cfg, index, model, 32)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(".layer.0." in n for n in frozen) and not any(".layer.1." in n for n in frozen)
    assert kwargs(0) == {} and keep is None
    assert flops_per_token(model_cfg, seq_len, trainable=trainable) < flops_per_token(model_cfg, seq_len)

    cfg = tiny_config(tmp_path / "d", tiny_data, ["model.norm=pre"], yaml_text=(
        "stages:\n  - {name: warm, steps: 4}\n  - {name: drop, steps: 4, layer_drop: {theta_bar: 0.5, gamma: 0.1}}\n"))
    name, model_cfg, seq_len, index = select_stage(cfg, "drop", 32)
    kwargs, trainable, keep = stage_training(cfg, index, BertForPreTraining(model_cfg), 32)
    want = layerdrop.forward_kwargs(cfg.stages[1].layer_drop, 4 + 2, model_cfg.num_layers, cfg.run.seed)
    got = kwargs(2)  # the stage starts at global step 4
    assert got["layer_keep_prob"] == want["layer_keep_prob"] and keep == kwargs(0)["layer_keep_prob"]
    assert torch.equal(torch.rand(3, generator=got["layer_drop_generator"]),
                       torch.rand(3, generator=want["layer_drop_generator"]))
