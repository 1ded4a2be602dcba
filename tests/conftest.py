"""Test-wide set-up: every cache and temporary file goes to one throwaway folder, never the home directory."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

_SCRATCH = Path(tempfile.mkdtemp(prefix="cib-tests-"))
for _var, _sub in [
    ("MPLCONFIGDIR", "matplotlib"),
    ("YOLO_CONFIG_DIR", "ultralytics"),
    ("HF_HOME", "huggingface"),
    ("TORCH_HOME", "torch"),
    ("MLFLOW_TRACKING_DIR", "mlflow"),
]:
    os.environ.setdefault(_var, str(_SCRATCH / _sub))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# one thread per process: the suite runs two workers on two cores, and their subprocesses inherit this
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SCRATCH, ignore_errors=True)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def python() -> str:
    """The interpreter running the tests, for subprocess runs of ``python -m monai.bundle``."""
    return sys.executable
