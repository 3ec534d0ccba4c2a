"""MSLT in the running job: the engine never touches frozen parameters, only the new top layer trains, the joint
stage trains everything, resume in a frozen stage, the gradient collectives carry only trainable parameters."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import paths as PATHS
from tests.helpers.mslt import LAYER, frozen_model, tiny_batch
from tests.helpers.tiny_run import TINY_MODEL, make_runner, tiny_config
from training.engine import checkpoint

REPO = PATHS.REPO


MSLT = """
stages:
  - {name: L1, steps: 2, model: {num_layers: 1}}
  - {name: L2, steps: 2, model: {num_layers: 2}, hook: mslt, optimizer_state: carry}
  - {name: L3, steps: 2, model: {num_layers: 3}, hook: mslt, hook_args: {train_top: 1}, optimizer_state: carry}
  - {name: joint, steps: 2, model: {num_layers: 3}, hook: mslt_joint, optimizer_state: carry}
"""


def test_engine_never_touches_frozen_parameters(tmp_path, tiny_data, dist_single):
    from training.engine.build import build_engine

    cfg = tiny_config(tmp_path, tiny_data, yaml_text=MSLT)
    model = frozen_model(num_layers=3, train_top=1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    engine, _ = build_engine(model, cfg, 1, tmp_path / "out")
    names = [n for g in engine.optimizer.param_groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for seed in range(3):
        engine.backward(engine(**tiny_batch(seed))["mlm_loss"])
        assert all(p.grad is None for n, p in engine.module.named_parameters() if n in frozen)
        engine.step()
    for n, p in engine.module.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def _params(runner):
    return {n: p.detach().clone() for n, p in runner.engine.module.named_parameters()}


def _spy_transitions(runner) -> tuple[dict, dict]:
    """Weights just before each stage boundary (the previous stage's end) and right after it."""
    before, after = {}, {}
    enter = runner.enter_stage

    def spy(index):
        before[index] = _params(runner)
        seconds = enter(index)
        after[index] = _params(runner)
        return seconds

    runner.enter_stage = spy
    return before, after


def test_runner_trains_only_the_new_top_layer(tmp_path, tiny_data, dist_single):
    cfg = tiny_config(tmp_path, tiny_data, ["run.stop_at_step=6"], yaml_text=MSLT)
    runner = make_runner(cfg)
    before, snaps = _spy_transitions(runner)
    runner.run()  # L1, L2 (layer 0 frozen), L3 until step 6 (layers 0 and 1 frozen)
    end = _params(runner)
    # L2's new layer 1 is a copy of layer 0 as L1 left it; L3's layer 2 a copy of layer 1 as L2 left it.
    for name, t in before[1].items():
        if name.startswith(LAYER.format(0)):
            torch.testing.assert_close(snaps[1][name.replace(".0.", ".1.", 1)], t, rtol=0, atol=0)
    for name, t in before[2].items():
        if name.startswith(LAYER.format(1)):
            torch.testing.assert_close(snaps[2][name.replace(".1.", ".2.", 1)], t, rtol=0, atol=0)
    # Frozen since L1's end: embeddings, layer 0, the tied decoder weight. Since L2's end: layer 1.
    for name, t in end.items():
        if name.startswith(("bert.embeddings.", LAYER.format(0))):
            assert torch.equal(t, before[1][name]), name
        elif name.startswith(LAYER.format(1)):
            assert torch.equal(t, before[2][name]), name
            assert not torch.equal(t, snaps[1][name]), name  # it did train in L2
        else:  # layer 2 and the trainable head parts moved in L3
            assert not torch.equal(t, snaps[2][name]), name
    assert [p.requires_grad for p in runner.engine.module.bert.encoder.layer.parameters()][-1]
    assert runner.engine.module.bert.encoder.frozen_prefix() == 2
    transitions = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    trainable = [m["trainable_params"] for m in transitions if m["kind"] == "transition"]
    assert trainable[0] == trainable[1] < sum(p.numel() for p in runner.engine.module.parameters())


def test_joint_stage_trains_everything_again(tmp_path, tiny_data, dist_single):
    cfg = tiny_config(tmp_path, tiny_data, yaml_text=MSLT)
    runner = make_runner(cfg)
    _, snaps = _spy_transitions(runner)
    runner.run()
    assert all(p.requires_grad for p in runner.engine.module.parameters())
    assert runner.engine.module.bert.encoder.frozen_prefix() == 0
    end = _params(runner)
    assert all(not torch.equal(end[n], snaps[3][n]) for n in end if n != "bert.embeddings.token_type_embeddings.weight")


@pytest.mark.parametrize("stop_at", [3, 4, 5])  # mid L2, end of L2 (before the growth to L3), mid L3
def test_resume_in_a_frozen_stage_stays_frozen_and_matches(tmp_path, tiny_data, dist_single, stop_at):
    full = make_runner(tiny_config(tmp_path / "full", tiny_data, yaml_text=MSLT))
    full.run()
    expected = [m["loss"] for m in map(json.loads, (tmp_path / "full" / "out" / "metrics.jsonl").read_text()
                                       .splitlines()) if m["kind"] == "train"]

    make_runner(tiny_config(tmp_path / "cut", tiny_data, [f"run.stop_at_step={stop_at}"], yaml_text=MSLT)).run()
    resumed = make_runner(tiny_config(tmp_path / "cut", tiny_data, yaml_text=MSLT), seed=123)
    resumed.resume(checkpoint.latest_tag(tmp_path / "cut" / "out" / "checkpoints"))
    module = resumed.engine.module
    layers = resumed.model_cfg.num_layers
    assert module.bert.encoder.frozen_prefix() == layers - 1  # the requires_grad pattern is restored
    assert not any(p.requires_grad for p in module.bert.embeddings.parameters())
    optimized = {n for g in resumed.engine.optimizer.param_groups for n in g["names"]}
    assert optimized == {n for n, p in module.named_parameters() if p.requires_grad}
    resumed.run()
    got = [m["loss"] for m in map(json.loads, (tmp_path / "cut" / "out" / "metrics.jsonl").read_text()
                                  .splitlines()) if m["kind"] == "train"]
    assert got == expected
    for name, t in _params(full).items():
        torch.testing.assert_close(_params(resumed)[name], t, rtol=0, atol=0)


BENCH_CONFIG = """
run: {seed: 7}
stages:
  - {name: L2, steps: 2, model: {num_layers: 2}}
  - {name: L4, steps: 2, model: {num_layers: 4}, hook: mslt, optimizer_state: reset}
"""


@pytest.mark.slow
@pytest.mark.parametrize("zero,optimizer,precision", [(0, "lamb", "fp32"), (0, "lamb", "bf16"), (1, "adamw", "fp32"),
                                                      (2, "adamw", "bf16"), (1, "lamb", "fp32"), (2, "lamb", "fp32")])
def test_gradient_collectives_carry_only_trainable_parameters(tmp_path, tiny_data, zero, optimizer, precision):
    """2 gloo ranks through `python -m training.bench mslt`: per step, the gradient all-reduce/reduce-scatter
    bytes equal the trainable parameters' gradient bytes, for the frozen stage and the full reference alike;
    frozen parameters get no .grad and do not change."""
    config = tmp_path / "mslt_tiny.yaml"
    model = "".join(f"  {k}: {v}\n" for k, v in TINY_MODEL.items())
    config.write_text(f"data: {{dir: {tiny_data}}}\nmodel:\n{model}train: {{micro_batch_size: 4, precision: "
                      f"{precision}, zero_stage: {zero}}}\noptimizer: {{name: {optimizer}}}\n" + BENCH_CONFIG)
    out = tmp_path / "bench"
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}  # dist_single exported them here
    env.update(DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "training.bench", "mslt", "--config", str(config), "--out", str(out),
                           "--ranks", "2", "--steps", "2", "--warmup", "1", "--repeats", "1", "--stages", "L4"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "mslt.json").read_text())
    assert result["world_size"] == 2 and result["zero_stage"] == zero
    (stage,) = result["stages"]
    full, frozen = stage["full"], stage["mslt"]
    for r in (full, frozen):
        assert r["grad_reduce_dtype"] == ("bfloat16" if precision == "bf16" else "float32")
        size = 2 if precision == "bf16" else 4
        assert r["grad_reduce_bytes"] == r["trainable_parameters"] * size  # no padding at this size either
        assert r["grad_reduce_equals_trainable"] and r["grad_reduce_padding_elements"] == 0
        if zero > 0:  # ZeRO 1/2 all-gather the updated partitions: again only the trainable parameters
            gathered = sum(c["elements"] for k, c in r["collectives_per_step"].items()
                           if k.startswith("step:all_gather"))
            assert gathered == r["trainable_parameters"]
        assert r["frozen_params_changed"] == 0
        assert r["frozen_params_with_grad"] in (0, None)
    assert frozen["no_grad_layers"] == 2 and frozen["trainable_parameters"] < full["trainable_parameters"]
    assert frozen["saved_activation_bytes"] < full["saved_activation_bytes"]
