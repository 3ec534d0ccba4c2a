import pytest
import torch

from training.engine.schedule import LRSchedule, Segment, make_lr_scheduler, warmup_poly_decay


def _opt():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)


def test_warmup_is_linear_from_zero_to_peak():
    lrs = [warmup_poly_decay(s, 100, 10, 1e-3) for s in range(11)]
    assert lrs == pytest.approx([1e-3 * s / 10 for s in range(11)], rel=1e-12)


def test_decay_is_polynomial_to_end_and_holds():
    total, warm, peak, end, power = 100, 10, 2.0, 0.5, 2.0
    for s in (10, 37, 80, 99):
        expected = end + (peak - end) * (1 - (s - warm) / (total - warm)) ** power
        assert warmup_poly_decay(s, total, warm, peak, end, power) == pytest.approx(expected, rel=1e-12)
    assert warmup_poly_decay(100, total, warm, peak, end, power) == pytest.approx(end)
    assert warmup_poly_decay(10_000, total, warm, peak, end, power) == pytest.approx(end)


def test_no_warmup_starts_at_peak():
    assert warmup_poly_decay(0, 10, 0, 1.0) == 1.0


def test_scheduler_sets_lr_on_every_group_each_step():
    opt = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                           {"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0}], lr=9.0)
    sched = make_lr_scheduler(opt, total_steps=20, warmup_steps=4, peak_lr=1.0)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]  # first update uses lr(0)
    for s in range(1, 25):
        sched.step()
        assert [g["lr"] for g in opt.param_groups] == [warmup_poly_decay(s, 20, 4, 1.0)] * 2
        assert sched.get_last_lr() == [opt.param_groups[0]["lr"]] * 2


def test_two_segments_restart_warmup():
    segs = [(0, 100, 10, 1.0, 0.0, 1.0), Segment(100, 150, 5, 0.5, 0.1, 2.0)]
    sched = LRSchedule(_opt(), segs)
    assert sched.lr_at(99) == pytest.approx(warmup_poly_decay(99, 100, 10, 1.0))
    assert sched.lr_at(100) == 0.0  # warmup restarts at the boundary
    assert sched.lr_at(102) == pytest.approx(0.5 * 2 / 5)
    assert sched.lr_at(120) == pytest.approx(warmup_poly_decay(20, 50, 5, 0.5, 0.1, 2.0))
    assert sched.lr_at(500) == pytest.approx(0.1)


@pytest.mark.parametrize("power", [1.0, 0.5, 2.0])
def test_staged_rejoins_the_global_decay(power):
    total, peak = 1000, 1.0
    sched = LRSchedule.staged(_opt(), total, peak, stages=[(0, 100), (600, 50)], end_lr=0.01, power=power)
    glob = lambda s: warmup_poly_decay(s, total, 100, peak, 0.01, power)  # noqa: E731
    for s in list(range(0, 600, 37)) + list(range(650, 1001, 29)):
        assert sched.lr_at(s) == pytest.approx(glob(s), rel=1e-9)
    assert sched.lr_at(600) == 0.0
    assert sched.lr_at(625) == pytest.approx(glob(650) / 2, rel=1e-9)


def test_state_dict_round_trip_resumes_mid_run():
    opt = _opt()
    sched = LRSchedule.staged(opt, 200, 1.0, stages=[(0, 20), (120, 10)], power=0.5)
    for _ in range(125):
        sched.step()
    state = sched.state_dict()
    assert state["last_step"] == 125

    opt2 = _opt()
    resumed = LRSchedule.staged(opt2, 200, 1.0, stages=[(0, 20), (120, 10)], power=0.5)
    resumed.load_state_dict(state)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for _ in range(30):
        sched.step()
        resumed.step()
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_bad_segments_are_rejected():
    with pytest.raises(ValueError):
        LRSchedule(_opt(), [(0, 10, 0, 1.0), (11, 20, 0, 1.0)])  # gap
    with pytest.raises(ValueError):
        LRSchedule(_opt(), [(5, 10, 0, 1.0)])  # does not start at 0
    with pytest.raises(ValueError):
        Segment(0, 10, 11, 1.0)  # warmup longer than the segment


def test_not_callable_so_deepspeed_uses_it_as_is():
    assert not callable(make_lr_scheduler(_opt(), 10, 1, 1.0))
