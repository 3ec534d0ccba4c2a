"""`python -m training.pretrain` / `bert-pretrain`: its command line, `--print-config` and `--dry-run`.

--print-config prints the resolved config (every default filled in, the stages scaled to train.max_steps,
train.precision=auto resolved) as YAML and exits; --dry-run loads the config and the data, makes the stage plan
and prints it (each stage's steps, tokens, sequence length, parameters, FLOPs, and the LR where it starts, after
its warmup and where it ends) and exits. Neither trains, nor creates the run directory.
"""
from __future__ import annotations

import argparse
import os
import sys

from training import cli, cli_types

EXIT_CODES = """exit codes: 0 done (or paused at run.stop_at_step, or stopped at run.stop_below_unigram or run.max_wall_s);
2 bad input (one `error: ...` line, nothing written); 3 stopped on repeated non-finite losses/gradients; 75 checkpointed
after SIGTERM/SIGUSR1 (requeue, then --resume); anything else is a crash."""


def build_parser(prog: str = "python -m training.pretrain") -> argparse.ArgumentParser:
    p = cli.parser(prog, "BERT pre-training on DeepSpeed with stage hooks: one YAML config, any launcher "
                   "(deepspeed, torchrun, mpirun, srun) or none.", epilog=EXIT_CODES)
    p.add_argument("--config", required=True,
                   help="YAML run config; a relative path not found here is looked up among the shipped configs "
                        "(configs/default.yaml, configs/tiny.yaml, ...)")
    cli.add_set(p)
    p.add_argument("--out", help="output directory (same as --set run.out_dir=DIR; default: the config's "
                                 "run.out_dir)")
    p.add_argument("--max-steps", type=cli_types.positive_int("--max-steps"), metavar="N",
                   help="the run's length (same as --set train.max_steps=N): a staged config's stages, stage "
                        "warmups and train.locality_bias.steps are scaled to it in proportion (default: the "
                        "config's)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="TAG|PATH",
                   help="continue the run in the output dir: alone, from its latest checkpoint that verifies; with "
                        "a tag (step00001000) or a checkpoint dir of this run, from that one (newer ones are kept "
                        "aside as <tag>.abandoned)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in the output directory (moved aside, deleted after this run's "
                        "first step; only a directory holding this trainer's .bert-run marker)")
    p.add_argument("--lock-wait", type=cli_types.non_negative_float("--lock-wait"), default=0.0, metavar="SECONDS",
                   help="when another process holds the output dir's lock, wait up to this long for it to let go "
                        "before giving up (default 0: give up at once). The Slurm scripts pass it on a requeue, "
                        "whose previous incarnation may still be exiting on a node")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every default filled in) as YAML and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="load config, data and plan, print the stage plan (steps, tokens, seq_len, parameters, "
                        "FLOPs, LR at each boundary) and exit without training or creating the run dir")
    p.add_argument("--local_rank", "--local-rank", type=cli_types.non_negative_int("--local_rank"), default=None,
                   help=argparse.SUPPRESS)  # DS launcher
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def overrides(args: argparse.Namespace) -> list[str]:
    """--set items, then the flags that are shorthands for one (they win, coming last)."""
    return list(args.set) + ([f"train.max_steps={args.max_steps}"] if args.max_steps is not None else []) \
        + ([f"run.out_dir={args.out}"] if args.out else [])


def print_config(cfg, out=sys.stdout) -> None:
    import yaml

    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=120), end="", file=out)


def _world_size() -> int:
    """The launcher's world size where one is set (WORLD_SIZE, srun's SLURM_NTASKS), else 1."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def _params(model_cfg) -> int:
    """The stage model's parameters, built on the meta device (no memory, no init)."""
    import torch

    from training.model.bert import BertForPreTraining
    from training.model.flops import count_parameters

    with torch.device("meta"):
        return count_parameters(BertForPreTraining(model_cfg.model_copy(update={"compile": False})))


def plan_table(cfg, plan, world_size: int) -> list[str]:
    """The stage plan as text lines (see the module docstring)."""
    from training.engine.schedule import lr_at
    from training.model.flops import flops_per_token

    t = cfg.train
    batch = t.micro_batch_size * t.grad_accum * world_size
    rows = [("stage", "hook", "steps", "global steps", "tokens", "seq_len", "params", "FLOPs", "LR start",
             "LR after warmup", "LR end")]
    total_tokens = total_flops = 0.0
    for p, seg in zip(plan, plan.lr_segments):
        tokens = p.steps * batch * p.seq_len
        flops = tokens * flops_per_token(p.model, p.seq_len, cfg.data.mlm_probability)
        total_tokens, total_flops = total_tokens + tokens, total_flops + flops
        end = p.start_step + p.steps
        rows.append((p.name, cfg.stages[p.index].hook or "-", f"{p.steps:,}", f"{p.start_step:,}-{end:,}",
                     f"{tokens:,}", str(p.seq_len), f"{_params(p.model):,}", f"{flops:.3g}",
                     f"{lr_at(plan.lr_segments, p.start_step):.3g}",
                     f"{lr_at(plan.lr_segments, p.start_step + seg.warmup_steps):.3g}",
                     f"{lr_at(plan.lr_segments, end - 1):.3g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"total: {plan.total_steps:,} steps, {int(total_tokens):,} tokens, {total_flops:.3g} training FLOPs; "
                 f"global batch {batch} = micro-batch {t.micro_batch_size} x grad_accum {t.grad_accum} x "
                 f"{world_size} rank(s); precision {t.precision}; optimizer {cfg.optimizer.name} lr "
                 f"{cfg.optimizer.lr:g}")
    return lines


def dry_run(cfg, notes: list[str]) -> int:
    """Load the data, make the plan, print it and every note; nothing is trained or written."""
    from training.config.length import aid_outlasts_run
    from training.engine.ds_config import check_report_to
    from training.run_setup import load_data, resolve_model
    from training.stages.plan import Plan

    world_size = _world_size()
    data = load_data(cfg)
    resolve_model(cfg, data.vocab_size)
    check_report_to(cfg)
    plan = Plan(cfg, data.seq_len, world_size, cfg.data.dir)
    print(f"dry run: {cfg.run.out_dir} would train on {cfg.data.dir} (seq_len {data.seq_len}, vocab "
          f"{data.vocab_size:,}); nothing trained, no run dir created")
    for line in plan_table(cfg, plan, world_size):
        print(line)
    warning = aid_outlasts_run(cfg, plan.total_steps)
    for note in notes + ([f"warning: {warning}"] if warning else []):
        print(note)
    print(f"loggers: {', '.join(cfg.run.report_to) or 'none'} (run.report_to); metrics.jsonl always")
    return 0
