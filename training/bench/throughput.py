"""Training throughput of our BERT vs Hugging Face's `BertForPreTraining`, side by side in one process.

Both models are built from the same config `model:` shape, wrapped by the same `build_engine` (the
config's precision, ZeRO stage, LAMB/AdamW, clipping), and trained on the *same* pre-built batches
with the runner's own step (training/engine/step.py: token-normalised loss, the scalar all-reduces, the
fault check). Blocks of `--steps` timed steps alternate ours, HF, ours, HF, ... (`--repeats` pairs), each
block preceded by `--warmup` untimed steps, so machine drift hits both alike. `--models` adds variants of ours
with the same weights to the rotation: `ours_compiled` (model.compile), `ours_fused` (every Triton kernel the
model can use: model.attention fused and model.fused_ops; a kernel that cannot run falls back to PyTorch, and the
output says so as a caveat) and `ours_padded` (model.unpad: false: a padded batch, from `prepare --no-pack`, then
runs its padding too; "real tok/s" counts the non-padding tokens).
Each model's very first step, before any block, is timed on its own ("1st step s": compilation included).

Per optimizer step the time is split into forward (model + loss), backward (`engine.backward`), optimizer
(`engine.step`: clipping, LAMB, precision casts) and sync (the token-count and flags all-reduces and the
non-finite-gradient check), each phase fenced by `torch.cuda.synchronize()` on GPU (CPU ops are
synchronous; training/bench/steptime.py). Batches are put on the device before
timing, so host->device copies and data loading are not counted.

Peak memory per block: on CUDA `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`; on
CPU the process peak RSS (`VmHWM` in /proc/self/status, reset by writing 5 to /proc/self/clear_refs
before each block, i.e. the whole process: both models, both optimizers and the batches are resident;
`rss_before` is the resident size when the block starts, so peak - before approximates the block's
working memory). Where clear_refs is not writable, the lifetime `ru_maxrss` is reported instead.

MFU = flops_per_token(model, seq_len) x real tokens/s / peak (real: not padding; every token of packed rows).
The same model FLOPs are charged to HF (its
MLM head projects every position onto the vocabulary, ours only masked ones: that extra work is HF's
overhead, not useful FLOPs), so the MFU ratio equals the throughput ratio. Peak = run.peak_tflops
when set, else the best rate of a large square matmul in the compute dtype measured in this run
(before and after the blocks; the max is used).
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from training.bench.hf_reference import build_hf_model
from training.bench.machine import MemoryProbe, machine_info, matmul_peak_tflops
from training.bench.steptime import timed_step

log = logging.getLogger("training.bench.throughput")

# ------------------------------------------------------------------------------------------ timing

class Subject:
    """One model + its DeepSpeed engine, and the per-block measurements."""

    def __init__(self, name: str, label: str, engine, params: int, forward_kwargs=lambda step: {}):
        self.name, self.label, self.engine, self.params = name, label, engine, params
        self.forward_kwargs = forward_kwargs  # block step -> the stage's forward arguments (layer drop)
        self.blocks: list[dict] = []
        self.first_step_s: Optional[float] = None  # its very first step (model.compile: compilation included)


def run_block(subject: Subject, steps: list[list[dict]], warmup: int, device: torch.device,
              memory: MemoryProbe, tokens_per_step: int, samples_per_step: int, fp16: bool = False) -> dict:
    if subject.first_step_s is None:  # untimed by the blocks: compilation and first-call costs
        record = timed_step(subject.engine, steps[0], device, fp16=fp16, forward_kwargs=subject.forward_kwargs(0))
        subject.first_step_s = record["step_s"]
    for i, micro in enumerate(steps[:warmup]):
        timed_step(subject.engine, micro, device, fp16=fp16, forward_kwargs=subject.forward_kwargs(i))
    before = memory.start()
    records = [timed_step(subject.engine, micro, device, fp16=fp16, forward_kwargs=subject.forward_kwargs(warmup + i))
               for i, micro in enumerate(steps[warmup:])]
    peak = memory.peak()
    seconds = sum(r["step_s"] for r in records)
    block = {
        "steps": len(records),
        "seconds": seconds,
        "tokens_per_s": tokens_per_step * len(records) / seconds,
        "samples_per_s": samples_per_step * len(records) / seconds,
        "step_s_median": statistics.median(r["step_s"] for r in records),
        "forward_s_median": statistics.median(r["forward_s"] for r in records),
        "backward_s_median": statistics.median(r["backward_s"] for r in records),
        "optimizer_s_median": statistics.median(r["optimizer_s"] for r in records),
        "sync_s_median": statistics.median(r["sync_s"] for r in records),
        "peak_memory_bytes": peak,
        "memory_before_bytes": before,
        "step_s_all": [r["step_s"] for r in records],
        "forward_s_all": [r["forward_s"] for r in records],
        "backward_s_all": [r["backward_s"] for r in records],
        "optimizer_s_all": [r["optimizer_s"] for r in records],
        "loss_first": records[0]["loss"],
        "loss_last": records[-1]["loss"],
    }
    subject.blocks.append(block)
    return block


def summarise(subject: Subject, flops_per_token: float, peak_tflops: float, tokens_per_step: int,
              samples_per_step: int, real_tokens_per_step: float) -> dict:
    """Medians over every timed step of every block (robust to the stalls of a shared machine);
    `*_mean` is total tokens / total time, which a single stall drags down."""
    b = subject.blocks
    pooled = {k: statistics.median(v for x in b for v in x[f"{k}_all"])
              for k in ("step_s", "forward_s", "backward_s", "optimizer_s")}
    seconds = sum(x["seconds"] for x in b)
    steps = sum(x["steps"] for x in b)
    return {
        "label": subject.label,
        "parameters": subject.params,
        "first_step_s": subject.first_step_s,
        "tokens_per_s": tokens_per_step / pooled["step_s"],
        "samples_per_s": samples_per_step / pooled["step_s"],
        "tokens_per_s_mean": tokens_per_step * steps / seconds,
        "tokens_per_s_block_median": statistics.median(x["tokens_per_s"] for x in b),
        **pooled,
        "peak_memory_bytes": max(x["peak_memory_bytes"] for x in b),
        "peak_memory_minus_start_bytes": statistics.median(x["peak_memory_bytes"] - x["memory_before_bytes"]
                                                           for x in b),
        # useful FLOPs: the model's per-token FLOPs on the real tokens (padding is nobody's useful work)
        "mfu": flops_per_token * real_tokens_per_step / pooled["step_s"] / (peak_tflops * 1e12),
        "real_tokens_per_s": real_tokens_per_step / pooled["step_s"],
        "blocks": b,
    }


# ------------------------------------------------------------------------------------------ main

FUSED_OPS = ("bias_gelu", "residual_layernorm", "mlm_loss")  # model.fused_ops's choices


def variant_config(name: str, model_cfg):
    """(model config, the settings changed) of one of our --models variants; the same weights for all."""
    from training.model.config import ModelConfig

    if name == "ours_fused":  # every kernel this model can use: the residual LayerNorm one is post-LN only
        update = {"attention": "fused",
                  "fused_ops": [op for op in FUSED_OPS if op != "residual_layernorm" or model_cfg.norm == "post"]}
    else:
        update = {"ours": {}, "ours_compiled": {"compile": True}, "ours_padded": {"unpad": False}}[name]
    return ModelConfig.model_validate({**model_cfg.model_dump(), **update}), update


def kernel_caveats(name: str, ops) -> list[str]:
    """One line per Triton kernel of `ops` (training.model.fused) that did not run and why: a variant that asked
    for kernels and got PyTorch must not be read as the kernels' speed."""
    return [f"{name}: the {op.name} kernel did not run ({reason}); {op.fallback_name} ran instead"
            for op in ops for reason in sorted(op.logged)]


def stage_training(cfg, index: int, model: nn.Module, data_seq_len: int):
    """Stage `index` as the runner trains it, applied to `model`: its hook's `prepare` (MSLT freezes the lower
    layers), and its training modifiers from the stage's first global step on (layer dropping's keep
    probabilities). Returns (step -> forward kwargs, trainable parts, keep probabilities at the first step or
    None)."""
    from training.model.flops import trainable_parts
    from training.stages.modifiers import StageTraining
    from training.stages.plan import Plan
    from training.stages.protocol import StepContext

    planned = Plan(cfg, data_seq_len, world_size=1)[index]
    if planned.hook is not None:
        planned.hook.prepare(model)
    training = StageTraining(cfg, index, planned.model, planned.seq_len)

    def kwargs(step: int) -> dict:
        return training.forward_kwargs(StepContext(planned.start_step + step, step, planned.steps, planned.model,
                                                   cfg.run.seed))

    first = kwargs(0).get("layer_keep_prob")
    return kwargs, trainable_parts(model), first


def select_stage(cfg, stage: Optional[str], data_seq_len: int):
    """(stage label, model config, seq_len, stage index) to measure: the top-level `model:` at the data's length
    by default (index None), or the model and seq_len of one stage (`--stage NAME` or index)."""
    if stage is None:
        return None, cfg.model, data_seq_len, None
    names = [s.name for s in cfg.stages]
    if stage in names:
        index = names.index(stage)
    elif stage.isdigit() and int(stage) < len(names):
        index = int(stage)
    else:
        from training.errors import UserError

        raise UserError(f"--stage {stage}: no such stage (stages: {', '.join(names)})")
    from training.stages.plan import seq_lens

    return names[index], cfg.stage_model(index), seq_lens(cfg, data_seq_len)[index], index


def run(args) -> dict:
    from training.stages.plan import load_config
    from training.dist import init_distributed
    from training.engine.build import build_engine, compute_dtype
    from training.model.flops import count_parameters, flops_per_token
    from training.model.bert import BertForPreTraining
    from training.run_setup import load_data, resolve_model

    overrides = list(args.set) + ["run.report_to=[]"]
    cfg = load_config(args.config, overrides)
    env = init_distributed(timeout_s=cfg.dist.timeout_s, backend=cfg.dist.backend)
    if env.world_size != 1:
        from training.errors import UserError

        raise UserError("training.bench throughput runs as one process (no launcher)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", env.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dtype = compute_dtype(cfg.train.precision)
    machine = machine_info(device)  # load average at the start

    data = load_data(cfg)
    resolve_model(cfg, data.vocab_size)
    stage_name, model_cfg, seq_len, stage_index = select_stage(cfg, args.stage, data.seq_len)
    t = cfg.train
    total_steps = args.warmup + args.steps
    stream = data.train_batches(t.micro_batch_size, 0, 1, cfg.run.seed, seq_len=seq_len)
    steps = [[{k: v.to(device) for k, v in next(stream).items()} for _ in range(t.grad_accum)]
             for _ in range(total_steps)]
    tokens_per_step = t.micro_batch_size * t.grad_accum * seq_len
    # Real (non-padding) tokens: all of them in packed rows; fewer in `prepare --no-pack` rows.
    real_tokens_per_step = statistics.mean(float(sum(b["attention_mask"].sum() for b in micro)) for micro in steps)
    samples_per_step = t.micro_batch_size * t.grad_accum

    subjects = []
    models = args.models
    caveats: list[str] = []
    stage_kwargs, trainable, keep_probs = (lambda step: {}), None, None
    for name in [m for m in models if m != "hf"]:  # ours, ours_compiled, ours_fused, ours_padded: the same weights
        torch.manual_seed(cfg.run.seed)
        variant_cfg, variant = variant_config(name, model_cfg)
        ours = BertForPreTraining(variant_cfg)
        if stage_index is not None:  # the stage as the runner trains it: its hook's freezing, its layer drop
            stage_kwargs, trainable, keep_probs = stage_training(cfg, stage_index, ours, data.seq_len)
            if any(not p.requires_grad for p in ours.parameters()):
                caveats.append(f"stage {stage_name}: {name} trains only what the stage trains (frozen layers run "
                               "forward only); HF trains its whole model")
            if keep_probs is not None:
                caveats.append(f"stage {stage_name}: {name} drops layers with keep probabilities "
                               f"{[round(p, 3) for p in keep_probs]} (the stage's first step); HF runs every layer")
        ours = ours.to(device)
        engine, _ = build_engine(ours, cfg, 1, None)
        label = f"ours (training.model.bert, attention={variant_cfg.attention}" + "".join(
            f", {k}={v}" for k, v in variant.items() if k != "attention") + ")"
        subjects.append(Subject(name, label, engine, count_parameters(ours), stage_kwargs))
    if "hf" in models:
        torch.manual_seed(cfg.run.seed)
        hf, hf_caveats = build_hf_model(model_cfg)
        caveats += hf_caveats
        hf = hf.to(device)
        engine, _ = build_engine(hf, cfg, 1, None)
        subjects.append(Subject("hf", "transformers.BertForPreTraining (sdpa)", engine,
                                count_parameters(hf, trainable_only=True)))

    fpt = flops_per_token(model_cfg, seq_len, masked_fraction=cfg.data.mlm_probability, trainable=trainable,
                          keep_probs=keep_probs)  # FLOPs as computed: what the stage trains and runs
    if cfg.run.peak_tflops:
        peak, peak_source = cfg.run.peak_tflops, "config run.peak_tflops"
        peaks = []
    else:
        peaks = [matmul_peak_tflops(device, dtype)]
        peak_source = f"measured: best {dtype} square matmul rate in this run (before and after the blocks)"
    memory = MemoryProbe(device)
    for r in range(args.repeats):
        for s in subjects:
            b = run_block(s, steps, args.warmup, device, memory, tokens_per_step, samples_per_step,
                          fp16=cfg.train.precision == "fp16")
            log.info("repeat %d %s: %.0f tokens/s, step %.3f s (fwd %.3f bwd %.3f opt %.3f)", r, s.name,
                     b["tokens_per_s"], b["step_s_median"], b["forward_s_median"], b["backward_s_median"],
                     b["optimizer_s_median"])
    profiles = {s.name: profile_steps(s, steps[:args.profile], out, device, cfg.train.precision == "fp16")
                for s in subjects} if args.profile else {}
    if not cfg.run.peak_tflops:
        peaks.append(matmul_peak_tflops(device, dtype))
        peak = max(peaks)
    if "ours_fused" in models:
        from training.model import fused

        caveats += kernel_caveats("ours_fused", fused.ALL_OPS)

    result = {
        "command": "python -m training.bench " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py")
        else " ".join(sys.argv),
        "config": str(args.config),
        "overrides": list(args.set),
        "machine": machine,
        "stage": stage_name,
        "shape": {k: getattr(model_cfg, k) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                                                      "ffn_size", "attention", "norm", "nsp")},
        "precision": cfg.train.precision,
        "optimizer": cfg.optimizer.name + (" (fused)" if cfg.optimizer.fused else ""),
        "zero_stage": cfg.train.zero_stage,
        "seq_len": seq_len,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "tokens_per_step": tokens_per_step,
        "steps_per_block": args.steps,
        "warmup_per_block": args.warmup,
        "repeats": args.repeats,
        "order": " ".join(s.name for s in subjects) + " ... (alternating)",
        "flops_per_token": fpt,
        "peak_tflops": peak,
        "peak_tflops_trials": peaks,
        "peak_source": peak_source,
        "memory_metric": memory.description,
        "timing": "per optimizer step: forward (model+loss), backward (engine.backward), optimizer (engine.step), "
                  "synchronised on CUDA; reported values are medians over all timed steps of all blocks; "
                  "tokens_per_s = tokens_per_step / median step time; *_mean = total tokens / total time",
        "caveats": caveats,
        "profiles": profiles,
        "real_tokens_per_step": real_tokens_per_step,
        "padding": 1 - real_tokens_per_step / tokens_per_step,
        "models": {s.name: summarise(s, fpt, peak, tokens_per_step, samples_per_step, real_tokens_per_step)
                   for s in subjects},
    }
    try:
        result["machine"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    for mine, theirs in (("ours", "hf"), ("ours_compiled", "hf"), ("ours_compiled", "ours"), ("ours_fused", "hf"),
                         ("ours_fused", "ours"), ("ours_padded", "hf"), ("ours", "ours_padded")):
        if mine in result["models"] and theirs in result["models"]:
            result[f"ratio_{mine}_over_{theirs}"] = ratio(result["models"][mine], result["models"][theirs])
    (out / "throughput.json").write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"wrote {out / 'throughput.json'}")
    return result


def profile_steps(subject: Subject, steps: list[list[dict]], out: Path, device: torch.device, fp16: bool) -> str:
    """`--profile N`: N more steps under torch.profiler, after the timed blocks; the operators by self time go
    to OUT/profile-NAME.txt (returned). Where a step's time goes, op by op: the first thing to read before
    changing anything for speed."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i, micro in enumerate(steps):
            timed_step(subject.engine, micro, device, fp16=fp16, forward_kwargs=subject.forward_kwargs(i))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path = out / f"profile-{subject.name}.txt"
    path.write_text(f"{subject.label}: {len(steps)} steps\n" + prof.key_averages().table(sort_by=key, row_limit=30))
    return str(path)


def ratio(mine: dict, theirs: dict) -> dict:
    """Each entry is mine / theirs: tokens/s above 1 and times below 1 mean mine is faster."""
    # per repeat: the two adjacent blocks' median step times (drift between repeats cancels)
    paired = [b["step_s_median"] / a["step_s_median"] for a, b in zip(mine["blocks"], theirs["blocks"])]
    return {
        "tokens_per_s": mine["tokens_per_s"] / theirs["tokens_per_s"],
        "tokens_per_s_mean": mine["tokens_per_s_mean"] / theirs["tokens_per_s_mean"],
        "tokens_per_s_paired_median": statistics.median(paired),
        "tokens_per_s_paired": paired,
        **{k: mine[k] / theirs[k] for k in ("step_s", "forward_s", "backward_s", "optimizer_s")},
        "peak_memory": mine["peak_memory_bytes"] / theirs["peak_memory_bytes"],
    }


def format_table(result: dict) -> str:
    padded = result.get("padding", 0) > 0
    rows = [("model", "tokens/s", *(("real tok/s",) if padded else ()), "samples/s", "step s", "fwd s", "bwd s",
             "opt s", "peak mem MiB", "MFU", "1st step s")]
    for name, m in result["models"].items():
        rows.append((name, f"{m['tokens_per_s']:,.0f}", *((f"{m['real_tokens_per_s']:,.0f}",) if padded else ()),
                     f"{m['samples_per_s']:,.1f}", f"{m['step_s']:.4f}",
                     f"{m['forward_s']:.4f}", f"{m['backward_s']:.4f}", f"{m['optimizer_s']:.4f}",
                     f"{m['peak_memory_bytes'] / 2**20:,.0f}", f"{m['mfu']:.1%}", f"{m['first_step_s']:.2f}"))
    ratios = [(key[len("ratio_"):].replace("_over_", "/").replace("ours_compiled", "compiled")
               .replace("ours_fused", "fused").replace("hf", "HF"),
               r) for key, r in result.items() if key.startswith("ratio_")]
    for label, r in ratios:
        rows.append((label, f"{r['tokens_per_s']:.2f}x", *(("",) if padded else ()), "", f"{r['step_s']:.2f}x",
                     f"{r['forward_s']:.2f}x", f"{r['backward_s']:.2f}x", f"{r['optimizer_s']:.2f}x",
                     f"{r['peak_memory']:.2f}x", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    head = (f"{result['config']}  {result['precision']}  {result['optimizer']}  seq {result['seq_len']}  "
            f"batch {result['micro_batch_size']}x{result['grad_accum']}  {result['machine']['device']}  "
            f"peak {result['peak_tflops']:.2f} TFLOPS ({'config' if 'config' in result['peak_source'] else 'measured'})"
            f"  median step of {result['repeats']} blocks x {result['steps_per_block']} steps")
    tail = [f"paired {label} tokens/s per repeat: " + ", ".join(f"{x:.2f}" for x in r["tokens_per_s_paired"])
            + f" (median {r['tokens_per_s_paired_median']:.2f})" for label, r in ratios]
    tail.append("mean tokens/s (total tokens / total time): " + ", ".join(
        f"{n} {m['tokens_per_s_mean']:,.0f}" for n, m in result["models"].items()))
    if padded:
        tail.append(f"padding: {result['padding']:.1%} of the positions; real tok/s counts the other tokens only")
    tail += [f"caveat: {c}" for c in result["caveats"]]
    return "\n".join([head, *lines, *tail])
