"""Real prose for the test fixtures, from a package every install has: the Wikipedia sample that gensim ships
(the default corpus's source, training/data/wiki.py). Never from ../shared, which a user's clone does not
have, so the suite behaves the same with and without it. Not a test module."""
from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def _paragraphs() -> tuple[str, ...]:
    from training.data.wiki import articles, gensim_dump

    return tuple(p for _title, paragraphs in articles(gensim_dump()) for p in paragraphs)


def real_text_lines(n: int) -> list[str]:
    """The first `n` paragraphs of gensim's Wikipedia sample (about 4,000 in all), one per line."""
    paragraphs = _paragraphs()
    if n > len(paragraphs):
        raise ValueError(f"the gensim sample has {len(paragraphs)} paragraphs, {n} asked for")
    return list(paragraphs[:n])


def write_real_text(path: Path, lines: int) -> Path:
    path.write_text("\n".join(real_text_lines(lines)) + "\n", encoding="utf-8")
    return path
