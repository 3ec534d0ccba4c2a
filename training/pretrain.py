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
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from training import outdir  # noqa: E402
from training.outdir import prepare_out_dir  # noqa: E402
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
        runner.after_first_step(claimed.trained)
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
