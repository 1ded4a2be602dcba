"""The YOLO detection bundle as a user runs it: outputs, bad inputs, no overwriting, box coordinates, multi-GPU config.

Training and evaluation through the runner are in ``test_yolo_learning.py``; here the network has random weights
(every output format is the same) or is a stand-in whose answer is known (coordinates).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from common.networks.yolo import YOLODetector
from tests.bundles.runner import BUNDLES, assert_kept, snapshot
from tests.bundles.runner import bundle_run as run_bundle

BUNDLE = BUNDLES / "yolo_cxr_detection"
SAMPLE = BUNDLE / "sample" / "images"
pytestmark = pytest.mark.xdist_group(name="yolo_bundle")


def bundle_run(config, *args, check=True):
    return run_bundle(BUNDLE, config, *args, check=check)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("yolo_weights") / "model.pt"
    torch.manual_seed(0)
    torch.save(YOLODetector("yolov5n.yaml", num_classes=11).state_dict(), path)
    return path


def _infer(weights: Path, out: Path, queries: list[str], *args: str, failures: bool = False) -> dict:
    """Inference on ``queries``; a run with failed cases exits 1 (after the others complete), any other 0."""
    spec = out.parent / f"{out.name}_queries.json"
    spec.write_text(json.dumps(queries))
    proc = bundle_run("inference.json", "--ckpt_path", str(weights), "--output_dir", str(out), "--images",
                      str(spec), *args, check=False)
    assert proc.returncode == (1 if failures else 0), proc.stderr[-3000:]
    return json.loads((out / "run_report.json").read_text())


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad")
    text = folder / "notes.png"
    text.write_text("not an image")
    rgb = folder / "colour.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(rgb)
    volume = folder / "volume.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), str(volume))
    nopix = folder / "nopix.dcm"
    ds = pydicom.dcmread(SAMPLE / "cxr_0009.dcm")
    del ds.PixelData
    ds.save_as(nopix)
    return {"text": str(text), "rgb": str(rgb), "volume": str(volume), "nopix": str(nopix),
            "missing": str(folder / "missing.png")}


@pytest.fixture(scope="module")
def first_run(weights, bad_files, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("infer") / "out"
    good = [str(SAMPLE / "cxr_0010.png"), str(SAMPLE / "cxr_0009.dcm")]
    return out, _infer(weights, out, [*good, *bad_files.values()], failures=True)


def test_inference_writes_json_and_png_per_image(first_run):
    out, report = first_run
    assert [Path(s).name for s in report["completed"]] == ["cxr_0010.png", "cxr_0009.dcm"]
    for stem in ("cxr_0010", "cxr_0009"):
        result = json.loads((out / f"{stem}_detections.json").read_text())
        assert result["image_size"] == [256, 256] and len(result["class_names"]) == 11
        assert all(set(d) == {"class", "class_index", "score", "box"} for d in result["detections"])
        assert (out / f"{stem}_detections.png").stat().st_size > 1000


def test_bad_inputs_are_reported_per_file(first_run, bad_files):
    _, report = first_run
    errors = {Path(f["source"]).name: f["error"] for f in report["failed"]}
    assert set(errors) == {Path(p).name for p in bad_files.values()}
    assert "pixel data" in errors["nopix.dcm"]
    assert "channel" in errors["colour.png"]
    assert "2D" in errors["volume.nii.gz"]
    assert all(bad_files[k] in errors[Path(bad_files[k]).name] for k in ("text", "missing"))


def test_existing_outputs_are_kept_unless_overwrite(first_run, weights, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run[0], out)
    kept = out / "cxr_0010_detections.json"
    kept.write_text("user data")
    new = tmp_path / "cxr_new.png"
    shutil.copy(SAMPLE / "cxr_0011.png", new)
    queries = [str(SAMPLE / "cxr_0010.png"), str(new)]
    before = snapshot(out)
    report = _infer(weights, out, queries, "--overwrite", "false")
    assert_kept(before, out)
    assert kept.read_text() == "user data" and report["completed"] == [str(new)] and not report["failed"]
    assert "overwrite" in report["skipped"][0]["reason"]
    report = _infer(weights, out, queries, "--overwrite", "true")
    assert len(report["completed"]) == 2 and json.loads(kept.read_text())["source"].endswith("cxr_0010.png")


def test_boxes_come_back_in_original_pixels(tmp_path):
    """A stand-in detector reports the bright block it sees in the letterboxed input; the bundle's JSON must give
    the block where it is in the original, non-square image (also through flipped and rescaled passes)."""
    picture = np.full((200, 300), 40, np.uint8)  # 200 rows, 300 columns
    picture[50:90, 120:210] = 255  # rows 50..89, columns 120..209: box (120, 50, 210, 90)
    Image.fromarray(picture).save(tmp_path / "block.png")
    torch.save({}, tmp_path / "empty.pt")  # the stand-in has no weights
    report = _infer(tmp_path / "empty.pt", tmp_path / "out", [str(tmp_path / "block.png")],
                    "--network_def#_target_", "tests.bundles.yolo_stub.BrightBoxDetector",
                    "--tta_flip", "true", "--tta_scales", "[0.75,1.0,1.25]")
    assert len(report["completed"]) == 1
    result = json.loads((tmp_path / "out" / "block_detections.json").read_text())
    assert result["image_size"] == [200, 300]
    (found,) = result["detections"]
    assert found["class"] == "nodule" and found["score"] == pytest.approx(0.9, abs=1e-3)
    assert found["box"] == pytest.approx([120, 50, 210, 90], abs=2.0)


def test_multi_gpu_config_passes_a_device_list_to_ultralytics(tmp_path):
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in ("train.json", "multi_gpu_train.json")])
    parser.read_meta(str(BUNDLE / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(BUNDLE), "output_dir": str(tmp_path), "ckpt_dir": str(tmp_path)})
    assert parser.get_parsed_content("gpus") == list(range(torch.cuda.device_count()))
    parser["gpus"] = [0, 1]
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.device == "0,1" and trainer.max_epochs == parser.get_parsed_content("max_epochs")


@pytest.mark.parametrize("workflow", ["train.json", "inference.json"])
def test_design_preset_sets_the_vindr_recipe(workflow, tmp_path):
    """vindr_design.json over train.json or inference.json: YOLOv5s at 640 with CLAHE, mosaic, MixUp, rare-class
    repeats, capped negatives and TTA at 0.8/1.0/1.2 with flips merged by WBF, on the 14 VinDr classes; every id it
    sets is one the workflow has."""
    from common.data import VINDR_DETECTION_CLASSES

    preset = json.loads((BUNDLE / "configs" / "vindr_design.json").read_text())
    known = {**json.loads((BUNDLE / "configs" / "train.json").read_text()),
             **json.loads((BUNDLE / "configs" / "inference.json").read_text())}
    assert set(preset) <= set(known)
    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / c) for c in (workflow, "vindr_design.json")])
    parser.update({"bundle_root": str(BUNDLE), "output_dir": str(tmp_path), "ckpt_dir": str(tmp_path)})
    assert parser.get_parsed_content("class_names") == list(VINDR_DETECTION_CLASSES)
    inferer = parser.get_parsed_content("validate#inferer" if workflow == "train.json" else "inferer")
    assert (inferer.image_size, inferer.sizes, inferer.flips, inferer.tta_merge) == (
        640, [512, 640, 768], (False, True), "wbf")
    if workflow == "train.json":
        trainer = parser.get_parsed_content("train#trainer")
        assert trainer.model == "yolov5s.yaml" and trainer.image_size == 640
        assert {k: trainer.ultralytics_args[k] for k in ("mosaic", "mixup", "batch")} == {
            "mosaic": 1.0, "mixup": 0.1, "batch": 16}
        assert (trainer.repeat_threshold, trainer.negative_fraction) == (0.1, 0.1)
        assert parser.get_parsed_content("clahe") is True


def test_class_names_agree_across_configs_and_metadata():
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    names = [json.loads((BUNDLE / "configs" / c).read_text())["class_names"] for c in ("inference.json", "train.json")]
    assert names[0] == names[1] == meta["lesion_classes"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 4 + len(names[0]) == len(pred["channel_def"])
