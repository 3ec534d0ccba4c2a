"""What every command line of this project shares: the parser (each flag's help shows its default, the
description is the module docstring's first paragraph, whole), `--set KEY=VALUE ...` and the nearest-name
suggestion for a mistyped name.

argparse's ArgumentDefaultsHelpFormatter appends "(default: X)" to every help text, also "(default: None)" to
a required flag and "(default: False)" to a switch; the formatter here says it the way a user reads it:
nothing for a required flag, "default: off" for a switch, and leaves a help text that already states its
default as it is.
"""
from __future__ import annotations

import argparse
import difflib
from typing import Iterable, Optional


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks; shows each optional flag's default (see the module docstring)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if "default" in text.lower() or "%(default)" in text:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            shown = "on" if action.default else "off"
        elif action.default is None or action.default == []:
            shown = "none"
        elif isinstance(action.default, (list, tuple)):
            shown = " ".join(map(str, action.default))
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def description(doc: Optional[str]) -> str:
    """The docstring's first paragraph, whole (not its first line, which may stop mid-sentence)."""
    import textwrap

    paragraph = (doc or "").strip().split("\n\n")[0]
    return textwrap.fill(" ".join(paragraph.split()), width=100)


def parser(prog: str, doc: Optional[str], epilog: Optional[str] = None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser with this project's formatter; `doc` is usually the module's __doc__. Started as one of
    the installed commands (bert-pretrain, ...), the usage line names that command instead of `prog`."""
    import os
    import sys

    command = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return argparse.ArgumentParser(prog=command if command.startswith("bert-") else prog, description=description(doc), epilog=epilog,
                                   formatter_class=HelpFormatter, **kwargs)


def add_subparser(sub, name: str, help_text: str, doc: Optional[str] = None) -> argparse.ArgumentParser:
    """A sub-command with the same formatter (argparse does not pass it on to sub-parsers)."""
    return sub.add_parser(name, help=help_text, description=description(doc) or help_text,
                          formatter_class=HelpFormatter)


def add_set(p: argparse.ArgumentParser, example: str = "train.max_steps=100 optimizer.lr=1e-3") -> None:
    """`--set KEY=VALUE [KEY=VALUE ...]`, repeatable: every pair goes into one list, in order."""
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=f"override config values (YAML values, dotted keys), several at once, e.g. --set {example}; "
                        "repeatable, later ones win")


def nearest(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> Optional[str]:
    """The candidate closest to a mistyped `name` (difflib's ratio), or None when none is close."""
    found = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return found[0] if found else None


def all_actions(p: argparse.ArgumentParser):
    """(parser, action) for every flag of `p` and of its sub-commands (tests check each has help)."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_actions(sub)
        elif action.help is not argparse.SUPPRESS:
            yield p, action
