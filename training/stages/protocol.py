"""The stage-hook protocol (stages/hooks.py lists the hooks): the base class every hook is (one instance per
stage), and what it gets at a boundary. Method modules (growth, mslt, core, earlybert) import this, never the registry."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from training.model.config import ModelConfig
from training.stages.transfer import MOMENT_POWER, WEIGHTS

Tensors = dict[str, torch.Tensor]


@dataclass
class HookContext:
    """Where a boundary happens: what a hook's `resolve` and `transform` may need besides the tensors (a file
    under the run's output dir, the step to record)."""
    step: int  # global step at the boundary
    out_dir: Path


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
        return HookContext(step=self.step, out_dir=self.out_dir)


@dataclass
class Entered:
    """What a hook returns: the new stage's model config, its weights and the carried moments (by name)."""
    model: ModelConfig
    weights: Tensors
    moments: dict[str, Tensors]


class HookArgs(BaseModel):
    """Base of a hook's typed `hook_args` (pydantic, like the rest of the config): unknown keys refused, types
    strict, frozen. Parsed when the config loads (plan.resolve_hook_args) and again, into `Hook.args`, when
    the stage's hook instance is made."""
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


class Hook:
    """A stage hook: one instance per stage that names it (`hooks.make_hook(stage)`), holding that stage's
    typed arguments (`self.args`, an instance of the class's `Args`) and whatever the method decides at its
    boundary (EarlyBERT's ticket). A method subclasses it and is listed once in `hooks.HOOKS`.

    Class attributes: `name` (what a stage's `hook:` says), `Args` (a HookArgs subclass, or None for a hook
    that takes no arguments).

    Load time (the config is checked before anything runs; both must change nothing):
    - `resolve_args(old, new, args)` (class method): the stage's hook_args with defaults filled in, a new dict;
    - `validate(old, new, stage)`: raise ValueError (one line) for a change the method cannot make.
    Boundary time (`enter`):
    - `resolve(old, declared, weights, ctx)`: the new stage's model config (most hooks: as declared);
    - `transform(tensors, old, new, moment, ctx)`: the old model's tensors as the new model's, for the weights
      (moment 0) and each carried optimizer moment (1: exp_avg, 2: exp_avg_sq; moments follow their
      gradients, transfer.MOMENT_POWER); a moment may drop a tensor it has no rule for (fresh state then).
    Build time: `prepare(model)` once the new module holds its weights, before the optimizer sees it (MSLT
    freezes layers here; also on resume). Watching: `watch(ctx, write_metrics, rank)` may return an object
    that watches the stage *before* this one (EarlyBERT's early-bird search; see StageRunner.run)."""

    name: ClassVar[str]
    Args: ClassVar[Optional[type[HookArgs]]] = None

    def __init__(self, hook_args: Optional[dict] = None):
        raw = dict(hook_args or {})
        if self.Args is not None:
            self.args = parse_hook_args(self.Args, raw)
        elif raw:
            raise ValueError(f"{self.name} takes no hook_args, got {sorted(raw)}")
        else:
            self.args = None

    @classmethod
    def resolve_args(cls, old: ModelConfig, new: ModelConfig, args: dict) -> dict:
        return parse_hook_args(cls.Args, args).model_dump() if cls.Args is not None else dict(args)

    def validate(self, old: ModelConfig, new: ModelConfig, stage) -> None:
        return None

    def resolve(self, old: ModelConfig, declared: ModelConfig, weights: Tensors, ctx: HookContext) -> ModelConfig:
        return declared

    def transform(self, tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int,
                  ctx: HookContext) -> Tensors:
        raise NotImplementedError(f"hook {self.name} has no transform")

    def prepare(self, model: torch.nn.Module) -> None:
        return None

    def watch(self, ctx: HookContext, write_metrics: Callable[[dict], None], rank: int):
        return None

    def enter(self, boundary: Boundary) -> Entered:
        """The boundary's one call: resolve the new model, then transform the weights and each carried moment
        with the same context."""
        ctx = boundary.context()
        new = self.resolve(boundary.old, boundary.declared, boundary.weights, ctx)
        weights = self.transform(boundary.weights, boundary.old, new, WEIGHTS, ctx)
        moments = {key: self.transform(t, boundary.old, new, MOMENT_POWER[key], ctx) if t else t
                   for key, t in boundary.moments.items()}
        return Entered(new, weights, moments)


def enter_without_hook(boundary: Boundary) -> Entered:
    """A stage that names no hook keeps the model (the config refuses a shape change without one)."""
    return Entered(boundary.old, boundary.weights, boundary.moments)
