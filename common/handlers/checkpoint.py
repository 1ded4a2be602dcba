from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping

from ignite.engine import Engine
from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = ["ResumableCheckpoint", "latest_checkpoint"]

logger = logging.getLogger(__name__)


def latest_checkpoint(save_dir: str | os.PathLike, file_prefix: str = "checkpoint") -> str | None:
    """The newest ``<file_prefix>_*.pt`` in ``save_dir``, or None."""
    files = glob.glob(os.path.join(str(save_dir), f"{file_prefix}_*.pt"))
    return max(files, key=os.path.getmtime) if files else None


class ResumableCheckpoint:
    """Save the full training state every ``save_interval`` epochs and, with ``resume``, continue from the latest.

    The trainer itself (epoch and iteration counters) joins ``save_dict`` at attach time; a config cannot name the
    trainer inside the trainer's own handler list without a circular reference.

    Args:
        save_dir: checkpoint folder.
        save_dict: objects with ``state_dict``, e.g. network, optimizer, lr scheduler.
        resume: load the latest checkpoint of ``save_dir`` before training; a missing one is an error.
        save: write checkpoints (only rank 0 should, under DDP; every rank loads).
        save_interval: epochs between saves. Default 1.
        file_prefix: checkpoint file prefix. Default ``checkpoint``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping,
        resume: bool = False,
        save: bool = True,
        save_interval: int = 1,
        file_prefix: str = "checkpoint",
    ) -> None:
        self.save_dir = str(save_dir)
        self.save_dict = dict(save_dict)
        self.resume = resume
        self.save = save
        self.save_interval = save_interval
        self.file_prefix = file_prefix

    def attach(self, engine: Engine) -> None:
        save_dict = {**self.save_dict, "trainer": engine}
        if self.resume:
            path = latest_checkpoint(self.save_dir, self.file_prefix)
            if path is None:
                raise FileNotFoundError(f"resume requested but {self.save_dir} holds no {self.file_prefix}_*.pt.")
            logger.info("resuming from %s", path)
            CheckpointLoader(load_path=path, load_dict=save_dict, map_location=engine.state.device).attach(engine)
        if not self.save:
            return
        CheckpointSaver(
            save_dir=self.save_dir,
            save_dict=save_dict,
            file_prefix=self.file_prefix,
            save_interval=self.save_interval,
            n_saved=1,
            epoch_level=True,
        ).attach(engine)
