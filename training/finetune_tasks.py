"""The tasks and metrics of `python -m training.finetune`: what each --task reads and how it is scored.

GLUE tasks (`glue/NAME`) load with `datasets.load_dataset("nyu-mll/glue", NAME)`, columns renamed to text[,
text_pair] and label, with the GLUE metric(s) of each (GLUE_TASKS). Local tasks (`csv:TRAIN[,EVAL]`,
`jsonl:TRAIN[,EVAL]`, or a bare .csv / .jsonl / .json path) read columns text, optional text_pair and label;
integer labels 0..K-1 are class ids, other integers and strings map to ids in sorted order (at most
MAX_CLASSES), finite floats make a regression task; without EVAL a fixed 10% of TRAIN is held out. The metrics
(accuracy, F1 of class 1, Matthews correlation, Pearson, Spearman) are written here in numpy / scipy; `jsonable`
writes an undefined one as null.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.errors import UserError
from training.errors import first_line as _first_line

GLUE_DATASET = "nyu-mll/glue"
HOLDOUT_FRACTION, HOLDOUT_SEED = 0.1, 0
MAX_CLASSES = 10_000  # a classification head over more is an id column or a regression target read as classes


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


def jsonable(obj):
    """JSON has no NaN: an undefined value (a correlation of a constant prediction, a diverged loss) is null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


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


def _check_finite(spec: str, raw, files) -> None:
    """Regression targets must be numbers: an inf or NaN label makes every loss and metric NaN."""
    for split, path in zip(raw, files):
        values = raw[split].data.column("label").to_numpy(zero_copy_only=False).astype(np.float64)
        bad = np.nonzero(~np.isfinite(values))[0]
        if len(bad):
            raise UserError(f"--task {spec}: {path} has {len(bad)} rows whose `label` is not a finite number (data "
                            f"row {bad[0] + 1}: {values[bad[0]]}); regression targets must be finite")


def _class_ids(spec: str, raw, kind: str):
    """(raw with `label` as class ids 0..K-1, label names, K). Strings map to ids in sorted order; integers that are
    already 0..K-1 stay as they are (names empty), other integers (1..5 stars, -1/1, ids like 10^12) map to ids in
    numeric order, their values kept as names. More than MAX_CLASSES classes is refused: a head that size is an
    id or a regression target read as classes, not a classification task."""
    import datasets

    if kind == "str":
        raw = raw.cast_column("label", datasets.Value("string"))
        values = sorted({v for d in raw.values() for v in d.unique("label")})
    else:
        values = sorted({int(v) for d in raw.values() for v in d.unique("label")})
    if len(values) < 2:
        raise UserError(f"--task {spec}: every label is {values[0]}; want at least two classes")
    if len(values) > MAX_CLASSES:
        raise UserError(f"--task {spec}: {len(values):,} distinct labels, more than {MAX_CLASSES:,} classes; is "
                        "`label` an id, or a number to regress (float labels make a regression task)?")
    if kind == "int" and values == list(range(len(values))):
        return raw, [], len(values)
    names = [str(v) for v in values]
    if kind == "int":  # by name, in numeric order: casting integers to a ClassLabel would read them as ids
        raw = raw.cast_column("label", datasets.Value("string"))
    return raw.cast_column("label", datasets.ClassLabel(names=names)), names, len(names)


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
    kinds = {_label_kind(spec, d.data.column("label")) for d in raw.values()}
    kind = "str" if "str" in kinds else "float" if "float" in kinds else "int"
    if kind == "float":  # before a held-out split is drawn: the rows named are the file's
        _check_finite(spec, raw, files)
    if "eval" not in raw:
        if len(raw["train"]) < 2:
            raise UserError(f"--task {spec}: {files[0]} has {len(raw['train'])} row; want at least 2 to hold out "
                            "an evaluation split, or give TRAIN,EVAL")
        raw = raw["train"].train_test_split(test_size=HOLDOUT_FRACTION, seed=HOLDOUT_SEED)
        raw = datasets.DatasetDict(train=raw["train"].flatten_indices(keep_in_memory=True),
                                   eval=raw["test"].flatten_indices(keep_in_memory=True))

    if kind == "float":
        num_labels, metrics, names = 1, ("pearson", "spearmanr"), []
        raw = raw.cast_column("label", datasets.Value("float32"))
    else:
        raw, names, num_labels = _class_ids(spec, raw, kind)
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
