"""Every key a run config takes, dotted (`train.max_steps`, `stages.N.warmup_steps`, `model.hidden_size`), read
from the schema itself, and the nearest one to a mistyped key: "unknown config key 'train.max_step' (did you
mean train.max_steps?)". A stage's `model` overrides take the model's keys."""
from __future__ import annotations

import re
import typing
from typing import Any, Optional

from pydantic import BaseModel

from training.cli import nearest


def _model_class(annotation: Any) -> Optional[type]:
    """The pydantic model inside Optional[...] / list[...] / dict[...] annotations, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_class(arg)
        if found is not None:
            return found
    return None


def dotted_keys(model: type, prefix: str = "") -> list[str]:
    """Every section and field of `model` (a pydantic class), dotted; list items as `N`."""
    from training.model.config import ModelConfig

    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        inner = _model_class(field.annotation)
        if typing.get_origin(field.annotation) is list or list in map(typing.get_origin,
                                                                       typing.get_args(field.annotation)):
            key += ".N"
        if inner is not None:
            keys += dotted_keys(inner, key + ".")
        elif name == "model" and prefix.startswith("stages."):  # a stage's overrides of the top-level model
            keys += dotted_keys(ModelConfig, key + ".")
    return keys


# Keys that moved: the old name's message names the new one.
MOVED = {"deepspeed.tensorboard": "run.report_to (a list of loggers: [tensorboard], or [] for none)"}


def did_you_mean(where: str, given: Any = None) -> str:
    """' (did you mean KEY?)' for an unknown dotted key, or '' when nothing is close. `given` is the value the
    unknown key held: a mapping there is a mistyped section, matched with its first key (trian.max_steps)."""
    from training.config.schema import RunConfig

    if where in MOVED:
        return f" (it moved: use {MOVED[where]})"
    generic = re.sub(r"\.\d+(?=\.|$)", ".N", where)
    keys = dotted_keys(RunConfig)
    leaf = generic.rsplit(".", 1)[-1]  # the right name in another section: train.lr -> optimizer.lr
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != generic]
    if len(same_leaf) == 1:
        return f" (did you mean {_indexed(same_leaf[0], where)}?)"
    tries = [generic] if not isinstance(given, dict) or not given else [f"{generic}.{next(iter(given))}", generic]
    for typed in tries:
        match = nearest(typed, [k for k in keys if not typed.startswith(k + ".")])
        if match is not None:
            return f" (did you mean {_indexed(match, where)}?)"
    return ""


def _indexed(key: str, where: str) -> str:
    """`stages.N.x` with the stage index the user typed."""
    index = re.search(r"\.(\d+)(?=\.|$)", where)
    return key.replace(".N", f".{index.group(1)}", 1) if index else key
