"""The detection inferer's letterbox and NMS agree with ultralytics', which trains the detector.

``common.engines.detection`` keeps its own batched tensor letterbox (MONAI's ``(W, H)`` layout in, no per-image cv2
round trip) and NMS on ``torchvision.ops.batched_nms``; these tests pin them to the library they stand in for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.engines.detection import boxes_to_original, letterbox_geometry, non_max_suppression


@pytest.fixture(scope="module")
def ultralytics(tmp_path_factory):
    from common.yolo.env import import_ultralytics

    import_ultralytics()
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.nms import non_max_suppression as nms
    from ultralytics.utils.ops import scale_boxes

    return LetterBox, nms, scale_boxes


@pytest.mark.parametrize("size", [64, 256])
def test_letterbox_places_the_image_where_ultralytics_does(ultralytics, size):
    letterbox_cls = ultralytics[0]
    rng = np.random.default_rng(0)
    for height, width in [(100, 200), (200, 100), (64, 64), (333, 517), (517, 333), (31, 250), (1000, 999)]:
        image = np.full((height, width, 3), 255, dtype=np.uint8)
        boxed = letterbox_cls(new_shape=(size, size), auto=False, scaleup=True, center=True)(image=image)
        rows, cols = np.nonzero(boxed[..., 0] > 200)  # the content; the padding is grey 114
        geometry = letterbox_geometry(height, width, size)
        assert (rows.min(), cols.min()) == (geometry.top, geometry.left), (height, width)
        assert (rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()) == (geometry.new_h, geometry.new_w)
        # boxes mapped back: within a pixel of ultralytics' scale_boxes, which divides by the unrounded gain
        xs, ys = np.sort(rng.uniform(0, size, (20, 2)), 1), np.sort(rng.uniform(0, size, (20, 2)), 1)
        boxes = torch.from_numpy(np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], 1)).float()
        theirs = ultralytics[2]((size, size), boxes.clone(), (height, width))
        assert torch.allclose(boxes_to_original(boxes, geometry), theirs, atol=max(height, width) / size + 0.5)


def test_nms_keeps_what_ultralytics_keeps(ultralytics):
    nms = ultralytics[1]
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        anchors, classes = 400, 3
        centres = torch.rand(1, 2, anchors, generator=generator) * 200
        sizes = 10 + torch.rand(1, 2, anchors, generator=generator) * 40
        scores = torch.rand(1, classes, anchors, generator=generator) ** 3
        prediction = torch.cat([centres, sizes, scores], dim=1)  # (B, 4 + K, A), as the detector outputs
        ours = non_max_suppression(prediction, conf_threshold=0.25, iou_threshold=0.7, max_detections=300)[0]
        theirs = nms(prediction.clone(), conf_thres=0.25, iou_thres=0.7, max_det=300, multi_label=False)[0]
        assert ours.shape == theirs.shape and len(ours) > 10
        order = lambda d: d[torch.argsort(d[:, 4], descending=True)]  # noqa: E731
        assert torch.allclose(order(ours), order(theirs), atol=1e-4)
