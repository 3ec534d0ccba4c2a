"""Issue 30 item 4: documents are split as the user asked (--doc-sep), a held-out share far from the asked one is
warned about, and hf:DIR takes a Dataset.save_to_disk folder; prepare and build-default share the held-out
default."""
import json

import pytest

from tests.helpers.corpus import write_real_text
from training.data.prepare import DEFAULT_HELDOUT_FRACTION, prepare
from training.data.sources import choose_doc_sep


@pytest.fixture(scope="module")
def one_blank_line(tmp_path_factory):
    """The report's file: one paragraph per line, with a single blank line in the middle."""
    path = tmp_path_factory.mktemp("docsep") / "paragraphs.txt"
    write_real_text(path, 400)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:200] + [""] + lines[200:]) + "\n")
    return path


def _prepare(src, out, capsys, **kwargs):
    stats = prepare([str(src)], str(out), 64, "train:512", num_proc=1, **kwargs)
    return stats, capsys.readouterr().err


def test_auto_keeps_one_document_per_line_and_says_so(one_blank_line, tmp_path, capsys):
    stats, err = _prepare(one_blank_line, tmp_path / "d", capsys, heldout_fraction=0.01)
    assert stats["doc_sep"] == {str(one_blank_line): "line"}
    assert stats["documents"]["train"] + stats["documents"]["heldout"] == 400
    assert "--doc-sep auto: " in err and "one document per line" in err
    assert "warning: the held-out split" not in err
    saved = json.loads((tmp_path / "d" / "stats.json").read_text())
    assert saved["doc_sep"] == stats["doc_sep"] and saved["heldout_share"] < 0.04


def test_blank_as_asked_and_a_warning_for_the_held_out_share(one_blank_line, tmp_path, capsys):
    stats, err = _prepare(one_blank_line, tmp_path / "d", capsys, heldout_fraction=0.01, doc_sep="blank")
    assert stats["documents"]["train"] + stats["documents"]["heldout"] == 2  # what auto did before, silently
    assert stats["heldout_share"] > 0.3
    assert "warning: the held-out split holds" in err and "not the 1.0% --heldout-fraction asks for" in err


def test_auto_takes_blank_line_documents_when_they_are_documents(tmp_path):
    path = tmp_path / "blocks.txt"
    path.write_text("".join(f"line one of doc {i}\nline two of doc {i}\n\n" for i in range(30)))
    assert choose_doc_sep(str(path))[0] == "blank"
    assert choose_doc_sep(str(path), "line")[0] == "line"


def test_hf_input_takes_a_dataset_saved_to_disk(tmp_path, capsys):
    import datasets

    texts = [" ".join(f"word{(i * 7 + j) % 50}" for j in range(40)) for i in range(60)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    stats = prepare([f"hf:{tmp_path / 'saved'}"], str(tmp_path / "d"), 32, "train:128", num_proc=1, quiet=True)
    assert stats["documents"]["train"] + stats["documents"]["heldout"] == 60


def test_prepare_and_build_default_agree_on_the_held_out_default():
    import inspect

    from training.data.__main__ import _parser
    from training.data.wiki import build_default

    p = _parser()
    prep = p.parse_args(["prepare", "--input", "x", "--out", "o", "--seq-len", "8", "--tokenizer", "train:8"])
    bd = p.parse_args(["build-default", "--out", "o"])
    assert prep.heldout_fraction == bd.heldout_fraction == DEFAULT_HELDOUT_FRACTION == 0.05
    assert inspect.signature(prepare).parameters["heldout_fraction"].default == DEFAULT_HELDOUT_FRACTION
    assert inspect.signature(build_default).parameters["heldout_fraction"].default is None  # -> the same constant
