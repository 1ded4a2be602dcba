"""UltralyticsTrainer: argument translation, an offline run that leaves the process as it found it, lazy imports."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, ScaleIntensityRangePercentilesd
from PIL import Image

from common.data import ErrorTolerantDataset, LESION_CLASSES, generate_synthetic_cxr, load_datalist
from common.yolo.trainer import UltralyticsTrainer, ultralytics_device
from common.transforms import LoadMedicalImaged

pytestmark = pytest.mark.xdist_group(name="yolo_engine")

DEVICE_CASES = [
    [torch.device("cpu"), "cpu"],
    ["cpu", "cpu"],
    [torch.device("cuda:1"), "1"],
    [torch.device("cuda"), "0"],
    [2, "2"],
    [[0, 1], "0,1"],
    ["0,1", "0,1"],
]
ILL_CASES = [
    {"max_epochs": 0},
    {"image_size": 100},
    {"batch_size": 0},
    {"class_names": []},
]


@pytest.mark.parametrize("device, expected", DEVICE_CASES)
def test_ultralytics_device(device, expected):
    assert ultralytics_device(device) == expected


def test_ultralytics_device_rejects_an_empty_gpu_list():
    with pytest.raises(ValueError, match="at least one GPU"):
        ultralytics_device([])


@pytest.mark.parametrize("kwargs", ILL_CASES)
def test_trainer_rejects_bad_arguments(kwargs, tmp_path):
    args = {"train_dataset": [], "val_dataset": None, "class_names": ["a"], "output_dir": tmp_path,
            "ckpt_dir": tmp_path, **kwargs}
    with pytest.raises(ValueError):
        UltralyticsTrainer(**args)


def test_trainer_refuses_ignite_handlers_other_than_mlflow(tmp_path):
    from monai.handlers import StatsHandler

    with pytest.raises(ValueError, match="StatsHandler"):
        UltralyticsTrainer([], None, ["a"], tmp_path, tmp_path, train_handlers=[StatsHandler()])


def test_mlflow_callbacks_pickle_for_ddp_workers(tmp_path, monkeypatch):
    """ultralytics' DDP launcher pickles the callbacks: the MLflow logger travels as its URI and run id."""
    import pickle

    from common.yolo.env import import_ultralytics

    for name in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    monkeypatch.setenv("YOLO_CONFIG_DIR", os.environ.get("YOLO_CONFIG_DIR") or str(tmp_path))
    import_ultralytics()
    from common.yolo.detection_trainer import MLflowEpochLogger

    tracker = MLflowEpochLogger(f"sqlite:///{tmp_path / 'mlruns.db'}", "run")
    assert tracker.client is not None
    callback = pickle.loads(pickle.dumps(tracker.log_epoch))
    assert callback.__self__.run_id == "run" and callback.__self__._client is None
    assert callback.__module__ == "common.yolo.detection_trainer"  # kept by BundleDetectionTrainer


def test_trainer_translates_config_to_ultralytics_arguments(tmp_path):
    trainer = UltralyticsTrainer([], None, ["a", "b"], tmp_path / "out", tmp_path / "models", model="yolov8n.yaml",
                                 max_epochs=7, image_size=96, batch_size=3, learning_rate=0.02, mosaic=0.5,
                                 mixup=0.1, warmup_epochs=0.5, device=[0, 1], amp=True)
    assert trainer.max_epochs == 7 and trainer.device == "0,1" and trainer.amp == "bf16"
    args = trainer._overrides(tmp_path / "data.yaml")
    assert {k: args[k] for k in ("epochs", "imgsz", "batch", "lr0", "mosaic", "mixup", "warmup_epochs")} == {
        "epochs": 7, "imgsz": 96, "batch": 3, "lr0": 0.02, "mosaic": 0.5, "mixup": 0.1, "warmup_epochs": 0.5}
    assert args["model"] == "yolov8n.yaml" and args["pretrained"] is False and args["plots"] is False
    assert args["project"] == str((tmp_path / "out").resolve()) and args["name"] == "ultralytics"
    cpu = UltralyticsTrainer([], None, ["a"], tmp_path, tmp_path, device="cpu", amp=True)
    assert cpu.amp is False  # autocast on CPU would slow training down


def test_export_writes_the_sampled_training_list(tmp_path):
    def item(name: str, boxes: list) -> dict:
        return {"image": MetaTensor(torch.rand(1, 64, 64), meta={"filename_or_obj": name}), "boxes": boxes}

    train = [item(f"neg{i}.png", []) for i in range(6)] + [item(f"common{i}.png", [[0, 4, 4, 20, 20]])
                                                           for i in range(3)] + [item("rare.png", [[1, 8, 8, 30, 30]])]
    trainer = UltralyticsTrainer(train, None, ["a", "b"], tmp_path / "out", tmp_path / "models",
                                 repeat_threshold=0.5, negative_fraction=0.25, seed=0)
    data = json.loads(trainer.export_dataset().read_text())
    listed = (tmp_path / "out" / "dataset" / "train.txt").read_text().splitlines()
    assert data["train"] == "train.txt" and trainer.num_train_images == len(listed)
    assert all(Path(p).is_file() for p in listed)
    assert sum(p.endswith("_rare.png") for p in listed) in (2, 3)
    report = json.loads((tmp_path / "out" / "dataset" / "report.json").read_text())
    assert report["sampling"]["negatives_kept"] == sum("_neg" in p for p in listed) < 6
    assert "files" not in report["train"]


def test_trainer_starts_from_pretrained_weights(tmp_path):
    from common.networks.yolo import YOLODetector

    torch.manual_seed(0)
    weights = tmp_path / "model.pt"
    torch.save(YOLODetector("yolov5n.yaml", num_classes=2).state_dict(), weights)
    trainer = UltralyticsTrainer([], None, ["a", "b"], tmp_path / "out", tmp_path / "models", model="yolov5n.yaml",
                                 pretrained=weights)
    (tmp_path / "out").mkdir()
    args = trainer._overrides(tmp_path / "data.yaml")
    start = torch.load(args["pretrained"], map_location="cpu", weights_only=False)["model"]  # ultralytics' format
    expected = torch.load(weights, map_location="cpu")
    assert all(torch.equal(v, expected[f"model.{k}"]) for k, v in start.state_dict().items())
    with pytest.raises(ValueError, match="model YAML"):
        UltralyticsTrainer([], None, ["a"], tmp_path, tmp_path, model="best.pt", pretrained=weights)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_cxr")
    generate_synthetic_cxr(out, num_images=6, size=64, seed=3, split=(0.67, 0.33, 0.0))
    return out


def _datasets(data: Path) -> tuple[ErrorTolerantDataset, ErrorTolerantDataset]:
    transform = Compose([
        LoadMedicalImaged(keys="image"), EnsureChannelFirstd(keys="image"),
        ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
    ])
    train = load_datalist(data / "datalist.json", "training") + [{"image": str(data / "missing.png"), "boxes": []}]
    return (ErrorTolerantDataset(train, transform),
            ErrorTolerantDataset(load_datalist(data / "datalist.json", "validation"), transform))


@pytest.fixture()
def no_network(monkeypatch):
    """Every attempt to reach another machine is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    return attempts


def test_offline_training_run_writes_weights_and_restores_the_process(tiny, tmp_path, no_network, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written to the working directory would show up here
    threads, environment = torch.get_num_threads(), dict(os.environ)
    train, val = _datasets(tiny)
    trainer = UltralyticsTrainer(train, val, LESION_CLASSES, tmp_path / "out", tmp_path / "models",
                                 model="yolov5n.yaml", max_epochs=1, image_size=64, batch_size=2, mosaic=0.0,
                                 warmup_epochs=0.0, ema=False)
    metrics = trainer.run()
    assert no_network == []
    assert "metrics/mAP50(B)" in metrics
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    changed = {k for k in set(os.environ) | set(environment) if os.environ.get(k) != environment.get(k)}
    assert changed <= {"YOLO_CONFIG_DIR", "YOLO_OFFLINE", "YOLO_AUTOINSTALL"}, changed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "out"]
    report = json.loads((tmp_path / "out" / "dataset" / "report.json").read_text())
    assert report["train"]["images"] == 4 and "missing.png" in report["train"]["skipped"][0]["source"]
    assert list((tmp_path / "out").glob("events.out.tfevents.*"))
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    from common.networks.yolo import YOLODetector

    net = YOLODetector("yolov5n.yaml", num_classes=len(LESION_CLASSES))
    net.load_state_dict(state)
    assert (tmp_path / "models" / "model_ultralytics.pt").stat().st_size > 1e6


def test_common_packages_do_not_import_ultralytics(tmp_path):
    code = (
        "import sys, torch; torch.set_num_threads(2); "
        "import common, common.data, common.engines, common.transforms, common.networks, common.handlers; "
        "import common.yolo, common.yolo.trainer, common.engines.detection, common.networks.yolo; "
        "import common.transforms.detection; "
        "import common.transforms.clahe, common.handlers.detection_map, common.benchmarks.yolo; "
        "print('ultralytics' in sys.modules, torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "YOLO_CONFIG_DIR")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "2"]


def test_a_damaged_png_is_named_as_such_once_ultralytics_is_imported(tmp_path):
    # ultralytics' import replaces PIL.Image.open with one that answers an unidentified file by installing a HEIF
    # plugin, which offline fails with ModuleNotFoundError; the shared reader must still name the damage
    image = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    (tmp_path / "cut_header.png").write_bytes(buffer.getvalue()[:30])
    code = (
        "import sys, os; from common.yolo.env import import_ultralytics; import_ultralytics(); "
        "from ultralytics import YOLO; from common.transforms import LoadMedicalImaged\n"
        "try:\n    LoadMedicalImaged(keys='image')({'image': sys.argv[1]})\n"
        "except Exception as err:\n    print(type(err).__name__, err)"
    )
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "yolo")}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cut_header.png")], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == (
        f"ValueError {tmp_path / 'cut_header.png'}: truncated or corrupt PNG image.")
