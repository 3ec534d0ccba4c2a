"""`python -m training.evaluate`: the fixed-mask yardstick for a run dir, a checkpoint, an HF export, raw text."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import paths as PATHS
from tests.helpers.corpus import real_text_lines
from tests.helpers.reliability import env, metrics, run_pretrain
from tests.helpers.tiny_run import TINY_MODEL, make_runner, tiny_config

EVAL_ROWS = 8  # the run's evaluation: eval_batches 1 x eval_batch_size 8


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """A finished 4-step fp32 run on the tiny data (its last evaluation at step 4), exported to OUT/hf."""
    import yaml

    root = tmp_path_factory.mktemp("evaluate_run")
    out = root / "run"
    config = {"run": {"out_dir": str(out), "progress": False, "peak_tflops": 1.0, "log_every": 1,
                      "eval_every": 1000, "eval_batches": 1, "eval_batch_size": EVAL_ROWS, "export_hf": True,
                      "report_to": []},
              "data": {"dir": str(tiny_data)},
              "model": {**TINY_MODEL},
              "train": {"precision": "fp32", "micro_batch_size": 4, "max_steps": 4},
              "optimizer": {"warmup_steps": 1}}
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    proc = run_pretrain(root / "run.yaml", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "hf" / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def other_text(tmp_path_factory) -> Path:
    """Prose the run never saw: paragraphs 3000-3400 of the sample (the tiny data has the first 1200)."""
    path = tmp_path_factory.mktemp("evaluate_text") / "other.txt"
    path.write_text("\n".join(real_text_lines(3400)[3000:]) + "\n", encoding="utf-8")
    return path


def evaluate(tmp_path: Path, *args: str, name: str = "eval.json") -> dict:
    from training.evaluate import main

    out = tmp_path / name
    assert main([*args, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def last_eval(run: Path) -> dict:
    return [r for r in metrics(run) if r.get("kind") == "eval"][-1]


def test_run_dir_matches_the_runs_own_evaluation(tiny_run, tiny_data, tmp_path, capsys):
    ev = last_eval(tiny_run)
    assert ev["step"] == 4
    r = evaluate(tmp_path, "--model", str(tiny_run), "--data", str(tiny_data), "--max-rows", str(EVAL_ROWS))
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and "nats below it" in line[0]
    # Perplexity, labelled as the exp of the fixed-mask loss (issue 30 item 7).
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
    assert f"(perplexity {r['perplexity']:.2f}, exp of that loss)" in line[0]
    assert r["rows"] == EVAL_ROWS and r["positions"] > 0
    assert r["model"]["kind"] == "checkpoint" and r["model"]["step"] == 4
    assert r["model"]["checkpoint"].endswith("step00000004")
    assert r["data"]["kind"] == "prepared" and r["data"]["split"] == "heldout" and r["data"]["seq_len"] == 64
    assert Path(r["reference"]["path"]) == tiny_data.absolute()
    assert Path(r["tokenizer"]["path"]) == (tiny_run / "tokenizer").absolute()
    # fp32 in both: the same rows, positions and weights give the run's numbers.
    assert r["loss"] == pytest.approx(ev["heldout_loss"], rel=1e-5, abs=1e-5)
    assert r["accuracy"] == pytest.approx(ev["heldout_acc"], abs=1e-9)
    assert r["unigram_loss"] == pytest.approx(ev["heldout_unigram_loss"], rel=1e-9)
    assert r["below_unigram"] == pytest.approx(ev["heldout_below_unigram"], rel=1e-5, abs=1e-5)
    assert r["below_unigram"] == pytest.approx(r["unigram_loss"] - r["loss"])
    # The checkpoint tag dir resolves to the same model.
    tag = tiny_run / "checkpoints" / (tiny_run / "checkpoints" / "latest").read_text().strip()
    t = evaluate(tmp_path, "--model", str(tag), "--data", str(tiny_data), "--max-rows", str(EVAL_ROWS), name="t.json")
    assert (t["loss"], t["unigram_loss"], t["positions"]) == (r["loss"], r["unigram_loss"], r["positions"])


def test_hf_export_gives_the_run_dirs_numbers(tiny_run, tiny_data, tmp_path):
    run = evaluate(tmp_path, "--model", str(tiny_run), "--data", str(tiny_data), name="run.json")
    hf = evaluate(tmp_path, "--model", str(tiny_run / "hf"), "--data", str(tiny_data), name="hf.json")
    assert hf["model"]["kind"] == "hf" and hf["model"]["step"] is None
    assert hf["rows"] == run["rows"] == run["data"]["rows_available"] > EVAL_ROWS  # the whole held-out split
    assert hf["positions"] == run["positions"]
    assert hf["unigram_loss"] == run["unigram_loss"]
    assert hf["loss"] == pytest.approx(run["loss"], rel=1e-5, abs=1e-5)
    assert hf["accuracy"] == pytest.approx(run["accuracy"], abs=1e-9)


def test_raw_text_is_scored_with_the_runs_tokenizer_and_data(tiny_run, tiny_data, other_text, tmp_path):
    from training.data import tokenizer as tokmod
    from training.data.loader import PretrainingData, fixed_mask_batch, fixed_mask_collator
    from training.data.prepare import pack_text

    r = evaluate(tmp_path, "--model", str(tiny_run), "--data", str(other_text))
    assert r["data"]["kind"] == "text" and r["data"]["seq_len"] == 64
    assert r["data"]["files"] == [str(other_text.absolute())]
    assert r["data"]["documents"] == 400 and r["rows"] == r["data"]["rows_available"] > 50
    # Tokenised with the run's tokenizer (no new one trained): the token count is that tokenizer's.
    tok = tokmod.load(str(tiny_run / "tokenizer"))
    lines = other_text.read_text(encoding="utf-8").splitlines()
    assert r["data"]["tokens"] == sum(len(tok.encode(line, add_special_tokens=False).ids) for line in lines)
    # The unigram table is the run's data (train split), on the fixed positions of these rows.
    assert Path(r["reference"]["path"]) == tiny_data.absolute() and r["reference"]["why"] == "the run's data.dir"
    ids, sep, _ = pack_text([str(other_text)], str(tiny_run / "tokenizer"), 64)
    collator, ref = fixed_mask_collator(str(tiny_run / "tokenizer")), PretrainingData(str(tiny_data))
    labels = [fixed_mask_batch(collator, ids, sep, torch.arange(i, min(len(sep), i + 32)), 64)["labels"]
              for i in range(0, len(sep), 32)]
    assert r["positions"] == sum(int((lab != -100).sum()) for lab in labels)
    assert r["unigram_loss"] == pytest.approx(sum(ref.unigram_nll(lab) for lab in labels) / r["positions"])
    held = evaluate(tmp_path, "--model", str(tiny_run), "--data", str(tiny_data), name="held.json")
    assert r["loss"] != held["loss"] and 0.0 <= r["accuracy"] <= 1.0
    # The HF export needs the reference named; then it scores the same text the same way.
    hf = evaluate(tmp_path, "--model", str(tiny_run / "hf"), "--data", str(other_text), "--reference", str(tiny_data),
                  name="hf.json")
    assert (hf["rows"], hf["positions"], hf["unigram_loss"]) == (r["rows"], r["positions"], r["unigram_loss"])
    assert hf["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-5)


def test_two_evaluations_are_bit_identical(tiny_run, tiny_data, tmp_path):
    args = ["--model", str(tiny_run), "--data", str(tiny_data)]
    evaluate(tmp_path, *args, name="a.json")
    evaluate(tmp_path, *args, name="b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    # The positions are the row's, not the batch's: another batch size scores the same targets.
    a = json.loads((tmp_path / "a.json").read_text())
    c = evaluate(tmp_path, *args, "--batch-size", "3", name="c.json")
    assert c["positions"] == a["positions"]
    assert c["unigram_loss"] == pytest.approx(a["unigram_loss"], rel=1e-12)
    assert c["loss"] == pytest.approx(a["loss"], rel=1e-5)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_run, tiny_data, other_text):
    """Inputs for the bad-input table."""
    root = tmp_path_factory.mktemp("evaluate_bad")
    (root / "empty_dir").mkdir()
    (root / "blank.txt").write_text("\n   \n\n")
    (root / "short.txt").write_text("a few words only\n")
    hf = root / "hf_short_vocab"
    shutil.copytree(tiny_run / "hf", hf)
    (hf / "tokenizer.json").unlink()
    vocab = (hf / "vocab.txt").read_text().splitlines(keepends=True)
    (hf / "vocab.txt").write_text("".join(vocab[:-1]))
    (root / "exists.json").write_text("{}\n")
    (root / "not_data").mkdir()
    (root / "not_data" / "notes.txt").write_text("hello\n")
    # A prepared data dir with its own tokenizer (another vocabulary, also 512 tokens).
    from training.data.prepare import prepare

    corpus = root / "foreign.txt"
    corpus.write_text("\n".join(real_text_lines(2000)[1500:1800]) + "\n")
    prepare([str(corpus)], str(root / "foreign"), seq_len=64, tokenizer="train:512", num_proc=1, quiet=True)
    return root


BAD = [
    ("missing-model", lambda b, run, data, text: ["--model", str(b / "nowhere"), "--data", str(data)],
     ["--model", "no such directory"]),
    ("no-checkpoint", lambda b, run, data, text: ["--model", str(b / "empty_dir"), "--data", str(data)],
     ["no checkpoint found"]),
    ("vocab-size-mismatch", lambda b, run, data, text: ["--model", str(b / "hf_short_vocab"), "--data", str(data)],
     ["vocab_size 512", "511 tokens"]),
    ("reference-vocab-mismatch", lambda b, run, data, text: ["--model", str(run), "--data", str(text),
                                                             "--reference", str(b / "foreign")],
     ["vocabulary", "foreign"]),
    ("data-vocab-mismatch", lambda b, run, data, text: ["--model", str(run), "--data", str(b / "foreign")],
     ["--data", "vocabulary"]),
    ("empty-text", lambda b, run, data, text: ["--model", str(run), "--data", str(b / "blank.txt")],
     ["--data", "empty"]),
    ("text-too-short", lambda b, run, data, text: ["--model", str(run), "--data", str(b / "short.txt")],
     ["--data", "no row of 64 tokens"]),
    ("missing-text-file", lambda b, run, data, text: ["--model", str(run), "--data", str(b / "nothing.txt")],
     ["--data", "no such file"]),
    ("not-a-data-dir", lambda b, run, data, text: ["--model", str(run), "--data", str(b / "not_data")],
     ["no stats.json"]),
    ("hf-text-without-reference", lambda b, run, data, text: ["--model", str(run / "hf"), "--data", str(text)],
     ["--reference"]),
    ("out-exists", lambda b, run, data, text: ["--model", str(run), "--data", str(data),
                                               "--out", str(b / "exists.json")],
     ["exists.json", "--overwrite"]),
]


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in BAD])
def test_bad_input_is_one_error_line_and_writes_nothing(row, bad, tiny_run, tiny_data, other_text, tmp_path, capsys):
    from training.evaluate import main

    name, build, expected = row
    argv = build(bad, tiny_run, tiny_data, other_text)
    out = tmp_path / "result.json"
    if "--out" not in argv:
        argv += ["--out", str(out)]
    before = sorted(p.name for p in tmp_path.iterdir()), (bad / "exists.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2
    assert len(errors) == 1 and captured.err.strip().splitlines()[-1] == errors[0], captured.err[-2000:]
    assert "Traceback" not in captured.err and not captured.out
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    assert (sorted(p.name for p in tmp_path.iterdir()), (bad / "exists.json").read_bytes()) == before


def test_the_command_runs_as_a_module(tiny_run, tiny_data, tmp_path):
    import subprocess
    import sys

    from tests.helpers.reliability import REPO

    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--model", str(tiny_run), "--data",
                           str(tiny_data), "--max-rows", "4"], cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1 and "MLM loss" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "training.evaluate", "--model", str(tmp_path / "nowhere"), "--data",
                           str(tiny_data)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and len(proc.stderr.splitlines()) == 1



def test_the_device_is_the_gpu_when_torch_sees_one_else_the_cpu(monkeypatch):
    from training.errors import UserError
    from training.model_io import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (pick_device("auto"), pick_device("cuda"), pick_device("cpu")) == (
        torch.device("cuda"), torch.device("cuda"), torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu") and pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="--device cuda: torch sees no CUDA GPU"):
        pick_device("cuda")


def test_evaluate_loads_the_model_on_the_picked_device(tiny_run, tiny_data, tmp_path, monkeypatch):
    """--device auto with a GPU in sight asks for the model on CUDA (run here on the CPU: the load is redirected,
    the choice recorded); the result names the device the model really ran on."""
    from training import model_io

    asked = []
    real_load = model_io.load_model

    def load(path, flag="--model", device="cpu"):
        asked.append(torch.device(device))
        return real_load(path, flag, "cpu")

    monkeypatch.setattr(model_io, "load_model", load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    r = evaluate(tmp_path, "--model", str(tiny_run), "--data", str(tiny_data), "--max-rows", "4")
    assert asked == [torch.device("cuda")] and r["device"] == "cpu" and "device_name" not in r
    evaluate(tmp_path, "--model", str(tiny_run), "--data", str(tiny_data), "--max-rows", "4", "--device", "cpu",
             name="cpu.json")
    assert asked[-1] == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_one_error_line(tiny_run, tiny_data, tmp_path, capsys):
    from training.evaluate import main

    with pytest.raises(SystemExit) as exc:
        main(["--model", str(tiny_run), "--data", str(tiny_data), "--device", "cuda", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: --device cuda: torch sees no CUDA GPU")
    assert not (tmp_path / "x").exists()

# -- BLiMP: minimal pairs by pseudo-log-likelihood, beside the count models of the training split

BLIMP = PATHS.DATA / "blimp"


def test_blimp_of_a_run_with_the_count_models_of_its_training_split(tiny_run, tiny_data, tmp_path, capsys):
    r = evaluate(tmp_path, "--model", str(tiny_run), "--blimp", str(BLIMP), "--per-paradigm", "3", "--pll", "both")
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(f"evaluated {tiny_run.absolute()} BLiMP ")
    assert "(pll_word; pll_token " in line[0] and "unigram" in line[0] and "over 4 paradigms, 12 pairs" in line[0]
    b = r["blimp"]
    assert "loss" not in r and r["model"]["kind"] == "checkpoint"
    assert b["scorers"] == ["pll_word", "pll_token", "unigram", "bigram"] and b["primary"] == "pll_word"
    assert (b["paradigms"], b["pairs"]) == (4, 12)
    assert Path(b["count_models_reference"]["path"]) == tiny_data.absolute()  # the run's data.dir
    assert set(b["fields"]) == {"morphology", "semantics", "syntax"} and b["fields"]["morphology"]["paradigms"] == 2
    assert set(b["phenomena"]) == {"anaphor_agreement", "determiner_noun_agreement", "island_effects", "quantifiers"}
    for s in b["scorers"]:  # the headline is the mean over paradigms, each a share of 3 pairs (ties: half)
        per = [p[s] for p in b["per_paradigm_scores"].values()]
        assert b["mean"][s] == pytest.approx(sum(per) / 4)
        assert all(round(6 * v) == 6 * v for v in per)
    # With --data too: the held-out score and BLiMP in one result; the same pairs score the same.
    both = evaluate(tmp_path, "--model", str(tiny_run), "--data", str(tiny_data), "--max-rows", "8", "--blimp",
                    str(BLIMP), "--per-paradigm", "3", name="both.json")
    assert "loss" in both and both["blimp"]["mean"]["pll_word"] == b["mean"]["pll_word"]
    assert both["blimp"]["mean"]["bigram"] == b["mean"]["bigram"]


def test_blimp_of_an_hf_dir_without_training_data_leaves_the_count_models_out(tiny_run, tmp_path, capsys):
    r = evaluate(tmp_path, "--model", str(tiny_run / "hf"), "--blimp", str(BLIMP), "--per-paradigm", "2")
    b = r["blimp"]
    assert b["scorers"] == ["pll_word"] and b["count_models_reference"] is None
    assert "no count models" in b["note"] and "--reference" in b["note"]
    ckpt = evaluate(tmp_path, "--model", str(tiny_run), "--blimp", str(BLIMP), "--per-paradigm", "2", name="c.json")
    assert ckpt["blimp"]["mean"]["pll_word"] == pytest.approx(b["mean"]["pll_word"])  # the export is the model


@pytest.mark.parametrize("argv, message", [
    (["--blimp", "nowhere"], "--blimp nowhere: no such directory"),
    ([], "give --data (held-out score), --blimp (minimal pairs), or both"),
    (["--blimp", str(BLIMP), "--per-paradigm", "0"], "--per-paradigm 0: must be an integer >= 1"),
    (["--blimp", str(BLIMP), "--reference", "nowhere"], "--reference nowhere: not a prepared data dir"),
])
def test_blimp_bad_input_is_one_line(tiny_run, tmp_path, capsys, argv, message):
    from training.evaluate import main

    with pytest.raises(SystemExit) as exit_:
        main(["--model", str(tiny_run), *argv, "--out", str(tmp_path / "x.json")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "x.json").exists()


# ------------------------------------------------------------------------------ the held-out yardstick
# The held-out evaluation measures learning: fixed all-[MASK] positions, scored beside the unigram table.

def test_a_model_that_predicts_token_frequencies_scores_the_unigram_loss(tmp_path, tiny_data, dist_single):
    runner = make_runner(tiny_config(tmp_path, tiny_data, ["run.eval_batches=3"]))
    runner.build()
    module = runner.engine.module
    logp = runner.data.unigram_log_probs()
    with torch.no_grad():  # the transform outputs 0, so the logits are the output bias: the unigram table
        head = module.cls.predictions
        head.transform.LayerNorm.weight.zero_()
        head.transform.LayerNorm.bias.zero_()
        head.bias.copy_(torch.where(torch.isinf(logp), torch.full_like(logp, -1e4), logp).float())
    ev = runner.evaluate()
    assert set(ev) == {"heldout_loss", "heldout_acc", "heldout_unigram_loss", "heldout_below_unigram"}
    assert ev["heldout_loss"] == pytest.approx(ev["heldout_unigram_loss"], abs=1e-4)
    assert abs(ev["heldout_below_unigram"]) < 1e-4
    assert 3.0 < ev["heldout_unigram_loss"] < 7.0  # a 512-token vocabulary on real prose


def test_every_run_is_scored_on_the_same_positions(tiny_data):
    """Data opened with different training masking evaluate on identical targets, batched either way."""
    from training.data.loader import PretrainingData

    a = PretrainingData(tiny_data, mlm_probability=0.4, nsp=True)
    b = PretrainingData(tiny_data, whole_word=True)
    xs, ys = list(a.heldout_batches(8, max_batches=2)), list(b.heldout_batches(4, max_batches=4))
    for key in ("labels", "input_ids", "token_type_ids"):
        assert torch.equal(torch.cat([x[key] for x in xs]), torch.cat([y[key] for y in ys]))


def test_an_evaluation_over_no_target_is_an_error_not_zero(tmp_path, tiny_data, dist_single, monkeypatch):
    from training.errors import UserError

    runner = make_runner(tiny_config(tmp_path, tiny_data))
    runner.build()
    empty = lambda *a, **k: iter(())  # noqa: E731
    monkeypatch.setattr(runner.data, "heldout_batches", empty)
    with pytest.raises(UserError, match="no masked token"):
        runner.evaluate()
