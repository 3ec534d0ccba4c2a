"""BLiMP scoring (training/blimp): pairs read from jsonl and through `datasets`, masked copies, the batched
pseudo-log-likelihood against a one-sentence-at-a-time reference on the full logits, and the count models
against hand counts. The pairs are tests/data/blimp (four paradigms, six pairs each; CC-BY 4.0, its README)."""
from __future__ import annotations

import json
import lzma
import math
import shutil

import numpy as np
import pytest
import torch

from training.blimp import pass_rate, summary_text
from training.blimp.pairs import load
from training.blimp.score import CountModels, encode, masked_copies, pll
from training.errors import UserError
from tests.helpers import paths as PATHS

PAIRS = PATHS.DATA / "blimp"
UIDS = ["adjunct_island", "anaphor_gender_agreement", "determiner_noun_agreement_1",
        "existential_there_quantifiers_1"]


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    from training.data import tokenizer as tokenization

    return tokenization.load(str(tiny_data / "tokenizer"))


@pytest.fixture(scope="module")
def vocab(tiny_data) -> list[str]:
    return (tiny_data / "tokenizer" / "vocab.txt").read_text().splitlines()


def test_pairs_from_a_folder_with_fields_and_a_fixed_subsample(tmp_path):
    paradigms = load(str(PAIRS))
    assert [p.uid for p in paradigms] == UIDS
    assert [p.field for p in paradigms] == ["syntax", "morphology", "morphology", "semantics"]
    assert paradigms[0].phenomenon == "island_effects" and len(paradigms[0].good) == 6
    first = json.loads((PAIRS / "adjunct_island.jsonl").read_text().splitlines()[0])
    assert (paradigms[0].good[0], paradigms[0].bad[0]) == (first["sentence_good"], first["sentence_bad"])
    # Compressed files read the same; a subsample is the same pairs whatever else is in the folder.
    (tmp_path / "x").mkdir()
    with lzma.open(tmp_path / "x" / "adjunct_island.jsonl.xz", "wt") as f:
        f.write((PAIRS / "adjunct_island.jsonl").read_text())
    alone = load(str(tmp_path / "x"), per_paradigm=3)
    together = load(str(PAIRS), per_paradigm=3)
    assert alone[0].pair_ids == together[0].pair_ids and len(alone[0].pair_ids) == 3
    assert alone[0].good == tuple(paradigms[0].good[i] for i in alone[0].pair_ids)
    assert [p.pair_ids for p in load(str(PAIRS), per_paradigm=3)] == [p.pair_ids for p in together]


def test_the_one_paradigm_spelling_its_field_syntax_slash_semantics_joins_syntax_semantics(tmp_path):
    row = {"sentence_good": "A b.", "sentence_bad": "B a.", "field": "syntax/semantics",
           "linguistics_term": "binding", "UID": "principle_A_case_2"}
    (tmp_path / "principle_A_case_2.jsonl").write_text(json.dumps(row) + "\n")
    assert load(str(tmp_path))[0].field == "syntax_semantics"


def test_pairs_through_datasets_from_a_hub_layout(tmp_path):
    """hf:NAME goes through datasets.get_dataset_config_names / load_dataset(NAME, CONFIG, split='train'): the
    same calls on a local folder laid out as the hub's nyu-mll/blimp (one config per paradigm)."""
    repo = tmp_path / "blimp_hub"
    configs = []
    for uid in UIDS[:2]:
        (repo / uid).mkdir(parents=True)
        shutil.copy(PAIRS / f"{uid}.jsonl", repo / uid / "train.jsonl")
        configs.append(f"- config_name: {uid}\n  data_files:\n  - split: train\n    path: {uid}/train.jsonl\n")
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    got = load(f"hf:{repo}", per_paradigm=4)
    want = load(str(PAIRS), per_paradigm=4)[:2]
    assert [(p.uid, p.good, p.bad, p.field) for p in got] == [(p.uid, p.good, p.bad, p.field) for p in want]


@pytest.mark.parametrize("bad, message", [
    ("missing", "no such directory"),
    ("empty", "no <paradigm>.jsonl"),
    ("garbage", "not readable as JSON lines"),
    ("nofield", "lacks the text field(s) sentence_bad"),
])
def test_bad_pair_sources_are_one_line(tmp_path, bad, message):
    folder = tmp_path / "pairs"
    if bad != "missing":
        folder.mkdir()
    if bad == "garbage":
        (folder / "a.jsonl").write_bytes(b"\x00\xff not json\n")
    if bad == "nofield":
        (folder / "a.jsonl").write_text(json.dumps({"sentence_good": "A dog.", "field": "f",
                                                    "linguistics_term": "t", "UID": "a"}) + "\n")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load(str(folder))


def test_masked_copies_token_and_word_level():
    ids = np.array([2, 10, 11, 12, 13, 3])  # [CLS] w0 w1a w1b w1c [SEP]
    words = np.array([-1, 0, 1, 1, 1, -1])
    rows, positions, targets = masked_copies(ids, words, "token", mask_id=4)
    assert positions.tolist() == [1, 2, 3, 4] and targets.tolist() == [10, 11, 12, 13]
    assert (rows == 4).sum(1).tolist() == [1, 1, 1, 1] and rows[1].tolist() == [2, 10, 4, 12, 13, 3]
    rows, _, _ = masked_copies(ids, words, "word", mask_id=4)
    # PLL-word-l2r: the scored piece and the later pieces of its word are masked, earlier ones stay.
    assert rows.tolist() == [[2, 4, 11, 12, 13, 3], [2, 10, 4, 4, 4, 3], [2, 10, 11, 4, 4, 3], [2, 10, 11, 12, 4, 3]]


def _reference_pll(model, ids: np.ndarray, words: np.ndarray, variant: str, mask_id: int) -> float:
    """One masked copy at a time through the full forward pass (logits at every position, no padding)."""
    rows, positions, targets = masked_copies(ids, words, variant, mask_id)
    total = 0.0
    for row, pos, target in zip(rows, positions, targets):
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(row)[None])["logits"][0, pos]
        total += float(torch.log_softmax(logits.double(), -1)[target])
    return total


@pytest.mark.parametrize("variant", ["token", "word"])
def test_batched_pll_equals_one_sentence_at_a_time(tokenizer, vocab, variant):
    from training.model.bert import BertForPreTraining
    from training.model.config import ModelConfig
    from tests.helpers.tiny_run import TINY_MODEL

    torch.manual_seed(0)
    model = BertForPreTraining(ModelConfig(**{**TINY_MODEL, "attention": "sdpa"})).eval()
    sentences = [p for par in load(str(PAIRS), per_paradigm=2) for p in par.good + par.bad]
    encoded = encode(tokenizer, sentences)
    lengths = {len(e[0]) for e in encoded}
    assert len(lengths) > 3  # the batches mix lengths: padding and the attention mask matter
    mask_id, pad_id = vocab.index("[MASK]"), vocab.index("[PAD]")
    seen = []
    batched = pll(model, encoded, variant, mask_id, pad_id, rows_per_batch=40, progress=seen.append)
    assert sum(seen) == len(sentences) and len(seen) > 1
    for e, score in zip(encoded, batched):
        assert score == pytest.approx(_reference_pll(model, *e, variant, mask_id), rel=1e-5, abs=1e-4)
    assert np.all(batched < 0)


def test_count_models_match_hand_counts():
    # Vocabulary: 0 [PAD], 1 a, 2 b, 3 c, 4 [CLS], 5 [SEP]; two rows, one padded.
    rows = np.array([[4, 1, 2, 1, 2, 5], [4, 1, 3, 5, 0, 0]])
    m = CountModels(rows, vocab_size=6, pad_id=0)
    counts = np.array([0, 3, 2, 1, 2, 2], dtype=float)  # [PAD] never counted
    p1 = np.where(np.arange(6) == 0, 0, counts + 1) / (counts.sum() + 5)
    np.testing.assert_allclose(np.exp(m.unigram_logp), p1)
    # After "a": b twice, c once (T = 2 distinct followers, c(a) = 3): Witten-Bell.
    p_after_a = (np.array([0, 0, 2, 1, 0, 0]) + 2 * p1) / (3 + 2)
    assert p_after_a.sum() == pytest.approx(1.0)
    sentence = [(np.array([4, 1, 2, 5]), np.array([-1, 0, 1, -1]))]  # [CLS] a b [SEP]
    p_after_cls = (np.array([0, 2, 0, 0, 0, 0]) + 1 * p1) / (2 + 1)  # [CLS] -> a twice
    p_after_b = (np.array([0, 1, 0, 0, 0, 1]) + 2 * p1) / (2 + 2)  # b -> a, b -> [SEP]
    want = math.log(p_after_cls[1]) + math.log(p_after_a[2]) + math.log(p_after_b[5])
    assert m.bigram(sentence)[0] == pytest.approx(want)
    assert m.unigram(sentence)[0] == pytest.approx(math.log(p1[1]) + math.log(p1[2]))
    # A context never followed by anything ([SEP] ends each row) backs off to the unigram.
    assert m.bigram([(np.array([5, 3]), np.array([-1, 0]))])[0] == pytest.approx(math.log(p1[3]))


def test_pass_rate_counts_ties_as_half():
    good = np.array([-1.0, -2.0, -3.0, -4.0])
    bad = np.array([-2.0, -1.0, -3.0 + 1e-13, -4.0])
    assert pass_rate(good, bad) == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    line = summary_text({"mean": {"pll_word": 0.612, "unigram": 0.489, "bigram": 0.513}, "primary": "pll_word",
                         "scorers": ["pll_word", "unigram", "bigram"], "paradigms": 67, "pairs": 6700})
    assert line == "BLiMP 61.2% (pll_word; unigram 48.9%, bigram 51.3%) over 67 paradigms, 6,700 pairs"
