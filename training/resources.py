"""Files the project ships beside its code: the run configs (`configs/`) and the DeepSpeed templates
(`deepspeed_configs/`), found wherever the package is.

In a clone (and an editable install, `pip install -e .`) they are the repository's `configs/` and
`deepspeed_configs/`, beside `training/`; a wheel (`pip install .`) carries them as package data inside the
package, `training/configs/` and `training/deepspeed_configs/` (pyproject.toml maps them there). So
`bert-pretrain --config configs/default.yaml` works from any directory: a relative path that is not there is
looked up among the shipped files (`find_shipped`), and the run's log says which file it read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Optional[Path]:
    """The shipped folder `name` (configs, deepspeed_configs): inside the package (a wheel), else beside it."""
    for candidate in (PACKAGE_DIR / name, PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    return None


def find_shipped(path: str | Path, folder: str, suffix: str = "") -> Optional[Path]:
    """The shipped file a relative `path` names when it is not found where it was given: `configs/default.yaml`,
    `default.yaml` or `default` (with `suffix` .yaml) under the shipped `folder`. None if there is none."""
    path = Path(path)
    root = shipped_dir(folder)
    if path.is_absolute() or root is None:
        return None
    parts = path.parts[1:] if path.parts and path.parts[0] == folder else path.parts
    if not parts:
        return None
    rel = Path(*parts)
    for candidate in (root / rel, root / f"{rel}{suffix}"):
        if candidate.is_file():
            return candidate
    return None


def shipped_names(folder: str, pattern: str = "*.yaml") -> list[str]:
    """The shipped files of `folder` as `folder/relative/path` (for error messages and suggestions)."""
    root = shipped_dir(folder)
    return sorted(f"{folder}/{p.relative_to(root)}" for p in root.rglob(pattern)) if root else []
