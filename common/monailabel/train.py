"""Train a bundle from MONAI Label with its own ``train.json``.

MONAI Label's ``BundleTrainTask`` already runs ``train.json`` with the overrides it passes (``train#trainer#max_epochs``
as ``max_epochs``, ``train#dataset#data`` and ``validate#dataset#data`` from its datastore, ``device``,
``train#handlers`` with a ``CheckpointLoader`` of ``models/model.pt``). This task adds what the collection's bundles
need on top: their training items (label maps from MONAI Label's datastore, or the labels
:mod:`common.monailabel.datastore` reads), fields every item carries besides them (IRIS's ``class_names``), a run
folder outside the bundle for checkpoints and logs, and a few request keys that may override config ids of the same
name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monailabel.tasks.train.bundle import BundleTrainTask

__all__ = ["BundleWorkflowTrainTask", "LABEL_MAP_SUFFIXES"]

logger = logging.getLogger(__name__)

LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd")


class BundleWorkflowTrainTask(BundleTrainTask):
    """One bundle's ``configs/train.json`` as a MONAI Label train task.

    Args:
        path: bundle root.
        conf: the app's configuration.
        run_dir: folder receiving one sub-folder per training run, ``<bundle>_<YYYYmmdd_HHMMSS>``: the run's
            ``output_dir`` (logs) with its ``ckpt_dir`` in ``checkpoints/``. The bundle's ``models/`` is not written.
        labels: reads a study's item, ``labels(image_id, image_path) -> dict | None`` (None: not an item of this
            bundle), e.g. :class:`common.monailabel.datastore.JsonLabels`. Default None: MONAI Label's image and
            final label map pairs whose label ends with one of ``label_suffixes``.
        label_suffixes: label map files accepted when ``labels`` is None. Default NIfTI and NRRD.
        item_fields: fields added to every item, e.g. ``{"class_names": {"1": "liver"}}``.
        request_ids: config ids a train request may override (e.g. ``episodes_per_epoch``).
        overrides: further overrides computed per run from the run folder and the request,
            ``overrides(run, request) -> dict`` (e.g. the detector's starting weights).
    """

    def __init__(
        self,
        path: str,
        conf: dict,
        run_dir: str,
        labels: Callable[[str, str], dict | None] | None = None,
        label_suffixes: Sequence[str] = LABEL_MAP_SUFFIXES,
        item_fields: Mapping[str, Any] | None = None,
        request_ids: Sequence[str] = (),
        overrides: Callable[[str, dict], dict] | None = None,
    ):
        super().__init__(path, conf)
        self.run_dir = run_dir
        self.labels = labels
        self.label_suffixes = tuple(label_suffixes)
        self.item_fields = dict(item_fields or {})
        self.request_ids = tuple(request_ids)
        self.extra_overrides = overrides
        self._request: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.bundle_path))

    def _fetch_datalist(self, request, datastore):
        if self.labels is None:
            pairs = [{"image": d["image"], "label": d["label"]} for d in datastore.datalist() if d]
            items = [d for d in pairs if d["label"].lower().endswith(self.label_suffixes)]
        else:
            items = []
            for image_id in sorted(datastore.list_images()):
                item = self.labels(image_id, datastore.get_image_uri(image_id))
                if item is not None:
                    items.append(item)
        if not items:
            raise ValueError(f"{self.name}: the datastore has no study labelled for this bundle "
                             "(monailabel_app/README.md lists each bundle's label files).")
        logger.info("%s: %d labelled studies", self.name, len(items))
        return [{**item, **self.item_fields} for item in items]

    def _update_overrides(self, overrides):
        run = os.path.join(self.run_dir, f"{self.name}_{time.strftime('%Y%m%d_%H%M%S')}")
        os.makedirs(run, exist_ok=True)
        overrides["output_dir"] = run
        overrides["ckpt_dir"] = os.path.join(run, "checkpoints")
        if self.extra_overrides is not None:
            overrides.update(self.extra_overrides(run, self._request))
        overrides.update({k: self._request[k] for k in self.request_ids if k in self._request})
        logger.info("training run folder: %s", run)
        return overrides

    def __call__(self, request, datastore):
        self._request = dict(request)
        return super().__call__(request, datastore)
