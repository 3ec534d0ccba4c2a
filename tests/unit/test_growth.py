"""Growth operators: exact index formulas, function preservation, optimizer moments, validation."""
from __future__ import annotations

import pytest
import torch

from training.model import BertForPreTraining, ModelConfig
from training.stages.growth import (check_seq_len, compose, grow, grow_ffn, grow_hidden, grow_seq, stack,
                                    validate_growth)

BASE = dict(vocab_size=100, hidden_size=32, num_heads=2, num_layers=2, ffn_size=64, max_position=40,
            dropout=0.0, attention_dropout=0.0)
LAYER = "bert.encoder.layer.{}."


def cfg(**over) -> ModelConfig:
    return ModelConfig(**{**BASE, **over})


def grown(old: ModelConfig, **update) -> ModelConfig:
    return ModelConfig(**{**old.model_dump(), **update})


def random_model(c: ModelConfig, seed: int = 0) -> BertForPreTraining:
    """Every tensor random, LayerNorm affines and biases included, so no rule passes by accident."""
    torch.manual_seed(seed)
    model = BertForPreTraining(c)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def batch(vocab: int, seed: int = 1, size: int = 3, seq: int = 16) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (size, seq), generator=gen)
    mask = torch.ones(size, seq, dtype=torch.long)
    mask[1, seq - 5:] = 0
    ids[mask == 0] = 0
    labels = torch.full((size, seq), -100)
    chosen = (torch.rand(size, seq, generator=gen) < 0.3) & (mask == 1)
    labels[chosen] = torch.randint(0, vocab, (int(chosen.sum()),), generator=gen)
    types = (torch.arange(seq) >= seq // 2).long().expand(size, seq)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)


def load(c: ModelConfig, sd: dict) -> BertForPreTraining:
    """Build the grown model and load strictly: exactly its keys and shapes, nothing missing."""
    model = BertForPreTraining(c).eval()
    expected = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in sd.items()} == expected
    model.load_state_dict(sd, strict=True)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def assert_same_function(before: BertForPreTraining, after: BertForPreTraining, nsp: bool = False):
    b = batch(before.cfg.vocab_size)
    with torch.no_grad():
        loss0, loss1 = before(**b)["loss"], after(**b)["loss"]
        no_labels = {k: v for k, v in b.items() if k != "labels"}
        out0, out1 = before(**no_labels), after(**no_labels)
    assert abs(float(loss1 - loss0)) / float(loss0) < 1e-5
    assert rel(out1["logits"], out0["logits"]) < 1e-5
    if nsp:
        assert rel(out1["nsp_logits"], out0["nsp_logits"]) < 1e-5


# ---------------------------------------------------------------------------------------- stack

def test_stack_copies_the_whole_stack_on_top_in_order():
    old = cfg(num_layers=3)
    new = grown(old, num_layers=6)
    sd = random_model(old).state_dict()
    out = stack(sd, old, new)
    load(new, out)
    names = [k[len(LAYER.format(0)):] for k in sd if k.startswith(LAYER.format(0))]
    for i in range(6):
        for n in names:
            assert torch.equal(out[LAYER.format(i) + n], sd[LAYER.format(i % 3) + n])
            assert not torch.equal(out[LAYER.format(i) + n], sd[LAYER.format((i + 1) % 3) + n])
    assert torch.equal(out[LAYER.format(5) + names[0]], sd[LAYER.format(2) + names[0]])
    for k, v in sd.items():
        if not k.startswith("bert.encoder.layer."):
            assert out[k] is v  # embeddings and heads pass through untouched
    # Copies are fresh tensors: training one layer must not move its source.
    assert out[LAYER.format(3) + names[0]].data_ptr() != sd[LAYER.format(0) + names[0]].data_ptr()


def test_stack_follows_pruned_per_layer_shapes():
    old = cfg(heads_per_layer=[1, 2], ffn_per_layer=[48, 64])
    new = grown(old, num_layers=4, heads_per_layer=[1, 2, 1, 2], ffn_per_layer=[48, 64, 48, 64])
    load(new, stack(random_model(old).state_dict(), old, new))  # a wrong source layer has a wrong shape


def test_stack_moments_are_copied_unscaled():
    old, new = cfg(), cfg(num_layers=4)
    moments = {k: torch.rand_like(p) for k, p in random_model(old).named_parameters()}
    out = stack(moments, old, new, moment=2)
    assert set(out) == {k for k, _ in BertForPreTraining(new).named_parameters()}
    for k, v in out.items():
        src = k.replace(LAYER.format(3), LAYER.format(1)).replace(LAYER.format(2), LAYER.format(0))
        assert torch.equal(v, moments[src])


# ---------------------------------------------------------------------------------------- FFN

def test_grow_ffn_tiles_output_rows_of_w1_and_input_columns_of_w2():
    old = cfg()
    new = grown(old, ffn_size=192)  # k = 3: also checks the division is by k, not by 2
    sd = random_model(old).state_dict()
    out = grow_ffn(sd, old, new)
    load(new, out)
    F, k = 64, 3
    for i in range(2):
        p = LAYER.format(i)
        w1, b1 = sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]
        w2 = sd[p + "output.dense.weight"]
        rows = torch.arange(F * k) % F
        assert torch.equal(out[p + "intermediate.dense.weight"], w1[rows, :])  # [kF, H]
        assert torch.equal(out[p + "intermediate.dense.bias"], b1[rows])
        torch.testing.assert_close(out[p + "output.dense.weight"], w2[:, rows] / k, rtol=0, atol=0)
        assert out[p + "output.dense.bias"] is sd[p + "output.dense.bias"]
        assert out[p + "attention.self.query.weight"] is sd[p + "attention.self.query.weight"]


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_grow_ffn_preserves_the_loss(norm):
    old = cfg(norm=norm)
    new = grown(old, ffn_size=128)
    model = random_model(old)
    assert_same_function(model, load(new, grow_ffn(model.state_dict(), old, new)))


def test_grow_ffn_moments_scale_like_the_gradients_not_the_weights():
    """exp_avg x g, exp_avg_sq x g**2 with g the gradient's factor (measured with autograd in
    tests/unit/test_moments.py): a copied output.dense column (weight / k) keeps its gradient, a copied
    intermediate.dense row (weight unchanged) gets 1/k of it."""
    old, new, k = cfg(), cfg(ffn_size=192), 3
    moments = {k_: torch.rand_like(p) + 0.5 for k_, p in random_model(old).named_parameters()}
    w2, w1, b1 = (LAYER.format(1) + n for n in ("output.dense.weight", "intermediate.dense.weight",
                                                "intermediate.dense.bias"))
    for moment in (1, 2):
        out = grow_ffn(moments, old, new, moment=moment)
        assert set(out) == {n for n, _ in BertForPreTraining(new).named_parameters()}
        assert torch.equal(out[w2], moments[w2].repeat(1, k))  # tiled, never scaled
        torch.testing.assert_close(out[w1], moments[w1].repeat(k, 1) / k ** moment, rtol=0, atol=0)
        torch.testing.assert_close(out[b1], moments[b1].repeat(k) / k ** moment, rtol=0, atol=0)
        b2 = LAYER.format(1) + "output.dense.bias"
        assert out[b2] is moments[b2]


# ---------------------------------------------------------------------------------------- hidden

def test_grow_hidden_index_formulas():
    old = cfg()
    new = grown(old, hidden_size=96, num_heads=6)
    sd = random_model(old).state_dict()
    out = grow_hidden(sd, old, new)
    load(new, out)
    d, k = 32, 3
    u = torch.arange(d * k) % d  # new unit j is a copy of old unit j % d
    p = LAYER.format(1)
    exact = dict(rtol=0, atol=0)
    q = p + "attention.self.query.weight"
    torch.testing.assert_close(out[q], sd[q][u][:, u] / k, **exact)
    assert torch.equal(out[p + "attention.self.value.bias"], sd[p + "attention.self.value.bias"][u])
    torch.testing.assert_close(out[p + "attention.output.dense.weight"],
                               sd[p + "attention.output.dense.weight"][u][:, u] / k, rtol=0, atol=0)
    # FFN inner size unchanged: only the hidden axis of each FFN matrix grows.
    w1 = p + "intermediate.dense.weight"
    torch.testing.assert_close(out[w1], sd[w1][:, u] / k, **exact)
    assert torch.equal(out[p + "output.dense.weight"], sd[p + "output.dense.weight"][u, :])
    assert torch.equal(out[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.weight"][u])
    for table in ("word", "position", "token_type"):
        key = f"bert.embeddings.{table}_embeddings.weight"
        assert torch.equal(out[key], sd[key][:, u])
    # Tied decoder: same tensor as the embedding; the 1/k moves to the MLM transform LayerNorm.
    assert torch.equal(out["cls.predictions.decoder.weight"], out["bert.embeddings.word_embeddings.weight"])
    for part in ("weight", "bias"):
        key = f"cls.predictions.transform.LayerNorm.{part}"
        torch.testing.assert_close(out[key], sd[key][u] / k, rtol=0, atol=0)
    assert torch.equal(out["cls.predictions.bias"], sd["cls.predictions.bias"])


def test_grow_hidden_new_heads_are_copies_of_old_heads():
    old = cfg()
    new = grown(old, hidden_size=64, num_heads=4)
    sd = random_model(old).state_dict()
    out = grow_hidden(sd, old, new)
    q_old = sd[LAYER.format(0) + "attention.self.query.weight"].view(2, 16, 32)   # [H, head_dim, d]
    q_new = out[LAYER.format(0) + "attention.self.query.weight"].view(4, 16, 64)
    for h in range(4):  # head h reads the duplicated hidden units: sum over both copies = old head
        torch.testing.assert_close(q_new[h, :, :32] + q_new[h, :, 32:], q_old[h % 2], rtol=0, atol=1e-7)


@pytest.mark.parametrize("norm,attention,k", [("post", "sdpa", 2), ("pre", "sdpa", 2), ("post", "eager", 3)])
def test_grow_hidden_preserves_loss_and_logits(norm, attention, k):
    old = cfg(norm=norm, attention=attention, nsp=True)
    new = grown(old, hidden_size=32 * k, num_heads=2 * k)
    model = random_model(old)
    assert_same_function(model, load(new, grow_hidden(model.state_dict(), old, new)), nsp=True)


def test_grow_hidden_with_pruned_heads_preserves_the_loss():
    old = cfg(heads_per_layer=[1, 2], ffn_per_layer=[40, 64])
    new = grown(old, hidden_size=64, num_heads=4, heads_per_layer=[2, 4])
    model = random_model(old)
    assert_same_function(model, load(new, grow_hidden(model.state_dict(), old, new)))


def test_grow_hidden_moments_scale_like_the_gradients_not_the_weights():
    """Every tiled output axis: gradient x 1/k (Q weight divided by k too, embeddings not); the MLM
    transform LayerNorm (weight / k for the tied decoder) keeps its gradient (autograd: tests/unit/test_moments.py)."""
    old, new, k = cfg(), cfg(hidden_size=64, num_heads=4), 2
    moments = {n: torch.rand_like(p) + 0.5 for n, p in random_model(old).named_parameters()}
    for moment in (1, 2):
        out = grow_hidden(moments, old, new, moment=moment)
        assert set(out) == {n for n, _ in BertForPreTraining(new).named_parameters()}
        q = LAYER.format(0) + "attention.self.query.weight"
        torch.testing.assert_close(out[q], moments[q].repeat(k, k) / k ** moment, rtol=0, atol=0)
        emb = "bert.embeddings.word_embeddings.weight"
        torch.testing.assert_close(out[emb], moments[emb].repeat(1, k) / k ** moment, rtol=0, atol=0)
        for part in ("weight", "bias"):
            ln = f"cls.predictions.transform.LayerNorm.{part}"
            assert torch.equal(out[ln], moments[ln].repeat(k))
        nsp = "cls.predictions.bias"
        assert out[nsp] is moments[nsp]


# ---------------------------------------------------------------------------------------- seq

def test_grow_seq_extends_positions_cyclically_and_keeps_the_function():
    old = cfg(max_position=16)
    new = grown(old, max_position=40)
    model = random_model(old)
    sd = model.state_dict()
    out = grow_seq(sd, old, new)
    table = sd["bert.embeddings.position_embeddings.weight"]
    assert torch.equal(out["bert.embeddings.position_embeddings.weight"], table[torch.arange(40) % 16])
    after = load(new, out)
    b = batch(100, seq=16)
    with torch.no_grad():
        assert torch.equal(model(**b)["loss"], after(**b)["loss"])
    same = grow_seq(sd, old, old)  # seq_len growth within the shared table: nothing changes
    assert all(same[k] is v for k, v in sd.items())


def test_seq_len_must_fit_max_position():
    check_seq_len(40, cfg())
    with pytest.raises(ValueError, match="max_position"):
        check_seq_len(64, cfg())
    with pytest.raises(ValueError, match="max_position"):
        validate_growth("seq", cfg(), cfg(max_position=64), seq_len=128)


# ---------------------------------------------------------------------------------------- compound

def test_compound_growth_equals_the_ops_in_any_order():
    old = cfg()
    new = grown(old, hidden_size=64, num_heads=4, ffn_size=128, num_layers=4, max_position=64)
    sd = random_model(old).state_dict()
    out = grow(sd, old, new)
    load(new, out)
    # Stack first, then widen: the operators commute, so the result is identical.
    s1 = grown(old, num_layers=4)
    s2 = grown(s1, ffn_size=128)
    s3 = grown(s2, hidden_size=64, num_heads=4)
    manual = grow_seq(grow_hidden(grow_ffn(stack(sd, old, s1), s1, s2), s2, s3), s3, new)
    assert set(manual) == set(out)
    for k in out:
        assert torch.equal(out[k], manual[k]), k


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_compound_width_growth_preserves_the_loss(norm):
    old = cfg(norm=norm)
    new = grown(old, hidden_size=64, num_heads=4, ffn_size=256)
    model = random_model(old)
    op = compose(["ffn", "hidden"])  # listed order does not matter: always hidden, then ffn
    assert_same_function(model, load(new, op(model.state_dict(), old, new)))


def test_compose_rejects_a_change_its_kinds_cannot_make():
    with pytest.raises(ValueError, match="num_layers"):
        compose(["ffn"])({}, cfg(), cfg(ffn_size=128, num_layers=4))


# ---------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kind,update,message", [
    ("stack", dict(num_layers=1), "cannot shrink"),
    ("stack", dict(num_layers=3), "multiple of the current depth"),
    ("ffn", dict(ffn_size=32), "cannot shrink"),
    ("ffn", dict(ffn_size=96), "integer factor"),
    ("hidden", dict(hidden_size=48, num_heads=3), "integer factor"),
    ("hidden", dict(hidden_size=16, num_heads=1), "cannot shrink"),
    ("hidden", dict(hidden_size=64, num_heads=3), "not divisible"),
    ("hidden", dict(hidden_size=64, num_heads=2), "num_heads must be 4"),  # head_dim may not grow
    ("hidden", dict(hidden_size=64, num_heads=4, ffn_size=128), "cannot change model.ffn_size"),
    ("ffn", dict(ffn_size=128, hidden_size=64, num_heads=4), "cannot change model.hidden_size"),
    ("stack", dict(num_layers=4, vocab_size=200), "cannot change model.vocab_size"),
    ("stack", dict(num_layers=4, norm="pre"), "cannot change model.norm"),
    ("stack", dict(num_layers=4, heads_per_layer=[2, 2, 1, 1]), "heads_per_layer must become"),
    ("seq", dict(max_position=20), "cannot shrink"),
    ("ffn", dict(), "nothing to grow"),
    ("depth", dict(num_layers=4), "unknown growth kind"),
])
def test_validate_growth_rejects_nonsense(kind, update, message):
    old = cfg(heads_per_layer=[2, 1]) if "heads_per_layer" in update else cfg()
    new = old.model_copy(update=update)  # unvalidated on purpose: the check must not rely on pydantic
    with pytest.raises(ValueError, match=message) as err:
        validate_growth(kind, old, new)
    assert "\n" not in str(err.value)


def test_operators_validate_their_configs():
    with pytest.raises(ValueError, match="integer factor"):
        grow_ffn({}, cfg(), cfg(ffn_size=96))
    with pytest.raises(ValueError, match="multiple"):
        stack({}, cfg(), cfg(num_layers=3))


def test_validate_growth_accepts_compound():
    validate_growth("compound", cfg(), cfg(hidden_size=64, num_heads=4, num_layers=6, ffn_size=256,
                                           max_position=80), seq_len=80)


def test_unknown_tensor_is_an_error_not_a_silent_pass_through():
    with pytest.raises(ValueError, match="no growth rule"):
        grow_ffn({"bert.encoder.layer.0.attention.self.head_coef": torch.ones(2)}, cfg(), cfg(ffn_size=128))
