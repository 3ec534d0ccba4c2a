"""Running the bench tools on a tiny config (tests/integration/test_bench_runs.py, test_unpad_runs.py)."""
import json
import os
from pathlib import Path

import yaml

from tests.helpers.paths import REPO


def bench_env():
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # The kernel test modules set TRITON_INTERPRET=1 in this process when they are collected (-m slow collects
    # them all); a bench run is a user's command and must see the CPU tensors as they are.
    env.pop("TRITON_INTERPRET", None)
    return env


def bench_config(tmp_path: Path, name: str, data: Path, **train) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    vocab = json.loads((data / "stats.json").read_text())["vocab_size"]
    cfg["data"]["dir"] = str(data)
    cfg["model"]["vocab_size"] = vocab
    cfg["run"].update(save_every=0, export_hf=False)
    cfg["train"]["max_steps"] = 12
    cfg["optimizer"].update(train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
