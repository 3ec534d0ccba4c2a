"""BERT pre-training: `python -m training.pretrain --config CONFIG.yaml [--set key=value ...] [--resume]`.

The entry point only wires things together: config -> process group -> data -> model -> stage runner.
It runs the same as one process or under any launcher (deepspeed, torchrun, mpirun, srun).

Exit codes: 0 done (or paused at run.stop_at_step); 2 bad input (one `error: ...` line, nothing written);
3 stopped on repeated non-finite losses/gradients (training/engine/faults.py); 75 checkpointed after
SIGTERM/SIGUSR1, requeue and --resume (training/signals.py); anything else is a crash.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from training.config import RunConfig, deepspeed_json, load_config  # noqa: E402
from training.engine import checkpoint  # noqa: E402
from training.engine.build import check_precision_supported, compute_dtype  # noqa: E402
from training.errors import UserError, exit_on_user_error  # noqa: E402
from training.metrics import measure_peak_tflops  # noqa: E402

log = logging.getLogger("training.pretrain")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    p.add_argument("--out", help="output directory (same as --set run.out_dir=DIR)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--overwrite", action="store_true", help="delete an existing output directory first")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # DS launcher
    return p.parse_args(argv)


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, rank: int, claim: bool = True) -> None:
    """Never silently overwrite a previous run: an existing run needs --resume or --overwrite.

    With claim=False only checks; main() claims (deletes with --overwrite, creates) only once the config,
    data and checkpoint have been accepted, so bad input never costs the previous run.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"run.out_dir {out} exists and is not a directory")
    has_run = out.is_dir() and any(out.iterdir())
    if has_run and not (resume or overwrite):
        raise UserError(f"run.out_dir {out} already holds a run; pass --resume to continue it or --overwrite "
                        "to start over")
    if rank == 0 and claim:
        if overwrite and has_run and not resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)


def check_seq_len(cfg: RunConfig, data_seq_len: int, data_dir: str) -> None:
    """Every stage's sequences must fit the model's position table (else an index error deep in forward)."""
    for i, stage in enumerate(cfg.stages):
        seq_len = stage.seq_len or data_seq_len
        max_position = cfg.stage_model(i).max_position
        if seq_len > max_position:
            where = f"stage '{stage.name}' seq_len" if stage.seq_len else f"data.dir={data_dir} has seq_len"
            raise UserError(f"{where} {seq_len}, more than model.max_position={max_position}; raise "
                            "model.max_position or prepare the data with a shorter --seq-len")


def resolve_model(cfg: RunConfig, vocab_size: int) -> None:
    """Settle the model's shape before planning: from an HF checkpoint if asked; check the vocabulary.
    An MLM-only model carries the checkpoint's pooler untrained (model.carry_pooler), so the export keeps it."""
    from training.model.hf import checkpoint_has_pooler, model_config_from_hf

    if cfg.model.init_from_hf:
        hf_shape = model_config_from_hf(cfg.model.init_from_hf)
        shape = hf_shape.model_dump(exclude={"attention", "norm", "dropout", "attention_dropout", "nsp",
                                             "init_from_hf", "carry_pooler"})
        if not cfg.model.nsp and checkpoint_has_pooler(cfg.model.init_from_hf):
            shape["carry_pooler"] = True
        cfg.model = cfg.model.model_copy(update=shape)
    if cfg.model.vocab_size != vocab_size:
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the tokenizer of data.dir={cfg.data.dir} "
                        f"has {vocab_size} tokens; set model.vocab_size={vocab_size} or prepare the data with "
                        "the model's tokenizer")


def build_initial_model(cfg: RunConfig) -> torch.nn.Module:
    """The first stage's model, from scratch or from `model.init_from_hf`."""
    from training.model.bert import BertForPreTraining
    from training.model.hf import load_hf_weights

    model_cfg = cfg.stage_model(0)
    model = BertForPreTraining(model_cfg)
    if model_cfg.init_from_hf:
        missing = load_hf_weights(model, model_cfg.init_from_hf)
        log.info("initialised from %s (left at init: %s)", model_cfg.init_from_hf, missing or "none")
    return model


def load_data(cfg: RunConfig):
    from training.data.loader import PretrainingData

    data_dir = Path(cfg.data.dir)
    if not (data_dir / "stats.json").is_file():
        raise UserError(f"data.dir={data_dir} holds no prepared data; run `python -m training.data prepare "
                        f"--out {data_dir} ...` (or `make data`) first")
    return PretrainingData(data_dir, mlm_probability=cfg.data.mlm_probability,
                           whole_word=cfg.data.whole_word_mask, nsp=cfg.model.nsp)


def export_final(runner, cfg: RunConfig, data, out: Path) -> str:
    from training.model.hf import export_hf

    try:
        export_hf(runner.engine.module, runner.model_cfg, out / "hf", tokenizer_dir=data.tokenizer_dir)
        return str(out / "hf")
    except UserError as err:
        return f"not exported: {err}"


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


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop the records a killed process wrote after the checkpoint: they are re-done."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except ValueError:
            continue  # a line cut short by the kill
        kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


@exit_on_user_error
def main(argv=None) -> int:
    from training.dist import check_consistent, init_distributed, start_watchdog
    from training.signals import preemption
    from training.stages.runner import StageRunner

    args = parse_args(argv)
    overrides = args.set + ([f"run.out_dir={args.out}"] if args.out else [])
    cfg = load_config(args.config, overrides)
    out = Path(cfg.run.out_dir)
    env = init_distributed(timeout_s=cfg.dist.timeout_s, backend=cfg.dist.backend)
    _setup_logging(env.rank)
    split_cpu_threads(env.local_world_size)
    preemption().install()  # SIGTERM/SIGUSR1: checkpoint at the next step, exit 75 (see training/signals.py)
    check_consistent(cfg.digest(), env.world_size)
    prepare_out_dir(out, args.resume, args.overwrite, env.rank, claim=False)
    check_precision_supported(cfg.train.precision)

    data = load_data(cfg)
    resolve_model(cfg, data.vocab_size)
    check_seq_len(cfg, data.seq_len, cfg.data.dir)
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    peak = cfg.run.peak_tflops or measure_peak_tflops(device, compute_dtype(cfg.train.precision))
    runner = StageRunner(cfg, data, out, env.rank, env.world_size, device, peak)
    ds_json = deepspeed_json(cfg, env.world_size, out)
    tag = checkpoint.latest_tag(out / "checkpoints") if args.resume else None
    if tag is not None:
        checkpoint.read_meta(out / "checkpoints", tag)  # complete? (before anything is touched)
    prepare_out_dir(out, args.resume, args.overwrite, env.rank)  # inputs accepted: now delete/create
    torch.distributed.barrier()
    if args.resume and tag is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out / "checkpoints")
    if tag is not None:
        runner.resume(tag)  # restores each rank's RNG as saved: do not reseed after this
        if env.rank == 0:
            truncate_metrics(out / "metrics.jsonl", runner.state.step)
    else:
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        runner.set_model(build_initial_model(cfg), cfg.stage_model(0))
        torch.manual_seed(cfg.run.seed + 1000 + env.rank)  # dropout differs per rank
    if env.rank == 0:  # written only once the inputs (config, data, checkpoint) have been accepted
        (out / "config.resolved.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
        shutil.copytree(data.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)  # run dir is self-contained
        (out / "deepspeed_config.json").write_text(json.dumps(ds_json, indent=1))
    # A rank that dies or freezes makes the others exit within dist.heartbeat_timeout_s, naming it
    # (training/dist.py); without the watchdog only the process-group timeout, dist.timeout_s, would.
    use_watchdog = env.world_size > 1 and cfg.dist.heartbeat_timeout_s is not None
    watchdog = start_watchdog(env, cfg.dist.heartbeat_timeout_s) if use_watchdog else contextlib.nullcontext()
    with watchdog:
        return train(runner, cfg, data, out, env.rank)


def train(runner, cfg: RunConfig, data, out: Path, rank: int) -> int:
    """Run the stages; report where the results are. Returns the process exit code."""
    from training.dist import EXIT_REQUEUE
    from training.engine.faults import EXIT_NUMERICAL, NumericalFault, run_with_recovery

    try:
        state = run_with_recovery(runner)
    except NumericalFault as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_NUMERICAL
    if runner.preempted:
        if rank == 0:
            print(f"pre-empted ({runner.preempted}): checkpoint {out / 'checkpoints'}/"
                  f"{checkpoint.latest_tag(out / 'checkpoints')} at step {state.step}; exit {EXIT_REQUEUE} "
                  "(requeue, then --resume)", flush=True)
        torch.distributed.barrier()
        return EXIT_REQUEUE

    exported = export_final(runner, cfg, data, out) if cfg.run.export_hf else "disabled (run.export_hf=false)"
    if rank == 0:
        ev = runner.last_eval
        print(f"done: {state.step} steps, {state.tokens:,} tokens, {state.wall_s:.0f} s"
              + (f", held-out MLM loss {ev['heldout_loss']:.3f} acc {ev['heldout_acc']:.3f} (fixed all-[MASK] "
                 f"positions; unigram table {ev['heldout_unigram_loss']:.3f}, "
                 f"{ev['heldout_below_unigram']:+.3f} nats below it)" if ev else ""))
        print(f"  metrics:    {out / 'metrics.jsonl'}  (TensorBoard: {out / 'tensorboard'})")
        print(f"  checkpoint: {out / 'checkpoints'}/{checkpoint.latest_tag(out / 'checkpoints')}")
        print(f"  HF model:   {exported}")
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
