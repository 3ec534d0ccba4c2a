"""CLI: `python -m training.data prepare ...` and `python -m training.data build-default ...`."""
from __future__ import annotations

import argparse
import os
import sys

from training import cli_types
from training.data.tokenizer import MAX_TRAIN_VOCAB, MIN_TRAIN_VOCAB
from training.errors import exit_on_user_error

MAX_PROCS = 1024  # map processes; more is a typo


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.data", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="tokenise, split and pack raw text into DIR")
    prep.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB|hf:DATASET",
                      help=".txt (line or blank-line documents), .jsonl (field text), .parquet (column "
                           "text); optionally .xz/.bz2/.gz; or a `datasets` dataset streamed with load_dataset: "
                           "hf:NAME[/CONFIG][:SPLIT], hf:OWNER/NAME/[CONFIG][:SPLIT] (the trailing slash is the "
                           "default config), hf:LOCAL_DIR_OR_FILE[:SPLIT]; SPLIT defaults to train")
    prep.add_argument("--text-column", default="text", metavar="NAME",
                      help="the column holding the text in hf: inputs (default: text)")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--seq-len", type=cli_types.seq_len(), required=True, metavar="N")
    prep.add_argument("--tokenizer", required=True, metavar="PATH|train:VOCAB_SIZE")
    prep.add_argument("--heldout-fraction", type=cli_types.fraction("--heldout-fraction"), default=0.01)
    prep.add_argument("--num-proc", type=cli_types.positive_int("--num-proc", MAX_PROCS), default=None,
                      help="default: all cores")
    prep.add_argument("--max-docs", type=cli_types.positive_int("--max-docs"), default=None)
    prep.add_argument("--overwrite", action="store_true")
    prep.add_argument("--seed", type=cli_types.seed(), default=0)
    prep.add_argument("--no-pack", action="store_true",
                      help="one document per row, padded ([CLS] doc [SEP] [PAD]...; a longer document continues in "
                           "the next rows) instead of packed [CLS] A [SEP] B [SEP] rows")

    bd = sub.add_parser("build-default", help="build the default corpus from gensim's Wikipedia sample")
    bd.add_argument("--out", required=True, metavar="DIR")
    bd.add_argument("--seq-len", type=cli_types.seq_len(), default=128)
    bd.add_argument("--vocab", type=cli_types.integer("--vocab", ge=MIN_TRAIN_VOCAB, le=MAX_TRAIN_VOCAB), default=2048)
    bd.add_argument("--heldout-fraction", type=cli_types.fraction("--heldout-fraction"), default=0.05)
    bd.add_argument("--num-proc", type=cli_types.positive_int("--num-proc", MAX_PROCS), default=None)
    bd.add_argument("--seed", type=cli_types.seed(), default=0)
    return p


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Map workers fork after the tokenizer trained with Rust threads; keep it quiet and deadlock-free.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "prepare":
        from training.data.prepare import prepare

        prepare(args.input, args.out, args.seq_len, args.tokenizer, heldout_fraction=args.heldout_fraction,
                num_proc=args.num_proc, max_docs=args.max_docs, overwrite=args.overwrite, seed=args.seed,
                text_column=args.text_column, pack=not args.no_pack)
    else:
        from training.data.wiki import build_default

        build_default(args.out, args.seq_len, args.vocab, heldout_fraction=args.heldout_fraction,
                      seed=args.seed, num_proc=args.num_proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
