"""Inference of 2D box detectors that output YOLO-style predictions: letterbox, NMS, test-time augmentation.

Coordinates: boxes are ``(x0, y0, x1, y1)`` in pixels with ``x`` along columns and pixel ``(r, c)`` spanning
``[c, c + 1) x [r, r + 1)``, as in ``common.data`` and ``common.visualize``. Images enter in MONAI's 2D layout
``(B, C, W, H)`` (first spatial axis = columns, as ``LoadImage`` gives them) and are transposed to the networks'
``(B, C, H, W)`` here, so returned boxes are in the pixel grid of the image the reader returned.

The letterbox is ultralytics' (``LetterBox``, which trains the detector: same content size and offset) done on
batched tensors on the network's device, and the NMS is ``torchvision.ops.batched_nms`` per class, keeping what
ultralytics' ``non_max_suppression`` keeps; ``tests/yolo/test_agreement.py`` checks both against ultralytics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import look_up_option
from torchvision.ops import batched_nms

from common.bundle.args import as_bool
from common.data.boxes import fuse_boxes_wbf

__all__ = [
    "Letterbox",
    "YOLODetectionInferer",
    "boxes_to_original",
    "letterbox",
    "letterbox_geometry",
    "non_max_suppression",
]

PAD_VALUE = 114.0 / 255.0  # ultralytics pads letterboxes and mosaics with grey 114
TTA_MERGE = ("nms", "wbf")


@dataclass(frozen=True)
class Letterbox:
    """Where an ``height x width`` image lies in a ``size x size`` letterbox: content ``(new_h, new_w)`` at offset
    ``(top, left)``."""

    height: int
    width: int
    size: int
    new_h: int
    new_w: int
    top: int
    left: int


def letterbox_geometry(height: int, width: int, size: int) -> Letterbox:
    """Fit ``height x width`` into a ``size`` square keeping the aspect ratio, centred (extra pixel right/bottom).

    Example:
        >>> letterbox_geometry(100, 200, 64)
        Letterbox(height=100, width=200, size=64, new_h=32, new_w=64, top=16, left=0)
    """
    if min(height, width, size) < 1:
        raise ValueError(f"height, width and size should be positive, got {height}, {width}, {size}.")
    ratio = min(size / height, size / width)
    new_h, new_w = min(size, max(1, round(height * ratio))), min(size, max(1, round(width * ratio)))
    return Letterbox(height, width, size, new_h, new_w, (size - new_h) // 2, (size - new_w) // 2)


def letterbox(images: torch.Tensor, size: int, pad_value: float = PAD_VALUE) -> tuple[torch.Tensor, Letterbox]:
    """Resize ``(B, C, H, W)`` images into a ``size`` square letterbox (bilinear, antialiased when shrinking)."""
    geometry = letterbox_geometry(images.shape[-2], images.shape[-1], size)
    content = images.float()
    if (geometry.new_h, geometry.new_w) != tuple(images.shape[-2:]):
        shrink = geometry.new_h < images.shape[-2]
        content = F.interpolate(content, (geometry.new_h, geometry.new_w), mode="bilinear", align_corners=False,
                                antialias=shrink)
    out = content.new_full((*images.shape[:-2], size, size), pad_value)
    out[..., geometry.top: geometry.top + geometry.new_h, geometry.left: geometry.left + geometry.new_w] = content
    return out, geometry


def boxes_to_original(boxes: torch.Tensor, geometry: Letterbox) -> torch.Tensor:
    """Map ``(N, 4)`` boxes from letterbox pixels to the original image's pixels, clipped to the image.

    Example (a 100x200 image in a 64 letterbox: scale 0.32, content rows 16..48):
        >>> boxes_to_original(torch.tensor([[0.0, 16.0, 32.0, 32.0]]), letterbox_geometry(100, 200, 64))
        tensor([[  0.,   0., 100.,  50.]])
    """
    sx, sy = geometry.width / geometry.new_w, geometry.height / geometry.new_h
    out = boxes.float().clone()
    out[:, 0::2] = ((out[:, 0::2] - geometry.left) * sx).clamp(0, geometry.width)
    out[:, 1::2] = ((out[:, 1::2] - geometry.top) * sy).clamp(0, geometry.height)
    return out


def non_max_suppression(
    predictions: torch.Tensor,
    conf_threshold: float = 0.25,
    iou_threshold: float = 0.7,
    max_detections: int = 300,
    class_agnostic: bool = False,
    max_candidates: int = 30000,
) -> list[torch.Tensor]:
    """Per-class NMS of YOLO outputs ``(B, 4 + K, A)`` (centre x, centre y, w, h, K class scores) ->
    ``B`` tensors ``(N, 6)``: ``x0, y0, x1, y1, score, class``, by decreasing score. Each anchor votes for its best
    class (no multi-label)."""
    out = []
    for pred in predictions.float().transpose(-1, -2):  # (A, 4 + K)
        scores, classes = pred[:, 4:].max(dim=1)
        keep = scores > conf_threshold
        pred, scores, classes = pred[keep], scores[keep], classes[keep]
        if len(scores) > max_candidates:
            top = scores.topk(max_candidates).indices
            pred, scores, classes = pred[top], scores[top], classes[top]
        centre, half = pred[:, :2], pred[:, 2:4] / 2
        boxes = torch.cat([centre - half, centre + half], dim=1)
        groups = torch.zeros_like(classes) if class_agnostic else classes
        kept = batched_nms(boxes, scores, groups, iou_threshold)[:max_detections]
        out.append(torch.cat([boxes[kept], scores[kept, None], classes[kept, None].float()], dim=1))
    return out


def _flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    flipped = boxes.clone()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return flipped


class YOLODetectionInferer(Inferer):
    """Letterbox, run a YOLO network, NMS, and return boxes in the input image's pixels.

    Test-time augmentation runs one pass per ``scale`` of ``tta_scales`` (letterbox side ``image_size * scale``
    rounded to ``stride``), each also horizontally flipped when ``tta_flip``; the passes' detections, mapped back to
    the image, are merged by class-wise NMS (``"nms"``) or weighted box fusion (``"wbf"``:
    ``common.data.boxes.fuse_boxes_wbf``, a box seen in k of n passes scores its mean score times k / n).

    Args:
        image_size: letterbox side, a multiple of ``stride``. Default 256.
        conf_threshold: smallest class score kept (0.001 for mAP, 0.25 to report findings). Default 0.25.
        iou_threshold: NMS IoU threshold. Default 0.7.
        max_detections: detections kept per image. Default 300.
        class_agnostic: one NMS over all classes. Default False.
        tta_scales: letterbox scales of the passes. Default ``(1.0,)``: no scale augmentation.
        tta_flip: add horizontally flipped passes. Default False.
        tta_merge: ``"wbf"`` or ``"nms"``. Default ``"wbf"``.
        wbf_iou_threshold: IoU at which WBF fuses boxes across passes. Default 0.55.
        stride: the network's largest stride. Default 32.
        pad_value: letterbox padding in [0, 1] intensity. Default 114/255, as in training.
        fuse_network: on the first call, fold the network's batch norms (``YOLODetector.fuse``) for speed; only for
            networks whose weights are loaded once, before inference. Default False.
        channels_last: on the first call, store the network's weights channels-last (NHWC), which oneDNN on x86
            CPUs and CUDA convolutions run faster (as ultralytics' predictor does); weights still load as before.
            Default False.

    ``__call__(inputs (B, C, W, H), network) -> (B, N, 6)``: rows ``x0, y0, x1, y1, score, class`` by decreasing
    score; an image with fewer than ``N`` detections is padded with rows of class ``-1`` and score 0.
    """

    def __init__(
        self,
        image_size: int = 256,
        conf_threshold: float = 0.25,
        iou_threshold: float = 0.7,
        max_detections: int = 300,
        class_agnostic: bool = False,
        tta_scales: Sequence[float] = (1.0,),
        tta_flip: bool = False,
        tta_merge: str = "wbf",
        wbf_iou_threshold: float = 0.55,
        stride: int = 32,
        pad_value: float = PAD_VALUE,
        fuse_network: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if image_size < stride or image_size % stride:
            raise ValueError(f"image_size should be a positive multiple of {stride}, got {image_size}.")
        if not 0.0 <= conf_threshold < 1.0 or not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"conf_threshold should be in [0, 1) and iou_threshold in (0, 1], got {conf_threshold} "
                             f"and {iou_threshold}.")
        if not tta_scales or any(s <= 0 for s in tta_scales):
            raise ValueError(f"tta_scales should be positive numbers, got {tta_scales}.")
        self.image_size, self.stride = int(image_size), int(stride)
        self.conf_threshold, self.iou_threshold = float(conf_threshold), float(iou_threshold)
        self.max_detections, self.class_agnostic = int(max_detections), as_bool(class_agnostic, "class_agnostic")
        self.sizes = sorted({max(stride, round(image_size * s / stride) * stride) for s in tta_scales})
        self.flips = (False, True) if as_bool(tta_flip, "tta_flip") else (False,)
        self.tta_merge = look_up_option(tta_merge, TTA_MERGE)
        self.wbf_iou_threshold = float(wbf_iou_threshold)
        self.pad_value = float(pad_value)
        self.fuse_network, self.channels_last = bool(fuse_network), bool(channels_last)
        self._prepared: set[int] = set()

    def _pass(self, pictures: torch.Tensor, network: Callable, size: int, flip: bool) -> list[torch.Tensor]:
        boxed, geometry = letterbox(pictures, size, self.pad_value)
        if flip:
            boxed = boxed.flip(-1)
        found = non_max_suppression(network(boxed), self.conf_threshold, self.iou_threshold, self.max_detections,
                                    self.class_agnostic)
        for det in found:
            if flip:
                det[:, :4] = _flip_boxes(det[:, :4], size)
            det[:, :4] = boxes_to_original(det[:, :4], geometry)
        return found

    def _merge(self, passes: list[torch.Tensor]) -> torch.Tensor:
        if len(passes) == 1:
            return passes[0]
        det = torch.cat(passes)
        if self.tta_merge == "nms":
            groups = torch.zeros_like(det[:, 5]) if self.class_agnostic else det[:, 5]
            return det[batched_nms(det[:, :4], det[:, 4], groups, self.iou_threshold)[: self.max_detections]]
        boxes, scores, labels = fuse_boxes_wbf(det[:, :4].cpu().double().numpy(), det[:, 4].cpu().double().numpy(),
                                               det[:, 5].cpu().long().numpy(), self.wbf_iou_threshold,
                                               num_readers=len(passes))
        fused = torch.cat([torch.as_tensor(boxes), torch.as_tensor(scores)[:, None], torch.as_tensor(labels)[:, None]],
                          dim=1).to(det)
        return fused[fused[:, 4].argsort(descending=True)][: self.max_detections]

    def _prepare(self, network: Callable) -> None:
        """Fuse and convert the network once, on its first use by this inferer."""
        if id(network) in self._prepared:
            return
        if self.fuse_network and hasattr(network, "fuse") and not getattr(network, "fused", True):
            network.fuse()
        if self.channels_last and isinstance(network, torch.nn.Module):
            network.to(memory_format=torch.channels_last)
        self._prepared.add(id(network))

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> torch.Tensor:
        self._prepare(network)
        plain = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        pictures = plain.transpose(-1, -2)  # MONAI (B, C, W, H) -> (B, C, H, W)
        per_pass = [self._pass(pictures, network, size, flip) for size in self.sizes for flip in self.flips]
        found = [self._merge([p[i] for p in per_pass]) for i in range(pictures.shape[0])]
        rows = max((len(d) for d in found), default=0)
        out = torch.zeros((len(found), rows, 6), device=pictures.device)
        out[..., 5] = -1
        for i, det in enumerate(found):
            out[i, : len(det)] = det
        return out
