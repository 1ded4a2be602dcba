"""The YOLO benchmark: ultralytics' predict and the bundle's inference path on the same images."""

from __future__ import annotations

import pytest
import torch

from common.benchmarks import benchmark_yolo


@pytest.mark.xdist_group(name="yolo_engine")
def test_benchmark_reports_both_throughputs_their_ratio_and_keeps_threads():
    threads = torch.get_num_threads()
    result = benchmark_yolo(num_images=2, source_size=128, image_size=64, warmup=1)
    assert result["images"] == 2 and result["weights"] == "random" and result["threads"] == threads
    raw, bundle = result["ultralytics_predict_images_per_s"], result["bundle_inference_images_per_s"]
    assert raw > 0 and bundle > 0 and result["peak_memory_mb"] > 0
    assert result["bundle_over_ultralytics"] == pytest.approx(bundle / raw, rel=0.05)
    assert torch.get_num_threads() == threads


def test_benchmark_refuses_a_folder_without_pictures(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"")
    with pytest.raises(ValueError, match="no PNG or JPEG"):
        benchmark_yolo(images=str(tmp_path), num_images=1)
