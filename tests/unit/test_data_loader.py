"""PretrainingData: global order, rank slicing, O(1) resume, held-out batches, short sequences."""
from __future__ import annotations

import itertools

import pytest
import torch

from tests.helpers.data import small_data_dir  # noqa: F401
from training.data import PretrainingData


@pytest.fixture(scope="module")
def data(small_data_dir):
    return PretrainingData(small_data_dir, whole_word=True, nsp=True)


def take(it, n):
    return list(itertools.islice(it, n))


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_metadata(data):
    assert data.seq_len == 32 and data.vocab_size <= 400
    assert data.special_ids == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert data.num_train_rows > 50 and data.num_heldout_rows > 0


def test_two_ranks_equal_one_rank_of_double_batch(data):
    one = take(data.train_batches(8, rank=0, world_size=1, seed=4), 30)  # crosses epoch boundaries
    r0 = take(data.train_batches(4, rank=0, world_size=2, seed=4), 30)
    r1 = take(data.train_batches(4, rank=1, world_size=2, seed=4), 30)
    for b, x, y in zip(one, r0, r1):
        assert same(b, {k: torch.cat([x[k], y[k]]) for k in b})
    assert not torch.equal(one[0]["input_ids"], take(data.train_batches(8, seed=5), 1)[0]["input_ids"])


def test_start_step_equals_iterating(data):
    seq = take(data.train_batches(6, rank=1, world_size=3, seed=1), 25)
    resumed = take(data.train_batches(6, rank=1, world_size=3, seed=1, start_step=20), 5)
    assert all(same(a, b) for a, b in zip(seq[20:], resumed))


def test_each_epoch_is_a_permutation(data):
    n = data.num_train_rows
    rows = data.train_rows_at(torch.arange(3 * n), seed=2)
    for e in range(3):
        assert sorted(rows[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(rows[:n], rows[n:2 * n])


def test_heldout_batches_fixed(data):
    a = list(data.heldout_batches(5))
    b = list(data.heldout_batches(5))
    assert len(a) == -(-data.num_heldout_rows // 5)
    assert all(same(x, y) for x, y in zip(a, b))
    assert len(list(data.heldout_batches(5, max_batches=1))) == 1


def test_short_seq_len_truncation(small_data_dir):
    plain = PretrainingData(small_data_dir)
    for batch in take(plain.train_batches(16, seed=0, seq_len=12), 5):
        ids = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
        assert ids.shape == (16, 12)
        assert (ids[:, 0] == 2).all() and (ids[:, -1] == 3).all()
        first_sep = (ids == 3).int().argmax(dim=1)
        assert (first_sep >= 2).all() and (first_sep <= 9).all()  # A and B both non-empty
        tt = batch["token_type_ids"]
        assert torch.equal(tt, (torch.arange(12) > first_sep[:, None]).long())
    with pytest.raises(ValueError):
        next(plain.train_batches(4, seq_len=64))


def test_heldout_mask_is_fixed_all_mask_and_independent_of_the_run(small_data_dir, data):
    """The yardstick: the same positions whatever the batch size, the run's masking options or seed."""
    plain = PretrainingData(small_data_dir, mlm_probability=0.4)
    by5 = list(data.heldout_batches(5, seed=1))
    by3 = list(plain.heldout_batches(3, seed=9))
    labels5 = torch.cat([b["labels"] for b in by5])
    ids5 = torch.cat([b["input_ids"] for b in by5])
    assert torch.equal(labels5, torch.cat([b["labels"] for b in by3]))
    assert torch.equal(ids5, torch.cat([b["input_ids"] for b in by3]))
    target = labels5 != -100
    assert (ids5[target] == data.special_ids["mask"]).all()  # every target is [MASK]: nothing to copy
    original = torch.from_numpy(data._held_ids.astype("int64"))
    assert torch.equal(ids5[~target], original[~target])  # nothing else changed
    assert torch.equal(labels5[target], original[target])
    maskable = ~data.collator.special[original]
    assert not target[~maskable].any()
    assert abs(float(target.sum() / maskable.sum()) - 0.15) < 0.03
    # the training masking (80/10/10 at the run's rate) is still there on request, and differs
    train_like = next(plain.heldout_batches(3, fixed_mask=False))
    assert not torch.equal(train_like["labels"], by3[0]["labels"])


def test_unigram_table_is_the_train_split_token_frequencies(data):
    import numpy as np

    logp = data.unigram_log_probs()
    assert abs(float(logp.exp().sum()) - 1.0) < 1e-9
    counts = np.bincount(data._train_ids.reshape(-1), minlength=data.vocab_size).astype(float)
    special = data.collator.special.numpy() | ~data.collator.random_pool_mask().numpy()
    counts = np.where(special, 0.0, counts + 1.0)  # add-one over the tokens that can be targets
    np.testing.assert_allclose(logp.numpy()[~special], np.log(counts / counts.sum())[~special], rtol=1e-12)
    assert torch.isinf(logp[torch.from_numpy(special)]).all()
    labels = torch.tensor([[-100, 7, 9], [9, -100, -100]])
    assert data.unigram_nll(labels) == pytest.approx(-float(logp[7] + 2 * logp[9]))
