"""BERT pre-training: `python -m training.pretrain --config CONFIG.yaml [--set key=value ...] [--resume]`.

The entry point only wires things together: config -> process group -> data -> model -> stage runner.
It runs the same as one process or under any launcher (deepspeed, torchrun, mpirun, srun).
"""
from __future__ import annotations

import argparse
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
from training.engine.build import compute_dtype  # noqa: E402
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


def prepare_out_dir(out: Path, resume: bool, overwrite: bool, rank: int) -> None:
    """Never silently overwrite a previous run: an existing run needs --resume or --overwrite."""
    if out.exists() and not out.is_dir():
        raise UserError(f"run.out_dir {out} exists and is not a directory")
    has_run = out.is_dir() and any(out.iterdir())
    if has_run and not (resume or overwrite):
        raise UserError(f"run.out_dir {out} already holds a run; pass --resume to continue it or --overwrite "
                        "to start over")
    if rank == 0:
        if overwrite and has_run and not resume:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)


def resolve_model(cfg: RunConfig, vocab_size: int) -> None:
    """Settle the model's shape before planning: from an HF checkpoint if asked; check the vocabulary."""
    from training.model.hf import model_config_from_hf

    if cfg.model.init_from_hf:
        hf_shape = model_config_from_hf(cfg.model.init_from_hf)
        shape = hf_shape.model_dump(exclude={"attention", "norm", "dropout", "attention_dropout", "nsp",
                                             "init_from_hf"})
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


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@exit_on_user_error
def main(argv=None) -> int:
    from training.dist import init_distributed, check_consistent
    from training.stages.runner import StageRunner

    args = parse_args(argv)
    overrides = args.set + ([f"run.out_dir={args.out}"] if args.out else [])
    cfg = load_config(args.config, overrides)
    out = Path(cfg.run.out_dir)
    env = init_distributed(timeout_s=cfg.dist.timeout_s, backend=cfg.dist.backend)
    _setup_logging(env.rank)
    check_consistent(cfg.digest(), env.world_size)
    prepare_out_dir(out, args.resume, args.overwrite, env.rank)
    torch.distributed.barrier()

    data = load_data(cfg)
    resolve_model(cfg, data.vocab_size)
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    peak = cfg.run.peak_tflops or measure_peak_tflops(device, compute_dtype(cfg.train.precision))
    runner = StageRunner(cfg, data, out, env.rank, env.world_size, device, peak)
    if env.rank == 0:
        (out / "config.resolved.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
        shutil.copytree(data.tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)  # run dir is self-contained
        (out / "deepspeed_config.json").write_text(json.dumps(deepspeed_json(cfg, env.world_size, out), indent=1))
    tag = checkpoint.latest_tag(out / "checkpoints") if args.resume else None
    if args.resume and tag is None:
        log.warning("--resume: no checkpoint in %s, starting from scratch", out / "checkpoints")
    if tag is not None:
        runner.resume(tag)
    else:
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        runner.set_model(build_initial_model(cfg), cfg.stage_model(0))
    torch.manual_seed(cfg.run.seed + 1000 + env.rank)  # dropout differs per rank
    state = runner.run()

    exported = export_final(runner, cfg, data, out) if cfg.run.export_hf else "disabled (run.export_hf=false)"
    if env.rank == 0:
        ev = getattr(runner, "last_eval", {})
        print(f"done: {state.step} steps, {state.tokens:,} tokens, {state.wall_s:.0f} s"
              + (f", held-out MLM loss {ev['heldout_loss']:.3f} acc {ev['heldout_acc']:.3f}" if ev else ""))
        print(f"  metrics:    {out / 'metrics.jsonl'}  (TensorBoard: {out / 'tensorboard'})")
        print(f"  checkpoint: {out / 'checkpoints'}/{checkpoint.latest_tag(out / 'checkpoints')}")
        print(f"  HF model:   {exported}")
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
