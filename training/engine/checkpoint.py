"""DeepSpeed checkpoints plus what DeepSpeed does not keep: the train position and per-rank RNG state.

Layout: OUT/checkpoints/<tag>/ holds DeepSpeed's files, `rng_rank<r>.pt` (each rank's RNG) and
`meta.json` (model shape, train position, the state of the run's components (`components`: the stage
schedule's early ends, see Checkpointer), and a manifest of every file with its size; written by rank 0
last). `OUT/checkpoints/latest` names the newest complete tag.

Atomicity: a checkpoint is written into `<tag>.tmp` (DeepSpeed writes there too, with its own
`save_latest` disabled), published by renaming the directory to `<tag>` once every rank has finished,
and only then is `latest` rewritten (temporary file + os.replace). A process killed at any point leaves
`latest` naming a complete checkpoint; leftovers (`*.tmp`) are deleted by the next save. The directory
rename assumes all ranks write to one shared file system (the usual cluster set-up).

Retention: after publishing, all but the newest `keep_last` checkpoints are deleted, as are checkpoints
newer than the one just published (left from an abandoned timeline, e.g. written after the checkpoint a
run was resumed from, but never named by `latest`).

Integrity: meta.json also records every file's SHA-256, and nothing is loaded before every file matches
that manifest. Finding and verifying checkpoints (`latest`, `read_meta`, the fall-back past a corrupt newest
checkpoint in `resume_tag` / `latest_good_tag`, `quarantine`) is in training/engine/checkpoint_verify.py.
Before a resume, `check_compatible` and `check_resumable` refuse a checkpoint of another model shape,
precision, sequence length or data.

File-system faults while saving (disk full, read-only) end in one UserError line; the checkpoint's
temporary directory is removed and `latest` still names the previous complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from training.engine import faults, inject
from training.engine.checkpoint_verify import HASH, TAG_RE, _checksums, _manifest, _rank, latest_tag, read_meta
from training.errors import UserError
from training.outdir import fs_failure, fsync_dir, write_atomic
from training.model.config import ModelConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
TMP_SUFFIX = ".tmp"

# Fields of the model config that decide tensor shapes: a checkpoint is only loadable if these agree.
SHAPE_FIELDS = ModelConfig.SHAPE_FIELDS
# Of these, the ones a stage hook may resolve at run time (EarlyBERT's prune): a config that leaves them unset
# (None) accepts whatever the checkpoint holds; resume then builds the model from the checkpoint's meta.json.
RESOLVED_AT_RUN_TIME = ModelConfig.PER_LAYER_FIELDS


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


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def tag_for(state: TrainState) -> str:
    return f"step{state.step:08d}"


# ------------------------------------------------------------------------------------------------ save

def save(engine, ckpt_dir: Path, state: TrainState, model_cfg: ModelConfig, keep_last: int,
         run_info: Optional[dict] = None, components: Optional[dict] = None,
         metrics_bytes: Optional[int] = None) -> Path:
    """Write the checkpoint of `state` atomically (see the module doc). Collective: call on every rank.
    `run_info` (what the run trains on and how: see check_resumable) goes into meta.json as `run`; `components`,
    the run's components' own state (JSON: the stage schedule's early ends), as `components`; `metrics_bytes`,
    rank 0's metrics.jsonl length now, as `metrics_bytes` (a resume cuts the file there)."""

    tag = tag_for(state)
    final, tmp_tag = ckpt_dir / tag, tag + TMP_SUFFIX
    tmp = ckpt_dir / tmp_tag
    # Parameters are replicated on every rank (ZeRO 0-2), so every rank reaches the same verdict.
    if not faults.params_finite(engine.module):
        raise faults.NumericalFault(f"parameters are not finite at step {state.step}; not writing a checkpoint "
                                    f"(latest good one: {latest_tag(ckpt_dir, check=False)})")
    rank = _rank()
    published = False
    try:
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier()
        torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state={"train_state": asdict(state)},
                               save_latest=False)
        inject.injector(rank).in_save(state.step)  # debug hook: die (or fail) half-way through a save
        _barrier()  # every rank's files are on disk
        if rank == 0:
            files = _manifest(tmp)
            meta = {"format_version": FORMAT_VERSION, "tag": tag, "train_state": asdict(state),
                    "model": model_cfg.model_dump(mode="json"), "files": files,
                    "checksums": {"algorithm": HASH, "files": _checksums(tmp, files)}}
            if run_info is not None:
                meta["run"] = run_info
            if components is not None:
                meta["components"] = components
            if metrics_bytes is not None:
                meta["metrics_bytes"] = metrics_bytes
            write_atomic(tmp / "meta.json", json.dumps(meta, indent=1), fsync=True)
            if final.exists():
                # Left from an abandoned timeline (never named by `latest`), or a second save of the same step.
                stale = ckpt_dir / f"{tag}.old-{os.getpid()}"
                os.rename(final, stale)
                os.rename(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp, final)
            published = True
            fsync_dir(ckpt_dir)
            write_atomic(ckpt_dir / "latest", tag, fsync=True)
            _prune(ckpt_dir, keep_last, tag)
    except BaseException as err:  # a second Ctrl-C in a save too: no half checkpoint left behind
        reason = fs_failure(err, tmp) if isinstance(err, Exception) else None  # before the clean-up frees space
        if rank == 0 and not published:
            shutil.rmtree(tmp, ignore_errors=True)  # never leave half a checkpoint behind
        if reason is None:
            raise
        previous = latest_tag(ckpt_dir, check=False)
        raise UserError(f"checkpoint {final} of step {state.step} could not be written: {reason}; "
                        + (f"{ckpt_dir / 'latest'} still names {previous}, complete (resume from it with --resume)"
                           if previous else "no earlier checkpoint")) from None
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


# ---------------------------------------------------------------------------------------------- resume

def check_compatible(meta: dict, model_cfg: ModelConfig, where: Path) -> None:
    # A field newer than the checkpoint (absent from its meta.json) reads as its default.
    saved = {k: f.default for k, f in ModelConfig.model_fields.items()} | meta.get("model", {})
    current = model_cfg.model_dump(mode="json")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
             for k in SHAPE_FIELDS if saved.get(k) != current.get(k)
             and not (k in RESOLVED_AT_RUN_TIME and current.get(k) is None)]
    if diffs:
        raise UserError(f"{where} holds a different model ({'; '.join(diffs[:3])})")


def check_resumable(meta: dict, run_info: dict, where: Path) -> None:
    """Resume only into what the checkpoint was trained with: the same train.precision (another one fails deep
    inside DeepSpeed's optimizer load), the same sequence length in the checkpoint's stage, and the same data
    (data.dir's identity: row length, vocabulary, rows and tokens per split; its path may differ). `run_info`
    as the runner records it at save. Checkpoints written before `run` was recorded are not checked."""
    saved = meta.get("run")
    if not isinstance(saved, dict):
        return
    if saved.get("precision") is not None and saved.get("precision") != run_info.get("precision"):
        raise UserError(f"{where} was trained with train.precision={saved['precision']}, the config says "
                        f"train.precision={run_info.get('precision')}; resume with train.precision="
                        f"{saved['precision']} (export it and start a new run to change precision)")
    if saved.get("seq_len") is not None and saved.get("seq_len") != run_info.get("seq_len"):
        raise UserError(f"{where} was trained with seq_len {saved['seq_len']} (stage "
                        f"'{saved.get('stage', '?')}'), the config and data.dir now give seq_len "
                        f"{run_info.get('seq_len')}; resume with the stage's seq_len and data it was trained on")
    old, new = saved.get("data"), run_info.get("data") or {}
    if not isinstance(old, dict):
        return
    diffs = []
    for key in ("seq_len", "vocab_size", "vocab_sha256", "rows", "tokens"):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: checkpoint {a.get(k)!r}, data.dir {b.get(k)!r}" for k in sorted(a)
                      if a.get(k) is not None and a.get(k) != b.get(k)]
        elif a is not None and a != b:
            if key == "vocab_sha256":
                a, b = f"{a[:12]}...", f"{str(b)[:12]}..."
            diffs.append(f"{key}: checkpoint {a!r}, data.dir {b!r}")
    if diffs:
        raise UserError(f"{where} was trained on other data (data dir {old.get('path')}) than data.dir="
                        f"{new.get('path')} ({'; '.join(diffs[:3])}); resume with the data it was trained on")


def load(engine, ckpt_dir: Path, tag: str) -> TrainState:
    read_meta(ckpt_dir, tag)  # complete and intact? (checksums cached from the first check)
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


class Checkpointer:
    """When the run checkpoints and with what: every run.save_every steps (not inside a streak of non-finite steps),
    at the run's end and where it pauses (run.stop_at_step, run.stop_below_unigram, a pre-emption), never twice at
    one step; each checkpoint holds the state of the run's components (`components`: name -> an object with
    state_dict/load_state_dict), which `load` gives back."""

    def __init__(self, ckpt_dir: Path, run, components: dict):
        self.ckpt_dir, self.run, self.components = ckpt_dir, run, components
        self._saved_step: Optional[int] = None

    def should_save(self, step: int, final: bool, bad_streak: int = 0) -> bool:
        periodic = self.run.save_every and step % self.run.save_every == 0 and not bad_streak
        return bool(periodic or final)

    def save(self, engine, state: TrainState, model_cfg: ModelConfig, run_info: dict,
             metrics_bytes: Optional[int] = None) -> None:
        if self._saved_step == state.step:
            return  # e.g. a pre-emption signal at a step that was just saved
        save(engine, self.ckpt_dir, state, model_cfg, self.run.keep_last, run_info=run_info,
             components={name: c.state_dict() for name, c in self.components.items()}, metrics_bytes=metrics_bytes)
        self._saved_step = state.step

    def load(self, engine, tag: str, meta: dict) -> TrainState:
        """Load checkpoint `tag` (its verified `meta`) into `engine`; each component gets its saved state (None:
        a checkpoint from before it kept one) with the train position."""
        state = load(engine, self.ckpt_dir, tag)
        saved = meta.get("components") or {}
        for name, component in self.components.items():
            component.load_state_dict(saved.get(name), state)
        return state
