"""YOLO lesion detector: ultralytics' ``DetectionModel`` behind a MONAI-friendly ``nn.Module``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["YOLODetector", "load_yolo_state_dict"]

MODEL_FAMILIES = ("yolov3", "yolov5", "yolov6", "yolov8", "yolov9", "yolo11", "yolo12")  # NMS-based heads
STRIDE = 32  # the coarsest feature map of the P3-P5 models: input sides must be multiples of it


def load_yolo_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights of a local checkpoint as a :class:`YOLODetector` state dict (float32, keys ``model.<...>``).

    Accepts this bundle's ``model.pt`` (a state dict) or an ultralytics checkpoint (``best.pt``/``last.pt``, a
    pickled dict whose ``ema`` or ``model`` entry is the network; unpickling it needs ultralytics and runs code from
    the file, so load only checkpoints you trust).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found.")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(ckpt, Mapping):
        module = ckpt.get("ema") if isinstance(ckpt.get("ema"), nn.Module) else ckpt.get("model")
        if isinstance(module, nn.Module):
            return {f"model.{k}": v.float() if v.is_floating_point() else v for k, v in module.state_dict().items()}
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return dict(ckpt)
    raise ValueError(f"{path}: neither a state dict nor an ultralytics checkpoint.")


class YOLODetector(nn.Module):
    """A YOLO detector built from an ultralytics model YAML, for single-channel radiographs by default.

    The weight-bearing part is ``self.model``, ultralytics' ``DetectionModel`` (Redmon et al., "You Only Look Once",
    https://arxiv.org/abs/1506.02640; anchor-free decoupled heads of the v5u/v8/11 families), built from the YAML
    (random weights; nothing is downloaded) with ``ch=in_channels`` and ``nc=num_classes``. ultralytics is imported
    here, lazily, through :func:`common.yolo.env.import_ultralytics`.

    ``forward`` in eval mode returns the decoded predictions before NMS, ``(B, 4 + num_classes, A)``: per anchor the
    box centre ``x``, centre ``y``, width and height in input pixels (``x`` along columns) and one sigmoid score per
    class; ``A = sum((H / s) * (W / s))`` over the strides ``s`` in ``(8, 16, 32)``, e.g. 1344 at 256x256. In
    training mode it returns ultralytics' raw head outputs (a dict) for its loss. NMS and the mapping back to image
    coordinates live in :class:`common.engines.YOLODetectionInferer`.

    Args:
        model: an ultralytics model YAML name (``"yolov5s.yaml"``: family ``yolov5`` at scale ``s``; ``n``, ``s``,
            ``m``, ``l``, ``x`` and the ``yolov8``/``yolo11`` families likewise) or a local YAML path.
            Default ``"yolov5s.yaml"``.
        num_classes: number of lesion classes. Default 11 (``common.data.LESION_CLASSES``).
        in_channels: image channels. Default 1 (greyscale radiographs).
        weights: optional local checkpoint loaded strictly (see :func:`load_yolo_state_dict`). Default None.

    Input ``(B, in_channels, H, W)`` in [0, 1], ``H`` and ``W`` multiples of 32 ->
    ``(B, 4 + num_classes, A)`` in eval mode.

    Example::

        >>> net = YOLODetector("yolov5n.yaml", num_classes=11).eval()
        >>> net(torch.rand(1, 1, 256, 256)).shape
        torch.Size([1, 15, 1344])
    """

    def __init__(
        self,
        model: str = "yolov5s.yaml",
        num_classes: int = 11,
        in_channels: int = 1,
        weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes should be a positive integer, got {num_classes}.")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels should be 1 or 3, got {in_channels}.")
        name = str(model)
        if not (name.endswith((".yaml", ".yml")) and (Path(name).is_file() or name.startswith(MODEL_FAMILIES))):
            raise ValueError(
                f"model should be an ultralytics model YAML name such as 'yolov5s.yaml' (families {MODEL_FAMILIES}) "
                f"or a local YAML file, got '{model}'; load trained weights with 'weights'."
            )
        from common.yolo.env import import_ultralytics

        import_ultralytics()
        from ultralytics.nn.tasks import DetectionModel

        self.model = DetectionModel(name, ch=in_channels, nc=num_classes, verbose=False)
        self.num_classes = num_classes
        self.in_channels = in_channels
        if weights is not None:
            self.load_state_dict(load_yolo_state_dict(weights))

    @property
    def fused(self) -> bool:
        """Whether :meth:`fuse` has folded the batch norms."""
        return bool(self.model.is_fused())

    def fuse(self) -> YOLODetector:
        """Fold batch norms into the convolutions (as ultralytics' predictor does) for faster inference; outputs are
        unchanged up to rounding. The state dict loses the batch-norm entries, so load weights first. Returns self."""
        self.model.fuse(verbose=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input should be (B, {self.in_channels}, H, W), got {tuple(x.shape)}.")
        if x.shape[-2] % STRIDE or x.shape[-1] % STRIDE:
            raise ValueError(f"input height and width should be multiples of {STRIDE}, got {tuple(x.shape[-2:])}.")
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out
