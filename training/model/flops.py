"""Model size and compute accounting (for MFU / throughput reports and budget planning).

Training FLOPs per token, counting only matmuls (a multiply-add = 2 FLOPs) and taking the backward
pass as twice the forward (gradients w.r.t. inputs and w.r.t. weights):

    flops_per_token = 3 * forward, where forward =
        sum over layers i of
            2 * (4 * hidden * a_i)                       Q, K, V, O projections, a_i = heads_i * head_dim
          + 2 * ffn_params_i                             2*hidden*ffn_i, or rank r: 2*r*(hidden + ffn_i)
          + attention_i                                  softmax: 4 * seq_len * a_i (QK^T and PV)
                                                         linear:  4 * a_i * head_dim + 4 * a_i
      + masked_fraction * 2 * (hidden^2 + hidden*vocab)  MLM head, run only at masked positions
      + [nsp] 2 * (hidden^2 + 2*hidden) / seq_len        pooler + NSP classifier, once per sequence

Embedding lookups, LayerNorm, GELU, softmax and residual adds are ignored (<~2% for BERT shapes).
Progressive layer dropping reduces the layer terms by the mean keep probability; not modelled here.
"""
from __future__ import annotations

from torch import nn

from training.model.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int, masked_fraction: float = 0.15) -> float:
    """Training (forward + backward) FLOPs per input token; see the module docstring."""
    hidden = cfg.hidden_size
    forward = 0.0
    for i in range(cfg.num_layers):
        attn_width = cfg.layer_heads(i) * cfg.head_dim
        ffn = cfg.layer_ffn(i)
        ffn_params = 2 * hidden * ffn if cfg.ffn_rank is None else 2 * cfg.ffn_rank * (hidden + ffn)
        if cfg.attention == "linear":
            # phi(K)^T V and phi(Q) (KV): D x D per head each; plus the normaliser phi(Q) . sum phi(K)
            attention = 4 * attn_width * cfg.head_dim + 4 * attn_width
        else:
            attention = 4 * seq_len * attn_width
        forward += 2 * (4 * hidden * attn_width) + 2 * ffn_params + attention
    forward += masked_fraction * 2 * (hidden * hidden + hidden * cfg.vocab_size)
    if cfg.nsp:
        forward += 2 * (hidden * hidden + 2 * hidden) / seq_len
    return 3.0 * forward


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; tied weights (decoder = word embeddings) are counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
