"""Multi-label classification metrics: per-class thresholds, per-class and averaged scores, and a comparison table.

A case is predicted positive for a class when its probability is at least the class threshold (``p >= t``), here
and in ``common.transforms.report_outputs.SaveReportLabelsd``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc

__all__ = ["DEFAULT_GRID", "format_table", "multilabel_report", "roc_auc", "select_thresholds"]

# candidate thresholds of select_thresholds: 0.01, 0.02, ..., 0.99
DEFAULT_GRID = np.round(np.arange(1, 100) / 100, 2)
MACRO_NOTE = "macro averages are over the classes with at least one positive label"


def _arrays(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """``(N, C)`` float probabilities and bool labels, or ValueError saying what is wrong."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels)
    if probs.ndim != 2 or probs.shape != labels.shape:
        raise ValueError(f"probs and labels should share an (N, C) shape, got {list(probs.shape)} and "
                         f"{list(labels.shape)}.")
    if not np.isfinite(probs).all():
        raise ValueError("probs should be finite, got NaN or Inf.")
    if not np.isin(labels, (0, 1)).all():
        bad = sorted({str(v) for v in np.unique(labels) if v not in (0, 1)})[:5]
        raise ValueError(f"labels should be 0 or 1, got also {bad} (map uncertain or missing labels first).")
    return probs, labels.astype(bool)


def _f1(tp, fp, fn):
    """F1 = 2TP / (2TP + FP + FN), elementwise; NaN where nothing is positive in labels or predictions."""
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.full_like(denominator, np.nan), where=denominator > 0)


def select_thresholds(probs, labels, grid: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Per-class threshold maximising F1 on a (validation) set.

    Of thresholds giving the same best F1, the one closest to 0.5 is chosen (the lower one when two are equally
    close), so a flat optimum does not drift to an extreme; a class without positive labels gets 0.5.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N, C)`` 0/1 labels.
        grid: candidate thresholds. Default :data:`DEFAULT_GRID` (0.01 to 0.99 by 0.01).

    Returns:
        ``(C,)`` thresholds.

    Example::

        select_thresholds([[0.9], [0.6], [0.2]], [[1], [0], [0]])  # array([0.61]): F1 1 for t in (0.6, 0.9]
    """
    probs, labels = _arrays(probs, labels)
    grid = DEFAULT_GRID if grid is None else np.asarray(grid, dtype=float).reshape(-1)
    if grid.size == 0 or not np.isfinite(grid).all():
        raise ValueError(f"grid should hold finite thresholds, got {grid.tolist()}.")
    # closest to 0.5 first, the lower of two equally close first (distances rounded: 0.7 - 0.5 < 0.5 - 0.3 in
    # floating point); the first best of this order is taken
    grid = grid[np.lexsort((grid, np.round(np.abs(grid - 0.5), 9)))]
    thresholds = np.full(probs.shape[1], 0.5)
    for c in range(probs.shape[1]):
        y = labels[:, c]
        if not y.any():
            continue
        predicted = probs[:, c, None] >= grid[None]  # (N, G)
        tp = (predicted & y[:, None]).sum(0)
        f1 = _f1(tp, predicted.sum(0) - tp, y.sum() - tp)
        best = np.flatnonzero(np.isclose(f1, f1.max(), rtol=0, atol=1e-12))[0]
        thresholds[c] = grid[best]
    return thresholds


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``(N,)`` scores against ``(N,)`` 0/1 labels (MONAI's ``compute_roc_auc``: tied
    scores count half), or NaN when the labels hold one value only, where it is undefined.

    Example::

        roc_auc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])  # 0.875: the tied pair counts half
    """
    scores = torch.as_tensor(scores).detach().cpu().double().reshape(-1)
    labels = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
    if labels.numel() == 0 or labels.min() == labels.max():
        return math.nan
    return float(compute_roc_auc(scores, labels))


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def multilabel_report(probs, labels, thresholds, names: Sequence[str]) -> dict:
    """Per-class precision, recall, F1, AUC and support, with micro and macro F1, at given thresholds.

    Undefined values are None: precision with no predicted positive, recall with no positive label, F1 with
    neither, AUC (:func:`roc_auc`) when a class has only one label value. Micro F1 pools the
    counts of all classes; macro F1 and macro AUC average the classes with at least one positive label (and a
    defined AUC), listed in ``macro_classes``.

    Args:
        probs: ``(N, C)`` probabilities.
        labels: ``(N, C)`` 0/1 labels.
        thresholds: ``(C,)`` thresholds, or one for all classes.
        names: the ``C`` class names.

    Returns:
        ``{"classes": {name: {"precision", "recall", "f1", "auc", "support", "threshold"}}, "micro_f1",
        "macro_f1", "macro_auc", "macro_classes": [names], "cases": N, "note": ...}``.

    Example::

        multilabel_report([[0.9], [0.6], [0.2]], [[1], [0], [0]], [0.5], ["a"])["classes"]["a"]
        # {"precision": 0.5, "recall": 1.0, "f1": 0.667, "auc": 1.0, "support": 1, "threshold": 0.5}
    """
    probs, labels = _arrays(probs, labels)
    names = list(names)
    if len(names) != probs.shape[1]:
        raise ValueError(f"names should give one name per class ({probs.shape[1]}), got {len(names)}.")
    thresholds = np.asarray(thresholds, dtype=float).reshape(-1)
    if thresholds.size not in (1, probs.shape[1]):
        raise ValueError(f"thresholds should be one per class ({probs.shape[1]}) or one for all, got "
                         f"{thresholds.size}.")
    thresholds = np.broadcast_to(thresholds, (probs.shape[1],))
    predicted = probs >= thresholds[None]
    tp = (predicted & labels).sum(0)
    fp, fn, support = predicted.sum(0) - tp, labels.sum(0) - tp, labels.sum(0)
    f1 = _f1(tp, fp, fn)
    classes = {}
    for c, name in enumerate(names):
        both = 0 < support[c] < len(labels)
        classes[name] = {
            "precision": _ratio(tp[c], tp[c] + fp[c]),
            "recall": _ratio(tp[c], support[c]),
            "f1": None if np.isnan(f1[c]) else float(f1[c]),
            "auc": roc_auc(probs[:, c], labels[:, c]) if both else None,
            "support": int(support[c]),
            "threshold": float(thresholds[c]),
        }
    with_positives = [n for n, s in zip(names, support) if s > 0]
    aucs = [classes[n]["auc"] for n in with_positives if classes[n]["auc"] is not None]
    micro = _f1(tp.sum(), fp.sum(), fn.sum())
    return {
        "classes": classes,
        "micro_f1": None if np.isnan(micro) else float(micro),
        "macro_f1": float(np.mean([classes[n]["f1"] for n in with_positives])) if with_positives else None,
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "macro_classes": with_positives,
        "cases": int(len(labels)),
        "note": MACRO_NOTE,
    }


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(reports: Mapping[str, Mapping]) -> str:
    """Markdown table comparing methods: one row per class (support, then F1 and AUC of each method side by side),
    then micro F1 and macro F1/AUC rows.

    Args:
        reports: ``{method name: multilabel_report(...)}``, all on the same labels (the baseline among them).

    Returns:
        The table, followed by a note on the averages and on ``n/a``.

    Raises:
        ValueError: no report, or reports whose supports differ (they were not computed on the same labels).
    """
    if not reports:
        raise ValueError("reports should hold at least one method's multilabel_report.")
    methods = list(reports)
    names = list(dict.fromkeys(n for r in reports.values() for n in r["classes"]))
    supports = {}
    for method, report in reports.items():
        for name, scores in report["classes"].items():
            if supports.setdefault(name, scores["support"]) != scores["support"]:
                raise ValueError(f"class {name!r} has support {scores['support']} in {method!r} but "
                                 f"{supports[name]} in another method: the reports are not on the same labels.")
    header = "| finding | support | " + " | ".join(f"{m} F1 | {m} AUC" for m in methods) + " |"
    lines = [header, "|---|---:|" + "---:|---:|" * len(methods)]
    for name in names:
        cells = []
        for m in methods:
            scores = reports[m]["classes"].get(name, {})
            cells += [_cell(scores.get("f1")), _cell(scores.get("auc"))]
        lines.append(f"| {name} | {supports[name]} | " + " | ".join(cells) + " |")
    micro = [cell for m in methods for cell in (_cell(reports[m]["micro_f1"]), "")]
    macro = [cell for m in methods for cell in (_cell(reports[m]["macro_f1"]), _cell(reports[m]["macro_auc"]))]
    lines.append("| **micro** | | " + " | ".join(micro) + " |")
    lines.append("| **macro** | | " + " | ".join(macro) + " |")
    cases = "/".join(sorted({str(r.get("cases")) for r in reports.values()}))
    return ("\n".join(lines) + f"\n\n{cases} cases; {MACRO_NOTE}; n/a: undefined (no positive or no negative label, "
            "or nothing predicted).\n")
