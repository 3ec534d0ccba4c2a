"""User-facing errors: one clear line, exit code 2, never a deep traceback; a kill or Ctrl-C ends the same way.

`exit_on_user_error` wraps every entry point's main: a `UserError` prints `error: ...` and exits 2. While main
runs, SIGTERM and SIGHUP raise `Interrupted` (their default action would end the process at once, past every
`finally`: a temporary dir, a moved-aside previous output, a lock would stay behind) and Ctrl-C raises Python's
KeyboardInterrupt; either unwinds through the command's clean-up and ends in one line, `error: interrupted by
SIGTERM ...`, exit 128 + the signal's number (143, 130), as a shell reports a killed command. training.pretrain
replaces these handlers with its pre-emption flag once it trains (training/signals.py).
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import threading


class UserError(Exception):
    """Bad input from the user (config, corpus, checkpoint). Printed as one line; exit code 2."""


def first_line(err: BaseException) -> str:
    """`Type: first line of the message` of an exception from a library, for the end of a one-line error."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


class Interrupted(BaseException):
    """A termination signal arrived (BaseException: no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


TERMINATING = (signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(owner: int):
    def handler(signum, frame):
        if os.getpid() != owner:  # a forked worker (datasets' map, a DataLoader): die as it would have
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise Interrupted(signum)

    return handler


def _install_terminating() -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be set from the main thread
    handler = _raise_interrupted(os.getpid())
    return {sig: signal.signal(sig, handler) for sig in TERMINATING}


def interrupted_line(signum: int) -> str:
    name = signal.Signals(signum).name
    what = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else name
    return f"error: interrupted by {what}; stopped (exit {128 + signum})"


def exit_on_user_error(main):
    """Decorate a CLI entry point so a UserError prints `error: ...` and exits with code 2, and a SIGTERM, SIGHUP
    or Ctrl-C prints one line and exits 128 + its number after the command's clean-up has run."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        previous = _install_terminating()
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(2)
        except (Interrupted, KeyboardInterrupt) as err:
            signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
            print(interrupted_line(signum), file=sys.stderr, flush=True)
            sys.exit(128 + signum)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return wrapper
