"""Unpadded batches (training/model/unpad.py, model.unpad): the loss of a padded batch computed on its real tokens
only equals the padded model's, forward and every gradient, for each attention backend and model variant; the
gather/scatter and the per-bucket attention against the padded computation on fresh random masks."""
import pytest
import torch

from training.model import BertForPreTraining, ModelConfig
from training.model.ops import eager_attention
from training.model.unpad import BUCKET_ROUND, pack

BASE = dict(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_position=64, dropout=0.0,
            attention_dropout=0.0)


def random_mask(seed: int, batch: int = 7, seq: int = 40, holes: bool = False) -> torch.Tensor:
    """Rows of random real lengths (one of them full, one of length 1), padding at the end; with `holes`, padding
    anywhere in the row too (any 0/1 mask must work)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, seq, (batch,), generator=g)
    lengths[0], lengths[1] = seq, 1
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    if holes:
        mask[2:] &= (torch.rand(batch - 2, seq, generator=g) > 0.3).long()
        mask[2:, 0] = 1
    return mask


@pytest.mark.parametrize("holes", [False, True])
def test_gather_scatter_round_trip_and_sequence_offsets(holes):
    mask = random_mask(1, holes=holes)
    packed = pack(mask)
    x = torch.randn(*mask.shape, 3)
    got = packed.gather(x)
    assert got.shape == (int(mask.sum()), 3)
    torch.testing.assert_close(got, x[mask.bool()])  # row-major order of the real tokens
    back = packed.scatter(got)
    torch.testing.assert_close(back, x * mask[..., None])
    assert packed.cu_seqlens.tolist() == [0, *torch.cumsum(mask.sum(1), 0).tolist()]
    assert packed.max_seqlen == int(mask.sum(1).max())
    lengths = {len(b.key_padding[0]) for b in packed.buckets}
    assert len(lengths) == len(packed.buckets) and all(n <= -(-40 // BUCKET_ROUND) * BUCKET_ROUND for n in lengths)
    assert pack(torch.ones(3, 5)) is None  # nothing to unpad


@pytest.mark.parametrize("holes", [False, True])
def test_per_bucket_attention_equals_padded_attention_forward_and_backward(holes):
    torch.manual_seed(2)
    mask = random_mask(3, holes=holes)
    batch, seq = mask.shape
    q, k, v = (torch.randn(batch, 4, seq, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    ref = eager_attention(q, k, v, mask.bool(), 0.0, 8 ** -0.5)  # [B, H, S, D]
    real = mask.bool()
    grad = torch.randn_like(ref)
    (ref.transpose(1, 2)[real] * grad.transpose(1, 2)[real]).sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]

    packed = pack(mask)
    qp, kp, vp = (t.detach().transpose(1, 2)[real].requires_grad_() for t in (q, k, v))  # [total, H, D]
    out = packed.attention(qp, kp, vp, lambda a, b, c, pad: eager_attention(a, b, c, pad, 0.0, 8 ** -0.5))
    torch.testing.assert_close(out, ref.transpose(1, 2)[real])
    (out * grad.transpose(1, 2)[real]).sum().backward()
    for t, ref_grad in zip((qp, kp, vp), ref_grads):
        torch.testing.assert_close(t.grad, ref_grad.transpose(1, 2)[real])


def _loss_and_grads(model, ids, mask, types, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, mask, types, labels=labels, **kwargs)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _batch(seed: int, mask: torch.Tensor):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, BASE["vocab_size"], mask.shape, generator=g) * mask
    types = (torch.rand(mask.shape, generator=g) > 0.5).long() * mask
    labels = torch.full(mask.shape, -100)
    pick = (torch.rand(mask.shape, generator=g) < 0.3) & mask.bool()
    labels[pick] = torch.randint(5, BASE["vocab_size"], (int(pick.sum()),), generator=g)
    return ids, types, labels


@pytest.mark.parametrize("extra,kwargs", [
    ({"attention": "eager"}, {}),
    ({"attention": "sdpa"}, {}),
    ({"attention": "fused", "fused_ops": ["bias_gelu", "residual_layernorm", "mlm_loss"]}, {}),  # CPU: fallbacks
    ({"attention": "linear", "ffn_rank": 8}, {}),  # CoRe's relaxed model
    ({"norm": "pre"}, {"layer_keep_prob": [1.0, 0.5]}),  # layer drop
    ({"slimming": True, "nsp": True}, {}),  # EarlyBERT's coefficients, the NSP head on [CLS]
    ({"heads_per_layer": [4, 2], "ffn_per_layer": [64, 16]}, {}),  # a pruned model
])
@pytest.mark.parametrize("holes", [False, True])
def test_unpadded_model_matches_the_padded_one_forward_and_backward(extra, kwargs, holes, monkeypatch,
                                                                    fresh_fused_ops):
    # The fused case runs the CPU fallbacks, whatever test module set TRITON_INTERPRET before this one (the
    # kernels under the interpreter are the kernel tests' business, and take a minute here).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(4)
    padded = BertForPreTraining(ModelConfig(**BASE, **extra, unpad=False)).train()
    unpadded = BertForPreTraining(ModelConfig(**BASE, **extra)).train()
    unpadded.load_state_dict(padded.state_dict())
    mask = random_mask(5, holes=holes)
    ids, types, labels = _batch(6, mask)
    if extra.get("nsp"):
        kwargs = {**kwargs, "next_sentence_label": torch.randint(0, 2, (mask.shape[0],))}
    if "layer_keep_prob" in kwargs:
        runs = [dict(kwargs, layer_drop_generator=torch.Generator().manual_seed(s)) for s in (7, 7)]
    else:
        runs = [kwargs, kwargs]
    seen = []  # what the encoder's layers get: [B, S, hidden] padded, [real tokens, hidden] unpadded
    for model in (padded, unpadded):
        model.bert.encoder.layer[1].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    out_p, grads_p = _loss_and_grads(padded, ids, mask, types, labels, **runs[0])
    out_u, grads_u = _loss_and_grads(unpadded, ids, mask, types, labels, **runs[1])
    assert seen in ([tuple(mask.shape) + (32,), (int(mask.sum()), 32)], [])  # [] when layer drop skipped it
    for key in ("loss", "mlm_loss"):
        torch.testing.assert_close(out_u[key], out_p[key], atol=1e-6, rtol=1e-5)
    assert out_u["mlm_count"] == out_p["mlm_count"] and out_u["mlm_correct"] == out_p["mlm_correct"]
    assert grads_u.keys() == grads_p.keys()
    for name in grads_p:
        torch.testing.assert_close(grads_u[name], grads_p[name], atol=1e-6, rtol=1e-4, msg=name)


def test_bf16_unpadded_loss_is_as_close_to_fp32_as_the_padded_one():
    torch.manual_seed(8)
    ref = BertForPreTraining(ModelConfig(**BASE)).train()
    mask = random_mask(9)
    ids, types, labels = _batch(10, mask)
    want = ref(ids, mask, types, labels=labels)["loss"].item()
    errors = {}
    for unpad in (False, True):
        model = BertForPreTraining(ModelConfig(**BASE, unpad=unpad)).to(torch.bfloat16).train()
        model.load_state_dict(ref.state_dict())
        errors[unpad] = abs(model(ids, mask, types, labels=labels)["loss"].item() - want)
    assert errors[True] <= 2 * errors[False] + 1e-2, errors


def test_frozen_bottom_and_hidden_states_keep_the_padded_contract():
    """MSLT's frozen embeddings + first layer run forward-only on the unpadded tokens; Bert.forward and logits
    (no labels) still return every position, as Hugging Face's do."""
    torch.manual_seed(11)
    padded = BertForPreTraining(ModelConfig(**BASE, unpad=False)).train()
    unpadded = BertForPreTraining(ModelConfig(**BASE)).train()
    unpadded.load_state_dict(padded.state_dict())
    for model in (padded, unpadded):
        for p in [*model.bert.embeddings.parameters(), *model.bert.encoder.layer[0].parameters()]:
            p.requires_grad_(False)
    mask = random_mask(12)
    ids, types, labels = _batch(13, mask)
    out_p, grads_p = _loss_and_grads(padded, ids, mask, types, labels)
    out_u, grads_u = _loss_and_grads(unpadded, ids, mask, types, labels)
    torch.testing.assert_close(out_u["loss"], out_p["loss"], atol=1e-6, rtol=1e-5)
    assert grads_u.keys() == grads_p.keys() and not any(n.startswith("bert.embeddings") for n in grads_u)
    for name in grads_p:
        torch.testing.assert_close(grads_u[name], grads_p[name], atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(unpadded.bert(ids, mask, types), padded.bert(ids, mask, types))
        torch.testing.assert_close(unpadded(ids, mask, types)["logits"], padded(ids, mask, types)["logits"])


# ------------------------------------------------------------------------- prepare --no-pack and its batches

def test_prepare_no_pack_writes_one_padded_document_per_row(tmp_path):
    import numpy as np

    from tests.helpers.data import make_docs, quiet_prepare, write_lines
    from tests.helpers.data import encode_docs, load_split
    from training.data.loader import PretrainingData

    docs = make_docs(60, seed=3) + [" ".join(["long"] * 70)]  # the last one needs three rows of 24
    corpus = write_lines(tmp_path / "c.txt", docs)
    stats = quiet_prepare([corpus], tmp_path / "out", seq_len=24, tokenizer="train:300", heldout_fraction=0.0,
                          pack=False)
    out = str(tmp_path / "out")
    rows, seps = load_split(out, "train")
    doc_ids = [ids for ids in encode_docs(out, docs) if ids]
    expected = []
    for ids in doc_ids:  # [CLS] chunk [SEP] [PAD]...: a document continues in the next rows, nothing dropped
        expected += [ids[i: i + 22] for i in range(0, len(ids), 22)]
    assert len(rows) == len(expected) == stats["rows"]["train"]
    for row, sep, chunk in zip(rows.tolist(), seps.tolist(), expected):
        assert row[0] == 2 and sep == 1 + len(chunk) and row[sep] == 3
        assert row[1:sep] == chunk and set(row[sep + 1:]) <= {0}
    assert stats["packed"] is False and stats["dropped_tokens"]["train"] == 0
    assert stats["tokens"]["train"] == sum(map(len, doc_ids))
    pads = int((rows == 0).sum())
    assert stats["padding"]["train"] == round(pads / rows.size, 4) and pads > 0

    data = PretrainingData(out)
    batch = next(data.train_batches(8, seq_len=24))
    real = batch["attention_mask"].bool()
    assert not real.all() and ((batch["input_ids"] == 0) == ~real).all()
    assert (batch["labels"][~real] == -100).all() and (batch["token_type_ids"][~real] == 0).all()
    short = next(data.train_batches(8, seq_len=16))  # a shorter stage: rows that end inside are only cut
    ids = short["input_ids"]
    for row in range(8):
        n = int(short["attention_mask"][row].sum())
        assert ids[row, n - 1] == 3 and (ids[row, n:] == 0).all()  # ends with its [SEP], then padding only
    assert np.asarray(ids[:, 0] == 2).all()


