"""Fine-tune an exported model on GLUE or a local classification / regression task with transformers' Trainer.

    python -m training.finetune --model HF_DIR --task glue/sst2 [glue/mrpc ...] [csv:TRAIN[,EVAL] ...] \
        [--out DIR] [--epochs 3] [--lr 2e-5] [--batch-size 32] [--seed 0 [1 2 ...]] [--max-seq-len 128] \
        [--max-steps N] [--warmup 0.1] [--save-model] [--overwrite]

--model: a Hugging Face model dir (`python -m training.export`, or a run's OUT/hf): a Post-LN export loads as
BertForSequenceClassification, a Pre-LN one as RobertaPreLayerNormForSequenceClassification (a new head on
top; AutoTokenizer reads the dir's WordPiece tokenizer).
--task (several, run in turn; each with every --seed):
  glue/NAME   cola sst2 mrpc qqp stsb mnli qnli rte wnli, loaded with `datasets.load_dataset("nyu-mll/glue",
              NAME)` (the hub, or the datasets cache when offline); trained on `train`, scored on its
              validation split(s) with the GLUE metric(s): cola Matthews correlation, mrpc/qqp F1 and
              accuracy, stsb Pearson and Spearman (regression), mnli accuracy on validation_matched and
              validation_mismatched, the others accuracy.
  csv:TRAIN[,EVAL] / jsonl:TRAIN[,EVAL] (or a path ending .csv / .jsonl / .json): columns `text`, optional
              `text_pair`, `label`. Integer labels 0..K-1 are class ids; other integers and strings are
              mapped to ids in sorted order (at most 10,000 classes); finite floats make a regression task.
              Without EVAL, a fixed 10% of TRAIN's rows (seed 0, the same rows for every --seed) is held out
              for evaluation. Scored with accuracy (and F1 of class 1 and Matthews correlation for two
              classes), or Pearson / Spearman for regression.
Output: OUT/<task>/seed<k>/ (the Trainer's output_dir: metrics.json, the model with --save-model) and
OUT/results.json (every task x seed's metrics, their means over seeds, the command, the machine), rewritten
after each seed; a table is printed at the end. OUT (default runs/finetune/<model dir name>) is never
overwritten without --overwrite, which replaces only a directory this command wrote (its .bert-finetune
marker); the previous one is moved aside and deleted when the new sweep completes (put back if it fails or is
stopped by SIGTERM / Ctrl-C; a sweep that does not complete leaves its partial output in OUT.failed-<pid>).

This module is the command: the model and tokenizer checks, the output dir, the Trainer loop and results.json.
What each --task reads and how it is scored (GLUE_TASKS, the local-file readers, the metrics) is in
training/finetune_tasks.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np

from training import cli_types, outdir
from training.errors import UserError, exit_on_user_error
from training.finetune_tasks import Task, _first_line, check_metrics_available, jsonable, load_tasks, score

MARKER = ".bert-finetune"
WEIGHT_DECAY = 0.01  # BERT's fine-tuning setting
MAX_EPOCHS = 1e4  # more is a typo (and a run that never ends)
MAX_BATCH_SIZE = 1 << 16


# ------------------------------------------------------------------ the model

def max_positions(config) -> int:
    """Tokens one sequence may hold: RoBERTa-style models (our Pre-LN export) spend pad_token_id + 1 rows."""
    n = int(getattr(config, "max_position_embeddings", 512))
    if config.model_type.startswith("roberta") or config.model_type in ("xlm-roberta", "camembert"):
        n -= int(config.pad_token_id or 0) + 1
    return n


def load_tokenizer(model: Path):
    """The model dir's tokenizer and config, refusing a tokenizer that does not fit the embedding table."""
    from transformers import AutoConfig, AutoTokenizer

    from training.model.hf_dir import open_hf_dir

    open_hf_dir(model, "--model")  # the check every reader of an HF dir shares: config.json and the weights
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as err:  # transformers raises OSError / ValueError / KeyError for bad configs
        raise UserError(f"--model {model}: cannot read config.json ({_first_line(err)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as err:
        raise UserError(f"--model {model}: no usable tokenizer in it ({_first_line(err)})") from None
    if len(tokenizer) != config.vocab_size:
        raise UserError(f"--model {model}: its tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                        f"{config.vocab_size}: the tokenizer belongs to another model")
    return tokenizer, config


def load_classifier(model: Path, task: Task):
    from transformers import AutoModelForSequenceClassification

    kwargs = {"num_labels": task.num_labels,
              "problem_type": "regression" if task.regression else "single_label_classification"}
    if task.label_names:
        kwargs.update(id2label=dict(enumerate(task.label_names)),
                      label2id={n: i for i, n in enumerate(task.label_names)})
    try:
        return AutoModelForSequenceClassification.from_pretrained(model, **kwargs)
    except Exception as err:  # an architecture without a classification head, broken weights...
        raise UserError(f"--model {model}: cannot load for sequence classification ({_first_line(err)})") from None


def tokenize(task: Task, tokenizer, max_len: int):
    pair = "text_pair" in task.train.column_names

    def encode(batch):
        return tokenizer(batch["text"], batch["text_pair"] if pair else None, truncation=True, max_length=max_len)

    def run(ds, what):
        return ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c != "label"],
                      desc=f"tokenising {task.name} {what}")

    return run(task.train, "train"), {s: run(d, s) for s, d in task.evals.items()}


# ------------------------------------------------------------------ the output dir

def leftovers(out: Path) -> list[Path]:
    """Earlier sweeps of OUT that an --overwrite moved aside and, killed, never deleted or put back: the
    OUT.replaced-* siblings OUT's marker names."""
    named = (outdir.read_marker(out, MARKER) or {}).get("replaces") or []
    named = [named] if isinstance(named, str) else named
    return [Path(p) for p in named if isinstance(p, str) and outdir.is_replaced_of(Path(p), out) and Path(p).is_dir()]


def check_out(out: Path, overwrite: bool, inputs) -> bool:
    """True when --overwrite is to replace a previous sweep in `out`; refuses everything else that exists, and an
    `out` that is, holds or lies inside an input."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    outdir.check_unlocked(out, "--out")
    outdir.check_no_clash("--out", out, inputs)
    if not outdir.entries(out):
        return False
    if not overwrite:
        aside = leftovers(out)
        raise UserError(f"--out {out}: directory exists and is not empty (pass --overwrite to replace it)" +
                        (f"; {aside[0]} holds the sweep an interrupted --overwrite moved aside" if aside else ""))
    if outdir.read_marker(out, MARKER) is None:
        raise UserError(f"--out {out}: has no {MARKER} marker, so it is not recognisably the output of "
                        "training.finetune and --overwrite will not delete it: delete it by hand, or pick another "
                        "--out")
    return True


class OutClaim:
    """OUT locked for this process; with --overwrite the previous sweep moved aside, deleted by `done()`, put
    back by `failed()` (this sweep's partial output goes to OUT.failed-<pid> in any case). `failed()` also runs on
    SIGTERM / Ctrl-C (training/errors.py makes them exceptions). Only a SIGKILL leaves the previous sweep at
    OUT.replaced-*: OUT's marker names it, and the next --overwrite of OUT says so and deletes it with its own
    previous sweep when it completes."""

    def __init__(self, out: Path, replacing: bool):
        self.out, self.aside = out, None
        self.pending = leftovers(out) if replacing else []
        try:
            if replacing:
                self.aside = outdir.replaced_name(out.absolute())
                os.rename(out, self.aside)
            self.lock = outdir.DirLock(out, "--out").acquire()
            outdir.write_marker(out, MARKER, written_by="training.finetune",
                                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                replaces=[str(p) for p in [self.aside, *self.pending] if p is not None])
        except OSError as err:
            if self.aside is not None:
                self._put_back()
            raise UserError(outdir.oserror_line(f"--out {out}", err)) from None
        except UserError:  # another process took OUT meanwhile
            if self.aside is not None:
                self._put_back()
            raise
        for old in self.pending:
            print(f"warning: {old}: a sweep of {out} an interrupted --overwrite moved aside; deleted when this "
                  "sweep completes (move it back by hand to keep it)", file=sys.stderr, flush=True)

    def _put_back(self) -> None:
        """This sweep's partial output goes to OUT.failed-<pid> (nothing half-written stays in OUT) and the
        previous sweep, if one was moved aside, comes back."""
        failed = self.out.with_name(f"{self.out.name}.failed-{os.getpid()}")
        if self.aside is not None and not self.aside.is_dir():
            return
        if self.out.exists():
            os.rename(self.out, failed)
        if self.aside is not None:
            os.rename(self.aside, self.out)
        print("warning: the fine-tuning did not complete; " +
              (f"the previous {self.out} is back; " if self.aside is not None else "") +
              (f"this one's partial output is in {failed}" if failed.exists() else "it wrote nothing"),
              file=sys.stderr, flush=True)

    def done(self) -> None:
        self.lock.release()
        for old in [self.aside, *self.pending]:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def failed(self) -> None:
        self.lock.release()
        self._put_back()


def write_json(path: Path, obj) -> None:
    outdir.write_atomic(path, json.dumps(jsonable(obj), indent=1, allow_nan=False) + "\n")


# ------------------------------------------------------------------ training

def machine() -> dict:
    import datasets
    import torch
    import transformers

    return {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "cpus": os.cpu_count()}


def bf16_ok() -> bool:
    import torch
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def train_one(args, task: Task, tokenizer, encoded, seed: int, out_dir: Path) -> dict:
    """Fine-tune from --model with `seed` and score every eval split: {split: {metric: value, "loss": ...}}."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    train_ds, eval_ds = encoded
    set_seed(seed)  # the new head's initialisation too
    model = load_classifier(args.model, task)
    # Evaluated during training (every epoch, or every --eval-every steps) on the first eval split, and logged
    # to TensorBoard (OUT/<task>/seed<k>/runs/) as run_glue.py users expect; the final scores below are separate.
    during = {"eval_strategy": "steps", "eval_steps": args.eval_every} if args.eval_every else \
        {"eval_strategy": "epoch"}
    targs = TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        learning_rate=args.lr, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        warmup_steps=args.warmup, weight_decay=WEIGHT_DECAY, seed=seed, data_seed=seed, bf16=bf16_ok(),
        use_cpu=not torch.cuda.is_available(), report_to=args.report_to, save_strategy="no", **during,
        logging_strategy="steps", logging_steps=args.log_every, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=next(iter(eval_ds.values())),
                      processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      compute_metrics=lambda p: score(task.metrics, p.predictions, p.label_ids))
    start = time.time()
    state = trainer.train()
    result = {"train_loss": state.training_loss, "steps": state.global_step,
              "train_seconds": round(time.time() - start, 1)}
    for split, ds in eval_ds.items():
        m = trainer.evaluate(eval_dataset=ds, metric_key_prefix="eval")
        result[split] = jsonable({k[len("eval_"):]: float(v) for k, v in m.items()
                                  if k[len("eval_"):] in (*task.metrics, "loss")})
    if args.save_model:
        trainer.save_model(str(out_dir / "model"))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", result)
    return result


def means(seeds: dict, task: Task) -> dict:
    out = {}
    for split in task.evals:
        out[split] = {}
        for name in task.metrics:
            values = [r[split][name] for r in seeds.values() if r[split].get(name) is not None]
            out[split][name] = float(np.mean(values)) if values else None
    return out


def table(results: dict) -> str:
    rows = [("task", "split", "metric", "seeds", "mean")]
    for name, t in results["tasks"].items():
        for split, metrics in t["mean"].items():
            for metric, mean in metrics.items():
                per_seed = " ".join("-" if r[split][metric] is None else f"{r[split][metric]:.4f}"
                                    for r in t["seeds"].values())
                rows.append((name, split, metric, per_seed, "-" if mean is None else f"{mean:.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def finetune(args, argv) -> dict:
    check_metrics_available()
    for logger in args.report_to:  # a missing logger package: one line now, not a crash after the model loads
        if logger not in ("none", "all") and importlib.util.find_spec(logger) is None:
            raise UserError(f"--report-to {logger}: the {logger} package is not installed here (pip install {logger}, "
                            "or leave it out)")
    tokenizer, config = load_tokenizer(args.model)  # cheap checks first: nothing is written before all pass
    limit = max_positions(config)
    max_len = args.max_seq_len or min(128, limit)
    if max_len > limit:
        raise UserError(f"--max-seq-len {max_len}: more than the model's {limit} positions")
    check_out(args.out, args.overwrite, [("--model", str(args.model))])  # before loading GLUE: that may be slow
    tasks = load_tasks(args.task, args.task_name)
    inputs = [("--model", str(args.model))] + [("--task", f) for t in tasks for f in t.source.get("files", [])]
    replacing = check_out(args.out, args.overwrite, inputs)

    results = {"command": ["python", "-m", "training.finetune", *argv], "machine": machine(),
               "model": str(args.model.absolute()), "model_type": config.model_type,
               "settings": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
                            "max_seq_len": max_len, "max_steps": args.max_steps, "warmup": args.warmup,
                            "weight_decay": WEIGHT_DECAY, "seeds": args.seed,
                            "precision": "bf16" if bf16_ok() else "fp32"},
               "tasks": {}, "complete": False}
    claim = OutClaim(args.out, replacing)
    try:
        for task in tasks:
            encoded = tokenize(task, tokenizer, max_len)
            entry = results["tasks"][task.name] = {
                "task": task.spec, "source": task.source, "num_labels": task.num_labels,
                "label_names": task.label_names, "metrics": list(task.metrics),
                **({"f1_positive_class": task.positive_class} if task.positive_class else {}),
                "train_rows": len(task.train),
                "eval_rows": {s: len(d) for s, d in task.evals.items()}, "seeds": {}, "mean": {}}
            for seed in args.seed:
                print(f"fine-tuning {task.name} ({task.spec}), seed {seed}", file=sys.stderr, flush=True)
                entry["seeds"][str(seed)] = train_one(args, task, tokenizer, encoded, seed,
                                                      args.out / task.name / f"seed{seed}")
                entry["mean"] = means(entry["seeds"], task)
                write_json(args.out / "results.json", results)
        results["complete"] = True
        write_json(args.out / "results.json", results)
    except BaseException as err:
        reason = outdir.fs_failure(err, args.out) if isinstance(err, Exception) else None  # a full disk...
        claim.failed()
        if reason is None:
            raise
        raise UserError(f"--out {args.out}: {reason}") from None
    claim.done()
    return results


# ------------------------------------------------------------------ command line

def build_parser(prog: str = "python -m training.finetune"):
    from training import cli

    p = cli.parser(prog, __doc__)
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model dir (training.export's output)")
    p.add_argument("--task", required=True, nargs="+", action="extend",
                   help="glue/NAME, csv:TRAIN[,EVAL] or jsonl:TRAIN[,EVAL]; several run in turn")
    p.add_argument("--out", type=Path, help="output dir (default runs/finetune/<model dir name>)")
    p.add_argument("--epochs", type=cli_types.positive_float("--epochs", MAX_EPOCHS), default=3.0,
                   help="training epochs over each task's train split")
    p.add_argument("--lr", type=cli_types.positive_float("--lr", 1.0), default=2e-5,
                   help="peak learning rate (BERT-base's; small models want more)")
    p.add_argument("--batch-size", type=cli_types.positive_int("--batch-size", MAX_BATCH_SIZE), default=32,
                   help="examples per optimizer step")
    p.add_argument("--seed", type=cli_types.seed(), nargs="+", default=None, help="one or more seeds (default 0)")
    p.add_argument("--max-seq-len", type=cli_types.seq_len("--max-seq-len"),
                   help="truncate inputs to N tokens (default min(128, the model's))")
    p.add_argument("--max-steps", type=cli_types.positive_int("--max-steps"),
                   help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--warmup", type=cli_types.non_negative_float("--warmup"), default=0.1,
                   help="warm-up: a fraction of the steps, or steps if >= 1")
    p.add_argument("--task-name", nargs="+", metavar="NAME",
                   help="one name per --task, in order: names OUT/<name> and the results (default: GLUE's name, a "
                        "local file's stem, or its folder's name when the stem is train/dev/...)")
    p.add_argument("--log-every", type=cli_types.positive_int("--log-every"), default=50,
                   help="log the training loss every N steps")
    p.add_argument("--eval-every", type=cli_types.positive_int("--eval-every"), metavar="N",
                   help="evaluate on the (first) eval split every N steps during training (default: every epoch)")
    p.add_argument("--report-to", nargs="*", default=["tensorboard"], metavar="LOGGER",
                   help="the Trainer's loggers (tensorboard: OUT/<task>/seed<k>/runs/; wandb, ...; none: give the "
                        "flag alone)")
    p.add_argument("--save-model", action="store_true", help="save each fine-tuned model to OUT/<task>/seed<k>/model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out written by this command")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.seed = list(dict.fromkeys(args.seed or [0]))
    args.task = list(dict.fromkeys(args.task))
    if args.out is None:  # a run's export (RUN/hf) is named after the run
        model = args.model.absolute()
        args.out = Path("runs/finetune") / (model.parent.name if model.name == "hf" else model.name)
    return args


@exit_on_user_error
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    results = finetune(args, argv)
    print(table(results), flush=True)
    print(f"results: {args.out / 'results.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
