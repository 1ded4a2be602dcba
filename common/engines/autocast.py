"""bf16 autocast for CPU training and inference, as an inferer a config can name."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer

from common.bundle.args import as_bool

__all__ = ["AutocastInferer"]


class AutocastInferer(Inferer):
    """Run ``network(inputs, *args, **kwargs)`` under ``torch.autocast`` on CPU tensors; return float32.

    MONAI's engines autocast on CUDA only (``amp=True``). CPUs with AVX512-BF16 or AMX run convolutions about
    twice as fast in bf16, so a 3D training step on CPU gains as much as a GPU's fp16 does; weights, optimizer
    state and the loss stay float32, and the prediction is cast back before the loss sees it. CUDA inputs pass
    through untouched (the engine's own ``amp`` governs them).

    Args:
        enabled: autocast on CPU; a command-line string (``'false'``) is coerced. Default True.
        dtype: autocast dtype. Default ``torch.bfloat16``.
    """

    def __init__(self, enabled: Any = True, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.enabled = as_bool(enabled, "enabled")
        self.dtype = dtype

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or inputs.device.type != "cpu":
            return network(inputs, *args, **kwargs)
        with torch.autocast("cpu", dtype=self.dtype):
            outputs = network(inputs, *args, **kwargs)
        return _to_float(outputs)


def _to_float(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float(o) for o in outputs)
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    return outputs
