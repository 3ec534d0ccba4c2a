"""Bad input, round three (issue 29), run as tests/integration/test_bad_input.py runs its rows: one `error:` line naming the
field or file, exit 2, the row's out dir untouched.

* No command writes over its own inputs: evaluate's --out against its --data and its model's files, export's
  --out inside its --tokenizer, prepare's --out inside its tokenizer dir, a run's out dir inside its data dir or
  writing its model.init_from_hf, all resolved through links (outdir.check_no_clash). In each row the input at
  risk lives in the row's out dir, so "untouched" is the proof that nothing was written over it.
* A broken Hugging Face model dir (truncated or non-object config.json, no vocab_size, a truncated safetensors
  file) is named by evaluate and by model.init_from_hf (training/model/hf_dir.py; finetune's rows are in
  tests/integration/test_finetune.py).
* A data file changed in place (same size) or holding a token id outside the vocabulary is named when a run or
  evaluate opens it (training/data/verify.py).
* Nonsense is refused: non-finite or out-of-range numbers (training/cli_types.py), a tokenizer of another size
  at export, a non-string `text` column, a stage in tokens whose warmup is longer than the stage.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.integration.test_bad_input import (Case, _bad_data, _parquet, _prepare, _set, _write, check_row, good_run,  # noqa: F401
                                  in_process, truncate)
from tests.helpers.reliability import tiny_data  # noqa: F401


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory, good_run) -> Path:  # noqa: F811
    """The good run exported as a Hugging Face dir (never modified: rows copy it)."""
    from training.export import main

    out = tmp_path_factory.mktemp("good_hf") / "hf"
    assert main(["--checkpoint", str(good_run), "--out", str(out)]) == 0
    return out


class HFCase(Case):
    hf: Path

    def copy_hf(self) -> Path:
        shutil.copytree(self.hf, self.out)
        return self.out


def _text(c: Case, where: Path) -> Path:
    where.parent.mkdir(parents=True, exist_ok=True)
    return _write(where, b"The quick brown fox jumps over the lazy dog. " * 40 + b"\n")


def _link(path: Path, target: Path) -> Path:
    path.symlink_to(target)
    return path


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01
    path.write_bytes(bytes(data))


def _id_out_of_range(d: Path) -> None:
    """The first token of the first train row set to 300 (vocab 256), written back in place, and the digests
    dropped from stats.json (as a data dir prepared before them would be): only the range check can see it."""
    import pyarrow as pa

    path = d / "train" / "data-00000-of-00001.arrow"
    table = pa.ipc.open_stream(path.read_bytes()).read_all()  # in memory: the file is rewritten below
    ids = table.column("input_ids").combine_chunks()
    values = ids.values.to_numpy(zero_copy_only=False).copy()
    values[1] = 300
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(values, type=ids.type.value_type), ids.type.list_size)
    table = table.set_column(0, "input_ids", fixed)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    stats = json.loads((d / "stats.json").read_text())
    del stats["digests"]
    (d / "stats.json").write_text(json.dumps(stats))


def _other_vocab(c: Case) -> Path:
    tok = c.tmp / "other-tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("".join(f"t{i}\n" for i in range(100)))
    return tok


def _evaluate(c: Case, *args: str) -> list[str]:
    return ["evaluate", "--model", str(c.good_run), "--data", str(c.data), *args]


TWO_STAGES_IN_TOKENS = [{"name": "a", "steps": 4}, {"name": "b", "tokens": 256, "warmup_steps": 50}]

ROWS = [
    # -- 1. no command writes over its own inputs
    ("evaluate-out-is-its-data-text", lambda c: ["evaluate", "--model", str(c.good_run), "--data",
                                                 str(_text(c, c.out / "text.txt")), "--out", str(c.out / "text.txt"),
                                                 "--overwrite"],
     ["--out", "text.txt is --data=", "an input of this command"], "subprocess"),
    ("evaluate-out-is-a-link-to-its-data", lambda c: ["evaluate", "--model", str(c.good_run), "--data",
                                                      str(_text(c, c.out / "text.txt")), "--out",
                                                      str(_link(c.tmp / "result.json", c.out / "text.txt")),
                                                      "--overwrite"],
     ["result.json is --data=", "text.txt"], "inproc"),
    ("evaluate-out-is-the-models-config", lambda c: ["evaluate", "--model", str(c.copy_hf()), "--data", str(c.data),
                                                     "--out", str(c.out / "config.json"), "--overwrite"],
     ["config.json is inside --model=", "an input"], "inproc"),
    ("evaluate-out-is-the-runs-resolved-config", lambda c: (c.copy_run(), [
        "evaluate", "--model", str(c.out), "--data", str(c.data), "--out", str(c.out / "config.resolved.json"),
        "--overwrite"])[1], ["config.resolved.json is --model config.resolved.json="], "inproc"),
    ("evaluate-out-inside-the-runs-checkpoints", lambda c: (c.copy_run(), [
        "evaluate", "--model", str(c.out), "--data", str(c.data), "--out", str(c.out / "checkpoints" / "e.json")])[1],
     ["e.json is inside --model checkpoints="], "inproc"),
    ("evaluate-out-inside-its-data-dir", lambda c: (shutil.copytree(c.data, c.out), [
        "evaluate", "--model", str(c.good_run), "--data", str(c.out), "--out", str(c.out / "eval.json")])[1],
     ["eval.json is inside --data="], "inproc"),
    ("export-out-inside-its-tokenizer", lambda c: (shutil.copytree(c.data / "tokenizer", c.out), [
        "export", "--checkpoint", str(c.good_run), "--tokenizer", str(c.out), "--out", str(c.out / "hf")])[1],
     ["hf is inside --tokenizer="], "inproc"),
    ("prepare-out-inside-its-tokenizer", lambda c: (shutil.copytree(c.data / "tokenizer", c.out), [
        "prepare", "prepare", "--input", str(_text(c, c.tmp / "c.txt")), "--out", str(c.out / "data"),
        "--seq-len", "16", "--tokenizer", str(c.out), "--num-proc", "1"])[1],
     ["data is inside --tokenizer="], "inproc"),
    ("run-out-inside-its-data-dir", lambda c: (shutil.copytree(c.data, c.out), c.cfg().pretrain(
        *_set(f"data.dir={c.out}", f"run.out_dir={c.out / 'run'}")))[1],
     ["run.out_dir", "run is inside data.dir="], "inproc"),
    ("resume-would-export-over-its-init-from-hf", lambda c: (c.copy_run(), shutil.copytree(c.hf, c.out / "hf"),
                                                             c.cfg().pretrain("--resume", *_set(
                                                                 f"model.init_from_hf={c.out / 'hf'}")))[2],
     ["run.out_dir", "hf is model.init_from_hf="], "inproc"),
    # -- 3. broken Hugging Face model dirs, one loader (training/model/hf_dir.py)
    ("evaluate-hf-config-truncated", lambda c: (truncate(c.copy_hf() / "config.json", 60), [
        "evaluate", "--model", str(c.out), "--data", str(c.data)])[1],
     ["config.json: truncated or corrupt, not valid JSON"], "subprocess"),
    ("evaluate-hf-config-not-an-object", lambda c: ((c.copy_hf() / "config.json").write_text("[1, 2]"), [
        "evaluate", "--model", str(c.out), "--data", str(c.data)])[1],
     ["config.json: corrupt, a JSON list instead of an object"], "inproc"),
    ("evaluate-hf-config-without-vocab-size", lambda c: (_edit_json(c.copy_hf() / "config.json", vocab_size=None), [
        "evaluate", "--model", str(c.out), "--data", str(c.data)])[1],
     ["config.json: vocab_size is missing"], "inproc"),
    ("evaluate-hf-safetensors-truncated", lambda c: (truncate(c.copy_hf() / "model.safetensors", 5000), [
        "evaluate", "--model", str(c.out), "--data", str(c.data)])[1],
     ["model.safetensors: truncated or corrupt"], "inproc"),
    ("init-from-hf-config-truncated", lambda c: (truncate(c.copy_hf() / "config.json", 60), c.cfg().pretrain(
        *_set(f"model.init_from_hf={c.out}", f"run.out_dir={c.tmp / 'run'}")))[1],
     ["config.json: truncated or corrupt"], "inproc"),
    ("init-from-hf-safetensors-truncated", lambda c: (truncate(c.copy_hf() / "model.safetensors", 5000),
                                                      c.cfg().pretrain(*_set(f"model.init_from_hf={c.out}",
                                                                             f"run.out_dir={c.tmp / 'run'}")))[1],
     ["model.safetensors: truncated or corrupt"], "subprocess"),
    # -- 4. data files verified when a run opens them
    ("data-train-arrow-changed-in-place", lambda c: _bad_data(c, lambda d: _flip(
        d / "train" / "data-00000-of-00001.arrow")),
     ["train/data-00000-of-00001.arrow: corrupt (its xxh3_128 digest differs"], "subprocess"),
    ("data-tokenizer-changed-in-place", lambda c: _bad_data(c, lambda d: _flip(d / "tokenizer" / "tokenizer.json")),
     ["tokenizer/tokenizer.json: corrupt"], "inproc"),
    ("data-token-id-out-of-range", lambda c: _bad_data(c, _id_out_of_range),
     ["train/data-00000-of-00001.arrow: token id 300 is outside the vocabulary [0, 256)"], "inproc"),
    ("evaluate-data-changed-in-place", lambda c: (shutil.copytree(c.data, c.tmp / "data"),
                                                  _flip(c.tmp / "data" / "heldout" / "data-00000-of-00001.arrow"),
                                                  _evaluate(c)[:-1] + [str(c.tmp / "data")])[2],
     ["heldout/data-00000-of-00001.arrow: corrupt"], "inproc"),
    # -- 6. nonsense refused: numbers on every command line (training/cli_types.py) ...
    ("prepare-seed-negative", lambda c: _prepare(c, _text(c, c.tmp / "c.txt")) + ["--seed", "-1"],
     ["--seed -1: must be an integer in [0, 4294967295]"], "subprocess"),
    ("prepare-seq-len-huge", lambda c: _prepare(c, _text(c, c.tmp / "c.txt"))[:6] + [
        "--seq-len", "99999999999", "--tokenizer", "train:128"], ["--seq-len 99999999999: must be an integer in [8,"],
     "inproc"),
    ("prepare-heldout-fraction-nan", lambda c: _prepare(c, _text(c, c.tmp / "c.txt")) + ["--heldout-fraction", "nan"],
     ["--heldout-fraction nan: must be a finite number >= 0 and < 1"], "inproc"),
    ("prepare-tokenizer-vocab-huge", lambda c: _prepare(c, _text(c, c.tmp / "c.txt"), tokenizer="train:99999999999"),
     ["--tokenizer train:99999999999: vocab size must be in [64,"], "inproc"),
    ("build-default-seed-too-big", lambda c: ["prepare", "build-default", "--out", str(c.out), "--seed", "4294967296"],
     ["--seed 4294967296"], "inproc"),
    ("evaluate-batch-size-inf", lambda c: _evaluate(c, "--batch-size", "inf"),
     ["--batch-size inf: must be an integer in [1,"], "inproc"),
    ("evaluate-seq-len-huge", lambda c: _evaluate(c, "--seq-len", "1e9"), ["--seq-len 1e9: must be an integer"],
     "inproc"),
    ("run-lock-wait-inf", lambda c: c.cfg().pretrain("--lock-wait", "inf"),
     ["--lock-wait inf: must be a finite number >= 0"], "inproc"),
    # ... a tokenizer of another size at export, non-string text columns, a warmup longer than its stage
    ("export-tokenizer-of-another-vocab", lambda c: ["export", "--checkpoint", str(c.good_run), "--tokenizer",
                                                     str(_other_vocab(c)), "--out", str(c.out)],
     ["other-tok has 100 tokens but the model's vocab_size is 256"], "subprocess"),
    ("corpus-parquet-int-text", lambda c: _prepare(c, _parquet(c.tmp / "n.parquet", text=[1, 2, 3] * 30)),
     ["n.parquet: column 'text' holds int64, not text"], "inproc"),
    ("corpus-parquet-list-text", lambda c: _prepare(c, _parquet(c.tmp / "l.parquet", text=[["a", "b"]] * 30)),
     ["l.parquet: column 'text' holds list<element: string>, not text"], "inproc"),
    ("corpus-jsonl-object-text", lambda c: _prepare(c, _write(c.tmp / "o.jsonl", b'{"text": {"a": 1}}\n' * 30)),
     ["o.jsonl:1: field 'text' is not a string"], "inproc"),
    ("corpus-hf-int-text", lambda c: _prepare(c, f"hf:{_parquet(c.tmp / 'h.parquet', text=[7, 8, 9] * 30)}"),
     ["h.parquet: column 'text' is Value('int64'), not text"], "inproc"),
    ("stage-in-tokens-shorter-than-its-warmup",  # (no train.max_steps: it would scale, and refuse, the stages)
     lambda c: c.cfg(stages=TWO_STAGES_IN_TOKENS).pretrain(*_set("train.max_steps=null")),
     ["stages.1.warmup_steps=50 exceeds stages.1.tokens=256 (1 optimizer steps", "stage 'b'"], "inproc"),
]


def test_the_table_covers_every_item():
    assert len({r[0] for r in ROWS}) == len(ROWS) >= 30


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in ROWS])
def test_bad_input(row, tmp_path, tiny_data, good_run, good_hf, in_process, capsys):  # noqa: F811
    case = HFCase(tmp_path, tiny_data, good_run)
    case.hf = good_hf
    check_row(row, case, capsys)


def test_a_data_dir_prepared_before_digests_still_loads_with_a_warning(tmp_path, tiny_data, caplog):  # noqa: F811
    from training.data.loader import PretrainingData

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    stats = json.loads((data / "stats.json").read_text())
    assert stats["digests"]["algorithm"] == "xxh3_128"
    assert set(stats["digests"]["files"]) >= {"train/data-00000-of-00001.arrow", "heldout/data-00000-of-00001.arrow",
                                              "tokenizer/vocab.txt"}
    del stats["digests"]
    (data / "stats.json").write_text(json.dumps(stats))
    with caplog.at_level("WARNING"):
        assert PretrainingData(str(data)).num_train_rows == stats["rows"]["train"]
    assert "records no file digests" in caplog.text and "not verified" in caplog.text


def test_the_cli_number_types_refuse_what_argparse_would_take():
    from training import cli_types
    from training.errors import UserError

    assert cli_types.positive_float("--lr")("2e-5") == 2e-5 and cli_types.seed()("4294967295") == 2**32 - 1
    assert cli_types.seq_len()("512") == 512 and cli_types.fraction("--f")("0") == 0.0
    for parse, text in [(cli_types.positive_float("--lr"), "inf"), (cli_types.positive_float("--lr"), "nan"),
                        (cli_types.positive_float("--lr"), "0"), (cli_types.non_negative_float("--w"), "-1e-9"),
                        (cli_types.seed(), "-1"), (cli_types.seed(), "4294967296"), (cli_types.seed(), "1.5"),
                        (cli_types.seq_len(), "7"), (cli_types.seq_len(), "65537"), (cli_types.fraction("--f"), "1"),
                        (cli_types.positive_int("--n"), "1e3"), (cli_types.positive_int("--n", 10), "11")]:
        with pytest.raises(UserError, match=f"^--[a-z-]+ {text}: must be "):
            parse(text)
