"""Images per second and peak memory of CSR's ``explain`` (or a stage-1 training step) at one batch size."""

from __future__ import annotations

import torch

from common.benchmarks.timing import time_call
from common.bundle.args import as_bool
from common.networks import CSRNet

__all__ = ["benchmark_csr"]


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
    """Images/s, latency and peak memory of CSR's ``explain`` (or a stage-1 training step) at one setting.

    Args:
        backbone: a name of ``common.networks.BACKBONES`` (``tiny``, ``resnet18_os16``, ``resnet50``, ...).
            Default ``tiny``.
        image_size: side of the square single-channel images. Default 256.
        batch_size: images per step. Default 16.
        device: ``cpu`` or ``cuda``. Default ``cpu``.
        repeats: timed runs after one warm-up run. Default 5.
        train: time a stage-1 training step (concept logits, backward, AdamW) instead of ``explain``. Default False.
        amp: bf16 autocast. Default False.
        threads: CPU threads (``torch.set_num_threads``). Default unchanged.
        num_concepts, num_classes: the network's heads. Defaults 11, 6.

    Returns:
        the setting, ``images_per_s`` (``batch_size`` over the median step time), ``latency_s`` (that median) and
        ``peak_memory_mb`` (CUDA's peak allocation, or on CPU the process's peak resident set).
    """
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

    timing = time_call(step, repeats=repeats, warmup=1, device=dev)
    latency = timing["median_ms"] / 1000.0
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
        "peak_memory_mb": timing["peak_mb"],
    }
