"""Test helper (tests only): run the kernels under the Triton CPU interpreter when there is no GPU."""
import importlib
import os
import sys

_MODULES = ["kernels._common", "kernels.attention", "kernels.bias_gelu", "kernels.layernorm",
            "kernels.mlm_loss"]


def setup_kernels_for_tests():
    """Return the device the kernel tests should use ("cpu" = interpreter, or "cuda").

    Test modules set TRITON_INTERPRET=1 (when CUDA is absent) before importing triton; if a
    kernels module was already imported without it (e.g. by another test module), triton.jit
    has bound compiled kernels, so those modules are reloaded to bind interpreted ones.
    """
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    from kernels import _common
    if _common.INTERPRET != interp:
        for name in _MODULES:
            if name in sys.modules:
                importlib.reload(sys.modules[name])
    return "cpu" if interp else "cuda"


def rel_err(a, b):
    """Relative Frobenius-norm error ||a - b|| / max(||b||, 1e-3) in fp64.

    The floor keeps exactly-zero references (e.g. dq with a single key) from dividing
    rounding noise by 0."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-3)).item()
