"""Foreach Lamb vs the plain per-tensor reference, param groups, DeepSpeed integration, ZeRO gate.

Tolerance: fp32, rtol 1e-6 / atol 1e-7 (the two differ only in reduction order of the norms).
"""
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.lamb_reference import reference_lamb_step
from training.engine.lamb import (Lamb, build_lamb, check_zero_compat, fused_param_groups, param_groups_for,
                                  prepare_for_engine, state_by_name, undo_deepspeed_init_step)
from training.errors import UserError

RTOL, ATOL = 1e-6, 1e-7
REPO = Path(__file__).resolve().parents[1]


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


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.LayerNorm = torch.nn.LayerNorm(8)  # HF-style name
        self.dense = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)  # matched by type, not name
        self.out = torch.nn.Linear(8, 3, bias=False)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.out(self.norm(self.dense(self.LayerNorm(self.embed(x)))))


def test_param_groups_for_splits_decay():
    groups = param_groups_for(_Tiny(), 0.01)
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
    assert [g["adapt"] for g in groups] == [True, False]  # default: no layer adaptation for bias/LayerNorm
    assert [g["adapt"] for g in param_groups_for(_Tiny(), 0.01, "none")] == [True, True]
    with pytest.raises(ValueError, match="exclude_from_adaptation"):
        param_groups_for(_Tiny(), 0.01, "all")
    assert groups[0]["names"] == ["embed.weight", "dense.weight", "out.weight"]
    assert groups[1]["names"] == ["LayerNorm.weight", "LayerNorm.bias", "dense.bias", "norm.weight", "norm.bias"]
    model = _Tiny()
    named = dict(model.named_parameters())
    for g in param_groups_for(model, 0.01):
        assert all(named[n] is p for n, p in zip(g["names"], g["params"]))


def test_state_maps_by_name():
    torch.manual_seed(0)
    model = _Tiny()
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
    opt, name = build_lamb(param_groups_for(_Tiny(), 0.01), lr=1e-3)
    assert name == "lamb" and isinstance(opt, Lamb)
    assert opt.param_groups[0]["weight_decay"] == 0.01 and opt.param_groups[1]["weight_decay"] == 0.0
    assert opt.param_groups[0]["adapt"] is True and opt.param_groups[1]["adapt"] is False


def test_fused_groups_clamp_trust_to_one_where_not_adapted():
    """FusedLamb reads min_coeff/max_coeff per group and clamps its trust ratio into them: [1, 1] is trust 1."""
    groups = param_groups_for(_Tiny(), 0.01)
    fused = fused_param_groups(groups)
    assert "min_coeff" not in fused[0] and "max_coeff" not in fused[0]  # the optimizer-wide clamp applies
    assert fused[1]["min_coeff"] == fused[1]["max_coeff"] == 1.0
    assert fused[1]["params"] is groups[1]["params"] and "min_coeff" not in groups[1]  # caller's dicts untouched
    assert all("min_coeff" not in g for g in fused_param_groups(param_groups_for(_Tiny(), 0.01, "none")))


@pytest.mark.parametrize("choice, adapts", [("no_decay", [True, False]), ("none", [True, True])])
def test_config_exclude_from_adaptation_reaches_the_optimizer(choice, adapts):
    from training.config import RunConfig
    from training.engine.build import build_optimizer

    cfg = RunConfig.model_validate({"train": {"max_steps": 1}, "optimizer": {"exclude_from_adaptation": choice}})
    opt, name = build_optimizer(_Tiny(), cfg)
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


# ---------------------------------------------------------------------------------------------
# DeepSpeed, ZeRO 0, bf16: the engine wraps our Lamb in FP16_UnfusedOptimizer.
# ---------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_rank_env():
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    old = {k: os.environ.get(k) for k in env}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    yield
    if torch.distributed.is_initialized():
        # deepspeed.initialize made a process group from these; later tests in this process (conftest's
        # dist_single) reuse that group, and DeepSpeed reads LOCAL_RANK again on every initialize.
        return
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)


def _bf16_engine(lr=1e-2, wd=0.01):
    import deepspeed

    torch.manual_seed(0)
    model = _Tiny()
    opt = Lamb(param_groups_for(model, wd), lr=lr)
    # DeepSpeed 0.19.8 defaults gradient_clipping to 1.0; turn it off to compare with the bare reference.
    cfg = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
           "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, opt


def test_deepspeed_bf16_zero0_keeps_per_tensor_fp32_masters(single_rank_env):
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    engine, opt = _bf16_engine()
    wrapper = engine.optimizer
    assert isinstance(wrapper, FP16_UnfusedOptimizer)
    for group, lp, hp in zip(opt.param_groups, wrapper.fp16_groups, wrapper.fp32_groups):
        assert group["params"] is hp  # the client optimizer steps the fp32 masters...
        for lo, hi in zip(lp, hp):  # ...one per model tensor, same shape
            assert lo.dtype == torch.bfloat16 and hi.dtype == torch.float32 and lo.shape == hi.shape
    # The wrapper's constructor already stepped once on zero grads: step is 1 and decayed masters moved.
    assert all(opt.state[p]["step"] == 1 for g in opt.param_groups for p in g["params"])
    assert any(not torch.equal(lo.float(), hi) for lo, hi in zip(wrapper.fp16_groups[0], wrapper.fp32_groups[0]))
    undo_deepspeed_init_step(engine)
    assert len(opt.state) == 0
    for lp, hp in zip(wrapper.fp16_groups, wrapper.fp32_groups):
        assert all(torch.equal(lo.float(), hi) for lo, hi in zip(lp, hp))


def test_deepspeed_bf16_zero0_update_equals_reference(single_rank_env):
    engine, opt = _bf16_engine()
    prepare_for_engine(engine, opt)  # = undo_deepspeed_init_step here
    wrapper = engine.optimizer
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6)
    ref_states = [[{} for _ in g] for g in wrapper.fp32_groups]
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randint(0, 10, (4, 5), generator=gen)
        loss = engine(x).float().pow(2).mean()
        engine.backward(loss)
        # What the client optimizer will see: fp32 masters and the bf16 grads cast to fp32.
        masters = [[p.detach().clone() for p in g] for g in wrapper.fp32_groups]
        grads = [[p.grad.float() for p in g] for g in wrapper.fp16_groups]
        engine.step()
        for group, m, g, st in zip(opt.param_groups, masters, grads, ref_states):
            reference_lamb_step(m, g, st, weight_decay=group["weight_decay"], adapt=group["adapt"], **kw)
            for got, want in zip(group["params"], m):
                torch.testing.assert_close(got.detach(), want, rtol=RTOL, atol=ATOL)
    for n, st in state_by_name(engine.optimizer).items():
        assert st["step"] == 3, n
    # bf16 model weights are the rounded masters.
    for lp, hp in zip(wrapper.fp16_groups, wrapper.fp32_groups):
        assert all(torch.equal(lo, hi.to(torch.bfloat16)) for lo, hi in zip(lp, hp))


# ---------------------------------------------------------------------------------------------
# ZeRO 1/2 with partition-aware trust ratios, two ranks: `deepspeed --num_gpus 2 tests/test_lamb.py OUT`
# trains the same model under ZeRO 0, 1, 2 (and 1 without the fix), with the no-decay group excluded from
# layer adaptation (the default) and with every tensor adapted ("_all"); rank 0 saves final weights.
# ---------------------------------------------------------------------------------------------

def _zero_worker(out_path):
    import deepspeed
    import deepspeed.comm as dist

    from training.engine.lamb import prepare_for_engine

    results, straddles = {}, False
    runs = (("z0", 0, False, "no_decay"), ("z1", 1, True, "no_decay"), ("z2", 2, True, "no_decay"),
            ("z1_naive", 1, False, "no_decay"), ("z0_all", 0, False, "none"), ("z2_all", 2, True, "none"))
    for label, stage, fix, exclude in runs:
        torch.manual_seed(0)
        model = _Tiny()
        opt = Lamb(param_groups_for(model, 0.01, exclude), lr=1e-2)
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
               "zero_optimization": {"stage": stage}}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        if fix:
            prepare_for_engine(engine, opt)
            for group in engine.optimizer.bit16_groups:
                for p in group:
                    m = getattr(p, "_hp_mapping", None)
                    straddles |= m is not None and 0 < m.get_hp_fragment_address().numel < p.numel()
        gen = torch.Generator().manual_seed(10 + dist.get_rank())  # different data per rank
        for _ in range(4):
            loss = engine(torch.randint(0, 10, (4, 5), generator=gen)).pow(2).mean()
            engine.backward(loss)
            engine.step()
        results[label] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if dist.get_rank() == 0:
        results["straddles"] = straddles
        torch.save(results, out_path)
    # Leave together and skip the interpreter's teardown: a rank whose gloo/store threads are destroyed while its
    # peer still works can abort at exit ("terminate called without an active exception") after the results
    # are written (as bench/mslt.py's spawned ranks do).
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow
def test_zero12_partitioned_trust_matches_zero0(tmp_path):
    out = tmp_path / "zero.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    launcher = Path(sys.executable).with_name("deepspeed")
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), __file__, str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = torch.load(out)
    assert res["straddles"], "no tensor straddles the partition boundary; the test would prove little"
    for label, base in (("z1", "z0"), ("z2", "z0"), ("z2_all", "z0_all")):
        for n, want in res[base].items():
            torch.testing.assert_close(res[label][n], want, rtol=1e-5, atol=1e-6, msg=f"{label} {n}")
    # The exclusion changed the no-decay tensors (so the comparison above covered a real difference).
    assert not torch.allclose(res["z0"]["dense.bias"], res["z0_all"]["dense.bias"], rtol=1e-4, atol=1e-5)
    # Without the fix, trust ratios over whole partitions give visibly different weights.
    assert any(not torch.allclose(res["z1_naive"][n], w, rtol=1e-4, atol=1e-5) for n, w in res["z0"].items())


if __name__ == "__main__":
    _zero_worker(sys.argv[-1])
