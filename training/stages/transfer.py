"""Move weights and optimizer state from one engine to the next at a stage boundary, by parameter name.

Weights are taken from the fp32 masters where DeepSpeed keeps them (bf16/fp16 runs), so a transition
loses no precision; the new engine's masters are then overwritten with the transformed fp32 values.
At ZeRO 0 the masters are the client optimizer's params; at ZeRO 1/2 each rank holds a slice of every
master in its flat partition, so each full master is assembled with DeepSpeed's public
`deepspeed.utils.safe_get_full_fp32_param` (an all-reduce over the data-parallel group: every rank calls
fp32_weights, in the same parameter order) and written back, slice by slice, with
`safe_set_full_fp32_param` (local). Parameters the optimizer does not hold (frozen ones) come from the
module. State is matched by name through the `names` list of each param group (training.engine.lamb
.param_groups_for), never by index. ZeRO 0 only for carried state: ZeRO 1/2 keep state in flat
partitions (the config refuses `optimizer_state: carry` there).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch

Tensors = dict[str, torch.Tensor]
# The `moment` a hook transform gets (training/stages/hooks.py): 0 for the weights themselves; for each
# optimizer moment the power its gradient factor is raised to (moments follow the gradients, see growth.py).
WEIGHTS = 0
MOMENT_POWER = {"exp_avg": 1, "exp_avg_sq": 2}


def _basic_optimizer(engine):
    """The client optimizer whose param groups hold the tensors it updates (fp32 masters or the params)."""
    wrapper = engine.optimizer
    return getattr(wrapper, "optimizer", wrapper)


def _partitioned(engine) -> bool:
    """ZeRO 1/2: the fp32 masters live in per-rank flat partitions, not in the client's param groups."""
    return engine.zero_optimization_stage() in (1, 2)


def named_master_params(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, fp32 master) pairs at ZeRO 0; nothing under ZeRO 1/2 (see _partitioned_masters)."""
    basic = _basic_optimizer(engine)
    if _partitioned(engine):
        return iter(())
    return ((name, p) for group in basic.param_groups for name, p in zip(group["names"], group["params"]))


def _linked_params(engine) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """ZeRO 1/2: the module's parameters that DeepSpeed linked to a master slice (the ones the optimizer
    holds), in named_parameters() order, which is the same on every rank."""
    for name, p in engine.module.named_parameters():
        if hasattr(p, "_hp_mapping"):  # set (maybe to None: no slice on this rank) on every held param
            yield name, p


def _partitioned_masters(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """ZeRO 1/2: every full fp32 master (a fresh tensor), assembled from all ranks' slices: one all-reduce
    per parameter over the data-parallel group. Collective: all ranks call."""
    from deepspeed.utils import safe_get_full_fp32_param

    for name, p in _linked_params(engine):
        yield name, safe_get_full_fp32_param(p).detach()


def fp32_weights(engine) -> Tensors:
    """The full state dict in fp32, masters preferred over the (maybe bf16) module weights. Under ZeRO 1/2
    this is a collective (one all-reduce per parameter): every rank must call it."""
    weights = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    if _partitioned(engine):
        masters = _partitioned_masters(engine)
    else:
        masters = ((name, p.detach().float().clone()) for name, p in named_master_params(engine))
    for name, master in masters:
        weights[name] = master
        decoder = "cls.predictions.decoder.weight"  # tied to the word embeddings in the state dict
        if name == "bert.embeddings.word_embeddings.weight" and decoder in weights:
            weights[decoder] = weights[name]
    return weights


def optimizer_moments(engine) -> tuple[dict[str, Tensors], dict[str, object]]:
    """({'exp_avg': {name: t}, 'exp_avg_sq': {...}}, {name: step}) for params with state."""
    basic = _basic_optimizer(engine)
    moments: dict[str, Tensors] = {key: {} for key in MOMENT_POWER}
    steps: dict[str, object] = {}
    for name, p in named_master_params(engine):
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
    if _partitioned(engine):  # each rank writes its own slice of each master (local, no collective)
        if moments is not None:
            raise RuntimeError("carried optimizer state under ZeRO 1/2 is not supported (the config refuses "
                               "optimizer_state: carry there)")
        from deepspeed.utils import safe_set_full_fp32_param

        for name, p in _linked_params(engine):
            if name in weights:
                safe_set_full_fp32_param(p, weights[name].to(p.device, torch.float32))
        return 0
    for name, p in named_master_params(engine):
        if name in weights:
            p.data.copy_(weights[name].to(p.dtype))
        if moments is None or not all(name in moments[key] for key in MOMENT_POWER):
            continue
        state = {key: moments[key][name].to(p.device, p.dtype).clone() for key in MOMENT_POWER}
        state["step"] = step_value if not torch.is_tensor(step_value) else step_value.clone()
        basic.state[p] = state
        carried += 1
    return carried


def rebuild(entered, steps: dict[str, object], build: Callable[[torch.nn.Module], Any]) -> tuple[Any, torch.nn.Module, int]:
    """The engine of a new stage, from what its hook returned (protocol.Entered): the module built from the
    entered model config and weights, its engine (`build`: the runner's, which lets the stage's hook prepare
    the module before the optimizer sees it), then the fp32 weights and the carried moments written into the
    engine's masters (`steps`: the old optimizer's step per parameter; {} when the state is reset). The
    caller drops the old engine first, so both never live at once. Returns (engine, module, parameters that
    received carried state)."""
    from training.model.bert import BertForPreTraining

    # The module's copy of the weights (built without a random initialisation to overwrite), which DeepSpeed
    # casts to bf16/fp16; the fp32 masters it builds from that cast copy are rounded, so the weights are written
    # into them too (load_into_engine): the only two writes.
    model = BertForPreTraining.from_weights(entered.model, entered.weights)
    engine = build(model)
    step_value = max(steps.values(), default=0) if steps else 0
    carried = load_into_engine(engine, entered.weights, entered.moments if steps else None, step_value)
    return engine, model, carried
