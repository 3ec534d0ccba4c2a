"""Learning-rate schedule: linear warmup then polynomial decay, as a list of segments.

`step` everywhere is the number of optimizer steps already taken, so the first update uses
lr(0) (= 0 when there is warmup; the usual convention, e.g. HF's linear warmup).

One segment (start_step, end_step, warmup_steps, peak_lr, end_lr, power[, decay_end_step]) covers
global steps [start_step, end_step). With k = step - start_step and a = start_step + warmup_steps:
    k < warmup_steps : lr = peak_lr * k / warmup_steps                      (linear warmup)
    otherwise        : lr = end_lr + (peak_lr - end_lr) * (1 - (step - a) / (D - a)) ** power
where D = decay_end_step (default end_step) and the base is clamped to [0, 1]. A single segment
[0, total) is the plain warmup_poly_decay. Past the last segment the lr stays at its end value.

Multi-stage runs (e.g. BERT seq-128 then seq-512) append a segment per stage. The global step keeps
counting, so the run resumes where it stopped. staged_segments builds segments that restart
warmup at each stage boundary and then rejoin ONE global decay curve exactly: each stage decays
towards the global end (decay_end_step = total) starting from the global curve's value at the end
of its warmup; a polynomial decay that ends at end_lr restarted on its own curve is the same curve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


def warmup_poly_decay(step: int, total_steps: int, warmup_steps: int, peak_lr: float, end_lr: float = 0.0,
                      power: float = 1.0) -> float:
    """Linear warmup 0 -> peak_lr over warmup_steps, then (peak-end)*(1-progress)^power + end by total_steps."""
    return Segment(0, total_steps, warmup_steps, peak_lr, end_lr, power).lr(step)


@dataclass(frozen=True)
class Segment:
    start_step: int
    end_step: int
    warmup_steps: int
    peak_lr: float
    end_lr: float = 0.0
    power: float = 1.0
    decay_end_step: Optional[int] = None  # None: decay reaches end_lr at end_step

    def __post_init__(self):
        decay_end = self.end_step if self.decay_end_step is None else self.decay_end_step
        if not 0 <= self.start_step < self.end_step <= decay_end:
            raise ValueError(f"need 0 <= start < end <= decay_end, got {self}")
        if not 0 <= self.warmup_steps <= self.end_step - self.start_step:
            raise ValueError(f"warmup_steps must fit in the segment: {self}")
        if self.peak_lr < 0 or self.end_lr < 0 or self.power <= 0:
            raise ValueError(f"need peak_lr, end_lr >= 0 and power > 0: {self}")

    def lr(self, step: int) -> float:
        k = step - self.start_step
        if k < self.warmup_steps:
            return self.peak_lr * max(k, 0) / self.warmup_steps
        decay_start = self.start_step + self.warmup_steps
        decay_end = self.end_step if self.decay_end_step is None else self.decay_end_step
        if decay_end == decay_start:
            return self.end_lr
        remaining = min(max(1.0 - (step - decay_start) / (decay_end - decay_start), 0.0), 1.0)
        return self.end_lr + (self.peak_lr - self.end_lr) * remaining ** self.power


def staged_segments(total_steps: int, peak_lr: float, stages: Sequence[tuple[int, int]], end_lr: float = 0.0,
                    power: float = 1.0) -> list[Segment]:
    """stages: [(start_step, warmup_steps), ...], first start 0. Stage 1 is the global curve;
    later stages warm up from 0 to the global curve at their warmup's end, then follow it."""
    starts = [s for s, _ in stages] + [total_steps]
    first_warmup = stages[0][1]
    segments = []
    for (start, warmup), end in zip(stages, starts[1:]):
        peak = peak_lr if start == 0 else warmup_poly_decay(start + warmup, total_steps, first_warmup,
                                                            peak_lr, end_lr, power)
        segments.append(Segment(start, end, warmup, peak, end_lr, power, decay_end_step=total_steps))
    return segments


def lr_at(segments: Sequence[Segment], step: int) -> float:
    for seg in segments:
        if step < seg.end_step:
            return seg.lr(step)
    return segments[-1].lr(step)
