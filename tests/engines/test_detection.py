"""Letterbox geometry and its inverse, NMS, and the YOLO inferer with a detector whose answer is known."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from common.engines.detection import (
    Letterbox,
    YOLODetectionInferer,
    boxes_to_original,
    letterbox,
    letterbox_geometry,
    non_max_suppression,
)
from tests.bundles.yolo_stub import BrightBoxDetector

# (height, width, size) -> (new_h, new_w, top, left), worked by hand
GEOMETRY_CASES = [
    [(100, 200, 64), (32, 64, 16, 0)],  # landscape: ratio 0.32, 16 rows of padding above and below
    [(300, 200, 256), (256, 171, 0, 42)],  # portrait: ratio 0.8533, 200 * 0.8533 = 170.7 -> 171 columns
    [(50, 50, 128), (128, 128, 0, 0)],  # upscaled 2.56x
    [(256, 256, 256), (256, 256, 0, 0)],  # unchanged
]
# (height, width, size), letterbox box -> original box
MAPPING_CASES = [
    [(100, 200, 64), [0.0, 16.0, 32.0, 32.0], [0.0, 0.0, 100.0, 50.0]],  # scale 200/64 = 100/32 = 3.125
    [(300, 200, 256), [127.5, 128.0, 213.0, 256.0], [100.0, 150.0, 200.0, 300.0]],  # x: 85.5 * 200/171
    [(100, 200, 64), [-10.0, -10.0, 300.0, 300.0], [0.0, 0.0, 200.0, 100.0]],  # clipped to the image
    [(50, 50, 128), [12.8, 25.6, 64.0, 128.0], [5.0, 10.0, 25.0, 50.0]],  # upscaled: divide by 2.56
]
ILL_CASES = [
    {"image_size": 100},
    {"conf_threshold": 1.0},
    {"tta_scales": []},
    {"tta_merge": "mean"},
]


@pytest.mark.parametrize("args, expected", GEOMETRY_CASES)
def test_letterbox_geometry(args, expected):
    geometry = letterbox_geometry(*args)
    assert (geometry.new_h, geometry.new_w, geometry.top, geometry.left) == expected


@pytest.mark.parametrize("args, box, expected", MAPPING_CASES)
def test_boxes_to_original_by_hand(args, box, expected):
    mapped = boxes_to_original(torch.tensor([box]), letterbox_geometry(*args))
    assert mapped[0].tolist() == pytest.approx(expected, abs=1e-4)


def test_letterbox_places_content_and_pads_grey():
    image = torch.ones(1, 1, 100, 200)
    boxed, geometry = letterbox(image, 64, pad_value=0.25)
    assert boxed.shape == (1, 1, 64, 64) and geometry == Letterbox(100, 200, 64, 32, 64, 16, 0)
    torch.testing.assert_close(boxed[..., 16:48, :], torch.ones(1, 1, 32, 64))
    assert torch.all(boxed[..., :16, :] == 0.25) and torch.all(boxed[..., 48:, :] == 0.25)


def test_nms_is_per_class_unless_agnostic():
    # anchors: (centre x, centre y, w, h, score class 0, score class 1)
    anchors = torch.tensor([
        [10.0, 10.0, 10.0, 10.0, 0.9, 0.0],
        [11.0, 10.0, 10.0, 10.0, 0.8, 0.0],  # overlaps the first (IoU 0.82), same class: suppressed
        [11.0, 10.0, 10.0, 10.0, 0.0, 0.7],  # same place, other class: kept unless class-agnostic
        [40.0, 40.0, 4.0, 4.0, 0.1, 0.0],  # below the score threshold
    ])
    predictions = anchors.T[None]  # (1, 4 + 2, 4)
    per_class = non_max_suppression(predictions, conf_threshold=0.25, iou_threshold=0.5)[0]
    torch.testing.assert_close(per_class, torch.tensor([[5, 5, 15, 15, 0.9, 0], [6, 5, 16, 15, 0.7, 1]]))
    agnostic = non_max_suppression(predictions, conf_threshold=0.25, iou_threshold=0.5, class_agnostic=True)[0]
    torch.testing.assert_close(agnostic, torch.tensor([[5, 5, 15, 15, 0.9, 0]]))


def _bright_rectangle(height: int, width: int, rows: slice, cols: slice) -> MetaTensor:
    picture = torch.full((height, width), 0.2)
    picture[rows, cols] = 1.0
    return MetaTensor(picture.T[None, None].contiguous())  # MONAI's (B, C, W, H)


@pytest.mark.parametrize("tta", [{}, {"tta_flip": True, "tta_scales": (0.5, 1.0, 1.5)},
                                 {"tta_flip": True, "tta_merge": "nms"}])
def test_inferer_returns_boxes_in_original_pixels(tta):
    # a 200-row, 300-column image with a bright block at rows 50..89, columns 120..209
    image = _bright_rectangle(200, 300, slice(50, 90), slice(120, 210))
    out = YOLODetectionInferer(image_size=256, **tta)(image, BrightBoxDetector(num_classes=3, box_class=2))
    assert out.shape == (1, 1, 6)
    x0, y0, x1, y1, score, cls = out[0, 0].tolist()
    # letterbox resampling blurs the block's edges by about one letterbox pixel (1.17 original pixels)
    assert [x0, y0, x1, y1] == pytest.approx([120, 50, 210, 90], abs=2.0)
    assert cls == 2 and score == pytest.approx(0.9, abs=1e-4)


def test_inferer_pads_images_with_fewer_detections():
    images = torch.cat([_bright_rectangle(64, 64, slice(10, 20), slice(30, 40)), torch.full((1, 1, 64, 64), 0.2)])
    out = YOLODetectionInferer(image_size=64)(images, BrightBoxDetector(num_classes=1, box_class=0))
    assert out.shape == (2, 1, 6)
    assert out[0, 0, :4].tolist() == pytest.approx([30, 10, 40, 20], abs=1.0)
    assert out[1, 0].tolist() == [0, 0, 0, 0, 0, -1]


@pytest.mark.parametrize("kwargs", ILL_CASES)
def test_inferer_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        YOLODetectionInferer(**kwargs)
