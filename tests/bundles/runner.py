"""Running a bundle as a user does: ``python -m monai.bundle run`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BUNDLES = Path(__file__).resolve().parents[2] / "bundles"


def bundle_run(bundle: Path, config: str | list[str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``config`` (one file or several merged, relative to ``bundle/configs``) with ``args`` overrides."""
    configs = [config] if isinstance(config, str) else config
    files = [str(bundle / "configs" / c) for c in configs]
    cmd = [
        sys.executable, "-m", "monai.bundle", "run",
        "--config_file", str(files) if len(files) > 1 else files[0],
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--logging_file", str(bundle / "configs" / "logging.conf"),
        "--bundle_root", str(bundle),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"bundle run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc
