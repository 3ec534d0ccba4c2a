"""EarlyBERT `rewind: init` on 2 real gloo ranks whose output directories differ (slow).

Only rank 0 writes and reads OUT/earlybert/ (init.pt, search.json); the other ranks get the initial weights
and a resumed search's masks by broadcast. Each rank here has its own OUT; rank 1's holds a *stale*
init.pt and search.json (another run's), which must not be read. The checkpoints directory is shared (a
symlink: the project's checkpoints need a shared file system anyway), so that one scenario can resume
mid-search. The pruned model right after the boundary must be the same on both ranks, and the same as
with one shared OUT.

The worker (`python -m tests.integration.test_earlybert_ranks DATA ROOT`, one process per rank, RANK/WORLD_SIZE/
MASTER_* in the environment) runs three scenarios in one process group and writes ROOT/results/*.pt.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.helpers import paths as PATHS

REPO = PATHS.REPO
SEARCH = """
stages:
  - {name: search, steps: 6, model: {slimming: true, slimming_l1: 1.0e-3}}
  - name: pruned
    steps: 3
    hook: prune
    hook_args: {ratio_heads: 0.5, ratio_ffn: 0.4, rewind: init, search: {interval: 1, window: 2, threshold: 1.0}}
    optimizer_state: reset
    warmup_steps: 1
    model: {slimming: false}
"""
SCENARIOS = ("shared", "split", "resumed")


# ------------------------------------------------------------------------------------------ the worker

def _runner(data_dir: Path, root: Path, scenario: str, rank: int, world: int, overrides: list[str]):
    from tests.helpers.tiny_run import tiny_config
    from training.data.loader import PretrainingData
    from training.model.bert import BertForPreTraining
    from training.stages.runner import StageRunner

    out = root / scenario / ("out" if scenario == "shared" else f"rank{rank}")
    cfg = tiny_config(root / "configs" / f"{scenario}_rank{rank}", data_dir,
                      ["model.num_heads=4", f"run.out_dir={out}"] + overrides, yaml_text=SEARCH)
    out.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(cfg, PretrainingData(cfg.data.dir), out, rank, world, torch.device("cpu"), 1.0)
    torch.manual_seed(0)
    runner.set_model(BertForPreTraining(cfg.stage_model(0)), cfg.stage_model(0))
    return runner


def _own_out_dir(root: Path, scenario: str, rank: int) -> None:
    """This rank's OUT with the shared checkpoints symlinked in; rank 1 gets another run's EarlyBERT files."""
    import torch.distributed as dist
    from training.model.bert import BertForPreTraining
    from training.stages import earlybert as eb
    from tests.helpers.tiny_run import TINY_MODEL
    from training.model.config import ModelConfig

    out, shared = root / scenario / f"rank{rank}", root / scenario / "checkpoints"
    out.mkdir(parents=True)
    if rank == 0:
        shared.mkdir(parents=True)
    dist.barrier()
    (out / "checkpoints").symlink_to(shared, target_is_directory=True)
    if rank == 1:
        torch.manual_seed(123)
        stale = BertForPreTraining(ModelConfig(**{**TINY_MODEL, "num_heads": 4, "slimming": True}))
        eb.save_init_weights(stale.state_dict(), out)
        # A search that "drew" at step 1: read on rank 1, it would end rank 1's search there alone.
        record = {"step": 1, "heads": eb._pack(torch.ones(8, dtype=torch.bool)),
                  "neurons": eb._pack(torch.ones(128, dtype=torch.bool)), "drawn": True}
        (eb.earlybert_dir(out) / "search.json").write_text(json.dumps({"masks": [record]}))


def _pruned(runner) -> dict:
    runner.enter_stage(1)
    assert not runner.model_cfg.slimming
    return {k: v.detach().clone() for k, v in runner.engine.module.state_dict().items()}


def worker(data_dir: Path, root: Path) -> None:
    from training.dist import init_distributed
    from training.engine import checkpoint

    torch.set_num_threads(1)
    env = init_distributed(timeout_s=120)  # a rank left waiting in a collective fails in 2 minutes, not never
    rank, world = env.rank, env.world_size
    results = root / "results"
    results.mkdir(parents=True, exist_ok=True)

    # 1. One OUT for both ranks (a shared file system): the reference.
    runner = _runner(data_dir, root, "shared", rank, world, ["run.stop_at_step=2"])
    torch.save(runner.model.state_dict(), results / f"init_rank{rank}.pt")
    runner.run()  # the ticket is drawn at step 2
    torch.save(_pruned(runner), results / f"shared_rank{rank}.pt")

    # 2. Each rank its own OUT; rank 1's holds stale EarlyBERT files.
    _own_out_dir(root, "split", rank)
    runner = _runner(data_dir, root, "split", rank, world, ["run.stop_at_step=2"])
    runner.run()
    assert runner.schedule[0].steps == 2
    torch.save(_pruned(runner), results / f"split_rank{rank}.pt")

    # 3. The same, stopped mid-search (step 1) and resumed by new runners: rank 0's masks and initial weights.
    _own_out_dir(root, "resumed", rank)
    _runner(data_dir, root, "resumed", rank, world, ["run.stop_at_step=1"]).run()
    runner = _runner(data_dir, root, "resumed", rank, world, ["run.stop_at_step=2"])
    runner.resume(checkpoint.latest_tag(runner.ckpt_dir))
    assert runner.state.step == 1 and runner.state.stage_index == 0
    runner.run()
    assert runner.schedule[0].steps == 2 and runner.state.step == 2
    torch.save(_pruned(runner), results / f"resumed_rank{rank}.pt")


# ------------------------------------------------------------------------------------------ the test

@pytest.mark.slow
def test_rewind_init_on_two_ranks_with_their_own_output_directories(tmp_path, tiny_data):
    from training.dist import free_port

    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in launcher_vars}  # dist_single may have set them
    base.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(base, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.integration.test_earlybert_ranks", str(tiny_data),
                                       str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=900)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank}:\n{logs[rank][-4000:]}"

    got = {(s, r): torch.load(tmp_path / "results" / f"{s}_rank{r}.pt", weights_only=True)
           for s in SCENARIOS for r in range(2)}
    reference = got["shared", 0]
    for key, state in got.items():
        assert state.keys() == reference.keys(), key
        for name, t in reference.items():
            torch.testing.assert_close(state[name], t, rtol=0, atol=0, msg=lambda m: f"{key} {name}: {m}")
    # Rewound: the untouched tensors are the step-0 ones (the stale file's would differ everywhere).
    init = torch.load(tmp_path / "results" / "init_rank0.pt", weights_only=True)
    name = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(reference[name], init[name], rtol=0, atol=0)
    assert reference["bert.encoder.layer.0.attention.self.query.weight"].shape[0] == 2 * 8  # 2 of 4 heads kept
    # Only rank 0 wrote EarlyBERT files into its OUT; rank 1's stale ones are untouched, never read.
    assert (tmp_path / "split" / "rank0" / "earlybert" / "ticket.json").is_file()
    assert not (tmp_path / "split" / "rank1" / "earlybert" / "ticket.json").exists()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), Path(sys.argv[2]))
