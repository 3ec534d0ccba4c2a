"""The Triton kernels' entry points in a fresh process: without a GPU and without the interpreter they say they
are unavailable (and why), and the benchmark exits cleanly."""
import os
import subprocess
import sys

import pytest

from tests.helpers import paths as PATHS


def _without_triton_interpreter() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def test_unavailable_on_plain_cpu_without_interpreter():
    code = ("import torch; from kernels.attention import fused_attention_available as f; "
            "ok, why = f('cpu', torch.float32); print(ok); print(why)")
    res = subprocess.run([sys.executable, "-c", code], env=_without_triton_interpreter(), capture_output=True,
                         text=True, cwd=str(PATHS.REPO), timeout=120)
    assert res.returncode == 0, res.stderr
    ok, why = res.stdout.strip().splitlines()[-2:]
    assert ok == "False" and "TRITON_INTERPRET" in why


def test_bench_without_gpu_exits_cleanly():
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU the benchmark really runs; run it by hand")
    res = subprocess.run([sys.executable, "-m", "kernels.bench"], env=_without_triton_interpreter(),
                         cwd=str(PATHS.REPO), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "GPU" in res.stdout
