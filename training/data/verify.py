"""Prepared data dirs verified when a run opens them: per-file digests recorded at `prepare` time, and token ids
inside the vocabulary.

`prepare` records in stats.json, under `digests`, the size and the xxh3-128 digest of every file of `train/`,
`heldout/` and `tokenizer/` (`record`). Every open (a run's PretrainingData, `training.evaluate --data`) checks
them (`check`): a missing file, another size, or another digest (a byte changed in place, which row counts and
sizes cannot see) is one UserError naming the file. xxh3 (the `xxhash` package `datasets` depends on) runs at
memory speed, so the check costs what reading the files costs (docs/reliability.md gives the time on the default
data); it is not a defence against someone forging a file, only against damage. Data dirs prepared before the
digests were recorded still load, with a warning that they are not verified.

`check_ids`: every token id of a split lies in [0, vocab_size): an id outside (damage the digests did not see, or
a data dir written by other tools) would index past the embedding table deep inside a step, or score garbage.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import numpy as np

from training.errors import UserError

log = logging.getLogger(__name__)

ALGORITHM = "xxh3_128"
PARTS = ("train", "heldout", "tokenizer")
PREPARE_AGAIN = "prepare the data dir again (`python -m training.data prepare`)"
_CHUNK = 8 << 20


def file_digest(path: str) -> str:
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(data_dir: str) -> list[str]:
    """Every file under the verified parts, as paths relative to `data_dir` with `/` separators, sorted."""
    out = []
    for part in PARTS:
        for root, _dirs, names in os.walk(os.path.join(data_dir, part)):
            out += [os.path.relpath(os.path.join(root, n), data_dir).replace(os.sep, "/") for n in names]
    return sorted(out)


def record(data_dir: str) -> dict:
    """The `digests` entry of stats.json for the files now in `data_dir`."""
    files = {rel: {"size": os.path.getsize(os.path.join(data_dir, rel)),
                   "digest": file_digest(os.path.join(data_dir, rel))} for rel in _files(data_dir)}
    return {"algorithm": ALGORITHM, "files": files}


def check(data_dir: str, stats: dict) -> None:
    """Every file `stats["digests"]` lists is there, with its size and digest (UserError naming the first that
    is not); without digests (older data dirs), a warning."""
    stats_path = os.path.join(data_dir, "stats.json")
    digests = stats.get("digests")
    if digests is None:
        log.warning("%s records no file digests (prepared before they were recorded): its files are not verified; "
                    "prepare it again to have them checked", stats_path)
        return
    files = digests.get("files") if isinstance(digests, dict) else None
    if digests.get("algorithm") != ALGORITHM or not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("digest"), str)
            for v in files.values()):
        raise UserError(f"{stats_path}: digests is damaged (want algorithm {ALGORITHM} and files: {{path: {{size, "
                        f"digest}}}}); {PREPARE_AGAIN}")
    for rel, want in sorted(files.items()):
        path = os.path.join(data_dir, *rel.split("/"))
        try:
            size = os.path.getsize(path)
        except OSError:
            raise UserError(f"{path}: missing (stats.json lists it); {PREPARE_AGAIN}") from None
        if size != want["size"]:
            raise UserError(f"{path}: truncated or corrupt ({size:,} bytes, but stats.json recorded "
                            f"{want['size']:,}); {PREPARE_AGAIN}")
        if file_digest(path) != want["digest"]:
            raise UserError(f"{path}: corrupt (its {ALGORITHM} digest differs from the one stats.json recorded "
                            f"when it was prepared); {PREPARE_AGAIN}")


def check_ids(split_dir: str, ids: np.ndarray, vocab_size: int) -> None:
    """Every id of a split's rows is in [0, vocab_size); else a UserError naming the file that holds one."""
    if ids.size == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if 0 <= low and high < vocab_size:
        return
    bad = high if high >= vocab_size else low
    raise UserError(f"{_file_with_id(split_dir, bad) or split_dir}: token id {bad} is outside the vocabulary "
                    f"[0, {vocab_size}) of stats.json; corrupt or from another tokenizer; {PREPARE_AGAIN}")


def _file_with_id(split_dir: str, value: int) -> Optional[str]:
    """The .arrow file of `split_dir` holding token id `value` (the slow path, after a range check failed)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name in sorted(os.listdir(split_dir)):
        if not name.endswith(".arrow"):
            continue
        path = os.path.join(split_dir, name)
        with pa.memory_map(path) as source:
            column = pa.ipc.open_stream(source).read_all().column("input_ids")
        values = pc.list_flatten(column)
        if len(values) and pc.any(pc.equal(values, value)).as_py():
            return path
    return None
