"""Command line of the collection: ``python -m common.cli <command> --help``; commands print what they made."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import fire

from common.bundle.args import as_bool

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"


# kind of ``convert`` -> (what it reads, the options it takes besides --out and --overwrite, those it needs)
CONVERT_KINDS = {
    "vindr": ("VinDr-CXR / VinBigData box annotations CSV",
              ("csv", "image_dir", "image_ext", "min_score", "iou_threshold", "val_fraction", "seed", "yolo_labels"),
              ()),
    "vindr-labels": ("VinDr-CXR image_labels_*.csv",
                     ("csv", "image_dir", "image_ext", "val_fraction", "seed", "check_images"), ("csv",)),
    "ct-rate": ("CT-RATE reports CSV and the folder of its volumes",
                ("csv", "volume_dir", "mask_dir", "qa", "val_fraction", "seed"), ("csv", "volume_dir")),
    "omniabnorm": ("OmniAbnorm chain-of-thought JSON",
                   ("cot_json", "image_root", "num_regions", "region_table", "val_fraction", "seed"), ("cot_json",)),
    "openi": ("OpenI / Indiana University report archive", ("tgz", "table", "val_fraction", "test_fraction", "seed"),
              ()),
}


def _vinbigdata_csv() -> str:
    """torchxrayvision's copy of the VinBigData ``train.csv``."""
    from common.data.openi import torchxrayvision_data

    return str(torchxrayvision_data("vinbigdata-train.csv.gz", "pass --csv"))


def _refuse_existing(path: Path, command: str, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise SystemExit(f"{command} failed: {path} already exists; pass --overwrite true to replace it.")


def _need_dir(path, flag: str, command: str) -> str | None:
    # the converters would report every image as missing instead of naming the wrong folder once
    if path is not None and not Path(str(path)).is_dir():
        raise SystemExit(f"{command} failed: {flag} {path}: folder not found.")
    return None if path is None else str(path)


def _convert_vindr(out: str, command: str, csv=None, image_dir=None, image_ext=".dicom", min_score=0.0,
                   iou_threshold=0.4, val_fraction=0.1, seed=0, yolo_labels=False, overwrite=False) -> dict:
    """``vindr_detection`` and ``convert vindr``: the summary it prints (``skipped`` counted)."""
    from common.data import convert_vindr_detection

    _refuse_existing(Path(out) / "datalist.json", command, overwrite)
    image_dir = _need_dir(image_dir, "--image_dir", command)
    try:
        csv = _vinbigdata_csv() if csv is None else str(csv)
        report = convert_vindr_detection(csv, str(out), image_dir=image_dir, image_ext=str(image_ext),
                                         iou_threshold=iou_threshold, val_fraction=val_fraction, split_seed=seed,
                                         yolo_labels=yolo_labels, min_score=min_score)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{command} failed: {e}") from e
    summary = {k: report[k] for k in ("images", "training", "validation", "background", "rows", "boxes",
                                      "fused_boxes", "per_class")}
    summary["skipped"] = len(report["skipped"])
    return {"datalist": str(Path(out) / "datalist.json"), "min_score": min_score, **summary}


def _convert_openi(out: str, command: str, tgz=None, table=None, val_fraction=0.15, test_fraction=0.15, seed=0,
                   overwrite=False) -> dict:
    """``openi_reports`` and ``convert openi``: the converter's summary."""
    from common.data.openi import convert_openi_reports

    _refuse_existing(Path(out) / "datalist.json", command, overwrite)
    try:
        return convert_openi_reports(
            str(out), tgz=None if tgz is None else str(tgz), table_path=None if table is None else str(table),
            val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, overwrite=overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"{command} failed: {e}") from e


class CLI:
    """Data generators, dataset converters, the demo, benchmarks, ONNX export and packaging of the Clinical
    Imaging Bundles."""

    def synth3d(self, out: str, num_cases: int = 24, seed: int = 0, shape: tuple = (64, 64, 48), overwrite=False):
        """Write synthetic CT-like volumes with structure label maps and ``datalist.json`` to ``out``."""
        overwrite = as_bool(overwrite, "--overwrite")
        from common.data import generate_synthetic_3d

        path = generate_synthetic_3d(out, num_cases=num_cases, shape=tuple(shape), seed=seed, overwrite=overwrite)
        print(f"datalist: {path}")

    def mni152(self, out: str, num_queries: int = 4, seed: int = 0, overwrite: bool = False):
        """Write the MNI152 gray/white matter task (a reference and deformed queries) from nilearn's template."""
        overwrite = as_bool(overwrite, "--overwrite")
        from common.data import build_mni152_task

        paths = build_mni152_task(out, num_queries=num_queries, seed=seed, overwrite=overwrite)
        for k, v in paths.items():
            print(f"{k}: {v}")

    def episodes_preview(
        self, out: str, num: int = 4, seed: int = 0, image_size: int = 48, references: int = 3, classes: int = 3,
        low_contrast_fraction: float = 0.0, overwrite: bool = False,
    ):
        """Write ``<out>/episodes.png``: the first ``num`` domain-randomised IRIS training episodes of ``seed``
        (``common.data.RandomEpisodeDataset``), a row each with its references, its query and the class outlines;
        ``--low_contrast_fraction 1`` shows the CT-like, low-contrast ones."""
        overwrite = as_bool(overwrite, "--overwrite")
        from common.data import RandomEpisodeDataset
        from common.visualize import save_episode_sheet

        path = Path(out) / "episodes.png"
        if path.exists() and not overwrite:
            raise SystemExit(f"episodes_preview failed: {path} already exists; pass --overwrite true to replace it.")
        try:
            episodes = RandomEpisodeDataset(
                image_size=(image_size,) * 3, classes_per_episode=classes, references_per_episode=references,
                episodes_per_epoch=num, seed=seed, low_contrast_fraction=float(low_contrast_fraction),
            )
            titles = [f"episode {i} (seed {seed})" for i in range(num)]
            path = save_episode_sheet([episodes[i] for i in range(num)], path, titles=titles, overwrite=overwrite)
        except ValueError as e:
            raise SystemExit(f"episodes_preview failed: {e}") from e
        print(f"preview: {path}")

    def iris_sample(self, out: str, num_cases: int = 6, seed: int = 20261123, overwrite: bool = False):
        """Build an IRIS bundle sample: synthetic volumes, a datalist, and ``references.json`` of its training
        split (the embedded sample is made with the defaults)."""
        overwrite = as_bool(overwrite, "--overwrite")
        from common.data import HELDOUT_CLASSES, generate_synthetic_3d, load_datalist, write_references

        datalist = generate_synthetic_3d(
            out, num_cases=num_cases, seed=seed, split=(0.5, 0.17, 0.33), overwrite=overwrite
        )
        train = load_datalist(datalist, "training")
        names = {n: int(v) for v, n in train[0]["class_names"].items() if n not in HELDOUT_CLASSES}
        refs = write_references(Path(out) / "references.json", train, names)
        print(f"datalist: {datalist}\nreferences: {refs}")

    def synth_cxr(
        self, out: str, num_images: int = 200, size: int = 256, seed: int = 0, concept_prob: float = 0.3,
        dicom_fraction: float = 0.0, overwrite: bool = False,
    ):
        """Write synthetic chest radiographs with concept masks, disease labels, lesion boxes and ``datalist.json``."""
        overwrite = as_bool(overwrite, "--overwrite")
        from common.data import generate_synthetic_cxr

        path = generate_synthetic_cxr(
            out, num_images=num_images, size=size, seed=seed, concept_prob=concept_prob,
            write_dicom_fraction=dicom_fraction, overwrite=overwrite,
        )
        print(f"datalist: {path}")

    def synth_ct_reports(
        self, out: str, num_cases: int = 64, shape: tuple = (32, 64, 64), seed: int = 0,
        split: tuple = (0.7, 0.15, 0.15), overwrite: bool = False,
    ):
        """Write synthetic CT volumes (D, H, W voxels), region masks, reports with reasoning steps and
        ``datalist.json`` to ``out`` (the CT report encoder's training and sample data)."""
        overwrite = as_bool(overwrite, "--overwrite")
        from common.data import generate_ct_report_dataset

        path = generate_ct_report_dataset(
            out, num_cases=num_cases, shape=tuple(shape), seed=seed, split=tuple(split), overwrite=overwrite
        )
        print(f"datalist: {path}")

    def ct_report_sample(self, out: str, num_cases: int = 8, seed: int = 20261123, overwrite: bool = False):
        """Build the CT report encoder's embedded sample: synthetic cases at the bundle's 32x64x64 grid, a datalist
        (training/validation/test) and ``volumes.json`` listing every case with its mask (the default inference
        input)."""
        overwrite = as_bool(overwrite, "--overwrite")
        from common.data import generate_ct_report_dataset, write_volume_list

        datalist = generate_ct_report_dataset(
            out, num_cases=num_cases, shape=(32, 64, 64), seed=seed, split=(0.5, 0.25, 0.25), overwrite=overwrite
        )
        volumes = write_volume_list(datalist, Path(out) / "volumes.json")
        print(f"datalist: {datalist}\nvolumes: {volumes}")

    def openi_reports(
        self, out: str, tgz: str | None = None, table: str | None = None, val_fraction: float = 0.15,
        test_fraction: float = 0.15, seed: int = 0, overwrite=False,
    ):
        """Convert the Indiana University / OpenI chest X-ray reports (torchxrayvision's ``NLMCXR_reports.tgz`` unless
        ``--tgz``) to ``<out>/datalist.json`` (MeSH-derived finding labels, silver entities, training/validation/test
        split by image number) and ``<out>/report.json``; ``--table`` overrides the bundle's ``findings.json``."""
        overwrite = as_bool(overwrite, "--overwrite")
        summary = _convert_openi(out, "openi_reports", tgz=tgz, table=table, val_fraction=val_fraction,
                                 test_fraction=test_fraction, seed=seed, overwrite=overwrite)
        splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
        print(f"datalist: {summary['datalist']} ({summary['kept']} of {summary['reports']} reports: {splits}; "
              f"{len(summary['skipped'])} skipped)\nreport: {summary['report']}")

    def vindr_detection(
        self, out: str, csv: str | None = None, image_dir: str | None = None, min_score: float = 0.0,
        iou_threshold: float = 0.4, val_fraction: float = 0.1, seed: int = 0, yolo_labels=False, overwrite=False,
    ):
        """Convert VinDr-CXR / VinBigData box annotations (torchxrayvision's real ``vinbigdata-train.csv.gz`` unless
        ``--csv``) to the detector's ``<out>/datalist.json``, the three readers' boxes fused by weighted box fusion;
        ``--min_score 0.5`` keeps boxes at least two of three readers drew, ``0.9`` those all three drew. Prints how
        many boxes and images each class keeps."""
        overwrite, yolo_labels = as_bool(overwrite, "--overwrite"), as_bool(yolo_labels, "--yolo_labels")
        summary = _convert_vindr(out, "vindr_detection", csv=csv, image_dir=image_dir, min_score=min_score,
                                 iou_threshold=iou_threshold, val_fraction=val_fraction, seed=seed,
                                 yolo_labels=yolo_labels, overwrite=overwrite)
        print(json.dumps(summary, indent=2))

    def convert(
        self, kind: str, out: str, csv: str | None = None, image_dir: str | None = None, image_ext: str | None = None,
        volume_dir: str | None = None, mask_dir: str | None = None, cot_json: str | None = None,
        image_root: str | None = None, num_regions: int | None = None, region_table: str | None = None,
        tgz: str | None = None, table: str | None = None, min_score: float | None = None,
        iou_threshold: float | None = None, val_fraction: float | None = None, test_fraction: float | None = None,
        seed: int | None = None, yolo_labels=None, check_images=None, qa: str | None = None, overwrite=False,
    ):
        """Convert a public dataset to a bundle's ``<out>/datalist.json`` and print a JSON summary (counts, how many
        rows or items were skipped). Refuses an existing ``datalist.json`` unless ``--overwrite true``; an option a
        kind does not take is refused; options left out keep the converter's defaults.

        - ``vindr``: VinDr-CXR / VinBigData boxes for ``yolo_cxr_detection`` (``convert_vindr_detection``, as
          ``vindr_detection``). ``--csv`` annotations CSV (default torchxrayvision's ``vinbigdata-train.csv.gz``),
          ``--image_dir``, ``--image_ext`` (``.dicom``), ``--min_score``, ``--iou_threshold``, ``--val_fraction``,
          ``--seed``, ``--yolo_labels``.
        - ``vindr-labels``: VinDr-CXR ``image_labels_*.csv`` for ``csr_cxr_classification``
          (``convert_vindr_classification``). ``--csv`` (required), ``--image_dir``, ``--image_ext``,
          ``--val_fraction``, ``--seed``, ``--check_images``.
        - ``ct-rate``: CT-RATE reports for ``ct_report_encoder`` (``convert_ct_rate``). ``--csv`` reports CSV and
          ``--volume_dir`` (required), ``--mask_dir``, ``--qa`` (its question/answer records, CSV or JSON),
          ``--val_fraction``, ``--seed``.
        - ``omniabnorm``: OmniAbnorm chain-of-thought for ``ct_report_encoder`` (``convert_omniabnorm_cot``).
          ``--cot_json`` (required), ``--image_root`` (default the JSON's folder), ``--num_regions``,
          ``--region_table``, ``--val_fraction``, ``--seed``.
        - ``openi``: OpenI reports for ``cxr_report_labeler`` (``convert_openi_reports``, as ``openi_reports``; also
          writes ``report.json``). ``--tgz`` (default torchxrayvision's ``NLMCXR_reports.tgz``), ``--table``,
          ``--val_fraction``, ``--test_fraction``, ``--seed``.

        Example: ``python -m common.cli convert ct-rate --out data/ct_rate --csv train_reports.csv --volume_dir
        dataset/train``."""
        kind = str(kind)
        if kind not in CONVERT_KINDS:
            raise SystemExit(f"convert: unknown kind {kind!r}; choose from {', '.join(CONVERT_KINDS)}.")
        command, (reads, takes, required) = f"convert {kind}", CONVERT_KINDS[kind]
        overwrite = as_bool(overwrite, "--overwrite")
        options = dict(csv=csv, image_dir=image_dir, image_ext=image_ext, volume_dir=volume_dir, mask_dir=mask_dir,
                       cot_json=cot_json, image_root=image_root, num_regions=num_regions, region_table=region_table,
                       tgz=tgz, table=table, min_score=min_score, iou_threshold=iou_threshold,
                       val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, yolo_labels=yolo_labels,
                       check_images=check_images, qa=qa)
        given = {k: v for k, v in options.items() if v is not None}  # left out: the converter's default
        foreign = [f"--{k}" for k in given if k not in takes]
        if foreign:
            raise SystemExit(f"{command} failed: {', '.join(foreign)} not taken by {kind}; it takes "
                             f"{', '.join('--' + k for k in takes)}.")
        missing = [f"--{k}" for k in required if k not in given]
        if missing:
            raise SystemExit(f"{command} failed: {' and '.join(missing)} required ({reads}).")
        for k in ("yolo_labels", "check_images"):
            if k in given:
                given[k] = as_bool(given[k], f"--{k}")
        # fire reads a path that looks like a number as one
        for k in ("csv", "image_ext", "volume_dir", "mask_dir", "cot_json", "region_table", "tgz", "table", "qa"):
            if k in given:
                given[k] = str(given[k])
        for k in ("image_dir", "image_root"):
            # with --check_images false the images may be put in place later, so their folder need not exist yet
            if k in given and given.get("check_images", True):
                given[k] = _need_dir(given[k], f"--{k}", command)
            elif k in given:
                given[k] = str(given[k])
        out = str(out)

        if kind == "vindr":
            print(json.dumps(_convert_vindr(out, command, overwrite=overwrite, **given), indent=2))
            return
        if kind == "openi":
            summary = _convert_openi(out, command, overwrite=overwrite, **given)
            print(json.dumps({**{k: summary[k] for k in ("datalist", "report", "reports", "kept", "splits")},
                              "skipped": len(summary["skipped"])}, indent=2))
            return

        from common.data import convert_ct_rate, convert_omniabnorm_cot, convert_vindr_classification

        datalist = Path(out) / "datalist.json"
        _refuse_existing(datalist, command, overwrite)
        if "seed" in given:
            given["split_seed"] = given.pop("seed")
        try:
            if kind == "vindr-labels":
                report = convert_vindr_classification(given.pop("csv"), given.pop("image_dir", None), datalist, **given)
            elif kind == "ct-rate":
                report = convert_ct_rate(given.pop("csv"), given.pop("volume_dir"), datalist, **given)
            else:
                report = convert_omniabnorm_cot(given.pop("cot_json"), datalist, **given)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"{command} failed: {e}") from e
        lists = ("skipped", "skipped_qa")  # counted here; the converter's return value lists them
        print(json.dumps({"datalist": str(datalist), **{k: v for k, v in report.items() if k not in lists},
                          **{k: len(report[k]) for k in lists if k in report}}, indent=2))

    def iris_memory(
        self, ckpt: str, out: str, dataset_dir: str, episodes: int = 256, image_size: tuple | None = None,
        seed: int = 0, overwrite=False,
    ):
        """Fill the memory bank of IRIS weights ``ckpt`` with ``episodes`` named-class episodes of the IRIS bundle's
        ``train.json`` dataset on ``dataset_dir`` (weights unchanged) and write the result to ``out``; for weights
        trained on domain-randomised episodes only, whose bank has never seen a named class."""
        overwrite = as_bool(overwrite, "--overwrite")
        import torch
        from monai.bundle import ConfigParser
        from monai.utils import set_determinism

        from common.engines import fill_memory_bank

        out_path = Path(out)
        if out_path.exists() and not overwrite:
            raise SystemExit(f"iris_memory failed: {out_path} exists; pass --overwrite true to replace it.")
        root = BUNDLES_DIR / "iris_incontext_segmentation"
        parser = ConfigParser()
        parser.read_config(str(root / "configs" / "train.json"))
        parser.update({"bundle_root": str(root), "dataset_dir": dataset_dir, "episodes_per_epoch": int(episodes),
                       "seed": int(seed), **({"image_size": list(image_size)} if image_size else {})})
        set_determinism(seed=int(seed))
        network = parser.get_parsed_content("network_def")
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            network.load_state_dict(state.get("model", state))
        except (FileNotFoundError, RuntimeError) as e:
            raise SystemExit(f"iris_memory failed: {ckpt}: {str(e).splitlines()[0]}") from e
        dataset = parser.get_parsed_content("train#dataset")
        updates = fill_memory_bank(network, dataset, dataset.class_names)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), out_path)
        print(json.dumps({"weights": str(out_path), "episodes": len(dataset), "updates": updates}, indent=2))

    def demo(self, out: str = "demo_outputs", bundles: str | list | None = None):
        """Run every bundle's inference on its embedded sample; outputs and PNG previews go to ``out/<bundle>``."""
        names = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "inference.json").is_file())
        if bundles:
            names = [n for n in names if n in ([bundles] if isinstance(bundles, str) else bundles)]
        failed = []
        for name in names:
            bundle = BUNDLES_DIR / name
            target = Path(out).resolve() / name
            print(f"== {name}: inference on the embedded sample -> {target}", flush=True)
            cmd = [
                sys.executable, "-m", "monai.bundle", "run",
                "--config_file", str(bundle / "configs" / "inference.json"),
                "--meta_file", str(bundle / "configs" / "metadata.json"),
                "--logging_file", str(bundle / "configs" / "logging.conf"),
                "--bundle_root", str(bundle),
                "--output_dir", str(target),
                "--overwrite", "true",
            ]
            if subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}).returncode:
                failed.append(name)
                continue
            pngs = sorted(str(p) for p in target.glob("*.png"))
            print(f"   {len(pngs)} preview(s): " + ", ".join(pngs))
        if failed:
            raise SystemExit(f"demo failed for: {', '.join(failed)}")
        print(f"demo outputs in {Path(out).resolve()}")

    def package(self, bundle: str, out: str = "dist", overwrite: bool = False, weights_url: str = ""):
        """Package ``bundles/<name>`` as ``<out>/<name>.zip``, a MONAI bundle with the ``common`` code it needs inside,
        for ``python -m monai.bundle download --name <name> --url <url of the zip>`` in any MONAI app."""
        overwrite = as_bool(overwrite, "--overwrite")
        from common.bundle.package import package_bundle

        try:
            path = package_bundle(bundle, out, overwrite=overwrite, weights_url=weights_url)
        except (FileNotFoundError, FileExistsError, ValueError) as e:
            raise SystemExit(f"package failed: {e}") from e
        print(f"bundle: {path}")

    def export_onnx(
        self, bundle: str, out: str, quantize: str | None = None, threads: int | None = 1, repeats: int = 5,
        dynamo: bool | str | None = None, overwrite=False, **override,
    ):
        """Export a bundle's network to ``<out>/model.onnx`` (``--quantize int8``: also ``model_int8.onnx``), traced on
        and compared with PyTorch on the bundle's embedded sample with its shipped weights; prints the report
        (largest difference per output, PyTorch and onnxruntime latency on ``--threads`` threads) and writes it to
        ``<out>/export_report.json``. Further ``--id value`` pairs override ``inference.json`` (e.g. ``--ckpt_path``,
        ``--images``). ``bundle``: a folder or a name under ``bundles/``."""
        overwrite = as_bool(overwrite, "--overwrite")
        dynamo = None if dynamo is None else as_bool(dynamo, "--dynamo")
        from common.bundle.export import capture_network_inputs, export_onnx

        root = Path(bundle) if Path(bundle).is_dir() else BUNDLES_DIR / bundle
        if not (root / "configs" / "inference.json").is_file():
            raise SystemExit(f"export_onnx failed: {bundle}: no configs/inference.json (a bundle folder or a name "
                             f"under {BUNDLES_DIR})")
        out_dir = Path(out)
        targets = [out_dir / "model.onnx", out_dir / "export_report.json"]
        targets += [out_dir / "model_int8.onnx"] if quantize else []
        existing = [str(t) for t in targets if t.exists()]
        if existing and not overwrite:
            raise SystemExit(f"export_onnx failed: {', '.join(existing)} exist(s); pass --overwrite true to replace.")
        for t in targets:
            t.unlink(missing_ok=True)
        try:
            network, inputs = capture_network_inputs(root, **override)
            report = export_onnx(network, inputs, out_dir / "model.onnx", dynamo=dynamo, quantize=quantize,
                                 repeats=repeats, threads=threads)
        except (FileExistsError, RuntimeError, ValueError) as e:
            raise SystemExit(f"export_onnx failed: {e}") from e
        report = {"bundle": root.name, "threads": threads, **report}
        (out_dir / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))

    def gpu_check(self, device: str = "cuda", quick=False, out: str | None = None, inference=True):
        """Every GPU figure the bundle docs want, in one table (``make gpu-check``; see
        ``common.benchmarks.gpu_check``): the bundles' inference with AMP, training steps with AMP, a CT-ViT base
        step at 64 x 512 x 512 (batch 2, FlexAttention), IRIS full at 128^3 with 1 and 3 references, and YOLO's
        inference path against ultralytics' at 640. ``--out rows.json`` keeps the rows; ``--quick true`` runs tiny
        sizes (on a CPU too) to check the code path only."""
        from common.benchmarks.gpu_check import gpu_check

        gpu_check(str(device), as_bool(quick, "--quick"), out, as_bool(inference, "--inference"))

    def benchmark(self, network: str = "iris", **kwargs):
        """Print speed and memory of a network as JSON, e.g. ``benchmark iris --device cpu --size small``.

        ``network`` is ``iris``, ``csr``, ``ct`` or ``yolo``; every other ``--name value`` goes to
        ``common.benchmarks.benchmark_<network>`` (its docstring says what each reports).
        IRIS options (latency and peak memory of one forward pass or training step): size (small|full), image_size,
        num_classes, num_references, batch_size, device, repeats, train (time a training step), amp (bf16 autocast),
        threads; with ``--amp true`` it also times fp32 and reports the ratio ``amp_speedup``.
        CSR options (images/s of ``explain``): backbone (tiny|resnet18|resnet18_os16|resnet50|densenet121|vit_b_16),
        image_size, batch_size, device, repeats, train, amp, threads.
        CT options (tokens/s and peak memory of CT-ViT): size (tiny|small|base, comma-separated for several),
        device (cpu|cuda, comma-separated), image_size, patch_size, batch_size, repeats, train, amp,
        attention_impl, threads.
        YOLO options (the bundle's inference path against ultralytics' ``predict``, judged by their ratio
        ``bundle_over_ultralytics``): model (the ultralytics model YAML, e.g. ``--model yolov5s.yaml``; default
        yolov5n.yaml), weights (a ``model_ultralytics.pt`` matching model and num_classes; default random),
        num_classes, images (a folder of PNG/JPEG), num_images, source_size, image_size, conf_threshold, device,
        threads, warmup.
        """
        from common.benchmarks import benchmark_csr, benchmark_ct, benchmark_iris, benchmark_yolo

        runners = {"iris": benchmark_iris, "csr": benchmark_csr, "yolo": benchmark_yolo, "ct": benchmark_ct}
        if network not in runners:
            raise SystemExit(f"benchmark failed: unknown network '{network}'; choose from {sorted(runners)}")
        # **kwargs takes any option, so a misspelt one would otherwise end as a TypeError deep in the call
        options = inspect.signature(runners[network]).parameters
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise SystemExit(f"benchmark failed: {network} has no option {unknown}; its options: {list(options)}")
        try:
            result = runners[network](**kwargs)
        except ValueError as e:
            raise SystemExit(f"benchmark failed: {e}") from e
        print(json.dumps(result, indent=2))


def main() -> None:
    fire.Fire(CLI)


if __name__ == "__main__":
    main()
