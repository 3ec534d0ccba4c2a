"""Reading a trained model back, without DeepSpeed: a run dir, a checkpoint tag dir or a Hugging Face dir ->
our `BertForPreTraining` in fp32, on the CPU unless a device is asked for (`pick_device`: evaluation takes the GPU
when torch sees one; export stays on the CPU).

A checkpoint's `mp_rank_00_model_states.pt` holds the module state and its `meta.json` the model config
(training/engine/checkpoint.py); a run dir resolves to the tag its `checkpoints/latest` names. Shared by
`python -m training.export` and `python -m training.evaluate`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from training.engine import checkpoint_verify
from training.errors import UserError
from training.model.config import ModelConfig


DEVICES = ("auto", "cpu", "cuda")


def pick_device(requested: str = "auto", flag: str = "--device") -> torch.device:
    """`auto`: the current CUDA GPU when torch sees one, else the CPU; `cpu` or `cuda` as asked (cuda without a
    GPU is a UserError naming `flag`)."""
    if requested not in DEVICES:
        raise UserError(f"{flag} {requested}: expected one of {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise UserError(f"{flag} cuda: torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    return torch.device("cuda" if requested == "cuda" or (requested == "auto" and cuda) else "cpu")


def resolve_tag_dir(path: Path, flag: str = "--checkpoint") -> Path:
    """The checkpoint tag dir of `path`: a run dir (its latest checkpoint), its checkpoints/ dir, or a tag dir."""
    if not path.exists():
        raise UserError(f"{flag} {path}: no such directory")
    for ckpt_dir in (path / "checkpoints", path):
        tag = checkpoint_verify.latest_good_tag(ckpt_dir)  # verified; a corrupt newest one: the newest good (warning)
        if tag is not None:
            return ckpt_dir / tag
    if (path / "meta.json").is_file():
        return path
    raise UserError(f"{flag} {path}: no checkpoint found (expected a run dir, its checkpoints/ dir, or a tag dir)")


def load_module_state(tag_dir: Path) -> dict:
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise UserError(f"{tag_dir}: no DeepSpeed model states (mp_rank_00_model_states.pt)")
    try:
        state = torch.load(files[0], map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated file raises many different errors deep inside torch
        raise UserError(f"{files[0]}: cannot be read ({type(err).__name__}); truncated or corrupt?") from None
    return {k: v.float() for k, v in state["module"].items()}


def find_tokenizer(tag_dir: Path) -> Path | None:
    """The run's tokenizer/ dir (copied there at the run's start) for a checkpoint tag dir, or None."""
    for candidate in (tag_dir.parent.parent / "tokenizer", tag_dir.parent / "tokenizer"):
        if (candidate / "vocab.txt").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def load_checkpoint_model(tag_dir: Path):
    """(BertForPreTraining in fp32 with the checkpoint's weights, its ModelConfig, meta.json)."""
    from training.model.bert import BertForPreTraining

    meta = checkpoint_verify.read_meta(tag_dir.parent, tag_dir.name)
    cfg = ModelConfig.model_validate({**meta["model"], "compile": False})  # evaluation and export run eagerly
    model = BertForPreTraining(cfg)
    missing, unexpected = model.load_state_dict(load_module_state(tag_dir), strict=False)
    if missing or unexpected:
        raise UserError(f"{tag_dir}: weights do not match its meta.json (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    return model, cfg, meta


def is_hf_dir(path: Path) -> bool:
    """A Hugging Face model dir (config.json; its weights are checked when read). Run and tag dirs have none."""
    return (path / "config.json").is_file() and not (path / "meta.json").is_file()


@dataclass
class LoadedModel:
    model: torch.nn.Module  # fp32, eval mode, on the device load_model was given (default: the CPU)
    cfg: ModelConfig
    kind: str  # "checkpoint" (a run dir or a tag dir) or "hf"
    path: Path  # as given
    tag_dir: Optional[Path]  # the checkpoint read (kind "checkpoint")
    step: Optional[int]  # its optimizer step
    run_dir: Optional[Path]  # the run that wrote the checkpoint (holds config.resolved.json), if any
    tokenizer_dir: Optional[Path]  # the model's tokenizer: the run's tokenizer/ or the HF dir itself


def load_model(path: Path, flag: str = "--model", device: torch.device | str = "cpu") -> LoadedModel:
    """A run dir, checkpoint (tag) dir or HF model dir (config.json + weights) as a fp32 model in eval mode on
    `device`."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{flag} {path}: no such directory")
    if is_hf_dir(path):
        from training.model.bert import BertForPreTraining
        from training.model.hf import load_hf_weights, model_config_from_hf

        cfg = model_config_from_hf(path, flag)
        model = BertForPreTraining(cfg)
        load_hf_weights(model, path)
        has_tok = (path / "vocab.txt").is_file() or (path / "tokenizer.json").is_file()
        loaded = LoadedModel(model, cfg, "hf", path, None, None, None, path if has_tok else None)
    else:
        tag_dir = resolve_tag_dir(path, flag)
        model, cfg, meta = load_checkpoint_model(tag_dir)
        run_dir = tag_dir.parent.parent
        loaded = LoadedModel(model, cfg, "checkpoint", path, tag_dir, int(meta["train_state"].get("step", 0)),
                             run_dir if (run_dir / "config.resolved.json").is_file() else None,
                             find_tokenizer(tag_dir))
    loaded.model.float().eval().to(device)
    return loaded


def model_inputs(path: Path, flag: str = "--model") -> list[tuple[str, str]]:
    """What reading the model at `path` reads, as (what, path) pairs for outdir.check_no_clash, found without
    loading anything: an HF dir or a checkpoint (tag or checkpoints/) dir whole; of a run dir its checkpoints/,
    tokenizer/ and config.resolved.json (so a result may still be written into the run dir beside them)."""
    path = Path(path)
    if (path / "checkpoints").is_dir() and not is_hf_dir(path):
        return [(f"{flag} {name}", str(path / name)) for name in ("checkpoints", "tokenizer", "config.resolved.json")]
    items = [(flag, str(path))]
    if not is_hf_dir(path):  # a tag or checkpoints dir: the run's tokenizer and config beside it
        for run in (path.parent, path.parent.parent):
            items += [(f"{flag} {name}", str(run / name)) for name in ("tokenizer", "config.resolved.json")
                      if (run / name).exists()]
    return items


def run_data_dir(run_dir: Path) -> Optional[str]:
    """data.dir of a run (its config.resolved.json), as configured (may be relative to where it ran)."""
    try:
        resolved = json.loads((run_dir / "config.resolved.json").read_text())
    except (OSError, ValueError):
        return None
    data = resolved.get("data") if isinstance(resolved, dict) else None
    return data.get("dir") if isinstance(data, dict) and data.get("dir") else None
