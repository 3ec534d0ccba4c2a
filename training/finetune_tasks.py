"""The tasks and metrics of `python -m training.finetune`: what each --task reads and how it is scored.

GLUE tasks (`glue/NAME`) load with `datasets.load_dataset("nyu-mll/glue", NAME)`, columns renamed to text[,
text_pair] and label, with the GLUE metric(s) of each (GLUE_TASKS). Local tasks (`csv:TRAIN[,EVAL]`,
`jsonl:TRAIN[,EVAL]`, or a bare .csv / .jsonl / .json path) read columns text, optional text_pair and label;
integer labels 0..K-1 are class ids, other integers and strings map to ids in sorted order (at most
MAX_CLASSES), finite floats make a regression task; without EVAL a fixed 10% of TRAIN is held out; a local task is
named after its TRAIN file's stem (its folder's name when the stem only names a split: train.csv in sst/ is `sst`)
or after --task-name. The metrics come from scikit-learn (accuracy, F1 of the positive class = label id 1, whose
name each task states, Matthews correlation) and scipy (Pearson, Spearman), the libraries GLUE's reference scorer
and `evaluate` use; `jsonable`
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
POSITIVE_ID = 1  # F1's positive class: mrpc's "equivalent", qqp's "duplicate", a local task's second label
# A local TRAIN file whose stem only names a split: the task takes its folder's name instead.
SPLIT_STEMS = ("train", "training", "dev", "eval", "valid", "validation", "test", "data")
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
# scikit-learn's (a maintained implementation, with its documented degenerate cases: F1 and MCC are 0.0 where
# undefined) and scipy's; the functions take (predictions, labels).

def check_metrics_available() -> None:
    """scikit-learn scores the fine-tuned models: refuse at the start, not after the training, when it is
    missing."""
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise UserError("training.finetune scores with scikit-learn, which is not installed here (pip install "
                        "scikit-learn; requirements.txt pins it)")


def accuracy(preds, labels) -> float:
    from sklearn.metrics import accuracy_score
    return float(accuracy_score(np.asarray(labels), np.asarray(preds)))


def f1_binary(preds, labels) -> float:
    """F1 of the positive class, label id 1 (POSITIVE_ID); 0.0 when there is no positive in either."""
    from sklearn.metrics import f1_score
    return float(f1_score(np.asarray(labels), np.asarray(preds), pos_label=POSITIVE_ID, average="binary",
                          zero_division=0.0))


def matthews_corr(preds, labels) -> float:
    """Matthews correlation (multi-class: Gorodkin 2004); 0.0 when undefined."""
    from sklearn.metrics import matthews_corrcoef
    return float(matthews_corrcoef(np.asarray(labels), np.asarray(preds)))


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

    @property
    def positive_class(self):
        """What F1 counts as positive (label id 1, by name where the labels have names), or None without F1."""
        if "f1" not in self.metrics:
            return None
        name = self.label_names[POSITIVE_ID] if len(self.label_names) > POSITIVE_ID else str(POSITIVE_ID)
        return {"id": POSITIVE_ID, "label": name}


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

    label = ds["train"].features["label"]
    names = list(getattr(label, "names", []) or [])  # ClassLabel names (mrpc: not_equivalent, equivalent)
    return Task(spec, name, prepared("train"), {s: prepared(s) for s in info.eval_splits}, info.num_labels,
                info.metrics, names, source={"dataset": GLUE_DATASET, "config": name})


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
    stem = files[0].stem
    name = files[0].absolute().parent.name if stem.lower() in SPLIT_STEMS and files[0].absolute().parent.name \
        else stem
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


def load_tasks(specs: list[str], names: list[str] | None = None) -> list[Task]:
    """The tasks of --task, named by --task-name (one per --task, in order) where given."""
    if names and len(names) != len(specs):
        raise UserError(f"--task-name: {len(names)} names for {len(specs)} tasks; give one name per --task")
    tasks, seen = [], {}
    for i, spec in enumerate(specs):
        task = load_task(spec)
        if names:
            if not names[i] or "/" in names[i] or names[i] in (".", ".."):
                raise UserError(f"--task-name {names[i]!r}: want a plain name (it names the folder OUT/<name>)")
            task.name = names[i]
        if task.name in seen:
            raise UserError(f"--task {spec}: writes OUT/{task.name}, as --task {seen[task.name]} does; name them "
                            "apart with --task-name")
        seen[task.name] = spec
        tasks.append(task)
    return tasks
