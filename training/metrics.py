"""Metrics: OUT/metrics.jsonl (rank 0), TensorBoard through DeepSpeed's monitor, and the MFU denominator."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

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
    """Appends one JSON object per line; only rank 0 writes. Resumed runs append to the same file, cut first
    to what it held when the checkpoint was written (`size()` at the save, `truncate_metrics` at the resume).
    `monitor`: a DeepSpeed monitor, or a function making one at the first record (so a process that records
    nothing, e.g. a finished run resumed, opens no events file)."""

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
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk: one line (a resume cuts a half-written record: truncate_metrics)
            from training.errors import UserError
            from training.outdir import oserror_line
            raise UserError(oserror_line(str(self.path), err)) from None
        if self.monitor is not None and getattr(self.monitor, "enabled", False):
            kind = record.get("kind", "train")
            events = [(f"{kind}/{k}", float(v), record["step"]) for k, v in record.items()
                      if isinstance(v, (int, float)) and k not in ("step", "kind")]
            self.monitor.write_events(events)

    def size(self) -> Optional[int]:
        """Bytes written so far (rank 0; None elsewhere): what a checkpoint records, see truncate_metrics."""
        if not self.enabled:
            return None
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0


def truncate_metrics(path: Path, step: int, size: Optional[int] = None) -> None:
    """On resume, drop the records a killed process wrote after the checkpoint: they are re-done, so each record
    is in the file once. `size`: the file's length when the checkpoint was written (its meta.json's
    metrics_bytes): the file is cut there, which drops exactly the records written after the save, also those of
    the checkpoint's own step (the stage transition that follows a checkpoint at a stage's end, re-entered on
    resume). Without it (checkpoints from before it was recorded, or a file that no longer matches it), records
    with a step after `step` go; step -1 (a --resume that starts from scratch) drops every record."""
    from training.outdir import write_atomic

    if not path.is_file():
        return
    if size is not None and _is_line_end(path, size):
        os.truncate(path, size)
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if json.loads(line).get("step", 0) > step:
                continue
        except ValueError:
            continue  # a line cut short by the kill
        kept.append(line if line.endswith("\n") else line + "\n")
    write_atomic(path, "".join(kept))


def _is_line_end(path: Path, size: int) -> bool:
    """Whether `size` bytes of `path` end a line (or are none): a record boundary the file still has."""
    if not isinstance(size, int) or size < 0 or size > path.stat().st_size:
        return False
    if size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) == b"\n"


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
