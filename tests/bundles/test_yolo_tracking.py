"""MLflow tracking of the YOLO bundle's training, as ``--tracking mlflow`` adds it to any MONAI bundle."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from common.data import generate_synthetic_cxr
from tests.bundles.test_yolo_bundle import bundle_run

pytestmark = pytest.mark.xdist_group(name="yolo_bundle")
EPOCHS = 2
TINY = ["--max_epochs", str(EPOCHS), "--image_size", "64", "--batch_size", "2", "--nominal_batch_size", "2",
        "--mosaic", "0.0", "--close_mosaic", "0", "--warmup_epochs", "0.0"]
PER_EPOCH = ["train/box_loss", "train/cls_loss", "metrics/mAP50B", "metrics/mAP50-95B", "lr/pg0"]


def test_training_with_mlflow_tracking_logs_every_epoch(tmp_path):
    """The run is in MONAI's default store, the SQLite database ``output_dir/mlruns.db``, with ultralytics' arguments
    as parameters and each epoch's training losses, validation metrics and learning rates."""
    data, out = tmp_path / "data", tmp_path / "out"
    generate_synthetic_cxr(data, num_images=6, size=64, seed=3, split=(0.67, 0.33, 0.0))
    bundle_run("train.json", "--tracking", "mlflow", "--dataset_dir", str(data), "--output_dir", str(out),
               "--ckpt_dir", str(tmp_path / "models"), *TINY)
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("monai_experiment")
    (run,) = [r for r in client.search_runs([experiment.experiment_id]) if "train/box_loss" in r.data.metrics]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["epochs"] == params["max_epochs"] == str(EPOCHS) and params["imgsz"] == "64"
    for name in PER_EPOCH:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert set(range(1, EPOCHS + 1)) <= set(steps), (name, steps)
