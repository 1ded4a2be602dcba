"""Tells a seeded dataset which epoch starts, so its items differ from one epoch to the next."""

from __future__ import annotations

from ignite.engine import Engine, Events

__all__ = ["DatasetEpochHandler"]


class DatasetEpochHandler:
    """Call ``dataset.set_epoch(epoch)`` (epochs counted from 0) when each of the engine's epochs starts.

    The counterpart of ``DistributedSampler.set_epoch`` for datasets whose items are drawn from ``(seed, epoch,
    index)``, such as ``common.data.RandomEpisodeDataset`` and ``common.data.MixedEpisodeDataset``. It runs in the
    main process before the epoch's data iterator starts its workers (non-persistent workers, the default), so
    they see the new epoch; a resumed run continues with the epoch it resumes at.

    Args:
        dataset: anything with a ``set_epoch(int)`` method.
    """

    def __init__(self, dataset) -> None:
        if not callable(getattr(dataset, "set_epoch", None)):
            raise ValueError(f"dataset should have a set_epoch method, got {type(dataset).__name__}.")
        self.dataset = dataset

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.dataset.set_epoch(engine.state.epoch - 1)
