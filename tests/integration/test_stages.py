"""Stage transitions in the running job: config checks, state carried by name, resume across boundaries."""
import json

import pytest
import torch

from tests.helpers.tiny_run import make_runner, tiny_config
from training.engine import checkpoint
from training.errors import UserError
from training.stages import transfer
from training.stages.modifiers import StageTraining

STACK = """
stages:
  - {name: s1, steps: 2, model: {num_layers: 1}}
  - {name: s2, steps: 2, hook: stack, optimizer_state: carry}
  - {name: s3, steps: 2, hook: grow_ffn, model: {ffn_size: 128}, optimizer_state: reset, warmup_steps: 1}
"""


@pytest.mark.parametrize("stages,needle", [
    ("[{name: a, steps: 2, model: {num_layers: 2}}, {name: b, steps: 2, hook: stack, model: {num_layers: 1}}]",
     "stack"),
    ("[{name: a, steps: 2, model: {ffn_size: 64}}, {name: b, steps: 2, hook: grow_ffn, model: {ffn_size: 96}}]",
     "ffn_size"),
    ("[{name: a, steps: 2, model: {hidden_size: 33}}]", "divisible by model.num_heads"),
    ("[{name: a, steps: 2, model: {num_layers: 1}}, {name: b, steps: 2}]", "names no hook"),
    ("[{name: a, steps: 2}, {name: b, steps: 2, hook: teleport}]", "unknown stage hook 'teleport'"),
    ("[{name: a, steps: 2, hook: stack}]", "first stage"),
    ("[{name: a, steps: 2, tokens: 100}]", "exactly one of steps or tokens"),
    ("[{name: a, steps: 2, layer_drop: {}}]", "layer_drop needs model.norm: pre"),
    ("[{name: a, steps: 2, seq_len: 128}]", "exceeds model.max_position"),
    ("[{name: a, steps: 2, seq_len: 64}, {name: b, steps: 2, seq_len: 32, hook: grow_seq}]",
     "must lengthen"),
    ("[{name: a, steps: 2, model: {num_layers: 1}}, {name: b, steps: 2, hook: stack, extra: 1}]",
     "unknown config key 'stages.1.extra'"),
])
def test_nonsense_schedules_are_rejected_at_load(tmp_path, tiny_data, stages, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        tiny_config(tmp_path, tiny_data, yaml_text=f"model: {{max_position: 64}}\nstages: {stages}\n")


def test_carry_with_zero_partitions_is_refused(tmp_path, tiny_data):
    with pytest.raises(UserError, match="carry needs train.zero_stage 0"):
        tiny_config(tmp_path, tiny_data, ["train.zero_stage=1", "optimizer.name=adamw"], yaml_text=STACK)


def _stage_state(runner):
    moments, steps = transfer.optimizer_moments(runner.engine)
    return transfer.fp32_weights(runner.engine), moments, steps


def test_stack_carries_weights_and_moments_by_name(tmp_path, tiny_data, dist_single):
    cfg = tiny_config(tmp_path, tiny_data, ["run.stop_at_step=2"], yaml_text=STACK)
    runner = make_runner(cfg)
    runner.run()  # stage s1 (1 layer), stops at its end
    weights, moments, steps = _stage_state(runner)
    assert set(steps.values()) == {2}
    runner.enter_stage(1)
    new_weights, new_moments, new_steps = _stage_state(runner)
    prefix = "bert.encoder.layer.{}.intermediate.dense.weight"
    for layer in (0, 1):  # both new layers are copies of old layer 0, weights and moments
        torch.testing.assert_close(new_weights[prefix.format(layer)], weights[prefix.format(0)], rtol=0, atol=0)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(new_moments[key][prefix.format(layer)], moments[key][prefix.format(0)],
                                       rtol=0, atol=0)
    assert set(new_steps.values()) == {2}  # bias correction continues
    assert len(new_steps) == len(list(runner.engine.module.parameters()))


def test_reset_drops_optimizer_state(tmp_path, tiny_data, dist_single):
    cfg = tiny_config(tmp_path, tiny_data, ["run.stop_at_step=4"], yaml_text=STACK)
    runner = make_runner(cfg)
    runner.run()  # through s2
    assert _stage_state(runner)[2]
    runner.enter_stage(2)
    _, moments, steps = _stage_state(runner)
    assert not steps and not moments["exp_avg"]


def _fixed_batch_loss(runner, batch):
    module = runner.engine.module
    module.eval()
    with torch.no_grad():
        return float(module(**batch)["mlm_loss"])


def test_width_growth_in_the_running_job_preserves_the_loss(tmp_path, tiny_data, dist_single):
    text = """
stages:
  - {name: narrow, steps: 2, model: {hidden_size: 16, num_heads: 1, ffn_size: 32}}
  - {name: wide, steps: 2, hook: grow_width}
"""
    cfg = tiny_config(tmp_path, tiny_data, ["run.stop_at_step=2"], yaml_text=text)
    runner = make_runner(cfg)
    runner.run()
    batch = next(runner.data.heldout_batches(8, max_batches=1))
    before = _fixed_batch_loss(runner, batch)
    runner.enter_stage(1)
    assert runner.model_cfg.hidden_size == 32 and runner.model_cfg.ffn_size == 64
    after = _fixed_batch_loss(runner, batch)
    assert abs(after - before) / before < 1e-5


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _final_params(runner):
    return {k: v.detach().clone() for k, v in runner.engine.module.state_dict().items()}


def test_lr_and_data_continue_across_boundaries(tmp_path, tiny_data, dist_single):
    cfg = tiny_config(tmp_path, tiny_data, yaml_text=STACK)
    runner = make_runner(cfg)
    state = runner.run()
    assert state.step == 6 and state.samples == 6 * 4
    train = [m for m in _metrics(tmp_path / "out") if m["kind"] == "train"]
    lrs = [m["lr"] for m in train]
    assert lrs == [runner.schedule.lr(s) for s in range(6)]
    assert lrs[4] == 0.0 and lrs[3] > 0  # stage s3 restarts its warmup, s2 continued s1's decay
    transitions = [m for m in _metrics(tmp_path / "out") if m["kind"] == "transition"]
    assert [t["stage"] for t in transitions] == ["s2", "s3"] and all(t["seconds"] > 0 for t in transitions)


@pytest.mark.parametrize("stop_at", [1, 2, 3])  # mid-stage, at a stage's end (before growth), right after it
def test_resume_across_a_growth_matches_an_uninterrupted_run(tmp_path, tiny_data, dist_single, stop_at):
    full_cfg = tiny_config(tmp_path / "full", tiny_data, yaml_text=STACK)
    full = make_runner(full_cfg)
    full.run()
    expected_loss = [m["loss"] for m in _metrics(tmp_path / "full" / "out") if m["kind"] == "train"]

    cut_cfg = tiny_config(tmp_path / "cut", tiny_data, [f"run.stop_at_step={stop_at}"], yaml_text=STACK)
    make_runner(cut_cfg).run()
    resumed_cfg = tiny_config(tmp_path / "cut", tiny_data, yaml_text=STACK)
    resumed = make_runner(resumed_cfg, seed=123)  # a different init: the checkpoint must overwrite it
    resumed.resume(checkpoint.latest_tag(tmp_path / "cut" / "out" / "checkpoints"))
    assert resumed.state.step == stop_at
    resumed.run()
    got_loss = [m["loss"] for m in _metrics(tmp_path / "cut" / "out") if m["kind"] == "train"]
    assert got_loss == expected_loss
    for name, tensor in _final_params(full).items():
        torch.testing.assert_close(_final_params(resumed)[name], tensor, rtol=0, atol=0)


def test_layer_drop_decisions_agree_across_ranks(tmp_path, tiny_data, dist_single):
    text = "model: {norm: pre}\nstages:\n  - {name: pld, steps: 3, layer_drop: {theta_bar: 0.5, gamma: 0.5}}\n"
    cfg = tiny_config(tmp_path, tiny_data, yaml_text=text)
    runner = make_runner(cfg)
    runner.state.step = 7
    training = StageTraining(cfg, 0, cfg.stage_model(0), seq_len=64)  # the stage's modifiers, as the runner's
    a, b = training.forward_kwargs(runner.step_context()), training.forward_kwargs(runner.step_context())
    assert a["layer_keep_prob"] == b["layer_keep_prob"] and a["layer_keep_prob"][-1] < 1.0
    draws = [torch.rand(8, generator=kw["layer_drop_generator"]) for kw in (a, b)]
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)  # a rank-independent stream
    runner.state.step = 0
    runner.run()
    assert [m["step"] for m in _metrics(tmp_path / "out") if m["kind"] == "train"] == [1, 2, 3]


def test_tokens_per_s_leaves_eval_and_checkpoint_time_out_of_the_window(tmp_path, tiny_data, dist_single, monkeypatch):
    """A window that spans an eval (or a save) counts its tokens over its training time only, not over the time
    after the eval."""
    import time

    from training.stages import runner as runner_mod

    cfg = tiny_config(tmp_path, tiny_data, ["train.max_steps=8", "run.log_every=4", "run.eval_every=2",
                                            "run.save_every=3"])
    runner = make_runner(cfg)
    runner.build()

    def step(micro, **kwargs):
        time.sleep(0.05)  # every step trains 0.05 s
        return runner_mod.StepResult(loss=1.0, tokens=1000, samples=4)

    def slow_eval():
        time.sleep(0.3)  # longer than the steps between evals
        return {"heldout_loss": 1.0, "heldout_acc": 0.0, "heldout_unigram_loss": 1.0, "heldout_below_unigram": 0.0}

    monkeypatch.setattr(runner, "train_step", step)
    monkeypatch.setattr(runner, "evaluate", slow_eval)
    runner.run()
    rates = [r["tokens_per_s"] for r in map(json.loads, (runner.out_dir / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "train"]
    assert len(rates) == 2
    for rate in rates:  # 1000 tokens per 0.05 s step: 20,000/s; the eval time inside the window is not counted
        assert 12_000 < rate < 21_000, rates


def test_stop_below_unigram_stops_at_the_first_eval_that_reaches_it(tmp_path, tiny_data, dist_single):
    """run.stop_below_unigram: the run stops (after a checkpoint) at the first held-out eval at least that far
    below the unigram reference, and trains exactly as the run without it up to there."""
    over = ["run.eval_every=1", "train.max_steps=8", "optimizer.lr=1e-2"]
    make_runner(tiny_config(tmp_path / "full", tiny_data, over)).run()
    full = [m for m in _metrics(tmp_path / "full" / "out") if m["kind"] == "eval"]
    below = [m["heldout_below_unigram"] for m in full]
    assert len(below) == 8 and len(set(below)) > 1
    target = max(below[:4])  # reached at or before step 4; a fresh number, not a hard-coded one
    expected = next(m["step"] for m in full if m["heldout_below_unigram"] >= target)
    assert expected < 8

    runner = make_runner(tiny_config(tmp_path / "stop", tiny_data, over + [f"run.stop_below_unigram={target!r}"]))
    state = runner.run()
    assert state.step == expected and runner.stopped_below == pytest.approx(target, abs=1e-9)
    stopped = [m for m in _metrics(tmp_path / "stop" / "out") if m["kind"] == "eval"]
    assert [m["heldout_loss"] for m in stopped] == [m["heldout_loss"] for m in full[:expected]]
    assert checkpoint.latest_tag(tmp_path / "stop" / "out" / "checkpoints") is not None

    never = make_runner(tiny_config(tmp_path / "never", tiny_data, over + ["run.stop_below_unigram=50"]))
    assert never.run().step == 8 and never.stopped_below is None


def test_max_wall_s_stops_after_an_eval_and_a_checkpoint_with_the_schedule_unchanged(tmp_path, tiny_data, dist_single,
                                                                                   monkeypatch):
    """run.max_wall_s: the first step that starts at or past the budget (the loop's wall_s) is the last; the run is
    evaluated and checkpointed there, and up to there it is the uncut run: same losses, same LR schedule (the
    budget cuts the run short, it does not shorten the schedule)."""
    import time

    over = ["train.max_steps=40", "run.eval_every=100", "run.save_every=0", "optimizer.lr=1e-2"]
    make_runner(tiny_config(tmp_path / "full", tiny_data, over)).run()
    over.append("run.log_every=1000")  # the stop step is logged anyway
    runner = make_runner(tiny_config(tmp_path / "cut", tiny_data, over + ["run.max_wall_s=0.5"]))
    real_step = runner.train_step

    def slow_step(micro, **kwargs):  # every step takes at least 0.1 s
        time.sleep(0.1)
        return real_step(micro, **kwargs)

    monkeypatch.setattr(runner, "train_step", slow_step)
    state = runner.run()
    # every step takes >= 0.1 s, so by the start of step 7 the budget is spent: the stop comes at step 6 at the latest
    assert 2 <= state.step <= 6 and runner.total_steps == 40
    rows = _metrics(tmp_path / "cut" / "out")
    train = [m for m in rows if m["kind"] == "train"]
    assert [m["step"] for m in train] == [state.step]
    assert train[-1]["wall_s"] >= 0.5 + 0.1  # the last step started at or past the budget
    assert runner.stopped_wall_s >= 0.5
    assert [m["step"] for m in rows if m["kind"] == "eval"] == [state.step]  # scored where it stopped
    assert checkpoint.latest_tag(tmp_path / "cut" / "out" / "checkpoints") == f"step{state.step:08d}"
    full = [m for m in _metrics(tmp_path / "full" / "out") if m["kind"] == "train"]
    assert (train[-1]["loss"], train[-1]["lr"]) == (full[state.step - 1]["loss"], full[state.step - 1]["lr"])
    assert train[-1]["tokens"] == full[state.step - 1]["tokens"]
