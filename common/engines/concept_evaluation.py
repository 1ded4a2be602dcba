"""Evaluation of concept-based classifiers: disease AUC and macro-F1, concept AUC, and whether explanations point at
the lesion."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.engines.concepts import concept_similarity, csr_network
from common.metrics.multilabel import multilabel_report, roc_auc, select_thresholds

__all__ = ["evaluate_concept_model", "peak_inside"]

logger = logging.getLogger(__name__)


def peak_inside(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Whether the peak of each map falls inside its mask: ``(N, h, w)`` maps, ``(N, H, W)`` masks -> ``(N,)``.

    A feature cell counts as inside when any pixel of its footprint is in the mask (the mask is max-pooled to the
    map grid), which is what a coarse heatmap can resolve.
    """
    coarse = F.adaptive_max_pool2d(masks[:, None].float(), maps.shape[-2:])[:, 0]
    peak = maps.flatten(1).argmax(-1)
    return coarse.flatten(1).gather(1, peak[:, None])[:, 0] > 0


def _nanmean(values: Iterable[float]) -> float:
    v = [x for x in values if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


@torch.no_grad()
def evaluate_concept_model(
    network: torch.nn.Module,
    data_loader: Iterable,
    concept_names: Sequence[str],
    disease_names: Sequence[str],
    output_dir: str | os.PathLike,
    device: torch.device | str = "cpu",
    filename: str = "metrics",
    checkpoint: str | os.PathLike | None = None,
    threshold_loader: Iterable | None = None,
) -> dict:
    """Disease macro AUC and macro-F1, concept macro AUC (from CAM logits and from prototype similarity) and
    localisation.

    Macro-F1 (the CSR paper's figure) needs a decision threshold per disease: with ``threshold_loader`` (the
    validation split) each disease's threshold is the one maximising its F1 there
    (:func:`common.metrics.multilabel.select_thresholds`), never chosen on the evaluated images; without it, 0.5.
    Beside it stands the no-model baseline of calling every image positive for every disease (F1 ``2p / (1 + p)``
    at prevalence ``p``), which a classifier must beat for its F1 to mean anything.

    Localisation, over images where a concept is present and its region mask is known (``concept_mask`` in the
    batch, ``(B, K, H, W)``): the fraction whose CAM peak, and whose best prototype's similarity peak, lies in the
    region. Writes ``<filename>.json`` and a Markdown table ``<filename>.md`` to ``output_dir``. ``checkpoint``, when
    given, is a state dict (``model.pt``) loaded into the network first.
    """
    net = csr_network(network).to(device).eval()
    if checkpoint:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"{checkpoint}: weights file not found.")
        net.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=False))
    thresholds, threshold_source = [0.5] * len(disease_names), "0.5"
    if threshold_loader is not None:
        val_s, val_y = [], []
        for batch in tqdm(threshold_loader, desc="choosing thresholds", leave=False, disable=None):
            val_s.append(torch.sigmoid(net(batch["image"].to(device))).cpu())
            val_y.append(torch.as_tensor(batch["diseases"]).float())
        if val_s:
            thresholds = select_thresholds(torch.cat(val_s).numpy(), torch.cat(val_y).numpy()).tolist()
            threshold_source = "validation"
        else:
            logger.warning("the threshold loader holds no images (no validation split?): macro-F1 at 0.5.")
    k = len(concept_names)
    disease_s, disease_y, concept_s, concept_sim, concept_y = [], [], [], [], []
    cam_hits, proto_hits = [[] for _ in range(k)], [[] for _ in range(k)]
    for batch in tqdm(data_loader, desc="evaluating", leave=False, disable=None):
        out = net.explain(batch["image"].to(device))
        disease_s.append(torch.sigmoid(out["logits"]).cpu())
        disease_y.append(torch.as_tensor(batch["diseases"]).float())
        concept_s.append(torch.sigmoid(out["concept_logits"]).cpu())
        concept_sim.append(concept_similarity(out["similarity_scores"], k).cpu())
        present = torch.as_tensor(batch["concepts"]).float()
        concept_y.append(present)
        if "concept_mask" not in batch:
            continue
        masks = torch.as_tensor(batch["concept_mask"]).cpu()
        m = net.prototypes_per_concept
        best_proto = out["similarity_scores"].view(len(present), k, m).argmax(-1).cpu()  # (B, K)
        maps = out["similarity_maps"].cpu().view(len(present), k, m, *out["similarity_maps"].shape[-2:])
        for c in range(k):
            rows = (present[:, c] > 0) & (masks[:, c].flatten(1).amax(-1) > 0)
            if not rows.any():
                continue
            cam_hits[c] += peak_inside(out["cams"][rows, c].cpu(), masks[rows, c]).tolist()
            proto_maps = maps[rows, c][torch.arange(int(rows.sum())), best_proto[rows, c]]
            proto_hits[c] += peak_inside(proto_maps, masks[rows, c]).tolist()
    ds, dy = torch.cat(disease_s), torch.cat(disease_y)
    cs, csim, cy = torch.cat(concept_s), torch.cat(concept_sim), torch.cat(concept_y)
    per_disease = {n: roc_auc(ds[:, i], dy[:, i]) for i, n in enumerate(disease_names)}
    per_concept = {n: roc_auc(cs[:, i], cy[:, i]) for i, n in enumerate(concept_names)}
    per_concept_sim = {n: roc_auc(csim[:, i], cy[:, i]) for i, n in enumerate(concept_names)}
    f1 = multilabel_report(ds.numpy(), dy.numpy(), thresholds, disease_names)
    all_positive = multilabel_report(ds.numpy(), dy.numpy(), [0.0], disease_names)
    cam_rate = {n: (sum(h) / len(h) if h else math.nan) for n, h in zip(concept_names, cam_hits)}
    proto_rate = {n: (sum(h) / len(h) if h else math.nan) for n, h in zip(concept_names, proto_hits)}
    all_cam = [x for h in cam_hits for x in h]
    all_proto = [x for h in proto_hits for x in h]
    results = {
        "images": int(len(ds)),
        "disease_macro_auc": _nanmean(per_disease.values()),
        "disease_macro_f1": _none_to_nan(f1["macro_f1"]),
        "disease_macro_f1_all_positive": _none_to_nan(all_positive["macro_f1"]),
        "thresholds_from": threshold_source,
        "concept_macro_auc": _nanmean(per_concept.values()),
        "concept_macro_auc_prototypes": _nanmean(per_concept_sim.values()),
        "cam_peak_in_region": sum(all_cam) / len(all_cam) if all_cam else math.nan,
        "prototype_peak_in_region": sum(all_proto) / len(all_proto) if all_proto else math.nan,
        "per_disease_auc": per_disease,
        "per_disease": {
            n: {"auc": per_disease[n], "f1": _none_to_nan(f1["classes"][n]["f1"]),
                "f1_all_positive": _none_to_nan(all_positive["classes"][n]["f1"]),
                "threshold": f1["classes"][n]["threshold"], "positives": f1["classes"][n]["support"]}
            for n in disease_names
        },
        "per_concept": {
            n: {"auc": per_concept[n], "auc_prototypes": per_concept_sim[n], "cam_peak_in_region": cam_rate[n],
                "prototype_peak_in_region": proto_rate[n], "localised_images": len(cam_hits[i])}
            for i, n in enumerate(concept_names)
        },
    }
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{filename}.json").write_text(json.dumps(results, indent=4))
    (out_dir / f"{filename}.md").write_text(_table(results))
    logger.info(
        "disease macro-F1 %.4f (all-positive baseline %.4f, thresholds %s)", results["disease_macro_f1"],
        results["disease_macro_f1_all_positive"], threshold_source,
    )
    logger.info(
        "disease macro AUC %.4f, concept macro AUC %.4f, CAM peak in region %.3f, prototype peak in region %.3f",
        results["disease_macro_auc"], results["concept_macro_auc"], results["cam_peak_in_region"],
        results["prototype_peak_in_region"],
    )
    return results


def _none_to_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _fmt(x: float) -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else f"{x:.3f}"


def _table(r: dict) -> str:
    lines = [
        f"Images: {r['images']}. Disease macro AUC {_fmt(r['disease_macro_auc'])}; concept macro AUC "
        f"{_fmt(r['concept_macro_auc'])} (CAM) / {_fmt(r['concept_macro_auc_prototypes'])} (prototypes); "
        f"peak in drawn region: CAM {_fmt(r['cam_peak_in_region'])}, prototype {_fmt(r['prototype_peak_in_region'])}.",
        f"Disease macro-F1 {_fmt(r['disease_macro_f1'])} at thresholds from {r['thresholds_from']} (calling every "
        f"image positive: {_fmt(r['disease_macro_f1_all_positive'])}).",
        "",
        "| disease | AUC | F1 | F1 all positive | threshold | positives |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {_fmt(v['auc'])} | {_fmt(v['f1'])} | {_fmt(v['f1_all_positive'])} | {v['threshold']:.2f} | "
          f"{v['positives']} |" for n, v in r["per_disease"].items()],
        "",
        "| concept | AUC (CAM) | AUC (prototypes) | CAM peak in region | prototype peak in region | images |",
        "|---|---|---|---|---|---|",
        *[
            f"| {n} | {_fmt(v['auc'])} | {_fmt(v['auc_prototypes'])} | {_fmt(v['cam_peak_in_region'])} | "
            f"{_fmt(v['prototype_peak_in_region'])} | {v['localised_images']} |"
            for n, v in r["per_concept"].items()
        ],
    ]
    return "\n".join(lines) + "\n"
