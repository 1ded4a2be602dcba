"""Keeps an in-context network's class memory bank up to date during training."""

from __future__ import annotations

from collections.abc import Sequence

import ignite.distributed as idist
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from common.engines.utils import unwrap

__all__ = ["MemoryBankUpdater"]


class MemoryBankUpdater:
    """EMA-update the network's class memory bank with each training episode's task embeddings.

    The embeddings are captured by a forward hook on the network's ``task_encoder`` (no second forward pass), and
    the episode's classes are read from ``engine.state.batch["class_ids"]`` (indices into ``class_names``; -1 for
    unused channels). Under DDP every rank gathers all ranks' embeddings, so banks stay identical.

    Args:
        class_names: the episode vocabulary (``EpisodeDataset.class_names``); registered in this order when the
            run starts (after any checkpoint is loaded), so the bank's slots match on every rank and across resumes.
        task_encoder: attribute name of the submodule whose output is ``(B, K, T, C)`` embeddings.
    """

    def __init__(self, class_names: Sequence[str], task_encoder: str = "task_encoder") -> None:
        self.class_names = list(class_names)
        self.task_encoder = task_encoder
        self._captured: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        # the trainer sets its network after attaching handlers, so hook it when the run starts
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _start(self, engine: Engine) -> None:
        net = unwrap(engine.network)
        net.memory_bank.register(self.class_names)
        if not hasattr(self, "_hook"):
            self._hook = getattr(net, self.task_encoder).register_forward_hook(self._capture)

    def _capture(self, module: torch.nn.Module, args, output: torch.Tensor) -> None:
        if module.training:
            self._captured = output.detach()

    def __call__(self, engine: Engine) -> None:
        embeddings, self._captured = self._captured, None
        if embeddings is None:
            return
        batch = engine.state.batch
        # the trainer decollates batches into a list of dicts after the forward pass
        ids = torch.stack([b["class_ids"] for b in batch]) if isinstance(batch, list) else batch["class_ids"]
        ids = ids.to(embeddings.device)
        if dist.is_available() and dist.is_initialized():
            # every rank's episodes reach every rank's bank (same batch shape on every rank, as DDP requires)
            embeddings, ids = idist.all_gather(embeddings.float()), idist.all_gather(ids)
        keep = ids >= 0
        names = [self.class_names[i] for i in ids[keep].tolist()]
        if names:
            unwrap(engine.network).memory_bank.update(names, embeddings[keep].float())
