"""ultralytics' ``DetectionTrainer`` as the bundle runs it: no third-party integrations, optional EMA, TensorBoard.

This module imports ultralytics at import time, so only :class:`common.engines.yolo.UltralyticsTrainer` imports it,
inside ``run`` and after :func:`common.yolo_env.import_ultralytics`; no package ``__init__`` does. Its names are
module-level so that ultralytics' DDP launcher, which pickles the trainer class and its callbacks by reference,
rebuilds the same trainer in each worker process.
"""

from __future__ import annotations

from pathlib import Path

from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import RANK

__all__ = ["BundleDetectionTrainer", "disable_ema", "log_tensorboard", "close_tensorboard"]

_KEPT_MODULES = ("ultralytics.utils.callbacks.base", __name__)


class BundleDetectionTrainer(DetectionTrainer):
    """``DetectionTrainer`` keeping only ultralytics' default callbacks and this module's.

    ultralytics adds callbacks for the integrations enabled in its settings (MLflow, which writes into the working
    directory, Comet, ClearML, DVC, Ray Tune, W&B, Platform uploads and usage events); the bundle logs itself, so
    they are removed, in the launching process and in each DDP worker alike.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for event, functions in self.callbacks.items():
            self.callbacks[event] = [f for f in functions if getattr(f, "__module__", None) in _KEPT_MODULES]


def _no_decay(_updates: int) -> float:
    return 0.0


def disable_ema(trainer: DetectionTrainer) -> None:
    """``on_pretrain_routine_end``: the EMA copy follows the weights exactly (decay 0), so checkpoints, which
    ultralytics always takes from the EMA copy, hold the trained weights themselves."""
    if trainer.ema is not None:
        trainer.ema.decay = _no_decay


def log_tensorboard(trainer: DetectionTrainer) -> None:
    """``on_fit_epoch_end``: training losses, validation metrics and learning rates to TensorBoard in the
    trainer's ``project`` folder (the bundle's ``output_dir``)."""
    if RANK not in {-1, 0}:
        return
    writer = getattr(trainer, "_bundle_tb_writer", None)
    if writer is None:
        from torch.utils.tensorboard import SummaryWriter

        writer = trainer._bundle_tb_writer = SummaryWriter(str(Path(trainer.args.project)))
    scalars = {**trainer.label_loss_items(trainer.tloss, prefix="train"), **(trainer.metrics or {}),
               **getattr(trainer, "lr", {})}
    for name, value in scalars.items():
        writer.add_scalar(name, float(value), trainer.epoch + 1)
    writer.flush()


def close_tensorboard(trainer: DetectionTrainer) -> None:
    """``teardown``: close the TensorBoard writer."""
    writer = getattr(trainer, "_bundle_tb_writer", None)
    if writer is not None:
        writer.close()
        trainer._bundle_tb_writer = None
