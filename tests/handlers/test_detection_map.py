"""DetectionMAP as an ignite metric in an engine, with its report files."""

from __future__ import annotations

import json

import pytest
import torch
from ignite.engine import Engine

from common.handlers.detection_map import DetectionMAP


def test_metric_in_an_engine_writes_its_report(tmp_path):
    outputs = [
        [{"pred": torch.tensor([[10.0, 10, 50, 50, 0.9, 0]]), "label": torch.tensor([[0.0, 10, 10, 50, 50]])}],
        [{"pred": torch.zeros(0, 6), "label": torch.tensor([[1.0, 5, 5, 20, 20]])}],
    ]
    engine = Engine(lambda engine, batch: batch)
    DetectionMAP(["nodule", "mass"], output_dir=tmp_path, filename="val").attach(engine, "map50")
    state = engine.run(outputs)
    assert state.metrics["map50"] == pytest.approx(0.5)  # nodule found (AP 1), mass missed (AP 0)
    report = json.loads((tmp_path / "val.json").read_text())
    assert report["per_class"]["mass"] == {"boxes": 1, "ap40": 0.0, "ap50": 0.0, "ap50_95": 0.0}
    assert (tmp_path / "val.md").read_text().startswith("Detection mAP over 2 image(s)")


def test_metric_needs_ground_truth():
    metric = DetectionMAP(["a"])
    metric.reset()
    with pytest.raises(ValueError, match="ground-truth"):
        metric.update(([torch.zeros(0, 6)], [None]))


def test_unknown_key_is_refused():
    with pytest.raises(ValueError):
        DetectionMAP(["a"], key="map75")
