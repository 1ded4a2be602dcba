"""ultralytics' ``DetectionTrainer`` as the bundle runs it: no third-party integrations, optional EMA, TensorBoard,
MLflow through MONAI's ``MLFlowHandler``.

This module imports ultralytics at import time, so only :class:`common.yolo.trainer.UltralyticsTrainer` imports it,
inside ``run`` and after :func:`common.yolo.env.import_ultralytics`; no package ``__init__`` does. Its names are
module-level so that ultralytics' DDP launcher, which pickles the trainer class and its callbacks by reference,
rebuilds the same trainer in each worker process.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

from monai.handlers import MLFlowHandler
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils import RANK

__all__ = ["BundleDetectionTrainer", "disable_ema", "log_tensorboard", "close_tensorboard", "MLflowEpochLogger",
           "mlflow_tracking"]

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


class MLflowEpochLogger:
    """ultralytics callbacks logging into one MLflow run: ``on_pretrain_routine_end`` logs ultralytics' arguments as
    parameters, ``on_fit_epoch_end`` the training losses, validation metrics (``metrics/mAP50B``,
    ``metrics/mAP50-95B``...; MLflow names allow no brackets) and learning rates at step ``epoch + 1``, and the
    validation of the best weights after training at step ``epochs + 1``.

    It holds the tracking URI and the run id only, so it pickles into ultralytics' DDP workers, where rank 0 logs
    through a client of its own.

    Args:
        tracking_uri: the MLflow tracking URI of the run.
        run_id: the run to log into.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._client = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            import mlflow

            self._client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def log_params(self, trainer: DetectionTrainer) -> None:
        if RANK not in {-1, 0}:
            return
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH

        logged = self.client.get_run(self.run_id).data.params
        params = [Param(k, str(v)) for k, v in vars(trainer.args).items() if k not in logged]
        for start in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MAX_PARAMS_TAGS_PER_BATCH])

    def log_epoch(self, trainer: DetectionTrainer) -> None:
        if RANK not in {-1, 0}:
            return
        from mlflow.entities import Metric

        step, scalars = trainer.epoch + 1, dict(trainer.metrics or {})
        if step <= trainer.epochs:  # ultralytics' final validation of the best weights comes at step epochs + 1
            scalars.update({**trainer.label_loss_items(trainer.tloss, prefix="train"), **getattr(trainer, "lr", {})})
        timestamp = int(time.time() * 1000)
        metrics = [Metric(re.sub(r"[()]", "", k), float(v), timestamp, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)


@contextlib.contextmanager
def mlflow_tracking(trainer: DetectionTrainer, handlers: Sequence[MLFlowHandler], max_epochs: int,
                    epoch_length: int) -> Iterator[None]:
    """Around ``trainer.train()``: each ``MLFlowHandler``'s run is started as by an ignite trainer (its experiment,
    run name, ``experiment_param`` and the ``max_epochs`` and ``epoch_length`` parameters), gets
    :class:`MLflowEpochLogger`'s callbacks, and is ended as by an ignite trainer (its artifacts logged, closed when
    ``close_on_complete``); when training fails the runs are closed as ``FAILED``."""
    for handler in handlers:
        handler.start(SimpleNamespace(state=SimpleNamespace(max_epochs=max_epochs, epoch_length=epoch_length)))
        tracker = MLflowEpochLogger(handler.client.tracking_uri, handler.cur_run.info.run_id)
        trainer.add_callback("on_pretrain_routine_end", tracker.log_params)
        trainer.add_callback("on_fit_epoch_end", tracker.log_epoch)
    try:
        yield
    except BaseException:
        for handler in handlers:
            if handler.cur_run is not None:
                handler.client.set_terminated(handler.cur_run.info.run_id, "FAILED")
                handler.cur_run = None
            handler.close()
        raise
    for handler in handlers:
        handler.complete()
        if handler.close_on_complete:
            handler.close()
