"""Build a StageRunner in-process on the tiny dataset (tests only)."""
from __future__ import annotations

from pathlib import Path

import torch

from training.stages.plan import load_config
from training.stages.runner import StageRunner

TINY_MODEL = {"vocab_size": 512, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "ffn_size": 64,
              "max_position": 64, "dropout": 0.0, "attention_dropout": 0.0}


def tiny_config(tmp_path: Path, data_dir: Path, overrides: list[str] = (), yaml_text: str = "") -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text or "train: {max_steps: 4}\n")
    base = [f"run.out_dir={tmp_path / 'out'}", f"data.dir={data_dir}", "run.progress=false", "run.peak_tflops=1.0",
            "run.log_every=1", "run.eval_batches=1", "run.eval_batch_size=8", "run.export_hf=false",
            "train.precision=fp32", "train.micro_batch_size=4", "optimizer.warmup_steps=1"]
    base += [f"model.{k}={v}" for k, v in TINY_MODEL.items() if f"model.{k}" not in yaml_text]
    return load_config(path, base + list(overrides))


def make_runner(cfg, seed: int = 0, device: str = "cpu") -> StageRunner:
    from training.data.loader import PretrainingData
    from training.model.bert import BertForPreTraining

    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = PretrainingData(cfg.data.dir)
    runner = StageRunner(cfg, data, out, rank=0, world_size=1, device=torch.device(device), peak_tflops=1.0)
    torch.manual_seed(seed)
    runner.set_model(BertForPreTraining(cfg.stage_model(0)), cfg.stage_model(0))
    return runner
