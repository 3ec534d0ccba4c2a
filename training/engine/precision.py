"""`train.precision: auto`: bf16 where the device computes it natively, else fp32.

A CPU without bf16 instructions (no AMX, AVX512-BF16 or Arm BF16) runs PyTorch's bf16 matmuls emulated: on
an AMD EPYC with AVX2 only, 1.2 GFLOP/s in bf16 against 32 in fp32 (one thread, 4096x128 @ 128x512), so
the default job's bf16 would be about 25x slower there than fp32. PyTorch has no public "is bf16 fast on this
CPU" query (torch.backends.cpu.get_cpu_capability() says AVX2/AVX512, not whether AVX512 has BF16), so the
CPU's own flags decide, read from /proc/cpuinfo (no file, e.g. macOS: fp32).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

# x86: AMX tiles and AVX512-BF16 ("flags"); Arm: the BF16 extension ("Features").
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def cpu_bf16_flags(cpuinfo: Optional[str] = None) -> list[str]:
    """The bf16 instruction flags of this CPU (`cpuinfo`: the text of /proc/cpuinfo; read when None)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return [f for f in CPU_BF16_FLAGS if f in flags]


def device_bf16(cuda: Optional[bool] = None, cpuinfo: Optional[str] = None) -> tuple[bool, str]:
    """Whether the training device (CUDA when there is one, as pretrain picks it) computes bf16 natively,
    and why, in words."""
    if torch.cuda.is_available() if cuda is None else cuda:
        name = torch.cuda.get_device_name()
        if not torch.cuda.is_bf16_supported():
            return False, f"{name} has no bf16 (compute capability below 8.0)"
        return True, f"{name} computes bf16 natively"
    flags = cpu_bf16_flags(cpuinfo)
    if flags:
        return True, f"this CPU computes bf16 natively ({', '.join(flags)})"
    return False, ("this CPU has no bf16 instructions (no AMX, AVX512-BF16 or Arm BF16): PyTorch emulates bf16 "
                   "matmuls, about 25x slower than fp32")


def resolve_precision(precision: str, cuda: Optional[bool] = None, cpuinfo: Optional[str] = None) -> str:
    """`auto` -> bf16 or fp32 by `device_bf16`; an explicit precision is kept."""
    if precision != "auto":
        return precision
    return "bf16" if device_bf16(cuda, cpuinfo)[0] else "fp32"
