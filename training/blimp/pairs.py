"""BLiMP's minimal pairs (Warstadt et al., TACL 2020; CC-BY 4.0): read from a directory of the authors'
`<UID>.jsonl` files (optionally .xz/.gz/.bz2 compressed), or from the hub dataset through `datasets`
(`hf:nyu-mll/blimp`, one config per paradigm, split `train`; offline from the datasets cache), or from a local
dataset directory laid out like it (`hf:PATH`).

A pair is `sentence_good` / `sentence_bad` with its paradigm (`UID`), `field` and phenomenon (`linguistics_term`).
`--per-paradigm N` keeps N pairs of each paradigm, drawn from a generator seeded by the paradigm's name alone: the
same pairs every time, whatever other paradigms are read and in whatever order.
"""
from __future__ import annotations

import bz2
import gzip
import json
import lzma
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.errors import UserError

FIELDS = ("sentence_good", "sentence_bad", "field", "linguistics_term", "UID")
_OPENERS = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}


@dataclass(frozen=True)
class Paradigm:
    uid: str
    field: str
    phenomenon: str
    good: tuple[str, ...]
    bad: tuple[str, ...]
    pair_ids: tuple[int, ...]  # index of each kept pair in the paradigm as published


def _paradigm(uid: str, records: list[dict], where: str, per_paradigm: int | None) -> Paradigm:
    if not records:
        raise UserError(f"{where}: no pairs")
    for i, r in enumerate(records):
        missing = [k for k in FIELDS if not isinstance(r.get(k), str)]
        if missing:
            raise UserError(f"{where}: pair {i} lacks the text field(s) {', '.join(missing)}")
    keep = np.arange(len(records))
    if per_paradigm is not None and per_paradigm < len(records):
        rng = np.random.default_rng(zlib.crc32(uid.encode()))
        keep = np.sort(rng.choice(len(records), per_paradigm, replace=False))
    kept = [records[i] for i in keep]
    # BLiMP's fields are morphology, syntax, semantics and syntax_semantics; one published paradigm spells the last
    # "syntax/semantics": one name, so that its field's mean is over all of them.
    field = kept[0]["field"].replace("/", "_")
    return Paradigm(uid, field, kept[0]["linguistics_term"], tuple(r["sentence_good"] for r in kept),
                    tuple(r["sentence_bad"] for r in kept), tuple(int(i) for i in keep))


def _read_jsonl(path: Path) -> list[dict]:
    opener = _OPENERS.get(path.suffix, open)
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, EOFError, lzma.LZMAError, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"--blimp {path}: not readable as JSON lines ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None


def _uid_of(path: Path) -> str:
    name = path.name
    for suffix in _OPENERS:
        name = name.removesuffix(suffix)
    return name.removesuffix(".jsonl")


def from_dir(directory: Path, per_paradigm: int | None = None) -> list[Paradigm]:
    files = sorted(p for p in directory.iterdir() if _uid_of(p) != p.name and p.is_file())
    if not files:
        raise UserError(f"--blimp {directory}: no <paradigm>.jsonl[.xz|.gz|.bz2] files in it")
    return [_paradigm(_uid_of(p), _read_jsonl(p), f"--blimp {p}", per_paradigm) for p in files]


def from_datasets(name: str, per_paradigm: int | None = None) -> list[Paradigm]:
    """Every config of a `datasets` dataset (hub name or local directory), split train, one paradigm each."""
    import datasets

    try:
        configs = datasets.get_dataset_config_names(name)
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds (offline, not found, bad card)
        raise UserError(f"--blimp hf:{name}: cannot list its configs through datasets ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); offline, it must be in the datasets "
                        "cache") from None
    out = []
    for config in sorted(configs):
        try:
            ds = datasets.load_dataset(name, config, split="train")
        except Exception as err:  # noqa: BLE001
            raise UserError(f"--blimp hf:{name} ({config}): cannot load split train ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
        out.append(_paradigm(config, [dict(r) for r in ds], f"--blimp hf:{name} ({config})", per_paradigm))
    return out


def load(source: str, per_paradigm: int | None = None) -> list[Paradigm]:
    """The paradigms of `source`: a directory of jsonl files, or `hf:NAME_OR_DIR` through `datasets`."""
    if source.startswith("hf:"):
        return from_datasets(source[3:], per_paradigm)
    path = Path(source)
    if not path.is_dir():
        raise UserError(f"--blimp {source}: no such directory (want a folder of <paradigm>.jsonl[.xz] files, or "
                        "hf:nyu-mll/blimp)")
    return from_dir(path, per_paradigm)
