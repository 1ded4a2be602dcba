"""Batching of report datasets: tensors are stacked, reports and other nested records stay per-case lists."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from monai.data import list_data_collate

from common.data.robust import ERROR_KEY

__all__ = ["REPORT_LIST_KEYS", "collate_reports"]

REPORT_LIST_KEYS = ("report", "lesions", "class_names")
"""Keys kept as plain per-case lists (variable-length nested records that default collation cannot stack)."""
logger = logging.getLogger(__name__)


def collate_reports(batch: Sequence[Mapping], list_keys: Sequence[str] = REPORT_LIST_KEYS) -> dict:
    """Collate dict items of a report dataset.

    Items that failed to load (``{"error", "source"}`` from :class:`common.data.ErrorTolerantDataset`) are dropped,
    so one bad case never takes its batch down; a batch of failures only is returned as it is (collated), for
    engines that report failures. ``list_keys`` become lists of the items' values; everything else goes through
    MONAI's ``list_data_collate``.

    Example::

        collate_reports([{"image": torch.zeros(1, 4), "report": {...}}] * 2)  # image (2, 1, 4), report: 2 dicts
    """
    good = [item for item in batch if ERROR_KEY not in item]
    if not good:
        return list_data_collate(list(batch))
    if len(good) < len(batch):
        logger.warning("dropping %d failed case(s) from a batch of %d", len(batch) - len(good), len(batch))
    kept = {k: [item[k] for item in good] for k in list_keys if k in good[0]}
    rest = [{k: v for k, v in item.items() if k not in kept} for item in good]
    return {**list_data_collate(rest), **kept}
