"""The held-out evaluation measures learning: fixed all-[MASK] positions, scored beside the unigram table."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.tiny_run import make_runner, tiny_config


def test_a_model_that_predicts_token_frequencies_scores_the_unigram_loss(tmp_path, tiny_data, dist_single):
    runner = make_runner(tiny_config(tmp_path, tiny_data, ["run.eval_batches=3"]))
    runner._build()
    module = runner.engine.module
    logp = runner.data.unigram_log_probs()
    with torch.no_grad():  # the transform outputs 0, so the logits are the output bias: the unigram table
        head = module.cls.predictions
        head.transform.LayerNorm.weight.zero_()
        head.transform.LayerNorm.bias.zero_()
        head.bias.copy_(torch.where(torch.isinf(logp), torch.full_like(logp, -1e4), logp).float())
    ev = runner.evaluate()
    assert set(ev) == {"heldout_loss", "heldout_acc", "heldout_unigram_loss", "heldout_below_unigram"}
    assert ev["heldout_loss"] == pytest.approx(ev["heldout_unigram_loss"], abs=1e-4)
    assert abs(ev["heldout_below_unigram"]) < 1e-4
    assert 3.0 < ev["heldout_unigram_loss"] < 7.0  # a 512-token vocabulary on real prose


def test_every_run_is_scored_on_the_same_positions(tiny_data):
    """Data opened with different training masking evaluate on identical targets, batched either way."""
    from training.data.loader import PretrainingData

    a = PretrainingData(tiny_data, mlm_probability=0.4, nsp=True)
    b = PretrainingData(tiny_data, whole_word=True)
    xs, ys = list(a.heldout_batches(8, max_batches=2)), list(b.heldout_batches(4, max_batches=4))
    for key in ("labels", "input_ids", "token_type_ids"):
        assert torch.equal(torch.cat([x[key] for x in xs]), torch.cat([y[key] for y in ys]))


def test_an_evaluation_over_no_target_is_an_error_not_zero(tmp_path, tiny_data, dist_single, monkeypatch):
    from training.errors import UserError

    runner = make_runner(tiny_config(tmp_path, tiny_data))
    runner._build()
    empty = lambda *a, **k: iter(())  # noqa: E731
    monkeypatch.setattr(runner.data, "heldout_batches", empty)
    with pytest.raises(UserError, match="no masked token"):
        runner.evaluate()
