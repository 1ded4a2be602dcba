from __future__ import annotations

import numpy as np
import pytest

from common.data.boxes import fuse_boxes_wbf

# boxes, scores, labels, num_readers -> expected boxes, scores, labels (worked out by hand)
WBF_CASES = [
    # IoU 80/120 = 0.67 > 0.4: one box at the mean, drawn by 2 of 2 readers
    [[[0, 0, 10, 10], [2, 0, 12, 10]], [1.0, 1.0], [0, 0], 2, [[1, 0, 11, 10]], [1.0], [0]],
    # a far box stays alone and, drawn by 1 of 2 readers, keeps half its score
    [[[0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]], [1.0, 1.0, 1.0], [0, 0, 0], 2,
     [[1, 0, 11, 10], [50, 50, 60, 60]], [1.0, 0.5], [0, 0]],
    # the same box under two labels never fuses
    [[[0, 0, 10, 10], [0, 0, 10, 10]], [1.0, 1.0], [1, 0], 3, [[0, 0, 10, 10], [0, 0, 10, 10]],
     [1 / 3, 1 / 3], [0, 1]],
    # score-weighted coordinates: x1 = (0.9 * 10 + 0.3 * 14) / 1.2 = 11; score = mean; no reader factor
    [[[0, 0, 10, 10], [0, 0, 14, 10]], [0.9, 0.3], [0, 0], None, [[0, 0, 11, 10]], [0.6], [0]],
    # IoU 50/150 = 0.33 <= 0.4: two boxes, the higher score first
    [[[0, 0, 10, 10], [5, 0, 15, 10]], [0.5, 0.8], [0, 0], None, [[5, 0, 15, 10], [0, 0, 10, 10]], [0.8, 0.5],
     [0, 0]],
    # three readers agree -> score 1; more boxes than readers is capped at 1
    [[[0, 0, 10, 10], [1, 1, 11, 11], [0, 1, 10, 11]], [1.0, 1.0, 1.0], [2, 2, 2], 2, [[1 / 3, 2 / 3, 31 / 3, 32 / 3]],
     [1.0], [2]],
    # nothing in, nothing out
    [np.zeros((0, 4)), [], [], 3, np.zeros((0, 4)), [], []],
]

ILL_WBF_CASES = [
    {"boxes": [[0, 0, 1, 1]], "scores": [1.0, 1.0], "labels": [0]},
    {"boxes": [[5, 0, 1, 1]], "scores": [1.0], "labels": [0]},
    {"boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [0], "iou_threshold": 1.5},
    {"boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [0], "num_readers": 0},
]


@pytest.mark.parametrize("boxes, scores, labels, readers, expected_boxes, expected_scores, expected_labels",
                         WBF_CASES)
def test_wbf_by_hand(boxes, scores, labels, readers, expected_boxes, expected_scores, expected_labels):
    fused, fused_scores, fused_labels = fuse_boxes_wbf(boxes, scores, labels, iou_threshold=0.4,
                                                       num_readers=readers)
    np.testing.assert_allclose(fused, np.asarray(expected_boxes, dtype=float).reshape(-1, 4), atol=1e-9)
    np.testing.assert_allclose(fused_scores, expected_scores, atol=1e-9)
    assert fused_labels.tolist() == expected_labels and fused_labels.dtype == np.int64


def test_wbf_skip_threshold_and_order_independence():
    boxes = [[0, 0, 10, 10], [2, 0, 12, 10], [50, 50, 60, 60]]
    fused, scores, _ = fuse_boxes_wbf(boxes, [0.9, 0.9, 0.05], [0, 0, 0], skip_box_threshold=0.1)
    np.testing.assert_allclose(fused, [[1, 0, 11, 10]])
    np.testing.assert_allclose(scores, [0.9])
    reversed_fused, _, _ = fuse_boxes_wbf(boxes[::-1], [0.05, 0.9, 0.9], [0, 0, 0], skip_box_threshold=0.1)
    np.testing.assert_allclose(reversed_fused, fused)


@pytest.mark.parametrize("kwargs", ILL_WBF_CASES)
def test_wbf_ill_arguments(kwargs):
    with pytest.raises(ValueError):
        fuse_boxes_wbf(**kwargs)
