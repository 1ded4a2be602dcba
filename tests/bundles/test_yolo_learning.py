"""YOLO training through the bundle learns: held-out mAP well above an untrained network's, boxes where the lesions
are, and no network access during the run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from common.data import generate_synthetic_cxr
from common.networks.yolo import YOLODetector
from tests.bundles.test_yolo_bundle import bundle_run

SIZE = ["--image_size", "128"]
# small and CPU-friendly: no mosaic, one optimizer step per batch, a single validation after the last epoch (so the
# kept weights are not chosen on the test images the final evaluation reports)
TRAIN = ["--max_epochs", "30", "--batch_size", "4", "--nominal_batch_size", "4", "--learning_rate", "0.002",
         "--warmup_epochs", "1", "--mosaic", "0.0", "--close_mosaic", "0", "--validate_every_epoch", "false"]
LARGE_LESIONS = {4: "effusion", 5: "cardiomegaly", 6: "pneumothorax"}

BLOCKER = '''
import os
import socket

_connect = socket.socket.connect


def _refuse(*args):
    with open(os.environ["NETWORK_ATTEMPTS"], "a") as log:
        log.write(repr(args[:2]) + "\\n")
    raise OSError("network access is disabled for this run")


def _connect_local_only(self, address):
    if self.family == getattr(socket, "AF_UNIX", None):
        return _connect(self, address)
    _refuse(address)


socket.create_connection = _refuse
socket.getaddrinfo = _refuse
socket.socket.connect = _connect_local_only
'''


def _iou(a: list[float], b: list[float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.slow
@pytest.mark.xdist_group(name="yolo_learning")
def test_training_beats_untrained_offline_and_finds_large_lesions(tmp_path, monkeypatch):
    data = tmp_path / "data"
    generate_synthetic_cxr(data, num_images=48, size=128, seed=7, split=(0.75, 0.0, 0.25))
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    attempts = tmp_path / "network_attempts.log"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("NETWORK_ATTEMPTS", str(attempts))

    trained = tmp_path / "trained"
    bundle_run("train.json", "--dataset_dir", str(data), "--ckpt_dir", str(trained / "models"), "--output_dir",
               str(trained), "--validation_split", "test", "--save_detections", "true", "--save_score_threshold",
               "0.001", *TRAIN, *SIZE)
    assert not attempts.exists(), attempts.read_text()

    untrained = tmp_path / "untrained"
    (untrained / "models").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(YOLODetector("yolov5n.yaml", num_classes=11).state_dict(), untrained / "models" / "model.pt")
    bundle_run(["train.json", "evaluate.json"], "--dataset_dir", str(data), "--ckpt_dir", str(untrained / "models"),
               "--output_dir", str(untrained), *SIZE)

    score = json.loads((trained / "val_metrics.json").read_text())
    baseline = json.loads((untrained / "metrics.json").read_text())
    assert score["images"] == baseline["images"] == 12
    # measured (2 CPU cores, 108 s for the file): untrained 0.000; trained mAP@0.5 0.261 and mAP@0.5:0.95 0.110,
    # from cardiomegaly 0.83, pneumothorax 0.82, effusion 0.60 and mass 0.57 AP@0.5 (small lesions still 0)
    assert baseline["map50"] < 0.01, baseline
    assert score["map50"] > 0.15 and score["map50"] > baseline["map50"] + 0.12, score
    assert (trained / "ultralytics" / "results.csv").is_file()
    assert (trained / "models" / "model_ultralytics.pt").is_file()

    # the best box of each large lesion class, in the written detections, lies on the drawn lesion (measured: all
    # 13 such lesions of the test images, IoU 0.55-0.87)
    datalist = json.loads((data / "datalist.json").read_text())
    hits = []
    for item in datalist["test"]:
        found = json.loads((trained / "detections" / f"{Path(item['image']).stem}_detections.json").read_text())
        for index, *truth in item["boxes"]:
            if index in LARGE_LESIONS:
                best = max((d for d in found["detections"] if d["class_index"] == index), key=lambda d: d["score"],
                           default=None)
                hits.append(0.0 if best is None else round(_iou(best["box"], truth), 2))
    assert len(hits) >= 8 and sum(h >= 0.5 for h in hits) >= 0.75 * len(hits), hits
