"""Speed and memory figures of the collection's networks (printed by ``python -m common.cli benchmark``)."""

from __future__ import annotations

import resource
import statistics
import time

import torch

from common.bundle.args import as_bool
from common.networks import iris_full, iris_small

__all__ = ["benchmark_iris", "benchmark_csr"]

IRIS_SIZES = {"small": iris_small, "full": iris_full}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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

    Latency is the median of ``repeats`` timed runs after one warm-up run. Peak memory is
    ``torch.cuda.max_memory_allocated`` on CUDA and the process's peak resident set size on CPU (which includes
    the Python process itself).
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

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            if train:
                out = net(image, ref_image, ref_mask)
                out.float().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    net(image, ref_image, ref_mask)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mb()
    return {
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
        "latency_s": round(statistics.median(times), 4),
        "peak_memory_mb": round(peak, 1),
    }


def benchmark_csr(
    backbone: str = "tiny",
    image_size: int = 256,
    batch_size: int = 16,
    device: str = "cpu",
    repeats: int = 5,
    train: bool = False,
    amp: bool = False,
    threads: int | None = None,
    num_concepts: int = 11,
    num_classes: int = 6,
) -> dict:
    """Images/s and peak memory of CSR's ``explain`` (or a stage-1 training step) at one batch size and device."""
    from common.networks import CSRNet

    train, amp = as_bool(train, "train"), as_bool(amp, "amp")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    stage = 1 if train else 0
    net = CSRNet(backbone=backbone, num_concepts=num_concepts, num_classes=num_classes, training_stage=stage)
    net = net.to(dev).train(train)
    image = torch.rand(batch_size, 1, image_size, image_size, device=dev)
    optimizer = torch.optim.AdamW(net.trainable_parameters(), lr=1e-4) if train else None

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            if train:
                net.explain(image)["concept_logits"].float().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    net.explain(image)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mb()
    latency = statistics.median(times)
    return {
        "network": f"csr_{backbone}",
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
        "image_size": image_size,
        "batch_size": batch_size,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "threads": torch.get_num_threads(),
        "mode": "train step (stage 1)" if train else "explain",
        "amp_bf16": amp,
        "images_per_s": round(batch_size / latency, 2),
        "latency_s": round(latency, 4),
        "peak_memory_mb": round(peak, 1),
    }
