"""Metrics: OUT/metrics.jsonl (rank 0), TensorBoard through DeepSpeed's monitor, and the MFU denominator."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def make_monitor(blocks: dict, out_dir: Path):
    """One DeepSpeed MonitorMaster for the whole run (rank 0 writes), from ds_config.monitor_blocks; None when no
    logger is asked for. W&B gets offline mode and OUT as its directory unless the environment says otherwise."""
    if not blocks:
        return None
    import os

    from deepspeed.monitor.config import get_monitor_config
    from deepspeed.monitor.monitor import MonitorMaster

    if "wandb" in blocks:
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(out_dir))
        os.environ.setdefault("WANDB_NAME", out_dir.name)
    return MonitorMaster(get_monitor_config(blocks))


class MetricsWriter:
    """Appends one JSON object per line; only rank 0 writes. Resumed runs append to the same file. `monitor`: a
    DeepSpeed monitor, or a function making one at the first record (so a process that records nothing, e.g. a
    finished run resumed, opens no events file)."""

    def __init__(self, path: Path, enabled: bool, monitor=None):
        self.path = path
        self.enabled = enabled
        self._monitor = monitor

    @property
    def monitor(self):
        if callable(self._monitor) and not hasattr(self._monitor, "write_events"):
            self._monitor = self._monitor()
        return self._monitor

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            kind = record.get("kind", "train")
            events = [(f"{kind}/{k}", float(v), record["step"]) for k, v in record.items()
                      if isinstance(v, (int, float)) and k not in ("step", "kind")]
            self.monitor.write_events(events)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """A square matmul's best rate of `repeats` trials on this device and dtype: the MFU denominator when
    run.peak_tflops is unset. The best, not the mean, so a stall during one trial does not lower the peak
    (and inflate MFU). On a GPU prefer setting run.peak_tflops to the datasheet's dense number."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12
