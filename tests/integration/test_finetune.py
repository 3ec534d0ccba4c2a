"""`python -m training.finetune`: Trainer fine-tuning of an exported model on local tasks, the GLUE metrics, and
bad input (one `error:` line, exit 2, nothing overwritten).

The classification task is made from two real corpora that installed packages ship: sentences of gensim's
Wikipedia sample (training/data/wiki.py, as tests/helpers/corpus.py) against sentences of the Australian news text gensim ships
(lee_background.cor); held-out rows come from other articles than the training rows. The model is a tiny
randomly initialised one of ours, exported with a WordPiece vocabulary trained on the training sentences.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.finetune import (EVAL_PER_CLASS, TRAIN_PER_CLASS, export_tiny, finetune, genre_corpora, results,
                                    write_genre_task, write_rows)
from tests.helpers.reliability import tree_digest


@pytest.fixture(scope="module")
def corpora() -> dict:
    return genre_corpora()


@pytest.fixture(scope="module")
def genre_task(tmp_path_factory) -> tuple[Path, Path]:
    return write_genre_task(tmp_path_factory.mktemp("genre"))


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, corpora) -> dict:
    root = tmp_path_factory.mktemp("finetune_models")
    texts = corpora["wiki"][0][:TRAIN_PER_CLASS] + corpora["news"][0][:TRAIN_PER_CLASS]
    return {norm: export_tiny(root / norm, texts, norm) for norm in ("pre", "post")}


# ------------------------------------------------------------------ fine-tuning

def test_two_corpora_task_is_learned_well_above_chance(tiny_models, genre_task, tmp_path, capsys):
    train, held = genre_task
    out = tmp_path / "ft"
    assert finetune("--model", str(tiny_models["pre"]), "--task", f"csv:{train},{held}", "--out", str(out),
                    "--max-steps", "200", "--lr", "1e-3", "--batch-size", "16", "--max-seq-len", "64",
                    "--seed", "0", "--log-every", "1000") == 0
    r = results(out)
    assert r["complete"] and r["command"][:3] == ["python", "-m", "training.finetune"]
    assert r["machine"]["device"] == "cpu" and r["model_type"] == "roberta-prelayernorm"
    t = r["tasks"]["genre"]
    assert t["label_names"] == ["news", "wiki"] and t["num_labels"] == 2
    assert t["train_rows"] == 2 * TRAIN_PER_CLASS and t["eval_rows"] == {"eval": 2 * EVAL_PER_CLASS}
    s = t["seeds"]["0"]
    assert s["steps"] == 200
    assert set(s["eval"]) == {"accuracy", "f1", "matthews_correlation", "loss"}
    # Chance is 0.5 (balanced held-out rows). Measured at these settings: 0.86-0.89 for seeds 0, 1, 2.
    assert s["eval"]["accuracy"] > 0.75, s
    assert s["eval"]["matthews_correlation"] > 0.5, s
    assert json.loads((out / "genre" / "seed0" / "metrics.json").read_text()) == s
    assert t["mean"]["eval"]["accuracy"] == s["eval"]["accuracy"]
    printed = capsys.readouterr().out
    assert "genre" in printed and "accuracy" in printed and f"{s['eval']['accuracy']:.4f}" in printed


def test_regression_task_reports_pearson_and_spearman_and_runs_several_tasks(tiny_models, corpora, tmp_path,
                                                                            capsys):
    """A JSONL pair task with float labels (regression), then a CSV classification task, in one call, two
    seeds each; the Post-LN export (BertForSequenceClassification). Without an EVAL file 10% of the rows are
    held out."""
    sents = corpora["wiki"][0][:200]
    rows = [{"text": a, "text_pair": b, "label": round(len(a.split()) / (len(a.split()) + len(b.split())), 3)}
            for a, b in zip(sents[::2], sents[1::2])]
    reg = tmp_path / "lengths.jsonl"
    reg.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cls = write_rows(tmp_path / "ints.csv", [{"text": s, "label": i % 3} for i, s in enumerate(sents[:60])])
    out = tmp_path / "ft"
    assert finetune("--model", str(tiny_models["post"]), "--task", str(reg), "--task", f"csv:{cls}",
                    "--out", str(out), "--max-steps", "4", "--batch-size", "8", "--lr", "1e-3", "--seed", "0", "1",
                    "--save-model") == 0
    r = results(out)
    assert r["model_type"] == "bert" and list(r["tasks"]) == ["lengths", "ints"]
    lengths = r["tasks"]["lengths"]
    assert lengths["num_labels"] == 1 and lengths["metrics"] == ["pearson", "spearmanr"]
    assert lengths["eval_rows"] == {"eval": 10} and lengths["train_rows"] == 90
    assert lengths["source"]["held_out"] == {"fraction": 0.1, "seed": 0}
    assert set(lengths["seeds"]) == {"0", "1"}
    for m in (s["eval"] for s in lengths["seeds"].values()):
        assert all(isinstance(m[k], float) and -1 <= m[k] <= 1 for k in ("pearson", "spearmanr"))
    values = [s["eval"]["pearson"] for s in lengths["seeds"].values()]
    assert values[0] != values[1]  # the seeds differ (head init, data order)
    assert lengths["mean"]["eval"]["pearson"] == pytest.approx(np.mean(values))
    printed = capsys.readouterr().out
    assert " ".join(f"{v:.4f}" for v in values) in printed and f"{np.mean(values):.4f}" in printed
    ints = r["tasks"]["ints"]
    assert ints["num_labels"] == 3 and ints["metrics"] == ["accuracy"] and ints["label_names"] == []
    assert 0 <= ints["seeds"]["0"]["eval"]["accuracy"] <= 1
    assert (out / "lengths" / "seed0" / "metrics.json").is_file() and (out / ".bert-finetune").is_file()
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(out / "ints" / "seed1" / "model")
    assert type(saved).__name__ == "BertForSequenceClassification" and saved.config.num_labels == 3


def test_overwrite_replaces_a_previous_sweep(tiny_models, genre_task, tmp_path):
    train, held = genre_task
    out = tmp_path / "ft"
    common = ["--model", str(tiny_models["post"]), "--task", f"csv:{train},{held}", "--out", str(out),
              "--max-steps", "1", "--batch-size", "4"]
    assert finetune(*common) == 0
    (out / "stale.txt").write_text("from before")
    assert finetune(*common, "--overwrite", "--seed", "3") == 0
    assert not (out / "stale.txt").exists() and set(results(out)["tasks"]["genre"]["seeds"]) == {"3"}
    assert not list(tmp_path.glob("ft.replaced-*"))  # the previous sweep is deleted once this one completes


def test_a_failed_overwrite_puts_the_previous_sweep_back(tiny_models, genre_task, tmp_path, monkeypatch, capsys):
    from training import finetune as ft
    from training.errors import UserError

    train, held = genre_task
    out = tmp_path / "ft"
    common = ["--model", str(tiny_models["post"]), "--task", f"csv:{train},{held}", "--out", str(out),
              "--max-steps", "1", "--batch-size", "4"]
    assert finetune(*common) == 0
    before = tree_digest(out)

    def broken(*_args, **_kwargs):
        raise UserError("the disk broke")

    monkeypatch.setattr(ft, "train_one", broken)
    with pytest.raises(SystemExit) as exc:
        finetune(*common, "--overwrite")
    assert exc.value.code == 2 and "error: the disk broke" in capsys.readouterr().err
    assert tree_digest(out) == before  # back as it was; this sweep's partial output beside it
    assert [p.name for p in tmp_path.glob("ft.*")] and not list(tmp_path.glob("ft.replaced-*"))


def test_glue_task_columns_splits_and_metrics(tiny_models, corpora, tmp_path, monkeypatch):
    """GLUE itself needs the hub: a stand-in for `load_dataset("nyu-mll/glue", "mnli")` with GLUE's columns and
    splits checks the mapping to text / text_pair, both validation splits, and that the test split is unused."""
    import datasets

    sents = corpora["news"][0][:120]
    features = datasets.Features(premise=datasets.Value("string"), hypothesis=datasets.Value("string"),
                                 label=datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
                                 idx=datasets.Value("int32"))

    def split(lo, hi, label=None):
        rows = range(lo, hi, 2)
        return datasets.Dataset.from_dict(
            {"premise": [sents[i] for i in rows], "hypothesis": [sents[i + 1] for i in rows],
             "label": [(i // 2) % 3 if label is None else label for i in rows], "idx": list(rows)}, features=features)

    calls = []

    def fake_load(path, name=None, **kwargs):
        calls.append((path, name))
        return datasets.DatasetDict(train=split(0, 80), validation_matched=split(80, 100),
                                    validation_mismatched=split(100, 120), test_matched=split(0, 10, label=-1))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = tmp_path / "ft"
    assert finetune("--model", str(tiny_models["pre"]), "--task", "glue/mnli", "--out", str(out),
                    "--max-steps", "2", "--batch-size", "8") == 0
    assert calls == [("nyu-mll/glue", "mnli")]
    t = results(out)["tasks"]["mnli"]
    assert t["num_labels"] == 3 and t["train_rows"] == 40
    assert t["eval_rows"] == {"validation_matched": 10, "validation_mismatched": 10}
    assert set(t["seeds"]["0"]) >= {"validation_matched", "validation_mismatched"}
    assert set(t["mean"]["validation_mismatched"]) == {"accuracy"}


# ------------------------------------------------------------------ metrics

def test_glue_metrics_match_hand_computed_values():
    from training import finetune_tasks as ft

    y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
    p = np.array([1, 1, 0, 0, 0, 1, 1, 1])  # tp 3, fn 1, tn 2, fp 2
    assert ft.accuracy(p, y) == pytest.approx(5 / 8)
    assert ft.f1_binary(p, y) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert ft.matthews_corr(p, y) == pytest.approx((3 * 2 - 2 * 1) / np.sqrt(5 * 4 * 4 * 3))
    assert ft.matthews_corr(y, y) == pytest.approx(1.0) and ft.matthews_corr(1 - y, y) == pytest.approx(-1.0)
    assert ft.matthews_corr(np.ones(8, int), y) == 0.0  # undefined (one predicted class): 0, as scikit-learn
    assert ft.f1_binary(np.zeros(4, int), np.zeros(4, int)) == 0.0
    # Multi-class MCC (Gorodkin): confusion [[2,1,0],[0,2,1],[1,0,2]] -> (c*s - t.p) / sqrt((s^2-p.p)(s^2-t.t))
    y3 = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    p3 = np.array([0, 0, 1, 1, 1, 2, 2, 2, 0])
    assert ft.matthews_corr(p3, y3) == pytest.approx((6 * 9 - 27) / np.sqrt((81 - 27) * (81 - 27)))
    a, b = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.array([2.0, 1.0, 4.0, 3.0, 7.0])
    r = np.corrcoef(a, b)[0, 1]
    assert ft.pearson(a, b) == pytest.approx(r)
    assert ft.spearman(a, b) == pytest.approx(1 - 6 * (1 + 1 + 1 + 1 + 0) / (5 * 24))  # no ties: 1 - 6Σd²/n(n²-1)
    assert ft.spearman(a, np.exp(a)) == pytest.approx(1.0)
    assert np.isnan(ft.pearson(a, np.ones(5)))  # undefined; results.json writes it as null
    assert ft.jsonable({"x": float("nan"), "y": [1.0, float("inf")]}) == {"x": None, "y": [1.0, None]}
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])
    assert ft.score(("accuracy", "f1"), logits, np.array([1, 0, 0])) == {"accuracy": pytest.approx(2 / 3),
                                                                         "f1": pytest.approx(2 / 3)}
    assert ft.score(("pearson",), np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 3.5]))["pearson"] > 0.99


def test_glue_table_follows_the_glue_definition():
    from training.finetune_tasks import GLUE_TASKS

    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert GLUE_TASKS["cola"].metrics == ("matthews_correlation",)
    assert set(GLUE_TASKS["mrpc"].metrics) == set(GLUE_TASKS["qqp"].metrics) == {"f1", "accuracy"}
    assert GLUE_TASKS["stsb"].num_labels == 1 and set(GLUE_TASKS["stsb"].metrics) == {"pearson", "spearmanr"}
    assert GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    for name in ("sst2", "qnli", "rte", "wnli"):
        assert GLUE_TASKS[name].metrics == ("accuracy",)


# ------------------------------------------------------------------ bad input

def _mismatched_model(c) -> Path:
    """A copy of the tiny export whose vocab.txt (and tokenizer.json) come from a smaller tokenizer."""
    from training.data import tokenizer as wordpiece

    bad = c.tmp / "mismatched"
    shutil.copytree(c.models["post"], bad)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (bad / name).unlink(missing_ok=True)
    wordpiece.save(wordpiece.train(c.texts, 300), str(bad))
    return bad


def _no_label_csv(c) -> str:
    return str(write_rows(c.tmp / "nolabel.csv", [{"text": "a b c", "target": 1}] * 4, fields=("text", "target")))


def _existing_out(c) -> Path:
    c.out.mkdir()
    (c.out / "results.json").write_text("{}\n")
    return c.out


def _previous_sweep(c) -> Path:
    c.out.mkdir()
    (c.out / ".bert-finetune").write_text('{"written_by": "training.finetune"}\n')
    (c.out / "results.json").write_text("{}\n")
    return c.out


def _foreign_out(c) -> Path:
    _existing_out(c)
    (c.out / "mine.txt").write_text("someone's")
    return c.out


class Case:
    def __init__(self, tmp: Path, models: dict, task: tuple[Path, Path], texts: list[str]):
        self.tmp, self.models, self.task, self.texts = tmp, models, task, texts
        self.out = tmp / "out"

    def argv(self, model=None, task=None, *extra) -> list[str]:
        return ["--model", str(model or self.models["post"]), "--task", task or f"csv:{self.task[0]},{self.task[1]}",
                "--out", str(self.out), "--max-steps", "1", *extra]


ROWS = [  # (id, argv from a Case, text the error line must hold)
    ("missing-model", lambda c: c.argv(model=c.tmp / "nope"), ["--model", "nope", "no such directory"]),
    ("not-an-hf-dir", lambda c: c.argv(model=c.tmp), ["--model", "no config.json"]),
    ("vocab-mismatch", lambda c: c.argv(model=_mismatched_model(c)), ["--model", "mismatched", "tokens",
                                                                      "vocab_size"]),
    ("unknown-glue-task", lambda c: c.argv(task="glue/foo"), ["glue/foo", "unknown GLUE task", "sst2"]),
    ("unknown-task", lambda c: c.argv(task="squad"), ["--task squad", "unknown task"]),
    ("missing-csv", lambda c: c.argv(task=f"csv:{c.tmp / 'absent.csv'}"), ["absent.csv", "no such file"]),
    ("csv-without-label", lambda c: c.argv(task=f"csv:{_no_label_csv(c)}"), ["nolabel.csv", "`label`", "target"]),
    ("csv-row-without-label", lambda c: c.argv(task=str(write_rows(c.tmp / "holes.csv", [
        {"text": "a b c", "label": 1}, {"text": "d e f", "label": ""}, {"text": "g h", "label": 0}]))),
     ["holes.csv", "1 rows without a `label`"]),
    ("one-class", lambda c: c.argv(task=str(write_rows(c.tmp / "same.csv", [{"text": "a b", "label": "x"}] * 5))),
     ["same.csv", "every label is x"]),
    ("out-exists", lambda c: (_existing_out(c), c.argv())[1], ["--out", "not empty", "--overwrite"]),
    ("overwrite-foreign-out", lambda c: (_foreign_out(c), c.argv(None, None, "--overwrite"))[1],
     ["--out", ".bert-finetune", "will not delete"]),
    ("overwrite-then-bad-task", lambda c: (_previous_sweep(c), c.argv(None, "glue/foo", "--overwrite"))[1],
     ["glue/foo", "unknown GLUE task"]),
    ("out-is-the-model", lambda c: (shutil.copytree(c.models["post"], c.out), c.argv(c.out, None, "--overwrite"))[1],
     ["--out", "--model", "an input of this command"]),
    ("seq-len-too-long", lambda c: c.argv(None, None, "--max-seq-len", "65"), ["--max-seq-len 65", "64"]),
    ("bad-batch-size", lambda c: c.argv(None, None, "--batch-size", "0"), ["--batch-size 0"]),
    # issue 29: numbers that are not finite or out of range (training/cli_types.py) ...
    ("lr-inf", lambda c: c.argv(None, None, "--lr", "inf"), ["--lr inf: must be a finite number > 0"]),
    ("epochs-inf", lambda c: c.argv(None, None, "--epochs", "inf"), ["--epochs inf: must be a finite number"]),
    ("warmup-nan", lambda c: c.argv(None, None, "--warmup", "nan"), ["--warmup nan: must be a finite number >= 0"]),
    ("seed-negative", lambda c: c.argv(None, None, "--seed", "0", "-1"), ["--seed -1: must be an integer in [0,"]),
    # ... label spaces: finite regression targets, a bounded number of classes ...
    ("regression-label-inf", lambda c: c.argv(task=str(write_rows(c.tmp / "reg.csv", [
        {"text": f"row {i}", "label": v} for i, v in enumerate([0.5, 1.5, "inf", 2.0] * 3)]))),
     ["reg.csv has 3 rows whose `label` is not a finite number (data row 3: inf)"]),
    ("too-many-classes", lambda c: c.argv(task=str(write_rows(c.tmp / "ids.csv", [
        {"text": f"row {i}", "label": f"id{i}"} for i in range(10_001)]))),
     ["ids.csv", "10,001 distinct labels, more than 10,000 classes"]),
    # ... a broken model dir, named by the loader evaluate and model.init_from_hf share (training/model/hf_dir.py)
    ("model-config-truncated", lambda c: c.argv(model=_broken_model(c, "config.json", 50)),
     ["config.json: truncated or corrupt"]),
    ("model-safetensors-truncated", lambda c: c.argv(model=_broken_model(c, "model.safetensors", 4000)),
     ["model.safetensors: truncated or corrupt"]),
    # ... and an output that would write into an input
    ("out-inside-the-model", lambda c: c.argv(_broken_model(c, "", 0), None)[:4] + [
        "--out", str(c.tmp / "broken" / "ft"), "--max-steps", "1"], ["ft is inside --model=", "an input"]),
]


def _broken_model(c, name: str, keep: int) -> Path:
    """A copy of the tiny Post-LN export with `name` cut to `keep` bytes (none: a plain copy)."""
    bad = c.tmp / "broken"
    shutil.copytree(c.models["post"], bad)
    if name:
        (bad / name).write_bytes((bad / name).read_bytes()[:keep])
    return bad


@pytest.fixture(scope="module")
def texts(corpora) -> list[str]:
    return corpora["wiki"][0][:300] + corpora["news"][0][:300]


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in ROWS])
def test_bad_input(row, tmp_path, tiny_models, genre_task, texts, capsys):
    _name, build, expected = row
    case = Case(tmp_path, tiny_models, genre_task, texts)
    argv = build(case)
    before = tree_digest(case.out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        finetune(*argv)
    code, stderr = exc.value.code, capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, f"exit {code}; stderr:\n{stderr[-3000:]}"
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    assert tree_digest(case.out) == before, f"{case.out} changed"


def test_integer_labels_that_are_not_class_ids_are_mapped(tiny_models, tmp_path):
    """An id-like label (10^12) was read as 10^12 + 1 classes and ran out of memory: labels that are not already
    0..K-1 map to class ids in numeric order, their values kept as the label names."""
    rows = [{"text": f"{w} sentence number {i}", "label": v}
            for i, (w, v) in enumerate([("alpha", 10**12), ("beta", 7)] * 20)]
    task = write_rows(tmp_path / "ids.csv", rows)
    out = tmp_path / "out"
    assert finetune("--model", str(tiny_models["post"]), "--task", f"csv:{task}", "--out", str(out),
                    "--max-steps", "1", "--batch-size", "4") == 0
    entry = results(out)["tasks"]["ids"]
    assert entry["num_labels"] == 2 and entry["label_names"] == ["7", "1000000000000"]


def test_glue_offline_is_one_error_line(tiny_models, tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        finetune("--model", str(tiny_models["post"]), "--task", "glue/sst2", "--out", str(out))
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "glue/sst2" in errors[0] and "offline" in errors[0] and "HF_DATASETS_OFFLINE" in errors[0]
    assert not out.exists()


# ---------------------------------------------------------- names, positive class, evaluation, metrics
# Issue 30 item 8: a local task is named after its file (or --task-name), the results say which class F1
# counts as positive, evaluation runs during training and is logged to TensorBoard, and the GLUE metrics are
# scikit-learn's.

def test_a_split_named_file_takes_its_folders_name_and_task_name_wins(tiny_models, tmp_path):
    sst = tmp_path / "sst"
    sst.mkdir()
    train, held = write_genre_task(tmp_path, 40, 10)
    shutil.copy(train, sst / "train.csv")
    shutil.copy(held, sst / "dev.csv")
    out = tmp_path / "ft"
    with pytest.raises(SystemExit) as exit_:  # one name for two tasks: one line, nothing written
        finetune("--model", str(tiny_models["post"]), "--task", f"csv:{sst / 'train.csv'},{sst / 'dev.csv'}",
                 f"csv:{train}", "--task-name", "genre40", "--out", str(out), "--max-steps", "2", "--report-to")
    assert exit_.value.code == 2 and not out.exists()
    assert finetune("--model", str(tiny_models["post"]), "--task", f"csv:{sst / 'train.csv'},{sst / 'dev.csv'}",
                    "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--max-seq-len", "32",
                    "--report-to") == 0
    assert list(results(out)["tasks"]) == ["sst"]  # not "train"
    out2 = tmp_path / "ft2"
    assert finetune("--model", str(tiny_models["post"]), "--task", f"csv:{sst / 'train.csv'},{sst / 'dev.csv'}",
                    "--task-name", "genre_small", "--out", str(out2), "--max-steps", "2", "--batch-size", "8",
                    "--max-seq-len", "32", "--report-to") == 0
    assert list(results(out2)["tasks"]) == ["genre_small"] and (out2 / "genre_small" / "seed0").is_dir()


def test_positive_class_stated_eval_during_training_and_tensorboard(tiny_models, genre_task, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train, held = genre_task
    out = tmp_path / "ft"
    assert finetune("--model", str(tiny_models["post"]), "--task", f"csv:{train},{held}", "--out", str(out),
                    "--max-steps", "20", "--eval-every", "10", "--log-every", "10", "--lr", "1e-3", "--batch-size", "16",
                    "--max-seq-len", "32") == 0
    task = results(out)["tasks"]["genre"]
    assert task["f1_positive_class"] == {"id": 1, "label": "wiki"}  # labels sorted: news 0, wiki 1
    events = list((out / "genre" / "seed0" / "runs").rglob("events.out.tfevents.*"))
    assert events and len({e.parent for e in events}) == 1  # the Trainer's TensorBoard dir of this seed
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    evals = [e.step for e in acc.Scalars("eval/loss")]
    assert evals[:2] == [10, 20]  # during training, every --eval-every steps
    assert "eval/accuracy" in acc.Tags()["scalars"] and "train/loss" in acc.Tags()["scalars"]


def test_metrics_are_scikit_learns():
    from sklearn.metrics import f1_score, matthews_corrcoef

    from training import finetune_tasks as ft

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert ft.f1_binary(p, y) == f1_score(y, p) and ft.matthews_corr(p, y) == matthews_corrcoef(y, p)
