"""multi_gpu_train.json under torchrun (2 CPU processes, gloo), MLflow tracking, and the benchmark command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from common.data import generate_synthetic_3d
from tests.bundles.runner import torchrun_bundle
from tests.bundles.test_iris_bundle import BUNDLE, bundle_run

SMALL = ["--image_size", "[32,32,32]", "--max_epochs", "1", "--episodes_per_epoch", "4", "--val_interval", "1"]
pytestmark = pytest.mark.xdist_group(name="iris_distributed")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate_synthetic_3d(out, num_cases=8, shape=(48, 48, 32), seed=5, split=(0.5, 0.25, 0.25))
    return out


def test_multi_gpu_train_runs_under_torchrun_on_cpu(synth, tmp_path):
    torchrun_bundle(BUNDLE, "--dataset_dir", str(synth), "--ckpt_dir", str(tmp_path / "models"),
                    "--output_dir", str(tmp_path / "eval"), *SMALL)
    # rank 0 alone writes checkpoints; the gathered bank holds episodes of both ranks
    assert [p.name for p in (tmp_path / "models").glob("checkpoint_*.pt")] == ["checkpoint_checkpoint_epoch=1.pt"]
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=False)
    assert int(state["memory_bank.counts"].sum()) >= 2


def test_mlflow_tracking_through_the_runner(synth, tmp_path):
    bundle_run(
        "train.json", "--dataset_dir", str(synth), "--ckpt_dir", str(tmp_path / "models"),
        "--output_dir", str(tmp_path / "eval"), "--tracking", "mlflow", *SMALL,
    )
    assert (tmp_path / "eval" / "mlruns.db").stat().st_size > 0


def test_benchmark_command_prints_figures():
    cmd = [sys.executable, "-m", "common.cli", "benchmark", "iris", "--image_size", "16", "--num_classes", "2",
           "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["network"] == "iris_small" and result["params_m"] == pytest.approx(0.616, abs=0.01)
    assert result["latency_s"] > 0 and result["peak_memory_mb"] > 0
