"""What a benchmark records about the machine it ran on: peak memory per block, the matmul peak rate (the MFU
denominator) and the machine's description. Shared by the throughput and MSLT tools and compare."""
from __future__ import annotations

import os
import platform
import re
import resource
import time
from pathlib import Path
from typing import Optional

import torch


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class MemoryProbe:
    """Peak memory over a block; see the module docstring for what is measured on each device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.can_reset_rss = False
        if device.type != "cuda":
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.can_reset_rss = _proc_status_kb("VmHWM") is not None
            except OSError:
                self.can_reset_rss = False

    @property
    def description(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated per block (reset_peak_memory_stats before it)"
        if self.can_reset_rss:
            return ("CPU process peak RSS per block: VmHWM from /proc/self/status, reset via /proc/self/clear_refs "
                    "before the block (whole process: both models and optimizers resident)")
        return "CPU process lifetime peak RSS (resource.getrusage ru_maxrss; cannot be reset per block)"

    def start(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device)
        if self.can_reset_rss:
            Path("/proc/self/clear_refs").write_text("5")
        return (_proc_status_kb("VmRSS") or 0) * 1024

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated(self.device)
        if self.can_reset_rss:
            return (_proc_status_kb("VmHWM") or 0) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------ peak

def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: Optional[int] = None,
                       seconds: float = 1.0) -> float:
    """Best observed rate of a square matmul (2 n^3 FLOPs) in `dtype`, over ~`seconds` of trials."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    trials = 0
    while trials < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
        trials += 1
    return 2 * size**3 / best / 1e12


def machine_info(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        import deepspeed
        import transformers

        info["deepspeed"], info["transformers"] = deepspeed.__version__, transformers.__version__
    except Exception:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    return info
