"""Every stage hook a stage may name (protocol.Hook), one line each, and a stage's instance (`make_hook`). A new method
that changes the model at a boundary is its module and its line here; protocol.Hook documents what a hook may
define."""
from __future__ import annotations

from typing import Optional

from training.registry import Registry
from training.stages import core, earlybert, growth, mslt
from training.stages.protocol import Hook

HOOKS = Registry("stage hook", (
    growth.Stack, growth.GrowFfn, growth.GrowHidden, growth.GrowWidth, growth.Compound, growth.GrowSeq,
    mslt.Mslt, mslt.MsltJoint, core.CoreRefine, earlybert.Prune,
))


def hook_class(name: str) -> type[Hook]:
    return HOOKS.lookup(name)


def make_hook(stage) -> Optional[Hook]:
    """The hook instance of `stage` (a StageSection: its `hook` and `hook_args`), or None for a stage without."""
    return hook_class(stage.hook)(stage.hook_args) if stage.hook else None
