"""Number types for the command lines of every entry point: finite floats, bounded integers, seeds, sequence
lengths. `p.add_argument("--lr", type=positive_float("--lr"))`.

Each factory takes the flag's name because argparse hands a type only the text: a value out of range raises
`UserError` (not argparse's ArgumentTypeError, which argparse turns into a usage block), so the command ends in
the project's one line, `error: --lr inf: must be a finite number > 0`, exit 2, before anything runs. Non-finite
numbers (`inf`, `nan`, which Python's float() accepts) are refused everywhere.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from training.errors import UserError

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds (transformers.set_seed seeds numpy)
MAX_SEQ_LEN = 65536  # tokens per row: BERT's tables have 512; 64 Ki is past any model trained here
MIN_SEQ_LEN = 8  # [CLS] A [SEP] B [SEP] with room for both segments (training/data/packing.py)


def finite_float(flag: str, *, gt: Optional[float] = None, ge: Optional[float] = None,
                 lt: Optional[float] = None, le: Optional[float] = None) -> Callable[[str], float]:
    """A finite float within the given bounds."""
    want = " and ".join(s for s in (f"> {gt:g}" if gt is not None else "", f">= {ge:g}" if ge is not None else "",
                                    f"< {lt:g}" if lt is not None else "", f"<= {le:g}" if le is not None else "")
                        if s)

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or (gt is not None and not value > gt) or \
                (ge is not None and not value >= ge) or (lt is not None and not value < lt) or \
                (le is not None and not value <= le):
            raise UserError(f"{flag} {text}: must be a finite number" + (f" {want}" if want else ""))
        return value

    parse.__name__ = "number"  # what argparse's own messages would call it
    return parse


def integer(flag: str, *, ge: Optional[int] = None, le: Optional[int] = None) -> Callable[[str], int]:
    """A whole number within [ge, le] (decimal; `1e3`, `2.0` and `inf` are refused)."""
    if ge is not None and le is not None:
        want = f"an integer in [{ge}, {le}]"
    else:
        want = f"an integer >= {ge}" if ge is not None else f"an integer <= {le}" if le is not None else "an integer"

    def parse(text: str) -> int:
        try:
            value = int(text.strip(), 10)
        except ValueError:
            value = None
        if value is None or (ge is not None and value < ge) or (le is not None and value > le):
            raise UserError(f"{flag} {text}: must be {want}")
        return value

    parse.__name__ = "integer"
    return parse


def positive_float(flag: str, maximum: Optional[float] = None) -> Callable[[str], float]:
    return finite_float(flag, gt=0.0, le=maximum)


def non_negative_float(flag: str, maximum: Optional[float] = None) -> Callable[[str], float]:
    return finite_float(flag, ge=0.0, le=maximum)


def positive_int(flag: str, maximum: Optional[int] = None) -> Callable[[str], int]:
    return integer(flag, ge=1, le=maximum)


def non_negative_int(flag: str, maximum: Optional[int] = None) -> Callable[[str], int]:
    return integer(flag, ge=0, le=maximum)


def seed(flag: str = "--seed") -> Callable[[str], int]:
    """A random seed: 0 .. 2^32 - 1, what numpy and torch accept."""
    return integer(flag, ge=0, le=SEED_MAX)


def seq_len(flag: str = "--seq-len", minimum: int = MIN_SEQ_LEN) -> Callable[[str], int]:
    """Tokens per row: MIN_SEQ_LEN .. MAX_SEQ_LEN."""
    return integer(flag, ge=minimum, le=MAX_SEQ_LEN)


def fraction(flag: str) -> Callable[[str], float]:
    """A share in [0, 1)."""
    return finite_float(flag, ge=0.0, lt=1.0)
