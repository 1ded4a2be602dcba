"""Training checkpoints: resumable full-state checkpoints (``checkpoint_epoch=N.pt``) and the final weights file."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from common.bundle.args import as_bool, user_error

__all__ = ["FinalWeights", "ResumableCheckpoint", "checkpoint_pattern", "latest_checkpoint"]

logger = logging.getLogger(__name__)


def checkpoint_pattern(file_prefix: str = "") -> str:
    """Glob of the training checkpoints MONAI's ``CheckpointSaver`` writes with ``file_prefix``:
    ``checkpoint_epoch=N.pt``, or ``<file_prefix>_checkpoint_epoch=N.pt`` with a prefix (``stage2_...``)."""
    return f"{file_prefix}_checkpoint_epoch=*.pt" if file_prefix else "checkpoint_epoch=*.pt"


def latest_checkpoint(save_dir: str | os.PathLike, file_prefix: str = "") -> str | None:
    """The newest checkpoint of ``file_prefix`` (:func:`checkpoint_pattern`) in ``save_dir``, or None."""
    files = glob.glob(os.path.join(glob.escape(str(save_dir)), checkpoint_pattern(file_prefix)))
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
        file_prefix: checkpoint file prefix; files are ``checkpoint_epoch=N.pt`` without one and
            ``<file_prefix>_checkpoint_epoch=N.pt`` with one. Default ``""``.
        outputs: other files of ``save_dir`` the run writes (its best-model file, e.g. ``model.pt``).
        overwrite: a run that does not resume refuses to start when ``save_dir`` holds ``outputs`` or checkpoints
            it did not write (the bundle's shipped ``models/model.pt`` above all), unless this is set.
            Default False.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping,
        resume: bool = False,
        save: bool = True,
        save_interval: int = 1,
        file_prefix: str = "",
        outputs: Sequence[str] = (),
        overwrite: bool = False,
    ) -> None:
        self.save_dir = str(save_dir)
        self.save_dict = dict(save_dict)
        self.resume = as_bool(resume, "resume")
        self.save = save
        self.save_interval = save_interval
        self.file_prefix = file_prefix
        self.outputs = [str(o) for o in outputs]
        self.overwrite = as_bool(overwrite, "overwrite")

    def attach(self, engine: Engine) -> None:
        if self.save and not self.resume and not self.overwrite:  # checked as training starts, not when it is built
            engine.add_event_handler(Events.STARTED, self._refuse_existing)
        save_dict = {**self.save_dict, "trainer": engine}
        if self.resume:
            path = latest_checkpoint(self.save_dir, self.file_prefix)
            if path is None:
                raise FileNotFoundError(
                    f"resume requested but {self.save_dir} holds no {checkpoint_pattern(self.file_prefix)}.")
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

    def _refuse_existing(self, engine: Engine) -> None:
        folder = Path(self.save_dir)
        existing = [str(folder / o) for o in self.outputs if (folder / o).exists()]
        existing += sorted(glob.glob(os.path.join(glob.escape(str(folder)), checkpoint_pattern(self.file_prefix))))
        if existing:
            raise user_error(
                f"{self.save_dir} already holds {', '.join(existing)}; training would replace them. Choose another "
                "--ckpt_dir, continue that run with --resume true, or pass --overwrite true.", FileExistsError)


class FinalWeights:
    """Write the network's ``state_dict`` to ``path`` when training completes, floating-point tensors in ``dtype``.

    For a bundle's ``models/model.pt`` where half precision keeps the file small enough to ship (the report
    labeler's); loading casts back to the network's precision. Guard the file with :class:`ResumableCheckpoint`'s
    ``outputs`` so a run never replaces weights it did not write.

    Args:
        network: the trained module (under DDP, the wrapped module).
        path: output file.
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"``. Default ``"float16"``.
        save: write the file (only rank 0 should, under DDP).
    """

    def __init__(self, network, path: str | os.PathLike, dtype: str = "float16", save: bool = True) -> None:
        if dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"dtype should be float16, bfloat16 or float32, got {dtype!r}.")
        self.network, self.path, self.dtype, self.save = network, Path(path), getattr(torch, dtype), save

    def attach(self, engine: Engine) -> None:
        if self.save:
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        module = getattr(self.network, "module", self.network)
        state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.path)
        logger.info("weights written to %s (%.1f MB)", self.path, self.path.stat().st_size / 1e6)
