"""Small MSLT models and batches (tests/unit/test_mslt.py, tests/integration/test_mslt_runs.py)."""
import torch

from tests.helpers.tiny_run import TINY_MODEL
from training.model.bert import BertForPreTraining
from training.model.config import ModelConfig
from training.stages import mslt

LAYER = "bert.encoder.layer.{}."


def tiny_cfg(num_layers=3, **over) -> ModelConfig:
    return ModelConfig(**{**TINY_MODEL, "num_layers": num_layers, **over})


def frozen_model(num_layers=3, train_top=1, **over):
    torch.manual_seed(0)
    model = BertForPreTraining(tiny_cfg(num_layers, **over))
    mslt.freeze(model, train_top)
    return model


def tiny_batch(seed=0, batch=2, seq=16, vocab=TINY_MODEL["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
