"""The stage-hook protocol (stages/hooks.py lists the hooks): the record every hook is, and the context
it gets at a boundary. Method modules (growth, mslt, core, earlybert) import this, never the registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from training.model.config import ModelConfig
from training.stages.transfer import MOMENT_POWER, WEIGHTS

Tensors = dict[str, torch.Tensor]


@dataclass
class HookContext:
    step: int  # global step at the boundary
    out_dir: Path
    args: dict[str, Any] = field(default_factory=dict)  # the stage's hook_args
    # What `resolve` decided that every `transform` of the same boundary needs (EarlyBERT: the ticket and the
    # slimming coefficients, which the moments do not carry). Filled by the hook, for this boundary only.
    drawn: dict[str, Any] = field(default_factory=dict)


@dataclass
class Boundary:
    """Everything a hook gets at a stage boundary, in one object (StageRunner._enter_stage builds it)."""
    step: int  # global step at the boundary
    rank: int
    out_dir: Path
    stage: Any  # the config's StageSection being entered (name, hook, hook_args, optimizer_state, ...)
    old: ModelConfig  # the model trained so far
    declared: ModelConfig  # the entered stage's model as the config declares it
    weights: Tensors  # fp32, by parameter name (the masters where DeepSpeed keeps them)
    moments: dict[str, Tensors]  # {'exp_avg': ..., 'exp_avg_sq': ...} with optimizer_state: carry, else {}
    write_metrics: Callable[[dict], None] = lambda record: None

    def context(self) -> HookContext:
        return HookContext(step=self.step, out_dir=self.out_dir, args=self.stage.hook_args)


@dataclass
class Entered:
    """What a hook returns: the new stage's model config, its weights and the carried moments (by name)."""
    model: ModelConfig
    weights: Tensors
    moments: dict[str, Tensors]


class HookArgs(BaseModel):
    """Base of a hook's typed `hook_args` (pydantic, like the rest of the config): unknown keys refused, types
    strict, frozen. Parsed once when the config loads (config._resolve_hook_args); a hook that declares one
    (`Hook.args`) may read its arguments back with `parse_hook_args`."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


_TYPE_NAMES = {"int_type": "int", "bool_type": "bool", "float_type": "float", "string_type": "str",
               "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping"}


def parse_hook_args(model: type[HookArgs], raw: Optional[dict]) -> HookArgs:
    """`raw` validated against `model`; ValueError with one line naming the key on bad input."""
    try:
        return model.model_validate(dict(raw or {}))
    except ValidationError as err:
        errors = err.errors()
        extra = sorted(".".join(map(str, e["loc"])) for e in errors if e["type"] == "extra_forbidden")
        if extra:
            raise ValueError(f"unknown hook_args {extra} (known: {', '.join(model.model_fields)})") from None
        e = errors[0]
        where = "hook_args." + ".".join(map(str, e["loc"]))
        if e["type"] in _TYPE_NAMES:
            raise ValueError(f"{where} must be {_TYPE_NAMES[e['type']]}, got {e['input']!r}") from None
        raise ValueError(f"{where}: {e['msg']} (got {e.get('input')!r})") from None


def _keep_declared(old: ModelConfig, new: ModelConfig, tensors: Tensors, ctx: HookContext) -> ModelConfig:
    return new


def _no_prepare(model: torch.nn.Module, stage) -> None:
    return None


def _same_args(old: ModelConfig, new: ModelConfig, args: dict) -> dict:
    return dict(args)


@dataclass(frozen=True)
class Hook:
    name: str
    validate: Callable[[ModelConfig, ModelConfig, Any], None]
    transform: Callable[[Tensors, ModelConfig, ModelConfig, int, HookContext], Tensors]
    resolve: Callable[[ModelConfig, ModelConfig, Tensors, HookContext], ModelConfig] = _keep_declared
    prepare: Callable[[torch.nn.Module, Any], None] = _no_prepare
    # Whether the stage's declared shape may equal the previous one (a freeze does not reshape).
    reshapes: bool = True
    # The stage's hook_args with defaults filled in, once, when the config loads (before validate, which
    # then changes nothing): resolve_args(old, new, args) -> a new dict.
    resolve_args: Callable[[ModelConfig, ModelConfig, dict], dict] = _same_args
    # The hook's typed hook_args (a HookArgs subclass), parsed when the config loads; None: the hook checks
    # its own (most take none).
    args: Optional[type[HookArgs]] = None

    def enter(self, boundary: Boundary) -> Entered:
        """The boundary's one call: resolve the new model, then transform the weights and each carried moment
        with the same context (moments follow their gradients: transfer.MOMENT_POWER)."""
        ctx = boundary.context()
        new = self.resolve(boundary.old, boundary.declared, boundary.weights, ctx)
        weights = self.transform(boundary.weights, boundary.old, new, WEIGHTS, ctx)
        moments = {key: self.transform(t, boundary.old, new, MOMENT_POWER[key], ctx) if t else t
                   for key, t in boundary.moments.items()}
        return Entered(new, weights, moments)


def enter_without_hook(boundary: Boundary) -> Entered:
    """A stage that names no hook keeps the model (the config refuses a shape change without one)."""
    return Entered(boundary.old, boundary.weights, boundary.moments)
