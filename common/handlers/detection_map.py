"""Detection mAP as an ignite metric, so MONAI evaluators can use it as their key metric."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from ignite.metrics import Metric
from monai.handlers import from_engine
from monai.utils import look_up_option

from common.engines.detection_metrics import detection_map, write_map_report

__all__ = ["DetectionMAP"]

logger = logging.getLogger(__name__)
KEYS = ("map40", "map50", "map50_95")


class DetectionMAP(Metric):
    """mAP of an evaluator's detections against its ground-truth boxes (:func:`common.engines.detection_map`).

    Reads per image ``pred`` ``(N, 6)`` (``x0, y0, x1, y1, score, class``, from ``YOLODetectionInferer``) and
    ``label`` ``(M, 5)`` (``class, x0, y0, x1, y1``, e.g. ``PrepareBatchLabelKey(label_key="boxes")``) in the same
    pixel grid. ``compute`` returns ``key`` and, with ``output_dir``, writes ``<filename>.json`` and
    ``<filename>.md`` (overall and per class) there.

    Args:
        class_names: names in class-index order.
        key: the value returned, ``"map40"`` (VinBigData's metric), ``"map50"`` or ``"map50_95"``. Default
            ``"map50"``.
        output_dir: where the reports go, or None for none. Default None.
        filename: report file stem. Default ``"metrics"``.
        max_detections: detections per image counted. Default 100.
        output_transform: engine output -> ``(preds, labels)``. Default ``from_engine(["pred", "label"])``.
    """

    def __init__(
        self,
        class_names: Sequence[str],
        key: str = "map50",
        output_dir: str | os.PathLike | None = None,
        filename: str = "metrics",
        max_detections: int = 100,
        output_transform: Callable = from_engine(["pred", "label"]),
    ) -> None:
        self.class_names = list(class_names)
        self.key = look_up_option(key, KEYS)
        self.output_dir, self.filename, self.max_detections = output_dir, filename, int(max_detections)
        self.result: dict | None = None
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._preds: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, output: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]) -> None:
        preds, labels = output
        for pred, label in zip(preds, labels):
            if label is None:
                raise ValueError("DetectionMAP needs ground-truth boxes as 'label' (see PrepareBatchLabelKey).")
            self._preds.append(torch.as_tensor(pred).detach().cpu().reshape(-1, 6))
            self._labels.append(torch.as_tensor(label).detach().cpu().reshape(-1, 5))

    def compute(self) -> float:
        self.result = detection_map(self._preds, self._labels, self.class_names, self.max_detections)
        if self.output_dir is not None:
            json_path, _ = write_map_report(self.result, self.output_dir, self.filename)
            logger.info("mAP@0.4 %.4f, mAP@0.5 %.4f, mAP@0.5:0.95 %.4f over %d image(s); report in %s",
                        self.result["map40"], self.result["map50"],
                        self.result["map50_95"], self.result["images"], json_path)
        return self.result[self.key]
