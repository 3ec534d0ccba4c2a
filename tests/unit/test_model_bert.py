"""Our BERT on its own: masked-only MLM head, attention backends, variants, layer dropping, FLOPs."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers

from training.errors import UserError
from training.model import BertForPreTraining, ModelConfig, count_parameters, flops_per_token
from training.model import ops as model_ops
from training.model import fused as fused_module

BASE = dict(vocab_size=89, hidden_size=32, num_layers=3, num_heads=4, ffn_size=64, max_position=32,
            dropout=0.0, attention_dropout=0.0)


def make(seed: int = 0, **overrides) -> BertForPreTraining:
    torch.manual_seed(seed)
    return BertForPreTraining(ModelConfig(**{**BASE, **overrides}))


def batch(seed: int, batch_size: int = 3, seq: int = 10, vocab: int = BASE["vocab_size"]):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch_size, seq), generator=gen)
    mask = torch.ones(batch_size, seq, dtype=torch.long)
    mask[1, -3:] = 0
    mask[2, -6:] = 0
    ids[mask == 0] = 0
    labels = torch.full((batch_size, seq), -100)
    chosen = (torch.rand(batch_size, seq, generator=gen) < 0.25) & (mask == 1)
    chosen[0, 0] = True
    labels[chosen] = torch.randint(0, vocab, (int(chosen.sum()),), generator=gen)
    return ids, mask, labels


def test_masked_only_head_equals_full_logits_cross_entropy():
    model = make(seed=1).eval()
    ids, mask, labels = batch(seed=2)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)["logits"]
        out = model(ids, attention_mask=mask, labels=labels)
    assert "logits" not in out
    at = labels != -100
    torch.testing.assert_close(out["mlm_loss"], F.cross_entropy(full[at], labels[at]), atol=1e-6, rtol=1e-6)
    assert out["mlm_count"].item() == at.sum().item()
    assert out["mlm_correct"].item() == (full[at].argmax(-1) == labels[at]).sum().item()
    assert out["loss"] is out["mlm_loss"] or torch.equal(out["loss"], out["mlm_loss"])


def test_no_masked_tokens_gives_zero_loss_not_nan():
    model = make(seed=3)
    ids, mask, _ = batch(seed=4)
    out = model(ids, attention_mask=mask, labels=torch.full_like(ids, -100))
    assert out["mlm_loss"].item() == 0.0 and out["mlm_count"].item() == 0
    out["loss"].backward()  # still part of the graph


def test_loss_is_fp32_under_bf16():
    model = make(seed=5).to(torch.bfloat16)
    ids, mask, labels = batch(seed=6)
    out = model(ids, attention_mask=mask, labels=labels)
    assert out["mlm_loss"].dtype == torch.float32 and torch.isfinite(out["mlm_loss"])


def test_init_like_hf_and_decoder_tied():
    model = make(seed=7, nsp=True, initializer_range=0.05)
    emb = model.bert.embeddings.word_embeddings
    assert model.cls.predictions.decoder.weight is emb.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    assert torch.count_nonzero(emb.weight[BASE.get("pad_token_id", 0)]) == 0
    q = model.encoder_layers[0].attention.self.query
    assert abs(q.weight.std().item() - 0.05) < 0.01 and torch.count_nonzero(q.bias) == 0
    ln = model.encoder_layers[0].output.LayerNorm
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    model = model.to(torch.float64)  # .to() keeps the tie
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_pooler_and_nsp_head_only_with_nsp():
    names = set(make(nsp=False).state_dict())
    assert not any(n.startswith(("bert.pooler", "cls.seq_relationship")) for n in names)
    model = make(seed=8, nsp=True)
    ids, mask, labels = batch(seed=9)
    out = model(ids, attention_mask=mask, labels=labels, next_sentence_label=torch.tensor([0, 1, 1]))
    torch.testing.assert_close(out["loss"], out["mlm_loss"] + out["nsp_loss"])
    with pytest.raises(UserError, match="nsp"):
        make(nsp=False)(ids, labels=labels, next_sentence_label=torch.tensor([0, 1, 1]))


def _forward_backward(model, ids, mask, labels):
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=labels)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("other", ["sdpa", "fused"])
def test_eager_and_sdpa_agree_forward_and_backward_with_padding(other):
    eager = make(seed=10, attention="eager").train()  # dropout p = 0, so training mode is deterministic
    alt = make(seed=11, attention=other).train()
    alt.load_state_dict(eager.state_dict())
    ids, mask, labels = batch(seed=12)
    loss_a, grads_a = _forward_backward(eager, ids, mask, labels)
    loss_b, grads_b = _forward_backward(alt, ids, mask, labels)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=1e-5)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(eager.bert(ids, mask), alt.bert(ids, mask), atol=1e-5, rtol=1e-5)


def test_fused_falls_back_to_sdpa_on_cpu_and_logs_once(caplog, monkeypatch, fresh_fused_ops):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = make(seed=13, attention="fused").eval()
    ids, mask, _ = batch(seed=14)
    with caplog.at_level(logging.WARNING, logger="training.model.fused"):
        model(ids, attention_mask=mask)
        model(ids, attention_mask=mask)
    fallbacks = [r for r in caplog.records if "falling back to sdpa" in r.getMessage()]
    assert len(fallbacks) == 1


def test_fused_kernel_is_called_with_the_agreed_signature(monkeypatch, caplog, fresh_fused_ops):
    import sys
    import types
    calls = []

    def fake_kernel(q, k, v, key_padding_mask=None, dropout_p=0.0, softmax_scale=None):
        calls.append((q.shape, key_padding_mask.dtype, dropout_p, softmax_scale))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :],
                                              scale=softmax_scale)

    monkeypatch.setitem(sys.modules, "kernels.attention", types.SimpleNamespace(fused_attention=fake_kernel))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = make(seed=30, attention="fused").eval()
    ids, mask, _ = batch(seed=31)
    model(ids, attention_mask=mask)
    assert len(calls) == BASE["num_layers"]
    assert calls[0] == ((3, 4, 10, 8), torch.bool, 0.0, 8 ** -0.5)

    def broken_kernel(*args, **kwargs):
        raise NotImplementedError("head_dim 8 unsupported")

    monkeypatch.setitem(sys.modules, "kernels.attention", types.SimpleNamespace(fused_attention=broken_kernel))
    fused_module.ATTENTION.reset()  # import again
    with caplog.at_level(logging.WARNING, logger="training.model.fused"):
        out = model(ids, attention_mask=mask)["logits"]
    assert [r.getMessage() for r in caplog.records if "head_dim 8 unsupported" in r.getMessage()]
    sdpa = make(seed=30, attention="sdpa").eval()
    torch.testing.assert_close(out, sdpa(ids, attention_mask=mask)["logits"])


ALL_FUSED_OPS = ["bias_gelu", "residual_layernorm", "mlm_loss"]


def test_fused_ops_fall_back_to_pytorch_on_cpu_and_log_each_op_once(caplog, monkeypatch, fresh_fused_ops):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plain = make(seed=40).train()
    kern = make(seed=40, fused_ops=ALL_FUSED_OPS).train()
    ids, mask, labels = batch(seed=41)
    with caplog.at_level(logging.WARNING, logger="training.model.fused"):
        for _ in range(2):
            a, b = plain(ids, mask, labels=labels), kern(ids, mask, labels=labels)
    torch.testing.assert_close(b["loss"], a["loss"], atol=1e-6, rtol=1e-6)
    messages = [r.getMessage() for r in caplog.records]
    for op in ALL_FUSED_OPS:
        assert sum(m.startswith(f"{op}: fused kernel not used") for m in messages) == 1, messages


def test_fused_op_that_fails_is_disabled_and_the_step_still_runs(caplog, monkeypatch, fresh_fused_ops):
    import sys
    import types
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setitem(sys.modules, "kernels.bias_gelu", types.SimpleNamespace(fused_bias_gelu=broken))
    kern = make(seed=42, fused_ops=["bias_gelu"]).train()
    ids, mask, labels = batch(seed=43)
    with caplog.at_level(logging.WARNING, logger="training.model.fused"):
        for _ in range(2):
            loss = kern(ids, mask, labels=labels)["loss"]
    assert calls == [1]  # tried once, then disabled for the process
    assert any("no kernel for this shape" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(loss, make(seed=42).train()(ids, mask, labels=labels)["loss"], atol=1e-6, rtol=1e-6)


def test_fused_residual_layernorm_needs_post_ln():
    with pytest.raises(ValueError, match="residual_layernorm.*norm: post"):
        ModelConfig(**BASE, norm="pre", fused_ops=["residual_layernorm"])
    with pytest.raises(ValueError, match="fused_ops"):
        ModelConfig(**BASE, fused_ops=["softmax"])


def naive_linear_attention(q, k, v, key_padding, eps=model_ops.LINEAR_ATTENTION_EPS):
    """O(S^2) form: out_i = sum_j s_ij v_j / (sum_j s_ij + eps), s_ij = phi(q_i).phi(k_j) for real j."""
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    scores = phi_q @ phi_k.transpose(-1, -2)  # [B, H, S, S]
    scores = scores * key_padding[:, None, None, :]
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


def test_linear_attention_matches_naive_formula():
    gen = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(2, 3, 7, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    key_padding = torch.ones(2, 7, dtype=torch.bool)
    key_padding[1, 4:] = False
    got = model_ops.linear_attention(q, k, v, key_padding)
    torch.testing.assert_close(got, naive_linear_attention(q.float(), k.float(), v.float(), key_padding).double(),
                               atol=1e-5, rtol=1e-5)


def test_linear_attention_ignores_padded_keys():
    model = make(seed=16, attention="linear").eval()
    ids, mask, _ = batch(seed=17)
    pad = mask == 0
    changed = ids.clone()
    changed[pad] = torch.randint(1, BASE["vocab_size"], (int(pad.sum()),), generator=torch.Generator().manual_seed(18))
    types = torch.zeros_like(ids)
    types_changed = types.masked_fill(pad, 1)
    with torch.no_grad():
        a = model.bert(ids, mask, types)
        b = model.bert(changed, mask, types_changed)
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[~real], b[~real])  # the padded positions themselves did change


def test_pre_ln_model_runs_and_has_final_layer_norm():
    model = make(seed=19, norm="pre")
    assert "bert.encoder.final_layer_norm.weight" in model.state_dict()
    assert "bert.encoder.final_layer_norm.weight" not in make(norm="post").state_dict()
    ids, mask, labels = batch(seed=20)
    out = model(ids, attention_mask=mask, labels=labels)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert model.bert.encoder.final_layer_norm.weight.grad is not None


def test_low_rank_ffn_is_the_composition_of_its_factors():
    model = make(seed=21, ffn_rank=6).eval()
    layer = model.encoder_layers[1]
    names = set(dict(layer.named_parameters()))
    assert {"intermediate.dense_u.weight", "intermediate.dense_v.weight", "intermediate.dense_v.bias",
            "output.dense_u.weight", "output.dense_v.weight", "output.dense_v.bias"} <= names
    assert "intermediate.dense_u.bias" not in names and "intermediate.dense.weight" not in names
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(4, BASE["hidden_size"], generator=gen)
    inter = layer.intermediate
    w_in = inter.dense_v.weight @ inter.dense_u.weight  # [ffn, hidden], rank 6
    torch.testing.assert_close(inter(x), F.gelu(x @ w_in.T + inter.dense_v.bias), atol=1e-6, rtol=1e-5)
    h = torch.randn(4, BASE["ffn_size"], generator=gen)
    out = layer.output
    w_out = out.dense_v.weight @ out.dense_u.weight
    torch.testing.assert_close(out.project(h), h @ w_out.T + out.dense_v.bias, atol=1e-6, rtol=1e-5)
    assert torch.linalg.matrix_rank(w_in).item() == 6
    # Init keeps the product at roughly the full-rank init scale.
    assert 0.005 < w_in.std().item() < 0.05


def test_per_layer_heads_and_ffn_shapes_and_parameter_count():
    heads, ffn = [4, 1, 2], [64, 16, 40]
    model = make(seed=23, heads_per_layer=heads, ffn_per_layer=ffn)
    d, hidden = BASE["hidden_size"] // BASE["num_heads"], BASE["hidden_size"]
    for layer, h, f in zip(model.encoder_layers, heads, ffn):
        assert layer.attention.self.query.weight.shape == (h * d, hidden)
        assert layer.attention.output.dense.weight.shape == (hidden, h * d)
        assert layer.intermediate.dense.weight.shape == (f, hidden)
    ids, mask, labels = batch(seed=24)
    model(ids, attention_mask=mask, labels=labels)["loss"].backward()

    v, p = BASE["vocab_size"], BASE["max_position"]
    embeddings = (v + p + 2) * hidden + 2 * hidden
    layers = sum(3 * (hidden * h * d + h * d) + (h * d * hidden + hidden) + 2 * hidden
                 + (hidden * f + f) + (f * hidden + hidden) + 2 * hidden for h, f in zip(heads, ffn))
    mlm_head = hidden * hidden + hidden + 2 * hidden + v  # transform + LN + output bias (decoder tied)
    assert count_parameters(model) == embeddings + layers + mlm_head


def test_parameter_count_matches_hf():
    hf = transformers.BertForPreTraining(transformers.BertConfig(
        vocab_size=BASE["vocab_size"], hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32))
    assert count_parameters(make(nsp=True)) == sum(p.numel() for p in hf.parameters())


def test_layer_keep_prob_one_equals_normal_forward():
    model = make(seed=25, norm="pre").train()
    ids, mask, labels = batch(seed=26)
    torch.manual_seed(0)
    plain = model(ids, attention_mask=mask, labels=labels)["loss"]
    torch.manual_seed(0)
    kept = model(ids, attention_mask=mask, labels=labels, layer_keep_prob=torch.ones(3))["loss"]
    assert torch.equal(plain, kept)


def test_layer_keep_prob_skips_and_rescales_kept_layers():
    model = make(seed=27, norm="pre").train()
    ids, mask, _ = batch(seed=28)
    probs = [0.5, 1.0, 0.3]
    # Replay the draws: one torch.rand(()) per layer with p < 1, in layer order.
    torch.manual_seed(123)
    draws = iter([torch.rand(()).item() for _ in range(2)])
    keep = [next(draws) < p if p < 1 else True for p in probs]
    with torch.no_grad():
        x = model.bert.embeddings(ids, None)
        for layer, p, k in zip(model.encoder_layers, probs, keep):
            x = layer(x, mask.bool(), branch_scale=1.0 / p) if k else x
        expected = model.bert.encoder.final_layer_norm(x)
        torch.manual_seed(123)
        got = model.bert(ids, mask, layer_keep_prob=probs)
    torch.testing.assert_close(got, expected)

    # Skip frequency: layer 0 kept ~50%, layer 2 ~30% over many draws (binomial, 5 sigma bounds).
    calls = [0, 0, 0]
    hooks = [layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.encoder_layers)]
    torch.manual_seed(7)
    trials = 250
    with torch.no_grad():
        for _ in range(trials):
            model.bert(ids[:1, :3], mask[:1, :3], layer_keep_prob=probs)
    for hook in hooks:
        hook.remove()
    assert calls[1] == trials
    for i in (0, 2):
        sigma = (trials * probs[i] * (1 - probs[i])) ** 0.5
        assert abs(calls[i] - trials * probs[i]) < 5 * sigma

    with torch.no_grad():  # eval ignores layer dropping: the full, unscaled model
        model.eval()
        torch.testing.assert_close(model.bert(ids, mask, layer_keep_prob=probs), model.bert(ids, mask))


def test_layer_keep_prob_needs_pre_ln():
    ids, mask, labels = batch(seed=29)
    with pytest.raises(UserError, match="norm: pre"):
        make(norm="post").train()(ids, attention_mask=mask, labels=labels, layer_keep_prob=[1.0] * 3)


def test_flops_per_token_formula():
    cfg = ModelConfig(**BASE)
    h, s, v, f, n = 32, 128, BASE["vocab_size"], 64, 3
    per_layer = 2 * 4 * h * h + 2 * 2 * h * f + 4 * s * h
    expected = 3 * (n * per_layer + 0.15 * 2 * (h * h + h * v))
    assert flops_per_token(cfg, s) == pytest.approx(expected)
    assert flops_per_token(cfg, s, masked_fraction=1.0) > flops_per_token(cfg, s)
    linear = ModelConfig(**BASE, attention="linear")
    assert flops_per_token(linear, 128) == pytest.approx(flops_per_token(linear, 512))
    pruned = ModelConfig(**BASE, heads_per_layer=[2, 2, 2], ffn_rank=8)
    assert flops_per_token(pruned, s) < flops_per_token(cfg, s)
