"""Tokens per second and peak memory of the CT-ViT image encoder (``encode`` with a region mask) per size and device."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.benchmarks.timing import time_call
from common.bundle.args import as_bool
from common.networks import ct_vit_base, ct_vit_small, ct_vit_tiny

__all__ = ["CT_VIT_SIZES", "benchmark_ct"]

CT_VIT_SIZES = {"tiny": ct_vit_tiny, "small": ct_vit_small, "base": ct_vit_base}


def _one(size: str, device: torch.device, image_size: Sequence[int] | None, patch_size: Sequence[int] | None,
         batch_size: int, repeats: int, train: bool, amp: bool, attention_impl: str) -> dict:
    kwargs = {"attention_impl": attention_impl}
    if image_size is not None:
        kwargs["img_size"] = tuple(int(s) for s in image_size)
    if patch_size is not None:
        kwargs["patch_size"] = tuple(int(s) for s in patch_size)
    net = CT_VIT_SIZES[size](**kwargs).to(device).train(train)
    volume = torch.rand(batch_size, 1, *net.img_size, device=device)
    mask = torch.randint(0, net.num_regions + 1, (batch_size, 1, *net.img_size), device=device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4) if train else None

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if train:
                out = net.encode(volume, mask)
                (out["global"].float().mean() + out["region"].float().mean()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                with torch.inference_mode():
                    net.encode(volume, mask)

    # the warm-up call also compiles FlexAttention on CUDA, which must stay out of the timed runs
    timing = time_call(step, repeats=repeats, warmup=1, device=device)
    latency = timing["median_ms"] / 1000.0
    tokens = batch_size * int(torch.tensor(net.grid).prod())
    return {
        "network": f"ct_vit_{size}",
        "device": str(device),
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
        "image_size": list(net.img_size),
        "patch_size": list(net.patch_size),
        "tokens_per_volume": tokens // batch_size,
        "batch_size": batch_size,
        "attention": net.resolve_attention_impl(device),
        "mode": "train" if train else "inference",
        "amp": amp,
        "latency_s": round(latency, 4),
        "tokens_per_s": round(tokens / latency, 1),
        "peak_memory_mb": timing["peak_mb"],
    }


def benchmark_ct(
    size: str | Sequence[str] = "tiny",
    device: str | Sequence[str] = "cpu",
    image_size: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = None,
    batch_size: int = 1,
    repeats: int = 3,
    train: bool = False,
    amp: bool = False,
    attention_impl: str = "auto",
    threads: int | None = None,
) -> dict:
    """Tokens per second and peak memory of CT-ViT (``encode`` with a region mask) for each size and device.

    Latency is the median of ``repeats`` timed runs after one warm-up run; tokens/s is ``batch_size`` times the
    patch tokens of a volume over it. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the process's
    peak resident set size on CPU (which includes Python and earlier rows).

    Args:
        size: ``tiny``, ``small``, ``base`` or several (comma-separated or a list). Default ``tiny``.
        device: ``cpu``, ``cuda`` or several. Default ``cpu``.
        image_size: ``(D, H, W)`` overriding each size's grid (multiples of the patch). Default the size's own.
        patch_size: ``(pd, ph, pw)`` overriding each size's patch. Default the size's own.
        batch_size: volumes per step. Default 1.
        repeats: timed runs. Default 3.
        train: time a training step (forward, backward, AdamW) instead of inference. Default False.
        amp: bf16 autocast. Default False.
        attention_impl: ``auto``, ``flex``, ``sdpa`` or ``reference``. Default ``auto``.
        threads: CPU threads (``torch.set_num_threads``). Default unchanged.

    Returns:
        ``{"results": [one dict per size and device]}``.
    """
    train, amp = as_bool(train, "train"), as_bool(amp, "amp")
    sizes = size.split(",") if isinstance(size, str) else list(size)
    devices = device.split(",") if isinstance(device, str) else list(device)
    unknown = [s for s in sizes if s not in CT_VIT_SIZES]
    if unknown:
        raise ValueError(f"size should be among {sorted(CT_VIT_SIZES)}, got {unknown}.")
    if threads:
        torch.set_num_threads(int(threads))
    results = [_one(s, torch.device(d), image_size, patch_size, batch_size, repeats, train, amp, attention_impl)
               for d in devices for s in sizes]
    return {"results": results}
