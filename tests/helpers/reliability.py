"""Shared pieces of the reliability tests (no tests here): a tiny prepared corpus, run configs, CLI runners.

The corpus is built once per pytest session (under the session's base temp dir) and reused by every
module; configs are written per test.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
import yaml

from tests.helpers import paths as PATHS
from tests.helpers.corpus import real_text_lines

REPO = PATHS.REPO

# A fast fp32 run with dropout on (so the RNG state matters), a checkpoint every 2 steps.
BASE_CONFIG = {
    "run": {"name": "rel", "log_every": 1, "eval_every": 1000, "eval_batches": 1, "eval_batch_size": 8,
            "save_every": 2, "keep_last": 3, "export_hf": False, "peak_tflops": 1.0, "progress": False,
            "seed": 7, "report_to": []},
    "model": {"vocab_size": 256, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_size": 64,
              "max_position": 32, "dropout": 0.1, "attention_dropout": 0.1},
    "train": {"precision": "fp32", "micro_batch_size": 4, "grad_accum": 2, "max_steps": 12},
    "optimizer": {"lr": 1.0e-3, "warmup_steps": 3},
}

# Configs the resume/pre-emption tests run: (id, overrides of BASE_CONFIG). Multi-stage configs (growth
# hooks, per-stage seq_len) go here as they land, e.g. ("two-stage", {"stages": [...]}).
RESUME_CONFIGS: list[tuple[str, dict]] = [
    ("fp32-accum2", {}),
    ("adamw-accum1", {"train": {"grad_accum": 1}, "optimizer": {"name": "adamw"}}),
    # Two stages across a growth transition (1 -> 2 layers, optimizer state carried by name); the kill may
    # land before, at or after the boundary (step 5).
    ("stack-2stage", {"stages": [{"name": "l1", "steps": 5, "model": {"num_layers": 1}},
                                 {"name": "l2", "steps": 7, "hook": "stack", "warmup_steps": 1,
                                  "optimizer_state": "carry"}]}),
]


def _merge(base: dict, over: dict) -> dict:
    out = json.loads(json.dumps(base))
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def corpus_lines(n: int = 250) -> list[str]:
    """About 110 kB of real prose (tests/helpers/corpus.py)."""
    return real_text_lines(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared data dir (seq_len 32, vocab 256), built once per session."""
    root = tmp_path_factory.getbasetemp() / "reliability-tiny-data"
    data = root / "data"
    if not (data / "stats.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        text = root / "corpus.txt"
        text.write_text("\n".join(corpus_lines()) + "\n")
        from training.data.__main__ import main as data_main

        rc = data_main(["prepare", "--input", str(text), "--out", str(data), "--seq-len", "32",
                        "--tokenizer", "train:256", "--num-proc", "1", "--heldout-fraction", "0.05"])
        assert rc == 0
    return data


def write_config(path: Path, data_dir: Path, out_dir: Path, overrides: Optional[dict] = None) -> Path:
    cfg = _merge(BASE_CONFIG, overrides or {})
    cfg["data"] = {**cfg.get("data", {}), "dir": str(data_dir)}
    cfg["run"]["out_dir"] = str(out_dir)
    path.write_text(yaml.safe_dump(cfg))
    return path


def env(**extra: str) -> dict:
    # The repository first, then whatever the parent imports from (a GPU machine's wheels in /tmp/site, say).
    path = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    e = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", PYTHONPATH=path)
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "CROSS_RANK", "CROSS_SIZE")
    for k in [k for k in e if k.startswith(("DSBERT_FAULT_", "SLURM_", "OMPI_", "PMI")) or k in launcher_vars]:
        del e[k]
    e.update(extra)
    return e


def pretrain_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "training.pretrain", "--config", str(config), *args]


def run_pretrain(config: Path, *args: str, timeout: float = 120, **env_extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(pretrain_cmd(config, *args), cwd=REPO, env=env(**env_extra), capture_output=True,
                          text=True, timeout=timeout)


def metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def last_train_step(out_dir: Path) -> int:
    return max((r["step"] for r in metrics(out_dir) if r.get("kind") == "train"), default=0)


def start_and_signal(config: Path, at_step: int, sig: int, *args: str, timeout: float = 120,
                     **env_extra: str) -> tuple[str, int, str]:
    """Start a run, send `sig` once metrics.jsonl shows `at_step`; returns (stdout, exit code, stderr)."""
    out = Path(yaml.safe_load(config.read_text())["run"]["out_dir"])
    logs = config.parent / f"{config.stem}.{int(time.time() * 1000)}"
    # Files, not pipes: a chatty child must never block on a full pipe while we poll.
    with open(f"{logs}.stdout", "w") as so, open(f"{logs}.stderr", "w") as se:
        proc = subprocess.Popen(pretrain_cmd(config, *args), cwd=REPO, env=env(**env_extra), stdout=so, stderr=se,
                                text=True)
    deadline = time.monotonic() + timeout
    try:
        while last_train_step(out) < at_step:
            if proc.poll() is not None:
                raise AssertionError(f"run ended (rc {proc.returncode}) before step {at_step}:\n"
                                     f"{Path(f'{logs}.stderr').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"run did not reach step {at_step} in {timeout} s")
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out_text, err = Path(f"{logs}.stdout").read_text(), Path(f"{logs}.stderr").read_text()
    return out_text, proc.returncode, err


def model_state(tag_dir: Path) -> dict:
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state


def assert_bit_identical(a_dir: Path, b_dir: Path) -> None:
    """Model parameters and optimizer state of two checkpoints are equal bit for bit."""
    a, b = model_state(a_dir), model_state(b_dir)
    assert a["module"].keys() == b["module"].keys()
    differ = [k for k in a["module"] if not torch.equal(a["module"][k], b["module"][k])]
    assert not differ, f"parameters differ: {differ[:5]}"
    oa, ob = a.get("optimizer"), b.get("optimizer")
    if oa is not None:
        sa, sb = oa["state"], ob["state"]
        assert sa.keys() == sb.keys()
        for i in sa:
            for k, v in sa[i].items():
                if torch.is_tensor(v):
                    assert torch.equal(v, sb[i][k]), f"optimizer state {i}.{k} differs"
                else:
                    assert v == sb[i][k], f"optimizer state {i}.{k} differs"


def tree_digest(path: Path) -> str:
    """Hash of every file's name, size and content under `path` (or of its absence)."""
    h = hashlib.sha256()
    if not path.exists():
        return "absent"
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


SIGKILL, SIGTERM, SIGUSR1, SIGINT = signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1, signal.SIGINT


def reference_run(tmp_path_factory, data_dir: Path, cfg_id: str, overrides: dict) -> Path:
    """The uninterrupted run of a config (cached for the session); returns its final checkpoint dir."""
    root = tmp_path_factory.getbasetemp() / f"reliability-ref-{cfg_id}"
    out = root / "out"
    total = _merge(BASE_CONFIG, overrides)["train"]["max_steps"]
    final = out / "checkpoints" / f"step{total:08d}"
    if not (final / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        config = write_config(root / "config.yaml", data_dir, out, overrides)
        proc = run_pretrain(config, "--overwrite")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return final


def hf_and_task(run_dir: Path, root: Path, lines: int = 80) -> tuple[Path, Path]:
    """(ROOT/hf: the run exported, ROOT/task.csv: a two-class task of `lines` corpus lines) for finetune tests."""
    import csv

    from training.export import main as export

    assert export(["--checkpoint", str(run_dir), "--out", str(root / "hf")]) == 0
    task = root / "task.csv"
    with open(task, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([line[:200], i % 2] for i, line in enumerate(corpus_lines(lines)))
    return root / "hf", task


def total_steps(overrides: dict) -> int:
    return _merge(BASE_CONFIG, overrides)["train"]["max_steps"]
