"""Writing preprocessed items as an ultralytics data set: images, normalised labels, skipped items, data YAML."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from common.data.yolo_dataset import write_yolo_data_yaml, write_yolo_split


def _item(width: int, height: int, boxes, name: str = "a.png") -> dict:
    image = MetaTensor(torch.rand(1, width, height), meta={"filename_or_obj": f"/data/{name}"})
    return {"image": image, "boxes": boxes}


def test_labels_are_normalised_by_hand_and_images_keep_rows_first(tmp_path):
    # 200 columns x 100 rows; box x 20..60, y 10..30 -> centre (40, 20) / (200, 100), size 40 x 20
    items = [_item(200, 100, [[3, 20, 10, 60, 30]]), _item(50, 50, [], "b.dcm"),
             {"error": "b.png: unreadable", "source": "/data/bad.png"}]
    report = write_yolo_split(items, tmp_path, "train")
    assert report == {"split": "train", "images": 2, "boxes": 1, "background": 1,
                      "skipped": [{"source": "/data/bad.png", "error": "b.png: unreadable"}]}
    assert (tmp_path / "labels" / "train" / "000000_a.txt").read_text() == "3 0.200000 0.200000 0.200000 0.200000\n"
    assert (tmp_path / "labels" / "train" / "000001_b.txt").read_text() == ""
    assert np.asarray(Image.open(tmp_path / "images" / "train" / "000000_a.png")).shape == (100, 200)


def test_large_images_shrink_but_labels_do_not_change(tmp_path):
    write_yolo_split([_item(400, 200, torch.tensor([[0.0, 100, 50, 300, 150]]))], tmp_path, "val", max_side=64)
    assert np.asarray(Image.open(tmp_path / "images" / "val" / "000000_a.png")).shape == (32, 64)
    assert (tmp_path / "labels" / "val" / "000000_a.txt").read_text() == "0 0.500000 0.500000 0.500000 0.500000\n"


def test_images_must_be_single_channel(tmp_path):
    with pytest.raises(ValueError, match=r"\(1, W, H\)"):
        write_yolo_split([{"image": torch.rand(3, 8, 8)}], tmp_path, "train")


def test_data_yaml(tmp_path):
    path = write_yolo_data_yaml(tmp_path, ["nodule", "mass"], {"train": "images/train", "val": "images/val"})
    data = json.loads(path.read_text())  # JSON is YAML
    assert data == {"path": str(tmp_path.resolve()), "train": "images/train", "val": "images/val", "channels": 1,
                    "nc": 2, "names": ["nodule", "mass"]}
