"""Hugging Face's BertForPreTraining behind our model's interface: the reference the throughput tool
(training/bench/throughput.py) measures ours against, built from the same `model:` shape."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class HFPretrainingAdapter(nn.Module):
    """transformers.BertForPreTraining behind our model's interface: takes our batch dict, returns
    {"loss", "mlm_loss", "mlm_count", ["nsp_loss"]}. The MLM loss is computed exactly as HF computes
    it (cross entropy over all positions' logits with ignore_index=-100, in the logits' dtype)."""

    def __init__(self, hf_model: nn.Module, nsp: bool):
        super().__init__()
        self.hf = hf_model
        self.nsp = nsp

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, next_sentence_label=None):
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      return_dict=True)
        logits = out.prediction_logits
        vocab = logits.shape[-1]
        mlm_loss = F.cross_entropy(logits.view(-1, vocab), labels.view(-1), ignore_index=IGNORE_INDEX)
        result = {"mlm_loss": mlm_loss, "mlm_count": (labels != IGNORE_INDEX).sum(), "loss": mlm_loss}
        if self.nsp and next_sentence_label is not None:
            result["nsp_loss"] = F.cross_entropy(out.seq_relationship_logits.float(), next_sentence_label.view(-1))
            result["loss"] = result["loss"] + result["nsp_loss"]
        return result


def build_hf_model(mcfg) -> tuple[nn.Module, list[str]]:
    """HF BertForPreTraining (sdpa attention) with our config's shape; returns (adapter, caveats)."""
    from transformers import BertConfig, BertForPreTraining

    caveats = []
    if mcfg.norm != "post":
        caveats.append(f"model.norm={mcfg.norm}: HF BERT is Post-LN; HF runs Post-LN")
    if mcfg.attention != "sdpa":
        caveats.append(f"model.attention={mcfg.attention}: HF runs sdpa")
    if mcfg.ffn_rank is not None or mcfg.heads_per_layer or mcfg.ffn_per_layer:
        caveats.append("low-rank / pruned shapes: HF runs the uniform full-rank shape")
    hf_cfg = BertConfig(
        vocab_size=mcfg.vocab_size, hidden_size=mcfg.hidden_size, num_hidden_layers=mcfg.num_layers,
        num_attention_heads=mcfg.num_heads, intermediate_size=mcfg.ffn_size, hidden_act="gelu",
        hidden_dropout_prob=mcfg.dropout, attention_probs_dropout_prob=mcfg.attention_dropout,
        max_position_embeddings=mcfg.max_position, type_vocab_size=mcfg.type_vocab_size,
        initializer_range=mcfg.initializer_range, layer_norm_eps=mcfg.layer_norm_eps,
        pad_token_id=mcfg.pad_token_id)
    hf = BertForPreTraining._from_config(hf_cfg, attn_implementation="sdpa")
    if not mcfg.nsp:
        # Our MLM-only model has no pooler / NSP head; HF always runs them. Freeze them so the optimizer
        # does not see parameters that never get a gradient (their forward cost stays in HF's time).
        for module in (hf.bert.pooler, hf.cls.seq_relationship):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(False)
    return HFPretrainingAdapter(hf, mcfg.nsp), caveats
