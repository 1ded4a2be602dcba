"""Writing preprocessed items as an ultralytics data set: images, normalised labels, skipped items, data YAML."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from PIL import Image

from common.yolo.dataset import repeat_factors, sample_training_images, write_yolo_data_yaml, write_yolo_split


def _item(width: int, height: int, boxes, name: str = "a.png") -> dict:
    image = MetaTensor(torch.rand(1, width, height), meta={"filename_or_obj": f"/data/{name}"})
    return {"image": image, "boxes": boxes}


def test_labels_are_normalised_by_hand_and_images_keep_rows_first(tmp_path):
    # 200 columns x 100 rows; box x 20..60, y 10..30 -> centre (40, 20) / (200, 100), size 40 x 20
    items = [_item(200, 100, [[3, 20, 10, 60, 30]]), _item(50, 50, [], "b.dcm"),
             {"error": "b.png: unreadable", "source": "/data/bad.png"}]
    report = write_yolo_split(items, tmp_path, "train")
    files = [str((tmp_path / "images" / "train" / f"{stem}.png").resolve()) for stem in ("000000_a", "000001_b")]
    assert report == {"split": "train", "images": 2, "boxes": 1, "background": 1,
                      "skipped": [{"source": "/data/bad.png", "error": "b.png: unreadable"}],
                      "files": files, "classes": [[3], []]}
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


def test_repeat_factors_by_hand():
    # class 0 in 3 of 5 images: above the threshold, not repeated; class 1 in 1 of 5: sqrt(0.5 / 0.2)
    factors = repeat_factors([[0], [0], [0, 1], [1, 1], []], threshold=0.5)
    assert factors == pytest.approx([1.0, 1.0, 1.25 ** 0.5, 1.25 ** 0.5, 1.0])  # class 1 in 2 of 5
    assert repeat_factors([[0], [1], [], []], threshold=0.0) == [1.0] * 4
    with pytest.raises(ValueError, match="threshold"):
        repeat_factors([[0]], threshold=2)


# ten images: six "no finding", three of class 0 (in 0.3 of the images: not repeated at threshold 0.25), one of
# the rare class 1 (repeat factor sqrt(0.25 * 10) = 1.581)
FILES = [f"img{i}.png" for i in range(10)]
CLASSES = [[], [], [], [], [], [], [0], [0], [0], [1]]


def test_sampling_repeats_the_rare_class_and_caps_negatives():
    listed, summary = sample_training_images(FILES, CLASSES, repeat_threshold=0.25, negative_fraction=0.25, seed=0)
    copies = listed.count("img9.png")
    assert copies in (1, 2) and all(listed.count(f) == 1 for f in ("img6.png", "img7.png", "img8.png"))
    negatives = [f for f in listed if int(f[3:-4]) < 6]
    assert len(negatives) == summary["negatives_kept"] == (3 + copies) // 3  # at most a quarter of the list
    assert summary["negatives_dropped"] == 6 - len(negatives) and summary["list_length"] == len(listed)
    assert sample_training_images(FILES, CLASSES, 0.25, 0.25, seed=0)[0] == listed  # seeded
    # stochastic rounding keeps the expected number of copies: 1.581 on average (2000 draws: standard error 0.011)
    mean = np.mean([sample_training_images(FILES, CLASSES, 0.25, None, seed=s)[0].count("img9.png")
                    for s in range(2000)])
    assert mean == pytest.approx(2.5 ** 0.5, abs=0.04)


def test_sampling_off_keeps_every_image_once():
    listed, summary = sample_training_images(FILES, CLASSES)
    assert listed == sorted(FILES) and summary["negatives_dropped"] == 0 and summary["repeated_images"] == 0
    with pytest.raises(ValueError, match="negative_fraction"):
        sample_training_images(FILES, CLASSES, negative_fraction=1.0)
