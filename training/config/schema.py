"""The run config's schema: every section, typed and validated (pydantic), frozen once loaded."""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from training.model.config import (ModelConfig, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, domain,
                                   shown)


class _Strict(BaseModel):
    # Frozen: a loaded config is resolved once (stages/plan.load_config: the HF shape, hook_args defaults, the
    # default stage) and then never changes; derive a changed one with model_copy(update=...).
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunSection(_Strict):
    name: str = "run"
    out_dir: str = "runs/default"
    seed: domain(int, ge=0, lt=2**32) = 1234  # the range every RNG we seed (torch, numpy, random) takes
    log_every: PositiveInt = 10
    eval_every: PositiveInt = 200
    eval_batches: PositiveInt = 20
    eval_batch_size: PositiveInt = 64
    save_every: NonNegativeInt = 500  # steps between checkpoints; 0 = only at the end
    keep_last: PositiveInt = 3
    export_hf: bool = True  # write OUT/hf at the end (when Hugging Face can represent the model)
    peak_tflops: Optional[PositiveFloat] = None  # for MFU; None = measured bf16/fp32 matmul peak on this device
    progress: bool = True
    eval_at_stage_end: bool = True  # a held-out point at every stage boundary (for time-to-loss curves)
    # Stop (after a checkpoint) once this global step is done, without changing the schedule: a planned
    # pause, and how tests interrupt a run to check that resume continues it exactly.
    stop_at_step: Optional[PositiveInt] = None
    # Stop (after a checkpoint, as at stop_at_step) at the first held-out evaluation that is at least this many
    # nats below the unigram reference (`heldout_below_unigram`): a search run that has left the plateau has
    # answered its question (BENCHMARKS.md section 0). Negative: stop once within that many nats above it.
    # None = train to the end of the schedule.
    stop_below_unigram: Optional[float] = None
    # Stop (after a held-out evaluation and a checkpoint, as at stop_at_step: the schedule is unchanged) at the
    # first step that starts with the training loop's wall_s (metrics.jsonl's time axis: seconds since the loop
    # started, a resumed run's earlier segments included) at or past this many seconds: a fixed time budget
    # whatever the throughput (scripts/gpu_ttq.sh). Ranks agree on the step through the step's flags all-reduce.
    max_wall_s: Optional[PositiveFloat] = None
    # Non-finite loss/gradient (see training/engine/faults.py): bf16/fp32 skip the step; after this many
    # consecutive bad steps, restore the last good checkpoint in-process or stop (exit code 3).
    max_bad_steps: PositiveInt = 5
    on_nan: Literal["restore", "stop"] = "restore"
    # Loggers, through DeepSpeed's monitor (one for the whole run, rank 0; training/engine/ds_config.py
    # monitor_blocks): TensorBoard events in OUT/tensorboard/<OUT's name>/, W&B (offline unless WANDB_MODE says
    # otherwise), CSV files in OUT/csv/<OUT's name>/, Comet (offline unless COMET_API_KEY is set).
    # OUT/metrics.jsonl is always written. [] logs to none of them.
    report_to: list[Literal["tensorboard", "wandb", "csv", "comet"]] = ["tensorboard"]

    @field_validator("report_to")
    @classmethod
    def _unique_loggers(cls, value: list) -> list:
        return list(dict.fromkeys(value))


class DataSection(_Strict):
    dir: str = "data/default"  # written by `python -m training.data prepare` / `build-default`
    mlm_probability: domain(float, gt=0, lt=1) = 0.15  # 0 masks nothing (no loss), 1 leaves no context
    whole_word_mask: bool = False


class OptimizerSection(_Strict):
    name: Literal["lamb", "adamw"] = "lamb"
    lr: PositiveFloat = 2e-3
    end_lr: NonNegativeFloat = 0.0  # and <= lr (checked below)
    betas: tuple[domain(float, ge=0, lt=1), domain(float, ge=0, lt=1)] = (0.9, 0.999)
    # > 0: Adam/LAMB divide by sqrt(v) + eps, and v is exactly 0 for a parameter that has had no gradient yet.
    eps: PositiveFloat = 1e-6
    weight_decay: NonNegativeFloat = 0.01
    warmup_steps: Optional[NonNegativeInt] = None  # default: warmup_fraction of the total steps
    warmup_fraction: domain(float, ge=0, lt=1) = 0.06
    decay_power: PositiveFloat = 1.0  # polynomial decay after warmup (1.0 = linear)
    min_trust: PositiveFloat = 0.01  # LAMB trust-ratio clamp (min <= max, checked below)
    max_trust: PositiveFloat = 10.0
    # LAMB on CUDA: DeepSpeed's fused kernel (its bias correction is folded into the step size, so it is
    # not step-for-step equal to the pure-PyTorch LAMB used elsewhere and under ZeRO 1/2).
    fused: bool = False
    # LAMB layer adaptation: "no_decay" gives the no-decay group (biases, LayerNorm) trust ratio 1, as NVIDIA's
    # and TF's LAMB do (else a zero-initialised bias moves at ~min_trust * lr for hundreds of steps); "none"
    # adapts every tensor. Fused and pure LAMB both honour it. Ignored by adamw.
    exclude_from_adaptation: Literal["no_decay", "none"] = "no_decay"

    @model_validator(mode="after")
    def _check(self):
        # Single-field domains are in the types above; what is checked here relates fields.
        if self.end_lr > self.lr:
            raise ValueError(f"optimizer.end_lr must be in [0, optimizer.lr={self.lr:g}], got {self.end_lr:g}")
        if self.min_trust > self.max_trust:
            raise ValueError(f"optimizer.min_trust must be <= optimizer.max_trust={self.max_trust:g}, "
                             f"got {self.min_trust:g}")
        return self


class LocalityScheduleSection(_Strict):
    """The locality bias over the run's first `steps` optimizer steps, whatever the stages (training/model/ops.py
    locality_bias): its strength falls linearly from `start` at step 0 to `end` at step `steps`, then stops. Use
    this when stage boundaries (a growth, a freeze, a pruning) fall inside the anneal: every method of a
    comparison then gets the same aid at the same steps. Each stage it covers needs eager or sdpa attention
    (training/stages/locality.py)."""
    start: NonNegativeFloat = 1.0
    end: NonNegativeFloat = 0.0
    steps: PositiveInt


class TrainSection(_Strict):
    # auto: bf16 where the device computes it natively (CUDA with bf16; a CPU with AMX, AVX512-BF16 or Arm BF16),
    # else fp32; resolved once at load (stages/plan.load_config, training/engine/precision.py).
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    micro_batch_size: PositiveInt = 32  # per rank
    grad_accum: PositiveInt = 1
    grad_clip: NonNegativeFloat = 1.0  # 0 disables (NaN would too, silently: hence finite)
    zero_stage: Literal[0, 1, 2] = 0
    max_steps: Optional[PositiveInt] = None  # the single stage's length when `stages` is not given
    locality_bias: Optional[LocalityScheduleSection] = None  # by global step, across stages (stages[].locality_bias: one stage)


class DeepSpeedSection(_Strict):
    # Template for the knobs this file does not model; default: deepspeed_configs/<precision>.json
    template: Optional[str] = None
    extra: dict[str, Any] = {}  # merged last; may not touch owned keys either
    wall_clock_breakdown: bool = False

    @field_validator("extra")
    @classmethod
    def _check_extra(cls, extra: dict) -> dict:
        problem = _json_problem(extra, "deepspeed.extra") or _extra_type_problem(extra)
        if problem:
            raise ValueError(problem)
        return extra


def _json_problem(value: Any, where: str) -> Optional[str]:
    """Why `value` is not a JSON value (DeepSpeed reads the config as JSON), or None."""
    if value is None or isinstance(value, (bool, int, str)):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{where} must be a finite number, got {value}"
    if isinstance(value, list):
        return next((p for i, v in enumerate(value) if (p := _json_problem(v, f"{where}.{i}"))), None)
    if isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, str):
                return f"{where}: keys must be strings, got {shown(key)}"
            if problem := _json_problem(v, f"{where}.{key}"):
                return problem
        return None
    return (f"{where} must be a JSON value (null, bool, number, string, list or mapping), "
            f"got {type(value).__name__} {shown(value)}")


# A few DeepSpeed keys whose type is documented and cheap to check (the rest DeepSpeed checks at start-up,
# after the run directory exists): {key: (type name, test)} at the top level and in zero_optimization.
def _is_int(v) -> bool:  # DeepSpeed's own examples write sizes as 5e8, which JSON reads as a float
    return not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer()))


_BLOCK, _BOOL = ("a mapping", lambda v: isinstance(v, dict)), ("true or false", lambda v: isinstance(v, bool))
_SIZE = ("an integer >= 0", lambda v: _is_int(v) and v >= 0)
_EXTRA_TYPES = {
    **dict.fromkeys(("zero_optimization", "fp16", "bf16", "activation_checkpointing", "flops_profiler",
                     "comms_logger", "checkpoint", "aio", "data_types", "csv_monitor", "wandb", "autotuning",
                     "elasticity", "compression_training", "data_efficiency"), _BLOCK),
    **dict.fromkeys(("prescale_gradients", "sparse_gradients", "zero_allow_untested_optimizer",
                     "zero_force_ds_cpu_optimizer", "memory_breakdown", "dump_state"), _BOOL),
    "gradient_predivide_factor": ("a number > 0", lambda v: not isinstance(v, bool) and isinstance(v, (int, float))
                                  and v > 0),
}
_ZERO_TYPES = {
    **dict.fromkeys(("overlap_comm", "contiguous_gradients", "reduce_scatter", "allgather_partitions",
                     "round_robin_gradients", "elastic_checkpoint"), _BOOL),
    **dict.fromkeys(("reduce_bucket_size", "allgather_bucket_size"), _SIZE),
}


def _extra_type_problem(extra: dict) -> Optional[str]:
    for table, mapping, where in ((_EXTRA_TYPES, extra, "deepspeed.extra"),
                                  (_ZERO_TYPES, extra.get("zero_optimization", {}),
                                   "deepspeed.extra.zero_optimization")):
        for key, (kind, ok) in table.items():
            if key in mapping and not ok(mapping[key]):
                return f"{where}.{key} must be {kind}, got {shown(mapping[key])}{_yaml_number_hint(mapping[key])}"
    return None


def _yaml_number_hint(value: Any) -> str:
    """YAML 1.1 (PyYAML) reads 5e8 and 1e-3 as strings; say so when a number was meant."""
    try:
        float(value) if isinstance(value, str) else None
    except ValueError:
        return ""
    return " (a string to YAML: write 500000000 or 5.0e+8)" if isinstance(value, str) else ""


class DistSection(_Strict):
    timeout_s: PositiveInt = 1800  # process-group timeout
    # Watchdog (multi-rank runs): a rank whose heartbeat stops this long is declared dead or frozen and the
    # others exit naming it, instead of waiting timeout_s in a collective. null turns it off.
    heartbeat_timeout_s: Optional[PositiveFloat] = 120.0
    backend: Optional[Literal["gloo", "nccl", "ccl"]] = None  # default: nccl on CUDA, gloo on CPU


class LayerDropSection(_Strict):
    """Progressive layer dropping (Zhang & He 2020): theta(t) = (1-theta_bar) exp(-gamma t) + theta_bar."""
    theta_bar: domain(float, gt=0, le=1) = 0.5  # the limit keep probability: 1 keeps every layer, 0 none
    gamma: NonNegativeFloat = 0.001  # 0: theta stays 1 (no dropping), a valid if idle setting


class LocalityBiasSection(_Strict):
    """A training-time attention bias toward near tokens (training/model/ops.py locality_bias), its strength
    falling linearly from `start` at the stage's first step to `end` after its last; 0 is plain attention."""
    start: NonNegativeFloat = 1.0  # a strength, not a probability: any finite value >= 0
    end: NonNegativeFloat = 0.0


class StageSection(_Strict):
    """One stage of the run: its length, its model, and the hook that enters it.

    `model` lists only what differs from the top-level `model` (the final model), e.g. a 3-layer
    first stage of a stacking run says `model: {num_layers: 3}`.
    """
    name: str
    steps: Optional[PositiveInt] = None
    tokens: Optional[PositiveInt] = None  # alternative to steps: converted with the global batch at run time
    model: dict[str, Any] = {}
    seq_len: Optional[domain(int, ge=8)] = None  # default: the prepared data's length
    hook: Optional[str] = None  # how this stage is entered from the previous one
    hook_args: dict[str, Any] = {}
    warmup_steps: NonNegativeInt = 0  # LR warmup restarted at this stage's start (the first stage uses optimizer.*)
    # reset: a fresh optimizer at the boundary (what the stacking and CompoundGrow authors do); carry: moments
    # mapped by name through the hook's operator (training/stages/transfer.py).
    optimizer_state: Literal["reset", "carry"] = "reset"
    layer_drop: Optional[LayerDropSection] = None
    locality_bias: Optional[LocalityBiasSection] = None
    # Other training modifiers by name, with their arguments (training/stages/modifiers.py; typed there).
    modifiers: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _check(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError(f"stage '{self.name}': give exactly one of steps or tokens")
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
            object.__setattr__(self, "stages", [StageSection(name="main", steps=self.train.max_steps)])  # resolving
        elif not self.stages:
            raise ValueError("stages: the list is empty")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: names must be unique, got {names}")
        self._check_stage_sections()
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
            raise ValueError(f"stage '{stage.name}': {_error_line(err.errors()[0], ('model',))}") from None

    def _check_stage_sections(self) -> None:
        """What each stage asks of the run's settings: each stage's model is valid, and carried optimizer state
        needs ZeRO 0. Whether one stage's model may follow another's (the hooks) and whether a stage's training
        modifiers suit its model are the stages' checks, made once when the config loads (stages/plan.load_config)."""
        for i, stage in enumerate(self.stages):
            self.stage_model(i)
            if stage.optimizer_state == "carry" and i > 0 and self.train.zero_stage > 0:
                raise ValueError(f"stage '{stage.name}': optimizer_state carry needs train.zero_stage 0 "
                                 "(ZeRO 1/2 state lives in flat partitions); use reset")

    def warmup_steps(self, total_steps: int) -> int:
        if self.optimizer.warmup_steps is not None:
            return self.optimizer.warmup_steps
        return int(self.optimizer.warmup_fraction * total_steps)

    def digest(self) -> str:
        """Hash of the resolved config, compared across ranks at start-up."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def _error_line(error: dict, prefix: tuple = ()) -> str:
    """One pydantic error as one line naming the dotted field: `train.max_steps must be positive, got 0`."""
    where = ".".join(str(p) for p in (*prefix, *error["loc"]))
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        from training.config.keys import did_you_mean

        return f"unknown config key '{where}'{did_you_mean(where, error.get('input'))}"
    if kind == "missing":
        return f"{where} is required"
    if kind == "value_error":  # our validators' messages name their fields already
        msg = msg.removeprefix("Value error, ")
        return msg if not where or msg.startswith((where + ".", where + " ")) else f"{where}: {msg}"
    if msg.startswith("must be "):  # a domain type (training/model/config.py `domain`)
        return f"{where} {msg}"
    if msg.startswith("Input should be "):  # pydantic's own: literals, bools, strings, mappings, lists
        return f"{where} must be {msg.removeprefix('Input should be ')}, got {shown(error.get('input'))}"
    return f"{where}: {msg}" if where else msg
