"""The one-command GPU check (``make gpu-check``): every figure the bundle docs want from a GPU, in one table.

Rows, each from the collection's own code path:

- ``inference <bundle>``: the bundle's ``inference.json`` on its embedded sample (AMP where the config enables it on
  CUDA), wall seconds of the whole run in a subprocess, as a user runs it; ``+ TensorRT`` rows add the bundle's
  ``inference_trt.json`` (the second run, once the engine is built);
- ``train step <bundle network>``: the benchmarks' training steps with bf16 autocast (IRIS, CSR, CT-ViT);
- ``CT-ViT base train step``: 64 x 512 x 512 at batch 2 with FlexAttention, latency and peak memory;
- ``IRIS full 128^3``: one forward pass with 1 and with 3 references, latency and peak memory;
- ``YOLO``: the bundle's inference path against ultralytics' ``predict`` at 640, images/s and their ratio.

``quick=True`` shrinks every size so the same code runs on a CPU in about a minute (what the test suite does); the
figures of a quick run mean nothing. Results are printed as a Markdown table and written as JSON to ``out``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common.benchmarks.csr import benchmark_csr
from common.benchmarks.ct import benchmark_ct
from common.benchmarks.iris import benchmark_iris
from common.benchmarks.yolo import benchmark_yolo
from common.cli import BUNDLES_DIR

__all__ = ["gpu_check"]


def _inference(bundle: Path, device: str, scratch: Path, trt: bool = False) -> dict:
    """Wall seconds of ``inference.json`` (with ``trt``: and ``inference_trt.json``, run twice, the second run
    timed, once the TensorRT engine is built and cached beside the weights) on the bundle's sample, in a fresh
    process."""
    configs = [str(bundle / "configs" / c) for c in ("inference.json", "inference_trt.json")[: 2 if trt else 1]]
    name = f"inference {bundle.name}" + (" + TensorRT" if trt else "")
    for run in range(2 if trt else 1):
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs),
                   "--bundle_root", str(bundle), "--output_dir", str(scratch / f"{bundle.name}_{trt}_{run}"),
                   "--device", f"$torch.device('{device}')"]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            return {"row": name, "error": proc.stderr.strip().splitlines()[-1:]}
    return {"row": name, "wall_s": round(seconds, 2)}


def _row(name: str, fn: Callable[[], dict], keep: tuple[str, ...]) -> dict:
    try:
        result = fn()
    except Exception as e:  # one failing row must not hide the others
        return {"row": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    if "results" in result:
        result = result["results"][0]
    return {"row": name, **{k: result[k] for k in keep if k in result}}


def gpu_check(device: str = "cuda", quick: bool = False, out: str | None = None, inference: bool = True) -> list[dict]:
    """Run every check on ``device`` and return (and print, and with ``out`` write as JSON) one dict per row.

    Args:
        device: ``"cuda"`` (refused when no CUDA device is visible) or ``"cpu"`` with ``quick``.
        quick: tiny sizes, to check the code path on a CPU; the figures are not to be reported.
        out: JSON file for the rows. Default none.
        inference: include the bundles' inference runs. Default True.
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu-check needs a CUDA device and none is visible (torch.cuda.is_available() is False).")
    if not device.startswith("cuda") and not quick:
        raise SystemExit("gpu-check runs full sizes on CUDA only; pass --quick true to try the code path on a CPU.")
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    iris_grid, ct_grid, yolo_size = ((16, (16, 64, 64), 64) if quick else (128, (64, 512, 512), 640))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if inference:
            for bundle in sorted(p for p in BUNDLES_DIR.iterdir() if (p / "configs" / "inference.json").is_file()):
                rows.append(_inference(bundle, device, Path(tmp)))
                if (bundle / "configs" / "inference_trt.json").is_file():
                    rows.append(_inference(bundle, device, Path(tmp), trt=True))
        steps = {"repeats": 1 if quick else 20, "device": device, "train": True, "amp": True}
        rows.append(_row("train step iris_small", lambda: benchmark_iris(
            size="small", image_size=16 if quick else 64, num_classes=3, num_references=3, **steps),
            ("latency_s", "peak_memory_mb")))
        rows.append(_row("train step csr resnet18_os16", lambda: benchmark_csr(
            backbone="resnet18_os16", image_size=64 if quick else 256, batch_size=4 if quick else 32, **steps),
            ("latency_s", "images_per_s", "peak_memory_mb")))
        rows.append(_row(f"train step ct_vit_{'tiny' if quick else 'small'}", lambda: benchmark_ct(
            size="tiny" if quick else "small", batch_size=2 if quick else 8, **steps),
            ("latency_s", "tokens_per_s", "peak_memory_mb")))
        rows.append(_row(f"CT-ViT {'tiny' if quick else 'base'} train step {'x'.join(map(str, ct_grid))} batch 2 flex",
                         lambda: benchmark_ct(size="tiny" if quick else "base", image_size=ct_grid, batch_size=2,
                                              attention_impl="flex" if device.startswith("cuda") else "auto",
                                              **{**steps, "repeats": 1 if quick else 3}),
                         ("latency_s", "tokens_per_s", "peak_memory_mb")))
        for refs in (1, 3):
            rows.append(_row(f"IRIS {'small' if quick else 'full'} {iris_grid}^3 forward, {refs} reference(s)",
                             lambda refs=refs: benchmark_iris(size="small" if quick else "full", image_size=iris_grid,
                                                              num_classes=1, num_references=refs, device=device,
                                                              repeats=1 if quick else 5, amp=True),
                             ("latency_s", "peak_memory_mb", "amp_speedup")))
        rows.append(_row(f"YOLO yolov5s at {yolo_size}", lambda: benchmark_yolo(
            model="yolov5s.yaml", image_size=yolo_size, num_images=4 if quick else 64,
            source_size=128 if quick else 1024, device="cuda:0" if device.startswith("cuda") else "cpu"),
            ("ultralytics_predict_images_per_s", "bundle_inference_images_per_s", "bundle_over_ultralytics")))
    for row in rows:
        row["device"] = name
    print(_table(rows))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


def _table(rows: list[dict]) -> str:
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("row", "device")]
    lines = [f"device: {rows[0]['device'] if rows else '-'}", "| check | " + " | ".join(keys) + " |",
             "|---|" + "---|" * len(keys)]
    for r in rows:
        lines.append(f"| {r['row']} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)
