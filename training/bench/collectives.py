"""Every torch.distributed collective a step issues, counted by phase, op and dtype (the MSLT tool's measure of
what freezing saves in the gradient all-reduce; training/bench/mslt.py)."""
from __future__ import annotations

import contextlib
import threading
import time

import torch

# (name in torch.distributed, which argument is the payload, "in" = reduced input / "out" = gathered output)
_COLLECTIVES = {
    "all_reduce": ("tensor", 0),
    "all_reduce_coalesced": ("tensors", 0),
    "reduce": ("tensor", 0),
    "broadcast": ("tensor", 0),
    "reduce_scatter_tensor": ("input", 1),
    "_reduce_scatter_base": ("input", 1),
    "reduce_scatter": ("input_list", 1),
    "all_gather_into_tensor": ("output_tensor", 0),
    "_all_gather_base": ("output_tensor", 0),
    "all_gather": ("tensor_list", 0),
}
REDUCING = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter_tensor", "_reduce_scatter_base",
             "reduce_scatter")


def _tensors(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class CollectiveCounter:
    """Record every torch.distributed collective while installed (also the all-gather/reduce-scatter
    functions DeepSpeed's TorchBackend caches at init). Nested calls (a deprecated alias calling its
    replacement) count once. `records` holds (phase, op, dtype, numel, seconds)."""

    def __init__(self):
        self.records: list[tuple[str, str, str, int, float]] = []
        self.phase = "other"
        self._depth = threading.local()
        self._saved: list[tuple[object, str, object]] = []

    def _wrap(self, op: str, fn):
        arg, pos = _COLLECTIVES[op]

        def wrapper(*args, **kwargs):
            depth = getattr(self._depth, "n", 0)
            self._depth.n = depth + 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth.n = depth
                if depth == 0:
                    payload = kwargs.get(arg, args[pos] if len(args) > pos else None)
                    tensors = _tensors(payload)
                    numel = sum(t.numel() for t in tensors)
                    dtype = str(tensors[0].dtype).removeprefix("torch.") if tensors else "?"
                    self.records.append((self.phase, op, dtype, numel, time.perf_counter() - t0))

        wrapper.__wrapped__ = fn
        return wrapper

    def install(self) -> "CollectiveCounter":
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        originals = {}
        for op in _COLLECTIVES:
            fn = getattr(dist, op, None)
            if fn is None:
                continue
            originals[fn] = self._wrap(op, fn)
            for module in (dist, c10d):
                if getattr(module, op, None) is fn:
                    self._saved.append((module, op, fn))
                    setattr(module, op, originals[fn])
        try:  # DeepSpeed's backend keeps references to two of them
            from deepspeed.comm import comm as ds_comm

            cdb = getattr(ds_comm, "cdb", None)
            for attr in ("all_gather_function", "reduce_scatter_function"):
                fn = getattr(cdb, attr, None) if cdb is not None else None
                if fn in originals:
                    self._saved.append((cdb, attr, fn))
                    setattr(cdb, attr, originals[fn])
        except ImportError:
            pass
        return self

    def uninstall(self) -> None:
        for owner, attr, fn in reversed(self._saved):
            setattr(owner, attr, fn)
        self._saved.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()

    @contextlib.contextmanager
    def in_phase(self, phase: str):
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before

    def clear(self) -> None:
        self.records.clear()


def element_size(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()


def summarise_collectives(records, steps: int, phases=("forward", "backward", "step", "sync")) -> dict:
    """Per-step totals of the records in `phases`, grouped by phase, op and dtype. The gradient reduction is
    what DeepSpeed reduces in `engine.backward` (ZeRO 0/1/2 all reduce there, at the accumulation boundary)."""
    by_op: dict[str, dict] = {}
    grad_bytes = grad_elems = 0
    seconds = 0.0
    for phase, op, dtype, numel, secs in records:
        if phase not in phases:
            continue
        nbytes = numel * element_size(dtype) if dtype != "?" else 0
        entry = by_op.setdefault(f"{phase}:{op}:{dtype}", {"calls": 0, "elements": 0, "bytes": 0, "sizes": []})
        entry["calls"] += 1
        entry["elements"] += numel
        entry["bytes"] += nbytes
        if numel not in entry["sizes"]:
            entry["sizes"].append(numel)
        seconds += secs
        if phase == "backward" and op in REDUCING and numel > 1:
            grad_bytes += nbytes
            grad_elems += numel
    per_step = {key: {"calls": v["calls"] / steps, "elements": v["elements"] / steps,
                      "bytes": v["bytes"] / steps, "distinct_sizes": sorted(v["sizes"])}
                for key, v in sorted(by_op.items())}
    return {"by_op": per_step, "grad_reduce_bytes": grad_bytes / steps, "grad_reduce_elements": grad_elems / steps,
            "comm_s": seconds / steps}
