"""Move weights and optimizer state from one engine to the next at a stage boundary, by parameter name.

Weights are taken from the fp32 masters where DeepSpeed keeps them (bf16/fp16 runs), so a transition
loses no precision; the new engine's masters are then overwritten with the transformed fp32 values.
State is matched by name through the `names` list of each param group (training.engine.lamb
.param_groups_for), never by index. ZeRO 0 only for carried state: ZeRO 1/2 keep state in flat
partitions (the config refuses `optimizer_state: carry` there).
"""
from __future__ import annotations

from typing import Iterator

import torch

Tensors = dict[str, torch.Tensor]
MOMENT_POWER = {"exp_avg": 1, "exp_avg_sq": 2}  # how a weight's scale factor acts on each moment


def _basic_optimizer(engine):
    """The client optimizer whose param groups hold the tensors it updates (fp32 masters or the params)."""
    wrapper = engine.optimizer
    return getattr(wrapper, "optimizer", wrapper)


def _named_master_params(engine) -> Iterator[tuple[str, torch.Tensor]]:
    basic = _basic_optimizer(engine)
    if engine.zero_optimization_stage() > 0:
        return iter(())  # masters live in flat partitions; the module weights are used instead
    return ((name, p) for group in basic.param_groups for name, p in zip(group["names"], group["params"]))


def fp32_weights(engine) -> Tensors:
    """The full state dict in fp32, masters preferred over the (maybe bf16) module weights."""
    weights = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    for name, master in _named_master_params(engine):
        weights[name] = master.detach().float().clone()
        decoder = "cls.predictions.decoder.weight"  # tied to the word embeddings in the state dict
        if name == "bert.embeddings.word_embeddings.weight" and decoder in weights:
            weights[decoder] = weights[name]
    return weights


def optimizer_moments(engine) -> tuple[dict[str, Tensors], dict[str, object]]:
    """({'exp_avg': {name: t}, 'exp_avg_sq': {...}}, {name: step}) for params with state."""
    basic = _basic_optimizer(engine)
    moments: dict[str, Tensors] = {key: {} for key in MOMENT_POWER}
    steps: dict[str, object] = {}
    for name, p in _named_master_params(engine):
        state = basic.state.get(p, {})
        for key in MOMENT_POWER:
            if key in state:
                moments[key][name] = state[key].detach().clone()
        if "step" in state:
            steps[name] = state["step"]
    return moments, steps


def load_into_engine(engine, weights: Tensors, moments: dict[str, Tensors] | None, step_value) -> int:
    """Overwrite the new engine's masters with fp32 `weights`; install carried moments. Returns how many
    parameters received carried state."""
    basic = _basic_optimizer(engine)
    carried = 0
    for name, p in _named_master_params(engine):
        if name in weights:
            p.data.copy_(weights[name].to(p.dtype))
        if moments is None or not all(name in moments[key] for key in MOMENT_POWER):
            continue
        state = {key: moments[key][name].to(p.device, p.dtype).clone() for key in MOMENT_POWER}
        state["step"] = step_value if not torch.is_tensor(step_value) else step_value.clone()
        basic.state[p] = state
        carried += 1
    return carried
