"""Export a training checkpoint as a Hugging Face model directory.

`python -m training.export --checkpoint DIR --out HF_DIR`, where DIR is a run directory, its
`checkpoints/` directory, or one checkpoint tag directory. The result loads with
`transformers.BertForPreTraining.from_pretrained(HF_DIR)`, tokenizer included.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from training.engine import checkpoint
from training.errors import UserError, exit_on_user_error
from training.model.config import ModelConfig


def resolve_tag_dir(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"--checkpoint {path}: no such directory")
    for ckpt_dir in (path / "checkpoints", path):
        tag = checkpoint.latest_tag(ckpt_dir)
        if tag is not None:
            return ckpt_dir / tag
    if (path / "meta.json").is_file():
        return path
    raise UserError(f"--checkpoint {path}: no checkpoint found (expected a run dir, its checkpoints/ dir, or a tag dir)")


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
    for candidate in (tag_dir.parent.parent / "tokenizer", tag_dir.parent / "tokenizer"):
        if (candidate / "vocab.txt").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    return None


@exit_on_user_error
def main(argv=None) -> int:
    from training.model.bert import BertForPreTraining
    from training.model.hf import export_hf

    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the run's tokenizer/)")
    args = p.parse_args(argv)

    tag_dir = resolve_tag_dir(args.checkpoint)
    meta = checkpoint.read_meta(tag_dir.parent, tag_dir.name)
    cfg = ModelConfig.model_validate(meta["model"])
    model = BertForPreTraining(cfg)
    missing, unexpected = model.load_state_dict(load_module_state(tag_dir), strict=False)
    if missing or unexpected:
        raise UserError(f"{tag_dir}: weights do not match its meta.json (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]})")
    tokenizer = args.tokenizer or find_tokenizer(tag_dir)
    export_hf(model, cfg, args.out, tokenizer_dir=tokenizer)
    print(f"exported {tag_dir} -> {args.out}" + ("" if tokenizer else " (no tokenizer found)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
