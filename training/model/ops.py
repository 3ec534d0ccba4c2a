"""The functional pieces the BERT modules call (training/model/encoder.py, bert.py): the attention backends with the
locality bias, and the eager or fused (Triton, training/model/fused.py) bias+GeLU, residual+LayerNorm and
masked-LM loss."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from training.model import fused

LINEAR_ATTENTION_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Dropout. On CPU, PyTorch's dropout draws one Mersenne-Twister number per element through bernoulli_;
# profiled on this project's 2-core CPU it was 27% of a training step of configs/baseline.yaml (BENCHMARKS
# §1). Here one 64-bit draw gives four 16-bit thresholds: the keep decision is `bits >= t` with
# t = round(p * 2**16) - 2**15, so p is rounded to a multiple of 2**-16 (0.1 -> 0.100006) and the kept values
# are scaled by 1 / (the rounded keep rate), keeping the expectation exact. Same generator (torch's default
# CPU one), so torch.manual_seed and checkpoint/resume reproduce it. On CUDA, PyTorch's own (Philox) dropout;
# inside torch.compile (model.compile), F.dropout, which inductor lowers to its own generator.
# --------------------------------------------------------------------------------------------------

_DROP_BITS = 16


def dropout_keep_mask(shape: torch.Size, p: float, generator: Optional[torch.Generator] = None
                      ) -> tuple[torch.Tensor, float]:
    """(keep mask of `shape` on the CPU as uint8 0/1, scale = 1 / keep rate) for drop probability p in (0, 1).
    uint8, not bool: a product with a uint8 tensor is vectorised on CPU, a bool one is not (measured 5x)."""
    n = 1
    for size in shape:
        n *= size
    threshold = round(p * 2 ** _DROP_BITS)
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=generator)
    keep = words.view(torch.int16)[:n] >= threshold - 2 ** (_DROP_BITS - 1)
    return keep.view(torch.uint8).view(shape), 2 ** _DROP_BITS / (2 ** _DROP_BITS - threshold)


class _CpuDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        keep, scale = dropout_keep_mask(x.shape, p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout, with the faster keep-mask draw above for CPU tensors."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or round(p * 2 ** _DROP_BITS) == 0:
        return F.dropout(x, p, training=True)  # (compiled: inductor draws its own mask, fused into the graph)
    return _CpuDropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout (same attributes, no state) that calls `dropout` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# --------------------------------------------------------------------------------------------------
# Attention backends. All take q, k, v as [B, H, S, D] and key_padding [B, S] bool (True = real
# token) or None, and return [B, H, S, D]. eager and sdpa also take an additive float mask [B|1, H, S, S]
# in its place (the locality bias, which folds the padding in as -inf).
# --------------------------------------------------------------------------------------------------

def locality_bias(key_padding: Optional[torch.Tensor], seq: int, num_heads: int, strength: float,
                  dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive attention bias -strength * 2**-h * |i - j| for head h (ALiBi's symmetric form, Press et al.
    2022, with steeper slopes: head 0 loses a factor e per token of distance at strength 1, later heads see
    further), padded keys at -inf. [B or 1, H, S, S].

    A training aid, not part of the model: early in masked-LM training attention is near uniform and the
    model sits at the unigram plateau, because learning to look at the neighbours needs value/output maps
    that already use them and vice versa. The bias makes attention local from the first step, so the
    neighbour statistics are learned at once; annealed to 0 over a stage (stage `locality_bias`), it leaves
    a plain BERT whose position embeddings and Q/K projections have taken over the locality."""
    pos = torch.arange(seq, device=device, dtype=torch.float32)
    slopes = strength * torch.pow(2.0, -torch.arange(num_heads, device=device, dtype=torch.float32))
    bias = -(slopes[:, None, None] * (pos[None, :] - pos[:, None]).abs()[None])[None]  # [1, H, S, S]
    if key_padding is not None:
        bias = bias.masked_fill(~key_padding[:, None, None, :], float("-inf"))
    return bias.to(dtype)


def eager_attention(q, k, v, key_padding, dropout_p: float, scale: float) -> torch.Tensor:
    """Reference: softmax(QK^T * scale + mask) V, dropout on the probabilities (as HF eager)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_padding is not None and key_padding.is_floating_point():
        scores = scores + key_padding.to(scores.dtype)  # an additive mask (locality_bias)
    elif key_padding is not None:
        # Additive mask with the dtype's most negative value, exactly as HF builds it.
        bias = torch.zeros(key_padding.shape, dtype=scores.dtype, device=scores.device)
        bias.masked_fill_(~key_padding, torch.finfo(scores.dtype).min)
        scores = scores + bias[:, None, None, :]
    probs = F.softmax(scores, dim=-1)
    probs = dropout(probs, dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, v)


# Up to this length the [S, S] probabilities of the math path are cheap to keep for backward.
CPU_MATH_ATTENTION_MAX_SEQ = 512


def sdpa_attention(q, k, v, key_padding, dropout_p: float, scale: float) -> torch.Tensor:
    if q.device.type == "cpu" and (dropout_p > 0 or q.dtype in (torch.bfloat16, torch.float16)) \
            and q.shape[-2] <= CPU_MATH_ATTENTION_MAX_SEQ:
        # Measured on this project's CPU (BENCHMARKS §1): SDPA's CPU flash kernel has no dropout, so with
        # dropout SDPA runs its math path (eager_attention's matmuls and softmax, plus mask checks) with
        # PyTorch's slow dropout draw; and in bf16 the flash kernel's forward + backward takes 2x the math
        # path's time (whose matmuls use the CPU's bf16 matrix units). So: the math path, with our dropout.
        return eager_attention(q, k, v, key_padding, dropout_p, scale)
    # Boolean mask: True = may attend. Broadcast over heads and query positions. A float mask is additive.
    if key_padding is not None and key_padding.is_floating_point():
        mask = key_padding.to(q.dtype)
    else:
        mask = key_padding[:, None, None, :] if key_padding is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def linear_attention(q, k, v, key_padding, eps: float = LINEAR_ATTENTION_EPS) -> torch.Tensor:
    """Non-causal linear attention (Katharopoulos et al. 2020), phi(x) = elu(x) + 1.

    out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps). Padded keys are
    excluded by zeroing phi(k) there. No softmax scale and no attention dropout (there are no
    probabilities to drop). Computed in fp32: the sums over the sequence overflow bf16 precision.
    """
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    phi_q = F.elu(q) + 1.0
    phi_k = F.elu(k) + 1.0
    if key_padding is not None:
        phi_k = phi_k * key_padding[:, None, :, None].to(phi_k.dtype)
    kv = torch.einsum("bhsd,bhse->bhde", phi_k, v)  # [B, H, D, D]
    k_sum = phi_k.sum(dim=2)  # [B, H, D]
    numerator = torch.einsum("bhsd,bhde->bhse", phi_q, kv)
    denominator = torch.einsum("bhsd,bhd->bhs", phi_q, k_sum) + eps
    return (numerator / denominator.unsqueeze(-1)).to(dtype)


def fused_attention(q, k, v, key_padding, dropout_p: float, scale: float) -> torch.Tensor:
    """Triton kernel from `kernels.attention` (same positional signature); sdpa when it cannot run."""
    return fused.ATTENTION(q, k, v, key_padding, dropout_p, scale, fallback=sdpa_attention)


def _bias_gelu_eager(x, bias):
    return F.gelu(x + bias)


def linear_gelu(x: torch.Tensor, linear: nn.Linear, use_kernel: bool) -> torch.Tensor:
    """gelu(linear(x)) with erf GeLU (HF "gelu"); the kernel fuses the bias add into the GeLU."""
    if not use_kernel or linear.bias is None:
        return F.gelu(linear(x))
    return fused.BIAS_GELU(F.linear(x, linear.weight), linear.bias, fallback=_bias_gelu_eager)


def _residual_layernorm_eager(x, r, weight, bias, dropout_p, eps):
    return F.layer_norm(x + dropout(r, dropout_p, training=dropout_p > 0), (x.shape[-1],), weight, bias, eps)


def residual_layernorm(x: torch.Tensor, branch: torch.Tensor, norm: nn.LayerNorm, dropout: nn.Dropout,
                       use_kernel: bool) -> torch.Tensor:
    """The post-LN residual norm(x + dropout(branch)); the kernel does add, dropout and LayerNorm in one
    pass and regenerates its dropout mask in backward instead of storing it."""
    if not use_kernel:
        return norm(x + dropout(branch))
    p = dropout.p if dropout.training else 0.0
    return fused.RESIDUAL_LAYERNORM(x, branch, norm.weight, norm.bias, p, norm.eps,
                                    fallback=_residual_layernorm_eager)


def mlm_loss_eager(hidden, weight, bias, targets):
    """(mean cross-entropy, correct argmax count) of the vocab projection; fp32 loss even under bf16."""
    logits = F.linear(hidden, weight, bias).float()
    # Sum / count instead of reduction="mean": a batch with no masked token gives 0, not NaN.
    loss = F.cross_entropy(logits, targets, reduction="sum") / max(targets.numel(), 1)
    return loss, (logits.argmax(dim=-1) == targets).sum()
