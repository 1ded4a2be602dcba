"""Converters from the public VinDr-CXR layout (and the Kaggle VinBigData ``train.csv``) to project datalists.

VinDr-CXR (https://physionet.org/content/vindr-cxr/, Nguyen et al. 2022, https://arxiv.org/abs/2012.15029) ships
DICOM images ``<split>/<image_id>.dicom`` and CSV annotations:

- ``image_labels_train.csv``: one row per (image, radiologist) with ``image_id``, ``rad_id`` (``rad_ID`` in some
  copies) and a 0/1 column for each of the 22 local labels (:data:`VINDR_LOCAL_LABELS`) and 6 global labels
  (:data:`VINDR_GLOBAL_LABELS`); three radiologists read each training image, the test set has one consensus row.
- ``annotations_train.csv`` (VinDr-CXR) or ``train.csv`` (Kaggle VinBigData): one row per box with ``image_id``,
  ``rad_id``, ``class_name``, optionally ``class_id``, and ``x_min, y_min, x_max, y_max`` in pixels of the original
  image; a "No finding" row has empty coordinates. The 14 box classes are :data:`VINDR_DETECTION_CLASSES` (Kaggle
  ``class_id`` 0-13; 14 is "No finding").

Both converters are plain functions over paths: they check every row, report each bad one with its CSV line number
(the header is line 1) and a reason, skip it, convert the rest, and split by image id so all rows of an image land
in one split. The detection converter merges the readers' boxes of an image by weighted box fusion
(:func:`common.data.boxes.fuse_boxes_wbf`).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom

from common.data.boxes import fuse_boxes_wbf
from common.data.tables import check_split, match_columns, read_csv, validation_groups

__all__ = [
    "VINDR_DETECTION_CLASSES",
    "VINDR_GLOBAL_LABELS",
    "VINDR_LOCAL_LABELS",
    "convert_vindr_classification",
    "convert_vindr_detection",
    "yolo_lines",
]

PathLike = str | os.PathLike

VINDR_LOCAL_LABELS: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "Other lesion",
)
VINDR_GLOBAL_LABELS: tuple[str, ...] = ("COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases",
                                        "No finding")
"""Global labels as in ``image_labels_train.csv``; the test CSV spells "Other disease", which is accepted too."""
VINDR_DETECTION_CLASSES: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Nodule/Mass",
    "Other lesion",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
)
"""The 14 box classes in Kaggle ``class_id`` order (0-13)."""
NO_FINDING = "No finding"
NO_FINDING_CLASS_ID = 14

# spellings met in the public copies, mapped to the names above (matched case-insensitively)
_COLUMN_ALIASES = {"rad_id": "rad_id", "other disease": "Other diseases"}


# ------------------------------------------------------------------------------------------------------- reading
def _image_entry(image_id: str, image_dir: Path | None, image_ext: str, base: Path) -> tuple[str, Path | None]:
    """Datalist path of an image, relative to ``base``, and its file when ``image_dir`` is known."""
    if image_dir is None:
        return f"{image_id}{image_ext}", None
    file = image_dir / f"{image_id}{image_ext}"
    return Path(os.path.relpath(file.resolve(), base.resolve())).as_posix(), file


def _write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4) + "\n")


# ------------------------------------------------------------------------------------------------ classification
def convert_vindr_classification(
    labels_csv: PathLike,
    image_dir: PathLike | None,
    out_json: PathLike,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    image_ext: str = ".dicom",
    check_images: bool = True,
) -> dict:
    """Convert ``image_labels_*.csv`` to a multi-label classification datalist by majority vote over readers.

    A label is 1 when more than half of the image's readers marked it: 2 or 3 of 3 readers, 2 of 2, the single
    reader of a consensus (test) row. Rows whose label values are not 0 or 1 (empty, text, other numbers) are
    skipped and reported; the image keeps its other readers. Writes::

        {"name": "vindr_cxr", "concepts": [22 local labels], "diseases": [6 global labels],
         "training": [{"image": "../train/000434271f63a053c4128a0ba6352c7f.dicom", "image_id": "0004...",
                       "concepts": [0/1 ...], "diseases": [0/1 ...], "readers": 3}, ...],
         "validation": [...]}

    with image paths relative to ``out_json``'s folder (just ``<image_id><image_ext>`` when ``image_dir`` is None).

    Args:
        labels_csv: the labels CSV (``.csv`` or ``.csv.gz``); needs ``image_id``, ``rad_id`` (any case) and all 28
            label columns, else ``ValueError``.
        image_dir: folder of the images, or None to skip file checks.
        out_json: datalist to write; folders are created, an existing file is replaced.
        split_seed: seed of the validation draw. Default 0.
        val_fraction: fraction of images for validation, ``round(n * val_fraction)`` of them. Default 0.1.
        image_ext: image file suffix. Default ``".dicom"``.
        check_images: with ``image_dir``, skip (and report) images whose file is missing. Default True.

    Returns:
        report: ``images`` (converted), ``training``, ``validation``, ``rows`` (read), ``skipped`` (list of
        ``{"row": line, "image_id", "reason"}`` or ``{"image_id", "reason"}``), ``readers`` (readers per image ->
        image count) and ``positives`` (label -> positive images after the vote).
    """
    check_split(val_fraction, split_seed)
    path, out_json = Path(labels_csv), Path(out_json)
    image_dir = None if image_dir is None else Path(image_dir)
    header, rows = read_csv(path)
    labels = VINDR_LOCAL_LABELS + VINDR_GLOBAL_LABELS
    columns = match_columns(header, ("image_id", "rad_id", *labels), path, _COLUMN_ALIASES)

    skipped: list[dict] = []
    votes: dict[str, list[np.ndarray]] = defaultdict(list)
    for line, row in rows:
        image_id = row[columns["image_id"]]
        values = [row[columns[name]] for name in labels]
        bad = [f"{name}={value!r}" for name, value in zip(labels, values) if value not in ("0", "1", "0.0", "1.0")]
        if not image_id:
            skipped.append({"row": line, "image_id": "", "reason": "empty image_id"})
        elif bad:
            skipped.append({"row": line, "image_id": image_id, "reason": f"label values not 0/1: {', '.join(bad)}"})
        else:
            votes[image_id].append(np.array([float(v) for v in values]) > 0.5)

    base = out_json.parent
    items = {}
    for image_id in sorted(votes):
        image, file = _image_entry(image_id, image_dir, image_ext, base)
        if file is not None and check_images and not file.is_file():
            skipped.append({"image_id": image_id, "reason": f"image file not found: {file}"})
            continue
        marks = np.stack(votes[image_id])
        label = (2 * marks.sum(axis=0) > len(marks)).astype(int).tolist()  # more than half of the readers
        items[image_id] = {
            "image": image,
            "image_id": image_id,
            "concepts": label[: len(VINDR_LOCAL_LABELS)],
            "diseases": label[len(VINDR_LOCAL_LABELS):],
            "readers": len(marks),
        }

    validation = validation_groups(list(items), val_fraction, seed=split_seed)  # one image per group
    _write_json({
        "name": "vindr_cxr",
        "description": f"VinDr-CXR image labels from {path.name}, majority vote over readers; made by "
        "common.data.vindr.convert_vindr_classification.",
        "concepts": list(VINDR_LOCAL_LABELS),
        "diseases": list(VINDR_GLOBAL_LABELS),
        "training": [items[i] for i in sorted(items) if i not in validation],
        "validation": [items[i] for i in sorted(items) if i in validation],
    }, out_json)
    positives = np.sum([item["concepts"] + item["diseases"] for item in items.values()], axis=0) if items else []
    return {
        "images": len(items),
        "training": len(items) - len(validation),
        "validation": len(validation),
        "rows": len(rows),
        "skipped": skipped,
        "readers": dict(sorted(Counter(item["readers"] for item in items.values()).items())),
        "positives": {name: int(n) for name, n in zip(labels, positives)},
    }


# ----------------------------------------------------------------------------------------------------- detection
def _image_size(image_id: str, image_sizes: Mapping[str, Sequence[int]] | None, file: Path | None,
                ) -> tuple[int, int] | None:
    """(height, width) from ``image_sizes`` or the DICOM header (Rows, Columns) read without pixel data."""
    if image_sizes is not None and image_id in image_sizes:
        height, width = image_sizes[image_id]
        return int(height), int(width)
    if file is not None and file.is_file():
        header = pydicom.dcmread(file, stop_before_pixels=True, force=True)
        if "Rows" in header and "Columns" in header:
            return int(header.Rows), int(header.Columns)
    return None


def _parse_box(row: dict[str, str], columns: dict[str, str]) -> tuple[list[float] | None, str | None]:
    """Coordinates of a finding row, or the reason they are unusable."""
    coords = []
    for name in ("x_min", "y_min", "x_max", "y_max"):
        try:
            value = float(row[columns[name]])
        except ValueError:
            return None, f"{name} is missing or not a number ({row[columns[name]]!r})"
        if not math.isfinite(value):
            return None, f"{name} is not finite ({row[columns[name]]!r})"
        coords.append(value)
    x0, y0, x1, y1 = coords
    if x1 < x0 or y1 < y0:
        return None, f"inverted box (x_min={x0:g}, x_max={x1:g}, y_min={y0:g}, y_max={y1:g})"
    if x1 == x0 or y1 == y0:
        return None, f"empty box ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
    return coords, None


def yolo_lines(boxes: list[list], size: tuple[int, int]) -> str:
    height, width = size
    lines = []
    for class_index, x0, y0, x1, y1 in boxes:
        cx, cy, w, h = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height
        lines.append(f"{class_index} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n")
    return "".join(lines)


def convert_vindr_detection(
    annotations_csv: PathLike,
    out_dir: PathLike,
    image_dir: PathLike | None = None,
    image_sizes: Mapping[str, Sequence[int]] | None = None,
    iou_threshold: float = 0.4,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    yolo_labels: bool = False,
    classes: Sequence[str] = VINDR_DETECTION_CLASSES,
    image_ext: str = ".dicom",
    min_score: float = 0.0,
) -> dict:
    """Convert box annotations (VinDr-CXR ``annotations_*.csv`` or VinBigData ``train.csv``) to a detection datalist.

    Rows are grouped by image. Per image and class the readers' boxes are fused by
    :func:`common.data.boxes.fuse_boxes_wbf` (score 1.0 per box, ``num_readers`` = the distinct ``rad_id`` values of
    the image's valid rows, "No finding" readers included), so a box that all readers drew scores 1, one of three
    readers 1/3; fused boxes scoring below ``min_score`` are dropped.
    An image whose readers all said "No finding" is kept as background (no boxes).

    Each row is checked; a bad row is reported with its CSV line (the header is line 1) and skipped, and the rest of
    its image converts: a class name not in ``classes`` (or a ``class_id`` that disagrees with it), a missing, NaN
    or non-numeric coordinate on a finding row, an inverted (``x_max < x_min`` or ``y_max < y_min``) or empty box,
    and a box outside the image (``x_min < 0``, ``y_min < 0``, ``x_max > width`` or ``y_max > height``). The image
    size comes from ``image_sizes`` or, failing that, the DICOM header in ``image_dir``; when neither knows it, the
    outside-the-image check is skipped and ``image_size`` is null (the Kaggle CSV alone does not give sizes). An
    image whose file is missing from ``image_dir`` is skipped as a whole, as is, with ``yolo_labels``, one of
    unknown size. Writes ``out_dir/datalist.json``::

        {"name": "vindr_cxr_detection", "lesion_classes": [...14], "iou_threshold": 0.4,
         "training": [{"image": "../train/0005e8e3701dfb1dd93d53e2ff537b6e.dicom", "image_id": "0005...",
                       "image_size": [height, width] or null, "boxes": [[class_index, x0, y0, x1, y1], ...],
                       "box_scores": [...], "readers": 3, "label": "labels/0005....txt"}, ...],
         "validation": [...]}

    and, with ``yolo_labels``, ``out_dir/labels/<image_id>.txt`` with one ``class cx cy w h`` line per box
    (normalised to the image size; an empty file for background). Image paths are relative to ``out_dir``, or
    ``<image_id><image_ext>`` when ``image_dir`` is None.

    Args:
        annotations_csv: the CSV (``.csv`` or ``.csv.gz``); needs ``image_id``, ``class_name`` and the four
            coordinates, optionally ``rad_id`` (else one reader per row) and ``class_id``.
        out_dir: output folder, created if missing; existing files are replaced.
        image_dir: folder of the images (for sizes and existence), or None.
        image_sizes: ``{image_id: (height, width)}``, taking precedence over the DICOM headers. Default None.
        iou_threshold: WBF IoU threshold. Default 0.4.
        val_fraction: fraction of images for validation. Default 0.1.
        split_seed: seed of the validation draw. Default 0.
        yolo_labels: also write YOLO label files. Default False.
        classes: box classes, in class-index order. Default :data:`VINDR_DETECTION_CLASSES`; pass
            :data:`VINDR_LOCAL_LABELS` for VinDr-CXR's 22 local labels.
        image_ext: image file suffix. Default ``".dicom"``.
        min_score: smallest fused score kept (e.g. 0.5 for boxes agreed by 2 of 3 readers). Default 0.0.

    Returns:
        report: ``images``, ``training``, ``validation``, ``background`` (images without boxes), ``rows``,
        ``boxes`` (input boxes used), ``fused_boxes``, ``skipped`` (``{"row", "image_id", "reason"}`` per bad row,
        ``{"image_id", "reason"}`` per dropped image), ``unknown_size`` (images whose boxes could not be checked
        against the image) and ``per_class`` (fused boxes per class name).
    """
    check_split(val_fraction, split_seed)
    classes = tuple(classes)
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes should be unique names, got {classes}.")
    path, out_dir = Path(annotations_csv), Path(out_dir)
    image_dir = None if image_dir is None else Path(image_dir)
    header, rows = read_csv(path)
    columns = match_columns(header, ("image_id", "class_name", "x_min", "y_min", "x_max", "y_max"), path,
                            _COLUMN_ALIASES)
    lower = {name.lower(): name for name in header}
    rad_column, id_column = lower.get("rad_id"), lower.get("class_id")
    class_index = {name.lower(): i for i, name in enumerate(classes)}

    by_image: dict[str, list[tuple[int, dict[str, str]]]] = defaultdict(list)
    skipped: list[dict] = []
    for line, row in rows:
        if row[columns["image_id"]]:
            by_image[row[columns["image_id"]]].append((line, row))
        else:
            skipped.append({"row": line, "image_id": "", "reason": "empty image_id"})

    items, unknown_size, used, per_class = {}, [], 0, Counter()
    for image_id in sorted(by_image):
        image, file = _image_entry(image_id, image_dir, image_ext, out_dir)
        if file is not None and not file.is_file():
            skipped.append({"image_id": image_id, "reason": f"image file not found: {file}"})
            continue
        size = _image_size(image_id, image_sizes, file)
        if size is None and yolo_labels:
            skipped.append({"image_id": image_id, "reason": "image size unknown (needed for YOLO labels)"})
            continue
        readers, boxes, labels, valid_rows = set(), [], [], 0
        for line, row in by_image[image_id]:
            box, reason = _check_row(row, columns, id_column, class_index, size)
            if reason is not None:
                skipped.append({"row": line, "image_id": image_id, "reason": reason})
                continue
            valid_rows += 1
            readers.add((row.get(rad_column) if rad_column else "") or f"row {line}")  # no reader id: one per row
            if box is not None:
                labels.append(box[0])
                boxes.append(box[1:])
        if not valid_rows:
            skipped.append({"image_id": image_id, "reason": "no valid rows"})
            continue
        used += len(boxes)
        fused, scores, fused_labels = fuse_boxes_wbf(boxes, np.ones(len(boxes)), labels, iou_threshold,
                                                     num_readers=len(readers))
        keep = scores >= min_score
        entry_boxes = [[int(c), *(round(float(v), 2) for v in b)] for c, b in zip(fused_labels[keep], fused[keep])]
        per_class.update(classes[c] for c, *_ in entry_boxes)
        if size is None:
            unknown_size.append(image_id)
        items[image_id] = {
            "image": image,
            "image_id": image_id,
            "image_size": list(size) if size is not None else None,
            "boxes": entry_boxes,
            "box_scores": [round(float(s), 4) for s in scores[keep]],
            "readers": len(readers),
        }
        if yolo_labels:
            label_file = out_dir / "labels" / f"{image_id}.txt"
            label_file.parent.mkdir(parents=True, exist_ok=True)
            label_file.write_text(yolo_lines(entry_boxes, size))
            items[image_id]["label"] = f"labels/{image_id}.txt"

    validation = validation_groups(list(items), val_fraction, seed=split_seed)  # one image per group
    _write_json({
        "name": "vindr_cxr_detection",
        "description": f"VinDr-CXR boxes from {path.name}, readers fused by weighted box fusion; made by "
        "common.data.vindr.convert_vindr_detection.",
        "lesion_classes": list(classes),
        "iou_threshold": iou_threshold,
        "training": [items[i] for i in sorted(items) if i not in validation],
        "validation": [items[i] for i in sorted(items) if i in validation],
    }, out_dir / "datalist.json")
    return {
        "images": len(items),
        "training": len(items) - len(validation),
        "validation": len(validation),
        "background": sum(not item["boxes"] for item in items.values()),
        "rows": len(rows),
        "boxes": used,
        "fused_boxes": sum(len(item["boxes"]) for item in items.values()),
        "skipped": skipped,
        "unknown_size": unknown_size,
        "per_class": {name: per_class[name] for name in classes if per_class[name]},
    }


def _check_row(row: dict[str, str], columns: dict[str, str], id_column: str | None, class_index: dict[str, int],
               size: tuple[int, int] | None) -> tuple[list | None, str | None]:
    """``([class, x0, y0, x1, y1] or None for "No finding", None)`` for a good row, ``(None, reason)`` for a bad one."""
    name = row[columns["class_name"]]
    class_id = row.get(id_column, "") if id_column else ""
    if name.lower() == NO_FINDING.lower():
        if class_id and class_id not in (str(NO_FINDING_CLASS_ID), f"{NO_FINDING_CLASS_ID}.0"):
            return None, f"class_id {class_id!r} does not match class_name {name!r}"
        return None, None
    if name.lower() not in class_index:
        return None, f"unknown class name {name!r}"
    index = class_index[name.lower()]
    # class_id follows the Kaggle numbering whatever ``classes`` is
    kaggle = {n.lower(): i for i, n in enumerate(VINDR_DETECTION_CLASSES)}.get(name.lower())
    if class_id and kaggle is not None and class_id not in (str(kaggle), f"{kaggle}.0"):
        return None, f"class_id {class_id!r} does not match class_name {name!r} (class_id {kaggle})"
    coords, reason = _parse_box(row, columns)
    if reason is not None:
        return None, reason
    if size is not None:
        height, width = size
        x0, y0, x1, y1 = coords
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            return None, f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) outside the {width}x{height} image"
    return [index, *coords], None
