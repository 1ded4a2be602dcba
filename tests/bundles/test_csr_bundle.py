"""The CSR bundle as a user runs it: three chained training stages, evaluation, explanations and interaction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from common.data import generate_synthetic_cxr
from tests.bundles.runner import BUNDLES, assert_kept, snapshot
from tests.bundles.runner import bundle_run as run_bundle

BUNDLE = BUNDLES / "csr_cxr_classification"
SMALL = ["--image_size", "[128,128]"]
STAGES = {1: "train.json", 2: ["train.json", "train_prototypes.json"], 3: ["train.json", "train_task.json"]}
pytestmark = pytest.mark.xdist_group(name="csr_bundle")


def bundle_run(config, *args, check=True):
    return run_bundle(BUNDLE, config, *args, check=check)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cxr")
    generate_synthetic_cxr(out, num_images=24, size=128, seed=4, split=(0.5, 0.25, 0.25), write_dicom_fraction=0.25)
    return out


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("models")
    for stage, config in STAGES.items():
        bundle_run(config, "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir", str(ckpt / "eval"),
                   "--max_epochs", "1", "--val_interval", "1", "--batch_size", "4", *SMALL)
    return ckpt


def _load(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)


def _parts(state: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


def test_stages_chain_and_freeze_what_they_should(trained):
    s1, s2, s3 = _load(trained / "stage1.pt"), _load(trained / "stage2.pt"), _load(trained / "model.pt")
    for prefix in ("backbone.", "concept_head."):  # trained in stage 1 only
        assert all(torch.equal(v, s2[k]) and torch.equal(v, s3[k]) for k, v in _parts(s1, prefix).items()), prefix
    for prefix in ("projector.", "prototypes"):  # trained in stage 2 only
        assert not all(torch.equal(v, s1[k]) for k, v in _parts(s2, prefix).items()), prefix
        assert all(torch.equal(v, s3[k]) for k, v in _parts(s2, prefix).items()), prefix
    assert not torch.equal(s2["task_head.weight"], s3["task_head.weight"])  # stage 3 trains the head
    assert torch.equal(s1["task_head.weight"], s2["task_head.weight"])


def test_evaluate_reports_auc_and_localisation(data, trained, tmp_path):
    # a model grid (96) other than the images' (128): every concept mask reaches the localisation metrics
    bundle_run(["train.json", "evaluate.json"], "--dataset_dir", str(data), "--ckpt_dir", str(trained),
               "--output_dir", str(tmp_path), "--image_size", "[96,96]")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    test = json.loads((data / "datalist.json").read_text())["test"]
    assert metrics["images"] == len(test) == 6
    for key in ("disease_macro_auc", "concept_macro_auc", "cam_peak_in_region", "prototype_peak_in_region"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["thresholds_from"] == "validation"  # thresholds for macro-F1 come from the validation split
    assert set(metrics["per_disease"]) == set(metrics["per_disease_auc"])
    assert set(metrics["per_concept"]) >= {"nodule", "effusion", "cardiomegaly"}
    for name, entry in metrics["per_concept"].items():
        assert entry["localised_images"] == sum(name in item.get("concept_masks", {}) for item in test), name


def test_evaluate_resizes_concept_masks_with_the_image(data):
    # the evaluation's own preprocessing at a grid other than the images': each concept mask lands on its lesion's
    # box scaled from 128 to 96 pixels (masks transposed, shifted or left at 128 would not)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "train.json"), str(BUNDLE / "configs" / "evaluate.json")])
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(data), "image_size": [96, 96]})
    dataset = parser.get_parsed_content("evaluate#dataset")
    test = json.loads((data / "datalist.json").read_text())["test"]
    scale, checked = 96 / 128, 0
    for item, sample in zip(test, dataset):
        masks = np.asarray(sample["concept_mask"])
        assert masks.shape == (11, 96, 96) and sample["image"].shape == (1, 96, 96)
        for concept, *box in item["boxes"]:  # [x0, y0, x1, y1] on the 128 grid; arrays are (x, y)
            extent = [np.nonzero(masks[concept].any(axis=1 - axis))[0] for axis in (0, 1)]
            for axis, pixels in enumerate(extent):
                low, high = box[axis] * scale, box[axis + 2] * scale
                assert low - 1 <= pixels.min() and pixels.max() <= high + 1, (item["image"], concept, axis)
                assert abs((pixels.min() + pixels.max()) / 2 - (low + high) / 2) <= 1.5, (item["image"], concept)
            checked += 1
    assert checked >= 10


def _infer(trained: Path, out: Path, *args: str) -> dict:
    bundle_run("inference.json", "--ckpt_path", str(trained / "model.pt"), "--output_dir", str(out), *SMALL, *args)
    return json.loads((out / "run_report.json").read_text())


def test_inference_writes_explanations(trained, tmp_path):
    report = _infer(trained, tmp_path)
    assert len(report["completed"]) == 2 and not report["failed"]
    before = snapshot(tmp_path)  # a second run with --overwrite false skips both images and replaces nothing
    again = _infer(trained, tmp_path, "--overwrite", "false")
    assert_kept(before, tmp_path)
    assert not again["completed"] and [s["source"] for s in again["skipped"]] == report["completed"]
    for source in report["completed"]:
        stem = Path(source).stem
        explanation = json.loads((tmp_path / f"{stem}_explanation.json").read_text())
        assert set(explanation["diseases"]) == {"pneumonia", "lung_tumor", "heart_failure", "tuberculosis",
                                                "other_disease", "no_finding"}
        assert len(explanation["top_prototypes"]) == 5 and explanation["top_prototypes"][0]["prototype"].count("#")
        for disease, terms in explanation["contributions"].items():
            assert disease in explanation["predicted"]
            assert all(t["contribution"] == pytest.approx(t["weight"] * t["similarity"], abs=1e-4) for t in terms)
        assert (tmp_path / f"{stem}_explanation.png").stat().st_size > 1000


def test_doctor_interaction_changes_the_prediction(trained, tmp_path):
    alone = tmp_path / "alone.json"
    alone.write_text(json.dumps([str(BUNDLE / "sample" / "images" / "cxr_0014.png")]))
    runs = {
        "free": ["--images", str(alone)],
        "roi": ["--images", str(BUNDLE / "sample" / "interaction.json")],
        "off": ["--images", str(alone), "--concepts_off", "['opacity','consolidation','nodule','mass']"],
    }
    result = {}
    for name, args in runs.items():
        assert _infer(trained, tmp_path / name, *args)["completed"]
        result[name] = json.loads((tmp_path / name / "cxr_0014_explanation.json").read_text())
    assert "roi" not in result["free"] and result["roi"]["roi"].endswith("cxr_0014_patient_left.png")
    assert result["roi"]["diseases"] != result["free"]["diseases"]  # similarities pooled inside the ROI only
    assert result["off"]["intervention"]["off"] == ["opacity", "consolidation", "nodule", "mass"]
    assert result["off"]["diseases"] != result["free"]["diseases"]  # switched-off prototypes no longer count


def test_bad_inputs_are_reported_and_others_complete(trained, tmp_path):
    good = BUNDLE / "sample" / "images" / "cxr_0014.png"
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    volume = tmp_path / "volume.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), str(volume))
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(rgb)
    nopix = tmp_path / "nopix.dcm"
    ds = pydicom.dcmread(next(p for p in (BUNDLE / "sample" / "images").glob("*.dcm")))
    del ds.PixelData
    ds.save_as(nopix)
    second = tmp_path / "second.png"  # another image, so its outputs do not collide with the first
    shutil.copy(good, second)
    roi = tmp_path / "small_roi.png"
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(roi)
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps({"test": [
        {"image": str(good)}, {"image": str(text)}, {"image": str(volume)}, {"image": str(rgb)},
        {"image": str(nopix)}, {"image": str(second), "roi": str(roi)},
    ]}))
    out = tmp_path / "out"
    proc = bundle_run("inference.json", "--ckpt_path", str(trained / "model.pt"), "--output_dir", str(out), *SMALL,
                      "--images", str(queries), check=False)
    assert proc.returncode == 1 and "5 case(s) failed, 1 completed" in proc.stderr
    report = json.loads((out / "run_report.json").read_text())
    assert report["completed"] == [str(good)]
    errors = [f["error"] for f in report["failed"]]
    assert len(errors) == 5
    assert any(str(text) in e for e in errors)
    assert any(str(volume) in e and "2D" in e for e in errors)
    assert any(str(rgb) in e and "channel" in e for e in errors)
    assert any(str(nopix) in e and "pixel data" in e for e in errors)
    assert any(str(roi) in e and "same grid" in e for e in errors)


def test_multi_stage_resume_keeps_stage_files(data, trained, tmp_path):
    ckpt = tmp_path / "models"
    shutil.copytree(trained, ckpt)
    proc = bundle_run("train.json", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--output_dir",
                      str(tmp_path / "eval"), "--max_epochs", "2", "--batch_size", "4", "--resume", "true", *SMALL)
    assert "resuming from" in proc.stdout + proc.stderr
    assert (ckpt / "stage1_checkpoint_epoch=2.pt").exists()
