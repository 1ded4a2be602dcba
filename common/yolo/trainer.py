"""Training of the YOLO lesion detector by ultralytics, driven from a bundle config."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.handlers import MLFlowHandler
from torch.utils.data import DataLoader

from common.bundle.args import as_bool, user_error
from common.yolo.dataset import sample_training_images, write_yolo_data_yaml, write_yolo_split
from common.yolo.env import import_ultralytics, keep_process_state

__all__ = ["UltralyticsTrainer", "ultralytics_device"]

logger = logging.getLogger(__name__)


def ultralytics_device(device: torch.device | str | int | Sequence[int | str]) -> str:
    """ultralytics' device string: ``"cpu"``, ``"0"`` or ``"0,1"`` (several GPUs: ultralytics starts DDP itself).

    Example:
        >>> ultralytics_device(torch.device("cuda:1")), ultralytics_device([0, 1]), ultralytics_device("cpu")
        ('1', '0,1', 'cpu')
    """
    if isinstance(device, (list, tuple)):
        if not device:
            raise ValueError("device should name at least one GPU, got an empty list.")
        return ",".join(ultralytics_device(d) for d in device)
    if isinstance(device, int) and not isinstance(device, bool):
        return str(device)
    device = torch.device(device) if not (isinstance(device, str) and device.replace(",", "").isdigit()) else device
    if isinstance(device, str):
        return device
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return str(device.index or 0)
    raise ValueError(f"device should be cpu, a CUDA device or a list of GPU indices, got {device}.")


class UltralyticsTrainer:
    """Train a YOLO detector with ultralytics' trainer from MONAI datasets, and put the weights in ``ckpt_dir``.

    ``run()``:
        1. writes the training and validation items (preprocessed by the config: loaded through the shared reader,
           intensity-scaled, optionally CLAHE-equalised) as an ultralytics data set under ``output_dir/dataset``
           (``common.data.write_yolo_split``; failed items are listed in ``dataset/report.json``);
        2. trains ultralytics' ``DetectionTrainer``, which owns the YOLO loss and assigner, mosaic, mixup, warmup and
           the EMA of the weights, and validates each epoch; its run folder is ``output_dir/<run_name>``
           (``results.csv``, ``weights/best.pt`` and ``last.pt``), TensorBoard scalars go to ``output_dir``;
        3. writes ``ckpt_dir/model.pt``, the best weights as a ``common.networks.YOLODetector`` state dict in half
           precision (what the bundle's inference loads), and ``ckpt_dir/model_ultralytics.pt``, ultralytics' own
           checkpoint of them.

    Nothing is downloaded: the model comes from a YAML (random initialisation) or a local ``.pt``; AMP on CUDA uses
    bfloat16, because ultralytics' float16 path first runs ``check_amp``, which downloads ``yolo26n.pt``; ultralytics'
    integrations (MLflow, Comet, Platform...) are removed: experiment tracking goes through ``train_handlers``
    (``--tracking mlflow``). Several GPUs in ``device`` make ultralytics launch DDP workers itself
    (``torch.distributed.run``): start the bundle with plain ``python``, not ``torchrun``.

    Args:
        train_dataset, val_dataset: MONAI datasets of ``{"image": (1, W, H) in [0, 1], "boxes": [[class, x0, y0,
            x1, y1], ...]}``; ``val_dataset`` None or empty validates on the training images.
        class_names: lesion classes, in class-index order.
        output_dir: folder of the exported data set, the ultralytics run and TensorBoard logs.
        ckpt_dir: folder of ``model.pt`` and ``model_ultralytics.pt``.
        model: ultralytics model YAML (``"yolov5n.yaml"``...) or a local ``.pt`` to start from. Default
            ``"yolov5s.yaml"``.
        max_epochs, image_size, batch_size: training epochs, square training size, images per step.
        nominal_batch_size: gradients are accumulated to about this many images per optimizer step (ultralytics'
            ``nbs``); set it to ``batch_size`` for one step per batch on small data. Default 64.
        optimizer, learning_rate, weight_decay, warmup_epochs: ultralytics' ``optimizer``, ``lr0``,
            ``weight_decay``, ``warmup_epochs``. Defaults ``"AdamW"``, 0.001, 0.0005, 3.0.
        mosaic, close_mosaic, mixup, fliplr, scale, translate, degrees: augmentation as in ultralytics. Defaults 1.0,
            10, 0.0, 0.5, 0.5, 0.1, 0.0.
        ema: keep ultralytics' exponential moving average of the weights. Default True.
        device: ``torch.device``, ``"cpu"``, a GPU index, or a list of GPU indices (DDP). Default ``"cpu"``.
        num_workers: data loading workers (ultralytics uses 0 on CPU). Default 0.
        seed: random seed. Default 0.
        amp: bfloat16 autocast on CUDA (ignored on CPU). Default False.
        patience: early stopping after this many epochs without improvement. Default 100.
        validate_every_epoch: validate each epoch (the last one always is). Default True.
        resume: continue ``output_dir/<run_name>/weights/last.pt``. Default False.
        tensorboard: log scalars to TensorBoard in ``output_dir``. Default True.
        run_name: the ultralytics run folder's name. Default ``"ultralytics"``.
        repeat_threshold: class-aware sampling: images of classes shown in fewer than this fraction of the training
            images are repeated in the training list (:func:`common.yolo.repeat_factors`); 0 repeats nothing.
            Default 0.
        negative_fraction: "no finding" training images (no box) kept, at most this fraction of the training list;
            None keeps them all. Default None.
        pretrained: weights to start from, a local checkpoint of the same architecture (this bundle's
            ``model.pt`` or an ultralytics checkpoint, see :func:`common.networks.yolo.load_yolo_state_dict`);
            ``model`` must then be a YAML. Default None: ``model``'s own initialisation.
        overwrite: a run that does not resume refuses to start when ``ckpt_dir`` already holds ``model.pt`` or
            ``model_ultralytics.pt`` (the bundle's shipped weights above all), unless this is set. Default False.
        train_handlers: MONAI ``MLFlowHandler`` instances (what ``--tracking mlflow`` adds; ultralytics' trainer is
            no ignite engine, so other handlers are refused). Each one's run (its ``tracking_uri``,
            ``experiment_name``, ``run_name``, ``experiment_param``) gets ultralytics' arguments as parameters and,
            per epoch, the training losses, validation metrics and learning rates; its ``artifacts`` are logged and
            the run closed (``close_on_complete``) after training. Default None.
    """

    # ultralytics' trainer runs its own forward passes: a MONAI inferer would have nothing to do in training, so
    # the bundle property check does not ask the config for `train#inferer` (see check_workflow_properties)
    uses_inferer = False

    def __init__(
        self,
        train_dataset: Sequence,
        val_dataset: Sequence | None,
        class_names: Sequence[str],
        output_dir: str | os.PathLike,
        ckpt_dir: str | os.PathLike,
        model: str = "yolov5s.yaml",
        max_epochs: int = 100,
        image_size: int = 256,
        batch_size: int = 16,
        nominal_batch_size: int = 64,
        optimizer: str = "AdamW",
        learning_rate: float = 0.001,
        weight_decay: float = 0.0005,
        warmup_epochs: float = 3.0,
        mosaic: float = 1.0,
        close_mosaic: int = 10,
        mixup: float = 0.0,
        fliplr: float = 0.5,
        scale: float = 0.5,
        translate: float = 0.1,
        degrees: float = 0.0,
        ema: bool = True,
        device: torch.device | str | int | Sequence[int] = "cpu",
        num_workers: int = 0,
        seed: int = 0,
        amp: bool = False,
        patience: int = 100,
        validate_every_epoch: bool = True,
        resume: bool = False,
        tensorboard: bool = True,
        run_name: str = "ultralytics",
        pretrained: str | os.PathLike | None = None,
        overwrite: bool = False,
        repeat_threshold: float = 0.0,
        negative_fraction: float | None = None,
        train_handlers: Sequence[MLFlowHandler] | None = None,
    ) -> None:
        if max_epochs < 1 or batch_size < 1 or nominal_batch_size < 1:
            raise ValueError(f"max_epochs, batch_size and nominal_batch_size should be positive, got {max_epochs}, "
                             f"{batch_size} and {nominal_batch_size}.")
        if image_size < 32 or image_size % 32:
            raise ValueError(f"image_size should be a positive multiple of 32, got {image_size}.")
        if not class_names:
            raise ValueError("class_names should name at least one class.")
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.class_names = [str(c) for c in class_names]
        self.output_dir, self.ckpt_dir = Path(output_dir), Path(ckpt_dir)
        self.model, self.max_epochs, self.image_size = str(model), int(max_epochs), int(image_size)
        self.device = ultralytics_device(device)
        self.num_workers, self.ema, self.resume = int(num_workers), as_bool(ema, "ema"), as_bool(resume, "resume")
        self.tensorboard, self.run_name = as_bool(tensorboard, "tensorboard"), run_name
        self.pretrained = Path(pretrained) if pretrained else None
        self.overwrite = as_bool(overwrite, "overwrite")
        self.train_handlers = [h for h in train_handlers or () if h is not None]
        for handler in self.train_handlers:
            if not isinstance(handler, MLFlowHandler):
                raise ValueError("train_handlers should be monai.handlers.MLFlowHandler instances (ultralytics' "
                                 f"trainer is not an ignite engine), got {type(handler).__name__}.")
        if self.pretrained is not None and not self.model.endswith((".yaml", ".yml")):
            raise ValueError(f"pretrained weights need a model YAML to build the network, got model '{self.model}'.")
        self.amp = "bf16" if as_bool(amp, "amp") and self.device != "cpu" else False
        self.ultralytics_args = {  # typed above; ultralytics' names from here on
            "epochs": self.max_epochs, "imgsz": self.image_size, "batch": int(batch_size),
            "nbs": int(nominal_batch_size),
            "optimizer": optimizer, "lr0": float(learning_rate), "weight_decay": float(weight_decay),
            "warmup_epochs": float(warmup_epochs), "mosaic": float(mosaic), "close_mosaic": int(close_mosaic),
            "mixup": float(mixup), "fliplr": float(fliplr), "scale": float(scale), "translate": float(translate),
            "degrees": float(degrees), "seed": int(seed), "patience": int(patience),
            "val": as_bool(validate_every_epoch, "validate_every_epoch"),
        }
        self.repeat_threshold = float(repeat_threshold)
        self.negative_fraction = None if negative_fraction is None else float(negative_fraction)
        self.num_train_images, self.metrics = 0, {}

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.run_name

    def export_dataset(self) -> Path:
        """Step 1 of :meth:`run`: write the ultralytics data set; returns its ``data.yaml``."""
        root = self.output_dir / "dataset"
        shutil.rmtree(root, ignore_errors=True)  # stale images or label caches must not mix in
        reports = {}
        sources = {"train": self.train_dataset, "val": self.val_dataset}
        for split, dataset in sources.items():
            if dataset is None or len(dataset) == 0:
                continue
            loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers)
            reports[split] = write_yolo_split(loader, root, split, max_side=self.image_size)
        if not reports.get("train", {}).get("images"):
            raise ValueError("no training image could be read; see the errors above.")
        self.num_train_images = int(reports["train"]["images"])
        has_val = bool(reports.get("val", {}).get("images"))
        if not has_val:
            logger.warning("no validation image: validating on the training images.")
        train = "images/train"
        if self.repeat_threshold or self.negative_fraction is not None:
            # ultralytics reads a list file with repeated lines as repeated images: the sampling lives in the list
            listed, reports["sampling"] = sample_training_images(
                reports["train"]["files"], reports["train"]["classes"], self.repeat_threshold, self.negative_fraction,
                seed=self.ultralytics_args["seed"])
            (root / "train.txt").write_text("".join(f"{path}\n" for path in listed))
            self.num_train_images, train = len(listed), "train.txt"
            logger.info("training list: %s", reports["sampling"])
        splits = {"train": train, "val": "images/val" if has_val else "images/train"}
        for report in reports.values():  # per-image lists: the data set itself holds them
            for key in ("files", "classes"):
                report.pop(key, None)
        (root / "report.json").write_text(json.dumps(reports, indent=4))
        return write_yolo_data_yaml(root, self.class_names, splits, channels=1)

    def _overrides(self, data_yaml: Path) -> dict:
        overrides = {
            **self.ultralytics_args, "model": self.model, "data": str(data_yaml), "task": "detect", "mode": "train",
            "device": self.device, "workers": self.num_workers, "amp": self.amp, "plots": False, "pretrained": False,
            "project": str(self.output_dir.resolve()), "name": self.run_name, "exist_ok": True, "verbose": True,
        }
        if self.pretrained is not None:
            overrides["pretrained"] = str(self._pretrained_checkpoint())
        last = self.run_dir / "weights" / "last.pt"
        if self.resume and last.is_file():
            overrides["resume"] = str(last)
        elif self.resume:
            logger.warning("resume requested but %s does not exist; training from the start.", last)
        return overrides

    def _pretrained_checkpoint(self) -> Path:
        """``pretrained``'s weights as a checkpoint ultralytics starts from (``output_dir/pretrained.pt``)."""
        from common.networks.yolo import YOLODetector, load_yolo_state_dict

        net = YOLODetector(self.model, num_classes=len(self.class_names), in_channels=1)
        net.load_state_dict(load_yolo_state_dict(self.pretrained))
        path = self.output_dir / "pretrained.pt"
        torch.save({"model": net.model.float()}, path)
        logger.info("starting from the weights of %s", self.pretrained)
        return path

    def run(self) -> dict:
        """Export, train, and copy the best weights to ``ckpt_dir``; returns ultralytics' final metrics."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("LOCAL_RANK") is not None:
            raise RuntimeError("UltralyticsTrainer is running under torchrun; start it with plain python and list "
                               "the GPUs in 'device': ultralytics launches its own DDP workers.")
        weights = (self.ckpt_dir / "model.pt", self.ckpt_dir / "model_ultralytics.pt")
        existing = [str(p) for p in weights if p.exists()]
        if existing and not (self.resume or self.overwrite):
            raise user_error(f"{self.ckpt_dir} already holds {', '.join(existing)}; training would replace them. "
                             "Choose another --ckpt_dir, continue that run with --resume true, or pass --overwrite "
                             "true.", FileExistsError)
        import_ultralytics(config_dir=self.output_dir / "ultralytics_settings")
        from common.yolo.detection_trainer import (
            BundleDetectionTrainer, close_tensorboard, disable_ema, log_tensorboard, mlflow_tracking)

        self.output_dir.mkdir(parents=True, exist_ok=True)
        data_yaml = self.export_dataset()
        with keep_process_state():  # ultralytics lowers torch's threads on CPU and toggles determinism
            trainer = BundleDetectionTrainer(overrides=self._overrides(data_yaml))
            if not self.ema:
                trainer.add_callback("on_pretrain_routine_end", disable_ema)
            if self.tensorboard:
                trainer.add_callback("on_fit_epoch_end", log_tensorboard)
                trainer.add_callback("teardown", close_tensorboard)
            epoch_length = math.ceil(self.num_train_images / self.ultralytics_args["batch"])
            with mlflow_tracking(trainer, self.train_handlers, self.max_epochs, epoch_length):
                trainer.train()
        self.metrics = {k: float(v) for k, v in (trainer.metrics or {}).items()}
        self._save_weights(Path(trainer.save_dir) / "weights")
        return self.metrics

    def _save_weights(self, weights_dir: Path) -> None:
        from common.networks.yolo import load_yolo_state_dict

        best = next((p for p in (weights_dir / "best.pt", weights_dir / "last.pt") if p.is_file()), None)
        if best is None:
            raise FileNotFoundError(f"training wrote no checkpoint in {weights_dir}.")
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        # half precision, as ultralytics stores its checkpoints: loading casts to the network's float32
        state = {k: v.half() if v.is_floating_point() else v for k, v in load_yolo_state_dict(best).items()}
        torch.save(state, self.ckpt_dir / "model.pt")
        shutil.copyfile(best, self.ckpt_dir / "model_ultralytics.pt")
        logger.info("weights of %s saved as %s (and model_ultralytics.pt)", best, self.ckpt_dir / "model.pt")
