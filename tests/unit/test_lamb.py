"""Foreach Lamb vs the plain per-tensor reference, param groups, DeepSpeed integration, ZeRO gate.

Tolerance: fp32, rtol 1e-6 / atol 1e-7 (the two differ only in reduction order of the norms).
"""
import copy

import pytest
import torch

from tests.helpers.lamb_reference import TinyLambModel, reference_lamb_step
from training.engine.lamb import (Lamb, build_lamb, check_zero_compat, fused_param_groups, param_groups_for,
                                  state_by_name)
from training.errors import UserError

RTOL, ATOL = 1e-6, 1e-7


def _tensors(gen):
    """Mixed shapes and the edge cases: zero tensor (trust 1), huge and tiny norms (clamp engages)."""
    return {
        "dense.weight": torch.randn(16, 8, generator=gen),
        "dense.bias": torch.randn(16, generator=gen) * 0.1,
        "conv.weight": torch.randn(3, 2, 3, 3, generator=gen),
        "zero.weight": torch.zeros(8, 8),
        "huge.weight": torch.randn(4, 4, generator=gen) * 1e3,   # ||w||/||u|| >> 10
        "tiny.weight": torch.randn(4, 4, generator=gen) * 1e-6,  # ||w||/||u|| << 0.01
        "double.weight": torch.randn(5, 3, generator=gen, dtype=torch.float64),  # second dtype bucket
        "tiny.bias": torch.randn(6, generator=gen) * 1e-6,  # no-decay: clamped to 0.01 only when adapted
    }


_NO_DECAY = {"dense.bias", "zero.weight", "tiny.bias"}


# groups: "single" = one group, every tensor adapted; "split" = decay + no-decay groups, both adapted;
# "split_exclude" = the no-decay group with 'adapt': False (the default of param_groups_for);
# "single_no_adapt" = one group, layer adaptation off through the constructor default.
@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("groups_kind", ["single", "split", "split_exclude", "single_no_adapt"])
def test_foreach_lamb_matches_reference(bias_correction, groups_kind):
    gen = torch.Generator().manual_seed(1)
    init = _tensors(gen)
    names = list(init)
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    wd = 0.01
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, bias_correction=bias_correction)
    if groups_kind.startswith("split"):
        groups = [{"params": [params[n] for n in names if n not in _NO_DECAY], "weight_decay": wd},
                  {"params": [params[n] for n in names if n in _NO_DECAY], "weight_decay": 0.0}]
        if groups_kind == "split_exclude":
            groups[1]["adapt"] = False
        opt = Lamb(groups, **kw)
    else:
        groups = [{"params": list(params.values()), "weight_decay": 0.0}]
        opt = Lamb(groups, **kw, adapt=groups_kind != "single_no_adapt")

    ref = {n: t.clone() for n, t in init.items()}
    ref_states = {n: {} for n in names}
    for _ in range(5):
        grads = {n: torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in init.items()}
        grads["zero.weight"].zero_()  # zero weight and zero update: both norms 0
        for n in names:
            params[n].grad = grads[n].clone()
        opt.step()
        trusts = {}
        for group in groups:
            gnames = [n for n in names if any(params[n] is p for p in group["params"])]
            used = reference_lamb_step([ref[n] for n in gnames], [grads[n] for n in gnames],
                                       [ref_states[n] for n in gnames], weight_decay=group["weight_decay"],
                                       adapt=group["adapt"], **kw)
            trusts.update(zip(gnames, used))
        for n in names:
            torch.testing.assert_close(params[n].detach(), ref[n], rtol=RTOL, atol=ATOL, msg=n)
            st = opt.state[params[n]]
            torch.testing.assert_close(st["exp_avg"], ref_states[n]["exp_avg"], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(st["exp_avg_sq"], ref_states[n]["exp_avg_sq"], rtol=RTOL, atol=ATOL)
            assert st["step"] == ref_states[n]["step"]
        # The edge cases really were exercised.
        assert trusts["zero.weight"] == 1.0
        if groups_kind == "single_no_adapt":
            assert set(trusts.values()) == {1.0}
            continue
        assert trusts["huge.weight"] == 10.0
        assert trusts["tiny.weight"] == 0.01
        assert 0.01 < trusts["dense.weight"] < 10.0
        if groups_kind == "split_exclude":
            assert all(trusts[n] == 1.0 for n in _NO_DECAY)
        else:
            assert trusts["tiny.bias"] == 0.01


def test_excluded_zero_bias_moves_at_lr():
    """The issue's case: a zero-initialised bias. Adapted, after the first step (trust 1 at ||w|| = 0) its
    trust ratio is ||w|| / ||u|| ~ lr, clamped to min_trust; excluded, it steps by lr * u throughout."""
    lr, steps = 1e-3, 5
    moved = {}
    for adapt in (True, False):
        bias = torch.nn.Parameter(torch.zeros(64))
        opt = Lamb([{"params": [bias], "weight_decay": 0.0, "adapt": adapt}], lr=lr)
        grad = torch.randn(64, generator=torch.Generator().manual_seed(0)).sign()
        for _ in range(steps):
            bias.grad = grad.clone()  # a constant gradient: u = m_hat / (sqrt(v_hat) + eps) = +-1 / (1 + eps)
            opt.step()
        moved[adapt] = bias.detach().abs().mean().item()
    # Excluded: ~lr per element per step. Adapted: lr on step 1, then min_trust * lr per step.
    assert moved[False] == pytest.approx(steps * lr, rel=0.01)
    assert moved[True] == pytest.approx(lr + (steps - 1) * 0.01 * lr, rel=0.01)


def test_param_without_grad_is_left_alone():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Lamb([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    assert not torch.equal(a.detach(), torch.ones(3))


def test_trust_clamp_is_configurable():
    w = torch.nn.Parameter(torch.full((4,), 1e3))
    opt = Lamb([w], lr=1.0, weight_decay=0.0, max_trust=2.0)
    w.grad = torch.ones(4)
    opt.step()  # u = m_hat/(sqrt(v_hat)+eps) ~ 1 per element, trust clamped to 2
    torch.testing.assert_close(w.detach(), torch.full((4,), 1e3 - 2.0 / (1 + 1e-6)))


def test_param_groups_for_splits_decay():
    groups = param_groups_for(TinyLambModel(), 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert [g["adapt"] for g in groups] == [True, False]  # default: no layer adaptation for bias/LayerNorm
    assert [g["adapt"] for g in param_groups_for(TinyLambModel(), 0.01, "none")] == [True, True]
    with pytest.raises(ValueError, match="exclude_from_adaptation"):
        param_groups_for(TinyLambModel(), 0.01, "all")
    assert groups[0]["names"] == ["embed.weight", "dense.weight", "out.weight"]
    assert groups[1]["names"] == ["LayerNorm.weight", "LayerNorm.bias", "dense.bias", "norm.weight", "norm.bias"]
    model = TinyLambModel()
    named = dict(model.named_parameters())
    for g in param_groups_for(model, 0.01):
        assert all(named[n] is p for n, p in zip(g["names"], g["params"]))


def test_state_maps_by_name():
    torch.manual_seed(0)
    model = TinyLambModel()
    opt = Lamb(param_groups_for(model, 0.01), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    states = state_by_name(opt)
    named = dict(model.named_parameters())
    assert set(states) == {n for n, p in named.items() if p.requires_grad}
    for n, st in states.items():
        assert st["exp_avg"].shape == named[n].shape and st["step"] == 1
    # Survives a state_dict round trip into a fresh optimizer (torch keys state by index; names
    # come back from the groups we build, in the same order).
    opt2 = Lamb(param_groups_for(model, 0.01), lr=1e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for n, st in state_by_name(opt2).items():
        torch.testing.assert_close(st["exp_avg_sq"], states[n]["exp_avg_sq"])


def test_build_lamb_falls_back_to_pure_on_cpu():
    opt, name = build_lamb(param_groups_for(TinyLambModel(), 0.01), lr=1e-3)
    assert name == "lamb" and isinstance(opt, Lamb)
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[0]["adapt"] is True and opt.param_groups[1]["adapt"] is False


def test_fused_groups_clamp_trust_to_one_where_not_adapted():
    """FusedLamb reads min_coeff/max_coeff per group and clamps its trust ratio into them: [1, 1] is trust 1."""
    groups = param_groups_for(TinyLambModel(), 0.01)
    fused = fused_param_groups(groups)
    assert "min_coeff" not in fused[0] and "max_coeff" not in fused[0]  # the optimizer-wide clamp applies
    assert fused[1]["min_coeff"] == fused[1]["max_coeff"] == 1.0
    assert fused[1]["params"] is groups[1]["params"] and "min_coeff" not in groups[1]  # caller's dicts untouched
    assert all("min_coeff" not in g for g in fused_param_groups(param_groups_for(TinyLambModel(), 0.01, "none")))


@pytest.mark.parametrize("choice, adapts", [("no_decay", [True, False]), ("none", [True, True])])
def test_config_exclude_from_adaptation_reaches_the_optimizer(choice, adapts):
    from training.config import RunConfig
    from training.engine.build import build_optimizer

    cfg = RunConfig.model_validate({"train": {"max_steps": 1}, "optimizer": {"exclude_from_adaptation": choice}})
    opt, name = build_optimizer(TinyLambModel(), cfg)
    assert name == "lamb" and [g["adapt"] for g in opt.param_groups] == adapts
    assert RunConfig.model_validate({"train": {"max_steps": 1}}).optimizer.exclude_from_adaptation == "no_decay"
    with pytest.raises(Exception, match="exclude_from_adaptation"):
        RunConfig.model_validate({"train": {"max_steps": 1}, "optimizer": {"exclude_from_adaptation": "all"}})


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_check_zero_compat(stage):
    with pytest.raises(UserError, match=f"ZeRO stage {stage} flattens"):
        check_zero_compat("fused_lamb", stage)
    if stage == 3:
        with pytest.raises(UserError, match="ZeRO stage 3 flattens"):
            check_zero_compat("lamb", stage)
    else:  # partition-aware trust ratios, see test_zero12_partitioned_trust_matches_zero0
        check_zero_compat("lamb", stage)
    check_zero_compat("lamb", 0)
    check_zero_compat("fused_lamb", 0)
    check_zero_compat("adamw", stage)
