"""The runner hands the weights and the optimizer moments through their own paths at a boundary."""
from __future__ import annotations

import torch

from training.stages import transfer

GROW_FFN = """
stages:
  - {name: s1, steps: 2}
  - {name: s2, steps: 2, hook: grow_ffn, model: {ffn_size: 128}, optimizer_state: carry}
"""


def test_the_runner_passes_weights_and_moments_through_their_own_paths(tmp_path, tiny_data, dist_single):
    """At a real boundary: the weights get the weight rule (output.dense / k: the function is kept), the
    installed exp_avg / exp_avg_sq the gradient rule."""
    from tests.helpers.tiny_run import make_runner, tiny_config

    runner = make_runner(tiny_config(tmp_path, tiny_data, ["run.stop_at_step=2"], yaml_text=GROW_FFN))
    runner.run()
    weights = transfer.fp32_weights(runner.engine)
    moments, _ = transfer.optimizer_moments(runner.engine)
    runner.enter_stage(1)
    new_weights = transfer.fp32_weights(runner.engine)
    new_moments, steps = transfer.optimizer_moments(runner.engine)
    assert set(steps.values()) == {2}
    w2, w1 = "bert.encoder.layer.0.output.dense.weight", "bert.encoder.layer.0.intermediate.dense.weight"
    torch.testing.assert_close(new_weights[w2], weights[w2].repeat(1, 2) / 2, rtol=0, atol=0)
    torch.testing.assert_close(new_weights[w1], weights[w1].repeat(2, 1), rtol=0, atol=0)
    for key, power in transfer.MOMENT_POWER.items():
        torch.testing.assert_close(new_moments[key][w2], moments[key][w2].repeat(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(new_moments[key][w1], moments[key][w1].repeat(2, 1) / 2 ** power, rtol=0, atol=0)
