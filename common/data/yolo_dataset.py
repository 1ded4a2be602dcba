"""Write preprocessed detection items as an ultralytics (YOLO) data set: PNG images, label files and a data YAML."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.data.robust import ERROR_KEY, SOURCE_KEY
from common.data.vindr import yolo_lines

__all__ = ["write_yolo_data_yaml", "write_yolo_split"]

logger = logging.getLogger(__name__)


def _picture(image, max_side: int | None) -> np.ndarray:
    """A ``(C, W, H)`` image in [0, 1] (MONAI layout) as an 8-bit ``(H, W)`` array, shrunk to ``max_side``."""
    values = torch.as_tensor(image).detach().float().cpu().numpy()
    if values.ndim != 3 or values.shape[0] != 1:
        raise ValueError(f"image should be (1, W, H), got shape {tuple(values.shape)}.")
    picture = np.rint(np.clip(values[0].T, 0.0, 1.0) * 255.0).astype(np.uint8)
    height, width = picture.shape
    if max_side is not None and max(height, width) > max_side:
        # the loader would shrink it to this size anyway; area averaging keeps small lesions' contrast
        ratio = max_side / max(height, width)
        size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        picture = np.asarray(Image.fromarray(picture).resize(size, Image.BOX))
    return picture


def write_yolo_split(
    items: Iterable[Mapping], out_dir: str | os.PathLike, split: str, max_side: int | None = None
) -> dict:
    """Write ``out_dir/images/<split>/<nnnnnn>_<stem>.png`` and ``out_dir/labels/<split>/<same stem>.txt``.

    Each item is a preprocessed datalist entry: ``image`` a ``(1, W, H)`` tensor in [0, 1] in MONAI's layout (the
    grid of the original file: no spatial transform before this) and ``boxes`` ``[[class_index, x0, y0, x1, y1],
    ...]`` in that grid's pixels (``common.data`` converters); an item without ``boxes`` is background (empty label
    file). Failed items of ``common.data.ErrorTolerantDataset`` (``{"error", "source"}``) are skipped and reported.
    Images are written 8-bit, shrunk (area-averaged) so their longer side is at most ``max_side``; labels are
    normalised ``class cx cy w h`` lines, so they do not depend on that size.

    Returns:
        ``{"split", "images", "boxes", "background", "skipped": [{"source", "error"}]}``.
    """
    images_dir, labels_dir = Path(out_dir) / "images" / split, Path(out_dir) / "labels" / split
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    report = {"split": split, "images": 0, "boxes": 0, "background": 0, "skipped": []}
    for index, item in enumerate(items):
        if ERROR_KEY in item:
            report["skipped"].append({"source": item.get(SOURCE_KEY, str(index)), "error": item[ERROR_KEY]})
            continue
        image = item["image"]
        source = str(getattr(image, "meta", {}).get("filename_or_obj", f"item_{index}"))
        picture = _picture(image, max_side)
        boxes = [list(b) for b in np.asarray(item.get("boxes", []), dtype=np.float64).reshape(-1, 5).tolist()]
        boxes = [[int(b[0]), *b[1:]] for b in boxes]
        stem = f"{index:06d}_{Path(source).name.split('.')[0]}"
        Image.fromarray(picture).save(images_dir / f"{stem}.png")
        (labels_dir / f"{stem}.txt").write_text(yolo_lines(boxes, tuple(image.shape[-1:-3:-1])))
        report["images"] += 1
        report["boxes"] += len(boxes)
        report["background"] += not boxes
    for failure in report["skipped"]:
        logger.error("%s: left out of the %s images: %s", failure["source"], split, failure["error"])
    return report


def write_yolo_data_yaml(
    out_dir: str | os.PathLike, class_names: Sequence[str], splits: Mapping[str, str], channels: int = 1
) -> Path:
    """Write ``out_dir/data.yaml`` for ultralytics: ``path``, one entry per split (``{"train": "images/train",
    "val": "images/val"}``), ``channels`` and ``names``. Written as JSON, which YAML readers accept."""
    out_dir = Path(out_dir).resolve()
    data = {"path": str(out_dir), **dict(splits), "channels": int(channels), "nc": len(class_names),
            "names": [str(n) for n in class_names]}
    path = out_dir / "data.yaml"
    path.write_text(json.dumps(data, indent=4) + "\n")
    return path
