"""The IRIS bundle as a user runs it: ``python -m monai.bundle run`` in a subprocess, on small settings."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from common.data import generate_synthetic_3d, write_references
from tests.bundles.runner import BUNDLES, assert_kept, snapshot
from tests.bundles.runner import bundle_run as run_bundle

BUNDLE = BUNDLES / "iris_incontext_segmentation"
SMALL = ["--image_size", "[32,32,32]"]
pytestmark = pytest.mark.xdist_group(name="iris_bundle")


def bundle_run(config: str | list[str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_bundle(BUNDLE, config, *args, check=check)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic_3d(out, num_cases=8, shape=(48, 48, 32), seed=3, split=(0.5, 0.25, 0.25))
    return out


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory) -> Path:
    """Two tiny epochs of train.json: checkpoints, model.pt with a filled memory bank."""
    ckpt = tmp_path_factory.mktemp("models")
    bundle_run(
        "train.json",
        "--dataset_dir", str(synth), "--ckpt_dir", str(ckpt), "--output_dir", str(ckpt / "eval"),
        "--max_epochs", "2", "--episodes_per_epoch", "3", "--val_interval", "1", *SMALL,
    )
    return ckpt


def test_train_writes_checkpoints_and_memory_bank(trained):
    assert list(trained.glob("checkpoint_*.pt"))
    state = torch.load(trained / "model.pt", map_location="cpu", weights_only=False)
    names = state["memory_bank._extra_state"]["class_names"]
    assert names and "nodule_cluster" not in names  # held-out classes never reach training
    assert int(state["memory_bank.counts"].sum()) > 0
    assert list((trained / "eval").glob("events.out.tfevents.*"))


def test_train_resumes_from_checkpoint(synth, trained, tmp_path):
    ckpt = tmp_path / "models"
    shutil.copytree(trained, ckpt)
    proc = bundle_run(
        "train.json",
        "--dataset_dir", str(synth), "--ckpt_dir", str(ckpt), "--output_dir", str(tmp_path / "eval"),
        "--max_epochs", "3", "--episodes_per_epoch", "3", "--val_interval", "1", "--resume", "true", *SMALL,
    )
    assert "resuming from" in proc.stdout + proc.stderr
    assert (ckpt / "checkpoint_epoch=3.pt").exists()


def test_train_starts_from_init_weights_under_cpu_bf16(synth, trained, tmp_path):
    """Fine-tuning from a model.pt with bf16 autocast: at learning rate 0 the weights stay the ones loaded."""
    ckpt = tmp_path / "models"
    proc = bundle_run(
        "train.json",
        "--dataset_dir", str(synth), "--ckpt_dir", str(ckpt), "--output_dir", str(tmp_path / "eval"),
        "--max_epochs", "1", "--episodes_per_epoch", "2", "--val_interval", "1000", "--learning_rate", "0",
        "--init_weights", str(trained / "model.pt"), "--cpu_amp", "true", *SMALL,
    )
    assert "Restored all variables from" in proc.stdout + proc.stderr
    start = torch.load(trained / "model.pt", map_location="cpu", weights_only=False)
    after = torch.load(ckpt / "checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)["model"]
    weights = [k for k in start if k.endswith(".weight") and not k.startswith("memory_bank")]
    assert weights and all(torch.equal(start[k], after[k]) for k in weights)


def test_evaluate_writes_per_class_dice_per_strategy(synth, trained, tmp_path):
    bundle_run(
        ["train.json", "evaluate.json"],
        "--dataset_dir", str(synth), "--ckpt_dir", str(trained), "--output_dir", str(tmp_path),
        "--validate#prompt#tuning_steps", "2", *SMALL,
    )
    results = json.loads((tmp_path / "dice_per_strategy.json").read_text())
    # the no-model baselines sit beside the strategies, in the same file and table
    columns = ["one_shot", "ensemble", "memory", "tuning", "copy_reference", "copy_reference_one_shot", "foreground",
               "intensity_match"]
    assert list(results) == columns
    for row in results.values():
        assert 0.0 <= row["mean"] <= 1.0
        assert "nodule_cluster" not in row
    assert set(results["copy_reference"]) == set(results["ensemble"])
    table = (tmp_path / "dice_per_strategy.md").read_text()
    assert table.startswith("| class | " + " | ".join(columns) + " |")


@pytest.fixture(scope="module")
def mni152(tmp_path_factory) -> Path:
    """The MNI152 gray/white-matter task: the template as reference, 4 deformed queries (built once per module)."""
    from common.data import build_mni152_task

    task = tmp_path_factory.mktemp("mni152")
    build_mni152_task(task, num_queries=4)
    return task


@pytest.mark.parametrize("label_map", ["false", "true"])
def test_shipped_weights_on_mni152(mni152, tmp_path, label_map):
    """The shipped weights on real MR (MNI152 gray/white matter, 4 deformed queries, 64^3) reproduce metadata.json's
    one-shot figures; scored on class masks they beat copying the reference on both classes (measured 0.659 and
    0.630 against 0.627 and 0.605). The label map (``--label_map true``) gives gray matter the voxels both classes
    claim (measured 0.662 and 0.519)."""
    out = tmp_path / "eval"
    bundle_run(
        ["train.json", "evaluate.json"],
        "--datalist", str(mni152 / "datalist.json"), "--references_file", str(mni152 / "references.json"),
        "--intensity_mode", "mr", "--ckpt_dir", str(BUNDLE / "models"), "--output_dir", str(out),
        "--strategies", "['one_shot']", "--baselines", "['copy_reference']", "--label_map", label_map,
    )
    results = json.loads((out / "dice_per_strategy.json").read_text())
    meta = json.loads((BUNDLE / "configs/metadata.json").read_text())["eval_metrics"]
    key = "mean_dice_mni152_label_map_one_shot" if label_map == "true" else "mean_dice_mni152_one_shot"
    assert results["one_shot"]["mean"] == pytest.approx(meta[key], abs=0.005)
    assert results["copy_reference"]["mean"] == pytest.approx(meta["mean_dice_mni152_copy_reference"], abs=0.005)
    if label_map == "false":
        for tissue in ("gray_matter", "white_matter"):
            assert results["one_shot"][tissue] > results["copy_reference"][tissue] + 0.01, results


@pytest.mark.parametrize("strategy", ["one_shot", "ensemble", "memory", "tuning", "memory_ensemble"])
def test_inference_strategies_on_embedded_sample(trained, tmp_path, strategy):
    extra = []
    if strategy == "memory":  # a two-epoch bank knows only the classes its few episodes drew
        bank = torch.load(trained / "model.pt", map_location="cpu", weights_only=False)
        names = bank["memory_bank._extra_state"]["class_names"]
        known = [n for i, n in enumerate(names) if int(bank["memory_bank.counts"][i]) > 0]
        extra = ["--classes", str(known[:2])]
    bundle_run(
        "inference.json", "--ckpt_path", str(trained / "model.pt"), "--output_dir", str(tmp_path),
        "--strategy", strategy, "--tuning_steps", "2", *extra, *SMALL,
    )
    report = json.loads((tmp_path / "run_report.json").read_text())
    assert len(report["completed"]) == 2 and report["failed"] == []
    for source in report["completed"]:
        stem = Path(source).name.replace(".nii.gz", "")
        seg, image = nib.load(tmp_path / f"{stem}_seg.nii.gz"), nib.load(source)
        assert seg.shape == image.shape and np.allclose(seg.affine, image.affine, atol=1e-4)
        summary = json.loads((tmp_path / f"{stem}_summary.json").read_text())
        assert summary["strategy"] == strategy
        values = set(np.unique(np.asarray(seg.dataobj)).tolist())
        assert values <= {0} | {c["label_value"] for c in summary["classes"].values()}
        for c in summary["classes"].values():
            assert c["voxels"] == int((np.asarray(seg.dataobj) == c["label_value"]).sum())
        assert (tmp_path / f"{stem}_preview.png").stat().st_size > 1000


def test_inference_under_cpu_bf16_matches_float32(tmp_path):
    """``--cpu_amp true`` segments each query under bf16 autocast: the shipped weights' label maps on the embedded
    sample at 32^3 agree with float32 (MONAI's Dice per class of the bf16 map against the fp32 one, mean over the
    classes either map holds; measured: 0.952 over 3 classes and 0.995 over 2, 882 and 614 labelled voxels)."""
    segs = {}
    for amp in ("false", "true"):
        out = tmp_path / amp
        bundle_run("inference.json", "--output_dir", str(out), "--cpu_amp", amp, *SMALL)
        segs[amp] = [torch.as_tensor(np.asarray(nib.load(p).dataobj)) for p in sorted(out.glob("*_seg.nii.gz"))]
    assert len(segs["true"]) == len(segs["false"]) == 2
    num_classes = len(json.loads((BUNDLE / "sample/references.json").read_text())["classes"])
    for fp32, bf16 in zip(segs["false"], segs["true"]):
        assert (fp32 > 0).sum() > 100  # a real segmentation, so agreement is not that of two empty maps
        per_class = compute_dice(*(one_hot(m[None, None].long(), num_classes + 1) for m in (bf16, fp32)),
                                 include_background=False, ignore_empty=False)[0]
        shown = torch.tensor([bool(((fp32 == v) | (bf16 == v)).any()) for v in range(1, num_classes + 1)])
        assert float(per_class[shown].mean()) > 0.9, per_class


def test_inference_never_overwrites_outputs(trained, tmp_path):
    args = ["inference.json", "--ckpt_path", str(trained / "model.pt"), "--output_dir", str(tmp_path), *SMALL]
    bundle_run(*args)
    seg = sorted(tmp_path.glob("*_seg.nii.gz"))[0]
    seg.write_bytes(b"user data")
    before = snapshot(tmp_path)
    # --overwrite false as MONAI's runner passes it (the string 'false'): every case is skipped and listed
    bundle_run(*args, "--overwrite", "false")
    assert_kept(before, tmp_path)
    report = json.loads((tmp_path / "run_report.json").read_text())
    assert not report["completed"] and not report["failed"]
    assert len(report["skipped"]) == 2 and all("outputs already exist" in f["reason"] for f in report["skipped"])
    bundle_run(*args, "--overwrite", "true")
    assert seg.read_bytes() != b"user data"
    assert len(list(tmp_path.glob("run_report_*.json"))) == 2  # the earlier runs' reports are kept


def _write(path: Path, array: np.ndarray, affine=None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def test_bad_queries_are_reported_and_others_complete(trained, tmp_path):
    """A 2D image, non-finite voxels, an unreadable file, a constant volume and a slab too thin for the working grid
    fail with their file named; good queries finish."""
    good = BUNDLE / "sample" / "imagesTr" / "synth_004.nii.gz"
    bad = {
        "flat": _write(tmp_path / "flat.nii.gz", np.zeros((40, 40), np.float32)),
        "nan": _write(tmp_path / "nan.nii.gz", np.full((32, 32, 32), np.nan, np.float32)),
        "garbage": str(tmp_path / "garbage.nii.gz"),
        "air": _write(tmp_path / "air.nii.gz", np.full((32, 32, 32), -1000, np.float32)),
        # a 0.6 mm slab: three slices of 0.2 mm, one voxel on the 1.5 mm working grid
        "slab": _write(tmp_path / "slab.nii.gz", np.random.default_rng(0).normal(0, 1, (40, 40, 3)).astype(np.float32),
                       np.diag([1.5, 1.5, 0.2, 1.0])),
    }
    Path(bad["garbage"]).write_bytes(b"not an image")
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps([str(good), *bad.values()]))
    out = tmp_path / "out"
    proc = bundle_run("inference.json", "--ckpt_path", str(trained / "model.pt"), "--output_dir", str(out),
                      "--images", str(queries), *SMALL, check=False)
    # the good query completes; the run then exits 1, its last line naming how many failed
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "5 case(s) failed, 1 completed" in proc.stderr and any(path in last for path in bad.values()), last
    report = json.loads((out / "run_report.json").read_text())
    assert report["completed"] == [str(good)]
    errors = {Path(f["source"]).name: f["error"] for f in report["failed"]}
    assert "2D" in errors["flat.nii.gz"] and bad["flat"] in errors["flat.nii.gz"]
    assert "non-finite" in errors["nan.nii.gz"]
    assert bad["garbage"] in errors["garbage.nii.gz"]
    assert "every voxel has the value -1000" in errors["air.nii.gz"]
    assert "[40, 40, 1]" in errors["slab.nii.gz"] and "needs 3D input" in errors["slab.nii.gz"]
    assert (out / "synth_004_seg.nii.gz").exists()


def _reference_case(tmp_path: Path, label: np.ndarray, image: np.ndarray | None = None) -> Path:
    image = np.random.default_rng(0).normal(0, 50, label.shape).astype(np.float32) if image is None else image
    img = _write(tmp_path / "ref.nii.gz", image)
    lab = _write(tmp_path / "ref_label.nii.gz", label.astype(np.uint8))
    return write_references(tmp_path / "references.json", [{"image": img, "label": lab}], {"target": 1})


@pytest.mark.parametrize(
    "case, expected",
    [
        ("empty", "the mask is empty"),
        ("absent", "label value 1 ('target') is absent"),
        ("2d", "expected a 3D image"),
        ("shape", "label has spatial shape [32, 32, 30] but the image"),
    ],
)
def test_bad_references_name_the_file(trained, tmp_path, case, expected):
    label = np.zeros((32, 32, 32), np.uint8)
    if case == "absent":
        label[10:20, 10:20, 10:20] = 2
    refs = _reference_case(tmp_path, label)
    if case == "2d":
        _write(tmp_path / "ref.nii.gz", np.zeros((32, 32), np.float32))
        _write(tmp_path / "ref_label.nii.gz", np.ones((32, 32), np.uint8))
    if case == "shape":  # a label map drawn on another grid than its image is refused, not resampled onto it
        label[8:24, 8:24, 8:24] = 1
        _write(tmp_path / "ref_label.nii.gz", label[:, :, :30])
    proc = bundle_run("inference.json", "--ckpt_path", str(trained / "model.pt"), "--output_dir",
                      str(tmp_path / "out"), "--references_file", str(refs), *SMALL, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr and str(tmp_path / "ref") in proc.stderr


def test_missing_weights_name_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "model.pt"
    proc = bundle_run("inference.json", "--ckpt_path", str(missing), "--output_dir", str(tmp_path), *SMALL,
                      check=False)
    assert proc.returncode != 0 and str(missing) in proc.stderr


def test_dicom_series_and_nrrd_queries(trained, tmp_path):
    """Queries in the other supported formats, a DICOM series folder and an NRRD file: each label map lies on its
    query's own grid, the shape and affine the shared reader loads the query with."""
    import os

    import nrrd
    import pydicom.data

    from common.transforms import LoadMedicalImaged

    series = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files", "dicomdirtests", "98892001", "CT5N")
    image = np.asarray(nib.load(BUNDLE / "sample" / "imagesTr" / "synth_004.nii.gz").dataobj).astype(np.float32)
    # a flipped first axis, anisotropic spacing and an origin off zero, so a wrong affine cannot pass
    header = {"space": "left-posterior-superior", "space directions": np.diag([-1.0, 1.0, 2.0]).tolist(),
              "space origin": [12.0, -30.0, 7.5]}
    nrrd.write(str(tmp_path / "query.nrrd"), image, header)
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps([series, str(tmp_path / "query.nrrd")]))
    out = tmp_path / "out"
    # the test series is 16 x 16 x 5 voxels (about 9 mm across): a 0.5 mm working grid keeps it a volume
    bundle_run("inference.json", "--ckpt_path", str(trained / "model.pt"), "--output_dir", str(out),
               "--images", str(queries), *SMALL, "--pixdim", "[0.5,0.5,0.5]")
    report = json.loads((out / "run_report.json").read_text())
    assert report["failed"] == [] and len(report["completed"]) == 2
    for query, seg, shape in [(str(tmp_path / "query.nrrd"), "query_seg.nii.gz", image.shape),
                              (series, "CT5N_seg.nii.gz", (16, 16, 5))]:
        loaded = LoadMedicalImaged(keys="image")({"image": query})["image"]
        output = nib.load(out / seg)
        assert output.shape == tuple(loaded.shape) == shape
        np.testing.assert_allclose(output.affine, loaded.affine.numpy(), atol=1e-4)


def test_metadata_label_values_are_the_default_classes():
    """``label_values`` (the labels MONAI Label shows) are the embedded references' classes and the memory bank's."""
    values = json.loads((BUNDLE / "configs/metadata.json").read_text())["label_values"]
    assert values == json.loads((BUNDLE / "sample/references.json").read_text())["classes"]
    state = torch.load(BUNDLE / "models/model.pt", map_location="cpu", weights_only=False)
    assert sorted(state["memory_bank._extra_state"]["class_names"]) == sorted(values)
