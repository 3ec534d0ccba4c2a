"""Issue 30 item 5: the export behaves like any Hugging Face model: its tokenizer truncates at the model's
positions, pipeline("fill-mask") takes a long input, and config.json names the head the export really has."""
import json

import pytest
import torch
import transformers

from training.model.bert import BertForPreTraining
from training.model.config import ModelConfig
from training.model.hf_export import export_hf

SHAPE = dict(vocab_size=512, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_position=64,
             dropout=0.0, attention_dropout=0.0)


def _export(tmp_path, tiny_data, **kwargs):
    cfg = ModelConfig(**SHAPE, **kwargs)
    torch.manual_seed(0)
    out = tmp_path / "hf"
    export_hf(BertForPreTraining(cfg).eval(), cfg, out, tokenizer_dir=tiny_data / "tokenizer")
    return out


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_fill_mask_pipeline_truncates_a_long_input(tmp_path, tiny_data, norm):
    out = _export(tmp_path, tiny_data, norm=norm)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the history of the city begins with [MASK] settlers . " + " ".join(["the river runs past the town"] * 60)
    assert len(tok(text)["input_ids"]) > 300
    assert len(tok(text, truncation=True)["input_ids"]) == 64  # model_max_length: 1000000 truncated nothing
    fill = transformers.pipeline("fill-mask", model=str(out), tokenizer=str(out), device="cpu")
    predictions = fill(text, tokenizer_kwargs={"truncation": True}, top_k=3)
    assert len(predictions) == 3 and all(0.0 <= p["score"] <= 1.0 for p in predictions)


def test_config_names_the_head_the_export_has(tmp_path, tiny_data):
    mlm = _export(tmp_path / "mlm", tiny_data)
    assert json.loads((mlm / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    nsp = _export(tmp_path / "nsp", tiny_data, nsp=True)
    assert json.loads((nsp / "config.json").read_text())["architectures"] == ["BertForPreTraining"]
    model, info = transformers.BertForPreTraining.from_pretrained(nsp, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # its NSP head is the trained one
