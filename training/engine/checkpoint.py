"""DeepSpeed checkpoints plus what DeepSpeed does not keep: the train position and per-rank RNG state.

Layout: OUT/checkpoints/<tag>/ holds DeepSpeed's files, `rng_rank<r>.pt` (each rank's RNG) and
`meta.json` (model shape, train position, and a manifest of every file with its size; written by rank 0
last). `OUT/checkpoints/latest` names the newest complete tag.

Atomicity: a checkpoint is written into `<tag>.tmp` (DeepSpeed writes there too, with its own
`save_latest` disabled), published by renaming the directory to `<tag>` once every rank has finished,
and only then is `latest` rewritten (temporary file + os.replace). A process killed at any point leaves
`latest` naming a complete checkpoint; leftovers (`*.tmp`) are deleted by the next save. The directory
rename assumes all ranks write to one shared file system (the usual cluster set-up).

Retention: after publishing, all but the newest `keep_last` checkpoints are deleted, as are checkpoints
newer than the one just published (left from an abandoned timeline, e.g. written after the checkpoint a
run was resumed from, but never named by `latest`).

Loading checks the manifest (every file present, at its recorded size) before DeepSpeed opens anything,
so a truncated or foreign checkpoint is a one-line UserError, not a traceback from inside torch.load.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from training.errors import UserError
from training.model.config import ModelConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
TAG_RE = re.compile(r"step\d{8}")
TMP_SUFFIX = ".tmp"

# Fields of the model config that decide tensor shapes: a checkpoint is only loadable if these agree.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_position",
                "type_vocab_size", "norm", "nsp", "heads_per_layer", "ffn_per_layer", "ffn_rank", "slimming")
# Of these, the ones a stage hook may resolve at run time (EarlyBERT's prune): a config that leaves them unset
# (None) accepts whatever the checkpoint holds; resume then builds the model from the checkpoint's meta.json.
RESOLVED_AT_RUN_TIME = ("heads_per_layer", "ffn_per_layer")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done, over the whole run
    stage_index: int = 0
    stage_step: int = 0  # optimizer steps done inside the current stage
    tokens: int = 0  # tokens seen, all ranks
    samples: int = 0  # sequences consumed, all ranks: the data stream's position
    wall_s: float = 0.0  # training wall time before this process (for resumed runs)
    skipped_steps: int = 0  # steps skipped because of a non-finite loss/gradient (bf16/fp32)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def tag_for(state: TrainState) -> str:
    return f"step{state.step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _manifest(tag_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != "meta.json"}


# ------------------------------------------------------------------------------------------------ save

def save(engine, ckpt_dir: Path, state: TrainState, model_cfg: ModelConfig, keep_last: int) -> Path:
    """Write the checkpoint of `state` atomically (see the module doc). Collective: call on every rank."""
    from training.engine import faults

    tag = tag_for(state)
    final, tmp_tag = ckpt_dir / tag, tag + TMP_SUFFIX
    tmp = ckpt_dir / tmp_tag
    # Parameters are replicated on every rank (ZeRO 0-2), so every rank reaches the same verdict.
    if not faults.params_finite(engine.module):
        raise faults.NumericalFault(f"parameters are not finite at step {state.step}; not writing a checkpoint "
                                    f"(latest good one: {latest_tag(ckpt_dir, check=False)})")
    rank = _rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"train_state": asdict(state)},
                           save_latest=False)
    faults.injector(rank).in_save(state.step)  # debug hook: die half-way through a save
    _barrier()  # every rank's files are on disk
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "tag": tag, "train_state": asdict(state),
                "model": model_cfg.model_dump(mode="json"), "files": _manifest(tmp)}
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
        if final.exists():
            # Left from an abandoned timeline (never named by `latest`), or a second save of the same step.
            stale = ckpt_dir / f"{tag}.old-{os.getpid()}"
            os.rename(final, stale)
            os.rename(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
        _write_atomic(ckpt_dir / "latest", tag)
        _prune(ckpt_dir, keep_last, tag)
    _barrier()
    return final


def _prune(ckpt_dir: Path, keep_last: int, current: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name))
    older = [t for t in tags if t <= current]
    doomed = [t for t in tags if t > current] + older[:-keep_last]
    doomed += [p.name for p in ckpt_dir.iterdir() if p.is_dir() and (".tmp" in p.name or ".old-" in p.name)]
    for name in doomed:
        if name != current:
            shutil.rmtree(ckpt_dir / name, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ load

def latest_tag(ckpt_dir: Path, check: bool = True) -> Optional[str]:
    """The tag `latest` names, or None when there is no checkpoint yet. With `check`, a `latest` that names
    a missing directory is an error (never silently replaced by an older checkpoint)."""
    latest = ckpt_dir / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    if not tag:
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.fullmatch(p.name)) \
            if ckpt_dir.is_dir() else []
        if check and tags:  # never start over (and later prune) beside checkpoints nobody named
            raise UserError(f"{ckpt_dir} holds checkpoints ({tags[-1]} the newest) but no `latest` file naming one; "
                            f"write a tag into {latest} to resume from it")
        return None
    if check:
        if "/" in tag or tag in (".", ".."):
            raise UserError(f"{latest}: names {tag!r}, which is not a checkpoint tag")
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
        raise UserError(f"{path}: truncated or corrupt (not valid JSON){_older_hint(ckpt_dir, tag)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or \
            not isinstance(meta.get("train_state"), dict):
        raise UserError(f"{path}: not a checkpoint of this trainer (no model/train_state)")
    for name, size in (meta.get("files") or {}).items():
        f = tag_dir / name
        if not f.is_file():
            raise UserError(f"{tag_dir}: incomplete checkpoint, {name} is missing{_older_hint(ckpt_dir, tag)}")
        if f.stat().st_size != size:
            raise UserError(f"{f}: truncated or corrupt ({f.stat().st_size} bytes, expected {size})"
                            f"{_older_hint(ckpt_dir, tag)}")
    return meta


def check_compatible(meta: dict, model_cfg: ModelConfig, where: Path) -> None:
    # A field newer than the checkpoint (absent from its meta.json) reads as its default.
    saved = {k: f.default for k, f in ModelConfig.model_fields.items()} | meta.get("model", {})
    current = model_cfg.model_dump(mode="json")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
             for k in SHAPE_FIELDS if saved.get(k) != current.get(k)
             and not (k in RESOLVED_AT_RUN_TIME and current.get(k) is None)]
    if diffs:
        raise UserError(f"{where} holds a different model ({'; '.join(diffs[:3])})")


def load(engine, ckpt_dir: Path, tag: str) -> TrainState:
    read_meta(ckpt_dir, tag)  # complete? (cheap: sizes only)
    rng_file = ckpt_dir / tag / f"rng_rank{_rank()}.pt"
    try:
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
    except UserError:
        raise
    except Exception as err:  # a corrupt file fails in many ways deep inside torch / DeepSpeed
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{ckpt_dir / tag}: cannot be loaded ({type(err).__name__}: {first})") from None
    if load_path is None or not client_state or "train_state" not in client_state:
        raise UserError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    if rng is None:  # e.g. resumed on more ranks than wrote it: correct, but not bit-identical any more
        log.warning("%s: missing; this rank keeps its current RNG state", rng_file)
    else:
        set_rng_state(rng)
    return TrainState.from_dict(client_state["train_state"])
