"""`model.compile: true`: torch.compile each encoder layer in place ("regional" compilation).

Why the layers and not the whole model (which DeepSpeed's `engine.compile()` would do):
- the model's forward takes per-step Python arguments that change the graph: progressive layer dropping
  skips a random set of layers each step, MSLT runs a frozen prefix under no_grad, and a whole-model graph
  would be traced again for each combination; per layer, a skipped layer is simply not called;
- every layer runs the same code on parameters of the same shapes, so one compiled graph serves them all
  (dynamo treats module parameters as inputs): compile time does not grow with depth, and a layer added
  by a growth stage reuses the graph;
- `nn.Module.compile()` works in place: parameter and state-dict names are unchanged, so checkpoints,
  stage transfers by name and the HF export see the same model as without compilation.

A new shape (a grown hidden size, a longer sequence stage, EarlyBERT's pruned layers) or a new mode (eval,
frozen, layer-drop scaling) compiles once more, in the first call that meets it."""
from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# Different per-layer shapes after pruning (EarlyBERT) and the train/eval/frozen variants of each are one
# compiled graph each, all for Layer.forward's one code object: more than dynamo's default of 8.
RECOMPILE_LIMIT = 64


def compile_layers(layers: nn.ModuleList, backend: str = "inductor") -> None:
    """Compile every module of `layers` in place (see the module docstring)."""
    dynamo = torch._dynamo.config
    if getattr(dynamo, "recompile_limit", RECOMPILE_LIMIT) < RECOMPILE_LIMIT:
        dynamo.recompile_limit = RECOMPILE_LIMIT
    for layer in layers:
        layer.compile(backend=backend)
