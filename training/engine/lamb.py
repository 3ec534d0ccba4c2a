"""LAMB for BERT pre-training: a pure-PyTorch foreach implementation, a plain reference, param
groups, the fused/unfused choice, and the ZeRO compatibility gate.

Semantics (per parameter tensor w with gradient g, step t, group lr / weight_decay):

    m = b1*m + (1-b1)*g                    v = b2*v + (1-b2)*g*g
    m_hat = m/(1-b1^t), v_hat = v/(1-b2^t)  (only when bias_correction; else m_hat=m, v_hat=v)
    u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w     (decoupled decay, inside the trust ratio)
    trust = clamp(||w|| / ||u||, min_trust, max_trust), or exactly 1 when ||w|| == 0 or ||u|| == 0
    w = w - lr * trust * u

Layer adaptation can be switched off per param group ('adapt': False): trust is then exactly 1, i.e. the
step is lr * u (Adam with decoupled decay). param_groups_for does that for the no-decay group (biases,
LayerNorm) by default, as NVIDIA's and TensorFlow's LAMB exclude them from adaptation: with a trust
ratio a zero-initialised bias (||w|| = 0 gives trust 1 once, then ||w|| is tiny) moves at about
min_trust * lr for hundreds of steps. Config: optimizer.exclude_from_adaptation ("no_decay" | "none").

Trust clamp defaults are [0.01, 10], the same as DeepSpeed's FusedLamb (min_coeff / max_coeff).
The trust ratio is per TENSOR, which is why a flattened ZeRO partition breaks it (see
check_zero_compat and enable_zero_partitioned_trust).

Difference from deepspeed.ops.lamb.FusedLamb (DeepSpeed 0.19.8, csrc/lamb/fused_lamb_cuda_kernel.cu):
the fused kernel does NOT bias-correct m and v inside u; it computes u = m/(sqrt(v)+eps) + wd*w
and folds the correction into the step size, lr * sqrt(1-b2^t)/(1-b1^t). Because the trust ratio
normalises |u| away, that factor survives as an extra multiplier on the step (0.32 at t=1, 0.15 at
t=10, 0.80 at t=1000, ~1 after ~5000 steps with b2=0.999), and the weight-decay term is mixed in
at a different relative weight. NVIDIA apex's FusedLAMB bias-corrects m and v like this module does.
"""
from __future__ import annotations

import logging
from collections import defaultdict

import torch

from training.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MIN_TRUST = 0.01
DEFAULT_MAX_TRUST = 10.0


def _trust(w_norm: torch.Tensor, u_norm: torch.Tensor, min_trust: float, max_trust: float) -> torch.Tensor:
    """Elementwise trust ratio from norm tensors; 1 where either norm is 0 (nothing to scale by)."""
    ok = (w_norm > 0) & (u_norm > 0)
    ratio = (w_norm / torch.where(ok, u_norm, torch.ones_like(u_norm))).clamp(min_trust, max_trust)
    return torch.where(ok, ratio, torch.ones_like(ratio))


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al., 2019) with per-tensor trust ratios; see the module docstring for the math.

    Each param group may carry its own weight_decay (0 for LayerNorm/bias, see param_groups_for), its own
    'adapt' (False: trust ratio 1, no layer adaptation; default: the `adapt` argument) and any extra keys
    (e.g. 'names'). State per param: 'exp_avg', 'exp_avg_sq' (param's shape/dtype) and 'step' (int).
    Math runs in the parameter dtype: give it fp32 params (DeepSpeed's bf16/fp16 wrappers hand it fp32
    masters).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                 bias_correction=True, min_trust=DEFAULT_MIN_TRUST, max_trust=DEFAULT_MAX_TRUST, adapt=True):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"invalid lr/eps/weight_decay: {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if not 0 < min_trust <= max_trust:
            raise ValueError(f"need 0 < min_trust <= max_trust, got {min_trust}, {max_trust}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, min_trust=min_trust, max_trust=max_trust,
                        adapt=bool(adapt))
        super().__init__(params, defaults)
        # id(flat ZeRO partition) -> layout; filled only by enable_zero_partitioned_trust.
        self._zero_layouts: dict[int, "_FlatLayout"] = {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # foreach kernels need one device and dtype per list.
            buckets = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                buckets[(p.device, p.dtype)].append(p)
            for params in buckets.values():
                self._step_bucket(group, params)
        return loss

    def _step_bucket(self, group, params):
        beta1, beta2 = group["betas"]
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])

        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        if group["bias_correction"]:
            # Steps are per param (a param may have joined later), so the corrections are lists.
            numer = torch._foreach_div(exp_avgs, [1 - beta1 ** s for s in steps])
            denom = torch._foreach_div(exp_avg_sqs, [1 - beta2 ** s for s in steps])
            torch._foreach_sqrt_(denom)
        else:
            numer = exp_avgs
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(numer, denom)
        if group["weight_decay"] != 0:
            torch._foreach_add_(updates, params, alpha=group["weight_decay"])

        flat = [i for i, p in enumerate(params) if id(p) in self._zero_layouts]
        plain = [i for i in range(len(params)) if id(params[i]) not in self._zero_layouts]
        if plain and not _adapts(group):
            torch._foreach_add_([params[i] for i in plain], [updates[i] for i in plain], alpha=-group["lr"])
        elif plain:
            ps = [params[i] for i in plain]
            us = [updates[i] for i in plain]
            # Norms and ratios stay on device: no host sync per step.
            w_norms = torch.stack(torch._foreach_norm(ps))
            u_norms = torch.stack(torch._foreach_norm(us))
            trust = _trust(w_norms, u_norms, group["min_trust"], group["max_trust"])
            torch._foreach_mul_(us, list(trust.unbind()))
            torch._foreach_add_(ps, us, alpha=-group["lr"])
        for i in flat:
            self._zero_layouts[id(params[i])].apply(params[i], updates[i], group)


def _adapts(group: dict) -> bool:
    # .get: a group restored from a checkpoint written before 'adapt' existed adapts, as it did then.
    return bool(group.get("adapt", True))


_NO_DECAY_NAME_PARTS = ("LayerNorm", "layer_norm")


EXCLUDE_FROM_ADAPTATION = ("no_decay", "none")


def param_groups_for(model: torch.nn.Module, weight_decay: float,
                     exclude_from_adaptation: str = "no_decay") -> list[dict]:
    """Split trainable params into a decay group and a no-decay group (biases, LayerNorm weights).

    exclude_from_adaptation: "no_decay" (default) sets 'adapt': False on the no-decay group (LAMB trust
    ratio 1 there, see the module docstring); "none" adapts both groups. AdamW ignores the key.

    No decay when: the owning module is a torch.nn.LayerNorm, or the name contains 'LayerNorm' /
    'layer_norm' (HF-style names, custom norm modules), or it ends in '.bias'. Frozen params are
    skipped. Each group has 'names' parallel to 'params' so optimizer state can be mapped by name;
    empty groups are dropped (DeepSpeed drops them anyway).
    """
    if exclude_from_adaptation not in EXCLUDE_FROM_ADAPTATION:
        raise ValueError(f"exclude_from_adaptation must be one of {EXCLUDE_FROM_ADAPTATION}, "
                         f"got {exclude_from_adaptation!r}")
    layer_norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)
                         for p in m.parameters(recurse=False)}
    decay = {"params": [], "names": [], "weight_decay": weight_decay, "adapt": True}
    no_decay = {"params": [], "names": [], "weight_decay": 0.0, "adapt": exclude_from_adaptation != "no_decay"}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = (id(p) in layer_norm_params or any(s in name for s in _NO_DECAY_NAME_PARTS)
                or name.endswith(".bias") or name == "bias")
        group = no_decay if skip else decay
        group["params"].append(p)
        group["names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """Optimizer state keyed by parameter name, using the 'names' lists from param_groups_for.

    Works on the client optimizer and on DeepSpeed's unfused wrapper (whose param_groups/state are
    the client's, pointing at the fp32 masters). Not meaningful for ZeRO flat partitions.
    """
    out = {}
    for group in optimizer.param_groups:
        names = group.get("names")
        if names is None or len(names) != len(group["params"]):
            raise ValueError("param group has no 'names' matching its params; build groups with param_groups_for")
        for name, p in zip(names, group["params"]):
            out[name] = optimizer.state.get(p, {})
    return out


def undo_deepspeed_init_step(engine) -> None:
    """Undo the zero-gradient step DeepSpeed's FP16_UnfusedOptimizer takes in its constructor.

    FP16_UnfusedOptimizer (used for fp16/bf16 at ZeRO stage 0 with a client optimizer) calls
    optimizer.step() once on all-zero grads to materialise state. For LAMB that is not a no-op:
    'step' becomes 1 (bias correction is then one step off for the whole run) and decayed weights
    move by lr * min(1/wd, max_trust) * wd * w in the fp32 masters only (u = wd*w gives trust 1/wd).
    Call right after deepspeed.initialize, before loading a checkpoint. Restores the masters from
    the low-precision weights they were cloned from (exact) and clears the client state.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    wrapper = engine.optimizer
    if isinstance(wrapper, FP16_UnfusedOptimizer):
        wrapper.refresh_fp32_params()
        wrapper.optimizer.state.clear()


def build_lamb(param_groups, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
               min_trust=DEFAULT_MIN_TRUST, max_trust=DEFAULT_MAX_TRUST, prefer_fused=True):
    """Return (optimizer, name): 'fused_lamb' (DeepSpeed's CUDA kernel) or 'lamb' (this module).

    Fused only when prefer_fused, every param is on CUDA and the op loads/builds. Mapping onto
    FusedLamb: min_trust/max_trust -> min_coeff/max_coeff, eps outside the sqrt
    (eps_inside_sqrt=False), max_grad_norm=0 (DeepSpeed clips before the optimizer). Its bias
    correction differs (module docstring), so fused and unfused runs are not step-for-step equal.
    Per-group weight_decay in param_groups overrides weight_decay; a group with 'adapt': False gets
    trust ratio 1 in both (FusedLamb: that group's min_coeff = max_coeff = 1, see fused_param_groups).
    """
    groups = list(param_groups)
    on_cuda = all(p.is_cuda for g in groups for p in (g["params"] if isinstance(g, dict) else [g]))
    if prefer_fused and on_cuda and torch.cuda.is_available():
        try:
            from deepspeed.ops.lamb import FusedLamb

            opt = FusedLamb(fused_param_groups(groups), lr=lr, bias_correction=bias_correction, betas=betas,
                            eps=eps, eps_inside_sqrt=False, weight_decay=weight_decay, max_grad_norm=0.0,
                            max_coeff=max_trust, min_coeff=min_trust)
            log.info("optimizer: DeepSpeed FusedLamb (CUDA kernel; bias correction folded into step size)")
            return opt, "fused_lamb"
        except Exception as err:  # op missing or JIT build failed: the pure one is always correct
            log.warning("FusedLamb unavailable (%s); using pure-PyTorch Lamb", err)
    opt = Lamb(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
               bias_correction=bias_correction, min_trust=min_trust, max_trust=max_trust)
    log.info("optimizer: pure-PyTorch foreach Lamb")
    return opt, "lamb"


def fused_param_groups(groups: list) -> list:
    """Groups for DeepSpeed's FusedLamb: it reads min_coeff/max_coeff per group and its kernel clamps the
    trust ratio into [min_coeff, max_coeff] (1 when a norm is 0), so clamping to [1, 1] is 'adapt': False."""
    out = []
    for g in groups:
        if isinstance(g, dict) and not _adapts(g):
            g = {**g, "min_coeff": 1.0, "max_coeff": 1.0}
        out.append(g)
    return out


def check_zero_compat(optimizer_name: str, zero_stage: int) -> None:
    """Refuse LAMB where the client optimizer would get flat multi-tensor partitions it cannot see into.

    ZeRO stages 1/2 give the client optimizer one flat fp32 partition per param group, so a
    per-tensor trust ratio would be computed over whole partitions. The pure Lamb handles stage 1/2
    once prepare_for_engine(engine, optimizer) has run (tested against ZeRO 0 on 2 ranks); the fused
    CUDA kernel cannot, and stage 3 is not supported.
    """
    name = optimizer_name.lower()
    if "lamb" in name and zero_stage >= 1 and (name != "lamb" or zero_stage >= 3):
        raise UserError(f"LAMB trust ratios are per tensor but ZeRO stage {zero_stage} flattens parameters "
                        "into partitions; use zero_stage 0 or optimizer adamw")


def prepare_for_engine(engine, optimizer) -> None:
    """Call right after deepspeed.initialize (before load_checkpoint) with the client optimizer.

    ZeRO 0 + fp16/bf16: undo FP16_UnfusedOptimizer's init step (undo_deepspeed_init_step).
    ZeRO 1/2: register the flat-partition layout (enable_zero_partitioned_trust); required, or the
    trust ratios silently cover whole partitions. Other flattening wrappers are refused.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    wrapper = engine.optimizer
    if isinstance(wrapper, DeepSpeedZeroOptimizer):
        if not isinstance(optimizer, Lamb):
            raise UserError("LAMB under ZeRO stage 1/2 needs the pure-PyTorch Lamb (prefer_fused=False)")
        enable_zero_partitioned_trust(wrapper, optimizer)
    elif isinstance(wrapper, BF16_Optimizer) or engine.zero_optimization_stage() >= 3:
        raise UserError(f"LAMB trust ratios are per tensor but {type(wrapper).__name__} flattens parameters; "
                        "use zero_stage 0 or optimizer adamw")
    else:
        undo_deepspeed_init_step(engine)


# ---------------------------------------------------------------------------------------------
# ZeRO stage 1/2: per-tensor trust ratios over flat partitions.
#
# DeepSpeed 0.19.8's DeepSpeedZeroOptimizer gives the client optimizer, per param group i, the
# flat fp32 tensor single_partition_of_fp32_groups[i] (this rank's slice of the padded, flattened
# group) and calls step() once per group with only that group visible. Each low-precision param
# that has elements in this rank's slice carries param._hp_mapping, whose hp_fragment_address
# (start, numel) says where they are in the flat partition. So: label each element of the flat
# partition with its param's index in bit16_groups[i] (padding gets a spare label), sum w^2 and
# u^2 per label, all-reduce those sums over the data-parallel group (one small all-reduce per
# group per step; every rank steps every group, so the collectives line up), and expand the
# resulting per-tensor trust ratio back to elements.
# ---------------------------------------------------------------------------------------------


class _FlatLayout:
    def __init__(self, labels: torch.Tensor, n_params: int, process_group):
        self.labels = labels          # int64 per element of the flat partition; n_params = padding
        self.n_params = n_params
        self.process_group = process_group

    def apply(self, flat_param, update, group):
        import deepspeed.comm as dist

        if not _adapts(group):  # trust 1: no norms, no all-reduce (the flag is the same group on every rank)
            flat_param.add_(update, alpha=-group["lr"])
            return
        sums = torch.zeros(2, self.n_params + 1, dtype=torch.float32, device=flat_param.device)
        sums[0].index_add_(0, self.labels, flat_param.float().square())
        sums[1].index_add_(0, self.labels, update.float().square())
        dist.all_reduce(sums, group=self.process_group)
        trust = _trust(sums[0].sqrt(), sums[1].sqrt(), group["min_trust"], group["max_trust"])
        flat_param.add_(update * trust.to(update.dtype)[self.labels], alpha=-group["lr"])


def enable_zero_partitioned_trust(zero_optimizer, lamb: Lamb) -> None:
    """Teach `lamb` the per-tensor layout of a DeepSpeed stage 1/2 optimizer's flat partitions.

    Call after deepspeed.initialize with engine.optimizer (DeepSpeedZeroOptimizer) and the client
    Lamb. Layout is fixed at engine init (it survives checkpoint load: same model, same world).
    """
    if not isinstance(lamb, Lamb):
        raise TypeError("partitioned trust ratios need the pure-PyTorch Lamb")
    flats = zero_optimizer.single_partition_of_fp32_groups
    for i, flat in enumerate(flats):
        labels = torch.full((flat.numel(),), len(zero_optimizer.bit16_groups[i]), dtype=torch.long,
                            device=flat.device)
        for j, lp in enumerate(zero_optimizer.bit16_groups[i]):
            mapping = getattr(lp, "_hp_mapping", None)
            if mapping is None:  # no elements of this tensor live on this rank
                continue
            addr = mapping.get_hp_fragment_address()
            labels[addr.start:addr.start + addr.numel] = j
        lamb._zero_layouts[id(flat)] = _FlatLayout(labels, len(zero_optimizer.bit16_groups[i]),
                                                   zero_optimizer.real_dp_process_group[i])
