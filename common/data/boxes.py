"""Operations on 2D boxes ``(x0, y0, x1, y1)``, shared by the dataset converters and the detection engines.

:func:`fuse_boxes_wbf` merges overlapping boxes of one image by weighted box fusion: the readers' boxes of a
VinDr-CXR image into its ground truth (:mod:`common.data.vindr`), or the detections of several test-time passes
into one set (:class:`common.engines.detection.YOLODetectionInferer`).

It is the rule of ``ensemble_boxes.weighted_boxes_fusion`` (``conf_type="avg"``, each reader a model): on all 4,394
images with boxes of torchxrayvision's VinBigData CSV the two give the same fused boxes and scores
(``tests/data/test_boxes.py``, run with ``ensemble-boxes==1.0.9`` installed). The package is not a dependency: it
brings numba and pandas, wants coordinates normalised to [0, 1], and visits boxes of equal score in reverse input
order where this function keeps the input order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["fuse_boxes_wbf"]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``(x0, y0, x1, y1)`` box with each of ``(N, 4)`` boxes (continuous coordinates)."""
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1, y1 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0.0, None) * np.clip(y1 - y0, 0.0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def fuse_boxes_wbf(
    boxes: Sequence[Sequence[float]] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    iou_threshold: float = 0.4,
    skip_box_threshold: float = 0.0,
    num_readers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted box fusion (Solovyev et al. 2021, https://arxiv.org/abs/1910.13302) of readers' boxes.

    Rule, per label (boxes of different labels never fuse):

    1. Drop boxes with score < ``skip_box_threshold``; visit the rest by decreasing score (ties in input order).
    2. Compare each box with the current fused box of every cluster; if the best IoU is > ``iou_threshold`` the box
       joins that cluster, otherwise it starts a new one.
    3. A cluster's fused box is the score-weighted mean of its members' coordinates (recomputed after each join).
    4. Its fused score is the mean member score times ``min(n, R) / R``, where ``n`` is the cluster size and ``R``
       is ``num_readers``: a box drawn by one of three readers keeps a third of its score. With ``num_readers`` None
       the factor is 1.

    Args:
        boxes: ``(N, 4)`` boxes ``(x0, y0, x1, y1)``.
        scores: ``N`` scores (1.0 each for radiologists' boxes).
        labels: ``N`` integer class labels.
        iou_threshold: IoU above which a box joins a cluster. Default 0.4.
        skip_box_threshold: boxes scoring below it are ignored. Default 0.0.
        num_readers: readers (or models) that could have drawn each box; None for no down-weighting.

    Returns:
        ``(boxes (K, 4) float64, scores (K,) float64, labels (K,) int64)``, sorted by label then decreasing score.

    Example:
        >>> fused, score, label = fuse_boxes_wbf([[0, 0, 10, 10], [2, 0, 12, 10]], [1.0, 1.0], [0, 0], num_readers=3)
        >>> fused.tolist(), score.round(3).tolist()
        ([[1.0, 0.0, 11.0, 10.0]], [0.667])
    """
    box_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    score_array = np.asarray(scores, dtype=np.float64).reshape(-1)
    label_array = np.asarray(labels).reshape(-1)
    if not len(box_array) == len(score_array) == len(label_array):
        raise ValueError(f"boxes, scores and labels should have one entry per box, got {len(box_array)}, "
                         f"{len(score_array)} and {len(label_array)}.")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold should be in [0, 1], got {iou_threshold}.")
    if num_readers is not None and (isinstance(num_readers, bool) or int(num_readers) != num_readers
                                    or num_readers < 1):
        raise ValueError(f"num_readers should be a positive integer or None, got {num_readers}.")
    if np.any(box_array[:, 2] < box_array[:, 0]) or np.any(box_array[:, 3] < box_array[:, 1]):
        raise ValueError("boxes should have x1 >= x0 and y1 >= y0.")

    out_boxes, out_scores, out_labels = [], [], []
    for label in sorted(set(label_array.tolist())):
        keep = np.flatnonzero((label_array == label) & (score_array >= skip_box_threshold))
        keep = keep[np.argsort(-score_array[keep], kind="stable")]
        members: list[list[int]] = []
        fused = np.zeros((0, 4))
        for index in keep:
            overlaps = _iou(box_array[index], fused) if len(fused) else np.zeros(0)
            best = int(np.argmax(overlaps)) if overlaps.size else -1
            if best >= 0 and overlaps[best] > iou_threshold:
                members[best].append(index)
                weights = score_array[members[best]]
                fused[best] = weights @ box_array[members[best]] / max(weights.sum(), 1e-12)
            else:
                members.append([index])
                fused = np.vstack([fused, box_array[index]])
        for box, cluster in zip(fused, members):
            score = float(score_array[cluster].mean())
            if num_readers is not None:
                score *= min(len(cluster), num_readers) / num_readers
            out_boxes.append(box)
            out_scores.append(score)
            out_labels.append(label)
    order = np.lexsort((-np.asarray(out_scores), np.asarray(out_labels))) if out_labels else np.zeros(0, int)
    return (np.asarray(out_boxes, dtype=np.float64).reshape(-1, 4)[order],
            np.asarray(out_scores, dtype=np.float64)[order], np.asarray(out_labels, dtype=np.int64)[order])
