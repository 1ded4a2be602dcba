"""COCO mAP of detections: perfect, partial and missing classes, and the Markdown report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.engines.detection_metrics import detection_map, map_markdown, write_map_report

NAMES = ["nodule", "mass", "effusion"]
GROUND_TRUTH = [np.array([[0, 10, 10, 50, 50], [1, 60, 60, 90, 90]]), np.array([[0, 5, 5, 20, 20]])]


def test_perfect_detections_score_one_and_absent_classes_are_null():
    preds = [np.array([[10, 10, 50, 50, 0.9, 0], [60, 60, 90, 90, 0.8, 1]]), np.array([[5, 5, 20, 20, 0.7, 0]])]
    result = detection_map(preds, GROUND_TRUTH, NAMES)
    assert result["map50"] == pytest.approx(1.0) and result["map50_95"] == pytest.approx(1.0)
    assert result["per_class"]["effusion"] == {"boxes": 0, "ap40": None, "ap50": None, "ap50_95": None}
    assert result["per_class"]["nodule"]["boxes"] == 2 and result["images"] == 2


def test_missed_and_misplaced_boxes_lower_the_score():
    # nodule: one of two found (AP 0.505 with 101-point interpolation); mass: a box in the wrong place (AP 0)
    preds = [np.array([[10, 10, 50, 50, 0.9, 0], [0, 0, 5, 5, 0.95, 1]]), np.zeros((0, 6))]
    result = detection_map(preds, GROUND_TRUTH, NAMES)
    assert result["per_class"]["nodule"]["ap50"] == pytest.approx(51 / 101)
    assert result["per_class"]["mass"]["ap50"] == 0.0
    assert result["map50"] == pytest.approx(51 / 202)


def test_padding_rows_are_ignored_and_loose_boxes_count_at_05_only():
    # the mass box shifted down by 6 of its 30 rows: IoU 720 / 1080 = 0.667, a hit up to 0.65, a miss from 0.7
    preds = [np.array([[10, 10, 50, 50, 0.9, 0], [60, 66, 90, 96, 0.8, 1], [0, 0, 0, 0, 0, -1]]),
             np.array([[5, 5, 20, 20, 0.7, 0]])]
    result = detection_map(preds, GROUND_TRUTH, NAMES)
    assert result["per_class"]["mass"]["ap50"] == pytest.approx(1.0)
    assert result["per_class"]["mass"]["ap50_95"] == pytest.approx(0.4)  # 4 of 10 IoU thresholds (0.5-0.65)


def test_map40_counts_boxes_too_loose_for_05():
    # the mass box shifted down by 12 of its 30 rows: IoU 540 / 1260 = 0.43, a hit at 0.4 and a miss at 0.5
    preds = [np.array([[10, 10, 50, 50, 0.9, 0], [60, 72, 90, 102, 0.8, 1]]), np.array([[5, 5, 20, 20, 0.7, 0]])]
    result = detection_map(preds, GROUND_TRUTH, NAMES)
    assert result["per_class"]["mass"]["ap40"] == pytest.approx(1.0)
    assert result["per_class"]["mass"]["ap50"] == 0.0
    assert result["map40"] > result["map50"]
    assert "| class | boxes | AP@0.4 | AP@0.5 | AP@0.5:0.95 |" in map_markdown(result)


def test_no_images_give_nan_and_report_files(tmp_path):
    result = detection_map([], [], NAMES)
    assert math.isnan(result["map50"])
    json_path, md_path = write_map_report(result, tmp_path, "m")
    assert json.loads(json_path.read_text())["map50"] is None
    assert "| **mean** | 0 | n/a | n/a |" in md_path.read_text()


def test_markdown_lists_every_class():
    table = map_markdown(detection_map([np.zeros((0, 6))] * 2, GROUND_TRUTH, NAMES))
    assert all(f"| {name} |" in table for name in NAMES)


def test_one_entry_per_image_is_required():
    with pytest.raises(ValueError, match="one entry per image"):
        detection_map([np.zeros((0, 6))], GROUND_TRUTH, NAMES)
