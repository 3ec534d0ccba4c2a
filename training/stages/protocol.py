"""The stage-hook protocol (stages/hooks.py lists the hooks): the record every hook is, and the context
it gets at a boundary. Method modules (growth, mslt, core, earlybert) import this, never the registry."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from training.model.config import ModelConfig

Tensors = dict[str, torch.Tensor]


@dataclass
class HookContext:
    step: int  # global step at the boundary
    out_dir: Path
    args: dict[str, Any] = field(default_factory=dict)  # the stage's hook_args


def _keep_declared(old: ModelConfig, new: ModelConfig, tensors: Tensors, ctx: HookContext) -> ModelConfig:
    return new


def _no_prepare(model: torch.nn.Module, stage) -> None:
    return None


@dataclass(frozen=True)
class Hook:
    name: str
    validate: Callable[[ModelConfig, ModelConfig, Any], None]
    transform: Callable[[Tensors, ModelConfig, ModelConfig, int, HookContext], Tensors]
    resolve: Callable[[ModelConfig, ModelConfig, Tensors, HookContext], ModelConfig] = _keep_declared
    prepare: Callable[[torch.nn.Module, Any], None] = _no_prepare
    # Whether the stage's declared shape may equal the previous one (a freeze does not reshape).
    reshapes: bool = True
