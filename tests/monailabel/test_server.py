"""The MONAI Label app (monailabel_app/) served on loopback: info and inference for every bundle.

Runs in MONAI Label's own environment (``make monailabel-test``); ``make test`` leaves this folder out.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("monailabel")
httpx = pytest.importorskip("httpx")

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
# study id -> embedded sample file
STUDIES = {
    "synth_004": BUNDLES / "iris_incontext_segmentation/sample/imagesTr/synth_004.nii.gz",
    "cxr_0000": BUNDLES / "csr_cxr_classification/sample/images/cxr_0000.png",
    "ct_000": BUNDLES / "ct_report_encoder/sample/images/ct_000.nii.gz",
}
IRIS_SAMPLE = BUNDLES / "iris_incontext_segmentation/sample"
# labelled studies MONAI Label trains on (its datastore keeps final labels under labels/final)
LABELLED = ["synth_000", "synth_001", "synth_002", "synth_003"]
START_TIMEOUT_S = 180
INFER_TIMEOUT_S = 600

pytestmark = pytest.mark.xdist_group(name="monailabel_server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    studies = tmp_path_factory.mktemp("studies")
    for path in STUDIES.values():
        shutil.copy(path, studies / path.name)
    (studies / "labels/final").mkdir(parents=True)
    for name in LABELLED:
        shutil.copy(IRIS_SAMPLE / f"imagesTr/{name}.nii.gz", studies / f"{name}.nii.gz")
        shutil.copy(IRIS_SAMPLE / f"labelsTr/{name}.nii.gz", studies / f"labels/final/{name}.nii.gz")
    port = _free_port()
    env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(tmp_path_factory.mktemp("sessions"))}
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(REPO / "monailabel_app"),
           "--studies", str(studies), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    train_dir = REPO / "monailabel_app/train"
    runs_before = set(train_dir.glob("*")) if train_dir.exists() else set()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"server did not start:\n{log.read()[-4000:]}")
            try:
                if httpx.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        yield url
    finally:
        for run in (set(train_dir.glob("*")) if train_dir.exists() else set()) - runs_before:
            shutil.rmtree(run, ignore_errors=True)  # this session's training runs
        os.kill(proc.pid, signal.SIGTERM)  # this server's process only
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _infer(url: str, model: str, image: str, output: str = "json", **params):
    files = {"params": (None, json.dumps(params))} if params else None
    r = httpx.post(f"{url}/infer/{model}", params={"image": image, "output": output}, files=files,
                   timeout=INFER_TIMEOUT_S)
    assert r.status_code == 200, r.text
    return r


def test_info(server):
    info = httpx.get(f"{server}/info/", timeout=30).json()
    models = info["models"]
    assert set(models) == {"iris_incontext_segmentation", "csr_cxr_classification", "ct_report_encoder",
                           "yolo_cxr_detection"}
    assert models["iris_incontext_segmentation"]["type"] == "segmentation"
    assert models["iris_incontext_segmentation"]["labels"]["bright_ellipsoid"] == 1
    assert models["csr_cxr_classification"]["type"] == "classification"
    assert "pneumonia" in models["csr_cxr_classification"]["labels"]
    assert models["yolo_cxr_detection"]["type"] == "detection"
    assert "nodule" in models["yolo_cxr_detection"]["labels"]
    assert models["ct_report_encoder"]["type"] == "others"
    assert "sam_2d" not in models and "sam_3d" not in models


@pytest.mark.parametrize("strategy", ["ensemble", "memory"])
def test_infer_iris_label_map(server, strategy):
    import nibabel as nib
    import numpy as np

    result = _infer(server, "iris_incontext_segmentation", "synth_004", strategy=strategy).json()["result"]
    assert result["strategy"] == strategy
    assert result["classes"]["bright_ellipsoid"]["label_value"] == 1
    r = _infer(server, "iris_incontext_segmentation", "synth_004", output="image", strategy=strategy)
    seg = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))  # the label map comes as .nii.gz
    assert seg.shape == nib.load(STUDIES["synth_004"]).shape
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= set(range(10))


def test_infer_csr_probabilities_and_heatmaps(server):
    params = _infer(server, "csr_cxr_classification", "cxr_0000").json()
    diseases = params["result"]["diseases"]
    assert set(diseases) >= {"pneumonia", "no_finding"} and all(0 <= p <= 1 for p in diseases.values())
    assert any(f.endswith("_explanation.png") for f in params["files"])
    r = _infer(server, "csr_cxr_classification", "cxr_0000", output="image")
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_infer_ct_encoder_embedding(server):
    params = _infer(server, "ct_report_encoder", "ct_000").json()
    assert len(params["embedding"]) == 128


def test_infer_yolo_boxes(server):
    result = _infer(server, "yolo_cxr_detection", "cxr_0000").json()["result"]
    assert isinstance(result["detections"], list)
    for d in result["detections"]:
        assert len(d["box"]) == 4 and 0 <= d["score"] <= 1 and d["class"] in result["class_names"]


def test_train_iris_one_epoch(server):
    request = {"max_epochs": 1, "device": "cpu", "val_split": 0.25, "episodes_per_epoch": 2, "val_interval": 1,
               "multi_gpu": False}
    r = httpx.post(f"{server}/train/iris_incontext_segmentation", params={"run_sync": True}, json=request,
                   timeout=INFER_TIMEOUT_S)
    assert r.status_code == 200, r.text
    runs = sorted((REPO / "monailabel_app/train").glob("iris_incontext_segmentation_*"))
    assert runs and any(runs[-1].glob("checkpoints/*.pt")), runs
