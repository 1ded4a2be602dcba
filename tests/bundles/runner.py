"""Running a bundle as a user does: ``python -m monai.bundle run`` in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time, to show a run left them untouched."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_kept(before: dict[str, tuple[bytes, int]], folder: Path) -> None:
    """The files of ``before`` are still in ``folder``, byte-identical and with their modification times; the earlier
    run's ``run_report.json`` may only have moved aside (``run_report_<time>.json``), with the same bytes."""
    after = snapshot(folder)
    changed = [name for name, data in before.items() if after.get(name) != data and name != "run_report.json"]
    assert not changed, f"replaced or removed: {changed}"
    if "run_report.json" in before:
        kept = [data[0] for name, data in after.items() if name.startswith("run_report_")]
        assert before["run_report.json"][0] in kept, "the earlier run report was lost"


def deterministic(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Environment and overrides that make a bundle run give the same figures every time: one thread (a caller's
    ``OMP_NUM_THREADS`` would change the order of float sums) and torch's deterministic algorithms, turned on
    through the ``set_determinism`` item of the bundle's ``initialize`` (which also seeds every generator)."""
    for var, value in (("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"), ("CUBLAS_WORKSPACE_CONFIG", ":4096:8")):
        monkeypatch.setenv(var, value)
    initialize = json.loads((bundle / "configs" / "train.json").read_text())["initialize"]
    index, expression = next((i, e) for i, e in enumerate(initialize) if "set_determinism(" in str(e))
    call, _, rest = expression.rpartition(")")
    return [f"--initialize#{index}", f"{call}, use_deterministic_algorithms=True){rest}"]
