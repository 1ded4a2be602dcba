"""Evaluation of volume-report encoders: per-case embeddings of both towers, retrieval metrics as JSON and Markdown."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch
from torch import nn

from common.data.report_text import report_text_batch
from common.engines.contrastive import EncodingInferer, embed_texts
from common.engines.robust import RobustEvaluator
from common.engines.utils import unwrap
from common.metrics.retrieval import retrieval_table

__all__ = ["RetrievalEvaluator", "evaluate_retrieval"]

logger = logging.getLogger(__name__)


class RetrievalEvaluator(RobustEvaluator):
    """Embeds each case's volume (``inferer(image, network, mask)``, a :class:`EncodingInferer` over
    ``network.encode`` with the region mask) and report (impression and region
    sentences, through ``text_encoder``), for :class:`common.metrics.RetrievalMetric`.

    The output of a completed case holds ``image_global``, ``text_global`` ``(B, D)``, ``impressions``,
    ``image_region``, ``region_text`` ``(B, R, D)`` and ``region_valid`` (mentioned by the report and present in
    the mask), ``region_present`` ``(B, R)``; when the inferer returns ``local`` and ``assignment`` (as
    ``CTViT.encode`` does), also ``image_local``, ``assignment`` and the reasoning steps' ``step_text``,
    ``step_batch`` and ``step_region``, for the metric's step-patch AUC. Failed cases are skipped and listed as in
    :class:`RobustEvaluator`.

    Args:
        text_encoder: a :class:`common.networks.TextEncoder`, or an :class:`ImageTextModel` whose text side (and
            text cache) is used.
        inferer: the image side, ``inferer(image, network, mask) -> {"global", "region", "region_present"}``.
            Default :class:`EncodingInferer` (``network.encode``).
        mask_key: batch key of the region masks. Default ``"mask"``.
        report_key: batch key of the reports. Default ``"report"``.
        Others as ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(self, *args, text_encoder: nn.Module, mask_key: str = "mask", report_key: str = "report",
                 **kwargs) -> None:
        if kwargs.get("inferer") is None:
            kwargs["inferer"] = EncodingInferer()
        super().__init__(*args, **kwargs)
        self.text_encoder = text_encoder
        self.mask_key = mask_key
        self.report_key = report_key

    def _process(self, engine: RetrievalEvaluator, batchdata: dict) -> dict:
        move = {"device": engine.state.device, "non_blocking": engine.non_blocking}
        image = batchdata["image"].to(**move)
        mask = batchdata.get(self.mask_key)
        mask = mask.to(**move) if isinstance(mask, torch.Tensor) else None
        reports = batchdata[self.report_key]
        engine.network.eval()
        unwrap(self.text_encoder).eval()
        with torch.no_grad(), torch.autocast("cuda", enabled=engine.amp and image.device.type == "cuda"):
            out = engine.inferer(image, engine.network, mask)  # an EncodingInferer
            r = out["region"].shape[1]
            texts = report_text_batch(reports, r)
            b, m = len(texts["impressions"]), len(texts["region_texts"])
            embedded = embed_texts(self.text_encoder,
                                   texts["impressions"] + texts["region_texts"] + texts["step_texts"])
            embedded = embedded.to(out["global"].dtype)
            region_text = out["region"].new_zeros(out["region"].shape)
            if m:
                region_text[texts["region_batch"], texts["region_ids"] - 1] = embedded[b: b + m]
        engine.state.output = {
            "image_global": out["global"], "text_global": embedded[:b], "impressions": texts["impressions"],
            "image_region": out["region"], "region_text": region_text,
            "region_valid": texts["region_mentioned"].to(out["region_present"].device) & out["region_present"],
            "region_present": out["region_present"],
        }
        if "local" in out and "assignment" in out:
            engine.state.output.update({
                "image_local": out["local"], "assignment": out["assignment"], "step_text": embedded[b + m:],
                "step_batch": texts["step_batch"], "step_region": texts["step_region"],
            })
        return engine.state.output


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def evaluate_retrieval(
    evaluator: RetrievalEvaluator,
    output_dir: str | os.PathLike,
    metric_name: str = "retrieval",
    filename: str = "retrieval_metrics",
) -> dict:
    """Run ``evaluator`` and write its :class:`common.metrics.RetrievalMetric` results (registered under
    ``metric_name`` with ``name=None``) as ``<filename>.json`` and a Markdown table ``<filename>.md``, with the
    completed and failed cases; then fails as the evaluator would (``fail_on_errors``) when cases failed."""
    fail_on_errors, evaluator.fail_on_errors = evaluator.fail_on_errors, False
    try:
        evaluator.run()
    finally:
        evaluator.fail_on_errors = fail_on_errors
    metrics = evaluator.state.metrics.get(metric_name)
    if not isinstance(metrics, dict):
        raise KeyError(f"the evaluator has no '{metric_name}' RetrievalMetric with name=None.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {k: _plain(v) for k, v in metrics.items()}
    report = {**result, "failed": list(getattr(evaluator.state, "case_failures", []))}
    (out / f"{filename}.json").write_text(json.dumps(report, indent=4) + "\n")
    (out / f"{filename}.md").write_text(retrieval_table(metrics))
    logger.info("retrieval over %s cases: %s", result.get("cases"), json.dumps(result))
    if fail_on_errors:
        evaluator.raise_failures()
    return report
