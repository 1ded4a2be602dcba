"""The command line as a user runs it: the demo over every bundle and the data generators."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.cli import BUNDLES_DIR


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "common.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.xdist_group(name="demo")
def test_demo_runs_every_bundle_on_its_embedded_sample(tmp_path):
    proc = cli("demo", "--out", str(tmp_path))
    bundles = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "inference.json").is_file())
    assert bundles
    for name in bundles:
        out = tmp_path / name
        assert list(out.glob("*.png")), f"{name}: no preview in {out}"
        report = json.loads((out / "run_report.json").read_text())
        assert report["completed"] and not report["failed"]
    assert str(tmp_path) in proc.stdout


def test_iris_sample_command_builds_a_runnable_sample(tmp_path):
    cli("iris_sample", "--out", str(tmp_path / "sample"), "--num_cases", "4")
    refs = json.loads((tmp_path / "sample" / "references.json").read_text())
    assert refs["references"] and all((tmp_path / "sample" / r["image"]).exists() for r in refs["references"])
    assert "nodule_cluster" not in refs["classes"]  # held-out classes stay out of the sample's references
    with pytest.raises(AssertionError, match="already exists|FileExistsError"):
        cli("iris_sample", "--out", str(tmp_path / "sample"), "--num_cases", "4")


def test_mni152_command(tmp_path):
    cli("mni152", "--out", str(tmp_path / "mni"), "--num_queries", "1")
    datalist = json.loads((tmp_path / "mni" / "datalist.json").read_text())
    assert Path(tmp_path / "mni" / datalist["test"][0]["image"]).exists()


def test_episodes_preview_command(tmp_path):
    proc = cli("episodes_preview", "--out", str(tmp_path), "--num", "2", "--seed", "0", "--image_size", "32")
    png = tmp_path / "episodes.png"
    assert png.stat().st_size > 1000 and str(png) in proc.stdout
    before = png.read_bytes()
    with pytest.raises(AssertionError, match="already exists"):
        cli("episodes_preview", "--out", str(tmp_path), "--num", "2", "--image_size", "32")
    assert png.read_bytes() == before
    cli("episodes_preview", "--out", str(tmp_path), "--num", "1", "--image_size", "32", "--overwrite", "true")
    assert png.read_bytes() != before
    one = png.read_bytes()
    # the same episode drawn CT-like looks different
    cli("episodes_preview", "--out", str(tmp_path), "--num", "1", "--image_size", "32", "--overwrite", "true",
        "--low_contrast_fraction", "1")
    assert png.read_bytes() != one


def test_vindr_detection_command_on_the_real_annotations(tmp_path):
    """torchxrayvision's VinBigData CSV (15,000 images, three readers each) with the two-of-three-readers filter."""
    summary = json.loads(cli("vindr_detection", "--out", str(tmp_path), "--min_score", "0.5").stdout)
    assert summary["images"] == 15000 and summary["rows"] == 67914 and summary["skipped"] == 0
    assert summary["training"] + summary["validation"] == 15000
    # measured: the 36,096 reader boxes fuse to 22,705 (min_score 0), of which 8,823 were drawn by at least two readers
    assert summary["boxes"] == 36096 and summary["fused_boxes"] == 8823
    assert sum(summary["per_class"].values()) == summary["fused_boxes"]
    again = subprocess.run([sys.executable, "-m", "common.cli", "vindr_detection", "--out", str(tmp_path)],
                           capture_output=True, text=True)
    assert again.returncode != 0 and "exists; pass --overwrite true" in again.stderr


@pytest.mark.xdist_group(name="yolo_engine")
def test_benchmark_command_takes_the_yolo_model_yaml():
    proc = cli("benchmark", "yolo", "--model", "yolov5s.yaml", "--num_images", "1", "--source_size", "64",
               "--image_size", "64", "--warmup", "0")
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["model"] == "yolov5s.yaml" and result["bundle_over_ultralytics"] > 0


def test_benchmark_command_names_an_option_the_network_lacks():
    proc = subprocess.run([sys.executable, "-m", "common.cli", "benchmark", "yolo", "--model_yaml", "yolov5s.yaml"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "yolo has no option ['model_yaml']" in proc.stderr and "'model'" in proc.stderr
