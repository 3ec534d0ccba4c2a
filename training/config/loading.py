"""Reading a run config: YAML (duplicate keys refused, errors with their line), `--set KEY=VALUE` overrides,
the HF shape of `model.init_from_hf`, then validation into a frozen RunConfig; every problem is one line.
(A run loads its config with stages/plan.load_config: this, then the stage hooks' checks.)"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from training.config.schema import ModelConfig, RunConfig, _error_line, shown
from training.errors import UserError


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently).
    Keys brought in by a `<<` merge may still be overridden: that is what a merge is for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base constructor says so
                    continue
                if first is not key_node.start_mark:
                    raise _DuplicateKey(None, None, f"duplicate key {shown(key)} (first at line {first.line + 1})",
                                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """One line: what is wrong and where (line, column: 1-based)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or (str(err).splitlines() or ["unreadable"])[0]
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    if isinstance(getattr(err, "position", None), int):  # a ReaderError (a control character) has no mark
        return f"line {text.count(chr(10), 0, err.position) + 1}: {problem}"
    return problem


def _parse_value(text: str, key: str = "") -> Any:
    """`--set` values are YAML scalars/flow collections: 3, 1e-3, true, [1, 2], null, a string."""
    if text == "":
        return ""
    try:
        return _yaml_load(text)
    except yaml.YAMLError as err:
        given = text if text.isprintable() else shown(text)
        raise UserError(f"--set {key}={given}: not a valid YAML value ({_yaml_problem(err, text)})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b.c=value` items; a path goes through mappings (made if absent) and list indices
    (`stages.1.steps`), which must exist."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set train.max_steps=100")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise UserError(f"--set {key!r}: expected a dotted key such as train.max_steps or stages.0.steps")
        value = _parse_value(text, key)
        node: Any = raw
        for i, part in enumerate(parts):
            above = ".".join(parts[:i])
            if isinstance(node, list):
                count = f"{len(node)} entries (indices 0-{len(node) - 1})" if node else "no entries"
                if not part.isdigit():
                    raise UserError(f"--set {key}: {above} is a list, so '{part}' must be an index; it has {count}")
                if int(part) >= len(node):
                    raise UserError(f"--set {key}: {above} has {count}, no index {part}")
                index: Any = int(part)
            elif isinstance(node, dict):
                index = part
                if i < len(parts) - 1 and node.get(part) is None:  # absent, or an empty `section:` in the YAML
                    if parts[i + 1].isdigit():
                        raise UserError(f"--set {key}: {'.'.join(parts[:i + 1])} is not set, so it has no index "
                                        f"{parts[i + 1]}")
                    node[part] = {}
            else:
                raise UserError(f"--set {key}: {above} is {shown(node)}, not a section or list")
            if i == len(parts) - 1:
                node[index] = value
            else:
                node = node[index]
    return raw


def _format_validation_error(err: ValidationError, source: str) -> str:
    return " ".join(f"{source}: {_error_line(err.errors()[0])}".split())


# The shape fields `model.init_from_hf` takes from the checkpoint's config; the rest stays the run's choice.
_HF_KEEPS_OURS = ("attention", "norm", "dropout", "attention_dropout", "nsp", "init_from_hf", "carry_pooler")


def _with_hf_shape(raw: dict) -> dict:
    """`model.init_from_hf`: the model's shape comes from the checkpoint's config, resolved here, before any
    validation, so the stage transitions are checked against the real shape and nothing changes the config
    after it loads. An MLM-only model carries the checkpoint's pooler untrained (model.carry_pooler), so the
    export keeps it."""
    model = raw.get("model")
    source = model.get("init_from_hf") if isinstance(model, dict) else None
    if not source:
        return raw
    from training.model.hf import checkpoint_has_pooler, model_config_from_hf

    shape = model_config_from_hf(source).model_dump(exclude=set(_HF_KEEPS_OURS))
    if not model.get("nsp", ModelConfig.model_fields["nsp"].default) and checkpoint_has_pooler(source):
        shape["carry_pooler"] = True
    return {**raw, "model": {**model, **shape}}


def _read_file(path: Path) -> dict:
    """One YAML file's mapping, as written (UserError naming the file and line)."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_text()
        raw = _yaml_load(text) or {}
    except _DuplicateKey as err:
        raise UserError(f"{path}: line {err.problem_mark.line + 1}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({_yaml_problem(err, text)})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (not UTF-8); expected a YAML run config") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections")
    return raw


def merge(base: dict, child: dict) -> dict:
    """`child` over `base`: mappings merge key by key, anything else (a list such as `stages`, a scalar, null)
    replaces what the base had."""
    out = dict(base)
    for key, value in child.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def read_raw(path: Path, _chain: tuple = ()) -> dict:
    """The config file as one mapping: with `base: OTHER.yaml` (relative to the file), the base's mapping with
    this file's keys merged over it (merge), recursively."""
    raw = _read_file(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise UserError(f"{path}: base must be the path of another config file, got {shown(base)}")
    base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
    if base_path.resolve() in _chain or base_path.resolve() == path.resolve():
        raise UserError(f"{path}: base {base} leads back to itself")
    try:
        parent = read_raw(base_path, (*_chain, path.resolve()))
    except UserError as err:
        raise UserError(f"{path}: base {base}: {err}") from None
    return merge(parent, raw)


def find_config(path: str | Path) -> tuple[Path, str | None]:
    """(the config file `path` names, a note when it came from the shipped configs). A relative path that does
    not exist here is looked up among the configs the package ships (training/resources.py), so
    `--config configs/default.yaml` works from any directory; otherwise one line naming the nearest shipped one."""
    from training.cli import nearest
    from training.resources import find_shipped, shipped_names

    path = Path(path)
    if path.is_file():
        return path, None
    shipped = find_shipped(path, "configs", ".yaml")
    if shipped is not None:
        return shipped, f"--config {path}: not in {Path.cwd()}; read the shipped {shipped}"
    close = nearest(str(path), shipped_names("configs"))
    hint = f" (did you mean {close}?)" if close else ""
    raise UserError(f"config file not found: {path}{hint}")


def read_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """The config file (with its `base:` chain) and its overrides, validated section by section (UserError, one
    line). Whether the stages may follow one another is the stage hooks' business: a run loads with
    stages/plan.load_config, which reads the config here, then resolves and checks its hooks."""
    raw: dict = {}
    source = "config"
    if path is not None:
        path, _ = find_config(path)
        source = str(path)
        raw = read_raw(path)
    raw = apply_overrides(raw, list(overrides))
    raw = _with_hf_shape(raw)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_validation_error(err, source)) from None
