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
counting, so the run resumes where it stopped. LRSchedule.staged builds segments that restart
warmup at each stage boundary and then rejoin ONE global decay curve exactly: each stage decays
towards the global end (decay_end_step = total) starting from the global curve's value at the end
of its warmup; a polynomial decay that ends at end_lr restarted on its own curve is the same curve.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
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


class LRSchedule:
    """Per-step lr over contiguous segments; sets every param group's 'lr' of `optimizer`.

    Give it to deepspeed.initialize(lr_scheduler=...): DeepSpeed calls step() after each applied
    optimizer step (not on overflow skips) and saves/loads state_dict() with checkpoints. Do not add
    __call__: DeepSpeed would treat a callable as a scheduler factory.
    """

    def __init__(self, optimizer, segments: Sequence[Segment | tuple], last_step: int = 0):
        self.optimizer = optimizer
        self.segments = [s if isinstance(s, Segment) else Segment(*s) for s in segments]
        if not self.segments or self.segments[0].start_step != 0:
            raise ValueError("segments must start at step 0")
        for a, b in zip(self.segments, self.segments[1:]):
            if b.start_step != a.end_step:
                raise ValueError(f"segments must be contiguous: {a} then {b}")
        self.last_step = last_step
        self._apply()

    @classmethod
    def staged(cls, optimizer, total_steps: int, peak_lr: float, stages: Sequence[tuple[int, int]],
               end_lr: float = 0.0, power: float = 1.0, last_step: int = 0) -> "LRSchedule":
        """stages: [(start_step, warmup_steps), ...] (see staged_segments)."""
        return cls(optimizer, staged_segments(total_steps, peak_lr, stages, end_lr, power), last_step=last_step)

    def lr_at(self, step: int) -> float:
        return lr_at(self.segments, step)

    def _apply(self):
        lr = self.lr_at(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr] * len(self.optimizer.param_groups)

    def step(self):
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        # Segments are saved for inspection only; load keeps the configured ones so a resumed run
        # may append stages.
        return {"last_step": self.last_step, "segments": [asdict(s) for s in self.segments]}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


def make_lr_scheduler(optimizer, total_steps: int, warmup_steps: int, peak_lr: float, end_lr: float = 0.0,
                      power: float = 1.0, last_step: int = 0) -> LRSchedule:
    """The single-segment (plain) schedule."""
    return LRSchedule(optimizer, [Segment(0, total_steps, warmup_steps, peak_lr, end_lr, power)], last_step)
