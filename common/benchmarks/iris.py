"""Latency and peak memory of IRIS (``iris_small`` or ``iris_full``): one forward pass or one training step."""

from __future__ import annotations

import torch

from common.benchmarks.timing import peak_memory_mb, time_call
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
    cached_references: bool = False,
    channels_last: bool = False,
    compare_fp32: bool = True,
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
        cached_references: time what each query costs once the references are encoded, as the bundle's inference
            runs (``InContextPrompt`` encodes the references once per run, in one batched encoder call): the
            reference encoding is timed once on its own (``reference_encoding_s``) and each timed step is
            ``segment(query, task_embeddings)``. Forward passes only. Default False (one ``forward`` with the
            references, what a single query costs from scratch).
        channels_last: ``torch.channels_last_3d`` weights and inputs. Default False.
        compare_fp32: with ``amp``, also time fp32 in the same process for ``amp_speedup``. ``false`` leaves it out,
            so on CPU (where the peak resident set only grows) ``peak_memory_mb`` is that of bf16 alone. Default True.

    Returns:
        the setting, ``latency_s`` (median seconds of one step of ``batch_size`` queries) and ``peak_memory_mb``
        (``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's peak resident set, Python included),
        and on CPU ``process_start_mb``, the resident set before the network is built (Python, PyTorch and what the
        imports brought in), the part of the peak that is not IRIS's.
    """
    if size not in IRIS_SIZES:
        raise ValueError(f"size should be one of {sorted(IRIS_SIZES)}, got {size}.")
    train, amp = as_bool(train, "train"), as_bool(amp, "amp")
    cached_references, channels_last = as_bool(cached_references, "cached_references"), as_bool(
        channels_last, "channels_last")
    compare_fp32 = amp and as_bool(compare_fp32, "compare_fp32")
    if cached_references and train:
        raise ValueError("cached_references times forward passes only; leave train off.")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    start_mb = peak_memory_mb("cpu")
    net = IRIS_SIZES[size]().to(dev).train(train)
    s = (image_size,) * 3
    image = torch.rand(batch_size, 1, *s, device=dev)
    ref_image = torch.rand(batch_size, num_references, 1, *s, device=dev)
    ref_mask = (torch.rand(batch_size, num_references, num_classes, *s, device=dev) > 0.5).float()
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
        image = image.contiguous(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4) if train else None
    cache: dict[bool, torch.Tensor] = {}

    def encode_references(amp: bool = amp) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp), torch.inference_mode():
            cache[amp] = net.encode_task(ref_image, ref_mask)

    def step(amp: bool = amp) -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            if cached_references:
                with torch.inference_mode():
                    net.segment(image, cache[amp])
            elif train:
                out = net(image, ref_image, ref_mask)
                out.float().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    net(image, ref_image, ref_mask)

    encoding = {}
    if cached_references:
        for mode in {amp} | ({False} if compare_fp32 else set()):
            encoding[mode] = time_call(lambda mode=mode: encode_references(mode), repeats=1, warmup=1, device=dev)
    fp32 = time_call(lambda: step(False), repeats=repeats, warmup=1, device=dev) if compare_fp32 else None
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
        "mode": "train step" if train else ("segment, references encoded once" if cached_references else "forward"),
        "amp_bf16": amp,
        "channels_last": channels_last,
        "latency_s": round(timing["median_ms"] / 1000.0, 4),
        "peak_memory_mb": timing["peak_mb"],
    }
    if dev.type == "cpu":
        result["process_start_mb"] = round(start_mb, 1)
    if cached_references:
        result["reference_encoding_s"] = round(encoding[amp]["median_ms"] / 1000.0, 4)
    if fp32 is not None:
        result["fp32_latency_s"] = round(fp32["median_ms"] / 1000.0, 4)
        result["amp_speedup"] = round(fp32["median_ms"] / timing["median_ms"], 2)
    return result
