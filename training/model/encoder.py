"""The BERT encoder, `bert.*` of BertForPreTraining (training/model/bert.py, which adds the pre-training heads):
embeddings, the Transformer layers (self-attention on the backend cfg.attention selects, full or low-rank FFN,
Post-LN or Pre-LN, progressive layer dropping), the pooler (trained with NSP, or carried untrained), and `Bert`,
which runs them, on padded or unpadded (training/model/unpad.py) batches.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from training.errors import UserError
from training.model import fused
from training.model.config import ModelConfig, check_locality, check_seq_len
from training.model.ops import (Dropout, eager_attention, fused_attention, linear_attention, linear_gelu,
                                locality_bias, residual_layernorm, sdpa_attention)
from training.model.unpad import Packed, pack


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
        try:
            check_seq_len(seq_len, self.position_embeddings.num_embeddings, "sequence length")
        except ValueError as err:
            raise UserError(str(err)) from None
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
            return out.reshape(-1, self.num_heads * self.head_dim)
        batch, seq, _ = x.shape

        def heads(t):  # [B, S, H*D] -> [B, H, S, D]
            return t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        if key_padding is not None and key_padding.is_floating_point():
            try:
                check_locality(self.backend)
            except ValueError as err:
                raise UserError(str(err)) from None
            key_padding = key_padding[:, : self.num_heads]  # a pruned layer keeps its first heads' slopes
        out = self._attend(q, k, v, key_padding)
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
        self.fused_gelu = "bias_gelu" in cfg.fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "dense_u"):
            x = self.dense_u(x)
        return linear_gelu(x, self.dense if hasattr(self, "dense") else self.dense_v, self.fused_gelu)


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
