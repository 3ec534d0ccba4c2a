"""BERT pre-training: `python -m training.pretrain --config CONFIG.yaml [--set key=value ...] [--resume [TAG]]`
(`bert-pretrain` once installed; the flags are in training/pretrain_cli.py).

The entry point only wires things together: config -> process group -> data -> model -> stage runner.
It runs the same as one process or under any launcher (deepspeed, torchrun, mpirun, srun).

Exit codes: 0 done (or paused at run.stop_at_step, or stopped at run.stop_below_unigram or run.max_wall_s); 2 bad
input (one `error: ...` line, nothing written); 3 stopped on repeated non-finite losses/gradients
(training/engine/faults.py); 75 checkpointed after SIGTERM/SIGUSR1, requeue and --resume (training/signals.py);
anything else is a crash.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from training import outdir  # noqa: E402
from training.config import RunConfig  # noqa: E402
from training.stages.plan import load_config  # noqa: E402
from training.config.length import aid_outlasts_run  # noqa: E402
from training.engine import checkpoint_verify  # noqa: E402
from training.engine.build import check_precision_supported, compute_dtype  # noqa: E402
from training.errors import UserError, exit_on_user_error  # noqa: E402
from training.metrics import measure_peak_tflops, truncate_metrics  # noqa: E402,F401
from training.run_setup import build_initial_model, load_data, resolve_model  # noqa: E402,F401
from training.pretrain_cli import overrides, parse_args  # noqa: E402,F401

log = logging.getLogger("training.pretrain")

# What a run writes in run.out_dir (no input may be one of them): training/engine/checkpoint.py, metrics.py,
# the DeepSpeed monitor's tensorboard/, the final export hf/, and what _start copies in.
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "hf", "config.resolved.json", "tokenizer",
             "deepspeed_config.json", outdir.RUN_MARKER, outdir.LOCK_NAME)


def _check_out_dir(out: Path, resume: bool, overwrite: bool, inputs) -> bool:
    """The checks of prepare_out_dir; True when --overwrite is to replace a previous run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"run.out_dir {out} exists and is not a directory")
    has_run = bool(outdir.entries(out))
    if has_run and not (resume or overwrite):
        raise UserError(f"run.out_dir {out} already holds a run; pass --resume to continue it or --overwrite "
                        "to start over")
    replacing = has_run and overwrite and not resume
    # Replaced or new, OUT is written whole; a run resumed in place writes only its own files there.
    outdir.check_no_clash("run.out_dir", out, inputs, writes=[out / name for name in RUN_FILES] if has_run and
                          not replacing else [out])
    if replacing:
        if outdir.read_marker(out, outdir.RUN_MARKER) is None:
            raise UserError(f"run.out_dir {out} has no {outdir.RUN_MARKER} marker, so it is not recognisably a run of "
                            "training.pretrain (runs written before the marker existed have none either) and "
                            "--overwrite will not delete it: delete it by hand, or pick another run.out_dir")
    elif has_run and resume and outdir.read_marker(out, outdir.RUN_MARKER) is None and not (
            (out / "checkpoints").is_dir() or (out / "config.resolved.json").is_file()):
        raise UserError(f"run.out_dir {out} holds files but no run of training.pretrain (no {outdir.RUN_MARKER}, no "
                        "checkpoints/); --resume will not write into it: pick another run.out_dir")
    return replacing


class OutClaim:
    """Rank 0's hold on the output directory for this process: the lock on OUT/.lock and, with --overwrite,
    the previous run moved aside to OUT.replaced-<time>-<pid>. The previous run is deleted once this run has
    trained (`trained()`: its first optimizer step); a failure before that puts it back (`failed()`); a killed
    process leaves it there, named in OUT/.bert-run, and the next run on OUT says so (and deletes it after
    its first step, as this one would have)."""

    def __init__(self, out: Path, lock: outdir.DirLock, pending: list[Path], old_lock=None, moved=None):
        self.out, self.lock, self.pending, self.old_lock, self.moved = out, lock, pending, old_lock, moved
        self.done = False

    def trained(self) -> None:
        if self.done:
            return
        self.done = True
        for old in self.pending:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
                log.info("deleted the previous run %s (moved aside by --overwrite; this run has trained)", old)
        if self.pending:
            info = outdir.read_marker(self.out, outdir.RUN_MARKER) or {}
            with contextlib.suppress(OSError):
                outdir.write_marker(self.out, outdir.RUN_MARKER, **{**info, "replaces": []})
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
    lock = outdir.DirLock(out, "run.out_dir").acquire()
    try:
        replacing = _check_out_dir(out, resume, overwrite, inputs)  # again, under the lock
        info = outdir.read_marker(out, outdir.RUN_MARKER) or {}
        pending = [Path(p) for p in info.get("replaces", [])
                   if outdir.is_replaced_of(Path(p), out) and Path(p).is_dir()]
        me = {"written_by": "training.pretrain", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": socket.gethostname(), "pid": os.getpid()}
        if not replacing:
            if not info:
                outdir.write_marker(out, outdir.RUN_MARKER, **me, replaces=[])
            for old in pending:
                log.warning("%s: a previous run of %s, moved aside by --overwrite; deleted after this run's first "
                            "step (move it back by hand to keep it)", old, out)
            return OutClaim(out, lock, pending)
        staging = out.with_name(f"{out.name}.new-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        new_lock = outdir.DirLock(staging, "run.out_dir").acquire()
        aside = outdir.replaced_name(out.absolute())
        outdir.write_marker(staging, outdir.RUN_MARKER, **me, replaces=[str(aside)] + [str(p) for p in pending])
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
        log.info("--overwrite: moved the previous run to %s; it is deleted after this run's first step (and put "
                 "back if this run fails before)", aside)
        return OutClaim(out, new_lock, [aside] + pending, old_lock=lock, moved=aside)
    except OSError as err:
        lock.release()
        raise UserError(outdir.oserror_line(f"run.out_dir {out}", err)) from None
    except BaseException:
        lock.release()
        raise


def log_precision(precision: str, rank: int) -> None:
    """Say which precision trains and why; warn where bf16 was asked for on a device that only emulates it."""
    from training.engine.precision import device_bf16

    if rank != 0 or precision == "fp16":
        return
    native, why = device_bf16()
    if precision == "bf16" and not native:
        log.warning("train.precision=bf16 although %s; train.precision=auto (or fp32) trains faster here", why)
    else:
        log.info("train.precision=%s (%s)", precision, why)


def run_inputs(cfg: RunConfig, config_path: str) -> list[tuple[str, str]]:
    """What this run reads (an --overwrite of run.out_dir may not delete it)."""
    items = [("--config", str(config_path)), ("data.dir", cfg.data.dir),
             ("data.dir tokenizer", str(Path(cfg.data.dir) / "tokenizer"))]
    if cfg.deepspeed.template:
        items.append(("deepspeed.template", cfg.deepspeed.template))
    for i in range(len(cfg.stages)):
        with contextlib.suppress(Exception):
            if cfg.stage_model(i).init_from_hf:
                items.append(("model.init_from_hf", cfg.stage_model(i).init_from_hf))
    return items


def export_final(runner, cfg: RunConfig, data, out: Path) -> str:
    """OUT/hf, written whole or not at all (through a temporary dir, as training.export does): a kill or a full
    disk leaves the previous export or none. A model HF cannot represent is reported, not an error; a file-system
    failure is (outdir.replace_dir: one line)."""
    from training.model.hf_export import check_exportable, export_hf

    try:
        check_exportable(runner.model_cfg)
    except UserError as err:
        return f"not exported: {err}"
    outdir.replace_dir(out / "hf", lambda tmp: export_hf(runner.engine.module, runner.model_cfg, tmp,
                                                         tokenizer_dir=data.tokenizer_dir), flag="run.out_dir")
    return str(out / "hf")


def split_cpu_threads(local_world_size: int) -> None:
    """On CPU, ranks of one node share its cores. Oversubscribed OpenMP threads stall each other at every
    parallel region (measured on a 2-core machine: a process with 2 threads beside one busy core took 7x
    longer per step than with 1 thread), so each rank gets cores / ranks threads unless OMP_NUM_THREADS
    says otherwise."""
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(local_world_size, 1)))


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@exit_on_user_error
def main(argv=None) -> int:
    from training.dist import check_consistent, init_distributed, start_watchdog
    from training.signals import preemption
    from training.stages.runner import StageRunner

    from training import pretrain_cli, resume
    from training.engine.ds_config import check_report_to

    args = parse_args(argv)
    notes: list[str] = []  # what loading did that a user should know (a shipped config, a scaled schedule)
    cfg = load_config(args.config, overrides(args), notes)
    if args.print_config:
        pretrain_cli.print_config(cfg)
        return 0
    if args.dry_run:
        return pretrain_cli.dry_run(cfg, notes)
    check_report_to(cfg)  # a missing logger package: one line, before anything is written
    out = Path(cfg.run.out_dir)
    from training.engine.ops import prepare_deepspeed_ops

    prepare_deepspeed_ops()  # JIT-built C++ ops: a lock left by a killed build is cleared, never waited on
    env = init_distributed(timeout_s=cfg.dist.timeout_s, backend=cfg.dist.backend)
    _setup_logging(env.rank)
    for note in notes if env.rank == 0 else ():
        log.info("%s", note)
    split_cpu_threads(env.local_world_size)
    preemption().install()  # SIGTERM/SIGUSR1: checkpoint at the next step, exit 75 (see training/signals.py)
    # Busy with another run? Every rank asks before the collective below, so none can see its own rank 0's lock.
    outdir.wait_unlocked(out, "run.out_dir", args.lock_wait)
    check_consistent(cfg.digest(), env.world_size)
    inputs = run_inputs(cfg, args.config)
    prepare_out_dir(out, args.resume, args.overwrite, env.rank, claim=False, inputs=inputs)
    check_precision_supported(cfg.train.precision)
    log_precision(cfg.train.precision, env.rank)

    data = load_data(cfg)
    resolve_model(cfg, data.vocab_size)
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    peak = cfg.run.peak_tflops or measure_peak_tflops(device, compute_dtype(cfg.train.precision))
    runner = StageRunner(cfg, data, out, env.rank, env.world_size, device, peak)
    aid = aid_outlasts_run(cfg, runner.total_steps)
    if aid and env.rank == 0:
        log.warning("%s", aid)
    # The checkpoint to resume from, verified (sizes and checksums) before anything is touched: the latest (a
    # corrupt newest one is passed over for the newest that verifies, with a warning naming the bad file) or
    # the one --resume names (training/resume.py).
    tag, bad_tags, newer = resume.choose(out / "checkpoints", args.resume)
    if tag is not None:
        runner.check_resume(tag)  # the same model, precision, seq_len and data as it was trained with
        bad_tags = bad_tags + newer  # set aside once claimed (newer ones as .abandoned, below)
    claimed = prepare_out_dir(out, args.resume, args.overwrite, env.rank, inputs=inputs)  # accepted: now claim
    try:
        return _start(runner, cfg, data, out, env, args, tag, bad_tags, claimed, start_watchdog)
    except BaseException:
        if claimed is not None:
            claimed.failed()  # before its first step: the previous run goes back (after it: already deleted)
        raise
    finally:
        if claimed is not None:
            claimed.release()


def _start(runner, cfg, data, out, env, args, tag, bad_tags, claimed, start_watchdog) -> int:
    from training import resume

    torch.distributed.barrier()
    if args.resume and tag is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out / "checkpoints")
        if env.rank == 0:  # records of an earlier attempt that never checkpointed: not this run's
            truncate_metrics(out / "metrics.jsonl", -1)
    if tag is not None:
        meta = runner.resume(tag)  # restores each rank's RNG as saved: do not reseed after this
        changed = resume.report_schedule_change(runner, out, runner.state.step)  # before the config is rewritten
        if env.rank == 0:
            if bad_tags and args.resume == "latest":  # corrupt ones passed over
                checkpoint_verify.quarantine(out / "checkpoints", bad_tags, tag)
            elif bad_tags:  # newer ones than the checkpoint --resume TAG chose
                resume.set_aside(out / "checkpoints", bad_tags, tag)
            if changed:
                log.warning("%s", changed)
            truncate_metrics(out / "metrics.jsonl", runner.state.step, meta.get("metrics_bytes"))
    else:
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        runner.set_model(build_initial_model(cfg), cfg.stage_model(0))
        torch.manual_seed(cfg.run.seed + 1000 + env.rank)  # dropout differs per rank
    if env.rank == 0:  # written only once the inputs (config, data, checkpoint) have been accepted
        try:
            (out / "config.resolved.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
            shutil.copytree(data.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)  # run dir is self-contained
            (out / "deepspeed_config.json").write_text(json.dumps(runner.ds_config, indent=1))
        except OSError as err:
            raise UserError(outdir.oserror_line(f"run.out_dir {out}", err)) from None
    if claimed is not None and claimed.pending:
        _after_first_step(runner, claimed.trained)
    # A rank that dies or freezes makes the others exit within dist.heartbeat_timeout_s, naming it
    # (training/dist/watchdog.py); without the watchdog only the process-group timeout, dist.timeout_s, would.
    use_watchdog = env.world_size > 1 and cfg.dist.heartbeat_timeout_s is not None
    watchdog = start_watchdog(env, cfg.dist.heartbeat_timeout_s) if use_watchdog else contextlib.nullcontext()
    with watchdog:
        code = train(runner, cfg, data, out, env.rank)
    if claimed is not None and not claimed.done and checkpoint_verify.latest_tag(out / "checkpoints", check=False):
        claimed.trained()  # e.g. pre-empted before its first step, but checkpointed: this run goes on
    elif claimed is not None and not claimed.done:
        claimed.failed()  # ended before training anything: the previous run goes back
    return code


def _after_first_step(runner, callback) -> None:
    """Call `callback` once, after the runner's first optimizer step (instance attribute over the method)."""
    step = runner.train_step

    def first_step(*args, **kwargs):
        result = step(*args, **kwargs)
        del runner.train_step
        callback()
        return result

    runner.train_step = first_step


def train(runner, cfg: RunConfig, data, out: Path, rank: int) -> int:
    """Run the stages; report where the results are. Returns the process exit code."""
    from training.dist import EXIT_REQUEUE
    from training.engine.faults import EXIT_NUMERICAL, NumericalFault
    from training.engine.recovery import run_with_recovery

    try:
        state = run_with_recovery(runner)
    except NumericalFault as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_NUMERICAL
    if runner.preempted:
        if rank == 0:
            print(f"pre-empted ({runner.preempted}): checkpoint {out / 'checkpoints'}/"
                  f"{checkpoint_verify.latest_tag(out / 'checkpoints')} at step {state.step}; exit {EXIT_REQUEUE} "
                  "(requeue, then --resume)", flush=True)
        torch.distributed.barrier()
        return EXIT_REQUEUE

    from training.resume import score_of_finished

    ev = score_of_finished(runner)  # a resumed run that was already finished: its score (every rank evaluates)
    if rank == 0:
        exported = export_final(runner, cfg, data, out) if cfg.run.export_hf else "disabled (run.export_hf=false)"
        if runner.stopped_below is not None:
            print(f"stopped at step {state.step} of {runner.total_steps}: {runner.stopped_below:+.3f} nats below the "
                  f"unigram reference reaches run.stop_below_unigram={cfg.run.stop_below_unigram:g}", flush=True)
        if runner.stopped_wall_s is not None:
            print(f"stopped at step {state.step} of {runner.total_steps}: the training loop ran "
                  f"{runner.stopped_wall_s:.0f} s, run.max_wall_s={cfg.run.max_wall_s:g}", flush=True)
        print(f"done: {state.step} steps, {state.tokens:,} tokens, {state.wall_s:.0f} s"
              + (f", held-out MLM loss {ev['heldout_loss']:.3f} acc {ev['heldout_acc']:.3f} (fixed all-[MASK] "
                 f"positions; unigram table {ev['heldout_unigram_loss']:.3f}, "
                 f"{ev['heldout_below_unigram']:+.3f} nats below it)" if ev else ""))
        loggers = ", ".join(f"{name}: {out / name / out.name}" if name in ("tensorboard", "csv") else name
                            for name in cfg.run.report_to)
        print(f"  metrics:    {out / 'metrics.jsonl'}" + (f"  ({loggers})" if loggers else ""))
        print(f"  checkpoint: {out / 'checkpoints'}/{checkpoint_verify.latest_tag(out / 'checkpoints')}")
        print(f"  HF model:   {exported}")
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
