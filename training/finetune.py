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
              `text_pair`, `label`. Integer labels are class ids, strings are mapped to ids in sorted order,
              floats make a regression task. Without EVAL, a fixed 10% of TRAIN's rows (seed 0, the same
              rows for every --seed) is held out for evaluation. Scored with accuracy (and F1 of class 1 and
              Matthews correlation for two classes), or Pearson / Spearman for regression.
Output: OUT/<task>/seed<k>/ (the Trainer's output_dir: metrics.json, the model with --save-model) and
OUT/results.json (every task x seed's metrics, their means over seeds, the command, the machine), rewritten
after each seed; a table is printed at the end. OUT (default runs/finetune/<model dir name>) is never
overwritten without --overwrite, which replaces only a directory this command wrote (its .bert-finetune
marker); the previous one is moved aside and deleted when the new sweep completes (put back if it fails).

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

from training import outdir
from training.errors import UserError, exit_on_user_error
from training.finetune_tasks import Task, _first_line, check_metrics_available, jsonable, load_tasks, score

MARKER = ".bert-finetune"
WEIGHT_DECAY = 0.01  # BERT's fine-tuning setting


# ------------------------------------------------------------------ the model

def check_model_dir(model: Path) -> None:
    if not model.is_dir():
        raise UserError(f"--model {model}: no such directory")
    if not (model / "config.json").is_file():
        hint = f" (the run's export is {model / 'hf'})" if (model / "hf" / "config.json").is_file() else \
            " (export a run with `python -m training.export`)"
        raise UserError(f"--model {model}: not a Hugging Face model dir, no config.json{hint}")


def max_positions(config) -> int:
    """Tokens one sequence may hold: RoBERTa-style models (our Pre-LN export) spend pad_token_id + 1 rows."""
    n = int(getattr(config, "max_position_embeddings", 512))
    if config.model_type.startswith("roberta") or config.model_type in ("xlm-roberta", "camembert"):
        n -= int(config.pad_token_id or 0) + 1
    return n


def load_tokenizer(model: Path):
    """The model dir's tokenizer and config, refusing a tokenizer that does not fit the embedding table."""
    from transformers import AutoConfig, AutoTokenizer

    check_model_dir(model)
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

def check_out(out: Path, overwrite: bool, inputs) -> bool:
    """True when --overwrite is to replace a previous sweep in `out`; refuses everything else that exists."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    outdir.check_unlocked(out, "--out")
    if not outdir.entries(out):
        return False
    if not overwrite:
        raise UserError(f"--out {out}: directory exists and is not empty (pass --overwrite to replace it)")
    outdir.check_holds_no_input(out, inputs, "--out")
    if outdir.read_marker(out, MARKER) is None:
        raise UserError(f"--out {out}: has no {MARKER} marker, so it is not recognisably the output of "
                        "training.finetune and --overwrite will not delete it: delete it by hand, or pick another "
                        "--out")
    return True


class OutClaim:
    """OUT locked for this process; with --overwrite the previous sweep moved aside, deleted by `done()`, put
    back by `failed()` (this sweep's partial output then goes to OUT.failed-<pid>)."""

    def __init__(self, out: Path, replacing: bool):
        self.out, self.aside = out, None
        try:
            if replacing:
                self.aside = outdir.replaced_name(out.absolute())
                os.rename(out, self.aside)
            self.lock = outdir.DirLock(out, "--out").acquire()
            outdir.write_marker(out, MARKER, written_by="training.finetune",
                                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), replaces=str(self.aside or ""))
        except OSError as err:
            self._put_back()
            raise UserError(outdir.oserror_line(f"--out {out}", err)) from None
        except UserError:  # another process took OUT meanwhile
            self._put_back()
            raise

    def _put_back(self) -> None:
        if self.aside is None or not self.aside.is_dir():
            return
        if self.out.exists():
            os.rename(self.out, self.out.with_name(f"{self.out.name}.failed-{os.getpid()}"))
        os.rename(self.aside, self.out)
        print(f"warning: the fine-tuning failed; the previous {self.out} is back (this one's partial output: "
              f"{self.out.name}.failed-{os.getpid()})", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.lock.release()
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)

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
    except OSError as err:
        claim.failed()
        raise UserError(outdir.oserror_line(f"--out {args.out}", err)) from None
    except BaseException:
        claim.failed()
        raise
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
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs over each task's train split")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (BERT-base's; small models want more)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument("--seed", type=int, nargs="+", default=None, help="one or more seeds (default 0)")
    p.add_argument("--max-seq-len", type=int, help="truncate inputs to N tokens (default min(128, the model's))")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up: a fraction of the steps, or steps if >= 1")
    p.add_argument("--task-name", nargs="+", metavar="NAME",
                   help="one name per --task, in order: names OUT/<name> and the results (default: GLUE's name, a "
                        "local file's stem, or its folder's name when the stem is train/dev/...)")
    p.add_argument("--log-every", type=int, default=50, help="log the training loss every N steps")
    p.add_argument("--eval-every", type=int, metavar="N",
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
    for name, low in (("batch_size", 1), ("max_seq_len", 8), ("max_steps", 1), ("log_every", 1), ("eval_every", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UserError(f"--{name.replace('_', '-')} {value}: must be at least {low}")
    for name in ("epochs", "lr"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name} {getattr(args, name)}: must be positive")
    if args.warmup < 0:
        raise UserError(f"--warmup {args.warmup}: must not be negative")
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
