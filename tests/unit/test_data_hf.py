"""prepare --input hf:...: `datasets.load_dataset(..., streaming=True)` inputs, mixed with local files.

Nothing here reaches the hub: the datasets are local (a parquet file, a directory of jsonl) loaded by the same
`load_dataset` call a hub name goes through, and the hub case is the offline error."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.helpers.corpus import real_text_lines
from tests.helpers.data import MINILM, load_split, quiet_prepare, write_lines
from training.data import hf_input
from training.errors import UserError


@pytest.fixture
def streamed(monkeypatch):
    """Record every `datasets.load_dataset` call (the generator runs in this process with num_proc 1)."""
    import datasets

    calls = []
    real = datasets.load_dataset

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def write_parquet(path, texts, column="text", **other):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({column: texts, **other}), path)
    return path


@pytest.mark.parametrize("spec, want", [
    ("hf:wikitext/wikitext-103-raw-v1:train", ("wikitext", "wikitext-103-raw-v1", "train")),
    ("hf:wikitext/wikitext-2-raw-v1", ("wikitext", "wikitext-2-raw-v1", "train")),
    ("hf:allenai/c4/en:validation", ("allenai/c4", "en", "validation")),
    ("hf:HuggingFaceFW/fineweb-edu/", ("HuggingFaceFW/fineweb-edu", None, "train")),
    ("hf:HuggingFaceFW/fineweb-edu/sample-10BT:train", ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train")),
    ("hf:bookcorpus", ("bookcorpus", None, "train")),
    ("hf:bookcorpus:test", ("bookcorpus", None, "test")),
])
def test_parse_hub_names(spec, want):
    inp = hf_input.parse(spec)
    assert (inp.name, inp.config, inp.split) == want and inp.path is None and inp.spec == spec


def test_parse_local_paths_and_bad_specs(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    monkeypatch.chdir(tmp_path)
    assert hf_input.parse("hf:d").path == str(tmp_path / "d")
    inp = hf_input.parse("hf:d:test")
    assert (inp.path, inp.split, inp.spec) == (str(tmp_path / "d"), "test", f"hf:{tmp_path / 'd'}:test")
    assert hf_input.parse(f"hf:{tmp_path}/d").spec == f"hf:{tmp_path / 'd'}"
    for spec, match in [("hf:", "empty dataset name"), ("hf:./nope", "no such file or directory"),
                        ("hf:a/b/c/d", "cannot parse"), ("hf:x:", "empty split"), ("hf:/a//b", "no such file")]:
        with pytest.raises(UserError, match=match):
            hf_input.parse(spec)


def test_parquet_stream_mixed_with_text_equals_text_files(tmp_path, streamed):
    """A parquet of real paragraphs via hf:PATH plus a .txt: the same documents, tokens and rows, byte for byte,
    as the same paragraphs given as .txt files; held-out split by document in both."""
    lines = real_text_lines(500)
    parquet = write_parquet(tmp_path / "wiki.parquet", lines[:350], id=list(range(350)))
    rest = write_lines(tmp_path / "rest.txt", lines[350:])
    first = write_lines(tmp_path / "first.txt", lines[:350])
    kw = dict(seq_len=64, tokenizer=MINILM, heldout_fraction=0.05, seed=2)
    got = quiet_prepare([f"hf:{parquet}", rest], tmp_path / "hf", **kw)
    # resolved (and its column checked) up front, then streamed once by the document generator
    assert len(streamed) == 2 and all(k.get("streaming") is True for _, k in streamed), streamed
    assert streamed[0][0] == ("parquet",) and streamed[0][1]["data_files"] == {"train": str(parquet)}
    want = quiet_prepare([first, rest], tmp_path / "txt", **kw)
    for key in ("documents", "tokens", "rows", "dropped_tokens", "replaced_bytes"):
        assert got[key] == want[key], key
    assert got["documents"]["train"] + got["documents"]["heldout"] == 500 and got["documents"]["heldout"] > 0
    assert got["input_files"] == [f"hf:{parquet}", rest] and got["text_column"] == "text"
    assert "text_column" not in want
    for split in ("train", "heldout"):
        for a, b in zip(load_split(str(tmp_path / "hf"), split), load_split(str(tmp_path / "txt"), split)):
            np.testing.assert_array_equal(a, b)
    assert json.load(open(tmp_path / "hf" / "stats.json"))["input_files"][0] == f"hf:{parquet}"


def test_missing_text_column_names_the_columns(tmp_path):
    parquet = write_parquet(tmp_path / "p.parquet", real_text_lines(20), column="content", id=list(range(20)))
    with pytest.raises(UserError) as info:
        quiet_prepare([f"hf:{parquet}"], tmp_path / "o", seq_len=16, tokenizer="train:100")
    msg = str(info.value)
    assert msg.startswith(f"--input hf:{parquet}: no column 'text'") and "'content', 'id'" in msg, msg
    assert "--text-column" in msg and "\n" not in msg
    with pytest.raises(UserError, match="column 'id' is Value"):
        quiet_prepare([f"hf:{parquet}"], tmp_path / "o", seq_len=16, tokenizer="train:100", text_column="id")
    assert sorted(os.listdir(tmp_path)) == ["p.parquet"]


def test_overwrite_refuses_an_out_holding_a_local_hf_input(tmp_path):
    out = tmp_path / "o"
    quiet_prepare([write_lines(tmp_path / "c.txt", real_text_lines(60))], out, seq_len=32, tokenizer=MINILM)
    parquet = write_parquet(out / "mine.parquet", real_text_lines(60))
    with pytest.raises(UserError, match=r"contains --input=.*mine\.parquet"):
        quiet_prepare([f"hf:{parquet}"], out, seq_len=32, tokenizer=MINILM, overwrite=True)
    assert parquet.is_file()


def test_dataset_directory_with_text_column_trains_a_tokenizer(tmp_path, streamed):
    """A directory of jsonl (field `body`) through the CLI: --text-column, train:N, --max-docs stops the stream."""
    from training.data.__main__ import main

    lines = real_text_lines(400)
    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    with open(ds_dir / "part-0.jsonl", "w") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": i, "body": line}) + "\n")
    out = tmp_path / "out"
    assert main(["prepare", "--input", f"hf:{ds_dir}:train", "--text-column", "body", "--out", str(out),
                 "--seq-len", "48", "--tokenizer", "train:300", "--heldout-fraction", "0.1", "--max-docs", "250",
                 "--num-proc", "1"]) == 0
    assert streamed and all(args == (str(ds_dir),) and k["streaming"] is True and k["split"] == "train"
                            for args, k in streamed)
    stats = json.load(open(out / "stats.json"))
    assert stats["documents"]["train"] + stats["documents"]["heldout"] == 250
    assert stats["documents"]["heldout"] > 0 and stats["rows"]["heldout"] > 0
    assert stats["input_files"] == [f"hf:{ds_dir}:train"] and stats["text_column"] == "body"
    assert 200 < stats["vocab_size"] <= 300 and (out / "tokenizer" / "vocab.txt").is_file()
