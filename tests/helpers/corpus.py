"""Real prose for the test fixtures, from a package every install has: the Wikipedia sample that gensim ships
(the default corpus's source, training/data/wiki.py). Never from ../shared, which a user's clone does not
have, so the suite behaves the same with and without it. Where gensim is not installed (the GPU machine, which
gets the project's wheels but not gensim's), the same paragraphs come from the copy `build-default` keeps in
data/default/raw/ (`make data`), carried there with the data. Not a test module."""
from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from tests.helpers.paths import REPO

DEFAULT_RAW = REPO / "data" / "default" / "raw" / "enwiki-gensim.txt"


def from_gensim() -> tuple[str, ...]:
    from training.data.wiki import articles, gensim_dump

    return tuple(p for _title, paragraphs in articles(gensim_dump()) for p in paragraphs)


def from_default_raw(path: Path = DEFAULT_RAW) -> tuple[str, ...]:
    """build-default's raw/ file: the sample's paragraphs one per line, a blank line between articles."""
    if not path.is_file():
        raise RuntimeError(f"the tests' prose needs gensim (pip install gensim) or {path} (make data)")
    return tuple(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@functools.cache
def _paragraphs() -> tuple[str, ...]:
    return from_gensim() if importlib.util.find_spec("gensim") is not None else from_default_raw()


def real_text_lines(n: int) -> list[str]:
    """The first `n` paragraphs of gensim's Wikipedia sample (about 4,000 in all), one per line."""
    paragraphs = _paragraphs()
    if n > len(paragraphs):
        raise ValueError(f"the gensim sample has {len(paragraphs)} paragraphs, {n} asked for")
    return list(paragraphs[:n])


def write_real_text(path: Path, lines: int) -> Path:
    path.write_text("\n".join(real_text_lines(lines)) + "\n", encoding="utf-8")
    return path
