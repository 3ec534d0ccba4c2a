"""FLOPs are what was computed (training/model/flops.py): frozen layers forward-only, dropped layers by their
keep probability, the tied decoder's weight gradient only while it trains; and the runner logs those."""
import json

import pytest
import torch

from training.model.bert import BertForPreTraining
from training.model.config import ModelConfig
from training.model.flops import Trainable, flops_per_token, trainable_parts
from training.stages import mslt
from training.stages.layerdrop import layer_keep_probs

# hidden 8, 2 heads of 4, ffn 16, vocab 100, 3 layers; seq 10, half the positions masked. Per token:
#   W (weight matmuls of a layer) = 2*(4*8*8) + 2*(2*8*16) = 512 + 512 = 1024
#   A (QK^T, PV)                  = 4*10*8                  = 320
#   a layer's forward F = W + A = 1344; trained 3F = 4032; frozen, gradient passing through F + W + 2A = 3008
#   MLM transform T = 2*8*8 = 128, decoder D = 2*8*100 = 1600, charged at masked positions only (x 0.5)
SMALL = dict(vocab_size=100, hidden_size=8, num_heads=2, num_layers=3, ffn_size=16, max_position=16)
SEQ, MASKED = 10, 0.5
FULL = 3 * 4032 + 0.5 * 3 * (128 + 1600)  # = 14688
MSLT_FROZEN = dict(embeddings=False, decoder_weight=False, mlm_transform=True, final_norm=True, pooler=True)


def _cfg(**over) -> ModelConfig:
    return ModelConfig(**{**SMALL, **over})


def _fpt(cfg, **kw):
    return flops_per_token(cfg, SEQ, MASKED, **kw)


def test_everything_trained_is_three_forwards():
    assert _fpt(_cfg(norm="pre")) == pytest.approx(FULL) == pytest.approx(14688)
    assert _fpt(_cfg(norm="pre"), trainable=Trainable(layers=(True,) * 3)) == pytest.approx(FULL)
    assert _fpt(_cfg(norm="post")) == pytest.approx(FULL)
    assert _fpt(_cfg(norm="pre"), keep_probs=[1.0, 1.0, 1.0]) == pytest.approx(FULL)


def test_mslt_frozen_bottom_is_forward_only_and_the_decoder_weight_gets_no_gradient():
    frozen = Trainable(layers=(False, False, True), **MSLT_FROZEN)
    # Layers: 1344 + 1344 (no_grad: 1/3 of 4032) + 4032. Head: transform 3T; decoder forward + input grad, no
    # weight grad: 2D. 0.5 * (3*128 + 2*1600) = 1792.
    assert _fpt(_cfg(norm="pre"), trainable=frozen) == pytest.approx(1344 + 1344 + 4032 + 1792) == 8512
    # Post-LN: the bottom trainable layer's input carries no gradient and no LayerNorm sits before Q/K/V, so
    # their input gradient (6 * 8 * 8 = 384) is not computed either.
    assert _fpt(_cfg(norm="post"), trainable=frozen) == pytest.approx(8512 - 384)
    assert 1344 == pytest.approx(4032 / 3)


def test_frozen_layers_with_trainable_embeddings_still_pass_gradients():
    frozen = Trainable(layers=(False, False, True))  # MSLT with freeze_embeddings: false
    # Frozen layers: F + W + 2A = 1344 + 1024 + 640 = 3008 each; the head trains fully.
    assert _fpt(_cfg(norm="pre"), trainable=frozen) == pytest.approx(2 * 3008 + 4032 + 2592) == 12640


def test_dropped_layers_count_by_their_keep_probability():
    assert _fpt(_cfg(norm="pre"), keep_probs=[1.0, 0.75, 0.5]) == pytest.approx(4032 * 2.25 + 2592) == 11664
    # Out-of-range probabilities behave like the model: >= 1 always runs, <= 0 never.
    assert _fpt(_cfg(norm="pre"), keep_probs=[1.5, 0.0, -1.0]) == pytest.approx(4032 + 2592)
    probs = layer_keep_probs(300, 3, theta_bar=0.5, gamma=0.01)
    assert _fpt(_cfg(norm="pre"), keep_probs=probs) == pytest.approx(4032 * sum(probs) + 2592)


def test_frozen_layer_above_a_dropped_trained_layer_passes_gradients_only_when_it_ran():
    t = Trainable(layers=(True, False, True), **MSLT_FROZEN)
    # Layer 0 (trained) runs half the time: 0.5 * 4032 = 2016. Layer 1 (frozen) always runs: forward 1344, plus
    # W + 2A = 1664 when layer 0 ran (p 0.5): 2176. Layer 2: 4032. Head as in MSLT: 1792.
    assert _fpt(_cfg(norm="pre"), trainable=t, keep_probs=[0.5, 1.0, 1.0]) == pytest.approx(
        2016 + 2176 + 4032 + 1792) == 10016
    # MSLT's frozen bottom with the trained top layers dropped at random.
    t = Trainable(layers=(False, True, True), **MSLT_FROZEN)
    assert _fpt(_cfg(norm="pre"), trainable=t, keep_probs=[1.0, 0.5, 0.5]) == pytest.approx(
        1344 + 2016 + 2016 + 1792)


def test_nsp_head():
    # Pooler P = 2*8*8 = 128, classifier C = 2*8*2 = 32, once per sequence of 10: 3 * 160 / 10 = 48.
    assert _fpt(_cfg(norm="pre", nsp=True)) == pytest.approx(FULL + 48)
    frozen = Trainable(layers=(False, False, True), **{**MSLT_FROZEN, "pooler": False})
    # Frozen pooler: forward 160 plus input gradients (the encoder below trains) 160 = 320 / 10.
    assert _fpt(_cfg(norm="pre", nsp=True), trainable=frozen) == pytest.approx(8512 + 32)


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="keep_probs has 2 entries"):
        _fpt(_cfg(), keep_probs=[1.0, 1.0])
    with pytest.raises(ValueError, match="trainable.layers has 4 entries"):
        _fpt(_cfg(), trainable=Trainable(layers=(True,) * 4))


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_trainable_parts_reads_requires_grad(norm):
    torch.manual_seed(0)
    model = BertForPreTraining(_cfg(norm=norm, nsp=True))
    assert trainable_parts(model) == Trainable(layers=(True,) * 3, final_norm=norm == "pre")
    mslt.freeze(model, train_top=1)
    assert trainable_parts(model) == Trainable(layers=(False, False, True), **{**MSLT_FROZEN,
                                                                               "final_norm": norm == "pre"})
    mslt.freeze(model, train_top=2, freeze_embeddings=False)
    assert trainable_parts(model) == Trainable(layers=(False, True, True), final_norm=norm == "pre")


# torch's FlopCounterMode counts the matmuls autograd really ran (forward and backward). It does not count the
# CPU SDPA kernels, so these use eager attention.
@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("case", ["full", "mslt", "mslt_train_embeddings", "nsp_mslt", "drop", "mslt_drop",
                                  "lowrank_mslt"])
def test_matches_what_autograd_computes(norm, case):
    from torch.utils.flop_counter import FlopCounterMode

    if "drop" in case and norm == "post":
        pytest.skip("layer dropping needs Pre-LN")
    over = dict(norm=norm, attention="eager", dropout=0.0, attention_dropout=0.0, nsp=case.startswith("nsp"))
    if case.startswith("lowrank"):
        over.update(ffn_rank=4)
    cfg = _cfg(**over)
    torch.manual_seed(0)
    model = BertForPreTraining(cfg).train()
    if "mslt" in case:
        mslt.freeze(model, train_top=1, freeze_embeddings=case != "mslt_train_embeddings")
    keep = [1.0, 0.0, 1.0] if "drop" in case else None  # 0 and 1 are deterministic: no draws
    batch, seq = 4, SEQ
    ids = torch.randint(5, SMALL["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, -100)
    labels[:, ::2] = ids[:, ::2]  # half the positions: MASKED
    kw = {"next_sentence_label": torch.zeros(batch, dtype=torch.long)} if cfg.nsp else {}
    with FlopCounterMode(display=False) as counter:
        out = model(ids, attention_mask=torch.ones_like(ids), labels=labels, layer_keep_prob=keep, **kw)
        out["loss"].backward()
    counted = counter.get_total_flops() / (batch * seq)
    assert _fpt(cfg, trainable=trainable_parts(model), keep_probs=keep) == pytest.approx(counted, rel=1e-9)


# --------------------------------------------------------------------------------------- the runner


def test_compare_report_says_how_flops_are_counted(tmp_path):
    from training.bench.report import FLOPS_COUNTING, compare_runs, summarise_run, write_markdown

    run = tmp_path / "run"
    run.mkdir()
    records = [{"kind": "train", "step": 1, "tokens": 100, "flops_per_token": 10.0, "wall_s": 1.0, "stage": "main"},
               {"kind": "eval", "step": 1, "tokens": 100, "heldout_loss": 5.0, "heldout_acc": 0.1, "wall_s": 1.0,
                "stage": "main"}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report = compare_runs([summarise_run("base", "x.yaml", run)])
    write_markdown(report, tmp_path / "report.md")
    md = (tmp_path / "report.md").read_text()
    assert FLOPS_COUNTING in md
    assert "1/3 of a trained layer" in md and "keep probability" in md and "decoder's weight gradient" in md
