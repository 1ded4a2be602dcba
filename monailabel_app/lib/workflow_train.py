"""Train a bundle from MONAI Label with its own ``train.json``.

MONAI Label's ``BundleTrainTask`` already runs ``train.json`` with the overrides it passes (``train#trainer#max_epochs``
as ``max_epochs``, ``train#dataset#data`` and ``validate#dataset#data`` from its datastore, ``device``,
``train#handlers`` with a ``CheckpointLoader`` of ``models/model.pt``). This task adds what our bundles need on top:
the fields each datalist item carries besides ``image``/``label`` (IRIS's ``class_names``), a run folder outside the
bundle for checkpoints and logs, and a few request keys that may override config ids of the same name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from monailabel.tasks.train.bundle import BundleTrainTask

__all__ = ["BundleWorkflowTrainTask"]

logger = logging.getLogger(__name__)


class BundleWorkflowTrainTask(BundleTrainTask):
    """One bundle's ``configs/train.json`` as a MONAI Label train task.

    Args:
        path: bundle root.
        conf: the app's configuration.
        run_dir: folder receiving one sub-folder per training run (``output_dir`` and ``ckpt_dir`` of the run).
        item_fields: fields added to every datastore item, e.g. ``{"class_names": {"1": "liver"}}``.
        request_ids: config ids a train request may override (e.g. ``episodes_per_epoch``).
    """

    def __init__(
        self,
        path: str,
        conf: dict,
        run_dir: str,
        item_fields: Mapping[str, Any] | None = None,
        request_ids: Sequence[str] = (),
    ):
        super().__init__(path, conf)
        self.run_dir = run_dir
        self.item_fields = dict(item_fields or {})
        self.request_ids = tuple(request_ids)
        self._request: dict[str, Any] = {}

    def _fetch_datalist(self, request, datastore):
        return [{**item, **self.item_fields} for item in super()._fetch_datalist(request, datastore)]

    def _update_overrides(self, overrides):
        run = os.path.join(self.run_dir, f"{os.path.basename(self.bundle_path)}_{time.strftime('%Y%m%d_%H%M%S')}")
        overrides["output_dir"] = run
        overrides["ckpt_dir"] = os.path.join(run, "checkpoints")
        overrides.update({k: self._request[k] for k in self.request_ids if k in self._request})
        logger.info("training run folder: %s", run)
        return overrides

    def __call__(self, request, datastore):
        self._request = dict(request)
        return super().__call__(request, datastore)
