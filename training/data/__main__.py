"""Prepare pre-training data: `python -m training.data prepare ...` (or `bert-prepare ...`) tokenises, splits
and packs raw text; `python -m training.data build-default ...` builds the default corpus from the Wikipedia
sample that gensim ships."""
from __future__ import annotations

import argparse
import os
import sys

from training import cli_types
from training.data.tokenizer import MAX_TRAIN_VOCAB, MIN_TRAIN_VOCAB
from training.errors import exit_on_user_error

MAX_PROCS = 1024  # map processes; more is a typo


def _parser(prog: str = "python -m training.data") -> argparse.ArgumentParser:
    from training import cli
    from training.data.prepare import DEFAULT_HELDOUT_FRACTION, DOC_SEPS

    p = cli.parser(prog, __doc__)
    sub = p.add_subparsers(dest="command", required=True)

    prep = cli.add_subparser(sub, "prepare", "tokenise, split and pack raw text into DIR")
    prep.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB|hf:DATASET",
                      help=".txt (line or blank-line documents), .jsonl (field text), .parquet (column "
                           "text); optionally .xz/.bz2/.gz; or a `datasets` dataset streamed with load_dataset: "
                           "hf:NAME[/CONFIG][:SPLIT], hf:OWNER/NAME/[CONFIG][:SPLIT] (the trailing slash is the "
                           "default config), hf:LOCAL_DIR_OR_FILE[:SPLIT]; SPLIT defaults to train")
    prep.add_argument("--text-column", default="text", metavar="NAME",
                      help="the column holding the text in hf: inputs (default: text)")
    prep.add_argument("--out", required=True, metavar="DIR", help="the data dir to write (train/, heldout/, "
                                                                   "tokenizer/, stats.json)")
    prep.add_argument("--seq-len", type=cli_types.seq_len(), required=True, metavar="N", help="tokens per packed row")
    prep.add_argument("--tokenizer", required=True, metavar="PATH|train:VOCAB_SIZE",
                      help="an existing tokenizer (vocab.txt, tokenizer.json, or a dir holding one), or train:N to "
                           "train a WordPiece vocabulary of N on the train split")
    prep.add_argument("--heldout-fraction", type=cli_types.fraction("--heldout-fraction"),
                      default=DEFAULT_HELDOUT_FRACTION,
                      help="share of the documents held out for evaluation (whole documents, by a hash of their "
                           "text: run_mlm.py's validation_split_percentage 5 as a fraction)")
    prep.add_argument("--doc-sep", choices=DOC_SEPS, default="auto",
                      help=".txt inputs: 'line' = one document per line; 'blank' = documents separated by blank "
                           "lines; 'auto' = per file, blank when its blank lines split it into documents of at most "
                           "100 lines on average, else line (the choice is logged and kept in stats.json)")
    prep.add_argument("--num-proc", type=cli_types.positive_int("--num-proc", MAX_PROCS), default=None,
                      help="worker processes (default: all cores)")
    prep.add_argument("--max-docs", type=cli_types.positive_int("--max-docs"), default=None,
                      help="stop after N non-blank documents (default: all)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing --out made by this command")
    prep.add_argument("--seed", type=cli_types.seed(), default=0, help="seed of the held-out split and the packing order")
    prep.add_argument("--no-pack", action="store_true",
                      help="one document per row, padded ([CLS] doc [SEP] [PAD]...; a longer document continues in "
                           "the next rows) instead of packed [CLS] A [SEP] B [SEP] rows")

    bd = cli.add_subparser(sub, "build-default", "build the default corpus from gensim's Wikipedia sample")
    bd.add_argument("--out", required=True, metavar="DIR", help="the data dir to write")
    bd.add_argument("--seq-len", type=cli_types.seq_len(), default=128, help="tokens per packed row")
    bd.add_argument("--vocab", type=cli_types.integer("--vocab", ge=MIN_TRAIN_VOCAB, le=MAX_TRAIN_VOCAB), default=2048,
                    help="WordPiece vocabulary size trained on the train split")
    bd.add_argument("--heldout-fraction", type=cli_types.fraction("--heldout-fraction"),
                    default=DEFAULT_HELDOUT_FRACTION, help="share of the articles held out for evaluation")
    bd.add_argument("--num-proc", type=cli_types.positive_int("--num-proc", MAX_PROCS), default=None,
                    help="worker processes (default: all cores)")
    bd.add_argument("--seed", type=cli_types.seed(), default=0, help="seed of the held-out split and the packing order")
    return p


def prepare_main(argv: list[str] | None = None) -> int:
    """`bert-prepare ...`: `prepare` unless the first word names the sub-command (prepare, build-default)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("prepare", "build-default"):
        argv = ["prepare", *argv]
    return main(argv, prog="bert-prepare")


@exit_on_user_error
def main(argv: list[str] | None = None, prog: str = "python -m training.data") -> int:
    args = _parser(prog).parse_args(argv)
    # Map workers fork after the tokenizer trained with Rust threads; keep it quiet and deadlock-free.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "prepare":
        from training.data.prepare import prepare

        prepare(args.input, args.out, args.seq_len, args.tokenizer, heldout_fraction=args.heldout_fraction,
                num_proc=args.num_proc, max_docs=args.max_docs, overwrite=args.overwrite, seed=args.seed,
                text_column=args.text_column, pack=not args.no_pack, doc_sep=args.doc_sep)
    else:
        from training.data.wiki import build_default

        build_default(args.out, args.seq_len, args.vocab, heldout_fraction=args.heldout_fraction,
                      seed=args.seed, num_proc=args.num_proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
