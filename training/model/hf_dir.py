"""Opening a Hugging Face model directory: the one check every reader of one shares (`training.evaluate`,
`model.init_from_hf`, `training.finetune`), before any of them builds a model.

`open_hf_dir` returns the dir's config.json as a dict once it is known to be usable: the dir exists, config.json
is there, parses, is a JSON object and has a positive integer `vocab_size`, and the weights file
(model.safetensors, else pytorch_model.bin) is there; a safetensors file's header is read (safetensors' own
check: a truncated or overwritten header, or a file shorter or longer than its header says, is refused, in
milliseconds, without reading the tensors). Each failure is one UserError naming the file. A pytorch_model.bin
is checked when it is read (`read_weights`). safetensors has no checksum, so a byte flipped inside a tensor is
not caught here (evaluate refuses a loss that is not finite).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from training.errors import UserError, first_line

SAFETENSORS, TORCH_BIN = "model.safetensors", "pytorch_model.bin"


def read_config(model_dir: Path, flag: str) -> dict:
    """config.json of `model_dir` as a dict (see the module doc)."""
    if not model_dir.is_dir():
        raise UserError(f"{flag} {model_dir}: no such directory")
    path = model_dir / "config.json"
    if not path.is_file():
        hint = f" (the run's export is {model_dir / 'hf'})" if (model_dir / "hf" / "config.json").is_file() else \
            " (export a run with `python -m training.export`)"
        raise UserError(f"{flag} {model_dir}: not a Hugging Face model dir, no config.json{hint}")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise UserError(f"{path}: truncated or corrupt, not valid JSON ({first_line(err)})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: corrupt, a JSON {type(config).__name__} instead of an object")
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1:
        raise UserError(f"{path}: vocab_size is {'missing' if vocab is None else repr(vocab)}, not a positive "
                        "integer")
    return config


def weights_file(model_dir: Path) -> Path:
    """The weights file of `model_dir`, its safetensors header checked (see the module doc)."""
    for name in (SAFETENSORS, TORCH_BIN):
        path = model_dir / name
        if path.is_file():
            break
    else:
        raise UserError(f"{model_dir}: no {SAFETENSORS} or {TORCH_BIN}")
    if path.name == SAFETENSORS:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError (header), OSError
            raise UserError(f"{path}: truncated or corrupt ({first_line(err)})") from None
    return path


def open_hf_dir(model_dir: Union[str, Path], flag: str = "--model") -> dict:
    """The checked config.json of a Hugging Face model dir whose weights file is there and readable."""
    model_dir = Path(model_dir)
    config = read_config(model_dir, flag)
    weights_file(model_dir)
    return config


def read_weights(model_dir: Path) -> dict:
    """Every tensor of the dir's weights file (name -> tensor, on the CPU); a file that cannot be read is one
    UserError naming it."""
    import torch

    path = weights_file(model_dir)
    try:
        if path.name == SAFETENSORS:
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file fails in many ways inside torch / safetensors
        raise UserError(f"{path}: cannot be read, truncated or corrupt ({first_line(err)})") from None


def tensor_names(model_dir: Path) -> list[str]:
    """The tensor names of the dir's weights (safetensors: without reading the tensors)."""
    path = weights_file(model_dir)
    if path.name == SAFETENSORS:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(read_weights(model_dir))
