"""The held-out yardstick during a run, and when it is taken: every run.eval_every steps, at the run's end, and at
each stage's end with run.eval_at_stage_end; its last score, and the stop at run.stop_below_unigram once a score
reaches it.

The score: MLM loss and accuracy at the fixed all-[MASK] positions (training/data/loader.py FIXED_MASK_*, the same
for every run and checkpoint), beside the unigram table's loss on the same positions and how far below it the
model is (nats; <= 0 means nothing learned from context). Each rank scores its share of the fixed batches and
the sums are all-reduced, so every rank holds the same score (and stops at the same step).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from training.engine.step import all_reduce_scalars
from training.errors import UserError

log = logging.getLogger(__name__)


class Evaluator:
    def __init__(self, run, data, data_dir: str, device: torch.device, rank: int, world_size: int):
        self.run, self.data, self.data_dir = run, data, data_dir
        self.device, self.rank, self.world_size = device, rank, world_size
        self.last: dict = {}  # the latest score the run recorded
        self.stopped_below: Optional[float] = None  # nats below unigram at the score that reached the target

    def should_eval(self, step: int, run_end: bool, stage_end: bool) -> bool:
        return step % self.run.eval_every == 0 or run_end or (stage_end and self.run.eval_at_stage_end)

    @torch.no_grad()
    def evaluate(self, module: torch.nn.Module, **forward_kwargs) -> dict:
        """The score of `module`: the plain model, or with `forward_kwargs` the model as it trains (a training
        modifier's, e.g. the locality bias at its current strength)."""
        was_training = module.training
        module.eval()
        loss_sum = correct = count = unigram = 0.0
        batches = self.data.heldout_batches(self.run.eval_batch_size, max_batches=self.run.eval_batches)
        for i, batch in enumerate(batches):
            if i % self.world_size != self.rank:  # each rank takes its share of the fixed held-out batches
                continue
            out = module(**{k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, **forward_kwargs)
            loss_sum += float(out["mlm_loss"].float()) * float(out["mlm_count"])
            correct += float(out["mlm_correct"])
            count += float(out["mlm_count"])
            unigram += self.data.unigram_nll(batch["labels"])
        module.train(was_training)
        loss_sum, correct, count, unigram = all_reduce_scalars([loss_sum, correct, count, unigram])
        if count == 0:  # a loss over nothing would read as a perfect 0.000
            raise UserError(f"data.dir={self.data_dir}: the held-out evaluation has no masked token")
        loss, unigram = loss_sum / count, unigram / count
        return {"heldout_loss": loss, "heldout_acc": correct / count, "heldout_unigram_loss": unigram,
                "heldout_below_unigram": unigram - loss}

    def score(self, module: torch.nn.Module, step: int) -> dict:
        """The run's score at `step` (kept as `last`), and whether it reaches run.stop_below_unigram."""
        self.last = self.evaluate(module)
        below, target = self.last["heldout_below_unigram"], self.run.stop_below_unigram
        self.stopped_below = None if target is None or below < target else below
        if self.stopped_below is not None:
            log.info("step %d: held-out loss %.3f is %.3f nats below the unigram reference "
                     "(run.stop_below_unigram=%g): stopping after a checkpoint", step, self.last["heldout_loss"],
                     below, target)
        return self.last
