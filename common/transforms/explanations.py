"""Per-image explanation outputs of concept-based classifiers: a JSON report and PNG heatmaps."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.transforms.outputs import output_path
from common.transforms.validation import source_name
from common.visualize.preview import save_overlay_2d

__all__ = ["SaveConceptExplanationd"]


def _hw(x) -> np.ndarray:
    """MONAI 2D arrays are (x, y) = (W, H); pictures and reports use (H, W)."""
    return np.asarray(torch.as_tensor(x).detach().float().cpu()).T


class SaveConceptExplanationd(MapTransform):
    """Write ``<name>_explanation.json`` and ``<name>_explanation.png`` for one explained image.

    The JSON holds the disease probabilities, the concepts with their probability (detected when
    >= ``threshold``), the ``top_k`` prototypes by similarity, and for each predicted disease the prototypes that
    contributed most (task-head weight x similarity, the exact terms of its logit). The PNG shows the image with the
    CAMs of the detected concepts and the similarity maps of the best prototypes.

    Args:
        keys: ``(image_key, pred_key)``; ``pred`` is the dict of ``CSRNet.explain`` for one image.
        output_dir: output folder.
        network: the CSRNet (its task head weights give the contributions).
        concept_names, disease_names: names in model order.
        threshold: probability at which a concept is detected and a disease predicted. Default 0.5.
        top_k: prototypes listed (and contributions per disease). Default 5.
        max_maps: heatmap panels of each kind in the PNG. Default 3.
        roi_key: key of the image's ROI (a loaded mask), whose file is reported when present.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        network: torch.nn.Module,
        concept_names: Sequence[str],
        disease_names: Sequence[str],
        threshold: float = 0.5,
        top_k: int = 5,
        max_maps: int = 3,
        roi_key: str = "roi",
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys should be (image_key, pred_key), got {self.keys}.")
        self.output_dir = output_dir
        self.network = network
        self.concepts = list(concept_names)
        self.diseases = list(disease_names)
        self.threshold = threshold
        self.top_k = top_k
        self.max_maps = max_maps
        self.roi_key = roi_key

    def _prototype_name(self, j: int) -> tuple[str, str]:
        """Prototype ``j`` as ``"<concept>#<i>"`` and its concept (prototypes are grouped by concept)."""
        m = self.network.prototypes_per_concept
        return f"{self.concepts[j // m]}#{j % m}", self.concepts[j // m]

    def report(self, pred: Mapping[str, torch.Tensor]) -> dict:
        """The JSON report of one image's ``explain`` outputs."""
        disease_p = torch.sigmoid(pred["logits"].float()).tolist()
        concept_p = torch.sigmoid(pred["concept_logits"].float()).tolist()
        scores = pred["similarity_scores"].float()
        weights = self.network.task_head.weight.detach().float().cpu()
        top = torch.argsort(scores, descending=True)[: self.top_k].tolist()
        contributions = {}
        for c, name in enumerate(self.diseases):
            if disease_p[c] < self.threshold:
                continue
            terms = weights[c] * scores.cpu()
            contributions[name] = [
                {
                    "prototype": self._prototype_name(j)[0],
                    "concept": self._prototype_name(j)[1],
                    "weight": round(float(weights[c, j]), 5),
                    "similarity": round(float(scores[j]), 5),
                    "contribution": round(float(terms[j]), 5),
                }
                for j in torch.argsort(terms, descending=True)[: self.top_k].tolist()
            ]
        state = self.network.concept_intervention.tolist()
        return {
            "diseases": {n: round(p, 5) for n, p in zip(self.diseases, disease_p)},
            "predicted": [n for n, p in zip(self.diseases, disease_p) if p >= self.threshold],
            "concepts": {
                n: {"probability": round(p, 5), "detected": p >= self.threshold}
                for n, p in zip(self.concepts, concept_p)
            },
            "top_prototypes": [
                {"prototype": self._prototype_name(j)[0], "concept": self._prototype_name(j)[1],
                 "similarity": round(float(scores[j]), 5)}
                for j in top
            ],
            "contributions": contributions,
            "intervention": {
                "off": [n for n, s in zip(self.concepts, state) if s < 0],
                "on": [n for n, s in zip(self.concepts, state) if s > 0],
            },
        }

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image, pred = d[self.keys[0]], d[self.keys[1]]
        source = source_name(image)
        report = {"source": source, **self.report(pred)}
        if d.get(self.roi_key) is not None:
            report["roi"] = source_name(d[self.roi_key])
        json_path = output_path(source, self.output_dir, "explanation", ".json")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=4))
        concept_p = torch.sigmoid(pred["concept_logits"].float())
        heatmaps = {}
        for k in torch.argsort(concept_p, descending=True)[: self.max_maps].tolist():
            heatmaps[f"CAM {self.concepts[k]} (p={float(concept_p[k]):.2f})"] = _hw(pred["cams"][k])
        best = torch.argsort(pred["similarity_scores"].float(), descending=True)[: self.max_maps].tolist()
        for j in best:
            score = float(pred["similarity_scores"][j])
            heatmaps[f"{self._prototype_name(j)[0]} (s={score:.2f})"] = _hw(pred["similarity_maps"][j])
        title = ", ".join(f"{n} {p:.2f}" for n, p in report["diseases"].items() if p >= self.threshold) or "no finding"
        save_overlay_2d(
            _hw(torch.as_tensor(image)[0]),
            output_path(source, self.output_dir, "explanation", ".png"),
            heatmaps=heatmaps,
            title=f"{Path(source).name}: {title}",
            overwrite=True,
        )
        return d
