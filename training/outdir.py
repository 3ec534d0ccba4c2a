"""Output directories that never cost what is not ours: markers, an exclusive lock, inputs kept out of reach.

* Marker. A directory this project created holds a marker file saying what wrote it: `OUT/.bert-run`
  (training.pretrain) or `DIR/.bert-data` (training.data prepare). `--overwrite` replaces only a directory
  with the right marker; one without (someone's data, a run written before markers existed) is refused with
  a line saying how to proceed, and nothing is deleted.
* Inputs. `--overwrite` is refused when the directory is, or contains, an input of the command (the config
  file, data.dir, a tokenizer, an --input corpus, model.init_from_hf...).
* Lock. `DIR/.lock` is held with fcntl.flock (exclusive) while a process works in DIR; it holds `pid@host`
  of the holder, so a second process exits 2 naming it. The kernel drops a flock when its holder dies, so a
  lock file left by a killed process is simply taken over. The holder unlinks the file before releasing; a
  process that locked an unlinked file notices (the path names another inode) and tries again.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional, Union

from training.errors import UserError

LOCK_NAME = ".lock"
RUN_MARKER = ".bert-run"
DATA_MARKER = ".bert-data"


def holder_of(path: Path) -> Optional[str]:
    """`pid@host` of the live process holding the flock on `path`, or None when nobody holds it.
    Read-only: creates nothing. The probe takes a *shared* lock: probes never conflict with each other (every
    rank of a job probes at once, and a lock file left by a killed run still names its dead writer), only
    with a holder's exclusive lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            except OSError:
                text = ""
            return text or "an unknown process"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def check_unlocked(directory: Path, what: str) -> None:
    holder = holder_of(directory / LOCK_NAME)
    if holder is not None:
        raise UserError(f"{what} {directory} is in use by pid {holder} (it holds {directory / LOCK_NAME}); wait for "
                        "it to finish or stop it, or pick another directory")


def wait_unlocked(directory: Path, what: str, wait_s: float, poll_s: float = 0.5) -> None:
    """check_unlocked, after waiting up to `wait_s` seconds for the holder to let go (a requeued job's previous
    incarnation may still be exiting when the new one starts; its lock drops with it)."""
    holder = holder_of(directory / LOCK_NAME)
    if holder is None or wait_s <= 0:
        return check_unlocked(directory, what)
    print(f"{what} {directory} is in use by pid {holder}; waiting up to {wait_s:.0f}s for it to let go",
          file=sys.stderr, flush=True)
    deadline = time.monotonic() + wait_s
    while holder is not None and time.monotonic() < deadline:
        time.sleep(poll_s)
        holder = holder_of(directory / LOCK_NAME)
    check_unlocked(directory, what)


class DirLock:
    """An exclusive flock on DIR/.lock, created (with DIR) if needed. `release()` unlinks and unlocks."""

    def __init__(self, directory: Path, what: str):
        self.directory, self.what = Path(directory), what
        self.fd: Optional[int] = None
        self._ino: Optional[tuple[int, int]] = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def acquire(self) -> "DirLock":
        for _ in range(100):
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise UserError(f"{self.what} {self.directory}: cannot write there ({err.strerror or err})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                check_unlocked(self.directory, self.what)  # names the holder
                time.sleep(0.01)
                continue  # released in between, or only probed (a shared lock): try again
            st = os.fstat(fd)
            try:
                cur = os.stat(self.path)
            except FileNotFoundError:
                cur = None
            if cur is None or (cur.st_dev, cur.st_ino) != (st.st_dev, st.st_ino):
                os.close(fd)  # its holder unlinked it before we got it: lock the file that is there now
                continue
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}\n".encode(), 0)
            except OSError as err:
                os.close(fd)
                raise UserError(f"{self.what} {self.directory}: cannot write there ({err.strerror or err})") from None
            self.fd, self._ino = fd, (st.st_dev, st.st_ino)
            return self
        raise UserError(f"{self.what} {self.directory}: could not lock {self.path}")

    def moved_to(self, directory: Path) -> None:
        """The directory holding the lock file was renamed (the lock itself goes with the file)."""
        self.directory = Path(directory)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            cur = os.stat(self.path)
            if (cur.st_dev, cur.st_ino) == self._ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


def write_atomic(path: Path, data: Union[str, bytes, Callable[[BinaryIO], None]], fsync: bool = False) -> None:
    """Write `path` whole or not at all: into `.NAME.tmp-PID` beside it, then os.replace, so a reader (or a
    process killed mid-write) never sees half a file; a failed write removes the temporary file. `data` is
    text, bytes, or a function that writes into the open binary file (torch.save). `fsync`: flush the file
    and the directory entry to disk (checkpoints: the rename must survive a crash of the machine)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_marker(directory: Path, name: str, **info) -> None:
    """`info` says what wrote the directory (`written_by`, ...); never half a marker (write_atomic)."""
    write_atomic(Path(directory) / name, json.dumps(info, indent=1) + "\n")


def read_marker(directory: Path, name: str) -> Optional[dict]:
    try:
        info = json.loads((Path(directory) / name).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def entries(directory: Path) -> list[Path]:
    """What a directory holds, leaving out a lock file (left by a killed process, it is nothing)."""
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name != LOCK_NAME]


def check_holds_no_input(directory: Path, inputs: Iterable[tuple[str, str]], flag: str) -> None:
    """`inputs`: (what, path) pairs. Refuse when `directory` is or contains one of them."""
    root = Path(os.path.realpath(directory))
    for what, path in inputs:
        if not path:
            continue
        p = Path(os.path.realpath(path))
        if not p.exists():
            continue
        if p == root or root in p.parents:
            raise UserError(f"{flag} {directory} {'is' if p == root else 'contains'} {what}={path}, an input of this "
                            "command; --overwrite would delete it: pick another output directory")


def replaced_name(directory: Path) -> Path:
    """A sibling name for a directory moved aside by --overwrite."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return directory.with_name(f"{directory.name}.replaced-{stamp}-{os.getpid()}")


def oserror_line(what: str, err: OSError) -> str:
    reason = err.strerror or str(err)
    if err.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason = f"not writable ({err.strerror})"
    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    return f"{what}: {reason}{where}"
