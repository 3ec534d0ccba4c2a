"""MSLT's saving, measured: each stage of an MSLT run with its lower layers frozen, side by side with the same
shape fully trainable, in one run of W data-parallel ranks (default 2 gloo ranks on CPU).

    python -m training.bench mslt --config configs/mslt_default.yaml --out DIR [--ranks 2] [--steps 5]

Without a launcher the command spawns `--ranks` processes itself (torch.multiprocessing, gloo on CPU, NCCL
on GPU); under `deepspeed`/`torchrun` it uses the launched ranks. Rank 0 writes DIR/mslt.json.

For every stage of the config, two subjects (one when the stage freezes nothing, e.g. the first and the
joint stage): "mslt" — the stage's model after its hook's `prepare` (what the runner trains), and "full" —
the same shape with every parameter trainable. Each is wrapped by the same `build_engine` (the config's
precision, ZeRO stage, optimizer, clipping) and trained on the same real batches (the stage's seq_len).
Blocks alternate full, mslt, full, mslt, ... (`--repeats`), each after `--warmup` untimed steps.

Per optimizer step (medians over the timed steps of all blocks), the step as the runner runs it
(training/engine/step.py):
* forward_s / backward_s / optimizer_s / sync_s: model+loss, `engine.backward`, `engine.step`, and the scalar
  all-reduces (token count; fault and pre-emption flags) with the non-finite-gradient check (CUDA-synchronised).
  DeepSpeed reduces the gradients inside backward (ZeRO 0/1/2 alike); `comm_s` is the time spent inside
  collectives (all phases). `*_cpu_s`: the same phases in process CPU time (time.process_time, all threads
  of the rank), much less sensitive than wall time to other jobs on a shared machine.
* collectives: every torch.distributed collective issued during forward, backward, step and sync, by phase, op and
  dtype (count, elements, bytes; all-reduce and reduce-scatter count their input, all-gather its output).
  `grad_reduce_bytes` = the all-reduce + reduce-scatter bytes in `engine.backward` of tensors with more than
  one element (the gradient buckets: ZeRO 0/1/2 all reduce gradients there; scalar overflow/norm reductions,
  LAMB's per-tensor norms under ZeRO 1/2 and the parameter all-gather in `engine.step` are listed, not
  counted), and
  `trainable_grad_bytes` = trainable elements x the reduced dtype's size: equal under ZeRO 0; ZeRO 1/2 pad
  their flat partitions to an alignment, shown as `grad_reduce_padding_elements`.
* saved_activation_bytes: bytes of the distinct tensors autograd saved for backward in one forward
  (torch.autograd.graph.saved_tensors_hooks); frozen layers under no_grad save none.
* peak_memory_bytes: CUDA max_memory_allocated per block; on CPU the process peak RSS per block (VmHWM, see
  training/bench/machine.py MemoryProbe), rank 0 and the max over ranks.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

from training import cli_types
from training.bench import steptime
from training.bench.collectives import REDUCING, CollectiveCounter, element_size, summarise_collectives

log = logging.getLogger("training.bench.mslt")

_TIMES = ("step_s", "forward_s", "backward_s", "optimizer_s", "sync_s",
          "step_cpu_s", "forward_cpu_s", "backward_cpu_s", "optimizer_cpu_s", "sync_cpu_s")


# ------------------------------------------------------------------------------------------ subjects

def trainable_stats(model: torch.nn.Module) -> dict:
    params = list(model.parameters())  # tied parameters once
    trainable = [p for p in params if p.requires_grad]
    return {"parameters": sum(p.numel() for p in params),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "trainable_tensors": len(trainable),
            "frozen_tensors": len(params) - len(trainable),
            "no_grad_layers": _no_grad_layers(model)}


def _no_grad_layers(model) -> int:
    if any(p.requires_grad for p in model.bert.embeddings.parameters()):
        return 0
    return model.bert.encoder.frozen_prefix()


@contextlib.contextmanager
def saved_tensor_bytes(sink: dict):
    """Count the distinct storages autograd saves for backward inside the block."""
    seen: set = set()

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                sink["bytes"] = sink.get("bytes", 0) + t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _around(counter: CollectiveCounter, probe: Optional[dict], module: torch.nn.Module):
    """The step's parts (training/engine/step.py) as the counter's phases: forward, backward, step, and "sync"
    for the scalar all-reduces and the fault check. With `probe`, also what the first step saves for backward
    and the gradient bytes the module holds after it."""
    @contextlib.contextmanager
    def around(name: str):
        phase = name if name in ("forward", "backward", "step") else "sync"
        saving = saved_tensor_bytes(probe) if probe is not None and name == "forward" else contextlib.nullcontext()
        with counter.in_phase(phase), saving:
            yield
        if probe is not None and name == "backward":
            params = list(module.parameters())
            probe["module_grad_bytes"] = sum(p.grad.numel() * p.grad.element_size() for p in params
                                             if p.grad is not None)
            probe["frozen_with_grad"] = sum(1 for p in params if not p.requires_grad and p.grad is not None)
    return around


def timed_step(engine, micro_batches: list[dict], device: torch.device, counter: CollectiveCounter,
               probe: Optional[dict] = None) -> dict:
    """One optimizer step as training runs it (training/bench/steptime.py), collectives counted by phase."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    return steptime.timed_step(engine, micro_batches, device, world_size=world, fp16=engine.fp16_enabled(),
                               around=_around(counter, probe, engine.module))


class Subject:
    def __init__(self, key: str, variant: str, engine, stats: dict, frozen_snapshot: dict):
        self.key, self.variant, self.engine, self.stats = key, variant, engine, stats
        self.frozen_snapshot = frozen_snapshot  # name -> tensor of frozen params (checked after the blocks)
        self.blocks: list[dict] = []
        self.records: list = []
        self.probe: dict = {}


def run_block(subject: Subject, steps: list[list[dict]], warmup: int, device, counter: CollectiveCounter,
              memory) -> dict:
    for i, micro in enumerate(steps[:warmup]):
        timed_step(subject.engine, micro, device, counter, probe=subject.probe if not subject.probe else None)
    before = memory.start()
    counter.clear()
    records = [timed_step(subject.engine, micro, device, counter) for micro in steps[warmup:]]
    peak = memory.peak()
    subject.records.extend(counter.records)
    counter.clear()
    block = {k + "_median": statistics.median(r[k] for r in records) for k in _TIMES}
    block.update({"steps": len(records), "peak_memory_bytes": peak, "memory_before_bytes": before,
                  "loss_first": records[0]["loss"], "loss_last": records[-1]["loss"]})
    subject.blocks.append(block)
    return block


def _all_gather_obj(obj):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def summarise(subject: Subject, timed_steps: int) -> dict:
    b = subject.blocks
    comm = summarise_collectives(subject.records, timed_steps * len(b))
    dtypes = {key.split(":")[2] for key, v in comm["by_op"].items()
              if key.split(":")[0] == "backward" and key.split(":")[1] in REDUCING and max(v["distinct_sizes"]) > 1}
    grad_dtype = dtypes.pop() if len(dtypes) == 1 else None
    trainable_bytes = subject.stats["trainable_parameters"] * element_size(grad_dtype) if grad_dtype else None
    peaks = _all_gather_obj(max(x["peak_memory_bytes"] for x in b))
    result = {
        "variant": subject.variant,
        **subject.stats,
        **{k: statistics.median(x[k + "_median"] for x in b) for k in _TIMES},
        "comm_s": comm["comm_s"],
        "peak_memory_bytes": peaks[0],
        "peak_memory_bytes_max_over_ranks": max(peaks),
        "saved_activation_bytes": subject.probe.get("bytes", 0),
        "module_grad_bytes_after_backward": subject.probe.get("module_grad_bytes"),
        "frozen_params_with_grad": subject.probe.get("frozen_with_grad"),
        "collectives_per_step": comm["by_op"],
        "grad_reduce_dtype": grad_dtype,
        "grad_reduce_bytes": comm["grad_reduce_bytes"],
        "trainable_grad_bytes": trainable_bytes,
        "grad_reduce_padding_elements": (comm["grad_reduce_elements"] - subject.stats["trainable_parameters"]
                                         if grad_dtype else None),
        "grad_reduce_equals_trainable": trainable_bytes is not None and comm["grad_reduce_bytes"] == trainable_bytes,
        "blocks": b,
    }
    return result


# ------------------------------------------------------------------------------------------ main

def _stage_subjects(cfg, seq_len_default: int):
    """[(stage index, name, model_cfg, seq_len, hook)] of the config's stages."""
    from training.stages.hooks import make_hook
    from training.stages.plan import seq_lens

    return [(i, stage.name, cfg.stage_model(i), seq, make_hook(stage))
            for i, (stage, seq) in enumerate(zip(cfg.stages, seq_lens(cfg, seq_len_default)))]


def _build(model_cfg, hook, frozen: bool, cfg, world: int, device, seed: int):
    from training.engine.build import build_engine
    from training.model.bert import BertForPreTraining

    torch.manual_seed(seed)
    model = BertForPreTraining(model_cfg)
    if frozen and hook is not None:
        hook.prepare(model)
    model.to(device)
    stats = trainable_stats(model)
    engine, _ = build_engine(model, cfg, world, None)
    snapshot = {n: p.detach().clone() for n, p in engine.module.named_parameters() if not p.requires_grad}
    return engine, stats, snapshot


def measure(args, rank: int, world: int) -> Optional[dict]:
    from training.bench.machine import MemoryProbe, machine_info
    from training.stages.plan import load_config
    from training.run_setup import load_data, resolve_model

    overrides = list(args.set) + ["run.report_to=[]"]
    cfg = load_config(args.config, overrides)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    data = load_data(cfg)
    resolve_model(cfg, data.vocab_size)
    t = cfg.train
    memory = MemoryProbe(device)
    machine = machine_info(device)  # loadavg_start: now
    counter = CollectiveCounter().install()
    stages_out = []
    try:
        for index, name, model_cfg, seq_len, hook in _stage_subjects(cfg, data.seq_len):
            if args.stages and name not in args.stages:
                continue
            stage = cfg.stages[index]
            total = args.warmup + args.steps
            stream = data.train_batches(t.micro_batch_size, rank, world, cfg.run.seed, seq_len=seq_len)
            steps = [[{k: v.to(device) for k, v in next(stream).items()} for _ in range(t.grad_accum)]
                     for _ in range(total)]
            subjects = []
            for variant in ("full", "mslt"):
                engine, stats, snapshot = _build(model_cfg, hook, variant == "mslt", cfg, world, device, cfg.run.seed)
                if variant == "mslt" and stats["frozen_tensors"] == 0:
                    del engine
                    break  # nothing frozen in this stage: the full subject is the MSLT stage
                subjects.append(Subject(name, variant, engine, stats, snapshot))
            for r in range(args.repeats):
                for s in subjects:
                    b = run_block(s, steps, args.warmup, device, counter, memory)
                    if rank == 0:
                        log.info("stage %s %s repeat %d: step %.3f s (fwd %.3f bwd %.3f opt %.3f)", name, s.variant,
                                 r, b["step_s_median"], b["forward_s_median"], b["backward_s_median"],
                                 b["optimizer_s_median"])
            entry = {"stage": name, "index": index, "hook": stage.hook, "hook_args": dict(stage.hook_args),
                     "num_layers": model_cfg.num_layers, "seq_len": seq_len,
                     "tokens_per_step": t.micro_batch_size * t.grad_accum * world * seq_len}
            for s in subjects:
                res = summarise(s, args.steps)
                changed = [n for n, p in s.engine.module.named_parameters()
                           if n in s.frozen_snapshot and not torch.equal(p.detach(), s.frozen_snapshot[n])]
                res["frozen_params_changed"] = len(changed)
                entry[s.variant] = res
            if "mslt" not in entry:
                entry["mslt"] = "same as full (nothing frozen in this stage)"
            else:
                f, m = entry["full"], entry["mslt"]
                entry["mslt_over_full"] = {k: m[k] / f[k] for k in
                                           _TIMES + ("grad_reduce_bytes", "saved_activation_bytes",
                                                     "trainable_parameters", "peak_memory_bytes")
                                           if f.get(k)}
            stages_out.append(entry)
            for s in subjects:
                if hasattr(s.engine, "destroy"):
                    s.engine.destroy()
            del subjects
    finally:
        counter.uninstall()
    if rank != 0:
        return None
    return {
        "command": getattr(args, "command_line", None) or " ".join(sys.argv),
        "config": str(args.config),
        "overrides": list(args.set),
        "machine": machine,
        "world_size": world,
        "backend": __import__("torch.distributed", fromlist=["x"]).get_backend(),
        "precision": t.precision,
        "optimizer": cfg.optimizer.name,
        "zero_stage": t.zero_stage,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "steps_per_block": args.steps,
        "warmup_per_block": args.warmup,
        "repeats": args.repeats,
        "memory_metric": memory.description,
        "notes": __doc__.split("Per optimizer step", 1)[1].strip(),
        "stages": stages_out,
    }


def _worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _run_rank(args)
    # The measurement is done and written. Leave together and skip the interpreter's teardown: a rank whose C++
    # threads (the rendezvous store's client, gloo's) are destroyed while its peer still works can abort at exit
    # ("terminate called without an active exception", seen about once in twenty runs), failing a run that
    # succeeded.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_rank(args) -> None:
    from training.stages.plan import load_config
    from training.dist import init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, list(args.set))
    env = init_distributed(timeout_s=cfg.dist.timeout_s, backend=cfg.dist.backend)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = measure(args, env.rank, env.world_size)
    if result is not None:
        try:
            result["machine"]["loadavg_end"] = os.getloadavg()
        except OSError:
            pass
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mslt.json").write_text(json.dumps(result, indent=1))
        print(format_table(result))
        print(f"wrote {out / 'mslt.json'}")


def run(args) -> None:
    args.command_line = "python -m training.bench " + " ".join(sys.argv[1:])
    if "WORLD_SIZE" in os.environ or args.ranks == 1:
        if args.threads is None and "WORLD_SIZE" in os.environ:
            args.threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        _run_rank(args)
        return
    import torch.multiprocessing as mp
    from training.dist import free_port

    if args.threads is None:
        args.threads = max(1, (os.cpu_count() or 1) // args.ranks)
    mp.start_processes(_worker, args=(args.ranks, free_port(), args), nprocs=args.ranks, join=True,
                       start_method="spawn")


def _mib(x) -> str:
    return f"{x / 2**20:.1f}" if isinstance(x, (int, float)) else "-"


def format_table(result: dict) -> str:
    lines = [f"MSLT vs full, {result['world_size']} ranks ({result['backend']}), {result['precision']}, "
             f"{result['optimizer']}, ZeRO {result['zero_stage']}",
             f"{'stage':8} {'variant':6} {'train%':>7} {'step s':>8} {'fwd s':>8} {'bwd s':>8} {'opt s':>8} "
             f"{'bwd cpu s':>9} {'reduce MiB':>10} {'=train?':>7} {'act MiB':>8} {'peak MiB':>9}"]
    for st in result["stages"]:
        for variant in ("full", "mslt"):
            r = st.get(variant)
            if not isinstance(r, dict):
                continue
            lines.append(f"{st['stage']:8} {variant:6} {100 * r['trainable_parameters'] / r['parameters']:7.1f} "
                         f"{r['step_s']:8.3f} {r['forward_s']:8.3f} {r['backward_s']:8.3f} {r['optimizer_s']:8.3f} "
                         f"{r['backward_cpu_s']:9.3f} "
                         f"{_mib(r['grad_reduce_bytes']):>10} {str(r['grad_reduce_equals_trainable']):>7} "
                         f"{_mib(r['saved_activation_bytes']):>8} {_mib(r['peak_memory_bytes']):>9}")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="an MSLT run config (its stages, model, train, optimizer, data)")
    p.add_argument("--out", required=True, help="output directory (writes mslt.json)")
    p.add_argument("--ranks", type=cli_types.positive_int("--ranks", 1024), default=2,
                   help="processes to spawn when not under a launcher (default 2)")
    steptime.add_block_arguments(p, steps=5, warmup=2, repeats=2, blocks="alternating full/mslt blocks per stage")
    p.add_argument("--stages", nargs="+", default=None, metavar="NAME", help="only these stages")
    p.add_argument("--threads", type=cli_types.positive_int("--threads", 4096), default=None,
                   help="torch threads per rank (default cores / ranks)")
    from training import cli

    cli.add_set(p)
