"""The DeepSpeed JSON, generated from the run config: a template from `deepspeed_configs/` supplies the knobs we do
not model (loss-scale window, bucket sizes, ...), and every key we own (batch sizes, precision, ZeRO stage,
clipping, monitor) is filled from the config. A template that sets an owned key is an error, so the two can
never disagree. It depends on the config and world size, not on the model: a run renders it once
(StageRunner.ds_config) and every stage's engine uses it."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

from training.config import RunConfig
from training.errors import UserError
from training.resources import find_shipped


OWNED_KEYS = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler", "tensorboard", "wandb", "csv_monitor", "comet",
              "steps_per_print", "wall_clock_breakdown")
# run.report_to -> (DeepSpeed monitor block, the package it imports, what pip installs)
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard", "tensorboard"), "wandb": ("wandb", "wandb", "wandb"),
           "csv": ("csv_monitor", None, None), "comet": ("comet", "comet_ml", "comet_ml")}
PRECISION_BLOCKS = ("bf16", "fp16")


def _load_template(cfg: RunConfig) -> tuple[dict, str]:
    name = cfg.deepspeed.template or f"deepspeed_configs/{cfg.train.precision}.json"
    path = Path(name)
    if not path.exists():  # a relative path not found here: the shipped templates (training/resources.py)
        path = find_shipped(path, "deepspeed_configs") or path
    if not path.is_file():
        raise UserError(f"deepspeed.template: file not found: {name}")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise UserError(f"deepspeed.template {name}: not valid JSON ({err})") from None


def deepspeed_json(cfg: RunConfig, world_size: int, out_dir: str | Path | None = None) -> dict:
    template, template_path = _load_template(cfg)
    for source, mapping in ((template_path, template), ("deepspeed.extra", cfg.deepspeed.extra)):
        clash = sorted(set(mapping) & set(OWNED_KEYS))
        clash += [f"{k}.enabled" for k in PRECISION_BLOCKS if "enabled" in mapping.get(k, {})]
        clash += ["zero_optimization.stage"] if "stage" in mapping.get("zero_optimization", {}) else []
        if clash:
            raise UserError(f"{source} sets {clash}, which the run config owns; set them in the YAML instead")
    ds = copy.deepcopy(template)
    ds.update(copy.deepcopy(cfg.deepspeed.extra))
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["train_batch_size"] = t.micro_batch_size * t.grad_accum * world_size
    ds["gradient_clipping"] = t.grad_clip
    # The template may tune a precision block (fp16 loss-scale knobs); which one is on is ours to say.
    for key in PRECISION_BLOCKS:
        block = ds.pop(key, {})
        if key == t.precision:
            ds[key] = {**block, "enabled": True}
    zero = dict(ds.get("zero_optimization", {}))
    zero["stage"] = t.zero_stage
    ds["zero_optimization"] = zero
    if t.zero_stage > 0:
        ds["zero_allow_untested_optimizer"] = True  # our client optimizer is elementwise-safe (AdamW)
    ds["steps_per_print"] = 10**9  # progress is ours (tqdm + metrics.jsonl)
    ds["wall_clock_breakdown"] = cfg.deepspeed.wall_clock_breakdown
    # No monitor block: each engine would open its own writers, and a stage boundary rebuilds the engine, so
    # DeepSpeed's Train/Samples/* curves would restart there in a new events file. The run keeps one monitor
    # instead (monitor_blocks, training/metrics.py), written by global step.
    return ds


def check_report_to(cfg: RunConfig) -> None:
    """Every logger of run.report_to can be imported: checked before the run dir is created, so a missing
    package is one line, not a failure after the run has started (which would leave a run dir behind)."""
    import importlib.util

    for name in cfg.run.report_to:
        _, module, pip = LOGGERS[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise UserError(f"run.report_to: {name} needs the {module} package, which is not installed here "
                            f"(pip install {pip}, or drop {name} from run.report_to)")


def monitor_blocks(cfg: RunConfig, out_dir: str | Path) -> dict:
    """The DeepSpeed monitor config (deepspeed.monitor.config.get_monitor_config reads it) of run.report_to:
    TensorBoard and CSV under OUT/<logger>/<OUT's name>, W&B and Comet as projects named run.name with the run
    dir's name. W&B and Comet log offline by default (set WANDB_MODE=online, or COMET_API_KEY, to send)."""
    out = Path(out_dir)
    blocks = {}
    for name in cfg.run.report_to:
        key = LOGGERS[name][0]
        if name in ("tensorboard", "csv"):
            blocks[key] = {"enabled": True, "output_path": str(out / name), "job_name": out.name}
        elif name == "wandb":
            blocks[key] = {"enabled": True, "project": cfg.run.name}
        else:
            blocks[key] = {"enabled": True, "project": cfg.run.name, "experiment_name": out.name,
                           "online": bool(os.environ.get("COMET_API_KEY"))}
    return blocks
