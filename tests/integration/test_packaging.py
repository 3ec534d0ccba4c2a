"""Issue 30 item 1: an installable package. The wheel (`pip wheel .`, built offline with the installed setuptools)
carries the code, the Triton kernels, the shipped configs and DeepSpeed templates, and the six commands; the
configs are found from any directory (training/resources.py)."""
import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tests.helpers import paths as PATHS

REPO = PATHS.REPO
COMMANDS = {"bert-prepare": "training.data.__main__:prepare_main", "bert-pretrain": "training.pretrain:main",
            "bert-evaluate": "training.evaluate:main", "bert-export": "training.export:main",
            "bert-finetune": "training.finetune:main", "bert-bench": "training.bench.__main__:main"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """Built from a copy of what the package is made of (setuptools builds in the source tree)."""
    root = tmp_path_factory.mktemp("wheel")
    src, out = root / "src", root / "out"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt"):
        shutil.copy(REPO / name, src / name)
    for name in ("training", "kernels", "configs", "deepspeed_configs"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return zipfile.ZipFile(next(out.glob("*.whl")))


slow_build = pytest.mark.slow  # building the wheel takes about 30 s on 2 busy cores


@slow_build
def test_the_wheel_carries_code_kernels_configs_and_templates(wheel):
    names = set(wheel.namelist())
    shipped = {p.relative_to(REPO / "configs") for p in (REPO / "configs").rglob("*.yaml")}
    assert {f"training/configs/{p}" for p in shipped} <= names
    assert {"training/deepspeed_configs/fp32.json", "training/deepspeed_configs/bf16.json",
            "training/pretrain.py", "training/stages/plan.py", "kernels/attention.py"} <= names
    assert not any(n.startswith("tests/") for n in names)


@slow_build
def test_the_wheel_has_the_six_commands_and_requirements(wheel):
    entry = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry).decode())
    assert dict(parser["console_scripts"]) == COMMANDS
    meta = wheel.read(next(n for n in wheel.namelist() if n.endswith("METADATA"))).decode()
    pinned = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")]
    assert pinned and all(f"Requires-Dist: {req}" in meta for req in pinned)  # the same pins, torch first
    assert meta.index("Requires-Dist: torch==2.13.0") < meta.index("Requires-Dist: deepspeed")


def test_every_command_module_has_its_entry_point():
    import importlib

    for target in COMMANDS.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_shipped_files_are_found_from_any_directory(tmp_path, monkeypatch):
    from training.config.loading import find_config
    from training.resources import find_shipped

    monkeypatch.chdir(tmp_path)
    for given in ("configs/default.yaml", "default.yaml", "default"):
        path, note = find_config(given)
        assert path == REPO / "configs" / "default.yaml" and "read the shipped" in note
    assert find_shipped("deepspeed_configs/fp32.json", "deepspeed_configs") == REPO / "deepspeed_configs" / "fp32.json"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "default.yaml").write_text("train: {max_steps: 3}\n")
    assert find_config("configs/default.yaml") == (Path("configs/default.yaml"), None)  # the user's own wins
