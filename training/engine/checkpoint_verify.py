"""Finding and verifying the checkpoints training/engine/checkpoint.py writes: which tag `latest` names, the
meta.json manifest check, the fall-back past a corrupt newest checkpoint, and quarantine.

Integrity: the manifest in meta.json records every file's size and SHA-256 (hashed once, by rank 0, right
after the files were written, while they are still in the page cache). Loading checks every file against
it before DeepSpeed opens anything (the verdict is cached per file by size, mtime and inode, so one resume
hashes each file once), so a truncated, corrupted-in-place or foreign checkpoint is a one-line UserError,
not a traceback from inside torch.load or a silently wrong model. `resume_tag` passes over a corrupt
newest checkpoint for the newest one that verifies, with a warning naming the bad file; `quarantine` then
renames the bad one to `<tag>.corrupt` (never deleted) and points `latest` at the good one. Readers that
train nothing (export, evaluate) use `latest_good_tag`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from training.errors import UserError
from training.outdir import write_atomic

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"step\d{8}")
CORRUPT_SUFFIX = ".corrupt"
HASH = "sha256"


class CorruptCheckpoint(UserError):
    """A checkpoint of this trainer whose files do not match its manifest (missing, truncated, altered)."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


_digests: dict[str, tuple[tuple, str]] = {}  # path -> ((size, mtime_ns, ino, ctime_ns), hex digest)


def file_digest(path: Path) -> str:
    """SHA-256 of a file, streamed; cached while the file's size, mtime, ctime and inode stay the same."""
    st = path.stat()
    key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    hit = _digests.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, HASH).hexdigest()
    _digests[str(path)] = (key, digest)
    return digest


def _digest_all(paths: list[Path]) -> list[str]:
    if len(paths) <= 1:
        return [file_digest(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:  # hashlib releases the GIL
        return list(pool.map(file_digest, paths))


def _manifest(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != "meta.json"}


def _checksums(tag_dir: Path, names) -> dict[str, str]:
    names = list(names)
    return dict(zip(names, _digest_all([tag_dir / n for n in names])))


# ------------------------------------------------------------------------------------- find and verify

def latest_tag(ckpt_dir: Path, check: bool = True) -> Optional[str]:
    """The tag `latest` names, or None when there is no checkpoint yet. With `check`, a `latest` that names
    a missing directory is an error (never silently replaced by an older checkpoint)."""
    latest = ckpt_dir / "latest"
    try:
        raw = latest.read_bytes() if latest.is_file() else b""
    except OSError as err:
        raise UserError(f"{latest}: cannot be read ({err.strerror})") from None
    try:
        tag = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        tag = None
    if tag is None or (tag and (len(tag) > 200 or not tag.isprintable())):
        if not check:
            return None
        raise UserError(f"{latest}: garbage ({len(raw)} bytes, not a checkpoint tag){_older_hint(ckpt_dir, '')}")
    if not tag:
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name)) \
            if ckpt_dir.is_dir() else []
        if check and tags:  # never start over (and later prune) beside checkpoints nobody named
            raise UserError(f"{ckpt_dir} holds checkpoints ({tags[-1]} the newest) but no `latest` file naming one; "
                            f"write a tag into {latest} to resume from it")
        return None
    if check:
        if "/" in tag or tag in (".", ".."):
            raise UserError(f"{latest}: names {tag!r}, which is not a checkpoint tag{_older_hint(ckpt_dir, '')}")
        if not (ckpt_dir / tag).is_dir():
            raise UserError(f"{latest} names {tag}, but {ckpt_dir / tag} does not exist{_older_hint(ckpt_dir, tag)}")
    return tag


def _older_hint(ckpt_dir: Path, bad: str) -> str:
    older = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name) and p.name != bad)
    if not older:
        return ""
    return (f"; the newest other checkpoint is {older[-1]}: write `{older[-1]}` into {ckpt_dir / 'latest'} to resume "
            "from it")


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    """meta.json of a checkpoint, after checking that the checkpoint is complete (UserError otherwise)."""
    tag_dir = ckpt_dir / tag
    path = tag_dir / "meta.json"
    if not tag_dir.is_dir():
        raise UserError(f"{tag_dir}: no such checkpoint directory")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{tag_dir}: not a checkpoint of this trainer (no meta.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptCheckpoint(f"{path}: truncated or corrupt (not valid JSON){_older_hint(ckpt_dir, tag)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or \
            not isinstance(meta.get("train_state"), dict):
        raise UserError(f"{path}: not a checkpoint of this trainer (no model/train_state)")
    files = meta.get("files") or {}
    for name, size in files.items():
        f = tag_dir / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{tag_dir}: incomplete checkpoint, {name} is missing{_older_hint(ckpt_dir, tag)}")
        if f.stat().st_size != size:
            raise CorruptCheckpoint(f"{f}: truncated or corrupt ({f.stat().st_size} bytes, expected {size})"
                                    f"{_older_hint(ckpt_dir, tag)}")
    sums = meta.get("checksums") or {}  # absent in checkpoints written before checksums were recorded
    if sums and sums.get("algorithm") != HASH:
        raise UserError(f"{path}: checksums in {sums.get('algorithm')!r}, this trainer checks {HASH}")
    expected = sums.get("files") or {}
    names = [n for n in files if n in expected]
    for name, digest in zip(names, _digest_all([tag_dir / n for n in names])):
        if digest != expected[name]:
            raise CorruptCheckpoint(f"{tag_dir / name}: corrupt ({HASH} differs from the one recorded at save; same "
                                    f"size){_older_hint(ckpt_dir, tag)}")
    return meta


def _tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name)) \
        if ckpt_dir.is_dir() else []


def _warn(text: str) -> None:
    if _rank() == 0:
        print(f"warning: {text}", file=sys.stderr, flush=True)


def resume_tag(ckpt_dir: Path) -> tuple[Optional[str], list[str]]:
    """(tag to resume from, newer tags passed over as corrupt). The tag `latest` names, verified; if its files
    do not match the manifest, the newest older checkpoint that verifies, with a warning naming the bad file.
    No checkpoint: (None, []). Nothing verifies: a UserError naming the bad file."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None, []
    try:
        read_meta(ckpt_dir, tag)
        return tag, []
    except CorruptCheckpoint as err:
        first = str(err).split("; the newest other checkpoint")[0]
    bad = [tag]
    for older in reversed([t for t in _tags(ckpt_dir) if t < tag]):
        try:
            read_meta(ckpt_dir, older)
        except CorruptCheckpoint:
            bad.append(older)
            continue
        _warn(f"{first}; resuming from {older}, the newest checkpoint that verifies ({', '.join(bad)} kept as "
              f"<tag>{CORRUPT_SUFFIX})")
        return older, bad
    raise UserError(f"{first}; no older checkpoint in {ckpt_dir} verifies either")


def latest_good_tag(ckpt_dir: Path) -> Optional[str]:
    """For readers (export, evaluate): the tag `latest` names, or the newest older one that verifies (warning)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    try:
        read_meta(ckpt_dir, tag)
        return tag
    except CorruptCheckpoint as err:
        first = str(err).split("; the newest other checkpoint")[0]
    for older in reversed([t for t in _tags(ckpt_dir) if t < tag]):
        try:
            read_meta(ckpt_dir, older)
        except CorruptCheckpoint:
            continue
        _warn(f"{first}; using {older}, the newest checkpoint that verifies")
        return older
    raise UserError(f"{first}; no older checkpoint in {ckpt_dir} verifies either")


def quarantine(ckpt_dir: Path, bad: list[str], good: str, suffix: str = CORRUPT_SUFFIX, why: str = "corrupt") -> None:
    """Rank 0, after resuming from `good`: keep the `bad` checkpoints (corrupt ones; with --resume TAG, the newer
    ones it abandons) as `<tag><suffix>` (never pruned, never resumed) and point `latest` at `good`."""
    for tag in bad:
        target = ckpt_dir / f"{tag}{suffix}"
        if target.exists():
            target = ckpt_dir / f"{tag}{suffix}-{os.getpid()}"
        os.rename(ckpt_dir / tag, target)
        log.warning("kept the checkpoint %s (%s) as %s", ckpt_dir / tag, why, target)
    write_atomic(ckpt_dir / "latest", good, fsync=True)
