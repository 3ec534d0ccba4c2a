"""The one-call GPU scripts (scripts/gpu_check.sh, scripts/gpu_ttq.sh) and their shared helper, on the CPU: the
step limits and the deadline, what comes back (the device returns at most 8 files), and gpu_ttq.sh end to end at a
tiny shape."""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from tests.helpers.reliability import REPO, env


def _bash(script: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=env(**extra), capture_output=True, text=True,
                          timeout=300)


def _summary(out) -> dict:
    """{step: rc or 'skipped'} from OUT/summary.txt."""
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) > 1 and parts[1].startswith("rc="):
            rows[parts[0]] = int(parts[1][3:])
        elif line.endswith("skipped (deadline)"):
            rows[parts[0]] = "skipped"
    return rows


def test_the_scripts_parse():
    for name in ("gpu_lib.sh", "gpu_check.sh", "gpu_ttq.sh"):
        proc = subprocess.run(["bash", "-n", str(REPO / "scripts" / name)], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)


def test_a_step_is_cut_at_its_limit_and_the_deadline_skips_what_is_left(tmp_path):
    out = tmp_path / "out"
    proc = _bash("source scripts/gpu_lib.sh; step ok 10 true; step slow 1 sleep 30; echo \"rc $STEP_RC\";"
                 "step late 10 sleep 4; step next 10 true; mkdir -p $WORK/sub; echo x > $WORK/sub/a.json;"
                 "echo y > $WORK/b.json; finish b.json", OUT=str(out), DEADLINE_S="23")
    assert proc.returncode == 0, proc.stderr
    # late starts with ~22 s of the 23 left; after it, under 20 s are: next is skipped
    assert _summary(out) == {"ok": 0, "slow": 124, "late": 0, "next": "skipped"}
    assert "rc 124" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["b.json", "results.tar.gz", "summary.txt"]
    with tarfile.open(out / "results.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./logs/ok.log", "./logs/slow.log", "./sub/a.json", "./b.json"} <= names
    proc = _bash("source scripts/gpu_lib.sh; step a 10 true; step b 10 false; step c 10 true; finish",
                 OUT=str(out), ONLY="b c")
    assert proc.returncode == 0 and _summary(out) == {"b": 1, "c": 0}, proc.stdout


@pytest.mark.slow
def test_gpu_ttq_runs_end_to_end_at_a_tiny_shape(tmp_path, tiny_data):
    """TTQ_TINY=1: both runs (cut by their 3 s budget or done), the check that they share their schedule, the
    report, BLiMP of both and the report with BLiMP; five files come back. About 40 s of CPU."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    proc = _bash("bash scripts/gpu_ttq.sh", TTQ_TINY="1", TTQ_DATA=str(tiny_data), OUT=str(out), TTQ_RUNS=str(runs),
                 PY=sys.executable)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _summary(out) == {name: 0 for name in ("baseline", "stacking", "same", "report", "blimp_baseline",
                                                  "blimp_stacking", "report_blimp")}, proc.stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["loss_vs_flops.png", "loss_vs_time.png", "report.md",
                                                     "results.tar.gz", "summary.txt"]
    with tarfile.open(out / "results.tar.gz") as tar:
        files = {m.name: m for m in tar.getmembers()}
        read = lambda name: json.loads(tar.extractfile(files[name]).read())  # noqa: E731
        report, blimp = read("./report.json"), read("./blimp_stacking.json")
        configs = [read(f"./runs/{name}/config.resolved.json") for name in ("baseline", "stacking")]
    assert [r["name"] for r in report["runs"]] == ["baseline", "stacking"]
    assert all(r["curve"] and r["status"] == "ok" for r in report["runs"])
    assert report["target_heldout_loss"] == report["runs"][0]["final_loss"]
    assert any(n.startswith("stacking: BLiMP ") and "over 4 paradigms, 8 pairs" in n for n in report["notes"])
    assert blimp["device"] == "cpu" and blimp["blimp"]["paradigms"] == 4 and blimp["blimp"]["per_paradigm"] == 2
    for cfg in configs:  # the same schedule length, locality aid, budget and eval cadence
        assert (cfg["train"]["max_steps"], cfg["train"]["locality_bias"]["steps"], cfg["run"]["max_wall_s"],
                cfg["run"]["eval_every"]) == (40, 10, 3.0, 8)
    assert sum(s["steps"] for s in configs[1]["stages"]) == 40 and len(configs[1]["stages"]) == 3
    assert "# Method comparison" in (out / "report.md").read_text() and "# Method comparison" in proc.stdout


@pytest.mark.skipif(not (REPO / "data" / "default" / "raw").is_dir(), reason="needs data/default (make data)")
def test_without_gensim_the_tests_read_the_same_prose_from_data_default():
    """The GPU machine has no gensim: the fixtures' paragraphs come from data/default/raw/, and they are the same."""
    from tests.helpers import corpus

    raw = corpus.from_default_raw()
    assert len(raw) > 4000 and raw == corpus.from_gensim()
    with pytest.raises(RuntimeError, match="needs gensim"):
        corpus.from_default_raw(REPO / "nowhere.txt")
