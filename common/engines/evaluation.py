"""Strategy sweeps of an in-context evaluator, written as JSON and a Markdown table."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from common.engines.evaluator import InContextEvaluator

__all__ = ["evaluate_strategies", "per_class_dice_table"]

logger = logging.getLogger(__name__)


def _nanmean(values: torch.Tensor) -> float:
    v = values[~torch.isnan(values)]
    return float(v.mean()) if v.numel() else math.nan


def per_class_dice_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per class, one column per strategy, plus a mean row."""
    strategies = list(results)
    classes = sorted({c for r in results.values() for c in r if c != "mean"})
    lines = ["| class | " + " | ".join(strategies) + " |", "|---" * (len(strategies) + 1) + "|"]
    for c in classes + ["mean"]:
        cells = [results[s].get(c, math.nan) for s in strategies]
        lines.append(f"| {c} | " + " | ".join("n/a" if math.isnan(x) else f"{x:.3f}" for x in cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_strategies(
    evaluator: InContextEvaluator,
    strategies: Sequence[str],
    output_dir: str | os.PathLike,
    metric_name: str = "val_per_class_dice",
    filename: str = "dice_per_strategy",
) -> dict[str, dict[str, float]]:
    """Run ``evaluator`` once per strategy and write per-class Dice as ``<filename>.json`` and ``.md``.

    ``metric_name`` names a metric of the evaluator created with ``save_details=True`` (e.g. ``MeanDice``); the
    per-case, per-class values are averaged over cases, ignoring classes absent from a case's ground truth.
    """
    results: dict[str, dict[str, float]] = {}
    for strategy in strategies:
        evaluator.prompt.strategy = strategy
        evaluator.run()
        details = evaluator.state.metric_details.get(metric_name)
        if details is None:
            raise KeyError(f"the evaluator has no per-case details for '{metric_name}' (set save_details=True).")
        per_case = torch.as_tensor(details, dtype=torch.float32).reshape(-1, len(evaluator.state.class_names))
        row = {name: _nanmean(per_case[:, k]) for k, name in enumerate(evaluator.state.class_names)}
        row["mean"] = _nanmean(torch.tensor([v for v in row.values()]))
        results[strategy] = row
        logger.info("%s: mean Dice %.4f over %d cases", strategy, row["mean"], per_case.shape[0])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{filename}.json").write_text(json.dumps(results, indent=4))
    (out / f"{filename}.md").write_text(per_class_dice_table(results))
    return results
