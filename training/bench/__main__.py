"""Benchmarks: `python -m training.bench throughput ...` and `python -m training.bench compare ...`.

throughput  tokens/s, samples/s, forward/backward/optimizer split, peak memory and MFU of our model vs
            Hugging Face BertForPreTraining, same engine, same batches, alternating blocks.
compare     train BASELINE and METHOD configs as subprocesses; time/tokens/FLOPs to the baseline's
            final held-out loss, speedups, report.json / report.md / loss_vs_time.png.
plateau     where runs leave the unigram plateau: tokens/seconds to 0.25, 0.5, 1.0 nats below the unigram
            reference at the fixed-mask held-out evaluation, gap_vs_tokens.png (training/bench/plateau.py).
mslt        each MSLT stage (frozen lower layers) vs the same shape fully trainable, 2 ranks: forward/backward/
            optimizer time, gradient all-reduce bytes, saved activations, peak memory (training/bench/mslt.py).
See BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from training import cli, cli_types  # noqa: E402
from training.bench import steptime  # noqa: E402
from training.errors import UserError, exit_on_user_error  # noqa: E402


def build_parser(prog: str = "python -m training.bench") -> argparse.ArgumentParser:
    p = cli.parser(prog, __doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = cli.add_subparser(sub, "throughput", "our model vs HF BertForPreTraining: tokens/s, phases, memory, MFU")
    t.add_argument("--config", required=True, help="run config YAML (its model/train/optimizer/data sections)")
    t.add_argument("--out", required=True, help="output directory (writes throughput.json)")
    steptime.add_block_arguments(t, steps=10, warmup=2, repeats=3, blocks="alternating blocks per model")
    t.add_argument("--stage", default=None, help="measure this stage's model and seq_len (name or index); "
                   "default: the top-level model at the data's seq_len")
    t.add_argument("--models", nargs="+", choices=("ours", "ours_compiled", "ours_fused", "ours_padded", "hf"),
                   default=["ours", "hf"], help="ours_compiled: ours with model.compile (torch.compile of each "
                   "layer); ours_fused: ours with every Triton kernel (attention fused, model.fused_ops); "
                   "ours_padded: ours with model.unpad false; blocks alternate")
    t.add_argument("--profile", type=cli_types.non_negative_int("--profile"), default=0, metavar="N",
                   help="after the blocks, N more steps per model under torch.profiler: OUT/profile-MODEL.txt")
    cli.add_set(t)

    c = cli.add_subparser(sub, "compare", "train configs and compare time to the baseline's final held-out loss")
    c.add_argument("--configs", nargs="+", required=True, metavar="CONFIG",
                   help="BASELINE.yaml first, then one config per method")
    c.add_argument("--out", required=True, help="output directory (runs/, logs/, report.*)")
    cli.add_set(c, "data.dir=data/x run.seed=1 (applied to every run)")
    c.add_argument("--eval-every", type=cli_types.positive_int("--eval-every"), default=None,
                   help="same as --set run.eval_every=N for every run")
    c.add_argument("--names", nargs="+", default=None, help="run names (default: config file stems)")
    c.add_argument("--launcher", default=None,
                   help="command that replaces `python` for each run, e.g. 'torchrun --nproc_per_node 8'")
    c.add_argument("--stop-at-target", action="store_true",
                   help="stop each method (SIGTERM: checkpoint, exit) at its first held-out eval at or below the "
                   "baseline's final loss; its budget then only bounds the runs that never get there")
    c.add_argument("--pause-at-target", action="store_true",
                   help="like --stop-at-target, but each method is resumed after the checkpoint at its target "
                   "crossing and trains to the end of its budget (BLiMP at the target and at the end)")
    c.add_argument("--control", default=None, metavar="NAME",
                   help="a second reference run (e.g. the baseline on the methods' budget): every speedup is also "
                   "given against its own way to the target")
    c.add_argument("--blimp", default=None, metavar="DIR|hf:NAME",
                   help="score BLiMP (training.evaluate --blimp) at each run's checkpoints: the target crossing's "
                   "and the last (checkpoints are kept: run.keep_last is raised)")
    c.add_argument("--blimp-per-paradigm", type=cli_types.positive_int("--blimp-per-paradigm"), default=100,
                   metavar="N",
                   help="pairs of each paradigm scored, the same ones every time (default 100)")
    c.add_argument("--blimp-every", type=cli_types.non_negative_int("--blimp-every"), default=0, metavar="K",
                   help="also checkpoint every K steps (run.save_every=K) and score BLiMP there (default 0: no)")
    c.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="train only these runs (e.g. a method whose config changed); the others' results are "
                   "read from OUT as --report-only does")
    c.add_argument("--report-only", action="store_true", help="do not train: rebuild the report from OUT/runs")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.add_argument("--note", action="append", default=[], help="free text added to the report's notes")
    m = cli.add_subparser(sub, "mslt", "MSLT stages (frozen lower layers) vs fully trainable: time split, "
                          "all-reduce bytes, memory")
    from training.bench.mslt import add_arguments as add_mslt_arguments

    add_mslt_arguments(m)
    pl = cli.add_subparser(sub, "plateau", "tokens/seconds to leave the unigram plateau, per run; gap-vs-tokens plot")
    from training.bench.plateau import add_arguments as add_plateau_arguments

    add_plateau_arguments(pl)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.command == "throughput" and args.profile > args.steps + args.warmup:
        raise UserError(f"--profile {args.profile}: more than --steps + --warmup ({args.steps + args.warmup})")
    return args


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "throughput":
        from training.bench import throughput

        throughput.run(args)
    elif args.command == "mslt":
        from training.bench import mslt

        mslt.run(args)
    elif args.command == "plateau":
        from training.bench import plateau

        plateau.run(args)
    else:
        from training.bench import compare

        compare.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
