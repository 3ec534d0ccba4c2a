"""User-facing errors: one clear line, exit code 2, never a deep traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input from the user (config, corpus, checkpoint). Printed as one line; exit code 2."""


def exit_on_user_error(main):
    """Decorate a CLI entry point so a UserError prints `error: ...` and exits with code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
