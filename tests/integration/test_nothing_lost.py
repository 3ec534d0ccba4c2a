"""Nothing lost, ever (issue 15): --overwrite replaces only what is ours and only once the new run trains; one
run per output directory (a lock naming its holder); checkpoints verified by checksum, on resume and export;
file-system faults end in one `error:` line; a killed DeepSpeed op build never makes later runs hang.

The rows that are plain bad input live in tests/integration/test_bad_input.py (exit 2, one error line, untouched out dir);
here are the ones that need a process running, killed, locked or a file system misbehaving.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.reliability import (REPO, RESUME_CONFIGS, env, metrics, pretrain_cmd,  # noqa: F401
                                            reference_run, run_pretrain, tiny_data, tree_digest, write_config)

BASE_ID, BASE = RESUME_CONFIGS[0]
SHORT = {**BASE, "train": {"max_steps": 4}}  # warmup is 3 steps


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_data) -> Path:
    return reference_run(tmp_path_factory, tiny_data, BASE_ID, BASE).parent.parent


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error(proc, *texts: str, code: int = 2) -> str:
    errors = error_lines(proc.stderr)
    assert proc.returncode == code, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for text in texts:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    return errors[0]


def flip_byte(path: Path) -> None:
    """Corrupt a file in place, keeping its size (what a size check cannot see)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


# ------------------------------------------------------------------ 1. --overwrite only once the new run trains

def test_overwrite_crash_in_engine_build_puts_the_previous_run_back(tmp_path, good_run, tiny_data):
    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    before = tree_digest(out)
    config = write_config(tmp_path / "c.yaml", tiny_data, out, SHORT)
    # Passes our validation, crashes inside DeepSpeed's config parsing (engine build), after the claim.
    proc = run_pretrain(config, "--overwrite", "--set", "deepspeed.extra={flops_profiler: {enabled: maybe}}")
    assert proc.returncode not in (0, 2), proc.stderr[-2000:]
    assert "the previous run is back in" in proc.stderr
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]  # no .replaced-*, .new-*, .failed-*


def test_overwrite_deletes_the_previous_run_after_the_first_step(tmp_path, good_run, tiny_data):
    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    config = write_config(tmp_path / "c.yaml", tiny_data, out, SHORT)
    proc = run_pretrain(config, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "moved the previous run to" in proc.stderr and "deleted the previous run" in proc.stderr
    assert latest(out) == "step00000004" and sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]
    assert (out / ".bert-run").is_file() and not (out / ".lock").exists()


def test_overwrite_killed_before_the_first_step_leaves_the_previous_run_recoverable(tmp_path, good_run, tiny_data):
    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    before = tree_digest(out)
    config = write_config(tmp_path / "c.yaml", tiny_data, out, SHORT)
    proc = subprocess.Popen(pretrain_cmd(config, "--overwrite"), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while not list(tmp_path.glob("out.replaced-*")):
            assert proc.poll() is None and time.monotonic() < deadline, "never moved the previous run aside"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if metrics(out):
        pytest.skip("the kill landed after the first step (machine too fast for this race)")
    aside = list(tmp_path.glob("out.replaced-*"))
    assert len(aside) == 1
    # Byte-identical apart from the lock file its holder (now dead) had written its pid into.
    (aside[0] / ".lock").unlink(missing_ok=True)
    assert tree_digest(aside[0]) == before
    assert str(aside[0]) in (out / ".bert-run").read_text()  # named where the next run looks
    proc = run_pretrain(config, "--overwrite")  # the next --overwrite finishes the job
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]


# ------------------------------------------------------------------ 2. one run per output directory

def _hold_lock(directory: Path, text: str = "4242@elsewhere\n") -> int:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, text.encode(), 0)
    return fd


def test_a_second_run_on_a_busy_out_dir_exits_2_naming_the_holder(tmp_path, good_run, tiny_data):
    out = tmp_path / "out"
    config = write_config(tmp_path / "c.yaml", tiny_data, out, {**BASE, "train": {"max_steps": 6}})
    first = subprocess.Popen(pretrain_cmd(config), cwd=REPO, env=env(DSBERT_FAULT_SLEEP_IN_SAVE="4"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / ".lock").is_file() or not (out / ".lock").read_text().strip():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        before = tree_digest(out / "checkpoints")
        for args in ((), ("--resume",), ("--overwrite",)):
            second = run_pretrain(config, *args)
            assert_one_error(second, "in use by pid", f"{first.pid}@", ".lock")
        assert first.wait(timeout=180) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert before == "absent" or (out / "checkpoints").is_dir()
    assert not (out / ".lock").exists()  # released (and removed) on exit
    steps = [r["step"] for r in metrics(out) if r.get("kind") == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 7))  # one run's records, not two interleaved


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, good_run, tiny_data):
    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    (out / ".lock").write_text("999999@gone\n")  # nobody holds the flock: its holder was killed
    config = write_config(tmp_path / "c.yaml", tiny_data, out, {**BASE, "train": {"max_steps": 14}})
    proc = run_pretrain(config, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert latest(out) == "step00000014"


def test_probes_of_a_stale_lock_file_never_see_each_other_as_holders(tmp_path):
    """Every rank of a job probes OUT/.lock at once; after a killed run the file is still there, naming its dead
    writer. A probe must not mistake another probe for a holder (a requeued Slurm job once failed so: 'in use by
    pid N@node1', N long dead), yet still see a real holder."""
    import threading

    from training import outdir

    (tmp_path / ".lock").write_text("4537@node1\n")
    seen: list = []

    def probe():
        for _ in range(1500):
            holder = outdir.holder_of(tmp_path / ".lock")
            if holder:
                seen.append(holder)

    threads = [threading.Thread(target=probe) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == []
    fd = _hold_lock(tmp_path)
    try:
        assert outdir.holder_of(tmp_path / ".lock") == "4242@elsewhere"
    finally:
        os.close(fd)
    assert outdir.DirLock(tmp_path, "x").acquire().fd is not None  # and the next run takes it over


def test_lock_wait_waits_for_the_holder_to_let_go_then_gives_up(tmp_path):
    """--lock-wait (the Slurm scripts pass it on a requeue): a holder that lets go within the wait is waited
    for; one that does not is named after the wait, as without it."""
    import threading

    from training import outdir
    from training.errors import UserError

    out = tmp_path / "out"
    fd = _hold_lock(out)
    threading.Timer(0.6, os.close, [fd]).start()  # the holder exits 0.6 s from now
    start = time.monotonic()
    outdir.wait_unlocked(out, "run.out_dir", 30, poll_s=0.05)
    assert 0.5 < time.monotonic() - start < 10
    fd = _hold_lock(out)
    try:
        start = time.monotonic()
        with pytest.raises(UserError, match=r"in use by pid 4242@elsewhere"):
            outdir.wait_unlocked(out, "run.out_dir", 0.4, poll_s=0.05)
        assert time.monotonic() - start >= 0.4
        with pytest.raises(UserError, match=r"in use by pid 4242@elsewhere"):
            outdir.wait_unlocked(out, "run.out_dir", 0)  # the default: at once
    finally:
        os.close(fd)


def test_prepare_on_a_locked_out_dir_exits_2_naming_the_holder(tmp_path, tiny_data):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Some text of a document.\n" * 50)
    out = tmp_path / "data"
    fd = _hold_lock(out)
    try:
        before = tree_digest(out)
        proc = subprocess.run([sys.executable, "-m", "training.data", "prepare", "--input", str(corpus), "--out",
                               str(out), "--seq-len", "16", "--tokenizer", "train:128", "--num-proc", "1"],
                              cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
        assert_one_error(proc, "--out", "in use by pid 4242@elsewhere", str(out / ".lock"))
        assert tree_digest(out) == before
    finally:
        os.close(fd)


# ------------------------------------------------------------------ 3. checksums, on resume and on export

def test_resume_passes_over_a_checkpoint_corrupted_in_place(tmp_path, tmp_path_factory, good_run, tiny_data):
    from tests.helpers.reliability import assert_bit_identical

    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    bad = out / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt"
    flip_byte(bad)
    kept = tree_digest(out / "checkpoints" / "step00000012")
    config = write_config(tmp_path / "c.yaml", tiny_data, out, BASE)
    proc = run_pretrain(config, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert any(str(bad) in w and "sha256 differs" in w and "resuming from step00000010" in w for w in warnings), \
        proc.stderr[-2000:]
    assert "resumed from step00000010" in proc.stderr
    # The bad checkpoint is kept, untouched, beside the new timeline; the redone step 12 is the clean one.
    assert tree_digest(out / "checkpoints" / "step00000012.corrupt") == kept
    assert_bit_identical(good_run / "checkpoints" / "step00000012", out / "checkpoints" / "step00000012")


def test_resume_with_every_checkpoint_corrupt_exits_2_naming_the_file(tmp_path, good_run, tiny_data):
    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    for tag in ("step00000008", "step00000010", "step00000012"):
        flip_byte(out / "checkpoints" / tag / "rng_rank0.pt")
    before = tree_digest(out)
    proc = run_pretrain(write_config(tmp_path / "c.yaml", tiny_data, out, BASE), "--resume")
    assert_one_error(proc, "step00000012/rng_rank0.pt: corrupt", "sha256", "no older checkpoint")
    assert tree_digest(out) == before


@pytest.mark.parametrize("which", ["mp_rank_00_model_states.pt", "rng_rank0.pt"])
def test_export_of_a_named_corrupt_checkpoint_is_refused(tmp_path, good_run, which):
    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    tag_dir = out / "checkpoints" / "step00000012"
    flip_byte(tag_dir / which)
    before = tree_digest(out)
    proc = subprocess.run([sys.executable, "-m", "training.export", "--checkpoint", str(tag_dir), "--out",
                           str(tmp_path / "hf")], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert_one_error(proc, f"{tag_dir / which}: corrupt")
    assert tree_digest(out) == before and not (tmp_path / "hf").exists()


def test_export_of_a_run_dir_uses_the_newest_good_checkpoint_with_a_warning(tmp_path, good_run):
    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    bad = out / "checkpoints" / "step00000012" / "mp_rank_00_model_states.pt"
    flip_byte(bad)
    proc = subprocess.run([sys.executable, "-m", "training.export", "--checkpoint", str(out), "--out",
                           str(tmp_path / "hf")], cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warning: {bad}: corrupt" in proc.stderr and "using step00000010" in proc.stderr
    assert "exported" in proc.stdout and "step00000010" in proc.stdout


def test_the_manifest_records_a_checksum_per_file(good_run):
    import hashlib
    import json

    tag_dir = good_run / "checkpoints" / "step00000012"
    meta = json.loads((tag_dir / "meta.json").read_text())
    sums = meta["checksums"]
    assert sums["algorithm"] == "sha256" and set(sums["files"]) == set(meta["files"])
    for name, digest in sums["files"].items():
        assert hashlib.sha256((tag_dir / name).read_bytes()).hexdigest() == digest


# ------------------------------------------------------------------ 8. file-system faults

def test_disk_full_during_a_save_is_one_error_line_and_leaves_no_temp_dir(tmp_path, good_run, tiny_data):
    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    ckpts_before = tree_digest(out / "checkpoints")
    config = write_config(tmp_path / "c.yaml", tiny_data, out, {**BASE, "train": {"max_steps": 14}})
    proc = run_pretrain(config, "--resume", DSBERT_FAULT_ENOSPC_IN_SAVE="14")
    assert_one_error(proc, "checkpoint", "step00000014", "no space left on device", "still names step00000012")
    assert tree_digest(out / "checkpoints") == ckpts_before  # no step00000014.tmp, latest unchanged
    proc = run_pretrain(config, "--resume")  # space is back: the run goes on from the last good checkpoint
    assert proc.returncode == 0 and latest(out) == "step00000014", proc.stderr[-2000:]


def _unshare_ok() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_ok(), reason="needs root and unshare --mount for a real read-only mount")
@pytest.mark.parametrize("args", [("--resume",), ("--overwrite",), ()], ids=["resume", "overwrite", "fresh"])
def test_a_read_only_out_dir_is_one_error_line(tmp_path, good_run, tiny_data, args):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "out"
    if args:
        shutil.copytree(good_run, out)
    before = tree_digest(ro)
    config = write_config(tmp_path / "c.yaml", tiny_data, out, {**BASE, "train": {"max_steps": 14}})
    cmd = " ".join(f"'{a}'" for a in pretrain_cmd(config, *args))
    script = f"mount --bind '{ro}' '{ro}' && mount -o remount,bind,ro '{ro}' && exec {cmd}"
    proc = subprocess.run(["unshare", "--mount", "sh", "-c", script], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert_one_error(proc, "run.out_dir", str(out), "Read-only file system")
    assert tree_digest(ro) == before


@pytest.mark.parametrize("garbage", [bytes(range(256)), b"step0000\x00012", b"../../etc", b"x" * 5000],
                         ids=["binary", "nul", "path", "long"])
def test_a_garbage_latest_file_is_one_error_line(tmp_path, good_run, tiny_data, garbage):
    out = tmp_path / "out"
    shutil.copytree(good_run, out)
    (out / "checkpoints" / "latest").write_bytes(garbage)
    before = tree_digest(out)
    proc = run_pretrain(write_config(tmp_path / "c.yaml", tiny_data, out, BASE), "--resume")
    assert_one_error(proc, str(out / "checkpoints" / "latest"), "step00000012")
    assert tree_digest(out) == before


# ------------------------------------------------------------------ 9. a killed DeepSpeed op build

def _extensions_with_built_op(tmp_path: Path) -> Path:
    """A TORCH_EXTENSIONS_DIR holding the shm op already built (copied, mtimes kept: ninja has nothing to do)."""
    from torch.utils.cpp_extension import _get_build_directory

    root = tmp_path / "torch_extensions"
    built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))  # the default location
    if not (built / "deepspeed_shm_comm.so").is_file():
        pytest.skip(f"no built deepspeed_shm_comm in {built} (make venv builds it)")
    shutil.copytree(built, root / "deepspeed_shm_comm", symlinks=True)
    (root / "deepspeed_shm_comm" / "lock").unlink(missing_ok=True)
    return root


def test_a_lock_left_by_a_killed_op_build_is_cleared_not_waited_on(tmp_path, tiny_data):
    ext = _extensions_with_built_op(tmp_path)
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.write_bytes(b"")  # what torch's FileBaton leaves when its build is killed
    config = write_config(tmp_path / "c.yaml", tiny_data, tmp_path / "out", SHORT)
    proc = run_pretrain(config, timeout=120, TORCH_EXTENSIONS_DIR=str(ext))  # it used to hang here forever
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warning: removed the stale lock {lock}" in proc.stderr
    assert not lock.exists()


def test_an_op_build_held_by_a_live_process_times_out_naming_the_lock(tmp_path, tiny_data):
    ext = _extensions_with_built_op(tmp_path)
    lock = ext / "deepspeed_shm_comm" / "lock"
    hold = (f"import os, time; os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); print('held', flush=True); "
            "time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        out = tmp_path / "out"
        config = write_config(tmp_path / "c.yaml", tiny_data, out, SHORT)
        proc = run_pretrain(config, timeout=60, TORCH_EXTENSIONS_DIR=str(ext), DSBERT_OP_BUILD_TIMEOUT_S="2")
        assert_one_error(proc, str(lock), f"pid {holder.pid}", "DeepSpeed")
        assert lock.exists() and not out.exists()  # a live build's lock is not ours to remove
    finally:
        holder.kill()
        holder.wait()


def test_op_preparation_waits_for_our_own_builder_then_loads(tmp_path):
    """Two of our processes at once: the second waits on the flock of the first, then loads (no rebuild)."""
    ext = _extensions_with_built_op(tmp_path)
    cmd = [sys.executable, "-m", "training.engine.ops"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env(TORCH_EXTENSIONS_DIR=str(ext)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all("ops ready: deepspeed_shm_comm" in o for o, _ in results)
    assert not (ext / "deepspeed_shm_comm" / "lock").exists()


# ------------------------------------------------------------------ 7. export never overwrites or half-writes

def _export(*args: str) -> int:
    from training.export import main

    try:
        return main(list(args))
    except SystemExit as exc:
        return exc.code


def test_export_needs_overwrite_and_replaces_an_earlier_export_whole(tmp_path, good_run, capsys):
    hf = tmp_path / "exports" / "hf"
    assert _export("--checkpoint", str(good_run / "checkpoints" / "step00000010"), "--out", str(hf)) == 0
    first = tree_digest(hf)
    assert _export("--checkpoint", str(good_run), "--out", str(hf)) == 2
    assert "not empty (pass --overwrite" in capsys.readouterr().err and tree_digest(hf) == first
    assert _export("--checkpoint", str(good_run), "--out", str(hf), "--overwrite") == 0
    assert tree_digest(hf) != first and (hf / "model.safetensors").is_file() and (hf / "vocab.txt").is_file()
    assert sorted(p.name for p in hf.parent.iterdir()) == ["hf"]  # no .hf.tmp-*, no .hf.old-*


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_export_leaves_no_partial_out(tmp_path, good_run, monkeypatch, existing):
    import training.model.hf_export as hf_mod

    hf = tmp_path / "hf"
    if existing:
        assert _export("--checkpoint", str(good_run), "--out", str(hf)) == 0
    before = tree_digest(hf)
    real = hf_mod.export_hf

    def half_then_crash(model, cfg, out_dir, tokenizer_dir=None):
        real(model, cfg, out_dir, tokenizer_dir=tokenizer_dir)
        (Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_mod, "export_hf", half_then_crash)
    assert _export("--checkpoint", str(good_run), "--out", str(hf), *(["--overwrite"] if existing else [])) == 2
    assert tree_digest(hf) == before  # absent, or the earlier export byte-identical
    assert sorted(p.name for p in tmp_path.iterdir()) == (["hf"] if existing else [])
