"""What every entry point does with a run config before training or measuring: load the prepared data, settle
the model's shape (from an HF checkpoint if asked; the vocabulary checked; sequence lengths are the plan's:
training/stages/plan.py), build the first stage's model. training.pretrain and the benchmark tools (training.bench) share it; it imports no entry script."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from training.config import RunConfig
from training.errors import UserError

log = logging.getLogger(__name__)


def resolve_model(cfg: RunConfig, vocab_size: int) -> None:
    """Check the model against the data before planning: the vocabulary must be the tokenizer's. (The shape of
    a `model.init_from_hf` model was resolved when the config loaded: config.load_config.) Changes nothing."""
    if cfg.model.vocab_size != vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer of data.dir={cfg.data.dir} "
                        f"has {vocab_size} tokens; set model.vocab_size={vocab_size} or prepare the data with "
                        "the model's tokenizer")


def build_initial_model(cfg: RunConfig) -> torch.nn.Module:
    """The first stage's model, from scratch or from `model.init_from_hf`."""
    from training.model.bert import BertForPreTraining
    from training.model.hf import load_hf_weights

    model_cfg = cfg.stage_model(0)
    model = BertForPreTraining(model_cfg)
    if model_cfg.init_from_hf:
        missing = load_hf_weights(model, model_cfg.init_from_hf)
        log.info("initialised from %s (left at init: %s)", model_cfg.init_from_hf, missing or "none")
    return model


def load_data(cfg: RunConfig):
    from training.data.loader import PretrainingData

    data_dir = Path(cfg.data.dir)
    if not (data_dir / "stats.json").is_file():
        raise UserError(f"data.dir={data_dir} holds no prepared data; run `python -m training.data prepare "
                        f"--out {data_dir} ...` (or `make data`) first")
    data = PretrainingData(data_dir, mlm_probability=cfg.data.mlm_probability,
                           whole_word=cfg.data.whole_word_mask, nsp=cfg.model.nsp)
    if cfg.model.nsp and data.stats.get("packed") is False:
        raise UserError(f"model.nsp needs packed rows with two segments, but data.dir={data_dir} was prepared with "
                        "--no-pack (one document per row); prepare it without --no-pack or set model.nsp=false")
    if data.num_heldout_rows == 0:  # every run evaluates (at least at its end): refuse now, not after training
        raise UserError(f"data.dir={data_dir}: the held-out split has no rows, so the run's held-out evaluation has "
                        "nothing to score; prepare the data with --heldout-fraction > 0 (and enough documents)")
    return data
