"""BERT for pre-training (MLM, optional NSP) with Hugging Face-compatible parameter names.

Parameter names and shapes match `transformers.BertForPreTraining`, so HF checkpoints load directly
and an exported post-LN model loads back into HF (see `training.model.hf`, `training.model.hf_export`).
Differences from HF:

* The pooler (`bert.pooler.dense`) and `cls.seq_relationship` exist only when `cfg.nsp` is true; an
  MLM-only model never trains them and `export_hf` writes it as `BertForMaskedLM`, without them, except a
  pooler imported from an HF checkpoint: with `cfg.carry_pooler` it is carried as fp32 buffers
  (`encoder.CarriedPooler`), never trained, and exported as imported.
* `norm: pre` reuses the two per-layer LayerNorms (`attention.output.LayerNorm`, `output.LayerNorm`)
  as the LayerNorms *before* each sub-layer and adds `bert.encoder.final_layer_norm`. Same names,
  different maths: a Pre-LN model exports to HF's RobertaPreLayerNormForMaskedLM, not BertForPreTraining.
* The MLM head runs the transform and the vocab projection only at masked positions when labels are
  given: with 15% masking that skips ~85% of the [tokens, vocab] matmul and logits memory.
* Attention backend, per-layer head/FFN sizes (structured pruning), low-rank FFN (CoRe) and
  progressive layer dropping are selected by `ModelConfig` / forward arguments.

This module holds the pre-training heads (`cls.predictions`, `cls.seq_relationship`) and BertForPreTraining;
the encoder under them (`bert.*`: embeddings, layers, pooler) is training/model/encoder.py.
"""
from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from training.errors import UserError
from training.model import fused
from training.model.addons import addons_of
from training.model.compiled import compile_layers
from training.model.config import ModelConfig
from training.model.encoder import Bert
from training.model.ops import linear_gelu, mlm_loss_eager

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value of positions without an MLM target (HF convention)


class PredictionHeadTransform(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fused_gelu = "bias_gelu" in cfg.fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(linear_gelu(x, self.dense, self.fused_gelu))


class MLMHead(nn.Module):
    """cls.predictions: transform then the vocab projection tied to the word embeddings.

    `decoder` is an nn.Linear whose weight *is* the word-embedding Parameter and whose bias *is*
    `self.bias`, so state_dict carries HF's keys (cls.predictions.bias, .decoder.weight/.bias).
    """

    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionHeadTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        self.tie(word_embeddings)

    def tie(self, word_embeddings: nn.Embedding) -> None:
        """The decoder's weight *is* the word-embedding Parameter, its bias *is* `self.bias` (again after a
        conversion that made new Parameters, e.g. Module.to_empty)."""
        self.decoder.weight = word_embeddings.weight
        self.decoder.bias = self.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


def sinusoidal_positions(max_position: int, hidden: int, std: float) -> torch.Tensor:
    """[max_position, hidden] table of Vaswani et al.'s sines and cosines, scaled to `std` per entry (the
    word embeddings' init scale, so neither dominates the embedding sum). A start for the learned position
    table (model.position_init: sinusoidal): offsets are linear maps of it, so one Q/K projection can learn
    "attend to the neighbour" for every position at once, where N(0, std) rows need it learned per position."""
    pos = torch.arange(max_position, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, hidden, 2, dtype=torch.float64) / hidden)
    table = torch.zeros(max_position, hidden, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : hidden // 2]
    return (table * (std / math.sqrt(0.5))).float()  # sin^2 and cos^2 average 1/2


class BertForPreTraining(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.bert = Bert(cfg)
        self.cls = nn.Module()  # plain container so names read cls.predictions / cls.seq_relationship
        self.cls.predictions = MLMHead(cfg, self.bert.embeddings.word_embeddings)
        if cfg.nsp:
            self.cls.seq_relationship = nn.Linear(cfg.hidden_size, 2)
        self.apply(self._init_weights)
        if cfg.ffn_rank is not None:
            self._init_low_rank_factors()
        if cfg.position_init == "sinusoidal":
            with torch.no_grad():
                self.bert.embeddings.position_embeddings.weight.copy_(
                    sinusoidal_positions(cfg.max_position, cfg.hidden_size, cfg.initializer_range))
        self.addons = addons_of(cfg)  # methods that add parameters (training/model/addons.py)
        for addon in self.addons:
            addon.attach(self)
        if cfg.compile:
            compile_layers(self.bert.encoder.layer)

    @classmethod
    def from_weights(cls, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> "BertForPreTraining":
        """The model holding `weights` (loaded strictly: every tensor), built on the meta device so that no
        random initialisation is drawn only to be overwritten (a stage transition's new module)."""
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device="cpu")
        model.cls.predictions.tie(model.bert.embeddings.word_embeddings)  # to_empty made each Parameter anew
        model.load_state_dict(weights)
        return model

    def _init_weights(self, module: nn.Module) -> None:
        """As HF: N(0, initializer_range) weights, zero biases, LayerNorm (1, 0), zero pad row."""
        std = self.cfg.initializer_range
        if isinstance(module, MLMHead):
            nn.init.zeros_(module.bias)  # its decoder shares the embedding: not re-initialised
        elif isinstance(module, nn.Linear) and module is not self.cls.predictions.decoder:
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _init_low_rank_factors(self) -> None:
        # A product of two N(0, s) factors has std s^2 sqrt(rank); choose s so U V ~ N(0, std) like
        # the full-rank matrix it replaces.
        s = math.sqrt(self.cfg.initializer_range / math.sqrt(self.cfg.ffn_rank))
        for layer in self.encoder_layers:
            for part in (layer.intermediate, layer.output):
                nn.init.normal_(part.dense_u.weight, std=s)
                nn.init.normal_(part.dense_v.weight, std=s)

    @property
    def encoder_layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        next_sentence_label: Optional[torch.Tensor] = None,
        layer_keep_prob: Optional[Union[Sequence[float], torch.Tensor]] = None,
        layer_drop_generator: Optional[torch.Generator] = None,
        locality: float = 0.0,
    ) -> dict:
        """Returns a dict:

        loss          MLM mean over masked tokens (+ NSP loss when next_sentence_label is given)
        mlm_loss      fp32 scalar, mlm_correct / mlm_count: int64 scalar tensors (no device sync)
        nsp_loss      when next_sentence_label is given (requires cfg.nsp)
        logits        [B, S, vocab] only when labels is None (parity tests / export)
        nsp_logits    [B, 2] when cfg.nsp
        aux_losses    in training mode with labels, when a model add-on has some: name -> loss (EarlyBERT's
                      `slimming_penalty`), included in `loss`, not in `mlm_loss`

        locality: strength of the training-time locality bias on every attention layer (locality_bias);
        0 (the default, and always at evaluation) is plain BERT attention.
        """
        if layer_keep_prob is not None:
            try:
                self.cfg.check_layer_drop()
            except ValueError as err:
                raise UserError(f"layer_keep_prob: {err}") from None
            if len(layer_keep_prob) != self.cfg.num_layers:
                raise UserError(f"layer_keep_prob has {len(layer_keep_prob)} entries for "
                                f"{self.cfg.num_layers} layers")
        if next_sentence_label is not None and not self.cfg.nsp:
            raise UserError("next_sentence_label given but model.nsp is false (no NSP head)")

        # Unpadded only for the loss (masked positions, all real tokens): logits keep every position, as HF's.
        hidden, packed = self.bert.encode(input_ids, attention_mask, token_type_ids, layer_keep_prob,
                                          layer_drop_generator, locality, unpad=self.cfg.unpad and labels is not None)
        out: dict = {}
        losses = []
        if labels is None:
            out["logits"] = self.cls.predictions(hidden)
        else:  # masked positions only: unpadded, the labels are gathered like the tokens
            out.update(self._masked_lm(hidden, packed.gather(labels) if packed is not None else labels))
            losses.append(out["mlm_loss"])
        if self.cfg.nsp:
            nsp_logits = self.cls.seq_relationship(self.bert.pooler(packed.scatter(hidden) if packed is not None
                                                                    else hidden))
            out["nsp_logits"] = nsp_logits
            if next_sentence_label is not None:
                out["nsp_loss"] = F.cross_entropy(nsp_logits.float(), next_sentence_label.view(-1))
                losses.append(out["nsp_loss"])
        aux = {name: loss for addon in self.addons for name, loss in addon.aux_losses(self).items()} \
            if self.training and "mlm_loss" in out else {}
        if aux:  # the step trains on them beside the MLM loss, not knowing what they are (engine/step.py)
            out["aux_losses"] = aux
            losses[0] = losses[0] + sum(aux.values())
        if losses:
            out["loss"] = sum(losses)
        return out

    def _masked_lm(self, hidden: torch.Tensor, labels: torch.Tensor) -> dict:
        """MLM loss on masked positions only: gather, then transform + vocab projection."""
        flat_labels = labels.reshape(-1)
        # nonzero() syncs with the device once per step; the price of data-dependent shapes.
        positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
        targets = flat_labels.index_select(0, positions)
        selected = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        head = self.cls.predictions
        transformed = head.transform(selected)
        if "mlm_loss" in self.cfg.fused_ops:  # no [masked tokens, vocab] logits in memory
            loss, correct = fused.MLM_LOSS(transformed, head.decoder.weight, head.decoder.bias, targets,
                                           fallback=mlm_loss_eager)
        else:
            loss, correct = mlm_loss_eager(transformed, head.decoder.weight, head.decoder.bias, targets)
        count = torch.tensor(positions.numel(), device=labels.device)
        return {"mlm_loss": loss, "mlm_correct": correct, "mlm_count": count}
