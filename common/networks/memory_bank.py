"""IRIS's class memory bank: a running mean of each named class's task embedding (no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ClassMemoryBank"]


class ClassMemoryBank(nn.Module):
    """Exponential moving average of task embeddings per named class.

    Every class seen in training gets a slot holding the EMA of its task embeddings
    (``e <- momentum * e + (1 - momentum) * new``; the first update copies ``new``). The class names travel in
    the module's ``state_dict`` (as extra state), so a saved checkpoint can segment a known class by name with no
    reference image at all.

    Args:
        num_tokens: tokens per task embedding, ``m + 1`` for IRIS.
        embed_dim: channels per token.
        capacity: maximum number of classes. Default 128.
        momentum: EMA momentum in ``[0, 1)``. Default 0.999.

    Example::

        bank = ClassMemoryBank(num_tokens=9, embed_dim=256)
        bank.update(["liver"], torch.randn(1, 9, 256))
        bank.retrieve(["liver"]).shape  # (1, 9, 256)
    """

    # bookkeeping for training and retrieval only; TorchScript export keeps just the buffers
    __jit_unused_properties__ = ["known_classes"]

    def __init__(self, num_tokens: int, embed_dim: int, capacity: int = 128, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum should be in [0, 1), got {momentum}.")
        if capacity < 1:
            raise ValueError(f"capacity should be a positive integer, got {capacity}.")
        self.momentum = momentum
        self.register_buffer("embeddings", torch.zeros(capacity, num_tokens, embed_dim))
        self.register_buffer("counts", torch.zeros(capacity, dtype=torch.long))
        self.class_names: list[str] = []

    @property
    def known_classes(self) -> list[str]:
        """Names of the classes that hold at least one update."""
        return [n for i, n in enumerate(self.class_names) if int(self.counts[i]) > 0]

    def register(self, names: Sequence[str]) -> torch.Tensor:
        """Give each new name a slot (in the order given) and return the slot index of every name."""
        new = list(dict.fromkeys(n for n in names if n not in self.class_names))
        if len(self.class_names) + len(new) > self.embeddings.shape[0]:
            raise ValueError(
                f"memory bank is full ({self.embeddings.shape[0]} classes); cannot add classes {new}."
            )
        for name in names:
            if name not in self.class_names:
                self.class_names.append(str(name))
        return torch.tensor([self.class_names.index(n) for n in names], dtype=torch.long)

    @torch.no_grad()
    def update(self, names: Sequence[str], embeddings: torch.Tensor) -> None:
        """EMA-update the slots of ``names`` with ``embeddings`` of shape ``(len(names), T, C)``.

        A name given more than once is updated once, with the mean of its embeddings.
        """
        if embeddings.shape[0] != len(names) or embeddings.shape[1:] != self.embeddings.shape[1:]:
            raise ValueError(
                f"embeddings should have shape ({len(names)}, {tuple(self.embeddings.shape[1:])}), "
                f"got {tuple(embeddings.shape)}."
            )
        ids = self.register(names).to(self.embeddings.device)
        unique, inverse = torch.unique(ids, return_inverse=True)
        summed = torch.zeros(len(unique), *embeddings.shape[1:], device=ids.device, dtype=self.embeddings.dtype)
        summed.index_add_(0, inverse, embeddings.detach().to(summed))
        new = summed / torch.bincount(inverse, minlength=len(unique)).clamp_min(1).view(-1, 1, 1).to(summed)
        first = (self.counts[unique] == 0).view(-1, 1, 1)
        old = self.embeddings[unique]
        self.embeddings[unique] = torch.where(first, new, self.momentum * old + (1.0 - self.momentum) * new)
        self.counts[unique] += 1

    def retrieve(self, names: Sequence[str]) -> torch.Tensor:
        """Stored embeddings of ``names`` as ``(len(names), T, C)``; unknown names raise ``KeyError``."""
        known = self.known_classes
        missing = [n for n in names if n not in known]
        if missing:
            raise KeyError(f"classes {missing} are not in the memory bank; known classes: {known}.")
        ids = torch.tensor([self.class_names.index(n) for n in names], device=self.embeddings.device)
        return self.embeddings[ids].clone()

    def get_extra_state(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names), "momentum": self.momentum}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.class_names = list(state.get("class_names", []))
        self.momentum = float(state.get("momentum", self.momentum))
