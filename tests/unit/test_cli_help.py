"""Issue 30 item 3: every flag of every command has help text that shows its default, and every description is
whole (evaluate's stopped mid-sentence); bert-prepare without a sub-command is `prepare`."""
import argparse

import pytest

from training import cli


def _parsers():
    from training.bench.__main__ import build_parser as bench
    from training.data.__main__ import _parser as data
    from training.evaluate import build_parser as evaluate
    from training.export import build_parser as export
    from training.finetune import build_parser as finetune
    from training.pretrain_cli import build_parser as pretrain

    return {"pretrain": pretrain(), "evaluate": evaluate(), "export": export(), "finetune": finetune(),
            "data": data(), "bench": bench()}


@pytest.mark.parametrize("name", ["pretrain", "evaluate", "export", "finetune", "data", "bench"])
def test_every_flag_has_help_with_its_default(name):
    p = _parsers()[name]
    missing, no_default = [], []
    for parser, action in cli.all_actions(p):
        if isinstance(action, argparse._HelpAction):
            continue
        flag = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
        if not action.help:
            missing.append(flag)
            continue
        shown = parser._get_formatter()._get_help_string(action)
        if action.option_strings and not action.required and "default" not in shown.lower():
            no_default.append(flag)
    assert not missing, f"flags without help: {missing}"
    assert not no_default, f"flags whose help shows no default: {no_default}"


@pytest.mark.parametrize("name", ["pretrain", "evaluate", "export", "finetune", "data", "bench"])
def test_the_description_is_whole(name):
    description = _parsers()[name].description
    assert description and description.rstrip().endswith((".", ")")), description


def test_evaluate_help_no_longer_stops_mid_sentence():
    from training.evaluate import build_parser

    assert " ".join(build_parser().description.split()).endswith("cross-entropy on the same positions; and on BLiMP's minimal pairs.")


def test_set_takes_several_pairs_and_repeats():
    from training.pretrain_cli import parse_args

    args = parse_args(["--config", "c.yaml", "--set", "a.b=1", "c.d=2", "--set", "e.f=3"])
    assert args.set == ["a.b=1", "c.d=2", "e.f=3"]


def test_bert_prepare_is_prepare(monkeypatch):
    from training.data import __main__ as data_main

    seen = {}
    monkeypatch.setattr(data_main, "main", lambda argv, prog: seen.update(argv=argv, prog=prog) or 0)
    data_main.prepare_main(["--input", "a.txt"])
    assert seen == {"argv": ["prepare", "--input", "a.txt"], "prog": "bert-prepare"}
    data_main.prepare_main(["build-default", "--out", "d"])
    assert seen["argv"] == ["build-default", "--out", "d"]
