"""Export a training checkpoint as a Hugging Face model directory.

`python -m training.export --checkpoint DIR --out HF_DIR`, where DIR is a run directory, its
`checkpoints/` directory, or one checkpoint tag directory. The result loads with
`transformers.BertForPreTraining.from_pretrained(HF_DIR)` (a Pre-LN model: `RobertaPreLayerNormForMaskedLM`),
tokenizer included.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.errors import exit_on_user_error
from training.model_io import find_tokenizer, load_checkpoint_model, resolve_tag_dir


@exit_on_user_error
def main(argv=None) -> int:
    from training.model.hf import export_hf

    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the run's tokenizer/)")
    args = p.parse_args(argv)

    tag_dir = resolve_tag_dir(args.checkpoint)
    model, cfg, _meta = load_checkpoint_model(tag_dir)
    tokenizer = args.tokenizer or find_tokenizer(tag_dir)
    export_hf(model, cfg, args.out, tokenizer_dir=tokenizer)
    print(f"exported {tag_dir} -> {args.out}" + ("" if tokenizer else " (no tokenizer found)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
