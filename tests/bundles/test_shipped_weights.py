"""The shipped ``models/model.pt`` of the CSR, CT report encoder, YOLO and report labeler bundles reproduce their
documented figures.

Each case regenerates the documented evaluation data with the repository's own generator command (``python -m
common.cli ...``, the command, seed and sizes of the bundle's docs/README.md Performance section), runs ``train.json``
+ ``evaluate.json`` through the bundle runner with the shipped weights as the docs' Evaluation command does, and
compares the metrics written for the test split with ``metadata.json`` ``eval_metrics``. Measured with one thread on
the 2-core VM (generation + evaluation, CPU time): CT report encoder about 40 s, YOLO about 1 min, CSR about 1 min
40 s (2000 images to generate for its 300 test images, which the generator puts last: a smaller run at the same
seed would test on images of the training split).

Evaluation is deterministic on CPU (seeded data, no augmentation, networks in eval mode), so a rerun on the same data
differs only by float summation order, and the stored figures are rounded to three decimals. Hence a tolerance of
2e-3: for the CT encoder's 24 test cases (Recall@K in steps of 1/24) it means the same number of hits, for AUC and mAP
no more than a few reordered predictions; a change of weights, data or preprocessing moves them by far more. Each case
also checks a baseline the weights must beat.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bundles.runner import BUNDLES, bundle_run

# a rerun on identical data reproduces the figure up to float noise and the stored three-decimal rounding (see above)
TOLERANCE = 2e-3

CASES = [
    pytest.param(
        "ct_report_encoder",
        ["synth_ct_reports", "--num_cases", "160", "--seed", "0"],
        "retrieval_metrics.json",
        marks=pytest.mark.xdist_group(name="ct_encoder_bundle"),
        id="ct_report_encoder",
    ),
    pytest.param(
        "yolo_cxr_detection",
        ["synth_cxr", "--num_images", "600", "--seed", "2", "--dicom_fraction", "0.1"],
        "metrics.json",
        marks=pytest.mark.xdist_group(name="yolo_bundle"),
        id="yolo_cxr_detection",
    ),
    pytest.param(
        "csr_cxr_classification",
        ["synth_cxr", "--num_images", "2000", "--seed", "1", "--concept_prob", "0.25"],
        "metrics.json",
        marks=pytest.mark.xdist_group(name="csr_bundle"),
        id="csr_cxr_classification",
    ),
]

# metadata.json ``eval_metrics`` id -> the key the evaluation writes, where the two differ
METRIC_KEYS = {"map40_test": "map40", "map50_test": "map50", "map50_95_test": "map50_95",
               "concept_macro_auc_cam": "concept_macro_auc"}


def _generate(args: list[str], out: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "common.cli", args[0], str(out), *args[1:]], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return out


def _evaluate(name: str, data: Path, out: Path, metrics_file: str) -> dict:
    bundle = BUNDLES / name
    # each evaluation reads ``<ckpt_dir>/model.pt``: here the shipped weights
    bundle_run(bundle, ["train.json", "evaluate.json"], "--dataset_dir", str(data),
               "--ckpt_dir", str(bundle / "models"), "--output_dir", str(out))
    return json.loads((out / metrics_file).read_text())


def _expected(name: str) -> dict[str, float]:
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    return {METRIC_KEYS.get(k, k): v for k, v in meta["eval_metrics"].items()}


def _beats_baseline(name: str, metrics: dict) -> None:
    if name == "ct_report_encoder":  # chance Recall@K = K / cases, chance alignment = 1 / regions present
        for direction in ("image_to_text", "text_to_image"):
            for k in (1, 5, 10):
                assert metrics[f"{direction}_R@{k}"] > metrics[f"chance_R@{k}"], (direction, k)
        assert metrics["region_alignment_accuracy"] > metrics["chance_region_alignment"]
    elif name == "yolo_cxr_detection":
        # untrained yolov5n: mAP@0.5 0.000; the 30-epoch run of test_yolo_learning.py: 0.261 (docs, Performance)
        assert metrics["images"] == 90 and metrics["map50"] > 0.261
    else:  # chance AUC 0.5; macro-F1 against calling every image positive for every disease
        assert metrics["images"] == 300
        assert metrics["disease_macro_auc"] > 0.5 and metrics["concept_macro_auc"] > 0.5
        assert metrics["thresholds_from"] == "validation"
        assert metrics["disease_macro_f1"] > metrics["disease_macro_f1_all_positive"]


@pytest.mark.slow
@pytest.mark.parametrize("name, generator, metrics_file", CASES)
def test_shipped_weights_reproduce_documented_metrics(name, generator, metrics_file, tmp_path):
    data = _generate(generator, tmp_path / "data")
    metrics = _evaluate(name, data, tmp_path / "eval", metrics_file)
    assert not metrics.get("failed"), metrics.get("failed")
    for key, value in _expected(name).items():
        assert metrics[key] == pytest.approx(value, abs=TOLERANCE), (name, key, metrics[key], value)
    _beats_baseline(name, metrics)


# metadata.json eval_metrics of the report labeler -> where its metrics.json holds the figure
REPORT_LABELER_METRICS = {
    "macro_f1_test": ("classifier", "model", "macro_f1"),
    "micro_f1_test": ("classifier", "model", "micro_f1"),
    "macro_auc_test": ("classifier", "model", "macro_auc"),
    "keyword_macro_f1_test": ("classifier", "keyword", "macro_f1"),
    "tfidf_macro_f1_test": ("classifier", "tfidf", "macro_f1"),
    "finding_span_f1_test": ("tagger", "FINDING", "f1"),
    "negation_accuracy_test": ("tagger", "negation_accuracy"),
}


@pytest.mark.slow
@pytest.mark.xdist_group(name="report_labeler_bundle")
def test_shipped_report_labeler_reproduces_its_heldout_figures_and_beats_both_baselines(tmp_path):
    """The real OpenI test split (577 reports) converted by the docs' command, scored by evaluate.json."""
    data = tmp_path / "openi"
    proc = subprocess.run([sys.executable, "-m", "common.cli", "openi_reports", "--out", str(data)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = _evaluate("cxr_report_labeler", data, tmp_path / "eval", "metrics.json")
    assert metrics["num_reports"] == 577
    meta = json.loads((BUNDLES / "cxr_report_labeler" / "configs" / "metadata.json").read_text())
    assert set(meta["eval_metrics"]) == set(REPORT_LABELER_METRICS)
    for key, path in REPORT_LABELER_METRICS.items():
        value = metrics
        for part in path:
            value = value[part]
        assert value == pytest.approx(meta["eval_metrics"][key], abs=TOLERANCE), (key, value)
    model = metrics["classifier"]["model"]["macro_f1"]
    assert model > metrics["classifier"]["keyword"]["macro_f1"] and model > metrics["classifier"]["tfidf"]["macro_f1"]
