from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from common.transforms import (
    CT_WINDOWS,
    CheckOutputsd,
    ClassMasksd,
    ScaleIntensityWindowd,
    ProbabilitiesToLabelMapd,
    SaveSegmentationSummaryd,
    ValidateImaged,
    class_values,
    output_path,
)

SOURCE = "/data/scans/patient_07.nii.gz"

# [window, (low, high) HU]
CT_CASES = [
    ["soft_tissue", (-160.0, 240.0)],
    ["lung", (-1350.0, 150.0)],
    ["wide", (-1000.0, 1000.0)],
    [(50.0, 100.0), (0.0, 100.0)],
    [[-20, 10], (-25.0, -15.0)],
]

# [percentiles]
MR_CASES = [(0.5, 99.5), (1.0, 99.0), (0.0, 100.0), (10.0, 60.0)]

ILL_NORMALIZE = [
    {"mode": "pet"},
    {"window": "liver"},
    {"window": (40.0, 0.0)},
    {"window": (40.0, -10.0)},
    {"window": (1.0, 2.0, 3.0)},
    {"mode": "mr", "percentiles": (60.0, 40.0)},
    {"mode": "mr", "percentiles": (-1.0, 99.0)},
    {"mode": "mr", "percentiles": (1.0, 101.0)},
]

# [ValidateImaged kwargs, image shape, fragment of the message]
ILL_IMAGES = [
    [{}, (1, 16, 16), "expected a 3D image"],
    [{}, (1, 16, 16, 1), "expected a 3D image"],
    [{}, (1, 1, 16, 16), r"\(2D\)"],
    [{}, (1, 16, 16, 16, 4), "expected a 3D image"],
    [{}, (2, 16, 16, 16), "expected 1 channel"],
    [{"channels": 3}, (1, 16, 16, 16), "expected 3 channel"],
    [{"min_size": 8}, (1, 16, 4, 16), "too small"],
    [{"spatial_dims": 2}, (1, 16, 16, 16), "expected a 2D image"],
    [{"spatial_dims": 2}, (1, 16, 1), "expected a 2D image"],
]

GOOD_IMAGES = [
    [{}, (1, 16, 16, 16)],
    [{}, (1, 2, 2, 2)],
    [{"channels": None}, (4, 8, 8, 8)],
    [{"spatial_dims": 2}, (1, 32, 24)],
]

# [probabilities per voxel (K, N), class values, threshold, expected label values]
LABEL_CASES = [
    [[[0.9, 0.2, 0.6, 0.1], [0.3, 0.8, 0.7, 0.2]], {"liver": 1, "spleen": 2}, 0.5, [1, 2, 2, 0]],
    [[[0.9, 0.2, 0.6, 0.1], [0.3, 0.8, 0.7, 0.2]], {"liver": 7, "spleen": 300}, 0.5, [7, 300, 300, 0]],
    [[[0.9, 0.2, 0.6, 0.1], [0.3, 0.8, 0.7, 0.2]], {"liver": 7, "spleen": 3}, 0.75, [7, 3, 0, 0]],
    [[[0.4, 0.5], [0.4, 0.2], [0.45, 0.6]], {"a": 10, "b": 20, "c": 5}, 0.3, [5, 5]],
    [[[0.2, 0.51]], {"only": 4}, 0.5, [0, 4]],
]


def _meta(array, affine=None, source: str = SOURCE) -> MetaTensor:
    return MetaTensor(torch.as_tensor(array), affine=affine, meta={"filename_or_obj": source})


@pytest.mark.parametrize("window, bounds", CT_CASES)
def test_ct_window(window, bounds):
    low, high = bounds
    hu = torch.linspace(-2000.0, 2000.0, 81).view(1, 81, 1, 1)
    out = ScaleIntensityWindowd("image", mode="ct", window=window)({"image": hu})["image"]
    expected = ((hu - low) / (high - low)).clamp(0.0, 1.0)
    torch.testing.assert_close(torch.as_tensor(out), expected, rtol=1e-5, atol=1e-6)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0


def test_ct_windows_are_center_width():
    assert CT_WINDOWS["soft_tissue"] == (40.0, 400.0)
    out = ScaleIntensityWindowd("image", window="brain")({"image": torch.tensor([[[[0.0, 40.0, 60.0, 100.0]]]])})
    torch.testing.assert_close(torch.as_tensor(out["image"]).flatten(), torch.tensor([0.0, 0.5, 0.75, 1.0]))


@pytest.mark.parametrize("percentiles", MR_CASES)
def test_mr_percentiles(percentiles):
    rng = np.random.default_rng(0)
    image = rng.gamma(2.0, 100.0, size=(1, 12, 10, 8)).astype(np.float32)
    out = ScaleIntensityWindowd("image", mode="mr", percentiles=percentiles)({"image": torch.from_numpy(image)})
    low, high = np.percentile(image, percentiles)
    expected = np.clip((image - low) / (high - low), 0.0, 1.0)
    np.testing.assert_allclose(np.asarray(out["image"]), expected, rtol=1e-4, atol=1e-5)


def test_normalize_keeps_other_keys_and_metadata():
    image = _meta(torch.full((1, 4, 4, 4), 40.0), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = ScaleIntensityWindowd(["image", "other"], window="soft_tissue", allow_missing_keys=True)(
        {"image": image, "label": "untouched"}
    )
    assert out["label"] == "untouched"
    assert torch.allclose(torch.as_tensor(out["image"]), torch.full((1, 4, 4, 4), 0.5))
    assert out["image"].meta["filename_or_obj"] == SOURCE and float(out["image"].affine[0, 0]) == 2.0


@pytest.mark.parametrize("kwargs", ILL_NORMALIZE)
def test_normalize_ill_arguments(kwargs):
    with pytest.raises(ValueError):
        ScaleIntensityWindowd("image", **kwargs)


@pytest.mark.parametrize("kwargs, shape, message", ILL_IMAGES)
def test_validate_rejects_with_the_filename(kwargs, shape, message):
    with pytest.raises(ValueError, match=message) as error:
        ValidateImaged("image", **kwargs)({"image": _meta(torch.zeros(shape))})
    assert str(error.value).startswith(SOURCE)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_validate_rejects_non_finite(bad):
    image = torch.zeros(1, 8, 8, 8)
    image[0, 1, 2, 3] = bad
    image[0, 4, 4, 4] = bad
    with pytest.raises(ValueError, match="2 non-finite") as error:
        ValidateImaged("image")({"image": _meta(image)})
    assert SOURCE in str(error.value)


def test_validate_names_an_in_memory_image():
    with pytest.raises(ValueError, match="in-memory"):
        ValidateImaged("image")({"image": torch.zeros(1, 8, 8)})


@pytest.mark.parametrize("kwargs, shape", GOOD_IMAGES)
def test_validate_passes_good_images(kwargs, shape):
    image = _meta(torch.rand(shape))
    out = ValidateImaged("image", **kwargs)({"image": image, "label": None})
    assert out["image"] is image and out["label"] is None


def test_validate_checks_every_key():
    data = {"image": _meta(torch.rand(1, 8, 8, 8)), "label": _meta(torch.zeros(1, 8, 8), source="/l/seg.nii.gz")}
    with pytest.raises(ValueError, match="seg.nii.gz"):
        ValidateImaged(["image", "label"])(data)
    ValidateImaged(["image", "extra"], allow_missing_keys=True)(data)


@pytest.mark.parametrize("probs, classes, threshold, expected", LABEL_CASES)
def test_probabilities_to_label_map(probs, classes, threshold, expected):
    prob = torch.tensor(probs).view(len(probs), 1, len(probs[0]), 1)
    out = ProbabilitiesToLabelMapd("pred", classes, threshold=threshold)({"pred": prob})["pred"]
    assert out.shape == (1, 1, len(expected), 1) and out.dtype == torch.int16
    assert out.flatten().tolist() == expected


def test_probabilities_to_label_map_by_hand():
    torch.manual_seed(0)
    prob = torch.rand(3, 5, 4, 6)
    values = [4, 9, 2]
    out = ProbabilitiesToLabelMapd("pred", {"a": 4, "b": 9, "c": 2}, threshold=0.6)({"pred": prob})["pred"]
    for idx in np.ndindex(5, 4, 6):
        p = prob[(slice(None), *idx)]
        expected = values[int(p.argmax())] if float(p.max()) >= 0.6 else 0
        assert int(out[(0, *idx)]) == expected


@pytest.mark.parametrize("exclusive", [False, "false", True, "true"])
def test_class_masks_are_the_written_label_map_when_exclusive(exclusive):
    """``exclusive`` masks are exactly the label map's classes; otherwise each class is thresholded on its own (the
    runner's string 'false' is False)."""
    torch.manual_seed(0)
    prob = torch.rand(3, 5, 4, 6)
    masks = ClassMasksd("pred", threshold=0.6, exclusive=exclusive)({"pred": prob})["pred"]
    assert masks.shape == prob.shape and masks.dtype == prob.dtype
    if exclusive in (True, "true"):
        label_map = ProbabilitiesToLabelMapd("pred", {"a": 1, "b": 2, "c": 3}, threshold=0.6)({"pred": prob})["pred"]
        expected = torch.cat([label_map == v for v in (1, 2, 3)]).float()
        assert masks.sum(0).max() <= 1  # one class per voxel
    else:
        expected = (prob >= 0.6).float()
        assert masks.sum(0).max() > 1  # overlapping classes stay overlapping
    assert torch.equal(masks, expected)


def test_probabilities_to_label_map_reads_classes_at_call_time():
    class Prompt:
        classes: dict = {}

    prompt = Prompt()
    transform = ProbabilitiesToLabelMapd("pred", prompt)
    prompt.classes = {"x": 3, "y": 8}
    out = transform({"pred": torch.tensor([[[[0.1]]], [[[0.9]]]])})["pred"]
    assert out.flatten().tolist() == [8]
    assert class_values(prompt) == {"x": 3, "y": 8} and class_values({"z": 1}) == {"z": 1}


def test_probabilities_to_label_map_channel_mismatch():
    with pytest.raises(ValueError, match="3 channels but 2 classes"):
        ProbabilitiesToLabelMapd("pred", {"a": 1, "b": 2})({"pred": torch.rand(3, 2, 2, 2)})


def test_check_outputs(tmp_path):
    outputs = [("seg", ".nii.gz"), ("summary", ".json")]
    check = CheckOutputsd("image", tmp_path, outputs)
    data = {"image": SOURCE}
    assert check(data) == data  # nothing there yet
    (tmp_path / "patient_07_summary.json").write_text("{}")
    with pytest.raises(FileExistsError, match="patient_07_summary.json") as error:
        check(data)
    assert str(error.value).startswith(SOURCE) and "patient_07_seg" not in str(error.value)
    (tmp_path / "patient_07_seg.nii.gz").write_bytes(b"")
    with pytest.raises(FileExistsError, match=r"patient_07_seg\.nii\.gz.*patient_07_summary\.json"):
        check(data)
    assert CheckOutputsd("image", tmp_path, outputs, overwrite=True)(data) == data
    assert CheckOutputsd("image", tmp_path, [("preview", ".png")])(data) == data


def test_output_path():
    assert str(output_path(SOURCE, "/out", "seg", ".nii.gz")) == "/out/patient_07_seg.nii.gz"
    assert str(output_path("/dicom/series_3", "/out", "summary", ".json")) == "/out/series_3_summary.json"


class _Prompt:
    classes = {"liver": 1, "lesion": 4, "spleen": 2}
    strategy = "ensemble"


@pytest.mark.parametrize(
    "linear",
    [
        np.diag([0.8, 0.8, 2.5]),
        np.array([[0.0, -1.5, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0]]),  # a rotation: |det| still counts
        np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -2.0]]),  # shear and a flip
    ],
)
def test_segmentation_summary_volumes(tmp_path, linear):
    label = np.zeros((1, 6, 5, 4), dtype=np.int16)
    label[0, :2, :3, :] = 1  # 24 voxels
    label[0, 4, 4, 3] = 2  # 1 voxel
    label[0, 3, 0, :2] = 7  # not a requested class
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = (-10.0, 5.0, 2.0)
    data = {"label": _meta(label, affine=torch.as_tensor(affine))}
    out = SaveSegmentationSummaryd("label", tmp_path, _Prompt())(data)
    assert out["label"] is data["label"]
    summary = json.loads((tmp_path / "patient_07_summary.json").read_text())
    voxel_ml = abs(np.linalg.det(linear)) / 1000.0
    assert summary["source"] == SOURCE and summary["spatial_shape"] == [6, 5, 4]
    assert summary["strategy"] == "ensemble"
    assert summary["voxel_volume_ml"] == pytest.approx(voxel_ml)
    assert list(summary["classes"]) == ["liver", "lesion", "spleen"]
    for name, value, voxels in [("liver", 1, 24), ("lesion", 4, 0), ("spleen", 2, 1)]:
        entry = summary["classes"][name]
        assert entry["label_value"] == value and entry["voxels"] == voxels
        assert entry["volume_ml"] == pytest.approx(voxels * voxel_ml)


def test_segmentation_summary_with_a_class_map(tmp_path):
    label = _meta(np.ones((1, 2, 2, 2), dtype=np.uint8), affine=torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0])))
    SaveSegmentationSummaryd("label", tmp_path / "nested", {"organ": 1}, postfix="volumes")({"label": label})
    summary = json.loads((tmp_path / "nested" / "patient_07_volumes.json").read_text())
    assert summary["classes"] == {"organ": {"label_value": 1, "voxels": 8, "volume_ml": pytest.approx(0.008)}}
    assert "strategy" not in summary


@pytest.mark.parametrize("value", [-1000.0, 0.0, 1e9])
def test_validate_rejects_constant_images(value):
    with pytest.raises(ValueError, match=re.escape(f"every voxel has the value {value:g}; a constant image")) as error:
        ValidateImaged("image")({"image": _meta(torch.full((1, 8, 8, 8), value))})
    assert str(error.value).startswith(SOURCE)
    ValidateImaged("image", reject_constant=False)({"image": _meta(torch.full((1, 8, 8, 8), value))})


def test_validate_checks_the_dicom_modality():
    ct_slice = _meta(torch.rand(1, 16, 16))
    ct_slice.meta["Modality"] = "CT"
    with pytest.raises(ValueError, match="DICOM modality CT, but this model reads CR/DX images"):
        ValidateImaged("image", spatial_dims=2, modalities=["cr", "DX"])({"image": ct_slice})
    ct_slice.meta["Modality"] = "DX"
    ValidateImaged("image", spatial_dims=2, modalities=["CR", "DX"])({"image": ct_slice})
    ct_slice.meta["Modality"] = ""  # PNG and NIfTI inputs carry no modality: not checked
    ValidateImaged("image", spatial_dims=2, modalities=["CR", "DX"])({"image": ct_slice})
