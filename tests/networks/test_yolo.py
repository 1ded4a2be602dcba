"""YOLODetector: shapes per model family, argument checks, weights from both checkpoint kinds, fusion."""

from __future__ import annotations

import pytest
import torch

from common.networks.yolo import YOLODetector, load_yolo_state_dict

pytestmark = pytest.mark.xdist_group(name="yolo_engine")

# kwargs, input shape, output shape: 4 box values + one score per class, anchors of strides 8, 16 and 32
TEST_CASES = [
    [{"model": "yolov5n.yaml", "num_classes": 11}, (1, 1, 256, 256), (1, 15, 32 * 32 + 16 * 16 + 8 * 8)],
    [{"model": "yolov8n.yaml", "num_classes": 14}, (2, 1, 64, 96), (2, 18, 8 * 12 + 4 * 6 + 2 * 3)],
    [{"model": "yolo11n.yaml", "num_classes": 1, "in_channels": 3}, (1, 3, 64, 64), (1, 5, 64 + 16 + 4)],
]
# kwargs, the error message's start
ILL_CASES = [
    # weights go to `weights`; nothing is fetched by name
    [{"model": "yolov5n.pt"}, "model should be an ultralytics model YAML.*got 'yolov5n.pt'"],
    # NMS-free head: another output format
    [{"model": "yolov10n.yaml"}, "model should be an ultralytics model YAML.*got 'yolov10n.yaml'"],
    [{"num_classes": 0}, "num_classes should be"],
    [{"in_channels": 2}, "in_channels should be 1 or 3"],
]


@pytest.mark.parametrize("kwargs, in_shape, out_shape", TEST_CASES)
def test_shapes(kwargs, in_shape, out_shape):
    net = YOLODetector(**kwargs).eval()
    with torch.no_grad():
        out = net(torch.rand(in_shape))
    assert out.shape == out_shape and out.dtype == torch.float32
    assert torch.all((out[:, 4:] >= 0) & (out[:, 4:] <= 1))  # class scores are probabilities


@pytest.mark.parametrize("kwargs, message", ILL_CASES)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        YOLODetector(**kwargs)


def test_input_sides_must_be_multiples_of_32():
    with pytest.raises(ValueError, match="multiples of 32"):
        YOLODetector("yolov5n.yaml", 2)(torch.rand(1, 1, 48, 64))


def test_weights_from_state_dict_and_from_ultralytics_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = YOLODetector("yolov5n.yaml", num_classes=3).eval()
    torch.save(net.state_dict(), tmp_path / "model.pt")
    torch.save({"model": net.model.half(), "ema": None}, tmp_path / "best.pt")  # ultralytics keeps fp16 modules
    net.float()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        expected = net(x)
        for path in ("model.pt", "best.pt"):
            loaded = YOLODetector("yolov5n.yaml", num_classes=3, weights=tmp_path / path).eval()
            torch.testing.assert_close(loaded(x), expected, atol=2e-2, rtol=1e-2)
    assert set(load_yolo_state_dict(tmp_path / "best.pt")) == set(net.state_dict())


def test_fuse_keeps_the_outputs():
    net = YOLODetector("yolov5n.yaml", num_classes=2).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        before = net(x)
        assert not net.fused
        after = net.fuse()(x)
    assert net.fused
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-3)
