"""DetectionBoxesd and SaveDetectionsd: datalist boxes to tensors, detections to JSON and a PNG overlay."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from common.transforms.detection import DetectionBoxesd, SaveDetectionsd

BOX_CASES = [
    [[[2, 1.0, 2.0, 3.0, 4.0]], (1, 5)],
    [[], (0, 5)],
]


@pytest.mark.parametrize("boxes, shape", BOX_CASES)
def test_boxes_become_a_tensor(boxes, shape):
    out = DetectionBoxesd(num_classes=3)({"image": "a.png", "boxes": boxes})["boxes"]
    assert out.shape == shape and out.dtype == torch.float32


@pytest.mark.parametrize("boxes, match", [([[5, 0, 0, 1, 1]], "class indices"), ([[0, 4, 0, 1, 1]], "x1 >= x0")])
def test_bad_boxes_are_named(boxes, match):
    with pytest.raises(ValueError, match=match):
        DetectionBoxesd(num_classes=3)({"image": "a.png", "boxes": boxes})


def test_missing_boxes_are_allowed_for_inference():
    assert DetectionBoxesd(allow_missing_keys=True)({"image": "a.png"}) == {"image": "a.png"}


def test_save_detections_writes_rows_first_sizes_and_named_boxes(tmp_path):
    # MONAI layout (C, W, H): 60 columns, 40 rows
    image = MetaTensor(torch.rand(1, 60, 40), meta={"filename_or_obj": str(tmp_path / "cxr_7.dcm")})
    pred = torch.tensor([[10.0, 5.0, 30.0, 20.0, 0.8, 1.0], [0, 0, 2, 2, 0.01, 0.0], [0, 0, 0, 0, 0, -1]])
    SaveDetectionsd(keys=["image", "pred"], output_dir=tmp_path / "out", class_names=["nodule", "mass"],
                    score_threshold=0.05)({"image": image, "pred": pred})
    report = json.loads((tmp_path / "out" / "cxr_7_detections.json").read_text())
    assert report["image_size"] == [40, 60] and report["source"].endswith("cxr_7.dcm")
    assert report["detections"] == [{"class": "mass", "class_index": 1, "score": 0.8, "box": [10.0, 5.0, 30.0, 20.0]}]
    assert Image.open(tmp_path / "out" / "cxr_7_detections.png").size[0] >= 400


def test_save_detections_needs_image_and_pred_keys():
    with pytest.raises(ValueError, match="image_key, pred_key"):
        SaveDetectionsd(keys="pred", output_dir=".", class_names=["a"])


def test_empty_detections_still_write_both_files(tmp_path):
    image = MetaTensor(torch.from_numpy(np.zeros((1, 32, 32), np.float32)), meta={"filename_or_obj": "x.png"})
    SaveDetectionsd(keys=["image", "pred"], output_dir=tmp_path, class_names=["a"])(
        {"image": image, "pred": torch.zeros(0, 6)})
    assert json.loads((tmp_path / "x_detections.json").read_text())["detections"] == []
    assert (tmp_path / "x_detections.png").is_file()
