"""Strategy sweeps of an in-context evaluator, with no-model baselines, written as JSON and a Markdown table."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.utils import look_up_option
from torch import nn

from common.engines.evaluator import InContextEvaluator

__all__ = [
    "BASELINES", "CopyReference", "Foreground", "IntensityMatch", "copy_reference_masks", "evaluate_strategies",
    "per_class_dice_table",
]

logger = logging.getLogger(__name__)


def _nanmean(values: torch.Tensor) -> float:
    v = values[~torch.isnan(values)]
    return float(v.mean()) if v.numel() else math.nan


def copy_reference_masks(ref_mask: torch.Tensor) -> torch.Tensor:
    """The references' masks as a prediction: per class, the majority vote (mean > 0.5) of the references that
    show the class (as the ensemble strategy leaves references with an empty mask out of a class's average).

    Args:
        ref_mask: ``(B, R, K, *S)`` binary masks, or ``(B, K, *S)`` for one reference.

    Returns:
        ``(B, K, *S)`` float masks in {0, 1}.

    Example:
        >>> m = torch.tensor([[[[1.0, 1.0, 0.0]], [[1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]]])  # R=3, K=1, S=3
        >>> copy_reference_masks(m).tolist()  # the empty third reference does not vote
        [[[1.0, 0.0, 0.0]]]
    """
    if ref_mask.dim() < 4:
        raise ValueError(f"ref_mask should have shape (B, R, K, *S), got {list(ref_mask.shape)}.")
    present = (ref_mask.flatten(3).amax(-1) > 0).to(ref_mask.dtype)  # (B, R, K)
    weights = present / present.sum(1, keepdim=True).clamp_min(1.0)
    votes = (ref_mask * weights[(...,) + (None,) * (ref_mask.dim() - 3)]).sum(1)
    return (votes > 0.5).float()


class CopyReference(nn.Module):
    """The copy-the-reference baseline in the shape of an in-context network: no weights, no model.

    :meth:`encode_task` returns :func:`copy_reference_masks` of the references as the "task embeddings", and
    :meth:`segment` returns them as logits (``+logit`` inside, ``-logit`` outside) for any query on the same grid.
    An :class:`InContextEvaluator` whose network is swapped for it therefore scores the references' label maps,
    preprocessed as the evaluation preprocesses both references and queries (same orientation, spacing, crop and
    resize), with its own metrics and postprocessing.

    Args:
        logit: magnitude of the returned logits. Default 20.
    """

    def __init__(self, logit: float = 20.0) -> None:
        super().__init__()
        self.logit = logit

    def encode_task(self, ref_image: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
        """``(B, R, 1, *S)`` images (unused) and ``(B, R, K, *S)`` masks -> ``(B, K, *S)`` copied masks."""
        return copy_reference_masks(ref_mask if ref_mask.dim() == ref_image.dim() else ref_mask.unsqueeze(1))

    def segment(self, image: torch.Tensor, task_embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *S)`` query and ``(1 or B, K, *S)`` copied masks -> ``(B, K, *S)`` logits."""
        if task_embeddings.shape[2:] != image.shape[2:]:
            raise ValueError(f"the query grid {list(image.shape[2:])} should be the references' grid "
                             f"{list(task_embeddings.shape[2:])} (copy_reference needs whole-volume inference).")
        logits = (2.0 * task_embeddings - 1.0) * self.logit
        return logits.to(image.dtype).expand(image.shape[0], *logits.shape[1:])


class Foreground(nn.Module):
    """The "segment the body" baseline: every class predicted on the query's whole foreground, no model.

    A structure that fills much of the body (gray matter in a skull-stripped brain, a large organ) scores a high Dice
    this way without any reading of the boundaries between structures, so an in-context model should beat this
    baseline as well as :class:`CopyReference` before its Dice says it told the structures apart.

    Args:
        threshold: foreground is ``image > threshold`` on the preprocessed query (intensities in [0, 1]). Default
            0.1, above the background noise of a scaled CT or MR volume.
        logit: magnitude of the returned logits. Default 20.
    """

    def __init__(self, threshold: float = 0.1, logit: float = 20.0) -> None:
        super().__init__()
        self.threshold, self.logit = float(threshold), logit

    def encode_task(self, ref_image: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
        """``(B, R, 1, *S)`` images and ``(B, R, K, *S)`` masks (both unused but for ``K``) -> ``(B, K)``."""
        mask = ref_mask if ref_mask.dim() == ref_image.dim() else ref_mask.unsqueeze(1)
        return torch.ones(mask.shape[:1] + mask.shape[2:3], device=mask.device)

    def segment(self, image: torch.Tensor, task_embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *S)`` query and ``(1 or B, K)`` -> ``(B, K, *S)`` logits, inside wherever the query is
        foreground."""
        inside = (image > self.threshold).to(image.dtype)  # (B, 1, *S)
        logits = (2.0 * inside - 1.0) * self.logit
        return logits.expand(image.shape[0], task_embeddings.shape[1], *image.shape[2:])


class IntensityMatch(nn.Module):
    """The "read the intensities" baseline: each class predicted on the query's foreground voxels whose intensity
    falls in the set of intensities that segments the class best in the references, no model.

    :meth:`encode_task` takes, per class, the histogram (``bins`` bins over [0, 1]) of the references' intensities
    inside the class and inside the rest of their foreground (``image > threshold``), pooled over the references
    that show the class; it ranks the bins by their likelihood ratio (class against rest) and keeps the top-ranked
    bins whose union has the highest Dice with the class in the references (the best intensity classifier fitted to
    the references, as in-context tuning fits the model to them; a Bayes rule with the class's prior would predict
    nothing for a class that fills a few percent of the foreground). :meth:`segment` labels a foreground voxel of
    the query with the class when its intensity bin was kept. Structures told apart by their intensity alone (gray
    and white matter in a T1 image, a contrast-filled structure in CT) score high this way wherever they lie, so a
    model must beat it, with :class:`CopyReference` and :class:`Foreground`, before its Dice says it used more than
    the intensities.

    Args:
        bins: histogram bins over [0, 1] (preprocessed intensities). Default 32.
        threshold: foreground is ``image > threshold``. Default 0.1, as :class:`Foreground`.
        logit: magnitude of the returned logits. Default 20.
    """

    def __init__(self, bins: int = 32, threshold: float = 0.1, logit: float = 20.0) -> None:
        super().__init__()
        self.bins, self.threshold, self.logit = int(bins), float(threshold), logit

    def _bin(self, image: torch.Tensor) -> torch.Tensor:
        return (image.clamp(0.0, 1.0) * self.bins).long().clamp_max(self.bins - 1)

    def encode_task(self, ref_image: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
        """``(B, R, 1, *S)`` images and ``(B, R, K, *S)`` masks -> ``(B, K, bins)``: 1 for the intensity bins kept for
        each class, 0 elsewhere (all 0 for a class no reference shows)."""
        if ref_mask.dim() != ref_image.dim():
            ref_image, ref_mask = ref_image.unsqueeze(1), ref_mask.unsqueeze(1)
        bins = self._bin(ref_image).flatten(2)  # (B, R, N)
        inside = (ref_image > self.threshold).flatten(2).float()  # (B, R, N)
        masks = ref_mask.flatten(3).float() * inside[:, :, None]  # (B, R, K, N)
        shown = (masks.amax(-1) > 0).float()[..., None]  # (B, R, K, 1): references that show the class
        one_hot = torch.nn.functional.one_hot(bins, self.bins).float()  # (B, R, N, bins)
        h_class = torch.einsum("brkn,brnh->brkh", masks, one_hot)
        h_rest = torch.einsum("brkn,brnh->brkh", (inside[:, :, None] - masks).clamp_min(0.0), one_hot)
        h_class, h_rest = (h_class * shown).sum(1), (h_rest * shown).sum(1)  # (B, K, bins) voxel counts
        n_class, n_rest = h_class.sum(-1, keepdim=True), h_rest.sum(-1, keepdim=True)
        smooth = 1e-3  # an intensity never seen in one of the two still has a finite ratio
        ratio = (h_class / n_class.clamp_min(1.0) + smooth) / (h_rest / n_rest.clamp_min(1.0) + smooth)
        order = torch.sort(ratio, dim=-1, descending=True, stable=True).indices
        tp = h_class.gather(-1, order).cumsum(-1)  # class voxels in the top 1..bins bins
        predicted = tp + h_rest.gather(-1, order).cumsum(-1)
        dice = 2.0 * tp / (predicted + n_class).clamp_min(1.0)
        best = dice.argmax(-1, keepdim=True)  # the shortest best prefix: bins no reference shows are left out
        ranks = torch.arange(self.bins, device=ref_image.device)
        keep = torch.zeros_like(ratio).scatter(-1, order, (ranks <= best).to(ratio.dtype))
        return keep * (n_class > 0).to(keep.dtype)

    def segment(self, image: torch.Tensor, task_embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *S)`` query and ``(1 or B, K, bins)`` kept bins -> ``(B, K, *S)`` logits."""
        keep = task_embeddings.expand(image.shape[0], -1, -1)
        bins = self._bin(image).flatten(1)  # (B, N)
        picked = torch.gather(keep, 2, bins[:, None].expand(-1, keep.shape[1], -1))  # (B, K, N)
        inside = (image > self.threshold).flatten(1)[:, None]
        logits = torch.where(inside & (picked > 0.5), self.logit, -self.logit)
        return logits.to(image.dtype).view(image.shape[0], keep.shape[1], *image.shape[2:])


# each baseline: the prompt strategy whose references it uses, and the network it swaps in for the model
_BASELINE_RUNS: dict[str, tuple[str, type[nn.Module]]] = {
    "copy_reference": ("ensemble", CopyReference),
    "copy_reference_one_shot": ("one_shot", CopyReference),
    "foreground": ("one_shot", Foreground),
    "intensity_match": ("one_shot", IntensityMatch),
}
BASELINES: dict[str, str] = {name: strategy for name, (strategy, _) in _BASELINE_RUNS.items()}
"""No-model baselines, each with the prompt strategy whose references it uses: all of them (majority vote) or the
one-shot reference of each class; ``foreground`` uses the references only for their classes, ``intensity_match``
their intensities inside and outside each class."""


def per_class_dice_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per class, one column per strategy (and baseline), plus a mean row."""
    strategies = list(results)
    classes = sorted({c for r in results.values() for c in r if c != "mean"})
    lines = ["| class | " + " | ".join(strategies) + " |", "|---" * (len(strategies) + 1) + "|"]
    for c in classes + ["mean"]:
        cells = [results[s].get(c, math.nan) for s in strategies]
        lines.append(f"| {c} | " + " | ".join("n/a" if math.isnan(x) else f"{x:.3f}" for x in cells) + " |")
    return "\n".join(lines) + "\n"


def _per_class(evaluator: InContextEvaluator, metric_name: str) -> tuple[dict[str, float], int]:
    details = evaluator.state.metric_details.get(metric_name)
    if details is None:
        raise KeyError(f"the evaluator has no per-case details for '{metric_name}' (set save_details=True).")
    per_case = torch.as_tensor(details, dtype=torch.float32).reshape(-1, len(evaluator.state.class_names))
    row = {name: _nanmean(per_case[:, k]) for k, name in enumerate(evaluator.state.class_names)}
    row["mean"] = _nanmean(torch.tensor([v for v in row.values()]))
    return row, per_case.shape[0]


def _run_baseline(evaluator: InContextEvaluator, baseline: str, strategy: str) -> None:
    """One evaluator run with the network swapped for the baseline's (:class:`CopyReference`, :class:`Foreground`)
    and the prompt set to ``strategy``."""
    network, previous = evaluator.network, evaluator.prompt.strategy
    evaluator.network = _BASELINE_RUNS[baseline][1]().to(evaluator.state.device)
    evaluator.prompt.strategy = strategy
    try:
        evaluator.run()
    finally:
        evaluator.network, evaluator.prompt.strategy = network, previous


def evaluate_strategies(
    evaluator: InContextEvaluator,
    strategies: Sequence[str],
    output_dir: str | os.PathLike,
    metric_name: str = "val_per_class_dice",
    filename: str = "dice_per_strategy",
    baselines: Sequence[str] = ("copy_reference",),
) -> dict[str, dict[str, float]]:
    """Run ``evaluator`` once per strategy and per baseline; write per-class Dice as ``<filename>.json`` and ``.md``.

    ``metric_name`` names a metric of the evaluator created with ``save_details=True`` (e.g. ``MeanDice``); the
    per-case, per-class values are averaged over cases, ignoring classes absent from a case's ground truth.

    Baselines (:data:`BASELINES`) use no model: ``copy_reference`` predicts, for each class, the majority vote of
    the references' masks (all references the ensemble strategy uses), ``copy_reference_one_shot`` the mask of the
    one reference the one-shot strategy uses. The masks are the references' label maps after the evaluation's own
    preprocessing, taken as they are on the query's preprocessed grid, and are scored by the same evaluator and
    metric as the strategies. ``foreground`` (:class:`Foreground`) predicts every class on the whole foreground of
    the query: what segmenting the body, not the structure, scores. They need references; without any (memory
    only) they are left out with a warning.

    Returns:
        ``{strategy or baseline: {class: Dice, "mean": mean over classes}}``, strategies first, as written to JSON;
        the Markdown table has one column per entry and is also logged.
    """
    baseline_runs = [(name, look_up_option(name, BASELINES)) for name in baselines]
    results: dict[str, dict[str, float]] = {}
    # every strategy runs and the files are written before a run with failed cases fails (fail_on_errors)
    fail_on_errors, evaluator.fail_on_errors = evaluator.fail_on_errors, False
    try:
        _sweep(evaluator, strategies, baseline_runs, metric_name, results)
    finally:
        evaluator.fail_on_errors = fail_on_errors
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = per_class_dice_table(results)
    (out / f"{filename}.json").write_text(json.dumps(results, indent=4))
    (out / f"{filename}.md").write_text(table)
    logger.info("per-class Dice (%s):\n%s", out / f"{filename}.md", table)
    if fail_on_errors:
        evaluator.raise_failures()
    return results


def _sweep(evaluator: InContextEvaluator, strategies: Sequence[str], baseline_runs: list[tuple[str, str]],
           metric_name: str, results: dict[str, dict[str, float]]) -> None:
    for strategy in strategies:
        evaluator.prompt.strategy = strategy
        evaluator.run()
        results[strategy], cases = _per_class(evaluator, metric_name)
        logger.info("%s: mean Dice %.4f over %d cases", strategy, results[strategy]["mean"], cases)
    for baseline, strategy in baseline_runs:
        if evaluator.prompt.references is None:
            logger.warning("%s needs references: no references file is set, so it is left out", baseline)
            continue
        _run_baseline(evaluator, baseline, strategy)
        results[baseline], cases = _per_class(evaluator, metric_name)
        logger.info("%s (no model): mean Dice %.4f over %d cases", baseline, results[baseline]["mean"], cases)
