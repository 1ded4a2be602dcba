"""The CT report encoder bundle as a user runs it: training learns retrieval, evaluation, inference with bad input,
and multi_gpu_train.json under torchrun (2 CPU processes, gloo)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data import generate_ct_report_dataset
from tests.bundles.runner import BUNDLES, assert_kept, snapshot
from tests.bundles.runner import bundle_run as run_bundle
from tests.bundles.runner import deterministic, torchrun_bundle


BUNDLE = BUNDLES / "ct_report_encoder"
TRAIN = ["--max_epochs", "12", "--val_interval", "12", "--batch_size", "8", "--learning_rate", "0.001"]
pytestmark = pytest.mark.xdist_group(name="ct_encoder_bundle")


def bundle_run(config, *args, check=True):
    return run_bundle(BUNDLE, config, *args, check=check)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """60 training and 100 held-out (validation) cases at the bundle's grid, plus one held-out case with an empty
    report. Many held-out cases make Recall@K a steady measure: with 100, chance R@10 is 0.10 +- 0.03."""
    out = tmp_path_factory.mktemp("ct_reports")
    generate_ct_report_dataset(out, num_cases=160, shape=(32, 64, 64), seed=3, split=(0.375, 0.625, 0.0))
    datalist = json.loads((out / "datalist.json").read_text())
    shutil.copy(out / "images" / "ct_000.nii.gz", out / "images" / "empty_report.nii.gz")
    bad = dict(datalist["training"][0], case_id="empty_report", image="images/empty_report.nii.gz")
    datalist["validation"].append({**bad, "report": {**bad["report"], "impression": ""}})
    (out / "datalist.json").write_text(json.dumps(datalist))
    return out


@pytest.fixture(scope="module")
def fixed() -> Iterator[list[str]]:
    """One thread and deterministic algorithms for the runs whose figures are asserted (measured twice: the same
    figures)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield deterministic(BUNDLE, monkeypatch)


@pytest.fixture(scope="module")
def trained(data, fixed, tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("models")
    bundle_run("train.json", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir", str(ckpt / "tb"),
               *TRAIN, *fixed)
    return ckpt


def _evaluate(data: Path, out: Path, ckpt_path: str, fixed: list[str]) -> dict:
    proc = bundle_run(["train.json", "evaluate.json"], "--dataset_dir", str(data), "--ckpt_path", ckpt_path,
                      "--output_dir", str(out), "--evaluate_split", "validation", *fixed, check=False)
    # the empty report fails alone: the others are scored and written, then the run exits 1 naming it
    assert proc.returncode == 1 and "1 case(s) failed, 100 completed" in proc.stderr, proc.stderr[-3000:]
    table = (out / "retrieval_metrics.md").read_text()
    assert "| text to image |" in table and "| step-patch AUC" in table
    metrics = json.loads((out / "retrieval_metrics.json").read_text())
    # every held-out case's reasoning steps are scored against its own patches (NaN would mean none was)
    assert metrics["step_patch_steps"] > 0 and 0.0 <= metrics["step_patch_auc"] <= 1.0, metrics
    return metrics


def test_training_learns_heldout_retrieval_and_region_alignment_above_chance(data, trained, fixed, tmp_path):
    """A 12-epoch CPU run on 60 cases, measured on the 100 held-out ones: reports find their volume (text->image
    Recall@10) and region sentences find their region above chance and above the untrained model. The shipped
    weights' longer run reaches higher; its numbers are in the docs.

    Deterministic (two runs give the same weights). Measured over training seeds 0-4 (``--seed``, same data; the
    test runs the config's seed 0), untrained R@10 0.10 (chance 0.10) and region alignment 0.04 (chance 0.125):

    - R@10: 0.19, 0.22, 0.18, 0.18, 0.16 (min 0.16, median 0.18, max 0.22).
    - region alignment: 0.916, 0.910, 0.876, 0.949, 0.871 (min 0.871, median 0.910, max 0.949).

    At learning rate 0.003, as this test ran before, R@10 spread over 0.10-0.21 (seed 3 at chance) and region
    alignment over 0.747-0.938. The R@10 threshold (0.14, chance + 0.04: above chance by more than its standard
    deviation, 0.03) sits 0.02 below the worst seed; the region threshold (chance + 0.6 = 0.725) about 0.15 below.
    """
    assert (trained / "model.pt").is_file()
    learned = _evaluate(data, tmp_path / "trained", str(trained / "model.pt"), fixed)
    untrained = _evaluate(data, tmp_path / "untrained", "", fixed)
    for metrics in (learned, untrained):
        assert metrics["cases"] == 100 and metrics["chance_R@10"] == pytest.approx(10 / 100)
        assert [f["source"] for f in metrics["failed"]] == [str(data / "images" / "empty_report.nii.gz")]
        assert "empty impression" in metrics["failed"][0]["error"]
        assert 0.0 <= metrics["text_to_image_R@5"] <= metrics["text_to_image_R@10"] <= 1.0
    # seed 0: R@10 0.19, region alignment 0.916
    assert learned["text_to_image_R@10"] >= learned["chance_R@10"] + 0.04, learned
    assert learned["text_to_image_R@10"] >= untrained["text_to_image_R@10"] + 0.04, (learned, untrained)
    chance = learned["chance_region_alignment"]
    assert learned["region_alignment_accuracy"] >= chance + 0.6, learned
    assert learned["region_alignment_accuracy"] >= untrained["region_alignment_accuracy"] + 0.6, (learned, untrained)


def _write(path: Path, array: np.ndarray, dtype=np.int16) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(dtype), np.diag([5.0, 5.0, 5.0, 1.0])), str(path))
    return str(path)


def _bad_cases(root: Path, sample: Path) -> list[dict]:
    image = nib.load(str(sample / "images" / "ct_000.nii.gz")).get_fdata()
    mask = nib.load(str(sample / "masks" / "ct_000.nii.gz")).get_fdata()
    nan_image = image.astype(np.float32)
    nan_image[5, 5, 5] = np.nan
    high_ids = mask.copy()
    high_ids[0, 0, 0] = 12
    return [
        {"image": _write(root / "grid.nii.gz", image), "mask": _write(root / "grid_mask.nii.gz", mask[:32])},
        {"image": _write(root / "ids.nii.gz", image), "mask": _write(root / "ids_mask.nii.gz", high_ids, np.uint8)},
        {"image": _write(root / "tiny.nii.gz", image[:6, :6, :2])},
        {"image": _write(root / "nan.nii.gz", nan_image, np.float32)},
    ]


def test_inference_writes_embeddings_index_topk_and_reports_bad_input(tmp_path):
    sample = BUNDLE / "sample"
    good = json.loads((sample / "volumes.json").read_text())["test"]
    queries = [{k: str(sample / v) for k, v in item.items()} for item in good] + _bad_cases(tmp_path / "bad", sample)
    (tmp_path / "queries.json").write_text(json.dumps({"test": queries}))
    out = tmp_path / "out"
    proc = bundle_run("inference.json", "--images", str(tmp_path / "queries.json"), "--output_dir", str(out),
                      "--top_k", "4", check=False)
    assert proc.returncode == 1 and "4 case(s) failed" in proc.stderr  # after every good case completed

    report = json.loads((out / "run_report.json").read_text())
    assert len(report["completed"]) == len(good)
    errors = {Path(f["source"]).name: f["error"] for f in report["failed"]}
    assert set(errors) == {"grid.nii.gz", "ids.nii.gz", "tiny.nii.gz", "nan.nii.gz"}
    assert "same grid" in errors["grid.nii.gz"]
    assert "above the configured number of regions 8" in errors["ids.nii.gz"]
    assert "too small" in errors["tiny.nii.gz"] and "[4, 8, 8]" in errors["tiny.nii.gz"]
    assert "non-finite" in errors["nan.nii.gz"]

    index = json.loads((out / "embeddings_index.json").read_text())
    assert index["embedding_dim"] == 128 and len(index["cases"]) == len(good)
    for case in index["cases"]:
        assert np.load(case["global"]).shape == (128,) and np.load(case["regions"]).shape == (8, 128)
        assert Path(case["preview"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert case["regions_present"] == list(range(1, 9))
    answers = json.loads((out / "text_query_topk.json").read_text())
    defaults = json.loads((BUNDLE / "configs" / "inference.json").read_text())["text_queries"]
    assert [a["query"] for a in answers] == defaults
    names = {c["case"] for c in index["cases"]}
    for answer in answers:
        scores = [hit["score"] for hit in answer["top_k"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True)
        assert {hit["case"] for hit in answer["top_k"]} <= names
    # outputs are never replaced unless asked: every case is skipped and listed, the index is kept
    before = snapshot(out)
    volumes = tmp_path / "good.json"
    volumes.write_text(json.dumps({"test": queries[:len(good)]}))
    bundle_run("inference.json", "--images", str(volumes), "--output_dir", str(out), "--overwrite", "false")
    assert_kept(before, out)
    report = json.loads((out / "run_report.json").read_text())
    assert not report["completed"] and len(report["skipped"]) == len(good)


def test_multi_gpu_train_runs_under_torchrun_on_cpu_and_trains_the_seg_head(tmp_path):
    """Two CPU processes, two steps each: rank 0 alone writes checkpoints, and the auxiliary segmentation head is
    trained under DDP (``--seg_weight`` reaches the model's loss): AdamW holds moments only for the parameters it
    stepped with a gradient."""
    data = generate_ct_report_dataset(tmp_path / "data", num_cases=8, shape=(32, 64, 64), seed=5,
                                      split=(0.75, 0.25, 0.0)).parent
    models = tmp_path / "models"
    torchrun_bundle(BUNDLE, "--dataset_dir", str(data), "--ckpt_dir", str(models), "--output_dir",
                    str(tmp_path / "eval"), "--max_epochs", "1", "--val_interval", "1", "--batch_size", "2",
                    "--seg_weight", "1.0")
    written = sorted(p.name for p in models.glob("*.pt"))
    assert written == ["checkpoint_epoch=1.pt", "model.pt", "text.pt"]
    checkpoint = torch.load(models / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    shapes = [v.shape for v in checkpoint["model"].values()]
    moments = [s["exp_avg_sq"] for s in checkpoint["optimizer"]["state"].values()]
    for name in ("seg_head.weight", "seg_head.bias"):
        shape = checkpoint["model"][name].shape
        assert shapes.count(shape) == 1, name  # the shape names the head's parameter in the optimizer state
        stepped = [m for m in moments if m.shape == shape]
        assert len(stepped) == 1 and stepped[0].abs().sum() > 0, f"{name} received no gradient"
