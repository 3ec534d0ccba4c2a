"""Layers import downward only (issue: no backward imports), read from the source with ast, so a function-level
import counts as much as a top-level one; and ModelConfig's field groups and diff."""
from __future__ import annotations

import ast
from pathlib import Path

from training.model.config import ModelConfig
from tests.helpers import paths as PATHS

ROOT = PATHS.TRAINING


def imports(path: Path) -> set[str]:
    """Every module `path` imports (absolute names; `from training.x import y` gives both training.x and
    training.x.y, since y may be a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def files(*parts: str) -> list[Path]:
    return sorted(p for p in ROOT.joinpath(*parts).rglob("*.py"))


def offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT.parent)} imports {m}" for p in paths for m in sorted(imports(p))
            if m.startswith(forbidden)]


def test_model_and_data_import_nothing_of_engine_stages_bench_or_the_entry_scripts():
    upper = ("training.engine", "training.stages", "training.bench", "training.pretrain", "training.run_setup",
             "training.finetune", "training.evaluate", "training.export")
    assert offenders(files("model") + files("data"), upper) == []


def test_nothing_imports_an_entry_script():
    entries = ("training.pretrain", "training.finetune", "training.evaluate", "training.export")
    paths = [p for p in files() if p.name not in ("pretrain.py", "finetune.py", "evaluate.py", "export.py")]
    assert offenders(paths, entries) == []


def test_method_modules_import_the_hook_protocol_never_the_registry_or_the_runner():
    methods = [ROOT / "stages" / f"{m}.py" for m in ("growth", "mslt", "core", "earlybert", "layerdrop", "protocol",
                                                     "transfer")]
    assert offenders(methods, ("training.stages.hooks", "training.stages.runner")) == []


def test_checkpoint_and_faults_do_not_import_each_others_users():
    assert offenders([ROOT / "engine" / "faults.py", ROOT / "engine" / "inject.py"],
                     ("training.engine.checkpoint", "training.engine.recovery")) == []


def test_diff_names_the_fields_that_differ_and_ignores_what_it_is_told():
    a = ModelConfig(vocab_size=64, hidden_size=32, num_heads=2, num_layers=2, ffn_size=64, max_position=16)
    b = a.model_copy(update={"num_layers": 3, "dropout": 0.0, "attention": "eager"})
    assert a.diff(a) == {}
    assert a.diff(b) == {"num_layers": (2, 3), "dropout": (0.1, 0.0), "attention": ("sdpa", "eager")}
    assert list(a.diff(b, ignore=ModelConfig.REGULARISATION_FIELDS)) == ["num_layers", "attention"]
    assert a.describe_diff(b, ignore=("dropout", "attention")) == "num_layers 2 -> 3"
    # Every group names real fields, and the groups are not themselves config fields.
    for group in (ModelConfig.SHAPE_FIELDS, ModelConfig.PER_LAYER_FIELDS, ModelConfig.REGULARISATION_FIELDS,
                  ModelConfig.RELAXED_FIELDS):
        assert set(group) <= set(ModelConfig.model_fields)
    assert "SHAPE_FIELDS" not in a.model_dump()


def test_checkpoint_compatibility_asks_the_model_configs_shape_group():
    from training.engine import checkpoint

    assert checkpoint.SHAPE_FIELDS is ModelConfig.SHAPE_FIELDS
    assert checkpoint.RESOLVED_AT_RUN_TIME is ModelConfig.PER_LAYER_FIELDS
    assert not set(ModelConfig.REGULARISATION_FIELDS) & set(ModelConfig.SHAPE_FIELDS)  # dropout may change on resume


def test_the_code_imports_no_test_oracle():
    """Test-only references (a per-tensor LAMB, the kernels' eager references) live under tests/."""
    kernels = sorted((ROOT.parent / "kernels").glob("*.py"))
    assert offenders(files() + kernels, ("tests",)) == []
