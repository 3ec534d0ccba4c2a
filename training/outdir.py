"""Output directories that never cost what is not ours: markers, an exclusive lock, inputs kept out of reach.

* Marker. A directory this project created holds a marker file saying what wrote it: `OUT/.bert-run`
  (training.pretrain) or `DIR/.bert-data` (training.data prepare). `--overwrite` replaces only a directory
  with the right marker; one without (someone's data, a run written before markers existed) is refused with
  a line saying how to proceed, and nothing is deleted.
* Inputs. No command writes over its own inputs: an output that is, holds or lies inside an input of the
  command (the config file, data.dir, a tokenizer, an --input corpus, the model dir, model.init_from_hf...),
  resolved through links, is refused (`check_no_clash`, used by every entry point).
* Lock. `DIR/.lock` is held with fcntl.flock (exclusive) while a process works in DIR; it holds `pid@host`
  of the holder, so a second process exits 2 naming it. The kernel drops a flock when its holder dies, so a
  lock file left by a killed process is simply taken over. The holder unlinks the file before releasing; a
  process that locked an unlinked file notices (the path names another inode) and tries again.
* A run's claim (`prepare_out_dir`, `OutClaim`: training.pretrain's protocol). An existing run needs --resume
  or --overwrite; --overwrite moves the previous run aside (OUT.replaced-<time>-<pid>, named in the marker) and
  deletes it only once the new run has trained its first step; a failure before that puts it back.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional, Union

from training.errors import UserError

LOCK_NAME = ".lock"
RUN_MARKER = ".bert-run"
DATA_MARKER = ".bert-data"
_log = logging.getLogger("training.pretrain")  # the claim's lines are the run's


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


def check_no_clash(flag: str, out: Path, inputs: Iterable[tuple[str, str]], writes: Iterable[Path] = ()) -> None:
    """Refuse an output that would write over an input of the command: one helper for every entry point.

    `out`: the output as given with `flag`; `writes`: the paths the command writes or replaces (default: `out`
    itself, a file it writes or a directory it fills or replaces whole). `inputs`: (what, path) pairs; a path is
    a file or a directory (all of which is read). Both sides are resolved through symbolic links. A clash is a
    written path that is an input, holds one, or lies inside an input directory; missing inputs are skipped."""
    written = [Path(os.path.realpath(w)) for w in (list(writes) or [out])]
    root = Path(os.path.realpath(out))
    for what, path in inputs:
        if not path or not os.path.exists(path):
            continue
        p = Path(os.path.realpath(path))
        for w in written:
            if p == w:
                relation = "is"
            elif w in p.parents:
                relation = "contains"
            elif p in w.parents and p.is_dir():
                relation = "is inside"
            else:
                continue
            where = f"{flag} {out}" if w == root else f"{flag} {out}: {w}"
            raise UserError(f"{where} {relation} {what}={path}, an input of this command, which the output would "
                            f"write over or delete: pick another {flag}")


def replace_dir(out: Path, write: Callable[[Path], None], flag: str = "--out") -> None:
    """`write(tmp_dir)` fills a sibling temporary dir `.NAME.tmp-PID`, renamed to `out` only when complete; an
    existing `out` is moved aside first (`.NAME.old-PID`) and deleted after the rename (put back if the rename
    fails). A file-system failure (disk full, read-only: fs_failure) is one UserError line; nothing partial is
    left, so a kill leaves the previous `out` or nothing (a leftover temporary dir is removed by the next call)."""
    out = Path(os.path.abspath(out))
    parent = out.parent
    made = [p for p in [parent, *parent.parents] if not p.exists()]
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    old = parent / f".{out.name}.old-{os.getpid()}"
    moved = False
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{out.name}.tmp-*"):
            if not _pid_alive(stale.name.rpartition("-")[2]):  # left by a killed writer
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        if out.exists():
            os.rename(out, old)
            moved = True
        os.rename(tmp, out)
    except Exception as err:  # noqa: BLE001 - a full disk comes as OSError, SafetensorError, RuntimeError...
        reason = fs_failure(err, parent)
        if reason is None:
            raise
        raise UserError(f"{flag} {out}: {reason}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not out.exists():
            os.rename(old, out)  # the new one never arrived: the old one goes back
            moved = False
        for p in made:  # parents this call created, now empty after a failure
            try:
                p.rmdir()
            except OSError:
                break
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def replaced_name(directory: Path) -> Path:
    """A sibling name for a directory moved aside by --overwrite."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return directory.with_name(f"{directory.name}.replaced-{stamp}-{os.getpid()}")


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def is_replaced_of(path: Path, out: Path) -> bool:
    """Whether `path` (named in OUT's marker) is a sibling OUT.replaced-*: the only thing ever deleted as a
    previous output moved aside (a marker is a file anyone can edit)."""
    return path.is_absolute() and path.parent.resolve() == out.absolute().parent.resolve() and \
        path.name.startswith(f"{out.name}.replaced-")


def _reason(code: Optional[int], text: str, filename=None) -> str:
    if code == errno.ENOSPC:
        text = "no space left on device"
    elif code == errno.EDQUOT:
        text = "disk quota exceeded"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        text = f"not writable ({text})"
    return text + (f" ({filename})" if filename else "")


def oserror_line(what: str, err: OSError) -> str:
    return f"{what}: {_reason(err.errno, err.strerror or str(err), getattr(err, 'filename', None))}"


# How libraries report a write that failed, without an OSError: safetensors (Rust) says "... (os error 28)",
# torch.save's zip writer "unexpected pos N vs M" (a short write) or "PytorchStreamWriter failed writing file".
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing", "file write failed")


def fs_failure(err: BaseException, where: Union[str, Path, None] = None) -> Optional[str]:
    """Why a write failed, when `err` (or an exception it was raised from: datasets wraps the OSError of a full
    disk in its DatasetGenerationError) is a file-system failure; else None (a bug: let it raise). `where`: a
    path on the file system written to, whose free space tells a full disk from another short write."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, OSError):
            return _reason(err.errno, err.strerror or str(err), err.filename)
        text = str(err)
        found = _OS_ERROR.search(text)
        if found:
            code = int(found.group(1))
            return _reason(code, os.strerror(code))
        if isinstance(err, RuntimeError) and any(s in text for s in _SHORT_WRITE):
            return "no space left on device" if _nearly_full(where) else \
                f"a write failed ({(text.strip().splitlines() or [''])[0][:120]}); is the disk full?"
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        seen += 1
    return None


def _nearly_full(where) -> bool:
    path = Path(where) if where is not None else None
    while path is not None and not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path if path is not None else ".")
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 16 << 20  # under 16 MiB left: what a failed checkpoint write leaves


# ---------------------------------------------------------------- a run's claim on run.out_dir (training.pretrain)

# What a run writes in run.out_dir (no input may be one of them): training/engine/checkpoint.py, metrics.py,
# the DeepSpeed monitor's tensorboard/, the final export hf/, and what pretrain copies in.
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "hf", "config.resolved.json", "tokenizer",
             "deepspeed_config.json", RUN_MARKER, LOCK_NAME)

def _check_out_dir(out: Path, resume: bool, overwrite: bool, inputs) -> bool:
    """The checks of prepare_out_dir; True when --overwrite is to replace a previous run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"run.out_dir {out} exists and is not a directory")
    has_run = bool(entries(out))
    if has_run and not (resume or overwrite):
        raise UserError(f"run.out_dir {out} already holds a run; pass --resume to continue it or --overwrite "
                        "to start over")
    replacing = has_run and overwrite and not resume
    # Replaced or new, OUT is written whole; a run resumed in place writes only its own files there.
    check_no_clash("run.out_dir", out, inputs, writes=[out / name for name in RUN_FILES] if has_run and
                   not replacing else [out])
    if replacing:
        if read_marker(out, RUN_MARKER) is None:
            raise UserError(f"run.out_dir {out} has no {RUN_MARKER} marker, so it is not recognisably a run of "
                            "training.pretrain (runs written before the marker existed have none either) and "
                            "--overwrite will not delete it: delete it by hand, or pick another run.out_dir")
    elif has_run and resume and read_marker(out, RUN_MARKER) is None and not (
            (out / "checkpoints").is_dir() or (out / "config.resolved.json").is_file()):
        raise UserError(f"run.out_dir {out} holds files but no run of training.pretrain (no {RUN_MARKER}, no "
                        "checkpoints/); --resume will not write into it: pick another run.out_dir")
    return replacing


class OutClaim:
    """Rank 0's hold on the output directory for this process: the lock on OUT/.lock and, with --overwrite,
    the previous run moved aside to OUT.replaced-<time>-<pid>. The previous run is deleted once this run has
    trained (`trained()`: its first optimizer step); a failure before that puts it back (`failed()`); a killed
    process leaves it there, named in OUT/.bert-run, and the next run on OUT says so (and deletes it after
    its first step, as this one would have)."""

    def __init__(self, out: Path, lock: DirLock, pending: list[Path], old_lock=None, moved=None):
        self.out, self.lock, self.pending, self.old_lock, self.moved = out, lock, pending, old_lock, moved
        self.done = False

    def trained(self) -> None:
        if self.done:
            return
        self.done = True
        for old in self.pending:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
                _log.info("deleted the previous run %s (moved aside by --overwrite; this run has trained)", old)
        if self.pending:
            info = read_marker(self.out, RUN_MARKER) or {}
            with contextlib.suppress(OSError):
                write_marker(self.out, RUN_MARKER, **{**info, "replaces": []})
        self.pending = []

    def failed(self) -> None:
        """Before training: put the previous run back where it was (if this process moved it)."""
        if self.done:
            return
        self.done = True
        if self.moved is None or not self.moved.is_dir():
            return
        failed = self.out.with_name(f"{self.out.name}.failed-{os.getpid()}")
        try:
            os.rename(self.out, failed)
            os.rename(self.moved, self.out)
        except OSError as err:
            print(f"warning: this run failed before training; the previous run is kept at {self.moved} "
                  f"(could not move it back to {self.out}: {err.strerror})", file=sys.stderr, flush=True)
            return
        if self.old_lock is not None:
            self.old_lock.moved_to(self.out)
        shutil.rmtree(failed, ignore_errors=True)
        print(f"warning: this run failed before its first step; the previous run is back in {self.out}",
              file=sys.stderr, flush=True)

    def release(self) -> None:
        self.lock.release()
        if self.old_lock is not None:
            self.old_lock.release()


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, rank: int, claim: bool = True,
                    inputs=()) -> Optional[OutClaim]:
    """Never silently overwrite a previous run: an existing run needs --resume or --overwrite.

    With claim=False only checks (main() has checked before that no live process holds OUT/.lock); main()
    claims (locks OUT, creates it, moves a previous run aside with --overwrite) only once the config, data and
    checkpoint have been accepted, so bad input never costs the previous run. `inputs` ((what, path) pairs)
    may not lie in an OUT that --overwrite replaces. Returns rank 0's OutClaim (None otherwise).
    """
    if claim and rank != 0:
        return None  # checked with claim=False; rank 0 claims (its marker would read as "holds a run" here)
    _check_out_dir(out, resume, overwrite, inputs)
    if not claim:
        return None
    lock = DirLock(out, "run.out_dir").acquire()
    try:
        replacing = _check_out_dir(out, resume, overwrite, inputs)  # again, under the lock
        info = read_marker(out, RUN_MARKER) or {}
        pending = [Path(p) for p in info.get("replaces", []) if is_replaced_of(Path(p), out) and Path(p).is_dir()]
        me = {"written_by": "training.pretrain", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": socket.gethostname(), "pid": os.getpid()}
        if not replacing:
            if not info:
                write_marker(out, RUN_MARKER, **me, replaces=[])
            for old in pending:
                _log.warning("%s: a previous run of %s, moved aside by --overwrite; deleted after this run's first "
                            "step (move it back by hand to keep it)", old, out)
            return OutClaim(out, lock, pending)
        staging = out.with_name(f"{out.name}.new-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        new_lock = DirLock(staging, "run.out_dir").acquire()
        aside = replaced_name(out.absolute())
        write_marker(staging, RUN_MARKER, **me, replaces=[str(aside)] + [str(p) for p in pending])
        os.rename(out, aside)
        lock.moved_to(aside)
        try:
            os.rename(staging, out)
        except OSError as err:
            new_lock.release()
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"run.out_dir {out}: taken by another process while replacing it ({err.strerror}); the "
                            f"previous run is at {aside}") from None
        new_lock.moved_to(out)
        _log.info("--overwrite: moved the previous run to %s; it is deleted after this run's first step (and put "
                 "back if this run fails before)", aside)
        return OutClaim(out, new_lock, [aside] + pending, old_lock=lock, moved=aside)
    except OSError as err:
        lock.release()
        raise UserError(oserror_line(f"run.out_dir {out}", err)) from None
    except BaseException:
        lock.release()
        raise
