"""The locality bias as the runner applies it: its strength per training step, the plain model at every
evaluation (and the model as trained beside it during the anneal), the run's schedule across a growth."""
from __future__ import annotations

import json

import pytest

from tests.helpers.tiny_run import make_runner, tiny_config
from training.model.bert import BertForPreTraining


def _strengths(runner) -> tuple[list[float], list[float]]:
    """(the strength of each training forward, of each evaluation forward) over the run."""
    seen, forward = [], BertForPreTraining.forward

    def spy(module, *args, locality=0.0, **kwargs):
        seen.append((module.training, locality))
        return forward(module, *args, locality=locality, **kwargs)

    BertForPreTraining.forward = spy
    try:
        runner.run()
    finally:
        BertForPreTraining.forward = forward
    return [s for training, s in seen if training], [s for training, s in seen if not training]


def _train_strengths(runner) -> list[float]:
    train, evals = _strengths(runner)
    assert 0.0 in evals  # the plain model is scored at every eval (test below: beside the as-trained score)
    return train


def test_the_strength_falls_linearly_over_its_stage_and_evaluation_scores_the_plain_model(tmp_path, tiny_data,
                                                                                          dist_single):
    text = ("stages:\n  - {name: local, steps: 4, locality_bias: {start: 2.0, end: 0.0}}\n"
            "  - {name: plain, steps: 2}\n")
    runner = make_runner(tiny_config(tmp_path, tiny_data, ["run.eval_every=2"], yaml_text=text))
    train, evals = _strengths(runner)
    assert train == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    # Evals at steps 2, 4 (the stage's end) and 6, one batch each: the plain model every time, and at step 2,
    # while the bias is still on, also the model as it trains (the strength of step 3).
    assert evals == [0.0, 1.0, 0.0, 0.0]
    records = [json.loads(line) for line in (runner.out_dir / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in ev] == [2, 4, 6]
    assert ev[0]["locality"] == 1.0 and "heldout_loss_as_trained" not in ev[1] and "locality" not in ev[2]
    assert ev[0]["heldout_loss_as_trained"] != ev[0]["heldout_loss"]
    assert ev[0]["heldout_below_unigram_as_trained"] == pytest.approx(
        ev[0]["heldout_unigram_loss"] - ev[0]["heldout_loss_as_trained"])


def test_the_runs_schedule_falls_by_global_step_across_a_stack_growth(tmp_path, tiny_data, dist_single):
    text = ("train: {locality_bias: {start: 2.0, end: 0.0, steps: 4}}\n"
            "stages:\n  - {name: one, steps: 3, model: {num_layers: 1}}\n"
            "  - {name: two, steps: 3, hook: stack}\n")
    runner = make_runner(tiny_config(tmp_path, tiny_data, ["run.eval_every=2", "model.num_layers=2"], yaml_text=text))
    assert _train_strengths(runner) == [2.0, 1.5, 1.0, 0.5, 0.0, 0.0]  # step 3 is the grown model's first
    assert runner.model_cfg.num_layers == 2


def test_the_runs_schedule_refuses_a_linear_attention_stage_it_covers_and_a_stage_schedule_beside_it(
        tmp_path, tiny_data, dist_single):
    from training.errors import UserError

    core = ("train: {{locality_bias: {{start: 1.0, steps: {n}}}}}\n"
            "stages:\n  - {{name: relaxed, steps: 3, model: {{attention: linear}}}}\n"
            "  - {{name: refined, steps: 2, hook: core_refine}}\n")
    with pytest.raises(UserError, match="train.locality_bias covers stage 'relaxed' .*linear"):
        make_runner(tiny_config(tmp_path, tiny_data, yaml_text=core.format(n=2)))
    with pytest.raises(UserError, match="give either train.locality_bias .* or stages\\[\\].locality_bias"):
        tiny_config(tmp_path, tiny_data, yaml_text="train: {locality_bias: {steps: 2}}\n"
                    "stages:\n  - {name: a, steps: 2, locality_bias: {start: 1.0}}\n")
    with pytest.raises(UserError, match="train.locality_bias.steps"):
        tiny_config(tmp_path, tiny_data, yaml_text="train: {locality_bias: {steps: 0}}\n")
