"""BERT for pre-training (MLM, optional NSP) with Hugging Face-compatible parameter names.

Parameter names and shapes match `transformers.BertForPreTraining`, so HF checkpoints load directly
and an exported post-LN model loads back into HF (see `training.model.hf`). Differences from HF:

* The pooler (`bert.pooler.dense`) and `cls.seq_relationship` exist only when `cfg.nsp` is true; an
  MLM-only model never trains them. `export_hf` fills them with freshly initialised weights, except a
  pooler imported from an HF checkpoint: with `cfg.carry_pooler` it is carried as fp32 buffers
  (`CarriedPooler`), never trained, and exported as imported.
* `norm: pre` reuses the two per-layer LayerNorms (`attention.output.LayerNorm`, `output.LayerNorm`)
  as the LayerNorms *before* each sub-layer and adds `bert.encoder.final_layer_norm`. Same names,
  different maths: a Pre-LN model exports to HF's RobertaPreLayerNormForMaskedLM, not BertForPreTraining.
* The MLM head runs the transform and the vocab projection only at masked positions when labels are
  given: with 15% masking that skips ~85% of the [tokens, vocab] matmul and logits memory.
* Attention backend, per-layer head/FFN sizes (structured pruning), low-rank FFN (CoRe) and
  progressive layer dropping are selected by `ModelConfig` / forward arguments.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from training.errors import UserError
from training.model import fused
from training.model.compiled import compile_layers
from training.model.config import ModelConfig
from training.model.ops import (Dropout, eager_attention, fused_attention, linear_attention, linear_gelu,
                                locality_bias, mlm_loss_eager, residual_layernorm, sdpa_attention)
from training.model.unpad import Packed, pack

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value of positions without an MLM target (HF convention)


# --------------------------------------------------------------------------------------------------
# Modules. Names mirror HF so state_dict keys match.
# --------------------------------------------------------------------------------------------------

class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # padding_idx as HF: the pad row gets no gradient (matters for gradient parity).
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor],
                packed: Optional[Packed] = None) -> torch.Tensor:
        """[B, S, hidden]; with `packed`, the real tokens only: [total, hidden]."""
        seq_len = input_ids.shape[1]
        if seq_len > self.position_embeddings.num_embeddings:
            raise UserError(f"sequence length {seq_len} exceeds model.max_position "
                            f"({self.position_embeddings.num_embeddings})")
        positions = torch.arange(seq_len, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if packed is not None:  # each real token keeps its position in its row
            input_ids, token_type_ids = packed.gather(input_ids), packed.gather(token_type_ids)
            positions = packed.indices % seq_len
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    """Q/K/V projections + the backend selected by cfg.attention. `num_heads` may be below
    cfg.num_heads after head pruning; head_dim stays hidden_size // cfg.num_heads."""

    def __init__(self, cfg: ModelConfig, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = cfg.head_dim
        self.backend = cfg.attention
        self.dropout_p = cfg.attention_dropout
        inner = num_heads * self.head_dim
        self.query = nn.Linear(cfg.hidden_size, inner)
        self.key = nn.Linear(cfg.hidden_size, inner)
        self.value = nn.Linear(cfg.hidden_size, inner)
        if cfg.slimming:  # EarlyBERT: one coefficient per head scales that head's context output
            self.head_coef = nn.Parameter(torch.ones(num_heads))

    def _attend(self, q, k, v, key_padding):
        """The configured backend on [B, H, S, D] with a bool or additive key mask."""
        dropout_p = self.dropout_p if self.training else 0.0
        scale = self.head_dim ** -0.5
        if self.backend == "eager":
            return eager_attention(q, k, v, key_padding, dropout_p, scale)
        if self.backend == "sdpa":
            return sdpa_attention(q, k, v, key_padding, dropout_p, scale)
        if self.backend == "fused":
            return fused_attention(q, k, v, key_padding, dropout_p, scale)
        return linear_attention(q, k, v, key_padding)  # "linear"

    def _attend_packed(self, q, k, v, packed: Packed):
        """[total, H, D] real tokens: the varlen kernel where it runs (CUDA, attention fused), else per bucket."""
        if self.backend == "fused":
            dropout_p = self.dropout_p if self.training else 0.0

            def per_bucket(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale):
                return packed.attention(q, k, v, self._attend)

            return fused.ATTENTION_VARLEN(q, k, v, packed.cu_seqlens, packed.max_seqlen, dropout_p,
                                          self.head_dim ** -0.5, fallback=per_bucket)
        return packed.attention(q, k, v, self._attend)

    def forward(self, x: torch.Tensor, key_padding: Union[torch.Tensor, Packed, None]) -> torch.Tensor:
        """x [B, S, hidden] with key_padding a [B, S] bool mask, an additive mask or None; or x [total, hidden]
        (real tokens only) with key_padding the batch's Packed form."""
        if isinstance(key_padding, Packed):
            q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in (self.query(x), self.key(x), self.value(x)))
            out = self._attend_packed(q, k, v, key_padding)  # [total, H, D]
            if hasattr(self, "head_coef"):
                out = out * self.head_coef.to(out.dtype)[:, None]
            return out.reshape(-1, self.num_heads * self.head_dim)
        batch, seq, _ = x.shape

        def heads(t):  # [B, S, H*D] -> [B, H, S, D]
            return t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if key_padding is not None and key_padding.is_floating_point():
            if self.backend not in ("eager", "sdpa"):
                raise UserError(f"the locality bias needs model.attention eager or sdpa, not {self.backend}")
            key_padding = key_padding[:, : self.num_heads]  # a pruned layer keeps its first heads' slopes
        out = self._attend(q, k, v, key_padding)
        if hasattr(self, "head_coef"):
            out = out * self.head_coef.to(out.dtype)[:, None, None]
        return out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)


class AttentionOutput(nn.Module):
    def __init__(self, cfg: ModelConfig, num_heads: int):
        super().__init__()
        self.dense = nn.Linear(num_heads * cfg.head_dim, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, num_heads: int):
        super().__init__()
        self.self = SelfAttention(cfg, num_heads)
        self.output = AttentionOutput(cfg, num_heads)

    def projected(self, x: torch.Tensor, key_padding: Optional[torch.Tensor]) -> torch.Tensor:
        """Attention and its output projection (no dropout, no add, no norm)."""
        return self.output.dense(self.self(x, key_padding))

    def branch(self, x: torch.Tensor, key_padding: Optional[torch.Tensor]) -> torch.Tensor:
        """The residual branch: attention, output projection, dropout (no add, no norm)."""
        return self.output.dropout(self.projected(x, key_padding))


class Intermediate(nn.Module):
    """hidden -> ffn, GELU. With a rank r: x -> dense_v(dense_u(x)), i.e. W = V U of rank r."""

    def __init__(self, cfg: ModelConfig, ffn_size: int):
        super().__init__()
        if cfg.ffn_rank is None:
            self.dense = nn.Linear(cfg.hidden_size, ffn_size)
        else:
            self.dense_u = nn.Linear(cfg.hidden_size, cfg.ffn_rank, bias=False)
            self.dense_v = nn.Linear(cfg.ffn_rank, ffn_size)
        if cfg.slimming:  # EarlyBERT: one coefficient per FFN neuron scales its post-GELU activation
            self.neuron_coef = nn.Parameter(torch.ones(ffn_size))
        self.fused_gelu = "bias_gelu" in cfg.fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "dense_u"):
            x = self.dense_u(x)
        x = linear_gelu(x, self.dense if hasattr(self, "dense") else self.dense_v, self.fused_gelu)
        return x * self.neuron_coef.to(x.dtype) if hasattr(self, "neuron_coef") else x


class Output(nn.Module):
    """ffn -> hidden projection (full or rank-r like Intermediate), dropout, and a LayerNorm."""

    def __init__(self, cfg: ModelConfig, ffn_size: int):
        super().__init__()
        if cfg.ffn_rank is None:
            self.dense = nn.Linear(ffn_size, cfg.hidden_size)
        else:
            self.dense_u = nn.Linear(ffn_size, cfg.ffn_rank, bias=False)
            self.dense_v = nn.Linear(cfg.ffn_rank, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def projected(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) if hasattr(self, "dense") else self.dense_v(self.dense_u(x))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.projected(x))


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.fused_residual = "residual_layernorm" in cfg.fused_ops  # post-LN only (config checks)
        self.attention = Attention(cfg, cfg.layer_heads(index))
        self.intermediate = Intermediate(cfg, cfg.layer_ffn(index))
        self.output = Output(cfg, cfg.layer_ffn(index))

    def forward(self, x: torch.Tensor, key_padding: Optional[torch.Tensor], branch_scale: float = 1.0):
        ln_attn, ln_ffn = self.attention.output.LayerNorm, self.output.LayerNorm
        if self.pre_norm:
            # Pre-LN: x + f(LN(x)); the residual stream itself is never normalised here.
            # branch_scale = 1/keep_prob under progressive layer dropping keeps the expectation.
            x = x + branch_scale * self.attention.branch(ln_attn(x), key_padding)
            return x + branch_scale * self.output.project(self.intermediate(ln_ffn(x)))
        # Post-LN (HF): LN(x + dropout(f(x))).
        x = residual_layernorm(x, self.attention.projected(x, key_padding), ln_attn, self.attention.output.dropout,
                               self.fused_residual)
        return residual_layernorm(x, self.output.projected(self.intermediate(x)), ln_ffn, self.output.dropout,
                                  self.fused_residual)


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i) for i in range(cfg.num_layers))
        if cfg.norm == "pre":
            # Pre-LN leaves the residual stream un-normalised; normalise once before the heads.
            self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def max_heads(self) -> int:
        return max(layer.attention.self.num_heads for layer in self.layer)

    def frozen_prefix(self) -> int:
        """How many leading layers have no trainable parameter (MSLT's frozen lower layers)."""
        for i, layer in enumerate(self.layer):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return len(self.layer)

    def forward(self, x, key_padding, layer_keep_prob: Optional[Sequence[float]] = None,
                layer_drop_generator: Optional[torch.Generator] = None, no_grad_layers: int = 0):
        """no_grad_layers: run the first n layers forward-only under torch.no_grad() (no activations kept,
        no backward); only valid when nothing below them trains either (see Bert.forward)."""
        if not self.training:
            layer_keep_prob = None  # inference runs every layer, unscaled
        elif layer_keep_prob is not None:
            layer_keep_prob = [float(p) for p in layer_keep_prob]  # one host copy if a tensor
        for i, layer in enumerate(self.layer):
            with torch.no_grad() if i < no_grad_layers else contextlib.nullcontext():
                if layer_keep_prob is None:
                    x = layer(x, key_padding)
                    continue
                p = layer_keep_prob[i]
                # Draw from a CPU generator (default: torch's): no device sync. Data-parallel ranks must pass
                # generators seeded alike, or they would skip different layers and reduce different grads.
                # p >= 1 draws nothing, so keep-prob 1 leaves the RNG stream untouched.
                if p >= 1.0:
                    x = layer(x, key_padding)
                elif p > 0.0 and torch.rand((), generator=layer_drop_generator).item() < p:
                    x = layer(x, key_padding, branch_scale=1.0 / p)
                # else: skipped, identity
        if hasattr(self, "final_layer_norm"):
            x = self.final_layer_norm(x)
        return x


class Pooler(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class _CarriedLinear(nn.Module):
    """A Linear's weight and bias as persistent fp32 buffers: in the state dict (checkpoints, stage transitions,
    export) under the Linear's names, but no parameter, so no optimizer, gradient or DeepSpeed bf16/fp16 cast
    (DeepSpeed casts parameters only) ever changes them. Zeros until loaded (training.model.hf)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features))
        self.register_buffer("bias", torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class CarriedPooler(Pooler):
    """The pooler of an MLM-only model started from an HF checkpoint (cfg.carry_pooler): MLM never uses it;
    it is carried untrained so the export writes back the imported one (load_hf_weights fills it)."""

    def __init__(self, cfg: ModelConfig):
        nn.Module.__init__(self)
        self.dense = _CarriedLinear(cfg.hidden_size, cfg.hidden_size)


class Bert(nn.Module):
    """Embeddings + encoder (+ pooler when cfg.nsp; untrained when cfg.carry_pooler). forward returns the last
    hidden states."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        if cfg.nsp:
            self.pooler = Pooler(cfg)
        elif cfg.carry_pooler:
            self.pooler = CarriedPooler(cfg)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, layer_keep_prob=None,
                layer_drop_generator=None, locality: float = 0.0):
        """The last hidden states [B, S, hidden] at every position, padding included, as Hugging Face's."""
        return self.encode(input_ids, attention_mask, token_type_ids, layer_keep_prob, layer_drop_generator,
                           locality)[0]

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, layer_keep_prob=None,
               layer_drop_generator=None, locality: float = 0.0, unpad: bool = False
               ) -> tuple[torch.Tensor, Optional[Packed]]:
        """(hidden, packed): with `unpad` and a batch that has padding, hidden is [total, hidden] over the real
        tokens and `packed` says where they sit (training/model/unpad.py); else [B, S, hidden] and None."""
        key_padding = attention_mask.bool() if attention_mask is not None else None
        packed = None
        if locality > 0:  # one additive mask for every layer (see locality_bias)
            key_padding = locality_bias(key_padding, input_ids.shape[1], self.encoder.max_heads(), locality,
                                        self.embeddings.word_embeddings.weight.dtype, input_ids.device)
        elif unpad and key_padding is not None:
            packed = pack(key_padding)
            key_padding = packed if packed is not None else key_padding
        # Frozen bottom (MSLT): when the embeddings and the leading layers train no parameter, they run
        # forward-only; the first trainable layer gets an input without grad history. Checked per call
        # from requires_grad (a few flag reads), so freezing/unfreezing needs no extra bookkeeping.
        frozen = 0
        if torch.is_grad_enabled() and not any(p.requires_grad for p in self.embeddings.parameters()):
            frozen = self.encoder.frozen_prefix()
            with torch.no_grad():
                x = self.embeddings(input_ids, token_type_ids, packed)
        else:
            x = self.embeddings(input_ids, token_type_ids, packed)
        return self.encoder(x, key_padding, layer_keep_prob, layer_drop_generator, no_grad_layers=frozen), packed


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
        if cfg.compile:
            compile_layers(self.bert.encoder.layer)

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
        slimming_penalty  cfg.slimming in training mode: slimming_l1 * sum|c|, already included in mlm_loss

        locality: strength of the training-time locality bias on every attention layer (locality_bias);
        0 (the default, and always at evaluation) is plain BERT attention.
        """
        if layer_keep_prob is not None:
            if self.cfg.norm != "pre":
                raise UserError("progressive layer dropping (layer_keep_prob) needs model.norm: pre")
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
        if self.cfg.slimming and self.training and self.cfg.slimming_l1 > 0 and "mlm_loss" in out:
            # EarlyBERT's L1 penalty, folded into mlm_loss: the runner weights each micro-batch's mlm_loss
            # by its share of the global masked-token count, so the penalty enters each step exactly once.
            penalty = self.cfg.slimming_l1 * self.slimming_l1_norm()
            out["slimming_penalty"] = penalty.detach()
            out["mlm_loss"] = out["mlm_loss"] + penalty
            losses[0] = out["mlm_loss"]
        if losses:
            out["loss"] = sum(losses)
        return out

    def slimming_l1_norm(self) -> torch.Tensor:
        """sum |c| over every slimming coefficient (heads and FFN neurons), in fp32."""
        return sum(p.float().abs().sum() for name, p in self.named_parameters()
                   if name.endswith(("head_coef", "neuron_coef")))

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
