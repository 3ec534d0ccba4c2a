"""EarlyBERT's ticket and early-bird search (training/stages/earlybert.py has the method and the prune hook):
the masks drawn from the slimming coefficients (`draw_ticket`), their distance, the search that watches the
search stage (`EarlyBirdSearch`), and the files under OUT/earlybert/ with the broadcasts that keep every rank
on rank 0's copy (`save_init_weights`, `load_init_weights`). The module doc of earlybert.py describes each."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
from pydantic import Field

from training.errors import UserError
from training.model import slimming
from training.outdir import write_atomic
from training.stages import transfer
from training.stages.protocol import HookArgs, Tensors


log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------- arguments

class SearchArgs(HookArgs):
    interval: int = Field(10, ge=1)  # steps between two masks
    window: int = Field(5, ge=2)  # masks compared (the newest against the window - 1 before it)
    threshold: float = Field(0.1, gt=0, le=1)  # normalised Hamming distance under which the ticket is drawn


class PruneArgs(HookArgs):
    ratio_heads: float = Field(1 / 3, ge=0, lt=1)  # fraction of each layer's heads pruned
    ratio_ffn: float = Field(0.4, ge=0, lt=1)  # fraction of all FFN neurons pruned (global threshold)
    rewind: Literal["init", "keep"] = "init"  # init: the weights saved at the search stage's start; keep: searched
    search: Optional[SearchArgs] = None  # None: no early-bird detection, the search stage runs its length


# ----------------------------------------------------------------------------------------- coefficients


def slimming_stats(source, small: float = 0.1) -> dict[str, float]:
    """mean |c|, min |c|, max |c| and the fraction with |c| < small, for heads and for FFN neurons.

    Runner hook-up if wanted elsewhere: `self.metrics.write({"kind": "slimming", "step": s,
    **slimming_stats(self.engine)})`; the early-bird search already writes these with its records."""
    heads, neurons = coefficients(source)
    out = {}
    for kind, values in (("head", torch.cat(heads).abs()), ("neuron", torch.cat(neurons).abs())):
        out.update({f"{kind}_coef_mean": float(values.mean()), f"{kind}_coef_min": float(values.min()),
                    f"{kind}_coef_max": float(values.max()),
                    f"{kind}_coef_below_{small:g}": float((values < small).float().mean())})
    return out


# ------------------------------------------------------------------------------------------------ ticket

@dataclass
class Ticket:
    heads: list[list[int]]  # kept head indices per layer (ascending)
    neurons: list[list[int]]  # kept FFN neuron indices per layer (ascending)
    head_masks: list[torch.Tensor] = field(repr=False)  # bool, True = kept
    neuron_masks: list[torch.Tensor] = field(repr=False)

    @property
    def heads_per_layer(self) -> list[int]:
        return [len(k) for k in self.heads]

    @property
    def ffn_per_layer(self) -> list[int]:
        return [len(k) for k in self.neurons]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.head_masks), torch.cat(self.neuron_masks)

    def to_json(self) -> dict:
        return {"heads": self.heads, "neurons": self.neurons, "heads_per_layer": self.heads_per_layer,
                "ffn_per_layer": self.ffn_per_layer}


def _keep_largest(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the `keep` largest entries; ties go to the lower index (stable, deterministic)."""
    order = torch.sort(-values, stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[:keep]] = True
    return mask


def draw_ticket(heads: list[torch.Tensor], neurons: list[torch.Tensor], ratio_heads: float,
                ratio_ffn: float) -> Ticket:
    """Masks from coefficient magnitudes: heads layerwise, FFN neurons by one global quantile."""
    head_masks = []
    for c in heads:
        pruned = min(int(c.numel() * ratio_heads + 1e-6), c.numel() - 1)
        head_masks.append(_keep_largest(c.abs(), c.numel() - pruned))
    sizes = [c.numel() for c in neurons]
    flat = torch.cat(neurons).abs()
    pruned = int(flat.numel() * ratio_ffn + 1e-6)
    flat_mask = _keep_largest(flat, flat.numel() - pruned)
    neuron_masks = list(flat_mask.split(sizes))
    for i, (mask, c) in enumerate(zip(neuron_masks, neurons)):
        if not mask.any():  # a layer may not lose every neuron: keep its largest
            neuron_masks[i] = _keep_largest(c.abs(), 1)
    return Ticket(heads=[m.nonzero().flatten().tolist() for m in head_masks],
                  neurons=[m.nonzero().flatten().tolist() for m in neuron_masks],
                  head_masks=head_masks, neuron_masks=neuron_masks)


def mask_distance(a: Ticket, b: Ticket) -> float:
    """max(normalised Hamming distance of the head masks, that of the neuron masks)."""
    (ha, na), (hb, nb) = a.flat(), b.flat()
    return max(float((ha != hb).float().mean()), float((na != nb).float().mean()))


def _pack(mask: torch.Tensor) -> str:
    return np.packbits(mask.numpy().astype(np.uint8)).tobytes().hex()


def _unpack(text: str, n: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool))


def _ticket_from_record(rec: dict, head_sizes: list[int], ffn_sizes: list[int]) -> Ticket:
    hm = _unpack(rec["heads"], sum(head_sizes)).split(head_sizes)
    nm = _unpack(rec["neurons"], sum(ffn_sizes)).split(ffn_sizes)
    return Ticket(heads=[m.nonzero().flatten().tolist() for m in hm],
                  neurons=[m.nonzero().flatten().tolist() for m in nm], head_masks=list(hm), neuron_masks=list(nm))


# ---------------------------------------------------------------------------------------------- files

def earlybert_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "earlybert"


def is_rank0() -> bool:
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj))


def save_init_weights(tensors: Tensors, out_dir: Path) -> Path:
    path = earlybert_dir(out_dir) / "init.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save({k: v.detach().float().cpu() for k, v in tensors.items()}, f))
    return path


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _from_rank0(obj):
    """Rank 0's `obj` on every rank (a small picklable object; no-op on one rank)."""
    import torch.distributed as dist
    if _world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def load_init_weights(out_dir: Path, like: Tensors) -> Tensors:
    """The search stage's initial weights (rewind: init), identical on every rank. Collective: all ranks call.

    Why a broadcast rather than every rank reading the file: only rank 0 writes init.pt, and without a
    shared file system the other nodes' OUT holds no copy or a stale one from an earlier run; having every
    rank write its own copy instead would put world_size copies on a shared one. So rank 0 reads and checks
    the file, all ranks agree on the outcome (one small broadcast, so a missing file is the same error
    everywhere rather than a hang), then rank 0 sends the weights as one flat fp32 buffer. `like` (this
    rank's current weights: the same names and shapes on every rank) gives the layout; tensors it shares
    (the tied decoder weight) travel once.
    """
    path = earlybert_dir(out_dir) / "init.pt"
    rank, world = _world()
    init, error = None, None
    if rank == 0:
        if not path.is_file():
            error = (f"rewind: init needs {path}, saved at the search stage's first step; it is missing "
                     "(use rewind: keep, or rerun the search stage from its start)")
        else:
            init = torch.load(path, map_location="cpu", weights_only=True)
            if set(init) != set(like) or any(init[k].shape != like[k].shape for k in like):
                error = f"{path} does not match the search stage's model (a stale file from another run?)"
    error = _from_rank0(error)
    if error is not None:
        raise UserError(error)
    if world == 1:
        return init
    import torch.distributed as dist

    names, alias, seen = [], {}, {}
    for name in sorted(like):  # the same order on every rank
        first = seen.setdefault(id(like[name]), name)
        if first == name:
            names.append(name)
        else:
            alias[name] = first
    sizes = [like[n].numel() for n in names]
    on_gpu = dist.get_backend() == "nccl"  # NCCL moves device tensors only, gloo host ones
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if rank == 0:
        flat = torch.cat([init[n].reshape(-1).float() for n in names]).to(device)
    else:
        flat = torch.empty(sum(sizes), dtype=torch.float32, device=device)
    dist.broadcast(flat, src=0)
    parts = flat.cpu().split(sizes)
    out = {n: t.view(like[n].shape) for n, t in zip(names, parts)}
    out.update({n: out[first] for n, first in alias.items()})
    return {n: out[n] for n in like}


# ------------------------------------------------------------------------------------- early-bird search

class EarlyBirdSearch:
    """Draws masks every `interval` steps; True from observe() once the last `window` masks agree.

    Also saves the search stage's initial weights for `rewind: init`. Every rank runs it on the same
    (replicated) coefficients and reaches the same decision without communication; only rank 0 writes
    and reads the files (a resumed search gets rank 0's masks by broadcast, see the module doc).
    """

    def __init__(self, args: PruneArgs, out_dir: Path, write: Callable[[dict], None] = lambda r: None,
                 rank: int = 0):
        self.args = args
        self.out_dir = Path(out_dir)
        self.write = write
        self.rank = rank
        self.history: list[tuple[int, Ticket]] = []
        self.records: list[dict] = []  # what search.json holds: one per mask drawn
        self.drawn_step: Optional[int] = None

    @property
    def path(self) -> Path:
        return earlybert_dir(self.out_dir) / "search.json"

    def start(self, step: int, stage_step: int, engine) -> bool:
        """At the search stage's (re)start. A fresh stage (stage_step 0) saves the initial weights (rewind:
        init) and forgets any earlier search; a resumed one reloads the masks drawn up to `step`. Returns
        True when the ticket had already been drawn at `step` (a checkpoint taken at the draw). Every rank
        calls it (it holds collectives)."""
        self.history, self.records, self.drawn_step = [], [], None
        init_path = earlybert_dir(self.out_dir) / "init.pt"
        if stage_step == 0:
            if self.args.rewind == "init":
                # Every rank: under ZeRO 1/2 assembling the fp32 masters is a collective.
                weights = transfer.fp32_weights(engine)
                if self.rank == 0:
                    save_init_weights(weights, self.out_dir)
                    log.info("EarlyBERT: saved the search stage's initial weights to %s (rewind: init)", init_path)
                del weights
            if self.rank == 0 and self.path.exists():
                self.path.unlink()
            return False
        # Resumed mid-search: only rank 0's files count (it alone wrote them, and the prune boundary reads
        # init.pt there), so only rank 0 checks and reads; the masks reach the other ranks by broadcast.
        if self.rank == 0 and self.args.rewind == "init" and not init_path.is_file():
            log.warning("EarlyBERT: %s is missing; the prune stage's rewind: init will fail (use rewind: keep)",
                        init_path)
        saved = None
        if self.rank == 0 and self.path.is_file():
            saved = json.loads(self.path.read_text()).get("masks", [])
        saved = _from_rank0(saved)
        if saved:
            heads, neurons = coefficients(engine)
            head_sizes, ffn_sizes = [c.numel() for c in heads], [c.numel() for c in neurons]
            for rec in saved:
                if rec["step"] > step:
                    continue
                self.records.append(rec)
                self.history.append((rec["step"], _ticket_from_record(rec, head_sizes, ffn_sizes)))
                if rec.get("drawn"):
                    self.drawn_step = rec["step"]
        return self.drawn_step is not None

    def observe(self, step: int, engine) -> bool:
        """After optimizer step `step` (global). True when the ticket is drawn now."""
        search = self.args.search
        if search is None or self.drawn_step is not None or step % search.interval:
            return self.drawn_step is not None and search is not None
        heads, neurons = coefficients(engine)
        ticket = draw_ticket(heads, neurons, self.args.ratio_heads, self.args.ratio_ffn)
        self.history.append((step, ticket))
        recent = self.history[-search.window:]
        distances = [mask_distance(ticket, old) for _, old in recent[:-1]]
        drawn = len(recent) == search.window and max(distances) < search.threshold
        rec = {"step": step, "heads": _pack(torch.cat(ticket.head_masks)),
               "neurons": _pack(torch.cat(ticket.neuron_masks)), "drawn": drawn}
        self.records.append(rec)
        stats = slimming_stats((heads, neurons))
        self.write({"kind": "earlybird", "step": step,
                    "distance_max": max(distances) if distances else None,
                    "distance_prev": distances[-1] if distances else None, "drawn": drawn, **stats})
        if self.rank == 0:
            write_json(self.path, {"ratio_heads": self.args.ratio_heads, "ratio_ffn": self.args.ratio_ffn,
                                    "masks": self.records})
        if drawn:
            self.drawn_step = step
            if self.rank == 0:
                write_json(earlybert_dir(self.out_dir) / "ticket.json",
                            {"step": step, "reason": "early_bird", "distance_max": max(distances),
                             **ticket.to_json()})
            log.info("EarlyBERT: early-bird ticket drawn at step %d (mask distance %.4f < %g over %d masks)",
                     step, max(distances), search.threshold, search.window)
        return drawn


def coefficients(source) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(head coefficients per layer, neuron coefficients per layer), fp32 CPU copies (model/slimming.py), read from
    a DeepSpeed engine's fp32 masters where `source` is an engine."""
    if hasattr(source, "module") and hasattr(source, "optimizer"):
        masters = dict(transfer.named_master_params(source))
        source = {n: masters.get(n, p) for n, p in source.module.named_parameters()}
    return slimming.coefficients(source)
