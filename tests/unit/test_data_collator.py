"""MLMCollator: masking statistics, whole-word masking, NSP, padding, determinism."""
from __future__ import annotations

import torch

from training.data.collator import MLMCollator

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# 5 specials, 3 [unused] (never random targets), 600 words, 400 continuations
VOCAB = SPECIALS + [f"[unused{i}]" for i in range(3)] + [f"w{i}" for i in range(600)] + [f"##c{i}" for i in range(400)]
FIRST_WORD, FIRST_CONT = 8, 608
PAD, CLS, SEP, MASK = 0, 2, 3, 4


def make_rows(bsz, seq_len, seed=0, pad_to=None, cont_prob=0.0):
    """Random [CLS] A [SEP] B [SEP] rows (optionally shorter, padded) and their sep_index."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_WORD, FIRST_CONT, (bsz, seq_len), generator=g)
    if cont_prob:
        cont = torch.rand(bsz, seq_len, generator=g) < cont_prob
        ids = torch.where(cont, torch.randint(FIRST_CONT, len(VOCAB), (bsz, seq_len), generator=g), ids)
    length = torch.full((bsz,), seq_len) if pad_to is None else torch.randint(pad_to, seq_len + 1, (bsz,), generator=g)
    sep = torch.stack([torch.randint(2, int(n) - 2, (1,), generator=g)[0] for n in length])
    pos = torch.arange(seq_len)
    ids[:, 0] = CLS
    ids[pos == sep[:, None]] = SEP
    ids[pos == (length - 1)[:, None]] = SEP
    ids[pos >= length[:, None]] = PAD
    return ids, sep


def unmasked(batch):
    return torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])


def test_mask_statistics_and_specials_never_selected():
    coll = MLMCollator(VOCAB, seed=5)
    sel = mask = rand = keep = total = 0
    for b in range(8):
        ids, sep = make_rows(64, 128, seed=b, pad_to=64)
        out = coll(ids, sep, batch_key=b)
        labels = out["labels"]
        selected = labels != -100
        special = (ids == PAD) | (ids == CLS) | (ids == SEP)
        assert not (selected & special).any()
        assert torch.equal(labels[selected], ids[selected])
        assert torch.equal(out["attention_mask"], (ids != PAD).long())
        assert torch.equal(out["input_ids"][~selected], ids[~selected])
        new = out["input_ids"][selected]
        sel += int(selected.sum())
        total += int((~special).sum())
        mask += int((new == MASK).sum())
        keep += int((new == ids[selected]).sum())
        changed = (new != MASK) & (new != ids[selected])
        rand += int(changed.sum())
        assert (new[changed] >= FIRST_WORD).all(), "random replacements come from the non-special vocab"
    assert abs(sel / total - 0.15) < 0.01
    assert abs(mask / sel - 0.8) < 0.02
    assert abs(rand / sel - 0.1) < 0.015
    assert abs(keep / sel - 0.1) < 0.015


def test_whole_word_masking_masks_complete_words():
    coll = MLMCollator(VOCAB, whole_word=True, seed=1)
    ids, sep = make_rows(64, 128, seed=3, cont_prob=0.4)
    out = coll(ids, sep, batch_key=0)
    selected = out["labels"] != -100
    is_cont = ids >= FIRST_CONT
    # a continuation token is selected iff the token before it (same word) is
    prev_sel = torch.roll(selected, 1, dims=1)
    inner = is_cont.clone()
    inner[:, 0] = False
    after_special = torch.roll((ids == SEP) | (ids == CLS), 1, dims=1)
    check = inner & ~after_special
    assert torch.equal(selected[check], prev_sel[check])
    rate = selected.sum() / (ids >= FIRST_WORD).sum()
    assert 0.10 < rate < 0.20
    # each word gets one action: a masked word is entirely [MASK] or entirely not
    masked = out["input_ids"] == MASK
    assert torch.equal(masked[check], torch.roll(masked, 1, dims=1)[check])


def test_nsp_labels_and_token_types():
    coll = MLMCollator(VOCAB, nsp=True, seed=2)
    ids, sep = make_rows(256, 48, seed=4, pad_to=20)
    out = coll(ids, sep, batch_key=7)
    nsp = out["next_sentence_label"]
    assert set(nsp.tolist()) == {0, 1} and abs(nsp.float().mean() - 0.5) < 0.1
    orig = unmasked(out)
    pos = torch.arange(48)
    for i in range(256):
        s = int(sep[i])
        row = orig[i]
        n = int((row != PAD).sum())
        assert torch.equal(row[:s + 1], ids[i, :s + 1])  # [CLS] A [SEP] always kept
        assert row[n - 1] == SEP and (row[n:] == PAD).all()
        if nsp[i] == 0:
            assert torch.equal(row, ids[i])
        else:
            assert any(torch.equal(row[s + 1:n - 1], ids[j, sep[j] + 1:sep[j] + n - s - 1])
                       for j in range(256) if j != i)
        tt = out["token_type_ids"][i]
        assert torch.equal(tt, ((pos > s) & (pos < n)).long())
        assert torch.equal(out["attention_mask"][i], (pos < n).long())
        assert out["input_ids"].shape == (256, 48)


def test_deterministic_per_sample_key():
    coll = MLMCollator(VOCAB, whole_word=True, nsp=False, seed=9)
    ids, sep = make_rows(16, 64, seed=1, cont_prob=0.3)
    keys = torch.arange(100, 116)
    a = coll(ids, sep, sample_keys=keys)
    b = coll(ids, sep, sample_keys=keys)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the same samples in another batch split (e.g. other ranks) mask identically
    c1 = coll(ids[:8], sep[:8], sample_keys=keys[:8])
    c2 = coll(ids[8:], sep[8:], sample_keys=keys[8:])
    assert all(torch.equal(a[k], torch.cat([c1[k], c2[k]])) for k in a)
    # batch_key mode: same key -> same batch, other key -> different masking
    assert torch.equal(coll(ids, sep, batch_key=3)["labels"], coll(ids, sep, batch_key=3)["labels"])
    assert not torch.equal(coll(ids, sep, batch_key=3)["labels"], coll(ids, sep, batch_key=4)["labels"])
    assert not torch.equal(a["labels"], MLMCollator(VOCAB, seed=10)(ids, sep, sample_keys=keys)["labels"])


def test_output_dtypes_and_sep_default():
    coll = MLMCollator(VOCAB)
    ids, sep = make_rows(4, 16)
    out = coll(ids.numpy().astype("int16"))  # numpy int16 rows, sep_index found as first [SEP]
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels"):
        assert out[key].dtype == torch.long and out[key].shape == (4, 16)
    pos = torch.arange(16)
    assert torch.equal(out["token_type_ids"], (pos > sep[:, None]).long())
