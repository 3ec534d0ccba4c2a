"""Progressive layer dropping (Zhang & He, NeurIPS 2020) as a pure schedule, and the training modifier that
applies it to a stage (`LayerDrop`, for `stages[].layer_drop`; protocol.Modifier).

DeepSpeed 0.19 no longer ships its `progressive_layer_drop` block, so the schedule lives here and the
model does the dropping: `BertForPreTraining.forward(..., layer_keep_prob=probs)` in training mode
skips layer i (identity) with probability 1 - probs[i] and scales a kept layer's residual branches by
1 / probs[i], so each layer's expected output is the full layer's. Needs `model.norm: pre` (with
Post-LN a skipped layer would also skip its LayerNorms and the residual stream changes scale).

`step` is whatever the caller counts from the start of dropping; the runner passes the global
optimizer step, as the paper's t.
"""
from __future__ import annotations

import math

from training.model.config import ModelConfig
from training.stages.protocol import Modifier, StepContext

THETA_BAR = 0.5  # the paper's limit keep ratio
GAMMA = 0.001  # the paper's decay rate per step


def _check(step: float, theta_bar: float, gamma: float) -> None:
    if step < 0:
        raise ValueError(f"layer drop: step must be >= 0, got {step}")
    if not 0.0 < theta_bar <= 1.0:
        raise ValueError(f"layer drop: theta_bar must be in (0, 1], got {theta_bar}")
    if gamma < 0:
        raise ValueError(f"layer drop: gamma must be >= 0, got {gamma}")


def keep_ratio(step: float, theta_bar: float = THETA_BAR, gamma: float = GAMMA) -> float:
    """theta(t) = (1 - theta_bar) exp(-gamma t) + theta_bar: 1 at t = 0, decays to theta_bar."""
    _check(step, theta_bar, gamma)
    return (1.0 - theta_bar) * math.exp(-gamma * step) + theta_bar


def layer_keep_probs(step: float, num_layers: int, theta_bar: float = THETA_BAR,
                     gamma: float = GAMMA) -> list[float]:
    """p_i = 1 - (i / L)(1 - theta(t)) for layer i = 1..L (list index i - 1).

    Deeper layers drop more: the bottom layer is nearly always kept, the top one with theta(t).
    """
    if num_layers < 1:
        raise ValueError(f"layer drop: num_layers must be >= 1, got {num_layers}")
    drop = 1.0 - keep_ratio(step, theta_bar, gamma)
    return [1.0 - (i / num_layers) * drop for i in range(1, num_layers + 1)]


def expected_layers(step: float, num_layers: int, theta_bar: float = THETA_BAR,
                    gamma: float = GAMMA) -> float:
    """Expected number of layers run per forward (for FLOPs-per-token reporting)."""
    return sum(layer_keep_probs(step, num_layers, theta_bar, gamma))


def check_layerdrop(cfg: ModelConfig) -> None:
    """Layer dropping needs Pre-LN layers (the model says so: ModelConfig.check_layer_drop)."""
    cfg.check_layer_drop()


def forward_kwargs(layer_drop, step: int, num_layers: int, seed: int) -> dict:
    """The forward arguments of one training step of a stage with `layer_drop` (its config section, or None):
    the keep probabilities at global `step` and a generator seeded by the run seed and the step, so every rank
    skips the same layers and reduces the same gradients (the runner and the throughput tool both use it)."""
    import torch

    if layer_drop is None:
        return {}
    probs = layer_keep_probs(step, num_layers, theta_bar=layer_drop.theta_bar, gamma=layer_drop.gamma)
    return {"layer_keep_prob": probs, "layer_drop_generator": torch.Generator().manual_seed(seed * 1_000_003 + step)}


class LayerDrop(Modifier):
    """`stages[].layer_drop: {theta_bar, gamma}`: each step's keep probabilities from the global step (the same
    decisions on every rank), and the FLOPs that step computes with them."""
    name, field = "layer_drop", "layer_drop"

    @classmethod
    def configured(cls, cfg, index: int):
        return cfg.stages[index].layer_drop

    @classmethod
    def check(cls, cfg, index: int, start_step) -> None:
        if cls.configured(cfg, index) is not None:
            try:
                check_layerdrop(cfg.stage_model(index))
            except ValueError as err:
                raise ValueError(f"stage '{cfg.stages[index].name}': {err}") from None

    def forward_kwargs(self, at: StepContext) -> dict:
        return forward_kwargs(self.args, at.step, at.model.num_layers, at.seed)

    def flops_args(self, kwargs: dict) -> dict:
        return {"keep_probs": kwargs["layer_keep_prob"]}
