"""`--input hf:...`: a `datasets` dataset streamed with `load_dataset(..., streaming=True)`, one record one document.

Syntax (purely syntactic, so a spec means the same online and offline):

    hf:NAME[/CONFIG][:SPLIT]              a one-part hub name:  hf:wikitext/wikitext-103-raw-v1:train
    hf:OWNER/NAME/[CONFIG][:SPLIT]        an owner/name one:    hf:allenai/c4/en, hf:HuggingFaceFW/fineweb-edu/
    hf:PATH[:SPLIT]                       a local dataset directory (parquet/json/csv/... files, or a folder that
                                          Dataset.save_to_disk or DatasetDict.save_to_disk wrote) or one data file

One slash is NAME/CONFIG, two are OWNER/NAME/CONFIG: an owner/name dataset with its default config is written
with the trailing slash (`hf:OWNER/NAME/`). SPLIT (a split name, default `train`) follows the last `:`. The part
after `hf:` is a local path when it exists (with or without `:SPLIT`) or starts with `/`, `./`, `../` or `~`; a
directory goes to `load_dataset(DIR)`, a file to the packaged builder of its extension (`.parquet` -> `parquet`,
`.jsonl` -> `json`, `.csv`, `.txt` (one record per line), ..., also compressed), both streaming.

The text is the `--text-column` column (default `text`) of every record, stripped; None is skipped.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from training.data.text import decode
from training.errors import UserError

PREFIX = "hf:"
DEFAULT_SPLIT = "train"
_LOCAL_PREFIXES = ("/", "./", "../", "~")
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".lz4")
SYNTAX = "hf:NAME[/CONFIG][:SPLIT], hf:OWNER/NAME/[CONFIG][:SPLIT] or hf:PATH[:SPLIT]"


def is_hf(spec: str) -> bool:
    return spec.startswith(PREFIX)


@dataclass(frozen=True)
class HFInput:
    given: str                 # the --input as written
    split: str
    name: str | None = None    # a hub dataset ...
    config: str | None = None
    path: str | None = None    # ... or an absolute local path
    split_given: bool = False

    @property
    def spec(self) -> str:
        """What stats.json records and the generator re-parses: the spec as given, a local path made absolute."""
        if self.path is None:
            return self.given
        return f"{PREFIX}{self.path}" + (f":{self.split}" if self.split_given else "")


def parse(spec: str) -> HFInput:
    rest = spec[len(PREFIX):]
    if not rest:
        raise UserError(f"--input {spec}: empty dataset name (want {SYNTAX})")
    if os.path.exists(os.path.expanduser(rest)):
        return HFInput(spec, DEFAULT_SPLIT, path=os.path.abspath(os.path.expanduser(rest)))
    head, colon, tail = rest.rpartition(":")
    split_given = bool(colon and "/" not in tail)
    if split_given:
        if not tail:
            raise UserError(f"--input {spec}: empty split after ':' (want {SYNTAX})")
        rest, split = head, tail
    else:
        split = DEFAULT_SPLIT
    local = os.path.expanduser(rest)
    if os.path.exists(local):
        return HFInput(spec, split, path=os.path.abspath(local), split_given=split_given)
    if rest.startswith(_LOCAL_PREFIXES):
        raise UserError(f"--input {spec}: no such file or directory")
    parts = rest.split("/")
    if len(parts) > 3 or not all(parts[:2]) or (len(parts) == 3 and not parts[1]):
        raise UserError(f"--input {spec}: cannot parse the dataset (want {SYNTAX})")
    if len(parts) == 3:
        name, config = f"{parts[0]}/{parts[1]}", parts[2]
    else:
        name, config = parts[0], parts[1] if len(parts) == 2 else ""
    return HFInput(spec, split, name=name, config=config or None)


def local_path(spec: str) -> str | None:
    """The local path an hf: input reads (for --overwrite's "holds an input" check), else None."""
    try:
        return parse(spec).path
    except UserError:
        return None


def _file_builder(path: str) -> tuple[str, dict]:
    from datasets.packaged_modules import _EXTENSION_TO_MODULE

    root = path
    for comp in _COMPRESSION:
        if root.lower().endswith(comp):
            root = root[: -len(comp)]
            break
    ext = os.path.splitext(root)[1]
    found = _EXTENSION_TO_MODULE.get(ext) or _EXTENSION_TO_MODULE.get(ext.lower())
    if found is None:
        raise UserError(f"--input {PREFIX}{path}: no `datasets` builder for files ending in {ext or '(nothing)'} "
                        "(want a directory, or .parquet/.jsonl/.json/.csv/.txt/.arrow, optionally compressed)")
    return found


def _load_error(inp: HFInput, err: Exception) -> UserError:
    import datasets

    detail = _first_line(err)
    if inp.path is not None:
        return UserError(f"--input {inp.given}: cannot be loaded as a dataset ({detail})")
    what = f"dataset {inp.name!r}" + (f" config {inp.config!r}" if inp.config else "") + f" split {inp.split!r}"
    hint = ""
    if inp.config and "/" not in inp.name:  # hf:OWNER/NAME read as NAME/CONFIG
        hint = (f"; if {inp.name}/{inp.config} is an owner/name dataset, write {PREFIX}{inp.name}/{inp.config}/ "
                "for its default config")
    if getattr(datasets.config, "HF_HUB_OFFLINE", False) and isinstance(err, (ConnectionError, FileNotFoundError)):
        return UserError(f"--input {inp.given}: {what} not found locally and the hub is offline "
                         f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; {detail}){hint}")
    return UserError(f"--input {inp.given}: cannot load {what} ({detail}){hint}")


def _saved_dataset(path: str) -> bool:
    """A folder written by `Dataset.save_to_disk` (its state.json; a DatasetDict's has dataset_dict.json and
    load_dataset reads it by split)."""
    import datasets

    return os.path.isfile(os.path.join(path, datasets.config.DATASET_STATE_JSON_FILENAME))


def open_stream(spec: str):
    """The parsed input and its IterableDataset (`load_dataset(..., streaming=True)`); load errors are UserErrors."""
    import datasets

    inp = parse(spec)
    try:
        if inp.path is None:
            ds = datasets.load_dataset(inp.name, inp.config, split=inp.split, streaming=True)
        elif _saved_dataset(inp.path):  # Dataset.save_to_disk: one dataset, no splits; load_dataset refuses it
            if inp.split_given:
                raise UserError(f"--input {spec}: {inp.path} holds one dataset saved with Dataset.save_to_disk, "
                                f"which has no splits; drop ':{inp.split}'")
            ds = datasets.load_from_disk(inp.path).to_iterable_dataset()
        elif os.path.isdir(inp.path):
            ds = datasets.load_dataset(inp.path, split=inp.split, streaming=True)
        else:
            builder, kwargs = _file_builder(inp.path)
            ds = datasets.load_dataset(builder, data_files={inp.split: inp.path}, split=inp.split,
                                       streaming=True, **kwargs)
    except UserError:
        raise
    except Exception as err:  # ConnectionError, DatasetNotFoundError, FileNotFoundError, ValueError (bad split), ...
        raise _load_error(inp, err) from None
    if not isinstance(ds, datasets.IterableDataset):  # a DatasetDict cannot come back with split= given
        raise UserError(f"--input {spec}: load_dataset returned {type(ds).__name__}, not a stream")
    return inp, ds


def _missing_column(spec: str, column: str, names) -> UserError:
    return UserError(f"--input {spec}: no column {column!r} (the dataset has {', '.join(map(repr, names)) or 'none'}); "
                     "choose one with --text-column")


def check(spec: str, text_column: str) -> str:
    """Resolve the input now (before --out is touched) and check the text column; returns its normalised spec.

    The column comes from the stream's features when `datasets` knows them, else from its first record;
    the documents are read later, by `documents`, which opens the stream again."""
    import datasets

    inp, ds = open_stream(spec)
    features = ds.features
    if features is None:
        try:
            first = next(iter(ds))
        except StopIteration:
            return inp.spec  # empty: "no non-blank documents" later, like an all-blank file
        except Exception as err:
            raise UserError(f"--input {spec}: cannot read the first record ({_first_line(err)})") from None
        if text_column not in first:
            raise _missing_column(spec, text_column, list(first))
        return inp.spec
    if text_column not in features:
        raise _missing_column(spec, text_column, list(features))
    feature = features[text_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary",
                                                                      "large_binary")):
        raise UserError(f"--input {spec}: column {text_column!r} is {feature}, not text; choose another with "
                        "--text-column")
    return inp.spec


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def documents(spec: str, text_column: str):
    """(text, replaced_bytes) per record of the stream, in the stream's (deterministic) order."""
    _inp, ds = open_stream(spec)
    it = iter(ds.select_columns([text_column]) if ds.features is not None else ds)
    n = 0
    while True:
        try:
            record = next(it)
        except StopIteration:
            return
        except Exception as err:  # a shard that fails mid-stream (network, corrupt file, schema change)
            raise UserError(f"--input {spec}: reading record {n + 1} failed ({_first_line(err)})") from None
        n += 1
        if text_column not in record:
            raise _missing_column(f"{spec} (record {n})", text_column, list(record))
        doc = record[text_column]
        if doc is None:
            continue
        if isinstance(doc, bytes):  # binary columns: bad bytes are counted, not fatal (like parquet files)
            text, bad = decode(doc)
            yield text.strip(), bad
        elif isinstance(doc, str):
            yield doc.strip(), 0
        else:
            raise UserError(f"--input {spec}: record {n}: column {text_column!r} holds {type(doc).__name__}, "
                            "not text; choose another with --text-column")
