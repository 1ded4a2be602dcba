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


def test_wbf_agrees_with_ensemble_boxes_on_the_vindr_csv():
    """Our fusion against the reference package on every image of torchxrayvision's copy of the VinBigData CSV
    (4,394 images with boxes, readers' boxes fused per image as the converter does). ensemble-boxes is not a
    dependency (it brings numba and pandas, and wants coordinates in [0, 1]); install it to run this:
    ``pip install ensemble-boxes==1.0.9``. Measured: all 4,394 images identical. ensemble-boxes visits boxes of equal
    score in reverse input order, so ours is given that order here."""
    import csv
    import gzip
    from collections import defaultdict

    wbf = pytest.importorskip("ensemble_boxes").weighted_boxes_fusion
    from common.data.openi import torchxrayvision_data

    rows = list(csv.DictReader(gzip.open(torchxrayvision_data("vinbigdata-train.csv.gz", "install it"), "rt")))
    by_image = defaultdict(list)
    for row in rows:
        by_image[row["image_id"]].append(row)
    scale, compared, differ = 4096.0, 0, []
    for image_id, image_rows in sorted(by_image.items()):
        readers = sorted({r["rad_id"] for r in image_rows})
        drawn = [r for r in image_rows if r["class_id"] != "14" and r["x_min"]]  # class 14: "No finding"
        if not drawn:
            continue
        per_reader = [[r for r in drawn if r["rad_id"] == reader] for reader in readers]
        visit = [r for reader_rows in per_reader for r in reader_rows][::-1]
        boxes = [[float(r[k]) for k in ("x_min", "y_min", "x_max", "y_max")] for r in visit]
        ours = fuse_boxes_wbf(boxes, np.ones(len(boxes)), [int(r["class_id"]) for r in visit], 0.4,
                              num_readers=len(readers))
        theirs = wbf([np.array([[float(r[k]) / scale for k in ("x_min", "y_min", "x_max", "y_max")] for r in rr],
                               dtype=float).reshape(-1, 4) for rr in per_reader],
                     [np.ones(len(rr)) for rr in per_reader], [[int(r["class_id"]) for r in rr] for rr in per_reader],
                     iou_thr=0.4, skip_box_thr=0.0, conf_type="avg")
        a = sorted(zip(ours[2].tolist(), np.round(ours[1], 6).tolist(), np.round(ours[0], 2).tolist()))
        b = sorted(zip(theirs[2].astype(int).tolist(), np.round(theirs[1], 6).tolist(),
                       np.round(theirs[0] * scale, 2).tolist()))
        compared += 1
        if len(a) != len(b) or any(x[:2] != y[:2] or not np.allclose(x[2], y[2], atol=0.05) for x, y in zip(a, b)):
            differ.append(image_id)
    assert compared > 4000 and differ == []
