"""Shared helpers: availability checks, seeds, launch configs."""
import os

import torch

try:
    import triton
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the model must still import (and fall back) without triton
    triton = None
    HAS_TRITON = False

# triton.jit decides compiled-vs-interpreted when a kernel is *defined*, so what
# matters is the env at import time of the kernel modules, not at call time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# bf16 tl.dot is wrong under the CPU interpreter (triton 3.9), so it is refused there.
_INTERP_DTYPES = (torch.float32, torch.float16)


def triton_available(device, dtype):
    """(ok, reason) for running a Triton kernel on `device` with `dtype`."""
    if not HAS_TRITON:
        return False, "triton is not installed"
    device = torch.device(device)
    if device.type == "cuda":
        if INTERPRET:
            return False, "TRITON_INTERPRET=1 is set; interpreted kernels need CPU tensors"
        if not torch.cuda.is_available():
            return False, "CUDA device requested but torch.cuda is not available"
        if dtype not in _GPU_DTYPES:
            return False, f"unsupported dtype {dtype}"
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return False, "bf16 not supported on this GPU"
        return True, "triton on CUDA"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return False, "CPU tensors need the triton interpreter: TRITON_INTERPRET=1 is not set"
        if not INTERPRET:
            return False, ("TRITON_INTERPRET=1 was set after kernels were imported; "
                           "they are bound as compiled GPU kernels")
        if dtype not in _INTERP_DTYPES:
            return False, f"{dtype} is not supported by the triton CPU interpreter (fp32/fp16 only)"
        return True, "triton interpreter on CPU (slow; for testing)"
    return False, f"unsupported device type {device.type}"


def draw_seed():
    """Philox seed from torch's default CPU generator, so torch.manual_seed reproduces it."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def dot_precision(dtype):
    # fp32 inputs must not silently go through tf32, or fp32 results drift ~1e-3.
    return "ieee" if dtype == torch.float32 else "tf32"


def maybe_autotune(configs, key):
    """triton.autotune on a GPU; identity under the interpreter (block sizes passed explicitly)."""
    def deco(fn):
        if INTERPRET or not HAS_TRITON:
            return fn
        return triton.autotune(configs=configs, key=key)(fn)
    return deco
