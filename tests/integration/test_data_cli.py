"""`python -m training.data prepare` as a command (a fresh process): bad input is one `error:` line and exit 2,
a Hugging Face dataset name that cannot be resolved offline among it."""
from __future__ import annotations

import os
import subprocess
import sys


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
