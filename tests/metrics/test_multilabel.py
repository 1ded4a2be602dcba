from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.metrics.multilabel import format_table, multilabel_report, roc_auc, select_thresholds

# 6 cases, 3 classes; class "b" has no positive label. Worked out by hand in the tests below.
PROBS = np.array([[0.9, 0.2, 0.55], [0.8, 0.6, 0.45], [0.7, 0.1, 0.9], [0.4, 0.3, 0.2], [0.3, 0.2, 0.6],
                  [0.1, 0.4, 0.3]])
LABELS = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
NAMES = ["a", "b", "c"]

# probs, labels, grid -> thresholds
TEST_CASES = [
    # a: best F1 6/7 for t in (0.3, 0.4] -> 0.40 (closest to 0.5); b: no positive -> 0.5; c: 0.8 for t in
    # (0.45, 0.55] -> 0.50
    [PROBS, LABELS, None, [0.4, 0.5, 0.5]],
    # a tie at equal distance from 0.5 takes the lower threshold
    [[[0.9], [0.1]], [[1], [0]], [0.3, 0.7], [0.3]],
    # every case positive: any t <= 0.6 predicts all (F1 1); the closest to 0.5 is 0.5 itself
    [[[0.8], [0.6]], [[1], [1]], None, [0.5]],
    # the only positive scores lowest: predicting all (t <= 0.2) is best, F1 2/4
    [[[0.2], [0.7], [0.9]], [[1], [0], [0]], None, [0.2]],
]
ILL_CASES = [
    [[[0.1, 0.2]], [[1]], "share an \\(N, C\\) shape"],
    [[0.1, 0.2], [1, 0], "share an \\(N, C\\) shape"],
    [[[0.1], [0.2]], [[1], [-1]], "labels should be 0 or 1, got also \\['-1'\\]"],
    [[[np.nan], [0.2]], [[1], [0]], "probs should be finite"],
]


@pytest.mark.parametrize("probs, labels, grid, expected", TEST_CASES)
def test_select_thresholds(probs, labels, grid, expected):
    np.testing.assert_allclose(select_thresholds(probs, labels, grid), expected)


@pytest.mark.parametrize("probs, labels, message", ILL_CASES)
def test_ill_inputs(probs, labels, message):
    with pytest.raises(ValueError, match=message):
        select_thresholds(probs, labels)
    with pytest.raises(ValueError, match=message):
        multilabel_report(probs, labels, 0.5, ["x"] * np.shape(probs)[-1])


def test_multilabel_report():
    report = multilabel_report(PROBS, LABELS, [0.4, 0.5, 0.5], NAMES)
    a, b, c = (report["classes"][n] for n in NAMES)
    # a: predicted 0.9, 0.8, 0.7, 0.4 -> TP 3, FP 1, FN 0; AUC 8 of 9 positive-negative pairs ordered
    assert a == pytest.approx({"precision": 0.75, "recall": 1.0, "f1": 6 / 7, "auc": 8 / 9, "support": 3,
                               "threshold": 0.4})
    # b: one false positive (0.6), no positive label: recall and AUC undefined, F1 0
    assert b == {"precision": 0.0, "recall": None, "f1": 0.0, "auc": None, "support": 0, "threshold": 0.5}
    # c: predicted 0.55, 0.9, 0.6 -> TP 2, FP 1; AUC 7 of 8 pairs
    assert c == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "auc": 7 / 8, "support": 2,
                               "threshold": 0.5})
    assert report["micro_f1"] == pytest.approx(10 / 13)  # TP 5, FP 3, FN 0 pooled
    assert report["macro_f1"] == pytest.approx((6 / 7 + 0.8) / 2)  # b left out: no positive label
    assert report["macro_auc"] == pytest.approx((8 / 9 + 7 / 8) / 2)
    assert report["macro_classes"] == ["a", "c"] and report["cases"] == 6
    assert "at least one positive" in report["note"]


def test_undefined_scores_are_none():
    report = multilabel_report([[0.1], [0.2]], [[0], [0]], 0.5, ["x"])
    assert report["classes"]["x"] == {"precision": None, "recall": None, "f1": None, "auc": None, "support": 0,
                                      "threshold": 0.5}
    assert report["micro_f1"] is None and report["macro_f1"] is None and report["macro_classes"] == []
    with pytest.raises(ValueError, match="one name per class \\(1\\), got 2"):
        multilabel_report([[0.1]], [[0]], 0.5, ["x", "y"])
    with pytest.raises(ValueError, match="thresholds should be one per class \\(3\\) or one for all, got 2"):
        multilabel_report(PROBS, LABELS, [0.5, 0.5], NAMES)


def test_format_table():
    model = multilabel_report(PROBS, LABELS, [0.4, 0.5, 0.5], NAMES)
    chance = multilabel_report(np.full_like(PROBS, 0.5), LABELS, 0.5, NAMES)
    table = format_table({"model": model, "chance": chance})
    assert table.splitlines()[:7] == [
        "| finding | support | model F1 | model AUC | chance F1 | chance AUC |",
        "|---|---:|---:|---:|---:|---:|",
        "| a | 3 | 0.857 | 0.889 | 0.667 | 0.500 |",
        "| b | 0 | 0.000 | n/a | 0.000 | n/a |",
        "| c | 2 | 0.800 | 0.875 | 0.500 | 0.500 |",
        "| **micro** | | 0.769 |  | 0.435 |  |",  # chance: TP 5, FP 13
        "| **macro** | | 0.829 | 0.882 | 0.583 | 0.500 |",
    ]
    assert "6 cases; macro averages are over the classes with at least one positive label" in table
    with pytest.raises(ValueError, match="class 'a' has support 2 in 'other'"):
        format_table({"model": model, "other": multilabel_report(PROBS, LABELS[[0, 1, 2, 2, 4, 5]], 0.5, NAMES)})
    with pytest.raises(ValueError, match="at least one method"):
        format_table({})


@pytest.mark.parametrize(
    "scores, labels, expected",
    [
        ([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0], 0.875),  # 3 pairs ordered, the tied pair counts half
        ([0.1, 0.2, 0.3], [1, 0, 0], 0.0),  # every positive below every negative
        ([2.0, 2.0, 2.0, 2.0], [1, 0, 1, 0], 0.5),  # all tied: chance
    ],
)
def test_roc_auc_known_answers(scores, labels, expected):
    assert roc_auc(scores, labels) == pytest.approx(expected)
    # tensors (bool labels, bf16 scores as evaluation may hand them over) give the same value
    assert roc_auc(torch.tensor(scores).bfloat16(), torch.tensor(labels).bool()) == pytest.approx(expected)


def test_roc_auc_undefined_for_one_label_value():
    assert math.isnan(roc_auc([0.2, 0.8], [1, 1])) and math.isnan(roc_auc([], []))
