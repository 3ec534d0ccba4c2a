"""Eager PyTorch references for the fused kernels (math in fp32, result in input dtype)."""
import math

import torch
import torch.nn.functional as F


def reference_attention(q, k, v, key_padding_mask=None, dropout_mask=None, softmax_scale=None):
    """q, k, v [B,H,S,D]; key_padding_mask [B,S] bool (True = real); dropout_mask: multiplier
    on the probabilities broadcastable to [B,H,S,S] (0 or 1/(1-p), see attention_dropout_mask).
    Fully padded query rows give 0, like the kernel."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :].to(s.device).bool()
        # finfo.min rather than -inf: a fully masked row then stays finite (and is zeroed below)
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        p = torch.softmax(s, dim=-1) * keep
    else:
        p = torch.softmax(s, dim=-1)
    if dropout_mask is not None:
        p = p * dropout_mask
    return torch.matmul(p, v.float()).to(q.dtype)


def reference_bias_gelu(x, bias):
    return F.gelu(x.float() + bias.float()).to(x.dtype)  # erf GeLU (torch default)


def reference_add_dropout_layernorm(x, r, weight, bias, eps=1e-12, dropout_mask=None):
    """y = LN(x + dropout(r)); dropout_mask is the multiplier on r (0 or 1/(1-p))."""
    h = x.float() + (r.float() * dropout_mask if dropout_mask is not None else r.float())
    return F.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)


def reference_mlm_loss(hidden, weight, bias, labels, ignore_index=-100):
    """Mean cross-entropy over labels != ignore_index, and the number of correct argmax predictions."""
    logits = hidden.float() @ weight.float().t() + bias.float()
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    valid = labels != ignore_index
    correct = ((logits.argmax(-1) == labels) & valid).sum()
    return loss, correct
