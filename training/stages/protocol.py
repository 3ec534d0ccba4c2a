"""What a method of a staged run is, in two kinds (stages/README.md):

- a stage *hook* (`Hook`; stages/hooks.py lists them) enters a stage from the one before: it is checked with
  its `Transition` when the config loads and gets a `Boundary` (the old model's weights and moments) when the
  run reaches the stage;
- a training *modifier* (`Modifier`; stages/modifiers.py lists them) changes how a stage trains, not its model:
  each step's forward arguments and FLOPs, and what an evaluation adds (layer dropping, the locality bias).

(A method that adds parameters is a model add-on: training/model/addon.py.) Method modules import this, never
the registries."""
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


@dataclass(frozen=True)
class Transition:
    """A stage and the one before it, as the config declares them: what a hook checks when the config loads."""
    old: ModelConfig  # the previous stage's model
    new: ModelConfig  # this stage's model as declared
    stage: Any  # this stage's StageSection (name, hook, hook_args, seq_len, ...)
    previous: Any  # the previous stage's StageSection
    previous_seq_len: Optional[int] = None  # the last seq_len a stage before this one declares (None: the data's)


@dataclass
class Boundary:
    """Everything a hook gets at a stage boundary, in one object (StageRunner.enter_stage builds it)."""
    step: int  # global step at the boundary
    out_dir: Path
    old: ModelConfig  # the model trained so far
    declared: ModelConfig  # the entered stage's model as the config declares it
    weights: Tensors  # fp32, by parameter name (the masters where DeepSpeed keeps them)
    moments: dict[str, Tensors]  # {'exp_avg': ..., 'exp_avg_sq': ...} with optimizer_state: carry, else {}

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
    strict, frozen. Parsed when a stage's hook instance is made (`Hook.args`): when the config loads, where its
    defaults are filled in once (`Hook.resolve_args`), and for the run's own instance."""
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

    Load time (the config is checked before anything runs; neither changes the config):
    - `resolve_args(t)`: this stage's arguments with shape-dependent defaults filled in (MSLT: train_top), a new
      Args instance (the config keeps them: resolved once);
    - `validate(t)`: raise ValueError (one line) for a transition the method cannot make: the one place where
      that is decided (the schema checks shapes only).
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

    def resolve_args(self, t: Transition) -> Optional[HookArgs]:
        return self.args

    def validate(self, t: Transition) -> None:
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


# ------------------------------------------------------------------------------------------- modifiers

@dataclass(frozen=True)
class StepContext:
    """Where a training step is: what a modifier's schedule reads."""
    step: int  # optimizer steps done before this one, over the whole run
    stage_step: int  # of them, in this stage
    stage_steps: int  # the stage's length as it runs (an early end shortens it)
    model: ModelConfig  # the model the stage trains
    seed: int  # run.seed


class Modifier:
    """A training modifier: how a stage trains, not what it trains (one instance per stage that uses it,
    `modifiers.stage_modifiers`). The runner asks every modifier of the current stage, knowing none of them:

    - `forward_kwargs(at)`: the forward arguments of the step at `at` (layer dropping's keep probabilities, the
      locality bias's strength); the evaluation never gets them (it scores the plain model);
    - `flops_args(kwargs)` and `flops_factor(kwargs)`: the FLOPs per token that step computes, as the stage's
      count (training/model/flops.py flops_per_token) with extra arguments (layer dropping: its keep
      probabilities), times a factor; defaults: none, 1;
    - `eval_record(at, evaluate)`: what an evaluation records beside the plain model's score (the locality bias:
      the score of the model as it trains, `evaluate(**forward_kwargs)`); default nothing.

    Configuration: a stage names it in `stages[].modifiers: {NAME: {args}}` (typed by `Args`, a HookArgs
    subclass), or, for the shipped ones, in their own stage field (`field`: `layer_drop`, `locality_bias`);
    `configured(cfg, index)` reads it. `check(cfg, index, start_step)` refuses (ValueError, one line naming the
    stage) a stage the modifier cannot train, when the config loads: the one place that is decided."""

    name: ClassVar[str]
    Args: ClassVar[Optional[type[HookArgs]]] = None
    field: ClassVar[Optional[str]] = None  # the StageSection field that configures it instead of `modifiers`

    def __init__(self, args):
        self.args = args

    @classmethod
    def configured(cls, cfg, index: int):
        """This modifier's arguments in stage `index` (typed), or None when the stage does not use it."""
        raw = cfg.stages[index].modifiers.get(cls.name)
        if raw is None:
            return None
        return parse_hook_args(cls.Args, raw) if cls.Args is not None else dict(raw)

    @classmethod
    def check(cls, cfg, index: int, start_step: Optional[int]) -> None:
        """ValueError for a stage this modifier cannot train (`start_step`: the stage's first global step where
        the config alone gives it, else None)."""
        return None

    def forward_kwargs(self, at: StepContext) -> dict:
        return {}

    def flops_args(self, kwargs: dict) -> dict:
        return {}

    def flops_factor(self, kwargs: dict) -> float:
        return 1.0

    def eval_record(self, at: StepContext, evaluate: Callable[..., dict]) -> dict:
        return {}
