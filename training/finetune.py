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
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training import outdir
from training.errors import UserError, exit_on_user_error

MARKER = ".bert-finetune"
GLUE_DATASET = "nyu-mll/glue"
HOLDOUT_FRACTION, HOLDOUT_SEED = 0.1, 0
WEIGHT_DECAY = 0.01  # BERT's fine-tuning setting


@dataclass(frozen=True)
class GlueTask:
    columns: tuple[str, ...]  # (text,) or (text, text_pair)
    num_labels: int  # 1: regression
    eval_splits: tuple[str, ...]
    metrics: tuple[str, ...]


# From the GLUE definition (Wang et al. 2019, and the `nyu-mll/glue` dataset card): inputs, labels, metrics.
GLUE_TASKS = {
    "cola": GlueTask(("sentence",), 2, ("validation",), ("matthews_correlation",)),
    "sst2": GlueTask(("sentence",), 2, ("validation",), ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2, ("validation",), ("f1", "accuracy")),
    "qqp": GlueTask(("question1", "question2"), 2, ("validation",), ("f1", "accuracy")),
    "stsb": GlueTask(("sentence1", "sentence2"), 1, ("validation",), ("pearson", "spearmanr")),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("validation_matched", "validation_mismatched"), ("accuracy",)),
    "qnli": GlueTask(("question", "sentence"), 2, ("validation",), ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), 2, ("validation",), ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), 2, ("validation",), ("accuracy",)),
}


# ------------------------------------------------------------------ metrics
# Written here in numpy rather than taken from scikit-learn (not a dependency of this project) or the `evaluate`
# library (it downloads its metric scripts from the hub); Pearson and Spearman come from scipy, which gensim
# (a dependency) requires. Definitions and degenerate cases follow scikit-learn's.

def accuracy(preds, labels) -> float:
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def f1_binary(preds, labels) -> float:
    """F1 of class 1; 0.0 when there is no positive in either (scikit-learn's zero_division result)."""
    p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
    tp, fp, fn = np.sum(p & y), np.sum(p & ~y), np.sum(~p & y)
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corr(preds, labels) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004, as scikit-learn); 0.0 when undefined."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(preds, labels)
    conf = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(conf, (np.searchsorted(classes, labels), np.searchsorted(classes, preds)), 1)
    t, p = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    denom = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denom) if denom else 0.0


def _correlation(fn, preds, labels) -> float:
    import warnings

    with warnings.catch_warnings():  # a constant prediction: undefined (nan), reported as null, not a warning
        warnings.simplefilter("ignore")
        return float(fn(np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64))[0])


def pearson(preds, labels) -> float:
    from scipy.stats import pearsonr
    return _correlation(pearsonr, preds, labels)


def spearman(preds, labels) -> float:
    from scipy.stats import spearmanr
    return _correlation(spearmanr, preds, labels)


METRICS = {"accuracy": accuracy, "f1": f1_binary, "matthews_correlation": matthews_corr,
           "pearson": pearson, "spearmanr": spearman}


def score(metric_names, predictions, labels) -> dict:
    """Logits [N, K] (argmax) or regression outputs [N, 1] -> {metric: value}."""
    predictions = np.asarray(predictions)
    preds = predictions[:, 0] if predictions.shape[-1] == 1 else predictions.argmax(axis=-1)
    return {name: METRICS[name](preds, labels) for name in metric_names}


# ------------------------------------------------------------------ tasks

@dataclass
class Task:
    spec: str  # as given to --task
    name: str  # OUT/<name>
    train: object  # datasets.Dataset with columns text[, text_pair], label
    evals: dict  # split name -> datasets.Dataset
    num_labels: int  # 1: regression
    metrics: tuple[str, ...]
    label_names: list = field(default_factory=list)  # id -> original label (local string labels)
    source: dict = field(default_factory=dict)

    @property
    def regression(self) -> bool:
        return self.num_labels == 1


def _offline() -> bool:
    import datasets

    flags = [os.environ.get(k, "") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")]
    return any(f.upper() in ("1", "ON", "YES", "TRUE") for f in flags) or bool(
        getattr(datasets.config, "HF_HUB_OFFLINE", False))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def load_glue(spec: str, name: str) -> Task:
    import datasets

    if name not in GLUE_TASKS:
        raise UserError(f"--task {spec}: unknown GLUE task {name!r} (known: {', '.join(GLUE_TASKS)})")
    info = GLUE_TASKS[name]
    try:
        ds = datasets.load_dataset(GLUE_DATASET, name)
    except Exception as err:  # datasets raises many types here (connection, not found, offline, cache)
        if _offline():
            raise UserError(f"--task {spec}: cannot load {GLUE_DATASET} {name} offline (HF_DATASETS_OFFLINE or "
                            "HF_HUB_OFFLINE is set and it is not in the datasets cache): load it once with network "
                            f"access, or use csv:PATH ({_first_line(err)})") from None
        raise UserError(f"--task {spec}: cannot load {GLUE_DATASET} {name} ({_first_line(err)}; without network "
                        "access, a cached copy loads with HF_DATASETS_OFFLINE=1)") from None
    names = ("text", "text_pair")[:len(info.columns)]
    rename = dict(zip(info.columns, names))

    def prepared(split):
        keep = [*info.columns, "label"]
        return ds[split].select_columns(keep).rename_columns(rename)

    return Task(spec, name, prepared("train"), {s: prepared(s) for s in info.eval_splits}, info.num_labels,
                info.metrics, source={"dataset": GLUE_DATASET, "config": name})


def _local_files(spec: str) -> tuple[str, list[Path]]:
    """(datasets builder, [TRAIN] or [TRAIN, EVAL]) of csv:/jsonl: specs and bare .csv/.jsonl/.json paths."""
    kind, _, rest = spec.partition(":")
    if kind in ("csv", "jsonl", "json") and rest:
        builder = "csv" if kind == "csv" else "json"
    else:
        rest, builder = spec, ("csv" if spec.split(",")[0].endswith(".csv") else "json")
    files = [Path(p) for p in rest.split(",")]
    if len(files) > 2 or not all(str(p) for p in files):
        raise UserError(f"--task {spec}: want {builder}:TRAIN or {builder}:TRAIN,EVAL")
    for path in files:
        if not path.is_file():
            raise UserError(f"--task {spec}: no such file {path}")
    return builder, files


def _label_kind(spec: str, column) -> str:
    """'int', 'float' or 'str' from the Arrow type datasets inferred for the label column."""
    import pyarrow as pa

    t = column.type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t):
        return "str"
    raise UserError(f"--task {spec}: column `label` has type {t}; want integers, strings or floats")


def load_local(spec: str) -> Task:
    import datasets

    builder, files = _local_files(spec)
    data_files = {"train": str(files[0]), **({"eval": str(files[1])} if len(files) > 1 else {})}
    try:
        # Read into memory through a throw-away cache: a local file is small, and datasets' default cache
        # (~/.cache/huggingface/datasets) would keep a copy of every file ever given.
        with tempfile.TemporaryDirectory(prefix="finetune-load-") as cache:
            raw = datasets.load_dataset(builder, data_files=data_files, cache_dir=cache, keep_in_memory=True)
    except Exception as err:  # a malformed file: pyarrow / pandas parse errors of many types
        raise UserError(f"--task {spec}: cannot read {' '.join(map(str, files))} as {builder} "
                        f"({_first_line(err)})") from None
    for split, path in zip(raw, files):
        missing = [c for c in ("text", "label") if c not in raw[split].column_names]
        if missing:
            raise UserError(f"--task {spec}: {path} has no column {' or '.join(f'`{c}`' for c in missing)} "
                            f"(it has {', '.join(raw[split].column_names) or 'none'}); want text, "
                            "optional text_pair, label")
        if len(raw[split]) == 0:
            raise UserError(f"--task {spec}: {path} has no rows")
    pair = all("text_pair" in raw[s].column_names for s in raw)
    texts = ["text", "text_pair"] if pair else ["text"]
    raw = datasets.DatasetDict({s: d.select_columns([*texts, "label"]) for s, d in raw.items()})
    for split, path in zip(raw, files):
        for column in [*texts, "label"]:
            empty = raw[split].data.column(column).null_count
            if empty:
                raise UserError(f"--task {spec}: {path} has {empty} rows without a `{column}`")
    for column in texts:  # a column of numbers is text too
        raw = raw.cast_column(column, datasets.Value("string"))
    if "eval" not in raw:
        if len(raw["train"]) < 2:
            raise UserError(f"--task {spec}: {files[0]} has {len(raw['train'])} row; want at least 2 to hold out "
                            "an evaluation split, or give TRAIN,EVAL")
        raw = raw["train"].train_test_split(test_size=HOLDOUT_FRACTION, seed=HOLDOUT_SEED)
        raw = datasets.DatasetDict(train=raw["train"].flatten_indices(keep_in_memory=True),
                                   eval=raw["test"].flatten_indices(keep_in_memory=True))

    kinds = {_label_kind(spec, d.data.column("label")) for d in raw.values()}
    kind = "str" if "str" in kinds else "float" if "float" in kinds else "int"
    names: list = []
    if kind == "float":
        num_labels, metrics = 1, ("pearson", "spearmanr")
        raw = raw.cast_column("label", datasets.Value("float32"))
    elif kind == "str":  # casting strings to a ClassLabel maps each to its index in `names`
        raw = raw.cast_column("label", datasets.Value("string"))
        names = sorted({v for d in raw.values() for v in d.unique("label")})
        raw = raw.cast_column("label", datasets.ClassLabel(names=names))
        num_labels = len(names)
    else:
        values = np.concatenate([d.data.column("label").to_numpy() for d in raw.values()])
        if values.min() < 0:
            raise UserError(f"--task {spec}: integer label {values.min()} is negative; want class ids 0..K-1")
        num_labels = int(values.max()) + 1
    if kind != "float":
        seen = {v for d in raw.values() for v in d.unique("label")}
        if len(seen) < 2:
            raise UserError(f"--task {spec}: every label is {names[0] if names else next(iter(seen))}; want at "
                            "least two classes")
        metrics = ("accuracy", "f1", "matthews_correlation") if num_labels == 2 else ("accuracy",)
    name = files[0].stem
    return Task(spec, name, raw["train"], {"eval": raw["eval"]}, num_labels, metrics, names,
                source={"files": [str(p.absolute()) for p in files], "format": builder,
                        "held_out": None if len(files) > 1 else {"fraction": HOLDOUT_FRACTION, "seed": HOLDOUT_SEED}})


def load_task(spec: str) -> Task:
    if spec.startswith(("glue/", "glue:")):
        return load_glue(spec, spec[5:])
    kind, _, rest = spec.partition(":")
    if (kind in ("csv", "jsonl", "json") and rest) or spec.split(",")[0].endswith((".csv", ".jsonl", ".json")):
        return load_local(spec)
    raise UserError(f"--task {spec}: unknown task; want glue/NAME ({', '.join(GLUE_TASKS)}), csv:PATH[,EVAL] "
                    "or jsonl:PATH[,EVAL]")


def load_tasks(specs: list[str]) -> list[Task]:
    tasks, seen = [], {}
    for spec in specs:
        task = load_task(spec)
        if task.name in seen:
            raise UserError(f"--task {spec}: writes OUT/{task.name}, as --task {seen[task.name]} does; rename "
                            "one of the files")
        seen[task.name] = spec
        tasks.append(task)
    return tasks


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


def jsonable(obj):
    """JSON has no NaN: an undefined value (a correlation of a constant prediction, a diverged loss) is null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


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
    targs = TrainingArguments(
        output_dir=str(out_dir), num_train_epochs=args.epochs, max_steps=args.max_steps or -1,
        learning_rate=args.lr, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.batch_size,
        warmup_steps=args.warmup, weight_decay=WEIGHT_DECAY, seed=seed, data_seed=seed, bf16=bf16_ok(),
        use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", eval_strategy="no",
        logging_strategy="steps", logging_steps=args.log_every, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, processing_class=tokenizer,
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
    tokenizer, config = load_tokenizer(args.model)  # cheap checks first: nothing is written before all pass
    limit = max_positions(config)
    max_len = args.max_seq_len or min(128, limit)
    if max_len > limit:
        raise UserError(f"--max-seq-len {max_len}: more than the model's {limit} positions")
    check_out(args.out, args.overwrite, [("--model", str(args.model))])  # before loading GLUE: that may be slow
    tasks = load_tasks(args.task)
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
                "label_names": task.label_names, "metrics": list(task.metrics), "train_rows": len(task.train),
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

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m training.finetune", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model dir (training.export's output)")
    p.add_argument("--task", required=True, nargs="+", action="extend",
                   help="glue/NAME, csv:TRAIN[,EVAL] or jsonl:TRAIN[,EVAL]; several run in turn")
    p.add_argument("--out", type=Path, help="output dir (default runs/finetune/<model dir name>)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, nargs="+", default=None, help="one or more seeds (default 0)")
    p.add_argument("--max-seq-len", type=int, help="truncate inputs to N tokens (default min(128, the model's))")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up: a fraction of the steps, or steps if >= 1")
    p.add_argument("--log-every", type=int, default=50, help="log the training loss every N steps")
    p.add_argument("--save-model", action="store_true", help="save each fine-tuned model to OUT/<task>/seed<k>/model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out written by this command")
    args = p.parse_args(argv)
    args.seed = list(dict.fromkeys(args.seed or [0]))
    args.task = list(dict.fromkeys(args.task))
    if args.out is None:  # a run's export (RUN/hf) is named after the run
        model = args.model.absolute()
        args.out = Path("runs/finetune") / (model.parent.name if model.name == "hf" else model.name)
    for name, low in (("batch_size", 1), ("max_seq_len", 8), ("max_steps", 1), ("log_every", 1)):
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
