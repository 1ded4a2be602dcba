"""Report-text utilities shared by the CT report converters and the engines that train and score on reports.

:func:`split_sentences` cuts a report into sentences; :func:`region_texts` joins a report datalist's findings
sentences per region id; :func:`report_text_batch` turns a batch of such reports into the texts and indices of the
global, region and reasoning-step levels of :class:`common.losses.contrastive.MultiLevelContrastiveLoss`. A report is
the ``"report"`` entry of a datalist item (:mod:`common.data.synthetic_ct_reports`, :mod:`common.data.ct_rate`):
``{"findings": [{"text", "region", "region_id"}, ...], "impression": str, "cot": [{"step", "mask_region"}, ...]}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

__all__ = ["region_texts", "report_text_batch", "split_sentences"]


def split_sentences(text: str) -> list[str]:
    """Sentences of a report: split after ``.``, ``!`` or ``?`` followed by white space ("3.5 mm" stays whole)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def region_texts(report: Mapping) -> dict[int, str]:
    """Region id -> the report's findings sentences about it, joined; for the region-level loss (ids >= 1 only)."""
    texts: dict[int, list[str]] = {}
    for finding in report.get("findings", []):
        if int(finding["region_id"]) > 0:
            texts.setdefault(int(finding["region_id"]), []).append(finding["text"])
    return {k: " ".join(v) for k, v in sorted(texts.items())}


def report_text_batch(reports: Sequence[Mapping], num_regions: int) -> dict:
    """Texts and indices of a batch of reports for :class:`common.losses.contrastive.MultiLevelContrastiveLoss`.

    Returns:
        ``impressions``: ``B`` strings (global level); ``region_texts``: ``M`` strings, one per mentioned region of
        each report (:func:`region_texts`), at ``region_batch`` / ``region_ids`` ``(M,)`` long (ids ``1..R``) and
        ``region_mentioned`` ``(B, R)`` bool; ``step_texts``: ``S`` reasoning steps with ``step_batch`` and
        ``step_region`` ``(S,)`` long (0 = no region). Scatter the ``M`` text embeddings into ``(B, R, D)`` with
        ``region_text[region_batch, region_ids - 1] = embeddings``.
    """
    impressions, texts, region_batch, region_ids, steps, step_batch, step_region = [], [], [], [], [], [], []
    for b, report in enumerate(reports):
        impressions.append(str(report["impression"]))
        for region_id, text in region_texts(report).items():
            if not 1 <= region_id <= num_regions:
                raise ValueError(f"region ids should be in [1, {num_regions}], got {region_id} in report {b}.")
            texts.append(text)
            region_batch.append(b)
            region_ids.append(region_id)
        for step in report.get("cot", []):
            if not 0 <= int(step["mask_region"]) <= num_regions:
                raise ValueError(f"mask_region should be in [0, {num_regions}], got {step['mask_region']} in report "
                                 f"{b}.")
            steps.append(str(step["step"]))
            step_batch.append(b)
            step_region.append(int(step["mask_region"]))
    mentioned = torch.zeros(len(reports), num_regions, dtype=torch.bool)
    mentioned[torch.tensor(region_batch, dtype=torch.long), torch.tensor(region_ids, dtype=torch.long) - 1] = True
    return {
        "impressions": impressions,
        "region_texts": texts,
        "region_batch": torch.tensor(region_batch, dtype=torch.long),
        "region_ids": torch.tensor(region_ids, dtype=torch.long),
        "region_mentioned": mentioned,
        "step_texts": steps,
        "step_batch": torch.tensor(step_batch, dtype=torch.long),
        "step_region": torch.tensor(step_region, dtype=torch.long),
    }
