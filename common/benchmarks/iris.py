"""Latency and peak memory of IRIS (``iris_small`` or ``iris_full``): one forward pass or one training step."""

from __future__ import annotations

import torch

from common.benchmarks.timing import time_call
from common.bundle.args import as_bool
from common.networks import iris_full, iris_small

__all__ = ["IRIS_SIZES", "benchmark_iris"]

IRIS_SIZES = {"small": iris_small, "full": iris_full}


def benchmark_iris(
    size: str = "small",
    image_size: int = 64,
    num_classes: int = 1,
    num_references: int = 1,
    batch_size: int = 1,
    device: str = "cpu",
    repeats: int = 5,
    train: bool = False,
    amp: bool = False,
    threads: int | None = None,
) -> dict:
    """Parameters, forward (or training step) latency and peak memory of IRIS at one setting.

    ``--amp true`` times the same step in fp32 first and reports the ratio it is judged by, ``amp_speedup`` (fp32
    latency over bf16 latency, medians of one process); the peak memory
    then covers both runs, so compare memory with two calls without and with ``--amp`` (on CPU two processes, since
    the peak resident set only grows).

    Args:
        size: ``small`` or ``full``. Default ``small``.
        image_size: side of the cubic query and reference volumes. Default 64.
        num_classes, num_references: classes segmented and reference volumes per query. Defaults 1, 1.
        batch_size: queries per step. Default 1.
        device: ``cpu`` or ``cuda``. Default ``cpu``.
        repeats: timed runs after one warm-up run. Default 5.
        train: time a training step (forward, backward, AdamW) instead of a forward pass. Default False.
        amp: bf16 autocast. Default False.
        threads: CPU threads (``torch.set_num_threads``). Default unchanged.

    Returns:
        the setting, ``latency_s`` (median seconds of one step of ``batch_size`` queries) and ``peak_memory_mb``
        (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak resident set, Python included).
    """
    if size not in IRIS_SIZES:
        raise ValueError(f"size should be one of {sorted(IRIS_SIZES)}, got {size}.")
    train, amp = as_bool(train, "train"), as_bool(amp, "amp")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    net = IRIS_SIZES[size]().to(dev).train(train)
    s = (image_size,) * 3
    image = torch.rand(batch_size, 1, *s, device=dev)
    ref_image = torch.rand(batch_size, num_references, 1, *s, device=dev)
    ref_mask = (torch.rand(batch_size, num_references, num_classes, *s, device=dev) > 0.5).float()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4) if train else None

    def step(amp: bool = amp) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            if train:
                out = net(image, ref_image, ref_mask)
                out.float().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    net(image, ref_image, ref_mask)

    fp32 = time_call(lambda: step(False), repeats=repeats, warmup=1, device=dev) if amp else None
    timing = time_call(step, repeats=repeats, warmup=1, device=dev)
    result = {
        "network": f"iris_{size}",
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
        "image_size": image_size,
        "classes": num_classes,
        "references": num_references,
        "batch_size": batch_size,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "threads": torch.get_num_threads(),
        "mode": "train step" if train else "forward",
        "amp_bf16": amp,
        "latency_s": round(timing["median_ms"] / 1000.0, 4),
        "peak_memory_mb": timing["peak_mb"],
    }
    if fp32 is not None:
        result["fp32_latency_s"] = round(fp32["median_ms"] / 1000.0, 4)
        result["amp_speedup"] = round(fp32["median_ms"] / timing["median_ms"], 2)
    return result
