"""Build (and rebuild, at stage boundaries) the DeepSpeed engine around a model."""
from __future__ import annotations

import logging
from pathlib import Path

import deepspeed
import torch

from training.config import RunConfig
from training.engine.ds_config import deepspeed_json
from training.engine.lamb import build_lamb, check_zero_compat, param_groups_for, prepare_for_engine
from training.errors import UserError

log = logging.getLogger(__name__)


def check_precision_supported(precision: str) -> None:
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision=fp16 needs a CUDA device (DeepSpeed's CPU accelerator has no fp16); "
                        "use bf16 or fp32")


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> tuple[torch.optim.Optimizer, str]:
    o = cfg.optimizer
    groups = param_groups_for(model, o.weight_decay, o.exclude_from_adaptation)
    if o.name == "adamw":
        # foreach AdamW: elementwise, so it is also correct on ZeRO's flat partitions.
        return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                 foreach=True), "adamw"
    optimizer, name = build_lamb(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                                 min_trust=o.min_trust, max_trust=o.max_trust, prefer_fused=o.fused)
    check_zero_compat(name, cfg.train.zero_stage)
    return optimizer, name


def build_engine(model: torch.nn.Module, cfg: RunConfig, world_size: int, out_dir: str | Path,
                 ds_config: dict | None = None):
    """deepspeed.initialize with the JSON generated from `cfg` (or `ds_config`, rendered once by the caller: it
    does not depend on the model, so every stage's engine uses the same), in the existing process group."""
    if ds_config is None:
        check_precision_supported(cfg.train.precision)
        ds_config = deepspeed_json(cfg, world_size, out_dir)
    optimizer, name = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    if name != "adamw":
        prepare_for_engine(engine, optimizer)  # per-tensor trust under ZeRO 1/2; undo DeepSpeed's init step
    return engine, ds_config


def set_lr(engine, lr: float) -> None:
    """The LR is a pure function of the global step (see schedule.py), so resume needs no scheduler state."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def compute_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
