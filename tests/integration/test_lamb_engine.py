"""LAMB inside DeepSpeed engines: bf16 ZeRO 0 keeps per-tensor fp32 masters and matches the reference step;
ZeRO 1/2's partitioned trust ratios match ZeRO 0 (two ranks, run as a script by the DeepSpeed launcher)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import paths as PATHS
from tests.helpers.lamb_reference import TinyLambModel, reference_lamb_step
from training.engine.lamb import Lamb, param_groups_for, prepare_for_engine, state_by_name, undo_deepspeed_init_step

REPO = PATHS.REPO


RTOL, ATOL = 1e-6, 1e-7


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bf16_engine(lr=1e-2, wd=0.01):
    import deepspeed

    torch.manual_seed(0)
    model = TinyLambModel()
    opt = Lamb(param_groups_for(model, wd), lr=lr)
    # DeepSpeed 0.19.8 defaults gradient_clipping to 1.0; turn it off to compare with the bare reference.
    cfg = {"train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}, "zero_optimization": {"stage": 0},
           "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine, opt


# ---------------------------------------------------------------------------------------------
# DeepSpeed, ZeRO 0, bf16: the engine wraps our Lamb in FP16_UnfusedOptimizer.
# ---------------------------------------------------------------------------------------------


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



# ---------------------------------------------------------------------------------------------
# ZeRO 1/2 with partition-aware trust ratios, two ranks: `deepspeed --num_gpus 2 tests/integration/test_lamb_engine.py OUT`
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
        model = TinyLambModel()
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

if __name__ == "__main__":
    _zero_worker(sys.argv[-1])
