"""A disk that really fills up (issue 29, item 2): a small tmpfs, filled to a few kB with a ballast file, under
each command's output. Every command ends in one `error:` line (exit 2) with nothing half-written left in place
and the previous checkpoint or export intact; with the space back, a --resume goes on.

What a full disk raises depends on the writer (an OSError, torch.save's "unexpected pos", safetensors'
"os error 28", datasets' DatasetGenerationError around the OSError): training/outdir.py `fs_failure` reads them
all. Mounting needs root; elsewhere these tests are skipped with the reason.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.reliability import (RESUME_CONFIGS, reference_run, run_pretrain, tiny_data,  # noqa: F401
                                            tree_digest, write_config)

BASE_ID, BASE = RESUME_CONFIGS[0]


def _mount_error(path: Path) -> str | None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "needs root to mount a small tmpfs"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "none", str(path)], capture_output=True, text=True)
    return None if proc.returncode == 0 else f"cannot mount a tmpfs here ({proc.stderr.strip()})"


@pytest.fixture
def small_fs(tmp_path) -> Path:
    """An 8 MB tmpfs at tmp_path/fs (unmounted afterwards)."""
    fs = tmp_path / "fs"
    fs.mkdir()
    why = _mount_error(fs)
    if why:
        pytest.skip(why)
    try:
        yield fs
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def fill(fs: Path, leave_kb: int) -> Path:
    """A ballast file that leaves `leave_kb` kB free on `fs`."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    ballast = fs / "ballast"
    with open(ballast, "ab") as f:
        f.write(b"\0" * max(0, free - leave_kb * 1024))
    return ballast


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_data) -> Path:  # noqa: F811
    return reference_run(tmp_path_factory, tiny_data, BASE_ID, BASE).parent.parent


def one_error(code: int, stderr: str, *texts: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, f"exit {code}:\n{stderr[-3000:]}"
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    for text in texts:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    return errors[0]


def _main(main, argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_a_full_disk_during_a_checkpoint_save(small_fs, good_run, tiny_data, tmp_path):  # noqa: F811
    out = small_fs / "out"
    shutil.copytree(good_run, out)
    before = tree_digest(out / "checkpoints")
    config = write_config(tmp_path / "c.yaml", tiny_data, out, {**BASE, "train": {"max_steps": 14}})
    ballast = fill(small_fs, 60)
    proc = run_pretrain(config, "--resume")
    one_error(proc.returncode, proc.stderr, "checkpoint", "step00000014", "no space left on device",
              "still names step00000012")
    assert tree_digest(out / "checkpoints") == before  # no step00000014.tmp; `latest` names step 12
    ballast.unlink()
    proc = run_pretrain(config, "--resume")  # space is back: the run goes on
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000014"


def test_a_full_disk_during_the_runs_final_export_keeps_the_previous_one(small_fs, good_run, tiny_data,  # noqa: F811
                                                                          tmp_path, capsys):
    """A finished run resumed exports OUT/hf again (its only write of any size): on a full disk the export fails
    in one line and the previous OUT/hf stays whole, with no temporary dir beside it."""
    from training.export import main as export

    out = small_fs / "out"
    shutil.copytree(good_run, out)
    assert export(["--checkpoint", str(good_run), "--out", str(tmp_path / "hf")]) == 0
    shutil.copytree(tmp_path / "hf", out / "hf")  # the previous export
    before = tree_digest(out / "hf")
    config = write_config(tmp_path / "c.yaml", tiny_data, out, {**BASE, "run": {"export_hf": True}})
    fill(small_fs, 40)
    proc = run_pretrain(config, "--resume")
    one_error(proc.returncode, proc.stderr, "run.out_dir", str(out / "hf"), "no space left on device")
    assert tree_digest(out / "hf") == before
    assert not [p.name for p in out.iterdir() if p.name.startswith((".hf.", "hf."))]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-an-earlier-export"])
def test_export_to_a_full_disk(small_fs, good_run, capsys, existing):
    from training.export import main

    hf = small_fs / "hf"
    if existing:
        assert main(["--checkpoint", str(good_run / "checkpoints" / "step00000010"), "--out", str(hf)]) == 0
    before = tree_digest(hf)
    fill(small_fs, 40)
    code, stderr = _main(main, ["--checkpoint", str(good_run), "--out", str(hf), "--overwrite"], capsys)
    one_error(code, stderr, "--out", "no space left on device")
    assert tree_digest(hf) == before  # absent, or the earlier export byte-identical
    assert sorted(p.name for p in small_fs.iterdir()) == sorted(["ballast"] + (["hf"] if existing else []))


@pytest.mark.parametrize("leave_kb", [40, 600], ids=["while-reading-the-corpus", "while-writing-the-splits"])
def test_prepare_on_a_full_disk(small_fs, tmp_path, capsys, leave_kb):
    from tests.helpers.reliability import corpus_lines
    from training.data.__main__ import main

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(corpus_lines()) + "\n")
    fill(small_fs, leave_kb)
    code, stderr = _main(main, ["prepare", "--input", str(corpus), "--out", str(small_fs / "data"), "--seq-len", "32",
                                "--tokenizer", "train:256", "--num-proc", "1"], capsys)
    one_error(code, stderr, "--out", "data: no space left on device")
    assert [p.name for p in small_fs.iterdir()] == ["ballast"]  # no data dir, no staging dir


def test_finetune_on_a_full_disk(small_fs, good_run, tmp_path, capsys):
    """--save-model on a full disk (safetensors fails with "os error 28"): one line, and nothing half-written in
    OUT: the partial sweep is moved aside to OUT.failed-<pid>, as for any sweep that does not complete."""
    from tests.helpers.reliability import hf_and_task
    from training.finetune import main

    model, task = hf_and_task(good_run, tmp_path, lines=60)
    fill(small_fs, 30)
    out = small_fs / "ft"
    code, stderr = _main(main, ["--model", str(model), "--task", f"csv:{task}", "--out", str(out),
                                "--max-steps", "1", "--batch-size", "4", "--save-model"], capsys)
    one_error(code, stderr, "--out", "no space left on device")
    assert not out.exists() and [p.name for p in small_fs.glob("ft.failed-*")]
    results = small_fs.glob("ft.failed-*/results.json")
    assert all(not json.loads(p.read_text())["complete"] for p in results)
