"""DeepSpeed checkpoints plus what DeepSpeed does not keep: the train position and per-rank RNG state.

Layout: OUT/checkpoints/<tag>/ holds DeepSpeed's files, `meta.json` (model shape, train position; written
by rank 0) and `rng_rank<r>.pt` (each rank's RNG). `OUT/checkpoints/latest` names the newest tag (written
by DeepSpeed after the save completes).
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from training.errors import UserError
from training.model.config import ModelConfig

# Fields of the model config that decide tensor shapes: a checkpoint is only loadable if these agree.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_position",
                "type_vocab_size", "norm", "nsp", "heads_per_layer", "ffn_per_layer", "ffn_rank")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done, over the whole run
    stage_index: int = 0
    stage_step: int = 0  # optimizer steps done inside the current stage
    tokens: int = 0  # tokens seen, all ranks
    wall_s: float = 0.0  # training wall time before this process (for resumed runs)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def tag_for(state: TrainState) -> str:
    return f"step{state.step:08d}"


def save(engine, ckpt_dir: Path, state: TrainState, model_cfg: ModelConfig, keep_last: int) -> Path:
    tag = tag_for(state)
    tag_dir = ckpt_dir / tag
    if _rank() == 0:
        tag_dir.mkdir(parents=True, exist_ok=True)
        meta = {"train_state": asdict(state), "model": model_cfg.model_dump(mode="json")}
        (tag_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    _barrier()
    torch.save(rng_state(), tag_dir / f"rng_rank{_rank()}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"train_state": asdict(state)})
    _barrier()
    if _rank() == 0:
        _prune(ckpt_dir, keep_last)
    return tag_dir


def _prune(ckpt_dir: Path, keep_last: int) -> None:
    tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
    for old in tags[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return None
    return latest.read_text().strip() or None


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    path = ckpt_dir / tag / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{ckpt_dir / tag}: not a checkpoint of this trainer (no meta.json)") from None
    except json.JSONDecodeError:
        raise UserError(f"{path}: truncated or corrupt") from None


def check_compatible(meta: dict, model_cfg: ModelConfig, where: Path) -> None:
    saved = meta.get("model", {})
    current = model_cfg.model_dump(mode="json")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
             for k in SHAPE_FIELDS if saved.get(k) != current.get(k)]
    if diffs:
        raise UserError(f"{where} holds a different model ({'; '.join(diffs[:3])})")


def load(engine, ckpt_dir: Path, tag: str) -> TrainState:
    load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise UserError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    rng_file = ckpt_dir / tag / f"rng_rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(**client_state["train_state"])
