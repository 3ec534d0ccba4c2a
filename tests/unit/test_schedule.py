"""The LR schedule the runner reads each step (lr_at over the plan's segments: training/stages/plan.py)."""
import pytest

from training.engine.schedule import Segment, lr_at, staged_segments, warmup_poly_decay


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


def test_two_segments_restart_warmup():
    segs = [Segment(0, 100, 10, 1.0, 0.0, 1.0), Segment(100, 150, 5, 0.5, 0.1, 2.0)]
    assert lr_at(segs, 99) == pytest.approx(warmup_poly_decay(99, 100, 10, 1.0))
    assert lr_at(segs, 100) == 0.0  # warmup restarts at the boundary
    assert lr_at(segs, 102) == pytest.approx(0.5 * 2 / 5)
    assert lr_at(segs, 120) == pytest.approx(warmup_poly_decay(20, 50, 5, 0.5, 0.1, 2.0))
    assert lr_at(segs, 500) == pytest.approx(0.1)


@pytest.mark.parametrize("power", [1.0, 0.5, 2.0])
def test_staged_rejoins_the_global_decay(power):
    total, peak = 1000, 1.0
    segs = staged_segments(total, peak, [(0, 100), (600, 50)], end_lr=0.01, power=power)
    glob = lambda s: warmup_poly_decay(s, total, 100, peak, 0.01, power)  # noqa: E731
    for s in list(range(0, 600, 37)) + list(range(650, 1001, 29)):
        assert lr_at(segs, s) == pytest.approx(glob(s), rel=1e-9)
    assert lr_at(segs, 600) == 0.0
    assert lr_at(segs, 625) == pytest.approx(glob(650) / 2, rel=1e-9)


def test_bad_segments_are_rejected():
    with pytest.raises(ValueError):
        Segment(0, 10, 11, 1.0)  # warmup longer than the segment
