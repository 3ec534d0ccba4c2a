"""Score a trained model at the held-out yardstick: masked-LM loss and accuracy at the fixed all-[MASK] mask,
beside the unigram table's cross-entropy on the same positions; and on BLiMP's minimal pairs.

    python -m training.evaluate --model RUN_DIR|CHECKPOINT_DIR|HF_DIR --data DATA_DIR | TEXT_FILE... \
        [--reference DATA_DIR] [--out FILE.json [--overwrite]] [--batch-size N] [--max-rows N] [--seq-len N]
    python -m training.evaluate --model M --blimp DIR|hf:nyu-mll/blimp [--per-paradigm N] [--pll word|token|both]

--model: a run dir (its latest checkpoint), a checkpoint tag dir, or a Hugging Face model dir (config.json +
model.safetensors, as `training.export` or a run's OUT/hf writes it); read in fp32, no DeepSpeed, and scored on
--device: auto (the default) takes the CUDA GPU when torch sees one, else the CPU.
--data: a prepared data dir (its held-out split is scored), or raw text files, which go through the prepare
path (documents -> the MODEL's tokenizer -> packed `[CLS] A [SEP] B [SEP]` rows at the model's training
sequence length: the run's prepared data's, else the reference's; --seq-len overrides). Either way the positions are the fixed evaluation mask (training/data/loader.py
FIXED_MASK_*): the same for every model, so two evaluations of one model are bit-identical and two models are
scored on the same targets. The unigram table comes from the train split of --reference, else of a prepared
--data dir, else of the run's own data dir (its config.resolved.json). `below_unigram` = unigram - loss, nats.
--blimp: BLiMP's pairs scored by pseudo-log-likelihood, beside a unigram and a bigram count model of that same
train split (training/blimp); without a known train split the count models are left out, with a note.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from training import cli_types, outdir
from training.errors import UserError, exit_on_user_error
from training.model_io import DEVICES

DEFAULT_BATCH_SIZE = 32
MAX_BATCH_SIZE = 1 << 16  # rows per forward pass on the CPU; more is a typo, not a batch


def _vocab(tokenizer_dir: Path, what: str) -> list[str]:
    path = Path(tokenizer_dir) / "vocab.txt"
    if not path.is_file():
        raise UserError(f"{what}: no vocab.txt in {tokenizer_dir}")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _check_same_vocab(theirs: list[str], ours: list[str], what: str, model_tok: Path) -> None:
    if theirs != ours:
        first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise UserError(f"{what}: its tokenizer's vocabulary ({len(theirs)} tokens) is not the model's ({model_tok}, "
                        f"{len(ours)} tokens; first difference at id {first}): it was tokenised for another model")


def _prepared_seq_len(data_dir) -> int | None:
    try:
        return int(json.loads((Path(data_dir) / "stats.json").read_text())["seq_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _inputs(args) -> list[tuple[str, str]]:
    """Everything evaluate reads: the model's files, --data (files or a dir), --reference, the run's data dir."""
    from training.model_io import model_inputs, run_data_dir

    items = model_inputs(args.model) + [("--data", p) for p in args.data or ()]
    if args.reference is not None:
        items.append(("--reference", str(args.reference)))
    model = Path(args.model)
    for run in (model, model.parent, model.parent.parent):  # a run dir, its checkpoints/ or a tag dir in it
        if (run / "config.resolved.json").is_file():
            items.append(("the run's data.dir", run_data_dir(run) or ""))
            break
    return items


def _check_out(args) -> None:
    out = args.out
    if out is None:
        return
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {out}: exists (pass --overwrite to replace it)")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory, want a file name")
    outdir.check_no_clash("--out", out, _inputs(args))
    parent = out.absolute().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: parent directory {parent} is missing or not writable")


def _prepared_data_dir(args) -> Path | None:
    """The prepared data dir --data names, or None for raw text files."""
    dirs = [Path(p) for p in args.data if Path(p).is_dir()]
    if not dirs:
        return None
    if len(args.data) > 1:
        raise UserError(f"--data {dirs[0]}: a prepared data dir is given alone, not beside other inputs")
    if not (dirs[0] / "stats.json").is_file():
        raise UserError(f"--data {dirs[0]}: not a prepared data dir (no stats.json); give one, or text files")
    return dirs[0]


def _reference_dir(args, loaded, prepared: Path | None) -> tuple[Path, str]:
    """The data dir whose train split makes the unigram table, and why that one."""
    from training.model_io import run_data_dir

    if args.reference is not None:
        if not (args.reference / "stats.json").is_file():
            raise UserError(f"--reference {args.reference}: not a prepared data dir (no stats.json)")
        return args.reference, "--reference"
    if prepared is not None:
        return prepared, "the --data dir's train split"
    run_data = run_data_dir(loaded.run_dir) if loaded.run_dir is not None else None
    if run_data is None:
        raise UserError(f"--model {args.model}: no training data known for the unigram table (not a run dir with "
                        "config.resolved.json); pass --reference DATA_DIR, a prepared data dir tokenised like the "
                        "model")
    if not (Path(run_data) / "stats.json").is_file():
        raise UserError(f"the run's data dir {run_data} (data.dir in {loaded.run_dir / 'config.resolved.json'}) "
                        "holds no prepared data here; pass --reference DATA_DIR")
    return Path(run_data), "the run's data.dir"


def _load_rows(args, loaded, model_tok: Path, vocab: list[str], text_seq_len: int):
    """(ids [N,S], sep [N], fixed-mask collator, seq_len, description, PretrainingData or None) of --data."""
    from training.data.loader import PretrainingData, fixed_mask_collator
    from training.data.prepare import pack_text

    data_dir = _prepared_data_dir(args)
    if data_dir is not None:
        data = PretrainingData(str(data_dir))
        _check_same_vocab(_vocab(Path(data.tokenizer_dir), f"--data {data_dir}"), vocab, f"--data {data_dir}",
                          model_tok)
        ids, sep = data.heldout_rows
        if len(sep) == 0:
            raise UserError(f"--data {data_dir}: the held-out split has no rows; nothing to evaluate on")
        desc = {"kind": "prepared", "path": str(data_dir.absolute()), "split": "heldout",
                "rows_available": int(len(sep))}
        seq_len = args.seq_len or data.seq_len
        if seq_len > data.seq_len:
            raise UserError(f"--seq-len {seq_len}: longer than the rows of --data {data_dir} ({data.seq_len})")
        return ids, sep, data.fixed_mask_collator, seq_len, desc, data

    seq_len = text_seq_len
    if seq_len > loaded.cfg.max_position:
        raise UserError(f"--seq-len {seq_len}: more than the model's max_position {loaded.cfg.max_position}")
    try:
        ids, sep, stats = pack_text(list(args.data), str(model_tok), seq_len)
    except UserError as err:  # prepare's messages name its own flag
        raise UserError(str(err).replace("--input ", "--data ", 1)) from None
    if len(sep) == 0:
        raise UserError(f"--data {' '.join(args.data)}: {stats['tokens']['train']:,} tokens of text make no row "
                        f"of {seq_len} tokens; give more text")
    desc = {"kind": "text", "files": stats["input_files"], "documents": stats["documents"]["train"],
            "tokens": stats["tokens"]["train"], "rows_available": int(len(sep))}
    return ids, sep, fixed_mask_collator(str(model_tok)), seq_len, desc, None


def evaluate(args) -> dict:
    """The held-out score (with --data) and the BLiMP score (with --blimp) of --model, as one JSON-ready dict."""
    from training.model_io import load_model, pick_device

    prepared = _prepared_data_dir(args) if args.data else None  # cheap input checks first
    loaded = load_model(args.model, "--model", pick_device(args.device))
    result = _heldout(args, loaded, prepared) if args.data else _model_info(args, loaded)
    if args.blimp:
        result["blimp"] = _blimp(args, loaded)
    return result


def _model_info(args, loaded) -> dict:
    model_tok = _model_tokenizer(args, loaded)
    return {"model": {"path": str(Path(args.model).absolute()), "kind": loaded.kind,
                      "checkpoint": str(loaded.tag_dir.absolute()) if loaded.tag_dir else None, "step": loaded.step,
                      "config": loaded.cfg.model_dump(mode="json")},
            "tokenizer": {"path": str(Path(model_tok).absolute()), "vocab_size": loaded.cfg.vocab_size},
            "precision": "fp32", **_device_info(next(loaded.model.parameters()).device)}


def _device_info(device: torch.device) -> dict:
    return {"device": device.type, **({"device_name": torch.cuda.get_device_name(device)}
                                      if device.type == "cuda" else {})}


def _model_tokenizer(args, loaded) -> Path:
    """The model's tokenizer dir, once its vocabulary is known to be the model's."""
    model_tok = loaded.tokenizer_dir
    if model_tok is None:
        raise UserError(f"--model {args.model}: no tokenizer found (want the run's tokenizer/ dir, or vocab.txt in "
                        "the Hugging Face dir)")
    vocab = _vocab(model_tok, f"--model {args.model}")
    if len(vocab) != loaded.cfg.vocab_size:
        raise UserError(f"--model {args.model}: model vocab_size {loaded.cfg.vocab_size} but its tokenizer "
                        f"{model_tok} has {len(vocab)} tokens")
    return model_tok


def _blimp(args, loaded) -> dict:
    """BLiMP by pseudo-log-likelihood, with the count models of the reference's train split when one is known."""
    from training.blimp import evaluate_blimp, load as load_pairs
    from training.blimp.score import CountModels
    from training.data import tokenizer as tokenization
    from training.data.loader import PretrainingData

    pairs = load_pairs(args.blimp, args.per_paradigm)  # a bad source fails before any scoring
    model_tok = _model_tokenizer(args, loaded)
    vocab = _vocab(model_tok, f"--model {args.model}")
    try:
        ref_dir, ref_why = _reference_dir(args, loaded, _prepared_data_dir(args) if args.data else None)
    except UserError as err:
        if args.reference is not None:
            raise
        ref_dir, ref_why, counts, note = None, None, None, f"no count models: {err}"
    if ref_dir is not None:
        ref = PretrainingData(str(ref_dir))
        _check_same_vocab(_vocab(Path(ref.tokenizer_dir), f"--reference {ref_dir}"), vocab,
                          f"count models' reference {ref_dir} ({ref_why})", model_tok)
        counts, note = CountModels(ref.train_rows, len(vocab), vocab.index("[PAD]")), None
    variants = list(PLL_CHOICES[args.pll])
    result = evaluate_blimp(loaded.model, tokenization.load(str(model_tok)), args.blimp,
                            per_paradigm=args.per_paradigm, variants=variants, counts=counts,
                            mask_id=vocab.index("[MASK]"), pad_id=vocab.index("[PAD]"),
                            progress=sys.stderr.isatty(), paradigms=pairs)
    result["count_models_reference"] = ({"path": str(Path(ref_dir).absolute()), "why": ref_why, "split": "train"}
                                        if ref_dir is not None else None)
    if note:
        result["note"] = note
    return result


PLL_CHOICES = {"word": ("word",), "token": ("token",), "both": ("word", "token")}


def _heldout(args, loaded, prepared) -> dict:
    from tqdm import tqdm

    from training.data.loader import FIXED_MASK_PROBABILITY, FIXED_MASK_SEED, PretrainingData, fixed_mask_batch
    from training.model_io import run_data_dir

    cfg = loaded.cfg
    model_tok = _model_tokenizer(args, loaded)
    vocab = _vocab(model_tok, f"--model {args.model}")

    # The reference is known before the text is read: raw text is packed at the run's (else the reference's)
    # prepared length, what the model trained and was evaluated at.
    ref_dir, ref_why = _reference_dir(args, loaded, prepared)
    run_data = run_data_dir(loaded.run_dir) if loaded.run_dir is not None else None
    text_seq_len = (args.seq_len or (_prepared_seq_len(run_data) if run_data else None)
                    or _prepared_seq_len(ref_dir) or cfg.max_position)
    ids, sep, collator, seq_len, data_desc, data = _load_rows(args, loaded, model_tok, vocab, text_seq_len)
    if seq_len > cfg.max_position:
        raise UserError(f"--data {args.data[0]}: rows of {seq_len} tokens are longer than the model's max_position "
                        f"{cfg.max_position}")
    ref = data if data is not None and args.reference is None else PretrainingData(str(ref_dir))
    _check_same_vocab(_vocab(Path(ref.tokenizer_dir), f"--reference {ref_dir}"), vocab,
                      f"unigram reference {ref_dir} ({ref_why})", model_tok)

    n = len(sep) if args.max_rows is None else min(len(sep), args.max_rows)
    loss_sum = correct = count = unigram = 0.0
    model = loaded.model
    device = next(model.parameters()).device
    starts = range(0, n, args.batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="evaluating", unit="batch", disable=not sys.stderr.isatty()):
            rows = torch.arange(start, min(n, start + args.batch_size))
            batch = fixed_mask_batch(collator, ids, sep, rows, seq_len)  # on the CPU, as the unigram table
            out = model(**{k: v.to(device) for k, v in batch.items()})
            loss_sum += float(out["mlm_loss"].float()) * float(out["mlm_count"])
            correct += float(out["mlm_correct"])
            count += float(out["mlm_count"])
            unigram += ref.unigram_nll(batch["labels"])
    if count == 0:
        raise UserError(f"--data {' '.join(args.data)}: no masked position in {n} rows; nothing to score")
    loss, unigram = loss_sum / count, unigram / count
    return {
        "loss": loss, "accuracy": correct / count, "unigram_loss": unigram, "below_unigram": unigram - loss,
        # exp of the fixed-mask loss: the perplexity at those positions (not run_mlm.py's, which scores the
        # 80/10/10 training mask, whose copied tokens make it lower)
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "rows": n, "positions": int(count),
        **_model_info(args, loaded),
        "data": {**data_desc, "seq_len": seq_len, "max_rows": args.max_rows},
        "reference": {"path": str(ref_dir.absolute()), "why": ref_why, "split": "train"},
        "mask": {"seed": FIXED_MASK_SEED, "probability": FIXED_MASK_PROBABILITY, "replacement": "[MASK]"},
    }


def summary_line(r: dict, out: Path | None) -> str:
    from training.blimp import summary_text

    parts = []
    if "loss" in r:
        parts.append(f"on {r['rows']:,} rows ({r['positions']:,} fixed all-[MASK] positions): MLM loss "
                     f"{r['loss']:.4f} (perplexity {r['perplexity']:.2f}, exp of that loss) acc {r['accuracy']:.4f}; "
                     f"unigram table {r['unigram_loss']:.4f}, {r['below_unigram']:+.4f} nats below it")
    if "blimp" in r:
        parts.append(summary_text(r["blimp"]))
    return f"evaluated {r['model']['path']} " + "; ".join(parts) + (f" -> {out}" if out is not None else "")


def _write_json(path: Path, obj: dict) -> None:
    outdir.write_atomic(path, json.dumps(obj, indent=1) + "\n")


def build_parser(prog: str = "python -m training.evaluate"):
    from training import cli

    p = cli.parser(prog, __doc__)
    p.add_argument("--model", required=True, type=Path, help="run dir (its latest checkpoint), checkpoint tag dir, "
                                                               "or Hugging Face dir")
    p.add_argument("--data", nargs="+", help="a prepared data dir (its held-out split), or raw text files "
                                             "(.txt/.jsonl/.parquet, as prepare reads them): the held-out score")
    p.add_argument("--blimp", metavar="DIR|hf:NAME", help="BLiMP minimal pairs: a folder of <paradigm>.jsonl[.xz] "
                   "files, or a datasets name such as hf:nyu-mll/blimp (offline: from the datasets cache)")
    p.add_argument("--per-paradigm", type=cli_types.positive_int("--per-paradigm"), metavar="N", help="score N pairs of each paradigm, the same ones "
                   "every time (default: all)")
    p.add_argument("--pll", choices=tuple(PLL_CHOICES), default="word",
                   help="pseudo-log-likelihood: word (a word's later pieces masked too, Kauf & Ivanova 2023), "
                   "token (Salazar et al. 2020), or both")
    p.add_argument("--reference", type=Path, help="prepared data dir whose train split makes the unigram table "
                                                   "(default: a prepared --data dir, else the run's data.dir)")
    p.add_argument("--out", type=Path, help="also write the result as JSON here (default: print only)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the model runs: auto = the CUDA GPU when torch sees one, else the CPU")
    p.add_argument("--batch-size", type=cli_types.positive_int("--batch-size", MAX_BATCH_SIZE),
                   default=DEFAULT_BATCH_SIZE, help="rows per forward pass")
    p.add_argument("--max-rows", type=cli_types.positive_int("--max-rows"),
                   help="score only the first N rows (default: all)")
    p.add_argument("--seq-len", type=cli_types.seq_len(), help="row length for raw text (default: the run's or the "
                   "reference's)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if not args.data and not args.blimp:
        raise UserError("give --data (held-out score), --blimp (minimal pairs), or both")
    return args


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    _check_out(args)
    result = evaluate(args)  # no timing in it: two evaluations of one model write identical files
    if "loss" in result and not math.isfinite(result["loss"]):
        raise UserError(f"--model {args.model}: the loss is not finite ({result['loss']}); the weights are broken")
    if args.out is not None:
        _check_out(args)  # nobody wrote it meanwhile
        _write_json(args.out, result)
    print(summary_line(result, args.out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
