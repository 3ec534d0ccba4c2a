"""The resolved schedule (training/stages/plan.py): stage lengths from step or token budgets per world size,
start steps, sequence lengths checked once, LR segments, and a boundary moved by an early-ended stage."""
import json

import pytest

from training.stages.plan import load_config
from training.engine.schedule import lr_at
from training.errors import UserError
from training.stages.plan import Plan, planned_steps, seq_lens

MODEL = "model: {vocab_size: 64, hidden_size: 16, num_heads: 2, num_layers: 2, ffn_size: 32, max_position: 32}\n"


def config(tmp_path, stages: str, *sets: str):
    path = tmp_path / "c.yaml"
    path.write_text(MODEL + "train: {micro_batch_size: 4}\noptimizer: {lr: 1.0, warmup_steps: 2}\n" + stages)
    return load_config(path, [f"data.dir={tmp_path / 'data'}", *sets])


def test_token_budgets_become_steps_per_world_size_and_stages_follow_each_other(tmp_path):
    cfg = config(tmp_path, "stages:\n  - {name: short, tokens: 1000, seq_len: 16}\n"
                           "  - {name: long, steps: 5, hook: grow_seq, seq_len: 32}\n")
    one, two = Plan(cfg, 32, world_size=1), Plan(cfg, 32, world_size=2)
    assert [(p.name, p.steps, p.start_step, p.seq_len) for p in one] == [("short", 16, 0, 16), ("long", 5, 16, 32)]
    assert [(p.steps, p.start_step) for p in two] == [(8, 0), (5, 8)]  # 1000 tokens / (8 x 16), rounded up
    assert one.total_steps == 21 and len(one) == 2 and one[1].model.max_position == 32
    (data := tmp_path / "data").mkdir()
    (data / "stats.json").write_text('{"seq_len": 32}')
    assert planned_steps(cfg) == 21 and planned_steps(cfg, world_size=2) == 13
    cfg_tokens_only_data = config(tmp_path, "stages:\n  - {name: a, tokens: 1000}\n")
    assert planned_steps(cfg_tokens_only_data) == 8  # 1000 / (4 x 32), from stats.json
    (data / "stats.json").unlink()
    assert planned_steps(cfg_tokens_only_data) is None  # the data's length is not known


def test_lr_warms_up_per_stage_and_a_moved_boundary_moves_its_warmup(tmp_path):
    cfg = config(tmp_path, "stages:\n  - {name: a, steps: 6}\n  - {name: b, steps: 6, warmup_steps: 2}\n")
    plan = Plan(cfg, 32, world_size=1)
    assert lr_at(plan.lr_segments, 0) == 0.0 and lr_at(plan.lr_segments, 2) == pytest.approx(1.0)
    assert lr_at(plan.lr_segments, 6) == 0.0  # stage b's warmup starts at its first step
    plan = plan.with_boundary(1, 4)  # stage a ended early, at step 4: b takes over its steps
    assert [(p.steps, p.start_step, p.ended_early) for p in plan] == [(4, 0, True), (8, 4, False)]
    assert plan.total_steps == 12 and lr_at(plan.lr_segments, 4) == 0.0 and lr_at(plan.lr_segments, 6) > 0


@pytest.mark.parametrize("stages,data_seq,needle", [
    ("[{name: a, steps: 2, seq_len: 32}]", 16, "stage 'a': seq_len 32 exceeds the prepared data's 16"),
    ("[{name: a, steps: 2}]", 64, "has seq_len 64, more than model.max_position=32"),
])
def test_sequence_lengths_are_checked_once_here(tmp_path, stages, data_seq, needle):
    cfg = config(tmp_path, f"stages: {stages}\n")
    with pytest.raises(UserError, match=needle):
        seq_lens(cfg, data_seq)
    with pytest.raises(UserError, match=needle):
        Plan(cfg, data_seq, world_size=1)


def test_the_schedule_announces_an_early_end_keeps_it_as_state_and_a_resume_restores_it(tmp_path):
    """The plan is never changed: an early end gives the plan in force, the checkpoint keeps the end, a resume
    gets it back (a checkpoint from before the schedule kept state: the stage's start from the train position)."""
    from training.engine.checkpoint import TrainState
    from training.stages.schedule import StageSchedule

    cfg = config(tmp_path, "stages:\n  - {name: a, steps: 6}\n  - {name: b, steps: 6, warmup_steps: 2}\n")
    plan = Plan(cfg, 32, world_size=1)
    schedule = StageSchedule(plan)
    at_4 = TrainState(step=4, stage_index=0, stage_step=4)
    assert not schedule.stage_over(at_4) and schedule[0].steps == 6
    schedule.end_stage(0, 4)  # a watcher's announcement
    assert schedule.stage_over(at_4) and [(p.steps, p.start_step) for p in schedule.plan] == [(4, 0), (8, 4)]
    assert [(p.steps, p.start_step) for p in plan] == [(6, 0), (6, 6)]  # the plan itself is as it was
    assert schedule.lr(4) == 0.0 and schedule.lr(6) > 0 and schedule.total_steps == 12
    saved = json.loads(json.dumps(schedule.state_dict()))  # as meta.json holds it
    assert saved == {"ends": {"0": 4}}
    resumed = StageSchedule(Plan(cfg, 32, world_size=1))
    resumed.load_state_dict(saved, TrainState(step=5, stage_index=1, stage_step=1))
    assert [(p.steps, p.start_step, p.ended_early) for p in resumed.plan] == [(4, 0, True), (8, 4, False)]
    legacy = StageSchedule(Plan(cfg, 32, world_size=1))
    legacy.load_state_dict(None, TrainState(step=5, stage_index=1, stage_step=1))
    assert [(p.steps, p.start_step) for p in legacy.plan] == [(4, 0), (8, 4)]
    unmoved = StageSchedule(Plan(cfg, 32, world_size=1))
    unmoved.load_state_dict({"ends": {}}, TrainState(step=7, stage_index=1, stage_step=1))
    assert unmoved.plan is unmoved.planned


def test_the_loop_components_decide_their_own_timing():
    from types import SimpleNamespace

    from training.engine.checkpoint import Checkpointer
    from training.engine.evaluator import Evaluator
    from training.metrics import MetricsWriter, TrainLog

    run = SimpleNamespace(log_every=10, eval_every=50, eval_at_stage_end=True, save_every=20, keep_last=2,
                          progress=False)
    evaluator = Evaluator(run, data=None, data_dir="d", device=None, rank=0, world_size=1)
    assert [s for s in range(1, 101) if evaluator.should_eval(s, s == 100, s == 30)] == [30, 50, 100]
    saver = Checkpointer(None, run, {})
    assert [s for s in range(1, 61) if saver.should_save(s, s == 55, bad_streak=int(s == 40))] == [20, 55, 60]
    log = TrainLog(MetricsWriter(None, False), run, 1.0, 1, 0)
    assert [s for s in range(1, 31) if log.should_log(s, s == 25)] == [10, 20, 25, 30]
