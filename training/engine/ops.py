"""DeepSpeed's JIT-built C++ ops, prepared before training starts: never a silent wait on a dead build.

On the CPU accelerator DeepSpeed builds `deepspeed_shm_comm` the first time its comms start
(`deepspeed.comm.torch.build_shm_op` -> `OpBuilder.load` -> `torch.utils.cpp_extension.load`), in
`$TORCH_EXTENSIONS_DIR/<py/torch tag>/deepspeed_shm_comm/` (default root `~/.cache/torch_extensions`) and
under torch's FileBaton: a `lock` file created with O_EXCL and removed when the build ends. A process killed
mid-build leaves that file, and every later process waits for it to vanish, forever and silently.

`prepare_deepspeed_ops()` (called by training.pretrain before the process group starts; `make venv` runs
`python -m training.engine.ops` once so the first run does not compile):

* takes our own flock (`<build dir>.dsbert-lock`, holding pid@host) around the build, so our processes
  build one at a time and the kernel, not a file's existence, says whether a builder is alive;
* under it, a FileBaton `lock` that no process on this host has open (the builder keeps it open for the
  whole build) is left by a killed build: it is removed, with a warning naming it;
* a lock held by a live process is waited for, and the whole preparation is bounded by
  `DSBERT_OP_BUILD_TIMEOUT_S` (default 1200 s): past it the process exits 2 with one `error:` line naming
  the file or step it waited for and how to clear it.

The op loaded here stays in DeepSpeed's op cache, so DeepSpeed's own `load()` returns it without waiting.
"""
from __future__ import annotations

import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

BUILDERS = ("ShareMemCommBuilder",)  # what DeepSpeed JIT-builds at start-up (see the module doc)
DEFAULT_TIMEOUT_S = 1200.0
EXIT_BAD = 2


def _timeout_s() -> float:
    try:
        return float(os.environ.get("DSBERT_OP_BUILD_TIMEOUT_S") or DEFAULT_TIMEOUT_S)
    except ValueError:
        return DEFAULT_TIMEOUT_S


def _builder(class_name: str):
    """DeepSpeed's builder of an op it would JIT-build here, or None (prebuilt, not used by this accelerator)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(class_name)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    if installed_ops.get(builder.NAME, False):
        return None  # shipped prebuilt: nothing to compile
    return builder


def build_dir(name: str) -> Path:
    """Where torch builds extension `name` (honours TORCH_EXTENSIONS_DIR); created if missing."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def open_by(path: Path) -> list[int]:
    """Pids of the processes on this host that have `path` open (scans /proc/*/fd)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                try:
                    st = os.stat(fd.path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    pids.append(int(entry.name))
                    break
        except OSError:
            continue
    return pids


def _fail(text: str) -> None:
    print(f"error: {text}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


class _Deadline:
    """Exits the process with one error line if `stop()` is not called within `seconds` (the build runs in
    this thread inside torch; nothing else can interrupt it)."""

    def __init__(self, seconds: float, what: str, baton: Path):
        self.what, self.baton = what, baton
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def _expire(self) -> None:
        for pid in _descendants(os.getpid()):  # the compiler processes of our build
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if os.getpid() in open_by(self.baton):  # our own build's lock: do not leave it for the next run
            try:
                os.unlink(self.baton)
            except OSError:
                pass
        print(f"error: {self.what}", file=sys.stderr, flush=True)
        os._exit(EXIT_BAD)

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()
        return False


def _take_flock(path: Path, deadline: float, name: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        _fail(f"cannot create {path} ({err.strerror}); set TORCH_EXTENSIONS_DIR to a writable directory")
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "an unknown process"
                os.close(fd)
                _fail(f"waited {_timeout_s():.0f} s for pid {holder} to finish building DeepSpeed's {name} op (it "
                      f"holds {path}); stop that process, or raise DSBERT_OP_BUILD_TIMEOUT_S")
            time.sleep(0.2)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
    return fd


def _clear_or_wait(baton: Path, deadline: float, name: str) -> None:
    """The FileBaton lock: removed if no process has it open (a killed build), else waited for."""
    while baton.exists():
        pids = open_by(baton)
        if not pids:
            try:
                os.unlink(baton)
                print(f"warning: removed the stale lock {baton}, left by a killed build of DeepSpeed's {name} op "
                      "(no process had it open)", file=sys.stderr, flush=True)
            except FileNotFoundError:
                pass
            return
        if time.monotonic() > deadline:
            _fail(f"waited {_timeout_s():.0f} s for {baton}: pid {', '.join(map(str, pids))} holds it (building "
                  f"DeepSpeed's {name} op); stop that process, or if no build is running delete {baton}")
        time.sleep(0.2)


def prepare_deepspeed_ops(timeout_s: Optional[float] = None) -> list[str]:
    """Build/load the ops DeepSpeed would JIT-build at start-up, robustly (see the module doc). Returns the
    names of the ops loaded. Exits 2 with one `error:` line when it cannot within the timeout."""
    timeout_s = _timeout_s() if timeout_s is None else timeout_s
    loaded = []
    for class_name in BUILDERS:
        try:
            builder = _builder(class_name)
        except Exception as err:  # an accelerator without such ops
            log.debug("no %s here: %s", class_name, err)
            continue
        if builder is None:
            continue
        name = builder.NAME
        if name in type(builder)._loaded_ops:
            loaded.append(name)
            continue
        deadline = time.monotonic() + timeout_s
        try:
            directory = build_dir(name)
        except OSError as err:
            _fail(f"cannot create the build directory of DeepSpeed's {name} op ({err}); set TORCH_EXTENSIONS_DIR to "
                  "a writable directory")
        baton = directory / "lock"
        fd = _take_flock(directory.with_name(f"{directory.name}.dsbert-lock"), deadline, name)
        try:
            _clear_or_wait(baton, deadline, name)
            left = max(1.0, deadline - time.monotonic())
            what = (f"building DeepSpeed's {name} op in {directory} took more than {timeout_s:.0f} s "
                    f"(DSBERT_OP_BUILD_TIMEOUT_S); if {baton} exists and no build is running, delete it")
            with _Deadline(left, what, baton):
                builder.load(verbose=False)
        finally:
            os.close(fd)
        loaded.append(name)
    return loaded


if __name__ == "__main__":  # `make venv`: build once, ahead of the first run
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    names = prepare_deepspeed_ops()
    print(f"DeepSpeed ops ready: {', '.join(names) or 'none to build here'}")
