"""Model size and compute accounting (for MFU / throughput reports and budget planning).

FLOPs count what a training step computes: matmuls only (a multiply-add = 2 FLOPs). Per layer i
and token, the forward is

    W_i = 2 * (4 * hidden * a_i) + 2 * ffn_params_i    weight matmuls: Q, K, V, O (a_i = heads_i * head_dim)
                                                       and the FFN (2*hidden*ffn_i, or rank r: 2*r*(hidden + ffn_i))
    A_i = attention_i                                  weightless matmuls; softmax: 4 * seq_len * a_i (QK^T, PV),
                                                       linear: 4 * a_i * head_dim + 4 * a_i

and the heads' forward is masked_fraction * (T + D) with T = 2 hidden^2 (MLM transform) and
D = 2 hidden * vocab (decoder; the MLM head runs only at masked positions), plus [nsp]
(P + C) / seq_len with P = 2 hidden^2 (pooler), C = 4 hidden (NSP classifier), once per sequence.

Backward: every matmul's gradient w.r.t. an operand costs one forward of it. A weight matmul has
a weight gradient (computed only when that weight trains) and an input gradient (computed only when
something below it trains, i.e. the gradient has somewhere to go); a weightless matmul has two input
gradients. So a fully trained model costs 3 * forward (the usual rule), and in a stage where parts
are frozen (`Trainable`):

    layer i trains:                      forward + 2 W_i + 2 A_i        (3x forward)
      post-LN and nothing below trains:  minus 6 * hidden * a_i         (no input gradient for Q, K, V)
    frozen, something below trains:      forward + W_i + 2 A_i          (gradient passes through)
    frozen, nothing below trains:        forward                        (MSLT's frozen bottom, run under
                                                                        no_grad: 1/3 of a trained layer)
    MLM head: transform weight grad T if it trains, its input grad T if something below trains;
              decoder input grad D if the transform or anything below trains, its weight grad D only
              if the decoder weight (tied: the word embeddings) trains.
    pooler + NSP: the same pattern (weight grads P + C if they train, input grads as needed).

"Something below layer i trains" = an embedding parameter trains (then every layer passes gradients;
the lookups themselves are matmul-free), or a trained layer below i ran. Progressive layer dropping
(`keep_probs`): layer i runs with probability p_i, so its cost is multiplied by p_i, and "a trained
layer below ran" has probability 1 - prod_{trained j < i} (1 - p_j); the keep draws are independent.
A Pre-LN layer's LayerNorm trains with it, so the Q/K/V input gradient is needed even at the bottom
(no saving there). A layer "trains" when any of its parameters does (a layer with only some frozen
weights is charged as trained).

Embedding lookups, LayerNorm, GELU, softmax and residual adds are ignored (<~2% for BERT shapes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from torch import nn

from training.model import params
from training.model.config import ModelConfig


@dataclass(frozen=True)
class Trainable:
    """Which parts of a model get weight gradients in a stage (default: everything trains).

    layers: per encoder layer (None = all). embeddings: any embedding parameter (word, position, token
    type, embedding LayerNorm): a gradient path from the bottom. decoder_weight: the MLM decoder weight
    (tied to the word embeddings). mlm_transform: cls.predictions.transform. final_norm: the Pre-LN
    encoder.final_layer_norm. pooler: the pooler and the NSP classifier.
    """
    layers: Optional[tuple[bool, ...]] = None
    embeddings: bool = True
    decoder_weight: bool = True
    mlm_transform: bool = True
    final_norm: bool = True
    pooler: bool = True


# Which flag of Trainable a part of the model (training/model/params.py) sets; the MLM output bias has no matmul.
_PART_FLAG = {"embeddings": "embeddings", "decoder": "decoder_weight", "mlm_transform": "mlm_transform",
              "final_norm": "final_norm", "pooler": "pooler", "nsp": "pooler"}


def trainable_parts(model: nn.Module) -> Trainable:
    """Trainable from the parameters' requires_grad and what each is (params.describe): the encoder layers, the
    embeddings, the decoder weight (tied to the word embeddings), the MLM transform, the Pre-LN final norm, the
    pooler and NSP classifier. Parts a model lacks count as frozen (they cost nothing); other parameters
    (the MLM output bias, ...) carry no matmul of their own."""
    layers: dict[int, bool] = {}
    flags = dict.fromkeys(("embeddings", "decoder_weight", "mlm_transform", "final_norm", "pooler"), False)
    for name, p in model.named_parameters(remove_duplicate=False):  # the tied decoder weight by its own name
        param = params.describe(name)
        if param.layer is not None:
            layers[param.layer] = layers.get(param.layer, False) or p.requires_grad
        elif param.part in _PART_FLAG:
            flags[_PART_FLAG[param.part]] |= p.requires_grad
    return Trainable(layers=tuple(layers.get(i, False) for i in range(max(layers, default=-1) + 1)), **flags)


def flops_per_token(cfg: ModelConfig, seq_len: int, masked_fraction: float = 0.15,
                    trainable: Optional[Trainable] = None, keep_probs: Optional[Sequence[float]] = None) -> float:
    """Training (forward + backward) FLOPs per input token; see the module docstring.

    trainable: what trains in this stage (None: everything; see trainable_parts). keep_probs: this step's
    per-layer keep probabilities under progressive layer dropping (None: every layer runs).
    """
    t = trainable or Trainable()
    n = cfg.num_layers
    trains = t.layers if t.layers is not None else (True,) * n
    if len(trains) != n:
        raise ValueError(f"trainable.layers has {len(trains)} entries for {n} layers")
    if keep_probs is not None and len(keep_probs) != n:
        raise ValueError(f"keep_probs has {len(keep_probs)} entries for {n} layers")
    hidden = cfg.hidden_size
    total = 0.0
    no_grad_below = 0.0 if t.embeddings else 1.0  # P(nothing below the current layer trains)
    for i in range(n):
        attn_width = cfg.layer_heads(i) * cfg.head_dim
        ffn = cfg.layer_ffn(i)
        ffn_params = 2 * hidden * ffn if cfg.ffn_rank is None else 2 * cfg.ffn_rank * (hidden + ffn)
        if cfg.attention == "linear":
            # phi(K)^T V and phi(Q) (KV): D x D per head each; plus the normaliser phi(Q) . sum phi(K)
            attention = 4 * attn_width * cfg.head_dim + 4 * attn_width
        else:
            attention = 4 * seq_len * attn_width
        weights = 2 * (4 * hidden * attn_width) + 2 * ffn_params
        below = 1.0 - no_grad_below  # P(the gradient has somewhere to go below this layer)
        cost = weights + attention
        if trains[i]:
            cost += 2 * weights + 2 * attention
            if cfg.norm != "pre":
                cost -= no_grad_below * 2 * (3 * hidden * attn_width)  # Q, K, V input gradients not needed
        else:
            cost += below * (weights + 2 * attention)
        keep = 1.0 if keep_probs is None else min(max(float(keep_probs[i]), 0.0), 1.0)
        total += keep * cost
        if trains[i]:
            no_grad_below *= 1.0 - keep
    below_head = 1.0 if (t.final_norm and cfg.norm == "pre") else 1.0 - no_grad_below
    transform, decoder = 2 * hidden * hidden, 2 * hidden * cfg.vocab_size
    head = transform + decoder
    head += transform * (float(t.mlm_transform) + below_head)
    head += decoder * (float(t.decoder_weight) + (1.0 if t.mlm_transform else below_head))
    total += masked_fraction * head
    if cfg.nsp:
        pooler, classifier = 2 * hidden * hidden, 2 * hidden * 2
        nsp = pooler + classifier
        nsp += float(t.pooler) * (pooler + classifier)  # weight gradients
        nsp += classifier * (1.0 if t.pooler else below_head) + pooler * below_head  # input gradients
        total += nsp / seq_len
    return total


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters; tied weights (decoder = word embeddings) are counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
