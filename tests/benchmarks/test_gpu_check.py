"""The GPU check: it refuses without CUDA, and its code path runs end to end at tiny sizes on a CPU."""

from __future__ import annotations

import json

import pytest
import torch

from common.benchmarks.gpu_check import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the check would run")
def test_refuses_without_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu_check("cuda")
    with pytest.raises(SystemExit, match="--quick true"):
        gpu_check("cpu")


def test_quick_run_fills_every_row(tmp_path, capsys):
    torch.set_num_threads(1)
    rows = gpu_check("cpu", quick=True, out=str(tmp_path / "rows.json"), inference=False)
    names = [r["row"] for r in rows]
    assert names[:3] == ["train step iris_small", "train step csr resnet18_os16", "train step ct_vit_tiny"]
    assert any(n.startswith("IRIS small 16^3 forward, 3 reference") for n in names)
    assert names[-1] == "YOLO yolov5s at 64"
    assert [r for r in rows if "error" in r] == []
    assert all(r.get("latency_s", 1) > 0 for r in rows)
    assert rows[-1]["bundle_over_ultralytics"] > 0
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    printed = capsys.readouterr().out
    assert "| check |" in printed and "| YOLO yolov5s at 64 |" in printed
