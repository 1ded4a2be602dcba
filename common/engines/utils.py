"""Small helpers shared by the engines, whatever model they drive."""

from __future__ import annotations

import torch

__all__ = ["unwrap"]


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    return getattr(network, "module", network)
