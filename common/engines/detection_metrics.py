"""COCO-style mean average precision of 2D box detections, overall and per class, as JSON and Markdown."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch
from monai.data.box_utils import box_iou

__all__ = ["detection_map", "map_markdown", "write_map_report"]


@contextlib.contextmanager
def _quiet_absent_classes():
    """MONAI's COCO code warns on the root logger for each class without boxes or detections; the report says so."""

    def keep(record: logging.LogRecord) -> bool:
        return "found for coco metric for class" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _array(x, columns: int) -> np.ndarray:
    return np.asarray(torch.as_tensor(x).detach().float().cpu(), dtype=np.float64).reshape(-1, columns)


def detection_map(
    predictions: Sequence, ground_truth: Sequence, class_names: Sequence[str], max_detections: int = 100
) -> dict:
    """mAP@0.4 (VinBigData's leaderboard metric), mAP@0.5 and mAP@0.5:0.95 over images, overall and per class, by
    MONAI's COCO implementation (``monai.apps.detection.metrics``: greedy matching by score, 101-point interpolated
    precision).

    Overall values average the classes that have ground truth boxes in the set (as pycocotools does); a class
    without any is reported with ``null`` AP. Values follow COCO's definition, so they differ slightly from
    ultralytics' ``val`` (continuous interpolation).

    Args:
        predictions: per image ``(N, 6)`` rows ``x0, y0, x1, y1, score, class`` (rows of class < 0 are ignored).
        ground_truth: per image ``(M, 5)`` rows ``class, x0, y0, x1, y1``.
        class_names: names in class-index order.
        max_detections: detections per image counted, by score. Default 100.

    Returns:
        ``{"images", "map40", "map50", "map50_95", "per_class": {name: {"boxes", "ap40", "ap50", "ap50_95"}}}``.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(f"predictions and ground_truth should have one entry per image, got {len(predictions)} and "
                         f"{len(ground_truth)}.")
    pred = [_array(p, 6) for p in predictions]
    pred = [p[p[:, 5] >= 0] for p in pred]
    gt = [_array(g, 5) for g in ground_truth]
    metric = COCOMetric(classes=list(class_names), iou_list=(0.4, 0.5), iou_range=(0.5, 0.95, 0.05),
                        max_detection=(max_detections,), per_class=True, verbose=False)
    matches = matching_batch(
        iou_fn=box_iou, iou_thresholds=metric.iou_thresholds,
        pred_boxes=[p[:, :4] for p in pred], pred_classes=[p[:, 5].astype(int) for p in pred],
        pred_scores=[p[:, 4] for p in pred], gt_boxes=[g[:, 1:] for g in gt],
        gt_classes=[g[:, 0].astype(int) for g in gt], max_detections=max_detections,
    )
    with _quiet_absent_classes():
        values = metric(matches)[0] if pred else {}
    per_class, counts = {}, np.bincount(np.concatenate([g[:, 0].astype(int) for g in gt] or [np.zeros(0, int)]),
                                        minlength=len(class_names))
    suffix = f"IoU_0.50_0.95_0.05_MaxDet_{max_detections}"
    for index, name in enumerate(class_names):
        present = bool(counts[index])
        per_class[name] = {
            "boxes": int(counts[index]),
            "ap40": values.get(f"{name}_AP_IoU_0.40_MaxDet_{max_detections}") if present else None,
            "ap50": values.get(f"{name}_AP_IoU_0.50_MaxDet_{max_detections}") if present else None,
            "ap50_95": values.get(f"{name}_mAP_{suffix}") if present else None,
        }
    scored = [v for v in per_class.values() if v["ap50"] is not None]
    return {
        "images": len(gt),
        "map40": float(np.mean([v["ap40"] for v in scored])) if scored else math.nan,
        "map50": float(np.mean([v["ap50"] for v in scored])) if scored else math.nan,
        "map50_95": float(np.mean([v["ap50_95"] for v in scored])) if scored else math.nan,
        "per_class": per_class,
    }


def _cell(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def map_markdown(result: dict) -> str:
    """A Markdown table of :func:`detection_map`'s result."""
    lines = [
        f"Detection mAP over {result['images']} image(s) (COCO definition, 101-point interpolation).",
        "",
        "| class | boxes | AP@0.4 | AP@0.5 | AP@0.5:0.95 |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["per_class"].items():
        lines.append(f"| {name} | {row['boxes']} | {_cell(row.get('ap40'))} | {_cell(row['ap50'])} | "
                     f"{_cell(row['ap50_95'])} |")
    total = sum(row["boxes"] for row in result["per_class"].values())
    lines.append(f"| **mean** | {total} | {_cell(result.get('map40'))} | {_cell(result['map50'])} | "
                 f"{_cell(result['map50_95'])} |")
    return "\n".join(lines) + "\n"


def write_map_report(result: dict, output_dir: str | os.PathLike, filename: str = "metrics") -> tuple[Path, Path]:
    """Write ``<filename>.json`` and ``<filename>.md`` (NaN as JSON null) and return their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = json.loads(json.dumps(result), parse_constant=lambda _: None)  # NaN -> null
    json_path, md_path = out / f"{filename}.json", out / f"{filename}.md"
    json_path.write_text(json.dumps(clean, indent=4))
    md_path.write_text(map_markdown(result))
    return json_path, md_path
