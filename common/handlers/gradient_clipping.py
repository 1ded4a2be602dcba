"""Gradient-norm clipping as an ignite handler, between the backward pass and the optimizer step."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

__all__ = ["GradientClipping"]


class GradientClipping:
    """Clip the global gradient norm of the trainer's network after each backward pass.

    Runs on ``IterationEvents.BACKWARD_COMPLETED``, before the optimizer step. Under AMP the gradients are first
    unscaled through the trainer's ``GradScaler`` (which then skips its own unscale), so the threshold is in true
    gradient units.

    Args:
        max_norm: largest allowed L2 norm of all gradients together.
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        if max_norm <= 0:
            raise ValueError(f"max_norm should be > 0, got {max_norm}.")
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        scaler = getattr(engine, "scaler", None)
        if getattr(engine, "amp", False) and scaler is not None:
            scaler.unscale_(engine.optimizer)
        engine.state.grad_norm = float(torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm))
