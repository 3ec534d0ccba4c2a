"""Bad input, tried systematically: each malformed config, corpus or checkpoint gets ONE clear `error: ...`
line naming the field or file, exit code 2, and leaves existing outputs untouched.

Most rows call the CLIs' `main(argv)` in-process (a CLI process costs ~3 s of imports); the rows marked
"subprocess" run the real command line to check the process-level contract (exit status, stderr).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.reliability import (BASE_CONFIG, REPO, RESUME_CONFIGS, env, reference_run,  # noqa: F401
                                            tiny_data, tree_digest, write_config)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tiny_data) -> Path:
    """A finished run directory (checkpoints every 2 steps), never modified: rows copy it."""
    cfg_id, overrides = RESUME_CONFIGS[0]
    return reference_run(tmp_path_factory, tiny_data, cfg_id, overrides).parent.parent


@pytest.fixture
def in_process(monkeypatch):
    """Run CLI mains in this process; undo what pretrain's start-up does to the process afterwards."""
    import torch

    from training.dist import free_port, shutdown
    from training.signals import preemption

    already = torch.distributed.is_initialized()  # e.g. by another module's in-process test: reuse it
    if not already:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k, raising=False)  # restored last: the exports of init_distributed go away
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    if torch.distributed.is_initialized() and not already:
        shutdown()
    preemption().uninstall()
    for s, h in handlers.items():
        signal.signal(s, h)


class Case:
    """A tmp dir with a config (BASE_CONFIG + overrides) and an out dir; rows mutate it through helpers."""

    def __init__(self, tmp: Path, data: Path, good_run: Path):
        self.tmp, self.data, self.good_run = tmp, data, good_run
        self.out = tmp / "out"
        self.config = tmp / "config.yaml"

    def cfg(self, overrides=None, **top) -> "Case":
        write_config(self.config, self.data, self.out, overrides)
        if top:
            raw = yaml.safe_load(self.config.read_text())
            raw.update(top)
            self.config.write_text(yaml.safe_dump(raw))
        return self

    def copy_run(self) -> Path:
        shutil.copytree(self.good_run, self.out)
        return self.out / "checkpoints" / (self.out / "checkpoints" / "latest").read_text().strip()

    def pretrain(self, *args: str) -> list[str]:
        return ["pretrain", "--config", str(self.config), *args]


def _set(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def truncate(path: Path, keep: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:keep])


# Each row: (id, build(case) -> argv, expected text in the error line, how: "inproc" | "subprocess").
ROWS = [
    # -- config file and CLI
    ("missing-config", lambda c: ["pretrain", "--config", str(c.tmp / "nope.yaml")],
     ["config file not found", "nope.yaml"], "subprocess"),
    ("invalid-yaml", lambda c: (c.config.write_text("run: [unclosed\n"), c.pretrain())[1],
     ["config.yaml: not valid YAML"], "inproc"),
    ("yaml-not-a-mapping", lambda c: (c.config.write_text("- a\n- b\n"), c.pretrain())[1],
     ["config.yaml: the top level must be a mapping"], "inproc"),
    ("binary-config", lambda c: (c.config.write_bytes(bytes(range(256)) * 4), c.pretrain())[1],
     ["config.yaml"], "inproc"),
    ("unknown-config-key", lambda c: c.cfg().pretrain(*_set("run.colour=blue")),
     ["unknown config key 'run.colour'"], "inproc"),
    ("unknown-section", lambda c: c.cfg(trainer={"x": 1}).pretrain(), ["unknown config key 'trainer'"], "inproc"),
    ("set-without-equals", lambda c: c.cfg().pretrain("--set", "train.max_steps"),
     ["--set 'train.max_steps': expected key=value"], "inproc"),
    ("zero-steps", lambda c: c.cfg().pretrain(*_set("train.max_steps=0")),
     ["train.max_steps must be positive"], "inproc"),
    ("steps-not-a-number", lambda c: c.cfg().pretrain(*_set("train.max_steps=many")),
     ["train.max_steps"], "inproc"),
    ("negative-lr", lambda c: c.cfg().pretrain(*_set("optimizer.lr=-0.001")),
     ["optimizer.lr must be positive"], "inproc"),
    ("negative-micro-batch", lambda c: c.cfg().pretrain(*_set("train.micro_batch_size=-4")),
     ["train.micro_batch_size must be positive"], "inproc"),
    ("hidden-not-divisible-by-heads", lambda c: c.cfg().pretrain(*_set("model.hidden_size=33")),
     ["model.hidden_size (33) must be divisible by model.num_heads (2)"], "inproc"),
    ("keep-last-zero", lambda c: c.cfg().pretrain(*_set("run.keep_last=0")),
     ["run.keep_last must be positive"], "inproc"),
    ("on-nan-unknown", lambda c: c.cfg().pretrain(*_set("run.on_nan=ignore")), ["run.on_nan"], "inproc"),
    ("empty-stages", lambda c: c.cfg().pretrain(*_set("stages=[]")), ["stages: the list is empty"], "inproc"),
    ("unknown-stage-hook", lambda c: c.cfg(stages=[{"name": "a", "steps": 2},
                                                   {"name": "b", "steps": 2, "hook": "teleport"}]).pretrain(),
     ["config.yaml", "unknown stage hook 'teleport'"], "inproc"),
    ("growth-that-shrinks", lambda c: c.cfg(stages=[{"name": "a", "steps": 2},
                                                    {"name": "b", "steps": 2, "hook": "stack",
                                                     "model": {"num_layers": 1}}]).pretrain(),
     ["stage 'b'", "stack"], "inproc"),
    ("fp16-on-cpu", lambda c: c.cfg().pretrain(*_set("train.precision=fp16")),
     ["train.precision=fp16 needs a CUDA device"], "subprocess"),
    ("deepspeed-template-missing", lambda c: c.cfg().pretrain(*_set("deepspeed.template=nope.json")),
     ["deepspeed.template: file not found: nope.json"], "inproc"),
    ("deepspeed-extra-owned-key", lambda c: c.cfg().pretrain(*_set("deepspeed.extra={train_batch_size: 8}")),
     ["deepspeed.extra sets ['train_batch_size']"], "inproc"),
    # -- values outside their field's domain (issue 15, item 4): caught by the schema, before anything runs
    ("nan-lr", lambda c: c.cfg().pretrain(*_set("optimizer.lr=.nan")),
     ["config.yaml: optimizer.lr must be positive and finite, got nan"], "inproc"),
    ("nan-grad-clip", lambda c: c.cfg().pretrain(*_set("train.grad_clip=.nan")),
     ["train.grad_clip must be a finite number >= 0, got nan"], "subprocess"),
    ("negative-eps", lambda c: c.cfg().pretrain(*_set("optimizer.eps=-1.0e-8")),
     ["optimizer.eps must be positive and finite"], "inproc"),
    ("pad-id-outside-vocab", lambda c: c.cfg().pretrain(*_set("model.pad_token_id=256")),
     ["model.pad_token_id must be in [0, model.vocab_size=256), got 256"], "inproc"),
    ("mlm-probability-over-one", lambda c: c.cfg().pretrain(*_set("data.mlm_probability=1.5")),
     ["data.mlm_probability must be in (0, 1), got 1.5"], "inproc"),
    ("zero-timeout", lambda c: c.cfg().pretrain(*_set("dist.timeout_s=0")),
     ["dist.timeout_s must be positive, got 0"], "inproc"),
    ("deepspeed-extra-wrong-type", lambda c: c.cfg().pretrain(
        *_set("deepspeed.extra={zero_optimization: {overlap_comm: sure}}")),
     ["deepspeed.extra.zero_optimization.overlap_comm must be true or false"], "inproc"),
    ("set-stage-out-of-range", lambda c: c.cfg(stages=[{"name": n, "steps": 4} for n in "abc"]).pretrain(
        *_set("stages.7.steps=1")), ["--set stages.7.steps: stages has 3 entries (indices 0-2)"], "inproc"),
    ("set-unparsable-value", lambda c: c.cfg().pretrain(*_set("train.max_steps=[")),
     ["--set train.max_steps=[: not a valid YAML value"], "subprocess"),
    ("duplicate-config-key", lambda c: (c.cfg(), c.config.write_text(c.config.read_text() + "train: {max_steps: 3}\n"),
                                        c.pretrain())[2],
     ["config.yaml: line", "duplicate key 'train' (first at line"], "inproc"),
    ("warmup-longer-than-the-run", lambda c: c.cfg().pretrain(*_set("optimizer.warmup_steps=100")),
     ["optimizer.warmup_steps=100 exceeds train.max_steps=12"], "inproc"),
    # -- data
    ("data-dir-missing", lambda c: c.cfg().pretrain(*_set(f"data.dir={c.tmp / 'no-data'}")),
     ["data.dir=", "no-data holds no prepared data"], "inproc"),
    ("vocab-differs-from-tokenizer", lambda c: c.cfg().pretrain(*_set("model.vocab_size=300")),
     ["model.vocab_size=300 but the tokenizer", "has 256 tokens"], "inproc"),
    ("seq-len-over-max-position", lambda c: c.cfg().pretrain(*_set("model.max_position=16")),
     ["has seq_len 32, more than model.max_position=16"], "inproc"),
    # -- output directory
    ("out-exists-without-overwrite", lambda c: (c.copy_run(), c.cfg().pretrain())[1],
     ["already holds a run; pass --resume", "--overwrite"], "inproc"),
    ("out-is-a-file", lambda c: (c.out.write_text("x"), c.cfg().pretrain())[1],
     ["exists and is not a directory"], "inproc"),
    ("overwrite-with-bad-data-keeps-old-run", lambda c: (c.copy_run(), c.cfg().pretrain(
        "--overwrite", *_set(f"data.dir={c.tmp / 'no-data'}")))[1], ["holds no prepared data"], "inproc"),
    # --overwrite replaces only a run (its .bert-run marker) that holds no input of this run
    ("overwrite-the-data-dir", lambda c: (shutil.copytree(c.data, c.out), c.cfg().pretrain(
        "--overwrite", *_set(f"data.dir={c.out}")))[1], ["run.out_dir", "is data.dir=", "an input"], "subprocess"),
    ("overwrite-a-dir-holding-the-data", lambda c: (shutil.copytree(c.data, c.out / "data"), c.cfg().pretrain(
        "--overwrite", *_set(f"data.dir={c.out / 'data'}")))[1], ["contains data.dir=", "an input"], "inproc"),
    ("overwrite-a-dir-holding-the-config", lambda c: (c.copy_run(), c.cfg(), shutil.copy(c.config, c.out / "my.yaml"),
                                                      ["pretrain", "--config", str(c.out / "my.yaml"),
                                                       "--overwrite"])[3],
     ["contains --config=", "my.yaml"], "inproc"),
    ("overwrite-someones-dir", lambda c: (c.out.mkdir(), (c.out / "thesis.tex").write_text("years of work"),
                                          c.cfg().pretrain("--overwrite"))[2],
     ["has no .bert-run marker", "delete it by hand"], "inproc"),
    ("overwrite-a-run-from-before-the-marker", lambda c: (c.copy_run(), (c.out / ".bert-run").unlink(),
                                                          c.cfg().pretrain("--overwrite"))[2],
     ["has no .bert-run marker", "runs written before the marker", "delete it by hand"], "subprocess"),
    ("resume-into-someones-dir", lambda c: (c.out.mkdir(), (c.out / "notes.txt").write_text("x"),
                                            c.cfg().pretrain("--resume"))[2],
     ["holds files but no run of training.pretrain"], "inproc"),
    ("run-on-a-locked-out-dir", lambda c: (c.copy_run(), _lock(c.out), c.cfg().pretrain("--resume"))[2],
     ["run.out_dir", "in use by pid 4242@elsewhere", ".lock"], "inproc"),
    ("run-on-a-locked-out-dir-after-lock-wait", lambda c: (c.copy_run(), _lock(c.out), c.cfg().pretrain(
        "--resume", "--lock-wait", "0.3"))[2], ["run.out_dir", "in use by pid 4242@elsewhere", ".lock"], "inproc"),
    # -- checkpoints (--resume)
    ("resume-other-model", lambda c: (c.copy_run(), c.cfg().pretrain("--resume", *_set("model.hidden_size=48")))[1],
     ["holds a different model", "hidden_size: checkpoint 32, config 48"], "subprocess"),
    ("resume-other-max-position", lambda c: (c.copy_run(),
                                             c.cfg().pretrain("--resume", *_set("model.max_position=64")))[1],
     ["holds a different model", "max_position: checkpoint 32, config 64"], "inproc"),
    # A corrupt newest checkpoint is passed over for the newest one that verifies (tests/integration/test_nothing_lost.py);
    # these rows corrupt every checkpoint, so none is left to resume from.
    ("resume-truncated-model-states", lambda c: (_every_tag(c, lambda t: truncate(t / "mp_rank_00_model_states.pt")),
                                                 c.cfg().pretrain("--resume"))[1],
     ["step00000012/mp_rank_00_model_states.pt: truncated or corrupt", "no older checkpoint", "verifies"], "inproc"),
    ("resume-missing-model-states", lambda c: (_every_tag(c, lambda t: (t / "mp_rank_00_model_states.pt").unlink()),
                                               c.cfg().pretrain("--resume"))[1],
     ["incomplete checkpoint, mp_rank_00_model_states.pt is missing", "no older checkpoint"], "inproc"),
    ("resume-corrupt-meta", lambda c: (_every_tag(c, lambda t: truncate(t / "meta.json", 30)),
                                       c.cfg().pretrain("--resume"))[1],
     ["meta.json: truncated or corrupt"], "inproc"),
    ("resume-corrupted-in-place", lambda c: (_every_tag(c, lambda t: _flip(t / "mp_rank_00_model_states.pt")),
                                             c.cfg().pretrain("--resume"))[1],
     ["step00000012/mp_rank_00_model_states.pt: corrupt (sha256 differs", "no older checkpoint"], "subprocess"),
    ("resume-latest-garbage", lambda c: (c.copy_run(), (c.out / "checkpoints" / "latest").write_bytes(b"\xff\xfe\0"),
                                         c.cfg().pretrain("--resume"))[2],
     ["checkpoints/latest: garbage", "newest other checkpoint is step00000012"], "subprocess"),
    ("resume-latest-names-missing-dir", lambda c: (shutil.rmtree(c.copy_run()), c.cfg().pretrain("--resume"))[1],
     ["latest names step00000012", "does not exist", "step00000010"], "inproc"),
    ("resume-latest-file-missing", lambda c: (c.copy_run(), (c.out / "checkpoints" / "latest").unlink(),
                                              c.cfg().pretrain("--resume"))[2],
     ["holds checkpoints (step00000012 the newest) but no `latest` file"], "inproc"),
    ("resume-foreign-directory", lambda c: (_foreign(c), c.cfg().pretrain("--resume"))[1],
     ["not a checkpoint of this trainer (no meta.json)"], "inproc"),
    ("resume-foreign-meta", lambda c: ((c.copy_run() / "meta.json").write_text('{"hello": 1}'),
                                       c.cfg().pretrain("--resume"))[1],
     ["meta.json: not a checkpoint of this trainer"], "inproc"),
    # -- export
    ("export-foreign-directory", lambda c: (c.out.mkdir(), (c.out / "weights.bin").write_bytes(b"\0" * 64),
                                            ["export", "--checkpoint", str(c.out), "--out", str(c.tmp / "hf")])[2],
     ["no checkpoint found"], "inproc"),
    ("export-truncated-checkpoint", lambda c: (truncate((t := c.copy_run()) / "mp_rank_00_model_states.pt"),
                                               ["export", "--checkpoint", str(t), "--out", str(c.tmp / "hf")])[1],
     ["mp_rank_00_model_states.pt: truncated or corrupt"], "inproc"),
    ("export-corrupted-in-place", lambda c: (_flip((t := c.copy_run()) / "mp_rank_00_model_states.pt"),
                                             ["export", "--checkpoint", str(t), "--out", str(c.tmp / "hf")])[1],
     ["step00000012/mp_rank_00_model_states.pt: corrupt (sha256 differs"], "inproc"),
    ("export-every-checkpoint-corrupt", lambda c: (_every_tag(c, lambda t: _flip(t / "rng_rank0.pt")),
                                                   ["export", "--checkpoint", str(c.out), "--out",
                                                    str(c.tmp / "hf")])[1],
     ["step00000012/rng_rank0.pt: corrupt", "no older checkpoint"], "inproc"),
    ("export-missing-path", lambda c: ["export", "--checkpoint", str(c.tmp / "nowhere"), "--out", str(c.tmp / "hf")],
     ["--checkpoint", "nowhere: no such directory"], "inproc"),
    # -- corpora (data prepare)
    ("corpus-missing", lambda c: _prepare(c, c.tmp / "none.txt"), ["none.txt: no such file"], "inproc"),
    ("corpus-empty", lambda c: _prepare(c, _write(c.tmp / "empty.txt", b"")), ["empty.txt"], "inproc"),
    ("corpus-binary", lambda c: _prepare(c, _write(c.tmp / "blob.txt", bytes(range(256)) * 64)),
     ["blob.txt"], "inproc"),
    ("corpus-unsupported-type", lambda c: _prepare(c, _write(c.tmp / "c.docx", b"PK\3\4")),
     ["c.docx: unsupported file type"], "inproc"),
    ("corpus-hf-not-found-offline", lambda c: _prepare(c, "hf:no-such-owner/no-such-dataset-zq7/"),
     ["--input hf:no-such-owner/no-such-dataset-zq7/:", "not found locally and the hub is offline"], "subprocess"),
    ("corpus-hf-missing-text-column", lambda c: _prepare(c, f"hf:{_parquet(c.tmp / 'p.parquet', body=['a b c'] * 9)}"),
     ["p.parquet: no column 'text' (the dataset has 'body')", "--text-column"], "inproc"),
    ("tokenizer-missing", lambda c: _prepare(c, _write(c.tmp / "c.txt", b"some text\n" * 50),
                                             tokenizer=str(c.tmp / "no-tokenizer")), ["no-tokenizer"], "inproc"),
    # -- data prepare --overwrite: only a data dir it made, never one holding its input
    ("prepare-overwrite-the-corpus-dir", lambda c: (c.out.mkdir(), _prepare(
        c, _write(c.out / "c.txt", b"some text here\n" * 50)) + ["--overwrite"])[1],
     ["--out", "contains --input=", "c.txt"], "subprocess"),
    ("prepare-overwrite-a-data-dir-holding-the-corpus", lambda c: (shutil.copytree(c.data, c.out), _prepare(
        c, _write(c.out / "c.txt", b"some text here\n" * 50)) + ["--overwrite"])[1],
     ["contains --input=", "c.txt"], "inproc"),
    ("prepare-overwrite-the-tokenizer-dir", lambda c: (shutil.copytree(c.data, c.out), _prepare(
        c, _write(c.tmp / "c.txt", b"some text here\n" * 50), tokenizer=str(c.out / "tokenizer")) + ["--overwrite"])[1],
     ["contains --tokenizer=", "tokenizer"], "inproc"),
    ("prepare-overwrite-someones-dir", lambda c: (c.out.mkdir(), (c.out / "photos.tar").write_bytes(b"\0" * 99),
                                                  _prepare(c, _write(c.tmp / "c.txt", b"some text\n" * 50))
                                                  + ["--overwrite"])[2],
     ["has no .bert-data marker", "delete it by hand"], "inproc"),
    ("prepare-on-a-locked-out-dir", lambda c: (shutil.copytree(c.data, c.out), _lock(c.out), _prepare(
        c, _write(c.tmp / "c.txt", b"some text\n" * 50)) + ["--overwrite"])[2],
     ["--out", "in use by pid 4242@elsewhere"], "inproc"),
    # -- a data dir verified when a run opens it (issue 15, item 5); prepare never makes an empty split
    ("data-truncated-arrow", lambda c: _bad_data(c, lambda d: truncate(d / "train" / "data-00000-of-00001.arrow",
                                                                       50000)),
     ["train/data-00000-of-00001.arrow: cannot be read, truncated or corrupt"], "subprocess"),
    ("data-truncated-heldout-state", lambda c: _bad_data(c, lambda d: truncate(d / "heldout" / "state.json", 20)),
     ["heldout/state.json: cannot be read"], "inproc"),
    ("data-corrupt-stats", lambda c: _bad_data(c, lambda d: truncate(d / "stats.json", 40)),
     ["stats.json: truncated or corrupt"], "inproc"),
    ("data-stats-without-seq-len", lambda c: _bad_data(c, lambda d: _edit_stats(d, seq_len=None)),
     ["stats.json: seq_len is missing"], "inproc"),
    ("data-tokenizer-missing", lambda c: _bad_data(c, lambda d: shutil.rmtree(d / "tokenizer")),
     ["tokenizer/ is missing"], "inproc"),
    ("data-vocab-differs-from-stats", lambda c: _bad_data(c, lambda d: _append(d / "tokenizer" / "vocab.txt",
                                                                              "[EXTRA]\n")),
     ["tokenizer/vocab.txt: 257 tokens", "vocab_size 256"], "inproc"),
    ("data-heldout-missing", lambda c: _bad_data(c, lambda d: shutil.rmtree(d / "heldout")),
     ["heldout/ is missing"], "inproc"),
    ("data-rows-differ-from-stats", lambda c: _bad_data(c, lambda d: _edit_stats(d, rows={"train": 99, "heldout": 9})),
     ["train:", "rows, but", "stats.json says 99"], "inproc"),
    ("data-empty-heldout-split", lambda c: (_prepare_run_data(c, "0"), c.cfg().pretrain(
        *_set(f"data.dir={c.tmp / 'data'}")))[1], ["held-out split has no rows", "--heldout-fraction"], "inproc"),
    ("evaluate-on-an-empty-heldout-split", lambda c: (_prepare_run_data(c, "0"), [
        "evaluate", "--model", str(c.good_run), "--data", str(c.tmp / "data"), "--out", str(c.out)])[1],
     ["held-out split has no rows"], "inproc"),
    ("prepare-no-train-rows", lambda c: _prepare(c, _write(c.tmp / "c.txt", b"hello world\n"),
                                                 tokenizer=str(c.data / "tokenizer")),
     ["--input", "c.txt", "the train split has no rows of --seq-len 16"], "subprocess"),
    ("prepare-no-heldout-rows", lambda c: _prepare(c, _write(c.tmp / "c.txt", " ".join(["words"] * 400).encode()),
                                                   tokenizer=str(c.data / "tokenizer")) + ["--heldout-fraction", "0.1"],
     ["the heldout split has no rows", "--heldout-fraction"], "inproc"),
    # -- resume checks what it resumes into (item 6)
    ("resume-other-precision", lambda c: (c.copy_run(), c.cfg().pretrain("--resume", *_set("train.precision=bf16")))[1],
     ["trained with train.precision=fp32", "the config says train.precision=bf16"], "subprocess"),
    ("resume-other-data", lambda c: (c.copy_run(), _prepare_run_data(c, "0.05", lines=120), c.cfg().pretrain(
        "--resume", *_set(f"data.dir={c.tmp / 'data'}")))[2], ["trained on other data", "rows.heldout: checkpoint"],
     "inproc"),
    ("resume-other-seq-len", lambda c: (c.copy_run(), c.cfg(stages=[{"name": "main", "steps": 12, "seq_len": 16}])
                                        .pretrain("--resume"))[1],
     ["trained with seq_len 32 (stage 'main')", "now give seq_len 16"], "inproc"),
    # -- export never overwrites or half-writes (item 7): --out is this row's out dir
    ("export-out-not-empty", lambda c: (c.out.mkdir(), (c.out / "notes.txt").write_text("mine"),
                                        ["export", "--checkpoint", str(c.good_run), "--out", str(c.out)])[2],
     ["--out", "not empty", "--overwrite"], "subprocess"),
    ("export-overwrite-someones-dir", lambda c: (c.out.mkdir(), (c.out / "notes.txt").write_text("mine"),
                                                 ["export", "--checkpoint", str(c.good_run), "--out", str(c.out),
                                                  "--overwrite"])[2],
     ["not a Hugging Face model dir", "delete it by hand"], "inproc"),
    ("export-overwrite-a-dir-holding-the-checkpoint", lambda c: (
        shutil.copytree(c.good_run, c.out / "run"), (c.out / "config.json").write_text("{}"),
        ["export", "--checkpoint", str(c.out / "run"), "--out", str(c.out), "--overwrite"])[2],
     ["contains --checkpoint=", "an input"], "inproc"),
    ("export-out-is-a-file", lambda c: (c.out.write_text("x"),
                                        ["export", "--checkpoint", str(c.good_run), "--out", str(c.out)])[1],
     ["--out", "exists and is not a directory"], "inproc"),
    ("export-out-inside-the-run", lambda c: (c.copy_run(), ["export", "--checkpoint", str(c.out), "--out",
                                                            str(c.out / "hf2")])[1],
     ["hf2: inside", "the run being exported"], "inproc"),
    ("export-out-inside-its-checkpoints", lambda c: (t := c.copy_run(), ["export", "--checkpoint", str(t), "--out",
                                                                         str(c.out / "checkpoints" / "hf")])[1],
     ["checkpoints/hf: inside", "the run being exported"], "inproc"),
    ("export-overwrite-the-run-itself", lambda c: (c.copy_run(), ["export", "--checkpoint", str(c.out), "--out",
                                                                  str(c.out), "--overwrite"])[1],
     ["inside", "the run being exported"], "inproc"),
]


def _bad_data(c: "Case", damage) -> list[str]:
    """A copy of the prepared data at tmp/data, damaged, and a run on it."""
    data = c.tmp / "data"
    shutil.copytree(c.data, data)
    damage(data)
    return c.cfg().pretrain(*_set(f"data.dir={data}"))


def _edit_stats(data: Path, **changes) -> None:
    import json

    stats = json.loads((data / "stats.json").read_text())
    for key, value in changes.items():
        if value is None:
            stats.pop(key, None)
        else:
            stats[key] = value
    (data / "stats.json").write_text(json.dumps(stats))


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def _prepare_run_data(c: "Case", heldout_fraction: str, lines: int = 250) -> Path:
    """A real data dir at tmp/data (the tiny data's tokenizer, seq_len 32) of the first `lines` corpus lines."""
    from tests.helpers.reliability import corpus_lines
    from training.data.__main__ import main as data_main

    text = _write(c.tmp / "corpus.txt", ("\n".join(corpus_lines()[:lines]) + "\n").encode())
    assert data_main(["prepare", "--input", str(text), "--out", str(c.tmp / "data"), "--seq-len", "32",
                      "--tokenizer", str(c.data / "tokenizer"), "--num-proc", "1",
                      "--heldout-fraction", heldout_fraction]) == 0
    return c.tmp / "data"

_held_locks: list[int] = []


def _lock(directory: Path) -> None:
    """Hold DIR/.lock as a live run would (released when the row ends), with another process's pid@host."""
    import fcntl
    import os

    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, b"4242@elsewhere\n", 0)
    _held_locks.append(fd)


def _every_tag(c: "Case", damage) -> None:
    c.copy_run()
    for tag in sorted((c.out / "checkpoints").glob("step????????")):
        damage(tag)


def _flip(path: Path) -> None:
    """Corrupt a file in place, same size: only a checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _parquet(path: Path, **columns) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)
    return path


def _foreign(c: Case) -> None:
    ckpt = c.out / "checkpoints"
    (ckpt / "someones_model").mkdir(parents=True)
    (ckpt / "someones_model" / "pytorch_model.bin").write_bytes(b"\0" * 128)
    (ckpt / "latest").write_text("someones_model")


def _prepare(c: Case, corpus: Path | str, tokenizer: str = "train:128") -> list[str]:
    return ["prepare", "prepare", "--input", str(corpus), "--out", str(c.out), "--seq-len", "16",
            "--tokenizer", tokenizer, "--num-proc", "1"]


def _main_for(argv: list[str]):
    kind, argv = argv[0], argv[1:]
    if kind == "pretrain":
        from training.pretrain import main
        return main, argv, ["-m", "training.pretrain"]
    if kind == "export":
        from training.export import main
        return main, argv, ["-m", "training.export"]
    if kind == "evaluate":
        from training.evaluate import main
        return main, argv, ["-m", "training.evaluate"]
    if kind == "finetune":
        from training.finetune import main
        return main, argv, ["-m", "training.finetune"]
    from training.data.__main__ import main
    return main, argv, ["-m", "training.data"]


def test_the_table_is_big_enough():
    assert len(ROWS) >= 20 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", [pytest.param(r, id=r[0]) for r in ROWS])
def test_bad_input(row, tmp_path, tiny_data, good_run, in_process, capsys):
    check_row(row, Case(tmp_path, tiny_data, good_run), capsys)


def check_row(row, case: Case, capsys) -> None:
    """Run a row's command (in this process or as a subprocess): exit 2, one `error:` line (the last) holding the
    expected texts, no traceback, and the row's out dir untouched."""
    import os

    name, build, expected, how = row
    argv = build(case)
    before = tree_digest(case.out)
    main, args, module = _main_for(argv)
    if how == "subprocess":
        proc = subprocess.run([sys.executable, *module, *args], cwd=REPO, env=env(), capture_output=True, text=True,
                              timeout=120)
        code, stderr = proc.returncode, proc.stderr
    else:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(args)
        code, stderr = exc.value.code, capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, f"exit {code}; stderr:\n{stderr[-3000:]}"
    assert len(errors) == 1, f"want one error line, got:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == errors[0], f"the error line is not the last one:\n{stderr[-2000:]}"
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    while _held_locks:
        os.close(_held_locks.pop())
    after = tree_digest(case.out)
    # Outputs untouched: an existing out dir is byte-identical; a missing one is not created (or left empty).
    assert after == before or (before == "absent" and not any(case.out.iterdir())), \
        f"{case.out} changed: {sorted(p.name for p in case.out.iterdir())}"
