"""The runner's logged FLOPs as computed: MSLT's frozen layers and layer dropping's keep probabilities per step."""
import json

import pytest

from tests.helpers.tiny_run import TINY_MODEL, make_runner, tiny_config
from training.model.flops import flops_per_token
from training.stages.layerdrop import layer_keep_probs

MSLT = """
stages:
  - {name: L1, steps: 2, model: {num_layers: 1}}
  - {name: L2, steps: 2, model: {num_layers: 2}, hook: mslt}
  - {name: L3, steps: 2, model: {num_layers: 3}, hook: mslt, hook_args: {train_top: 1}}
  - {name: joint, steps: 2, model: {num_layers: 3}, hook: mslt_joint}
"""


def _train_lines(out_dir):
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if m["kind"] == "train"]


def test_runner_logs_mslt_flops_as_computed(tmp_path, tiny_data, dist_single):
    cfg = tiny_config(tmp_path, tiny_data, ["run.log_every=2"], yaml_text=MSLT)
    make_runner(cfg).run()
    logged = {m["stage"]: m for m in _train_lines(tmp_path / "out")}
    seq, mf = logged["L1"]["seq_len"], cfg.data.mlm_probability
    assert seq == 64 and mf == 0.15
    # TINY_MODEL (Post-LN) at seq 64: W = 2*4*32*32 + 2*2*32*64 = 16384, A = 4*64*32 = 8192; a trained layer
    # 3 * 24576 = 73728, a no_grad one 24576; Q/K/V input gradient 6*32*32 = 6144; T = 2*32*32 = 2048,
    # D = 2*32*512 = 32768. Full head 0.15 * 3 * (T + D) = 15667.2; MSLT head 0.15 * (3T + 2D) = 10752.
    h, v = TINY_MODEL["hidden_size"], TINY_MODEL["vocab_size"]
    assert (h, v, TINY_MODEL["ffn_size"]) == (32, 512, 64) and cfg.model.norm == "post"
    assert logged["L1"]["flops_per_token"] == pytest.approx(73728 + 15667.2)
    assert logged["L2"]["flops_per_token"] == pytest.approx(24576 + (73728 - 6144) + 10752)
    assert logged["L3"]["flops_per_token"] == pytest.approx(2 * 24576 + (73728 - 6144) + 10752)
    assert logged["joint"]["flops_per_token"] == pytest.approx(3 * 73728 + 15667.2)
    # The model-shape formula (everything trained) is what was logged before: it overstated L3 by 86%.
    full_l3 = flops_per_token(cfg.stage_model(2), seq, mf)
    assert full_l3 == pytest.approx(logged["joint"]["flops_per_token"])
    for m in logged.values():
        assert m["mfu"] == pytest.approx(m["flops_per_token"] * m["tokens_per_s"] / 1e12)  # run.peak_tflops=1


LAYERDROP = "model: {norm: pre}\nstages:\n  - {name: pld, steps: 4, layer_drop: {theta_bar: 0.5, gamma: 0.5}}\n"


def test_runner_logs_layer_drop_flops_by_the_steps_keep_probabilities(tmp_path, tiny_data, dist_single):
    cfg = tiny_config(tmp_path, tiny_data, ["run.log_every=2"], yaml_text=LAYERDROP)
    make_runner(cfg).run()
    lines = _train_lines(tmp_path / "out")
    assert [m["step"] for m in lines] == [2, 4]
    model_cfg, seq, mf = cfg.stage_model(0), lines[0]["seq_len"], cfg.data.mlm_probability
    assert model_cfg.num_layers == 2 and model_cfg.norm == "pre"

    def at(step):  # the keep probabilities the runner passed for the step that ends at global step `step`
        return flops_per_token(model_cfg, seq, mf, keep_probs=layer_keep_probs(step - 1, 2, 0.5, 0.5))

    # Every step has the same tokens, so a window's value is the plain mean of its steps.
    assert lines[0]["flops_per_token"] == pytest.approx((at(1) + at(2)) / 2)
    assert lines[1]["flops_per_token"] == pytest.approx((at(3) + at(4)) / 2)
    full = flops_per_token(model_cfg, seq, mf)
    assert lines[1]["flops_per_token"] < lines[0]["flops_per_token"] < full
    # By hand for the last window: the layers' share scales with the mean expected layer count.
    head = 0.15 * 3 * (2048 + 32768)
    layers = sum(sum(layer_keep_probs(s, 2, 0.5, 0.5)) for s in (2, 3)) / 2
    assert lines[1]["flops_per_token"] == pytest.approx(73728 * layers + head)
