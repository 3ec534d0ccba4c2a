"""The model's door to the Triton kernels in `kernels/`, with the eager PyTorch path as fallback.

Each kernel is a `FusedOp`: imported lazily (the model imports without triton), asked per call
whether it can run on these tensors (CUDA, or CPU under TRITON_INTERPRET=1 in fp32/fp16), and
replaced by the caller's fallback, which computes the same maths in PyTorch, when it cannot. Every
distinct reason is logged once. An import error or a failing call disables the op for the process
(a kernel that failed once would fail every step); out-of-memory is re-raised, as it is the user's
to fix. Which ops a model uses is `ModelConfig.attention == "fused"` and `ModelConfig.fused_ops`.
"""
from __future__ import annotations

import importlib
import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


class FusedOp:
    def __init__(self, name: str, module: str, function: str, probe: str, fallback_name: str = "PyTorch"):
        self.name, self.module_name, self.function_name, self.probe_name = name, module, function, probe
        self.fallback_name = fallback_name  # what the caller's fallback is, for the log line
        self.reset()

    def reset(self) -> None:
        """Forget the import, the disable flag, the probe answers and the logged reasons (tests)."""
        self._function = None
        self._probe = None
        self._verdicts: dict = {}  # (device, dtype) -> (ok, reason): asked once, not on every step
        self.disabled = False
        self.logged: set[str] = set()

    def _log_once(self, reason: str) -> None:
        if reason not in self.logged:
            self.logged.add(reason)
            log.warning("%s: fused kernel not used (%s); falling back to %s", self.name, reason, self.fallback_name)

    def _load(self) -> bool:
        if self._function is None and not self.disabled:
            try:
                module = importlib.import_module(self.module_name)
                self._function = getattr(module, self.function_name)
                self._probe = getattr(module, self.probe_name, None)
            except Exception as err:  # ImportError, AttributeError, or a Triton failure at import
                self.disabled = True
                self._log_once(f"import failed: {type(err).__name__}: {err}")
        return not self.disabled

    def available(self, tensor: torch.Tensor) -> bool:
        if not self._load():
            return False
        if self._probe is None:
            return True
        key = (tensor.device, tensor.dtype)
        if key not in self._verdicts:
            self._verdicts[key] = self._probe(tensor.device, tensor.dtype)
        ok, reason = self._verdicts[key]
        if not ok:  # depends on device/dtype: never a permanent disable
            self._log_once(reason)
        return ok

    def __call__(self, *args, fallback: Callable, **kwargs):
        """The kernel on (args, kwargs) when it can run on args[0]; else fallback(*args, **kwargs)."""
        if self.available(args[0]):
            try:
                return self._function(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # an unsupported shape etc.: don't retry (and fail) every step
                self.disabled = True
                self._log_once(f"call failed: {type(err).__name__}: {err}")
        return fallback(*args, **kwargs)


ATTENTION = FusedOp("attention", "kernels.attention", "fused_attention", "fused_attention_available", "sdpa")
BIAS_GELU = FusedOp("bias_gelu", "kernels.bias_gelu", "fused_bias_gelu", "bias_gelu_available")
RESIDUAL_LAYERNORM = FusedOp("residual_layernorm", "kernels.layernorm", "fused_add_dropout_layernorm",
                             "layernorm_available")
MLM_LOSS = FusedOp("mlm_loss", "kernels.mlm_loss", "fused_mlm_loss", "mlm_loss_available")
# Unpadded batches (training/model/unpad.py): attention over packed sequences; else per length bucket.
ATTENTION_VARLEN = FusedOp("attention_varlen", "kernels.attention", "fused_attention_varlen",
                           "fused_attention_available", "attention per length bucket")
ALL_OPS = (ATTENTION, ATTENTION_VARLEN, BIAS_GELU, RESIDUAL_LAYERNORM, MLM_LOSS)
