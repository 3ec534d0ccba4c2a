"""A stage boundary under ZeRO 1/2 with bf16 loses no precision (training/stages/transfer.py).

Two gloo ranks (`python -m torch.distributed.run --nproc_per_node 2 tests/integration/test_transfer_zero.py DATA OUT`) train
a 1-layer tiny model for two steps under ZeRO 1 (LAMB) and ZeRO 2 (AdamW), bf16, then stack it to 2 layers
through StageRunner.enter_stage. Each rank saves the slice of every fp32 master it holds (read straight from
DeepSpeed's fragment mapping, not through transfer.py) before and after the boundary; the test assembles the
full masters and checks, bit for bit, that the new engine's masters are the old masters stacked.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import paths as PATHS

REPO = PATHS.REPO
CASES = {"zero1_lamb": (1, "lamb"), "zero2_adamw": (2, "adamw")}
STACK = """
stages:
  - {name: L1, steps: 2, model: {num_layers: 1}}
  - {name: L2, steps: 2, model: {num_layers: 2}, hook: stack, optimizer_state: reset}
"""


def _master_slices(engine) -> dict:
    """This rank's slice of each fp32 master: name -> (shape, start in the flattened param, values)."""
    out = {}
    for name, p in engine.module.named_parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            out[name] = (tuple(p.shape), mapping.lp_fragment_address.start, mapping.hp_fragment.detach().clone())
    return out


def _worker(data_dir: str, out_dir: str) -> None:
    from tests.helpers.tiny_run import tiny_config
    from training.data.loader import PretrainingData
    from training.dist import init_distributed
    from training.engine.build import set_lr
    from training.model.bert import BertForPreTraining
    from training.stages import transfer
    from training.stages.runner import StageRunner

    env = init_distributed(timeout_s=300)
    torch.set_num_threads(1)
    out = Path(out_dir)
    results = {}
    for label, (zero, optimizer) in CASES.items():
        overrides = [f"train.zero_stage={zero}", "train.precision=bf16", f"optimizer.name={optimizer}",
                     "optimizer.fused=false", "train.micro_batch_size=2"]
        cfg = tiny_config(out / f"{label}_rank{env.rank}", Path(data_dir), overrides, yaml_text=STACK)
        Path(cfg.run.out_dir).mkdir(parents=True, exist_ok=True)
        runner = StageRunner(cfg, PretrainingData(cfg.data.dir), Path(cfg.run.out_dir), env.rank, env.world_size,
                             torch.device("cpu"), peak_tflops=1.0)
        torch.manual_seed(0)  # the same initial weights on both ranks
        runner.set_model(BertForPreTraining(cfg.stage_model(0)), cfg.stage_model(0))
        runner.build()
        stream = runner.batches()
        for _ in range(2):  # LR large enough that the masters leave the bf16 grid
            set_lr(runner.engine, 1e-3)
            runner.train_step([next(stream)])
            runner.state.step += 1
        before = _master_slices(runner.engine)
        via_transfer = transfer.fp32_weights(runner.engine)  # collective: every rank calls it
        old_cfg = runner.model_cfg
        runner.enter_stage(1)
        results[label] = {"before": before, "after": _master_slices(runner.engine), "old_cfg": old_cfg,
                          "new_cfg": runner.model_cfg, "via_transfer": via_transfer,
                          "module_after": {n: p.detach().clone() for n, p in runner.engine.module.named_parameters()}}
        del runner
    torch.save(results, out / f"rank{env.rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assemble(rank_slices: list[dict]) -> dict[str, torch.Tensor]:
    """Full fp32 masters from every rank's slices; each element must come from exactly one rank."""
    full, covered = {}, {}
    for slices in rank_slices:
        for name, (shape, start, values) in slices.items():
            flat = full.setdefault(name, torch.zeros(shape, dtype=torch.float32)).view(-1)
            count = covered.setdefault(name, torch.zeros(flat.numel(), dtype=torch.int64))
            flat[start:start + values.numel()] = values
            count[start:start + values.numel()] += 1
    for name, count in covered.items():
        assert bool((count == 1).all()), f"{name}: master slices do not tile the tensor"
    return full


@pytest.fixture(scope="module")
def boundary(tmp_path_factory, tiny_data):
    out = tmp_path_factory.mktemp("zero_boundary")
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}  # dist_single may have exported them
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), __file__, str(tiny_data), str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("label", list(CASES))
def test_zero12_bf16_boundary_keeps_fp32_masters_bit_for_bit(boundary, label):
    from training.stages.hooks import HOOKS
    from training.stages.protocol import HookContext

    runs = [rank[label] for rank in boundary]
    before = _assemble([r["before"] for r in runs])
    after = _assemble([r["after"] for r in runs])
    assert all(len(r["before"]) < len(before) for r in runs), "every rank holds every master: nothing partitioned"
    straddle = [n for n in before if all(n in r["before"] for r in runs)]
    assert straddle, "no tensor is split across the two ranks; the test would prove little"
    off_grid = sum(int((t != t.bfloat16().float()).sum()) for t in before.values())
    assert off_grid > 0, "the masters are all bf16-representable; the test would prove little"

    # fp32_weights (all ranks together) reads the masters, not the bf16 module.
    for rank in runs:
        for name, want in before.items():
            assert torch.equal(rank["via_transfer"][name], want), f"fp32_weights {name}"

    old_cfg, new_cfg = runs[0]["old_cfg"], runs[0]["new_cfg"]
    assert (old_cfg.num_layers, new_cfg.num_layers) == (1, 2)
    expected = HOOKS["stack"]().transform(before, old_cfg, new_cfg, 1, HookContext(step=2, out_dir=Path(".")))
    assert set(after) == set(expected)
    for name, want in expected.items():
        assert torch.equal(after[name], want), f"new engine's fp32 master {name} is not the transformed old master"
        for rank in runs:  # and the bf16 module the new engine computes with is those masters, rounded
            assert torch.equal(rank["module_after"][name], want.to(torch.bfloat16)), f"bf16 module {name}"


if __name__ == "__main__":
    _worker(sys.argv[-2], sys.argv[-1])
