"""Write preprocessed detection items as an ultralytics (YOLO) data set: PNG images, label files, a sampled training
list (rare classes repeated, "no finding" images capped) and a data YAML."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.data.robust import ERROR_KEY, SOURCE_KEY
from common.data.vindr import yolo_lines

__all__ = ["repeat_factors", "sample_training_images", "write_yolo_data_yaml", "write_yolo_split"]

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
        ``{"split", "images", "boxes", "background", "skipped": [{"source", "error"}], "files": [PNG path, ...],
        "classes": [[class indices of that image's boxes], ...]}`` (the last two for :func:`sample_training_images`).
    """
    images_dir, labels_dir = Path(out_dir) / "images" / split, Path(out_dir) / "labels" / split
    images_dir.mkdir(parents=True, exist_ok=True)
    labels_dir.mkdir(parents=True, exist_ok=True)
    report = {"split": split, "images": 0, "boxes": 0, "background": 0, "skipped": [], "files": [], "classes": []}
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
        report["files"].append(str((images_dir / f"{stem}.png").resolve()))
        report["classes"].append(sorted({b[0] for b in boxes}))
        report["boxes"] += len(boxes)
        report["background"] += not boxes
    for failure in report["skipped"]:
        logger.error("%s: left out of the %s images: %s", failure["source"], split, failure["error"])
    return report


def repeat_factors(classes: Sequence[Sequence[int]], threshold: float) -> list[float]:
    """Repeat factor of each image for class-aware sampling (LVIS's repeat-factor sampling, Gupta et al. 2019).

    A class shown in a fraction ``f_c`` of the images gets ``r_c = max(1, sqrt(threshold / f_c))``; an image gets the
    largest ``r_c`` of its classes, and 1 when it has none. Classes in at least ``threshold`` of the images are not
    repeated; rarer ones are seen about ``sqrt(threshold / f_c)`` times as often, without the overfitting a full
    re-balancing (``threshold / f_c``) brings.

    Example::

        repeat_factors([[0], [0], [0], [1], []], threshold=0.5)  # class 1 in 1/5: sqrt(2.5) = 1.58 for image 3
        # [1.0, 1.0, 1.0, 1.58..., 1.0]
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold should be a fraction of images in [0, 1], got {threshold}.")
    counts: dict[int, int] = {}
    for image_classes in classes:
        for c in set(image_classes):
            counts[c] = counts.get(c, 0) + 1
    n = max(len(classes), 1)
    per_class = {c: max(1.0, math.sqrt(float(threshold) * n / k)) for c, k in counts.items()}
    return [max((per_class[c] for c in set(image_classes)), default=1.0) for image_classes in classes]


def sample_training_images(
    files: Sequence[str],
    classes: Sequence[Sequence[int]],
    repeat_threshold: float = 0.0,
    negative_fraction: float | None = None,
    seed: int = 0,
) -> tuple[list[str], dict]:
    """The training list ultralytics reads: images repeated by class (:func:`repeat_factors`), "no finding" images
    (no box) capped.

    Args:
        files: image paths; ``classes``: the class indices of each image's boxes (empty: a "no finding" image).
        repeat_threshold: :func:`repeat_factors`'s threshold; 0 repeats nothing. A fractional factor ``r`` becomes
            ``floor(r)`` copies plus one more with probability ``r - floor(r)`` (seeded), as in LVIS.
        negative_fraction: "no finding" images kept, at most this fraction of the list (drawn at random, seeded);
            None keeps them all. VinDr-CXR's training set is about 70 % "no finding", which drowns the lesions.
        seed: seed of both draws.

    Returns:
        the list (sorted, duplicates kept) and ``{"images", "positives", "negatives_kept", "negatives_dropped",
        "repeated_images", "list_length"}``.
    """
    if len(files) != len(classes):
        raise ValueError(f"files and classes should have one entry per image, got {len(files)} and {len(classes)}.")
    if negative_fraction is not None and not 0.0 <= float(negative_fraction) < 1.0:
        raise ValueError(f"negative_fraction should be in [0, 1) or None, got {negative_fraction}.")
    rng = np.random.default_rng(seed)
    factors = repeat_factors(classes, repeat_threshold) if repeat_threshold else [1.0] * len(files)
    chosen: list[str] = []
    negatives = [f for f, c in zip(files, classes) if not c]
    for path, image_classes, r in zip(files, classes, factors):
        if image_classes:
            chosen += [path] * (math.floor(r) + int(rng.random() < r - math.floor(r)))
    kept = negatives
    if negative_fraction is not None:
        # negatives / (positives + negatives) <= fraction  <=>  negatives <= fraction * positives / (1 - fraction)
        limit = math.floor(float(negative_fraction) * len(chosen) / (1.0 - float(negative_fraction)))
        if len(negatives) > limit:
            kept = [negatives[i] for i in sorted(rng.choice(len(negatives), size=limit, replace=False))]
    summary = {"images": len(files), "positives": len(files) - len(negatives), "negatives_kept": len(kept),
               "negatives_dropped": len(negatives) - len(kept), "repeated_images": sum(f > 1.0 for f in factors),
               "list_length": len(chosen) + len(kept)}
    return sorted(chosen + kept), summary


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
