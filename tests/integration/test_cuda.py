"""What only a CUDA GPU can check: the compiled Triton kernels inside the whole model, a training run through
DeepSpeed on the GPU (bf16 with every kernel, fp16 with dynamic loss scaling, resume), and DeepSpeed's fused
LAMB against the rule our docs say it follows. Without a GPU every test here skips with its reason; the
kernels' own tests (tests/unit/test_kernels_*.py) run compiled on CUDA too.

On a GPU machine: DS_ACCELERATOR=cuda pytest -q tests/integration/test_cuda.py tests/unit/test_kernels_*.py
"""
import json
import os

import pytest
import torch

from tests.helpers.kernels_testing import rel_err
from tests.helpers.tiny_run import make_runner, tiny_config
from training.engine import checkpoint

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
needs_cuda_engine = pytest.mark.skipif(
    not CUDA or os.environ.get("DS_ACCELERATOR") != "cuda",
    reason="needs a CUDA GPU and DS_ACCELERATOR=cuda (DeepSpeed binds its accelerator at import)")

ALL_OPS = ["bias_gelu", "residual_layernorm", "mlm_loss"]


def _model_pair(seed: int, dtype: torch.dtype, **shape):
    from training.model import BertForPreTraining, ModelConfig
    base = dict(vocab_size=1000, hidden_size=128, num_layers=2, num_heads=4, ffn_size=512, max_position=128,
                dropout=0.0, attention_dropout=0.0, **shape)
    torch.manual_seed(seed)
    ref = BertForPreTraining(ModelConfig(**base, attention="eager")).cuda().train()  # fp32, no kernels
    plain = BertForPreTraining(ModelConfig(**base, attention="sdpa")).cuda().to(dtype).train()
    kern = BertForPreTraining(ModelConfig(**base, attention="fused", fused_ops=ALL_OPS)).cuda().to(dtype).train()
    plain.load_state_dict(ref.state_dict())
    kern.load_state_dict(ref.state_dict())
    return ref, plain, kern


def _batch(seed: int, batch: int = 6, seq: int = 96, vocab: int = 1000):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, real in enumerate(torch.randint(seq // 3, seq + 1, (batch,), generator=g).tolist()):
        mask[row, real:] = 0  # padded rows of random real lengths
    labels = torch.full((batch, seq), -100)
    pick = (torch.rand(batch, seq, generator=g) < 0.15) & mask.bool()
    labels[pick] = torch.randint(5, vocab, (int(pick.sum()),), generator=g)
    return ids.cuda(), mask.cuda(), labels.cuda()


def _loss_and_grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, mask, labels=labels)
    out["loss"].backward()
    return out, {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@needs_cuda
@pytest.mark.parametrize("dtype,seed", [(torch.float32, 0), (torch.bfloat16, 1), (torch.float16, 2)])
def test_model_with_every_kernel_is_as_accurate_as_pytorch_on_cuda(fresh_fused_ops, dtype, seed):
    """The whole model with the compiled kernels (attention, bias-GeLU, residual LayerNorm, MLM loss) against an
    fp32 eager reference with the same weights, forward and every gradient: the kernels' error is at most twice
    PyTorch's own error in the same dtype (plus a floor: fp32 matmuls may run as tf32 in both)."""
    ref, plain, kern = _model_pair(seed, dtype)
    ids, mask, labels = _batch(seed + 100)
    out_ref, g_ref = _loss_and_grads(ref, ids, mask, labels)
    out_plain, g_plain = _loss_and_grads(plain, ids, mask, labels)
    out_kern, g_kern = _loss_and_grads(kern, ids, mask, labels)
    for op in fresh_fused_ops.ALL_OPS:  # every kernel really ran: nothing fell back to PyTorch
        assert not op.logged, (op.name, op.logged)
    floor = 2e-3 if dtype == torch.float32 else 1e-2
    loss_err = abs(out_kern["loss"].item() - out_ref["loss"].item()) / out_ref["loss"].item()
    assert loss_err <= 2 * abs(out_plain["loss"].item() - out_ref["loss"].item()) / out_ref["loss"].item() + floor
    worst = []
    for name, ref_grad in g_ref.items():
        e_kern, e_plain = rel_err(g_kern[name], ref_grad), rel_err(g_plain[name], ref_grad)
        worst.append((e_kern - 2 * e_plain, name, e_kern, e_plain))
        assert torch.isfinite(g_kern[name]).all(), name
    worst.sort(reverse=True)
    _, name, e_kern, e_plain = worst[0]
    assert e_kern <= 2 * e_plain + floor, f"{name}: kernels {e_kern:.2e} vs PyTorch {e_plain:.2e} (same dtype)"


# ------------------------------------------------------------------------------ training through DeepSpeed

def _train_losses(out_dir) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@needs_cuda_engine
def test_bf16_training_with_every_kernel_tracks_sdpa_on_cuda(tmp_path, tiny_data, dist_single, fresh_fused_ops):
    """Eight LAMB steps through DeepSpeed on the GPU, bf16: the run with every kernel logs the same losses as the
    PyTorch path to bf16 tolerance, learns, and never falls back."""
    common = ["train.precision=bf16", "train.max_steps=8", "model.dropout=0.1", "model.attention_dropout=0.1"]
    plain = make_runner(tiny_config(tmp_path / "plain", tiny_data, common + ["model.attention=sdpa"]), device="cuda")
    plain.run()
    kern = make_runner(tiny_config(tmp_path / "kern", tiny_data, common + [
        "model.attention=fused", f"model.fused_ops=[{','.join(ALL_OPS)}]"]), device="cuda")
    kern.run()
    for op in fresh_fused_ops.ALL_OPS:
        assert not op.logged, (op.name, op.logged)
    a, b = _train_losses(tmp_path / "plain" / "out"), _train_losses(tmp_path / "kern" / "out")
    assert len(a) == len(b) == 8
    # dropout masks differ (kernels draw their own), so step losses agree loosely; the first is dropout-noise only
    assert all(abs(x - y) < 0.15 for x, y in zip(a, b)), (a, b)
    assert b[-1] < b[0], b


@needs_cuda_engine
def test_resume_on_cuda_with_kernels_repeats_the_run(tmp_path, tiny_data, dist_single, fresh_fused_ops):
    """Cut at step 3 and resumed: steps 4-6 log the losses of the uncut run (the kernels are deterministic and
    draw dropout seeds from torch's generator, which the checkpoint restores)."""
    over = ["train.precision=bf16", "train.max_steps=6", "run.save_every=3", "model.dropout=0.1",
            "model.attention=fused", f"model.fused_ops=[{','.join(ALL_OPS)}]"]
    make_runner(tiny_config(tmp_path / "full", tiny_data, over), device="cuda").run()
    make_runner(tiny_config(tmp_path / "cut", tiny_data, over + ["run.stop_at_step=3"]), device="cuda").run()
    resumed = make_runner(tiny_config(tmp_path / "cut", tiny_data, over), seed=77, device="cuda")
    resumed.resume(checkpoint.latest_tag(tmp_path / "cut" / "out" / "checkpoints"))
    resumed.run()
    assert _train_losses(tmp_path / "cut" / "out") == _train_losses(tmp_path / "full" / "out")


@needs_cuda_engine
def test_fp16_training_with_dynamic_loss_scaling_on_cuda(tmp_path, tiny_data, dist_single):
    """fp16 (CUDA only) trains with DeepSpeed's dynamic loss scaling: finite losses that fall."""
    runner = make_runner(tiny_config(tmp_path, tiny_data, ["train.precision=fp16", "train.max_steps=12",
                                                           "optimizer.lr=3e-3"]), device="cuda")
    runner.run()
    losses = _train_losses(tmp_path / "out")
    assert len(losses) == 12 and all(map(lambda x: x == x and abs(x) < 1e4, losses)), losses
    assert min(losses[-3:]) < losses[0], losses


@needs_cuda
def test_deepspeed_fused_lamb_follows_the_documented_rule(tmp_path, monkeypatch):
    """training/engine/lamb.py documents FusedLamb's rule: no bias correction inside the update, the correction
    folded into the step size (lr * sqrt(1-b2^t) / (1-b1^t)), trust clamped to [min, max]. Three steps of the
    real kernel against the per-tensor reference written that way."""
    from tests.helpers.lamb_reference import reference_lamb_step
    from training.engine.lamb import build_lamb

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # the JIT build of DeepSpeed's op
    torch.manual_seed(3)
    shapes = [(64, 32), (32,), (17, 5)]
    params = [torch.randn(s, device="cuda") for s in shapes]
    ref_params = [p.clone() for p in params]
    lr, betas, eps, wd = 1e-2, (0.9, 0.999), 1e-6, 0.01
    opt, name = build_lamb([{"params": [torch.nn.Parameter(p) for p in params], "weight_decay": wd}],
                           lr=lr, betas=betas, eps=eps, weight_decay=wd, prefer_fused=True)
    assert name == "fused_lamb", "DeepSpeed's FusedLamb did not build or load (see the log)"
    live = opt.param_groups[0]["params"]
    states = [{} for _ in shapes]
    for t in range(1, 4):
        grads = [torch.randn(s, device="cuda") * 1e-2 for s in shapes]
        for p, g in zip(live, grads):
            p.grad = g.clone()
        opt.step()
        folded = lr * (1 - betas[1] ** t) ** 0.5 / (1 - betas[0] ** t)
        reference_lamb_step(ref_params, grads, states, lr=folded, betas=betas, eps=eps, weight_decay=wd,
                            bias_correction=False)
        for i, (p, r) in enumerate(zip(live, ref_params)):
            assert rel_err(p.data, r) < 1e-5, f"step {t}, tensor {i}: {rel_err(p.data, r):.2e}"


# ------------------------------------------------------------------------ NCCL, and the command line on CUDA

NCCL_CHILD = """
import json, torch, torch.distributed as dist
from training.dist import init_distributed
env = init_distributed(timeout_s=120)  # the backend a run picks by itself on a GPU machine
rank, world = env.rank, env.world_size
t = torch.full((1 << 20,), float(rank + 1), device="cuda")
dist.all_reduce(t)
parts = [torch.empty(3, device="cuda") for _ in range(world)]
dist.all_gather(parts, torch.full((3,), float(rank), device="cuda"))
b = torch.tensor([7.0 if rank == 0 else 0.0], device="cuda")
dist.broadcast(b, 0)
dist.barrier()
torch.cuda.synchronize()
print(json.dumps({"backend": dist.get_backend(), "world": world, "sum": t.min().item(), "max": t.max().item(),
                  "gather": [p.tolist() for p in parts], "bcast": b.item(),
                  "nccl": ".".join(map(str, torch.cuda.nccl.version()))}))
"""


@needs_cuda
def test_nccl_collectives_in_the_process_group_a_run_makes(tmp_path):
    """The NCCL backend as a run gets it (training.dist.init_distributed under torchrun, no backend named): all-reduce,
    all-gather, broadcast and barrier on GPU tensors. One process: NCCL (2.5 and later) refuses two ranks on one
    GPU ("Duplicate GPU detected", ncclInvalidUsage), so a one-GPU machine can check the backend, not a ring."""
    import subprocess
    import sys

    from tests.helpers.reliability import REPO, env

    script = tmp_path / "nccl_child.py"
    script.write_text(NCCL_CHILD)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           str(script)], cwd=REPO, env=env(DS_ACCELERATOR="cuda"), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["backend"] == "nccl" and "backend=nccl" in proc.stderr, (r, proc.stderr[-1000:])
    world = r["world"]
    assert r["sum"] == r["max"] == world * (world + 1) / 2
    assert r["gather"] == [[float(i)] * 3 for i in range(world)] and r["bcast"] == 7.0
    print(f"NCCL {r['nccl']}, {world} rank(s)")


@needs_cuda
def test_pretrain_command_saves_and_resumes_on_cuda(tmp_path, tiny_data):
    """`python -m training.pretrain` on the GPU (bf16, NCCL group): stopped after a checkpoint at step 3 and run
    again with --resume, it logs the uncut run's losses; `training.evaluate` then scores the checkpoint on the GPU."""
    import subprocess
    import sys

    import yaml

    from tests.helpers.reliability import REPO, env, metrics, run_pretrain

    def config(name: str, **run) -> tuple:
        out = tmp_path / name
        cfg = {"run": {"out_dir": str(out), "progress": False, "log_every": 1, "eval_every": 3, "eval_batches": 1,
                       "eval_batch_size": 8, "save_every": 3, "export_hf": False, "report_to": [], **run},
               "data": {"dir": str(tiny_data)},
               "model": {"vocab_size": 512, "hidden_size": 64, "num_layers": 2, "num_heads": 2, "ffn_size": 128,
                         "max_position": 64, "dropout": 0.1, "attention_dropout": 0.1},
               "train": {"precision": "bf16", "micro_batch_size": 4, "max_steps": 6},
               "optimizer": {"lr": 1e-3, "warmup_steps": 1}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path, out

    cuda = {"DS_ACCELERATOR": "cuda"}
    full, full_out = config("full")
    proc = run_pretrain(full, timeout=300, **cuda)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "backend=nccl" in proc.stderr and "bf16" in (full_out / "config.resolved.json").read_text()
    cut, cut_out = config("cut", stop_at_step=3)
    proc = run_pretrain(cut, timeout=300, **cuda)
    assert proc.returncode == 0 and (cut_out / "checkpoints" / "step00000003").is_dir(), proc.stderr[-3000:]
    cut.write_text(cut.read_text().replace("stop_at_step: 3", "stop_at_step: null"))
    proc = run_pretrain(cut, "--resume", timeout=300, **cuda)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(out):
        return [(r["step"], r["loss"]) for r in metrics(out) if r.get("kind") == "train"]

    assert losses(cut_out) == losses(full_out) and len(losses(full_out)) == 6
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--model", str(cut_out), "--data",
                           str(tiny_data), "--max-rows", "8", "--out", str(tmp_path / "eval.json")], cwd=REPO,
                          env=env(**cuda), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert scored["device"] == "cuda" and scored["model"]["step"] == 6 and scored["loss"] == scored["loss"]
