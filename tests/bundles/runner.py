"""Running a bundle as a user does: ``python -m monai.bundle run`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def _run_args(bundle: Path, config: str | list[str], args: tuple[str, ...]) -> list[str]:
    configs = [config] if isinstance(config, str) else config
    files = [str(bundle / "configs" / c) for c in configs]
    return [
        "-m", "monai.bundle", "run",
        "--config_file", str(files) if len(files) > 1 else files[0],
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--logging_file", str(bundle / "configs" / "logging.conf"),
        "--bundle_root", str(bundle),
        *args,
    ]


def bundle_run(bundle: Path, config: str | list[str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``config`` (one file or several merged, relative to ``bundle/configs``) with ``args`` overrides."""
    proc = subprocess.run([sys.executable, *_run_args(bundle, config, args)], capture_output=True, text=True,
                          timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def torchrun_bundle(bundle: Path, *args: str) -> subprocess.CompletedProcess:
    """``train.json`` + ``multi_gpu_train.json`` under ``torchrun --nproc_per_node=2`` (on CPU: gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           *_run_args(bundle, ["train.json", "multi_gpu_train.json"], args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-5000:]}"
    return proc
