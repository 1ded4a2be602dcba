"""Converters from public CT report layouts to the report datalist of :mod:`common.data.synthetic_ct_reports`.

- CT-RATE (Hamamci et al. 2024, https://arxiv.org/abs/2403.17834): a reports CSV with ``VolumeName``,
  ``Findings_EN`` and ``Impressions_EN`` columns (others are ignored) and a folder of ``.nii.gz`` volumes, flat or
  nested as published (``train/train_1/train_1_a/train_1_a_1.nii.gz``): files are found by name anywhere below it.
- The OmniAbnorm chain-of-thought layout: a JSON list of ``{"case_id", "image", "mask", "region", "category",
  "cot_reasoning": [{"step": str, "mask_region": int}, ...]}``, one item per abnormality.

Both write::

    {"name": ..., "description": ..., "regions": {"1": "right_lung", ...},
     "training": [{"case_id", "image", ["mask"], "report": {"findings": [{"text", "region", "region_id"}, ...],
                   "impression": str, "cot": [{"step", "mask_region"}, ...], "regions_mentioned": [ids]}}, ...],
     "validation": [...]}

with paths relative to the datalist's folder. Every row is checked; a bad one is reported (its row, a key and the
reason) and skipped, and the rest converts. Findings sentences get a region id by keyword (:func:`assign_region`;
0 when none matches), which is what region-level contrastive training pairs on (:func:`region_texts`).

Intensity: CT-CLIP clips CT-RATE to [-1000, 1000] HU, the ``"wide"`` window of
:data:`common.transforms.intensity.CT_WINDOWS` (:data:`CT_RATE_WINDOW`). A "lung window" of center 40 / width 400
found in some pipelines is a soft-tissue window (``CT_WINDOWS["soft_tissue"]``); the lung window is -600 / 1500.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from common.data.synthetic_ct_reports import CT_REGIONS
from common.transforms.intensity import CT_WINDOWS

__all__ = [
    "CT_RATE_WINDOW",
    "REGION_KEYWORDS",
    "assign_region",
    "convert_ct_rate",
    "convert_omniabnorm_cot",
    "region_texts",
    "report_text_batch",
    "split_sentences",
]

PathLike = str | os.PathLike
CT_RATE_WINDOW: tuple[float, float] = CT_WINDOWS["wide"]
"""``(center, width)`` = (0, 2000) HU: [-1000, 1000], as CT-CLIP preprocesses CT-RATE."""
REGION_KEYWORDS: dict[str, str] = {
    "right_lung": r"right (?:lung|upper lobe|middle lobe|lower lobe|hemithorax|pleural)",
    "left_lung": r"left (?:lung|upper lobe|lower lobe|hemithorax|pleural)|lingula",
    "heart": r"\b(?:heart|cardiac|cardiomegaly|pericardi\w*|coronary)\b",
    "liver": r"\b(?:liver|hepatic)\b",
    "spleen": r"\b(?:spleen|splenic)\b",
    "right_kidney": r"right (?:kidney|renal)",
    "left_kidney": r"left (?:kidney|renal)",
    "spine": r"\b(?:spine|spinal|vertebra\w*)\b",
}
"""Case-insensitive patterns naming each region of :data:`CT_REGIONS` in report sentences."""
_EMPTY = {"", "nan", "none", "null", "n/a"}
_VOLUME_SUFFIXES = (".nii.gz", ".nii")


# ---------------------------------------------------------------------------------------------------- text helpers
def split_sentences(text: str) -> list[str]:
    """Sentences of a report: split after ``.``, ``!`` or ``?`` followed by white space ("3.5 mm" stays whole)."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def assign_region(sentence: str, regions: Sequence[str] = CT_REGIONS) -> int:
    """Region id (``regions.index(name) + 1``) of the earliest region named in ``sentence``, 0 if none is."""
    best, best_pos = 0, len(sentence) + 1
    for i, name in enumerate(regions):
        match = re.search(REGION_KEYWORDS.get(name, re.escape(name.replace("_", " "))), sentence, re.IGNORECASE)
        if match is not None and match.start() < best_pos:
            best, best_pos = i + 1, match.start()
    return best


def region_texts(report: Mapping) -> dict[int, str]:
    """Region id -> the report's findings sentences about it, joined; for the region-level loss (ids >= 1 only)."""
    texts: dict[int, list[str]] = {}
    for finding in report.get("findings", []):
        if int(finding["region_id"]) > 0:
            texts.setdefault(int(finding["region_id"]), []).append(finding["text"])
    return {k: " ".join(v) for k, v in sorted(texts.items())}


def report_text_batch(reports: Sequence[Mapping], num_regions: int) -> dict:
    """Texts and indices of a batch of reports for :class:`common.losses.contrastive.MultiLevelContrastiveLoss`.

    Returns:
        ``impressions``: ``B`` strings (global level); ``region_texts``: ``M`` strings, one per mentioned region of
        each report (:func:`region_texts`), at ``region_batch`` / ``region_ids`` ``(M,)`` long (ids ``1..R``) and
        ``region_mentioned`` ``(B, R)`` bool; ``step_texts``: ``S`` reasoning steps with ``step_batch`` and
        ``step_region`` ``(S,)`` long (0 = no region). Scatter the ``M`` text embeddings into ``(B, R, D)`` with
        ``region_text[region_batch, region_ids - 1] = embeddings``.
    """
    impressions, texts, region_batch, region_ids, steps, step_batch, step_region = [], [], [], [], [], [], []
    for b, report in enumerate(reports):
        impressions.append(str(report["impression"]))
        for region_id, text in region_texts(report).items():
            if not 1 <= region_id <= num_regions:
                raise ValueError(f"region ids should be in [1, {num_regions}], got {region_id} in report {b}.")
            texts.append(text)
            region_batch.append(b)
            region_ids.append(region_id)
        for step in report.get("cot", []):
            if not 0 <= int(step["mask_region"]) <= num_regions:
                raise ValueError(f"mask_region should be in [0, {num_regions}], got {step['mask_region']} in report "
                                 f"{b}.")
            steps.append(str(step["step"]))
            step_batch.append(b)
            step_region.append(int(step["mask_region"]))
    mentioned = torch.zeros(len(reports), num_regions, dtype=torch.bool)
    mentioned[torch.tensor(region_batch, dtype=torch.long), torch.tensor(region_ids, dtype=torch.long) - 1] = True
    return {
        "impressions": impressions,
        "region_texts": texts,
        "region_batch": torch.tensor(region_batch, dtype=torch.long),
        "region_ids": torch.tensor(region_ids, dtype=torch.long),
        "region_mentioned": mentioned,
        "step_texts": steps,
        "step_batch": torch.tensor(step_batch, dtype=torch.long),
        "step_region": torch.tensor(step_region, dtype=torch.long),
    }


def _findings(text: str, regions: Sequence[str]) -> list[dict]:
    out = []
    for sentence in split_sentences(text):
        region_id = assign_region(sentence, regions)
        out.append({"text": sentence, "region": regions[region_id - 1] if region_id else "", "region_id": region_id})
    return out


# -------------------------------------------------------------------------------------------------------- helpers
def _read_csv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and ``(line number, row)`` pairs; the header is line 1, quoted multi-line fields count their lines."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found.")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty CSV file.")
        header = [name.strip() for name in reader.fieldnames]
        reader.fieldnames = header
        rows, start = [], 2
        for row in reader:
            rows.append((start, {k: (v or "").strip() for k, v in row.items() if k is not None}))
            start = reader.line_num + 1
    return header, rows


def _columns(header: Sequence[str], wanted: Sequence[str], path: Path) -> dict[str, str]:
    by_lower = {name.lower(): name for name in header}
    missing = [w for w in wanted if w.lower() not in by_lower]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found {list(header)}.")
    return {w: by_lower[w.lower()] for w in wanted}


def _index_files(folder: Path) -> dict[str, Path]:
    """File name -> path for every NIfTI below ``folder`` (the first in sorted order wins a repeated name)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: folder not found.")
    index: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(_VOLUME_SUFFIXES):
                index.setdefault(name, Path(root) / name)
    return index


def _relative(file: Path, base: Path) -> str:
    return Path(os.path.relpath(file.resolve(), base.resolve())).as_posix()


def _check_split(val_fraction: float, split_seed: int) -> None:
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction should be in [0, 1], got {val_fraction}.")
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)) or split_seed < 0:
        raise ValueError(f"split_seed should be a non-negative integer, got {split_seed}.")


def _validation_groups(groups: Sequence[str], val_fraction: float, split_seed: int) -> set[str]:
    """``round(n * val_fraction)`` of the sorted distinct groups, drawn by a seeded permutation (row order free)."""
    ordered = sorted(set(groups))
    order = np.random.default_rng(split_seed).permutation(len(ordered))
    return {ordered[i] for i in order[: int(round(len(ordered) * val_fraction))]}


def _write(out_json: Path, name: str, description: str, regions: Sequence[str], cases: list[dict], groups: list[str],
           val_fraction: float, split_seed: int) -> tuple[int, int]:
    validation = _validation_groups(groups, val_fraction, split_seed)
    training = [c for c, g in zip(cases, groups) if g not in validation]
    held = [c for c, g in zip(cases, groups) if g in validation]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({
        "name": name,
        "description": description,
        "regions": {str(i + 1): r for i, r in enumerate(regions)},
        "training": training,
        "validation": held,
    }, indent=4) + "\n")
    return len(training), len(held)


def _stem(volume_name: str) -> str:
    for suffix in _VOLUME_SUFFIXES:
        if volume_name.endswith(suffix):
            return volume_name[: -len(suffix)]
    return volume_name


def _ct_rate_patient(volume_name: str) -> str:
    """``train_1_a_1.nii.gz -> train_1``: CT-RATE names are ``<split>_<patient>_<scan>_<reconstruction>``."""
    match = re.match(r"^([A-Za-z]+_\d+)_", _stem(volume_name))
    return match.group(1) if match else _stem(volume_name)


# -------------------------------------------------------------------------------------------------------- CT-RATE
def convert_ct_rate(
    reports_csv: PathLike,
    volume_dir: PathLike,
    out_json: PathLike,
    mask_dir: PathLike | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    regions: Sequence[str] = CT_REGIONS,
) -> dict:
    """Convert a CT-RATE reports CSV and its volumes to a report datalist (layout in the module docstring).

    Each row becomes one case: findings split into sentences with region ids, the impression as is, no reasoning
    steps. Skipped (and reported) rows: empty ``VolumeName``, a name seen before, empty findings or impression
    ("nan" counts as empty), no volume file of that name below ``volume_dir``, and with ``mask_dir`` no mask file of
    that name below it. Scans of one patient (``train_1_a_1``, ``train_1_b_1``) land in the same split.

    Args:
        reports_csv: the reports CSV; needs ``VolumeName``, ``Findings_EN``, ``Impressions_EN`` (any case), else
            ``ValueError``.
        volume_dir: folder searched recursively for the volumes.
        out_json: datalist to write; folders are created, an existing file is replaced.
        mask_dir: optional folder of region masks named like the volumes (e.g. from a segmentation model).
        val_fraction: fraction of patients for validation. Default 0.1.
        split_seed: seed of the validation draw. Default 0.
        regions: region names, id ``i + 1`` for ``regions[i]``. Default :data:`CT_REGIONS`.

    Returns:
        ``cases``, ``training``, ``validation``, ``rows`` (read) and ``skipped`` (list of ``{"row": CSV line,
        "volume": name, "reason": ...}``).
    """
    _check_split(val_fraction, split_seed)
    path, out_json = Path(reports_csv), Path(out_json)
    header, rows = _read_csv(path)
    cols = _columns(header, ("VolumeName", "Findings_EN", "Impressions_EN"), path)
    volumes = _index_files(Path(volume_dir))
    masks = None if mask_dir is None else _index_files(Path(mask_dir))
    base = out_json.parent

    skipped, cases, groups, first_row = [], [], [], {}
    for line, row in rows:
        name = row[cols["VolumeName"]]
        findings, impression = row[cols["Findings_EN"]], row[cols["Impressions_EN"]]
        reason = None
        if not name:
            reason = "empty VolumeName"
        elif name in first_row:
            reason = f"duplicate VolumeName (first at row {first_row[name]})"
        elif findings.lower() in _EMPTY:
            reason = "empty findings"
        elif impression.lower() in _EMPTY:
            reason = "empty impression"
        elif name not in volumes:
            reason = f"volume file not found below {volume_dir}"
        elif masks is not None and name not in masks:
            reason = f"mask file not found below {mask_dir}"
        if name and name not in first_row:
            first_row[name] = line
        if reason is not None:
            skipped.append({"row": line, "volume": name, "reason": reason})
            continue
        sentences = _findings(findings, regions)
        case = {"case_id": _stem(name), "image": _relative(volumes[name], base)}
        if masks is not None:
            case["mask"] = _relative(masks[name], base)
        case["report"] = {
            "findings": sentences,
            "impression": impression,
            "cot": [],
            "regions_mentioned": sorted({s["region_id"] for s in sentences if s["region_id"] > 0}),
        }
        cases.append(case)
        groups.append(_ct_rate_patient(name))

    description = f"CT-RATE reports from {path.name}; made by common.data.ct_rate.convert_ct_rate."
    num_train, num_val = _write(out_json, "ct_rate", description, regions, cases, groups, val_fraction, split_seed)
    return {"cases": len(cases), "training": num_train, "validation": num_val, "rows": len(rows), "skipped": skipped}


# ---------------------------------------------------------------------------------------------------- OmniAbnorm
def _check_item(item, num_regions: int | None) -> str | None:
    """Why an OmniAbnorm item is unusable, or None."""
    if not isinstance(item, Mapping):
        return "not an object"
    missing = [k for k in ("case_id", "image", "mask", "cot_reasoning") if k not in item]
    if missing:
        return f"missing keys {missing}"
    if not str(item["case_id"]).strip() or not str(item["image"]).strip() or not str(item["mask"]).strip():
        return "empty case_id, image or mask"
    steps = item["cot_reasoning"]
    if not isinstance(steps, list) or not steps:
        return "empty cot_reasoning"
    for k, step in enumerate(steps):
        if not isinstance(step, Mapping) or not str(step.get("step", "")).strip():
            return f"empty step {k}"
        region = step.get("mask_region")
        if isinstance(region, str) and region.strip().isdigit():
            region = int(region)
        if isinstance(region, bool) or not isinstance(region, int) or region < 0:
            return f"step {k}: mask_region should be a non-negative integer, got {step.get('mask_region')!r}"
        if num_regions is not None and region > num_regions:
            return f"step {k}: mask_region {region} above num_regions {num_regions}"
    return None


def convert_omniabnorm_cot(
    cot_json: PathLike,
    out_json: PathLike,
    image_root: PathLike | None = None,
    num_regions: int | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    regions: Sequence[str] = CT_REGIONS,
) -> dict:
    """Convert an OmniAbnorm chain-of-thought JSON to a report datalist (layout in the module docstring).

    Items of one ``case_id`` (one per abnormality) merge into one case: their steps concatenate in item order, each
    abnormality adds a findings sentence ``"<Category> in the <region>."`` whose region id is the most frequent
    non-zero ``mask_region`` of its steps, and the impression joins those sentences. ``mask_region`` 0 is allowed (a
    step about the whole volume). Skipped (and reported) items: not an object, missing keys, empty ids or paths,
    empty or malformed ``cot_reasoning`` (a step without text, ``mask_region`` not a non-negative integer or above
    ``num_regions``), missing image or mask files, or an image/mask differing from an earlier item of the case.

    Args:
        cot_json: the JSON list.
        out_json: datalist to write; folders are created, an existing file is replaced.
        image_root: folder that relative ``image``/``mask`` paths start from; default the JSON's folder.
        num_regions: highest allowed region id, or None for no limit.
        val_fraction: fraction of cases for validation. Default 0.1.
        split_seed: seed of the validation draw. Default 0.
        regions: region names for the datalist's ``"regions"``. Default :data:`CT_REGIONS`.

    Returns:
        ``cases``, ``training``, ``validation``, ``rows`` (items read) and ``skipped`` (list of ``{"row": item index
        from 0, "case_id", "reason"}``).
    """
    _check_split(val_fraction, split_seed)
    if num_regions is not None and (isinstance(num_regions, bool) or not isinstance(num_regions, int)
                                    or num_regions < 1):
        raise ValueError(f"num_regions should be a positive integer or None, got {num_regions}.")
    path, out_json = Path(cot_json), Path(out_json)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found.")
    items = json.loads(path.read_text())
    if not isinstance(items, list):
        raise ValueError(f"{path}: should hold a JSON list of cases, got {type(items).__name__}.")
    root = path.parent if image_root is None else Path(image_root)
    base = out_json.parent

    skipped, cases, first_row = [], {}, {}
    for index, item in enumerate(items):
        reason = _check_item(item, num_regions)
        case_id = str(item.get("case_id", "")) if isinstance(item, Mapping) else ""
        if reason is None:
            image, mask = root / str(item["image"]), root / str(item["mask"])
            if not image.is_file():
                reason = f"image file not found: {image}"
            elif not mask.is_file():
                reason = f"mask file not found: {mask}"
            elif case_id in cases and (cases[case_id]["image"], cases[case_id]["mask"]) != (
                    _relative(image, base), _relative(mask, base)):
                reason = f"image or mask differs from the case's first item (row {first_row[case_id]})"
        if reason is not None:
            skipped.append({"row": index, "case_id": case_id, "reason": reason})
            continue
        steps = [{"step": str(s["step"]).strip(), "mask_region": int(s["mask_region"])} for s in item["cot_reasoning"]]
        grounded = Counter(s["mask_region"] for s in steps if s["mask_region"] > 0)
        region_id = grounded.most_common(1)[0][0] if grounded else 0
        category = str(item.get("category", "") or "abnormality").strip()
        region = str(item.get("region", "") or "").strip()
        text = f"{category[0].upper()}{category[1:]}" + (f" in the {region}." if region else ".")
        finding = {"text": text, "region": region, "region_id": region_id}
        if case_id not in cases:
            first_row[case_id] = index
            cases[case_id] = {"case_id": case_id, "image": _relative(image, base), "mask": _relative(mask, base),
                              "report": {"findings": [], "impression": "", "cot": [], "regions_mentioned": []}}
        report = cases[case_id]["report"]
        report["findings"].append(finding)
        report["cot"] += steps
        report["impression"] = " ".join(f["text"] for f in report["findings"])
        report["regions_mentioned"] = sorted({s["mask_region"] for s in report["cot"] if s["mask_region"] > 0})

    ordered = [cases[k] for k in sorted(cases)]
    num_train, num_val = _write(out_json, "omniabnorm_cot", f"OmniAbnorm reasoning steps from {path.name}; made by "
                                "common.data.ct_rate.convert_omniabnorm_cot.", regions, ordered,
                                [c["case_id"] for c in ordered], val_fraction, split_seed)
    return {"cases": len(ordered), "training": num_train, "validation": num_val, "rows": len(items),
            "skipped": skipped}
