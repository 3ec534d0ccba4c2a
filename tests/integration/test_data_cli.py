"""`python -m training.data prepare` as a command: bad input is one `error:` line and exit 2, Hugging Face inputs
(a saved dataset directory, an unresolvable name offline)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import paths as PATHS
from tests.helpers.corpus import real_text_lines
from tests.helpers.data import write_lines

ROOT = str(PATHS.REPO)


def test_cli_exit_code_and_one_line(tmp_path):
    missing = tmp_path / "missing.txt"
    proc = subprocess.run([sys.executable, "-m", "training.data", "prepare", "--input", str(missing),
                           "--out", str(tmp_path / "o"), "--seq-len", "16", "--tokenizer", "train:100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0]


# --------------------------------------------------------------------------------- Hugging Face inputs

ROOT = str(PATHS.REPO)


@pytest.fixture
def streamed(monkeypatch):
    """Record every `datasets.load_dataset` call (the generator runs in this process with num_proc 1)."""
    import datasets

    calls = []
    real = datasets.load_dataset

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_dataset_directory_with_text_column_trains_a_tokenizer(tmp_path, streamed):
    """A directory of jsonl (field `body`) through the CLI: --text-column, train:N, --max-docs stops the stream."""
    from training.data.__main__ import main

    lines = real_text_lines(400)
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    with open(ds_dir / "part-0.jsonl", "w") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": i, "body": line}) + "\n")
    out = tmp_path / "out"
    assert main(["prepare", "--input", f"hf:{ds_dir}:train", "--text-column", "body", "--out", str(out),
                 "--seq-len", "48", "--tokenizer", "train:300", "--heldout-fraction", "0.1", "--max-docs", "250",
                 "--num-proc", "1"]) == 0
    assert streamed and all(args == (str(ds_dir),) and k["streaming"] is True and k["split"] == "train"
                            for args, k in streamed)
    stats = json.load(open(out / "stats.json"))
    assert stats["documents"]["train"] + stats["documents"]["heldout"] == 250
    assert stats["documents"]["heldout"] > 0 and stats["rows"]["heldout"] > 0
    assert stats["input_files"] == [f"hf:{ds_dir}:train"] and stats["text_column"] == "body"
    assert 200 < stats["vocab_size"] <= 300 and (out / "tokenizer" / "vocab.txt").is_file()


def test_unresolvable_name_offline_exits_2_and_writes_nothing(tmp_path):
    corpus = write_lines(tmp_path / "c.txt", real_text_lines(30))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"),
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    spec = "hf:no-such-owner/no-such-dataset-zq7/"
    proc = subprocess.run([sys.executable, "-m", "training.data", "prepare", "--input", corpus, spec,
                           "--out", str(tmp_path / "o"), "--seq-len", "16", "--tokenizer", "train:100"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-2000:]
    assert errors[0].startswith(f"error: --input {spec}: dataset 'no-such-owner/no-such-dataset-zq7'")
    assert "not found locally and the hub is offline" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.*"))
