"""Converters from public CT report layouts to the report datalist of :mod:`common.data.synthetic_ct_reports`.

- CT-RATE (Hamamci et al. 2024, https://arxiv.org/abs/2403.17834): a reports CSV with ``VolumeName``,
  ``Findings_EN`` and ``Impressions_EN`` columns (others are ignored) and a folder of ``.nii.gz`` volumes, flat or
  nested as published (``train/train_1/train_1_a/train_1_a_1.nii.gz``): files are found by name anywhere below it.
  Optionally its question/answer records (``volumename``, ``question``, ``answer``; CSV or JSON), kept per case as
  ``report["qa"]``.
- The OmniAbnorm chain-of-thought layout: a JSON list with one item per abnormality, as the design shows it,
  ``{"case_id", "image_path", "mask_path", "region", "category", "cot_reasoning": [{"step": 1, "text": str,
  "anatomical_entities": [str, ...], "mask_region": "Bilateral hemithoraces"}, ...]}``, or the short form
  ``{"case_id", "image", "mask", ..., "cot_reasoning": [{"step": str, "mask_region": int}, ...]}``. A region
  *name* becomes region ids through :data:`OMNIABNORM_REGION_IDS` (extend or replace it with ``region_table``).

Both write::

    {"name": ..., "description": ..., "regions": {"1": "right_lung", ...},
     "training": [{"case_id", "image", ["mask"], "report": {"findings": [{"text", "region", "region_id"}, ...],
                   "impression": str, "cot": [{"step", "mask_region"}, ...], "regions_mentioned": [ids]}}, ...],
     "validation": [...]}

with paths relative to the datalist's folder. Every row is checked; a bad one is reported (its row, a key and the
reason) and skipped, and the rest converts. Findings sentences get a region id by keyword (:func:`assign_region`;
0 when none matches), which is what region-level contrastive training pairs on
(:func:`common.data.report_text.region_texts`); the sentence splitting and the batch texts of that training live in
:mod:`common.data.report_text`.

Intensity: CT-CLIP clips CT-RATE to [-1000, 1000] HU, the ``"wide"`` window of
:data:`common.transforms.intensity.CT_WINDOWS` (:data:`CT_RATE_WINDOW`). A "lung window" of center 40 / width 400
found in some pipelines is a soft-tissue window (``CT_WINDOWS["soft_tissue"]``); the lung window is -600 / 1500.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.data.report_text import split_sentences
from common.data.synthetic_ct_reports import CT_REGIONS
from common.data.tables import check_split, match_columns, read_csv, validation_groups
from common.transforms.intensity import CT_WINDOWS

__all__ = [
    "CT_RATE_WINDOW",
    "REGION_KEYWORDS",
    "OMNIABNORM_REGION_IDS",
    "assign_region",
    "load_region_table",
    "convert_ct_rate",
    "convert_omniabnorm_cot",
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


# -------------------------------------------------------------------------------------------------------- regions
def assign_region(sentence: str, regions: Sequence[str] = CT_REGIONS) -> int:
    """Region id (``regions.index(name) + 1``) of the earliest region named in ``sentence``, 0 if none is."""
    best, best_pos = 0, len(sentence) + 1
    for i, name in enumerate(regions):
        match = re.search(REGION_KEYWORDS.get(name, re.escape(name.replace("_", " "))), sentence, re.IGNORECASE)
        if match is not None and match.start() < best_pos:
            best, best_pos = i + 1, match.start()
    return best


def _findings(text: str, regions: Sequence[str]) -> list[dict]:
    out = []
    for sentence in split_sentences(text):
        region_id = assign_region(sentence, regions)
        out.append({"text": sentence, "region": regions[region_id - 1] if region_id else "", "region_id": region_id})
    return out


# -------------------------------------------------------------------------------------------------------- helpers
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


def _write(out_json: Path, name: str, description: str, regions: Sequence[str], cases: list[dict], groups: list[str],
           val_fraction: float, split_seed: int) -> tuple[int, int]:
    validation = validation_groups(groups, val_fraction, seed=split_seed, count="groups")  # a patient stays whole
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
    qa: PathLike | None = None,
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
        qa: optional CT-RATE question/answer records (its VQA release) as a CSV or a JSON list, one record per
            question with ``volumename``, ``question`` and ``answer`` (any case). Each converted case gets its
            records as ``report["qa"]: [{"question", "answer"}, ...]`` in file order; a record of a volume that
            is not among the converted cases, or with an empty question or answer, is reported in ``skipped_qa``.

    Returns:
        ``cases``, ``training``, ``validation``, ``rows`` (read), ``skipped`` (list of ``{"row": CSV line,
        "volume": name, "reason": ...}``) and, with ``qa``, ``qa`` (records attached) and ``skipped_qa`` (list of
        ``{"record": line or index, "volume": name, "reason": ...}``).
    """
    check_split(val_fraction, split_seed)
    path, out_json = Path(reports_csv), Path(out_json)
    header, rows = read_csv(path)
    cols = match_columns(header, ("VolumeName", "Findings_EN", "Impressions_EN"), path)
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

    summary: dict = {}
    if qa is not None:
        summary["qa"], summary["skipped_qa"] = _attach_qa(Path(qa), {c["case_id"]: c for c in cases})
    description = f"CT-RATE reports from {path.name}; made by common.data.ct_rate.convert_ct_rate."
    num_train, num_val = _write(out_json, "ct_rate", description, regions, cases, groups, val_fraction, split_seed)
    return {"cases": len(cases), "training": num_train, "validation": num_val, "rows": len(rows), "skipped": skipped,
            **summary}


def _qa_records(path: Path) -> list[tuple[int, dict[str, str]]]:
    """``(line or index, {"volumename", "question", "answer"})`` of a VQA CSV (line numbers) or JSON list (1-based
    positions); keys matched case-insensitively."""
    wanted = ("volumename", "question", "answer")
    if path.suffix.lower() == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found.")
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}).") from e
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError(f"{path}: should hold a JSON list of question/answer records.")
        found = {k.lower() for r in records for k in r}
        missing = [w for w in wanted if w not in found]
        if records and missing:
            raise ValueError(f"{path}: records lack {missing}; found keys {sorted(found)}.")
        return [(i + 1, {k.lower(): str(v if v is not None else "").strip() for k, v in r.items()})
                for i, r in enumerate(records)]
    header, rows = read_csv(path)
    cols = match_columns(header, wanted, path)
    return [(line, {w: row[cols[w]] for w in wanted}) for line, row in rows]


def _attach_qa(path: Path, cases: Mapping[str, dict]) -> tuple[int, list[dict]]:
    """Add each record to its case's ``report["qa"]``; the count attached and the records passed over."""
    attached, skipped = 0, []
    for where, record in _qa_records(path):
        name, question, answer = record.get("volumename", ""), record.get("question", ""), record.get("answer", "")
        case = cases.get(_stem(name)) if name else None
        reason = ("empty volumename" if not name else "volume not among the converted cases" if case is None
                  else "empty question" if question.lower() in _EMPTY
                  else "empty answer" if answer.lower() in _EMPTY else None)
        if reason is not None:
            skipped.append({"record": where, "volume": name, "reason": reason})
            continue
        case["report"].setdefault("qa", []).append({"question": question, "answer": answer})
        attached += 1
    return attached, skipped


# ---------------------------------------------------------------------------------------------------- OmniAbnorm
OMNIABNORM_REGION_IDS: dict[str, list[int]] = {
    **{name.replace("_", " "): [i + 1] for i, name in enumerate(CT_REGIONS)},
    "right hemithorax": [1], "right pleura": [1], "right pleural space": [1],
    "left hemithorax": [2], "left pleura": [2], "left pleural space": [2],
    "bilateral hemithoraces": [1, 2], "bilateral lungs": [1, 2], "both lungs": [1, 2], "lungs": [1, 2],
    "bilateral pleura": [1, 2], "chest": [1, 2], "thorax": [1, 2],
    "cardiac": [3], "pericardium": [3], "mediastinum": [3], "heart and pericardium": [3],
    "hepatic": [4], "splenic": [5],
    "right renal": [6], "left renal": [7], "bilateral kidneys": [6, 7], "kidneys": [6, 7],
    "vertebrae": [8], "vertebral column": [8], "thoracic spine": [8], "lumbar spine": [8],
    "whole volume": [0], "none": [0], "global": [0],
}
"""Region name (lower case, spaces) -> region ids of :data:`CT_REGIONS` (``i + 1`` for ``CT_REGIONS[i]``; 0 = the
whole volume). A name covering several regions ("Bilateral hemithoraces") lists them all: the step keeps them in
``mask_regions`` and its first in ``mask_region``. Names are matched case-insensitively with ``_``/``-`` read as
spaces."""


def _region_key(name: str) -> str:
    return " ".join(re.split(r"[\s_\-]+", name.strip().lower()))


def load_region_table(region_table: PathLike | Mapping | None = None, replace: bool = False) -> dict[str, list[int]]:
    """The region-name table: :data:`OMNIABNORM_REGION_IDS` extended (or, with ``replace``, replaced) by
    ``region_table``, a mapping or a JSON file of ``{"name": id or [ids]}``.

    Raises:
        FileNotFoundError: the JSON file is missing.
        ValueError: the table is not a mapping of names to non-negative integer ids.
    """
    extra: Mapping = {}
    if isinstance(region_table, (str, os.PathLike)):
        path = Path(region_table)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: region table not found.")
        extra = json.loads(path.read_text())
    elif region_table is not None:
        extra = region_table
    if not isinstance(extra, Mapping):
        raise ValueError(f"region table should map names to region ids, got {type(extra).__name__}.")
    table = {} if replace else dict(OMNIABNORM_REGION_IDS)
    for name, ids in extra.items():
        ids = [ids] if isinstance(ids, int) and not isinstance(ids, bool) else ids
        ok = [isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids] if isinstance(ids, list) else []
        if not ok or not all(ok):
            raise ValueError(f"region table: {name!r} should map to a non-negative id or a list of them, got {ids!r}.")
        table[_region_key(str(name))] = list(ids)
    return table


def _step_regions(value, table: Mapping[str, list[int]]) -> list[int] | str:
    """Region ids of a step's ``mask_region`` (an id, a digit string or a region name), or why it has none."""
    if isinstance(value, str) and value.strip().isdigit():
        return [int(value)]
    if isinstance(value, str):
        ids = table.get(_region_key(value))
        return list(ids) if ids else f"unknown region name {value!r} (not in the region table; extend it with " \
                                     "region_table)"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"mask_region should be a non-negative integer or a region name, got {value!r}"
    return [value]


def _step_text(step: Mapping) -> str:
    """The step's sentence: ``text`` in the design's layout (``step`` is then its number), else ``step``."""
    return str(step["text"] if "text" in step else step.get("step", "")).strip()


def _check_item(item, num_regions: int | None, table: Mapping[str, list[int]]) -> str | None:
    """Why an OmniAbnorm item is unusable, or None."""
    if not isinstance(item, Mapping):
        return "not an object"
    image, mask = item.get("image", item.get("image_path")), item.get("mask", item.get("mask_path"))
    missing = [k for k, v in (("case_id", item.get("case_id")), ("image/image_path", image), ("mask/mask_path", mask),
                              ("cot_reasoning", item.get("cot_reasoning"))) if v is None]
    if missing:
        return f"missing keys {missing}"
    if not str(item["case_id"]).strip() or not str(image).strip() or not str(mask).strip():
        return "empty case_id, image or mask"
    steps = item["cot_reasoning"]
    if not isinstance(steps, list) or not steps:
        return "empty cot_reasoning"
    for k, step in enumerate(steps):
        if not isinstance(step, Mapping) or not _step_text(step):
            return f"empty step {k}"
        regions = _step_regions(step.get("mask_region"), table)
        if isinstance(regions, str):
            return f"step {k}: {regions}"
        if num_regions is not None and max(regions) > num_regions:
            return f"step {k}: mask_region {max(regions)} above num_regions {num_regions}"
    return None


def convert_omniabnorm_cot(
    cot_json: PathLike,
    out_json: PathLike,
    image_root: PathLike | None = None,
    num_regions: int | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    regions: Sequence[str] = CT_REGIONS,
    region_table: PathLike | Mapping | None = None,
) -> dict:
    """Convert an OmniAbnorm chain-of-thought JSON to a report datalist (layout in the module docstring).

    Items of one ``case_id`` (one per abnormality) merge into one case: their steps concatenate in item order, each
    abnormality adds a findings sentence ``"<Category> in the <region>."`` whose region id is the most frequent
    non-zero ``mask_region`` of its steps, and the impression joins those sentences. ``mask_region`` 0 is allowed (a
    step about the whole volume). Skipped (and reported) items: not an object, missing keys, empty ids or paths,
    empty or malformed ``cot_reasoning`` (a step without text, ``mask_region`` not a non-negative integer or above
    ``num_regions``, a region name not in the table), missing image or mask files, or an image/mask differing from
    an earlier item of the case. Steps keep their ``anatomical_entities`` when given.

    Args:
        cot_json: the JSON list.
        out_json: datalist to write; folders are created, an existing file is replaced.
        image_root: folder that relative ``image``/``mask`` paths start from; default the JSON's folder.
        num_regions: highest allowed region id, or None for no limit.
        val_fraction: fraction of cases for validation. Default 0.1.
        split_seed: seed of the validation draw. Default 0.
        regions: region names for the datalist's ``"regions"``. Default :data:`CT_REGIONS`.
        region_table: names -> region ids added to :data:`OMNIABNORM_REGION_IDS` (a mapping or a JSON file; see
            :func:`load_region_table`), for the region names of ``mask_region``.

    Returns:
        ``cases``, ``training``, ``validation``, ``rows`` (items read) and ``skipped`` (list of ``{"row": item index
        from 0, "case_id", "reason"}``).
    """
    check_split(val_fraction, split_seed)
    if num_regions is not None and (isinstance(num_regions, bool) or not isinstance(num_regions, int)
                                    or num_regions < 1):
        raise ValueError(f"num_regions should be a positive integer or None, got {num_regions}.")
    table = load_region_table(region_table)
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
        reason = _check_item(item, num_regions, table)
        case_id = str(item.get("case_id", "")) if isinstance(item, Mapping) else ""
        if reason is None:
            image = root / str(item.get("image", item.get("image_path")))
            mask = root / str(item.get("mask", item.get("mask_path")))
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
        steps = []
        for step in item["cot_reasoning"]:
            ids = _step_regions(step["mask_region"], table)
            steps.append({"step": _step_text(step), "mask_region": ids[0],
                          **({"mask_regions": ids} if len(ids) > 1 else {}),
                          **({"anatomical_entities": [str(e) for e in step["anatomical_entities"]]}
                             if isinstance(step.get("anatomical_entities"), list) else {})})
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
        mentioned = {i for s in report["cot"] for i in s.get("mask_regions", [s["mask_region"]])}
        report["regions_mentioned"] = sorted(i for i in mentioned if i > 0)

    ordered = [cases[k] for k in sorted(cases)]
    num_train, num_val = _write(out_json, "omniabnorm_cot", f"OmniAbnorm reasoning steps from {path.name}; made by "
                                "common.data.ct_rate.convert_omniabnorm_cot.", regions, ordered,
                                [c["case_id"] for c in ordered], val_fraction, split_seed)
    return {"cases": len(ordered), "training": num_train, "validation": num_val, "rows": len(items),
            "skipped": skipped}
