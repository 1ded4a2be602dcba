"""Boxes of 2D detection datalists and per-image detection outputs (JSON and PNG overlay)."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.transforms.outputs import output_path
from common.transforms.validation import source_name
from common.visualize.preview import save_overlay_2d

__all__ = ["DetectionBoxesd", "SaveDetectionsd", "detections_report"]

BOX_FORMAT = ("[x0, y0, x1, y1] in pixels of the original image, x along columns; pixel (row r, column c) spans "
              "[c, c+1) x [r, r+1)")


class DetectionBoxesd(MapTransform):
    """Datalist boxes ``[[class_index, x0, y0, x1, y1], ...]`` (``common.data`` converters) to a float tensor
    ``(N, 5)`` (``(0, 5)`` for an image without findings), so they collate and reach metrics.

    Args:
        keys: box keys. Default ``"boxes"``.
        num_classes: when given, class indices outside ``[0, num_classes)`` are refused. Default None.
        allow_missing_keys: skip absent keys (inference without ground truth).
    """

    def __init__(self, keys: KeysCollection = "boxes", num_classes: int | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            boxes = torch.as_tensor(np.asarray(d[key], dtype=np.float32).reshape(-1, 5))
            if len(boxes) and (torch.any(boxes[:, 3] < boxes[:, 1]) or torch.any(boxes[:, 4] < boxes[:, 2])):
                raise ValueError(f"{d.get('image', key)}: {key} should be [class, x0, y0, x1, y1] with x1 >= x0 and "
                                 "y1 >= y0.")
            if self.num_classes is not None and len(boxes) and (
                boxes[:, 0].min() < 0 or boxes[:, 0].max() >= self.num_classes
            ):
                raise ValueError(f"{d.get('image', key)}: {key} class indices should be in [0, {self.num_classes}), "
                                 f"got {sorted(set(boxes[:, 0].long().tolist()))}.")
            d[key] = boxes
        return d


def detections_report(source: str, image_size: Sequence[int], detections: torch.Tensor,
                      class_names: Sequence[str], score_threshold: float = 0.0) -> dict:
    """The JSON report of one image: ``detections`` rows ``(x0, y0, x1, y1, score, class)`` scoring at least
    ``score_threshold``; padding rows (class ``-1``) are dropped. ``image_size`` is ``[rows, columns]``."""
    rows = torch.as_tensor(detections).detach().float().cpu().reshape(-1, 6)
    rows = rows[(rows[:, 5] >= 0) & (rows[:, 4] >= score_threshold)]
    found = []
    for x0, y0, x1, y1, score, cls in rows.tolist():
        index = int(cls)
        found.append({
            "class": class_names[index] if index < len(class_names) else f"class_{index}",
            "class_index": index,
            "score": round(score, 4),
            "box": [round(v, 2) for v in (x0, y0, x1, y1)],
        })
    return {"source": source, "image_size": [int(s) for s in image_size], "box_format": BOX_FORMAT,
            "class_names": list(class_names), "detections": found}


class SaveDetectionsd(MapTransform):
    """Write ``<name>_<postfix>.json`` (boxes with class names and scores, see :func:`detections_report`) and
    ``<name>_<postfix>.png`` (the image with its boxes) for one image.

    Args:
        keys: ``(image_key, pred_key)``: the ``(C, W, H)`` image in MONAI's layout and its ``(N, 6)`` detections in
            that image's pixels (``YOLODetectionInferer``).
        output_dir: output folder.
        class_names: names in class-index order.
        postfix: file postfix. Default ``"detections"``.
        preview: write the PNG too. Default True.
        score_threshold: detections scoring less are left out of both files (e.g. when the inferer keeps
            low-scoring boxes for mAP). Default 0.0.
    """

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, class_names: Sequence[str],
                 postfix: str = "detections", preview: bool = True, score_threshold: float = 0.0) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys should be (image_key, pred_key), got {self.keys}.")
        self.output_dir = output_dir
        self.class_names = list(class_names)
        self.postfix = postfix
        self.preview = preview
        self.score_threshold = float(score_threshold)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image, pred = d[self.keys[0]], d[self.keys[1]]
        source = source_name(image)
        picture = np.asarray(torch.as_tensor(image).detach().float().cpu()[0]).T  # (W, H) -> (H, W)
        report = detections_report(source, picture.shape, pred, self.class_names, self.score_threshold)
        path = output_path(source, self.output_dir, self.postfix, ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=4))
        if self.preview:
            found = report["detections"]
            save_overlay_2d(
                picture, output_path(source, self.output_dir, self.postfix, ".png"),
                boxes=np.asarray([f["box"] for f in found], dtype=np.float64).reshape(-1, 4),
                labels=[f["class"] for f in found], scores=[f["score"] for f in found],
                title=f"{Path(source).name}: {len(found)} finding(s)", overwrite=True,
            )
        return d
