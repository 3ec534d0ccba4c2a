"""MSLT, multi-stage layerwise training (Yang et al. 2020, arXiv 2011.13635): grow the encoder k layers at a
time on top and train only the new top layers; the lower, already-trained layers are frozen.

Two stage hooks (classes `Mslt`, `MsltJoint`; training/stages/protocol.py for the Hook protocol) and a stage-list builder:

``mslt`` — enter a stage whose model has ``num_layers = previous + k`` (1 <= k <= previous layers):

* transform: new layer ``L + j`` is a copy of old layer ``L - k + j`` (the current top k layers, in order;
  **our choice**: the paper does not publish its initialisation). Weights and optimizer moments alike, so
  ``optimizer_state: carry`` gives the copies their source layers' moments. Per-layer head/FFN lists (a
  pruned model) must grow the same way: ``new = old + old[-k:]``.
* prepare (run on entering the stage AND on resume, before the engine is built): every parameter gets
  ``requires_grad=False`` except

  - the top ``train_top`` encoder layers,
  - the MLM head transform (``cls.predictions.transform.*``, dense + LayerNorm) and the output bias
    ``cls.predictions.bias``,
  - the pooler and the NSP head when the model has them, and the Pre-LN ``bert.encoder.final_layer_norm``.

  The word/position/token-type embeddings and the embedding LayerNorm are frozen (**our choice**), and with
  them the tied MLM decoder weight (it *is* the word embedding).

  Because the embeddings and the layers below the trainable ones are all frozen, the model runs them
  forward-only under ``torch.no_grad()`` (``Bert.forward``): no activations kept, no backward, and their
  parameters never get a ``.grad``. The engine's optimizer is built from ``requires_grad`` parameters only
  (``training.engine.lamb.param_groups_for``), and DeepSpeed 0.19.8 reduces only those (ZeRO 0:
  ``engine._get_gradients_for_reduction`` skips frozen params; ZeRO 1/2 and the bf16/fp16 wrappers only know
  the optimizer's groups), so the gradient all-reduce carries exactly the trainable parameters' gradients
  (measured by ``python -m training.bench mslt``, tested in tests/integration/test_mslt_runs.py).

  ``hook_args`` (all optional; the config loader fills in ``train_top``, so ``prepare`` is a pure function of
  the stage config and the model shape and a resumed run freezes the same parameters):

  - ``train_top``: how many top encoder layers train; default and minimum ``k`` (the added layers), at most
    the stage's layer count.
  - ``freeze_embeddings``: default true. False keeps the embeddings (and the tied decoder) trainable; the
    frozen layers then still need a backward pass for the embeddings' gradient, so only their weight
    gradients are saved, not their backward.

``mslt_joint`` — the final joint stage: same shape, every parameter trainable again (no reshaping, no
``hook_args``). Parameters unfrozen here have no optimizer state yet; they start fresh even under ``carry``.

``mslt_stages(start_layers, k, final_layers, total_steps, joint_fraction=0.1)`` builds the stage list
(also ``python -m training.stages.mslt plan ...`` prints it as YAML).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import torch

from training.model import params
from training.model.config import ModelConfig
from training.stages.protocol import Hook, HookArgs, HookContext, Tensors, Transition, parse_hook_args

# Parts of the model (training/model/params.py) outside the encoder layers that stay trainable in a frozen stage;
# the embeddings and the decoder (tied to them) follow freeze_embeddings.
_HEAD_TRAINABLE = ("mlm_transform", "mlm_bias", "nsp", "pooler", "final_norm")
_PER_LAYER = ModelConfig.PER_LAYER_FIELDS
DEFAULT_JOINT_FRACTION = 0.1


# ---------------------------------------------------------------------------------------------- mslt

def _added(old: ModelConfig, new: ModelConfig) -> int:
    return new.num_layers - old.num_layers


class MsltArgs(HookArgs):
    train_top: Optional[int] = None  # top encoder layers that train; default (and minimum) k, the added layers
    freeze_embeddings: bool = True


def resolve_args(old: ModelConfig, new: ModelConfig, args: dict) -> dict:
    """The stage's hook_args (typed: MsltArgs) with their defaults filled in (train_top = k, the added layers;
    freeze_embeddings true), resolved once when the config loads so that prepare() (also on resume) needs only
    (model, stage). Returns a new dict; validate() then checks it."""
    return _resolved(parse_hook_args(MsltArgs, args), old, new).model_dump()


def _resolved(args: MsltArgs, old: ModelConfig, new: ModelConfig) -> MsltArgs:
    return args if args.train_top is not None else args.model_copy(update={"train_top": _added(old, new)})


def validate(old: ModelConfig, new: ModelConfig, stage) -> None:
    """Config-load check of an `mslt` stage (its hook_args typed here; the run resolves them once: Mslt). Changes
    nothing."""
    _check(old, new, parse_hook_args(MsltArgs, stage.hook_args).train_top)


def _check(old: ModelConfig, new: ModelConfig, train_top: Optional[int]) -> None:
    k = _added(old, new)
    if k < 1:
        raise ValueError(f"MSLT adds layers on top: model.num_layers must grow ({old.num_layers} -> "
                         f"{new.num_layers})")
    if k > old.num_layers:
        raise ValueError(f"MSLT copies the current top k layers: k = {k} new layers needs k <= the previous "
                         f"stage's {old.num_layers} layers")
    for field, (before, after) in old.diff(new, ignore=("num_layers", *_PER_LAYER)).items():
        raise ValueError(f"MSLT changes only model.num_layers, not model.{field} ({before!r} -> {after!r})")
    for field in _PER_LAYER:
        before = getattr(old, field)
        expected = None if before is None else before + before[-k:]
        if getattr(new, field) != expected:
            raise ValueError(f"model.{field} must become {expected} (the top {k} layers copied), "
                             f"got {getattr(new, field)}")
    train_top = k if train_top is None else train_top
    if not k <= train_top <= new.num_layers:
        raise ValueError(f"hook_args.train_top must be in [{k}, {new.num_layers}] (at least the {k} added "
                         f"layers), got {train_top}")


def copy_top_layers(tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int = 1,
                    ctx: Optional[HookContext] = None) -> Tensors:
    """Old layers keep their index; new layer L + j is a (fresh) copy of old layer L - k + j."""
    k, top = _added(old, new), old.num_layers
    out = {}
    for name, t in tensors.items():
        out[name] = t
        i = params.describe(name).layer
        if i is None:
            continue
        if i >= top:
            raise ValueError(f"tensor {name!r} is beyond the old model's {top} layers")
        if i >= top - k:
            out[params.renumbered(name, i + k)] = t.clone()
    return out


def freeze(model: torch.nn.Module, train_top: int, freeze_embeddings: bool = True) -> list[str]:
    """Set requires_grad as an MSLT stage trains (see the module doc); returns the frozen names."""
    num_layers = len(model.bert.encoder.layer)
    if not 0 <= train_top <= num_layers:
        raise ValueError(f"train_top={train_top} for a model with {num_layers} layers")
    first_trainable = num_layers - train_top
    frozen = []
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):  # the tied decoder weight too
        param = params.describe(name)  # ValueError for a name no part of the model has
        if param.layer is not None:
            trainable = param.layer >= first_trainable
        elif param.part in ("embeddings", "decoder"):
            trainable = not freeze_embeddings
        elif param.part in _HEAD_TRAINABLE:
            trainable = True
        else:
            raise ValueError(f"MSLT does not know whether {name!r} (part {param.part}) trains in a frozen stage")
        if id(p) in seen:
            if p.requires_grad != trainable:
                raise ValueError(f"{name!r} is tied to a parameter with the opposite MSLT role")
            continue
        seen.add(id(p))
        p.requires_grad_(trainable)
        if not trainable:
            p.grad = None
            frozen.append(name)
    return frozen


def unfreeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(True)


# ---------------------------------------------------------------------------------------- mslt_joint

def validate_joint(old: ModelConfig, new: ModelConfig, stage) -> None:
    # Stray hook_args are refused when the stage's instance is made (protocol.Hook: MsltJoint has no Args).
    if old != new:
        raise ValueError("mslt_joint unfreezes all layers without reshaping: the model must equal the previous "
                         "stage's")


class Mslt(Hook):
    """Grow by k layers copied from the top; only the top `train_top` layers (and the head) train."""
    name, Args = "mslt", MsltArgs

    def resolve_args(self, t: Transition) -> MsltArgs:
        return _resolved(self.args, t.old, t.new)

    def validate(self, t: Transition) -> None:
        _check(t.old, t.new, self.args.train_top)

    def transform(self, tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int,
                  ctx: HookContext) -> Tensors:
        return copy_top_layers(tensors, old, new, moment)

    def prepare(self, model: torch.nn.Module) -> None:
        if self.args.train_top is None:  # the config loader fills it in; a hand-built stage may not have
            raise ValueError("mslt needs hook_args.train_top (set by load_config)")
        freeze(model, self.args.train_top, self.args.freeze_embeddings)


class MsltJoint(Hook):
    """The last stage: every layer trains again, same model."""
    name = "mslt_joint"

    def validate(self, t: Transition) -> None:
        validate_joint(t.old, t.new, t.stage)

    def transform(self, tensors: Tensors, old: ModelConfig, new: ModelConfig, moment: int,
                  ctx: HookContext) -> Tensors:
        return tensors

    def prepare(self, model: torch.nn.Module) -> None:
        unfreeze(model)


# ---------------------------------------------------------------------------------------- stage list

def mslt_stages(start_layers: int, k: int, final_layers: int, total_steps: int,
                joint_fraction: float = DEFAULT_JOINT_FRACTION, prefix: str = "") -> list[dict[str, Any]]:
    """The `stages:` list of an MSLT run: start_layers (all trainable), then +k layers per stage training the
    new top k only, up to final_layers, then a joint stage of round(joint_fraction * total_steps) steps (0:
    none). The other steps are split evenly across the layerwise stages (the remainder goes to the first).
    """
    if start_layers < 1 or k < 1 or final_layers < start_layers:
        raise ValueError("need 1 <= start_layers <= final_layers and k >= 1")
    if (final_layers - start_layers) % k:
        raise ValueError(f"final_layers - start_layers = {final_layers - start_layers} is not a multiple of k={k}")
    if k > start_layers:
        raise ValueError(f"k={k} > start_layers={start_layers}: the first growth copies the top k layers")
    if not 0.0 <= joint_fraction < 1.0:
        raise ValueError(f"joint_fraction must be in [0, 1), got {joint_fraction}")
    depths = list(range(start_layers, final_layers + 1, k))
    joint = round(joint_fraction * total_steps)
    layerwise = total_steps - joint
    if layerwise < len(depths):
        raise ValueError(f"total_steps={total_steps} leaves fewer than one step per stage")
    each, extra = divmod(layerwise, len(depths))
    stages: list[dict[str, Any]] = []
    for i, depth in enumerate(depths):
        stage: dict[str, Any] = {"name": f"{prefix}L{depth}", "steps": each + (extra if i == 0 else 0),
                                 "model": {"num_layers": depth}}
        if i > 0:
            stage["hook"] = "mslt"
            stage["hook_args"] = {"train_top": k}
        stages.append(stage)
    if joint:
        stages.append({"name": f"{prefix}joint", "steps": joint, "model": {"num_layers": final_layers},
                       "hook": "mslt_joint"})
    return stages


def main(argv=None) -> int:
    import yaml

    p = argparse.ArgumentParser(prog="python -m training.stages.mslt",
                                description="print an MSLT `stages:` list as YAML")
    sub = p.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan")
    plan.add_argument("--start", type=int, required=True, help="layers of the first stage")
    plan.add_argument("--k", type=int, required=True, help="layers added per stage")
    plan.add_argument("--final", type=int, required=True, help="layers of the final model")
    plan.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    plan.add_argument("--joint-fraction", type=float, default=DEFAULT_JOINT_FRACTION)
    args = p.parse_args(argv)
    stages = mslt_stages(args.start, args.k, args.final, args.steps, args.joint_fraction)
    sys.stdout.write(yaml.safe_dump({"stages": stages}, sort_keys=False, default_flow_style=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
