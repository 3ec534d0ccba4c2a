"""Export a training checkpoint as a Hugging Face model directory.

`python -m training.export --checkpoint DIR --out HF_DIR [--overwrite]`, where DIR is a run directory, its
`checkpoints/` directory, or one checkpoint tag directory. The result loads with
`transformers.BertForPreTraining.from_pretrained(HF_DIR)` (a Pre-LN model: `RobertaPreLayerNormForMaskedLM`),
tokenizer included.

Never overwrites or half-writes: an existing non-empty HF_DIR needs --overwrite (and is replaced only if it is a
Hugging Face model dir that holds no input of the export); the model is written into a sibling
`.<name>.tmp-<pid>` and renamed into place when complete (an old HF_DIR is moved aside first and deleted only
after the rename), so a failed export leaves HF_DIR as it was. HF_DIR may not lie inside the run (or the
checkpoints dir) being exported: a run owns its folders (the run itself writes OUT/hf at its end).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from training import outdir
from training.errors import UserError, exit_on_user_error
from training.model_io import find_tokenizer, load_checkpoint_model, resolve_tag_dir


def run_root(tag_dir: Path) -> Path:
    """The folder a checkpoint belongs to: its run dir (OUT of OUT/checkpoints/<tag>, a run of training.pretrain),
    else its checkpoints dir (one named checkpoints/ or holding a `latest`), else the tag dir itself."""
    ckpt_dir = tag_dir.parent
    run = ckpt_dir.parent
    if ckpt_dir.name == "checkpoints" and ((run / outdir.RUN_MARKER).is_file() or
                                           (run / "config.resolved.json").is_file()):
        return run
    if ckpt_dir.name == "checkpoints" or (ckpt_dir / "latest").is_file():
        return ckpt_dir
    return tag_dir


def check_export_out(out: Path, overwrite: bool, tag_dir: Path, tokenizer: Path | None) -> None:
    """Refuse an --out inside the run being exported, a non-directory, and an existing non-empty dir without
    --overwrite; with it, only a Hugging Face model dir that holds no input."""
    from training.model_io import is_hf_dir

    real = Path(os.path.realpath(out))
    root = Path(os.path.realpath(run_root(tag_dir)))
    if real == root or root in real.parents:
        raise UserError(f"--out {out}: inside {root}, the run being exported (its folders are the run's own); "
                        "pick an --out outside it")
    outdir.check_no_clash("--out", out, [("--checkpoint", str(tag_dir)),
                                         ("--tokenizer", str(tokenizer) if tokenizer else "")])
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UserError(f"--out {out}: exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise UserError(f"--out {out}: directory exists and is not empty (pass --overwrite to replace it)")
            if not is_hf_dir(out):
                raise UserError(f"--out {out}: not a Hugging Face model dir (no config.json), so --overwrite will not "
                                "delete it: delete it by hand, or pick another --out")


def build_parser(prog: str = "python -m training.export"):
    from training import cli

    p = cli.parser(prog, __doc__)
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a run dir (its latest checkpoint that verifies), its checkpoints/ dir, or one tag dir")
    p.add_argument("--out", required=True, type=Path, help="the Hugging Face model dir to write")
    p.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the run's tokenizer/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (a Hugging Face model dir)")
    return p


@exit_on_user_error
def main(argv=None) -> int:
    from training.model.hf_export import export_hf

    args = build_parser().parse_args(argv)

    tag_dir = resolve_tag_dir(args.checkpoint)
    tokenizer = args.tokenizer or find_tokenizer(tag_dir)
    check_export_out(args.out, args.overwrite, tag_dir, tokenizer)
    model, cfg, _meta = load_checkpoint_model(tag_dir)
    outdir.replace_dir(args.out, lambda tmp: export_hf(model, cfg, tmp, tokenizer_dir=tokenizer))
    print(f"exported {tag_dir} -> {args.out}" + ("" if tokenizer else " (no tokenizer found)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
