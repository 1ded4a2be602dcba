"""Images per second of the YOLO detector: the bundle's MONAI inference path against ultralytics' own ``predict``.

Both run the same weights on the same image files, one image at a time, reading included, alternating image by
image; throughput is one over the median time per image: ultralytics' predictor
(its loader, letterbox, network, NMS) and the bundle's path (``LoadMedicalImaged``, percentile scaling,
``YOLODetectionInferer``: letterbox, network, NMS, mapping to original pixels). Writing outputs is left out of both.
The figure the bundle is judged by is the ratio of the two, ``bundle_over_ultralytics``.
"""

from __future__ import annotations

import functools
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from common.benchmarks.timing import time_call
from common.yolo.env import import_ultralytics, keep_process_state

__all__ = ["benchmark_yolo"]


def _images(folder: str | None, num_images: int, source_size: int, scratch: Path) -> list[str]:
    if folder:
        files = sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise ValueError(f"{folder}: no PNG or JPEG image (ultralytics' predictor reads no DICOM).")
        return files[:num_images]
    from common.data.synthetic_cxr import generate_synthetic_cxr

    datalist = generate_synthetic_cxr(scratch / "images", num_images=num_images, size=source_size, seed=0)
    return sorted(str(p) for p in (datalist.parent / "images").glob("*.png"))


def _interleaved(
    steps: dict[str, Callable[[str], None]], files: list[str], warmup: int, device: torch.device
) -> tuple[dict[str, float], float]:
    """Images per second of each step (1 / median seconds per image) and the peak memory of the timed calls.

    ``time_call`` times one image of one step at a time, so that the steps alternate image by image and changes of
    the machine's load during the run hit them alike; it resets CUDA's peak counter before every call, hence the
    maximum over the calls.
    """
    for step in steps.values():
        for path in files[:warmup]:
            step(path)
    calls: dict[str, list[dict[str, float]]] = {name: [] for name in steps}
    for path in files:
        for name, step in steps.items():
            calls[name].append(time_call(functools.partial(step, path), repeats=1, warmup=0, device=device))
    rates = {name: 1000.0 / statistics.median(c["median_ms"] for c in timed) for name, timed in calls.items()}
    return rates, max(c["peak_mb"] for timed in calls.values() for c in timed)


def benchmark_yolo(
    weights: str | None = None,
    model: str = "yolov5n.yaml",
    num_classes: int = 11,
    images: str | None = None,
    num_images: int = 16,
    source_size: int = 512,
    image_size: int = 256,
    conf_threshold: float = 0.25,
    device: str = "cpu",
    threads: int | None = None,
    warmup: int = 2,
) -> dict:
    """Images per second of ultralytics ``predict`` and of the bundle's inference path, on the same images.

    Args:
        weights: an ultralytics checkpoint (``model_ultralytics.pt`` of a training run) matching ``model`` and
            ``num_classes``; None for random weights (speed does not depend on them).
        model: the ultralytics model YAML (``yolov5n.yaml``, ``yolov5s.yaml``, ``yolov8n.yaml``, or a file path).
            Default ``"yolov5n.yaml"``.
        num_classes: the network's classes. Default 11.
        images: a folder of PNG/JPEG images; None for ``num_images`` synthetic radiographs of ``source_size``.
        num_images: images timed. Default 16.
        source_size: side of the synthetic images. Default 512.
        image_size: letterbox side of both paths. Default 256.
        conf_threshold: score threshold of both paths. Default 0.25.
        device: ``"cpu"`` or ``"cuda:0"``. Default ``"cpu"``.
        threads: torch threads for both paths (ultralytics' predictor lowers them on CPU; they are set back after
            its set-up). Default: the current number.
        warmup: untimed images first. Default 2.

    Returns:
        the setting, ``ultralytics_predict_images_per_s``, ``bundle_inference_images_per_s``, their ratio
        ``bundle_over_ultralytics`` (above 1: the bundle's path is faster) and ``peak_memory_mb`` of the timed
        calls of both paths (CUDA's peak allocation, or on CPU the process's peak resident set).
    """
    from monai.transforms import Compose, EnsureChannelFirstd, EnsureTyped, ScaleIntensityRangePercentilesd

    from common.engines.detection import YOLODetectionInferer
    from common.networks.yolo import YOLODetector, load_yolo_state_dict
    from common.transforms.io import LoadMedicalImaged

    import_ultralytics()
    from ultralytics import YOLO

    threads = threads or torch.get_num_threads()
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp, keep_process_state():
        torch.set_num_threads(threads)
        scratch = Path(tmp)
        files = _images(images, num_images, source_size, scratch)
        net = YOLODetector(model, num_classes)
        if weights is None:
            weights = str(scratch / "random.pt")
            torch.save({"model": net.model}, weights)
        net.load_state_dict(load_yolo_state_dict(weights))
        net = net.to(dev).eval()

        yolo = YOLO(weights, task="detect")
        yolo.predict(files[0], imgsz=image_size, conf=conf_threshold, device=device, verbose=False, save=False)
        torch.set_num_threads(threads)  # the predictor's set-up ran select_device

        def raw(path: str) -> None:
            yolo.predict(path, imgsz=image_size, conf=conf_threshold, device=device, verbose=False, save=False)

        read = Compose([
            LoadMedicalImaged(keys="image"), EnsureChannelFirstd(keys="image"),
            ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
            EnsureTyped(keys="image"),
        ])
        inferer = YOLODetectionInferer(image_size=image_size, conf_threshold=conf_threshold, fuse_network=True,
                                       channels_last=True)

        def bundle(path: str) -> None:
            with torch.inference_mode():
                inferer(read({"image": path})["image"][None].to(dev), net)

        rates, peak = _interleaved({"raw": raw, "bundle": bundle}, files, warmup, dev)
    return {
        "model": model,
        "weights": "random" if weights.startswith(str(scratch)) else os.fspath(weights),
        "device": str(dev),
        "threads": threads,
        "images": len(files),
        "image_size": image_size,
        "ultralytics_predict_images_per_s": round(rates["raw"], 2),
        "bundle_inference_images_per_s": round(rates["bundle"], 2),
        "bundle_over_ultralytics": round(rates["bundle"] / rates["raw"], 3),
        "peak_memory_mb": round(peak, 1),
    }
