"""The run config: one typed, validated YAML file is the single source of truth.

The DeepSpeed JSON is generated from it (see `deepspeed_json`): a template from `deepspeed_configs/` supplies
the knobs we do not model (loss-scale window, bucket sizes, ...), and every key we own (batch sizes,
precision, ZeRO stage, clipping, monitor) is filled from this file. A template that sets an owned key is an
error, so the two can never disagree.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from training.errors import UserError
from training.model.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSection(_Strict):
    name: str = "run"
    out_dir: str = "runs/default"
    seed: int = 1234
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    eval_batch_size: int = 64
    save_every: int = 500  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3
    export_hf: bool = True  # write OUT/hf at the end (when Hugging Face can represent the model)
    peak_tflops: Optional[float] = None  # for MFU; None = measured bf16/fp32 matmul peak on this device
    progress: bool = True
    eval_at_stage_end: bool = True  # a held-out point at every stage boundary (for time-to-loss curves)
    # Stop (after a checkpoint) once this global step is done, without changing the schedule: a planned
    # pause, and how tests interrupt a run to check that resume continues it exactly.
    stop_at_step: Optional[int] = None
    # Non-finite loss/gradient (see training/engine/faults.py): bf16/fp32 skip the step; after this many
    # consecutive bad steps, restore the last good checkpoint in-process or stop (exit code 3).
    max_bad_steps: int = 5
    on_nan: Literal["restore", "stop"] = "restore"

    @model_validator(mode="after")
    def _check(self):
        for name in ("log_every", "eval_every", "eval_batches", "eval_batch_size", "keep_last", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"run.{name} must be positive, got {getattr(self, name)}")
        if self.save_every < 0:
            raise ValueError(f"run.save_every must be >= 0, got {self.save_every}")
        return self


class DataSection(_Strict):
    dir: str = "data/default"  # written by `python -m training.data prepare` / `build-default`
    mlm_probability: float = 0.15
    whole_word_mask: bool = False

    @model_validator(mode="after")
    def _check(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"data.mlm_probability must be in (0, 1), got {self.mlm_probability}")
        return self


class OptimizerSection(_Strict):
    name: Literal["lamb", "adamw"] = "lamb"
    lr: float = 2e-3
    end_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: Optional[int] = None  # default: warmup_fraction of the total steps
    warmup_fraction: float = 0.06
    decay_power: float = 1.0  # polynomial decay after warmup (1.0 = linear)
    min_trust: float = 0.01  # LAMB trust-ratio clamp
    max_trust: float = 10.0
    # LAMB on CUDA: DeepSpeed's fused kernel (its bias correction is folded into the step size, so it is
    # not step-for-step equal to the pure-PyTorch LAMB used elsewhere and under ZeRO 1/2).
    fused: bool = False
    # LAMB layer adaptation: "no_decay" gives the no-decay group (biases, LayerNorm) trust ratio 1, as NVIDIA's
    # and TF's LAMB do (else a zero-initialised bias moves at ~min_trust * lr for hundreds of steps); "none"
    # adapts every tensor. Fused and pure LAMB both honour it. Ignored by adamw.
    exclude_from_adaptation: Literal["no_decay", "none"] = "no_decay"

    @model_validator(mode="after")
    def _check(self):
        if self.lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {self.lr}")
        if self.end_lr < 0 or self.end_lr > self.lr:
            raise ValueError(f"optimizer.end_lr must be in [0, lr], got {self.end_lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas must be in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"optimizer.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.min_trust <= self.max_trust:
            raise ValueError("optimizer.min_trust must be positive and <= optimizer.max_trust")
        return self


class TrainSection(_Strict):
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    micro_batch_size: int = 32  # per rank
    grad_accum: int = 1
    grad_clip: float = 1.0  # 0 disables
    zero_stage: Literal[0, 1, 2] = 0
    max_steps: Optional[int] = None  # the single stage's length when `stages` is not given

    @model_validator(mode="after")
    def _check(self):
        if self.micro_batch_size <= 0:
            raise ValueError(f"train.micro_batch_size must be positive, got {self.micro_batch_size}")
        if self.grad_accum <= 0:
            raise ValueError(f"train.grad_accum must be positive, got {self.grad_accum}")
        if self.grad_clip < 0:
            raise ValueError(f"train.grad_clip must be >= 0, got {self.grad_clip}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive, got {self.max_steps}")
        return self


class DeepSpeedSection(_Strict):
    # Template for the knobs this file does not model; default: deepspeed_configs/<precision>.json
    template: Optional[str] = None
    extra: dict[str, Any] = {}  # merged last; may not touch owned keys either
    tensorboard: bool = True
    wall_clock_breakdown: bool = False


class DistSection(_Strict):
    timeout_s: int = 1800  # process-group timeout
    # Watchdog (multi-rank runs): a rank whose heartbeat stops this long is declared dead or frozen and the
    # others exit naming it, instead of waiting timeout_s in a collective. null turns it off.
    heartbeat_timeout_s: Optional[float] = 120.0
    backend: Optional[Literal["gloo", "nccl", "ccl"]] = None  # default: nccl on CUDA, gloo on CPU


class LayerDropSection(_Strict):
    """Progressive layer dropping (Zhang & He 2020): theta(t) = (1-theta_bar) exp(-gamma t) + theta_bar."""
    theta_bar: float = 0.5
    gamma: float = 0.001


class LocalityBiasSection(_Strict):
    """A training-time attention bias toward near tokens (training/model/bert.py locality_bias), its strength
    falling linearly from `start` at the stage's first step to `end` after its last; 0 is plain attention."""
    start: float = 1.0
    end: float = 0.0

    @model_validator(mode="after")
    def _check(self):
        for name in ("start", "end"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"locality_bias.{name} must be a finite number >= 0, got {value}")
        return self


class StageSection(_Strict):
    """One stage of the run: its length, its model, and the hook that enters it.

    `model` lists only what differs from the top-level `model` (the final model), e.g. a 3-layer
    first stage of a stacking run says `model: {num_layers: 3}`.
    """
    name: str
    steps: Optional[int] = None
    tokens: Optional[int] = None  # alternative to steps: converted with the global batch at run time
    model: dict[str, Any] = {}
    seq_len: Optional[int] = None  # default: the prepared data's length
    hook: Optional[str] = None  # how this stage is entered from the previous one
    hook_args: dict[str, Any] = {}
    warmup_steps: int = 0  # LR warmup restarted at this stage's start (the first stage uses optimizer.*)
    # reset: a fresh optimizer at the boundary (what the stacking and CompoundGrow authors do); carry: moments
    # mapped by name through the hook's operator (training/stages/transfer.py).
    optimizer_state: Literal["reset", "carry"] = "reset"
    layer_drop: Optional[LayerDropSection] = None
    locality_bias: Optional[LocalityBiasSection] = None

    @model_validator(mode="after")
    def _check(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError(f"stage '{self.name}': give exactly one of steps or tokens")
        for field in ("steps", "tokens"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"stage '{self.name}': {field} must be positive, got {value}")
        if self.seq_len is not None and self.seq_len < 8:
            raise ValueError(f"stage '{self.name}': seq_len must be >= 8, got {self.seq_len}")
        if self.warmup_steps < 0:
            raise ValueError(f"stage '{self.name}': warmup_steps must be >= 0")
        return self

    def num_steps(self, tokens_per_step: int) -> int:
        """Optimizer steps of this stage; `tokens_per_step` = global batch x this stage's seq_len."""
        return self.steps if self.steps is not None else -(-self.tokens // tokens_per_step)


class RunConfig(_Strict):
    run: RunSection = RunSection()
    data: DataSection = DataSection()
    model: ModelConfig = ModelConfig()
    train: TrainSection = TrainSection()
    optimizer: OptimizerSection = OptimizerSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    dist: DistSection = DistSection()
    stages: Optional[list[StageSection]] = None

    @model_validator(mode="after")
    def _check(self):
        if self.stages is None:
            if self.train.max_steps is None:
                raise ValueError("set train.max_steps (or give a `stages` list)")
            self.stages = [StageSection(name="main", steps=self.train.max_steps)]
        elif not self.stages:
            raise ValueError("stages: the list is empty")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        self._check_stage_transitions()
        if self.optimizer.name == "lamb" and self.optimizer.fused and self.train.zero_stage > 0:
            raise ValueError(
                f"optimizer.fused=true with train.zero_stage={self.train.zero_stage}: the fused LAMB kernel cannot "
                "see per-tensor boundaries in ZeRO's flat partitions; set optimizer.fused=false")
        return self

    def stage_model(self, index: int) -> ModelConfig:
        """The model of stage `index`: the top-level model with the stage's overrides."""
        stage = self.stages[index]
        try:
            return ModelConfig.model_validate({**self.model.model_dump(), **stage.model})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            raise ValueError(f"stage '{stage.name}': model{'.' + where if where else ''}: {msg}") from None

    def _check_stage_transitions(self) -> None:
        from training.stages.hooks import get_hook  # hooks import the model package, not this module

        prev_model, prev_seq = None, None
        for i, stage in enumerate(self.stages):
            model = self.stage_model(i)
            seq = stage.seq_len
            if seq is not None and seq > model.max_position:
                raise ValueError(f"stage '{stage.name}': seq_len {seq} exceeds model.max_position "
                                 f"{model.max_position}")
            hook = get_hook(stage.hook) if stage.hook else None
            if i == 0:
                if hook is not None:
                    raise ValueError(f"stage '{stage.name}': the first stage has no previous stage to hook from")
            elif hook is None and model != prev_model:
                raise ValueError(f"stage '{stage.name}': the model shape changes but the stage names no hook")
            elif hook is not None:
                try:
                    hook.validate(prev_model, model, stage)
                except ValueError as err:
                    raise ValueError(f"stage '{stage.name}': {stage.hook}: {err}") from None
                if stage.hook == "grow_seq" and prev_seq is not None and seq <= prev_seq:
                    raise ValueError(f"stage '{stage.name}': grow_seq must lengthen sequences "
                                     f"({prev_seq} -> {seq})")
            if stage.locality_bias is not None and model.attention not in ("eager", "sdpa"):
                raise ValueError(f"stage '{stage.name}': locality_bias needs model.attention eager or sdpa, "
                                 f"not {model.attention}")
            if stage.layer_drop is not None and model.norm != "pre":
                raise ValueError(f"stage '{stage.name}': layer_drop needs model.norm: pre")
            if stage.optimizer_state == "carry" and i > 0 and self.train.zero_stage > 0:
                raise ValueError(f"stage '{stage.name}': optimizer_state carry needs train.zero_stage 0 "
                                 "(ZeRO 1/2 state lives in flat partitions); use reset")
            prev_model, prev_seq = model, seq if seq is not None else prev_seq

    def warmup_steps(self, total_steps: int) -> int:
        if self.optimizer.warmup_steps is not None:
            return self.optimizer.warmup_steps
        return int(self.optimizer.warmup_fraction * total_steps)

    def digest(self) -> str:
        """Hash of the resolved config, compared across ranks at start-up."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- loading

def _parse_value(text: str) -> Any:
    """`--set` values are YAML scalars/flow collections: 3, 1e-3, true, [1, 2], null, a string."""
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.max_steps=100")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if part.isdigit() and isinstance(node, list):
                node = node[int(part)]
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise UserError(f"--set {key}: '{part}' is not a section")
        last = parts[-1]
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = _parse_value(value)
        else:
            node[last] = _parse_value(value)
    return raw


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown config key '{where}'"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{source}: {where + ': ' if where else ''}{msg}"


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    raw: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a text file (not UTF-8); expected a YAML run config") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, list(overrides))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, source)) from None


# ----------------------------------------------------------------------------------- DeepSpeed JSON

OWNED_KEYS = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
              "gradient_clipping", "optimizer", "scheduler", "tensorboard", "steps_per_print",
              "wall_clock_breakdown")
PRECISION_BLOCKS = ("bf16", "fp16")


def _load_template(cfg: RunConfig) -> tuple[dict, str]:
    name = cfg.deepspeed.template or f"deepspeed_configs/{cfg.train.precision}.json"
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / name
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
    if cfg.deepspeed.tensorboard and out_dir is not None:
        ds["tensorboard"] = {"enabled": True, "output_path": str(Path(out_dir) / "tensorboard"),
                             "job_name": cfg.run.name}
    return ds
