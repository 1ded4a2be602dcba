"""A wrapper that leaves out class channels marked as unused (padding) before a segmentation loss."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

__all__ = ["IgnoreChannelsLoss"]


class IgnoreChannelsLoss(_Loss):
    """Apply a per-channel binary loss only to the channels whose target is not ``ignore_value``.

    Episodes hold a fixed number of class channels so that they batch; channels with no class behind them are filled
    with ``ignore_value`` in the target and left out here, like ``ignore_index`` in cross-entropy. Every kept
    channel becomes its own sample, so a Dice loss averages over classes.

    Args:
        loss: a loss over ``(N, 1, *spatial)`` logits and targets, e.g. ``DiceCELoss(sigmoid=True)``.
        ignore_value: target value marking an unused channel. Default -1.

    Shapes:
        ``input`` logits ``(B, K, *spatial)``, ``target`` ``(B, K, *spatial)`` -> scalar.
    """

    def __init__(self, loss: _Loss, ignore_value: float = -1.0) -> None:
        super().__init__()
        self.loss = loss
        self.ignore_value = ignore_value

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if input.shape != target.shape:
            raise ValueError(f"input and target should have the same shape, got {input.shape} and {target.shape}.")
        keep = (target.flatten(2) != self.ignore_value).any(-1)  # (B, K)
        if not bool(keep.any()):
            raise ValueError("every channel of the target is ignored; an episode needs at least one class.")
        return self.loss(input[keep].unsqueeze(1), target[keep].unsqueeze(1).to(input.dtype))
