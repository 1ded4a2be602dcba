"""Indiana University / OpenI chest X-ray reports: parser and converter to a labelled datalist with a group split.

The collection (Demner-Fushman et al. 2016, https://doi.org/10.1093/jamia/ocv080) ships with torchxrayvision as
``torchxrayvision/data/NLMCXR_reports.tgz``: 3,955 files ``ecgen-radiology/<n>.xml``, licensed CC BY-NC-ND 4.0.
Each XML holds the report sections (``<AbstractText Label="FINDINGS">``, ``"IMPRESSION"``, also ``"COMPARISON"``
and ``"INDICATION"``), the indexers' MeSH terms (``<MeSH><major>Opacity/lung/base/left/mild</major>...``: the
first ``/``-part is the term, the rest qualifiers; ``normal`` for a normal study, ``No Indexing`` when none was
made), ``<uId id="CXR1"/>`` and 0..n ``<parentImage id="CXR1_1_IM-0001-3001">``. Anonymisation left tokens such as
``XXXX`` in the text; they are kept. The XML has no patient id; the ``IM-####`` number of the images is the closest
thing to one (it repeats across reports), so splits keep every ``IM-####`` number on one side.

Labels and entities come from the findings table (:mod:`common.data.findings_table`; by default the
``cxr_report_labeler`` bundle's ``configs/findings.json``): its ``mesh`` key maps a report's MeSH terms to finding
ids (:func:`common.data.findings_table.mesh_findings`), its lexicons and negation cues mark the silver entity spans
of the text (:func:`common.data.findings_table.silver_entities`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.data.tables import assign_splits
from common.data.findings_table import DEFAULT_FINDINGS_TABLE, load_findings_table, mesh_findings, silver_entities

__all__ = [
    "SPLITS",
    "convert_openi_reports",
    "openi_reports_tgz",
    "parse_openi_report",
]

PathLike = str | os.PathLike

SPLITS = ("training", "validation", "test")
_IMAGE_NUMBER = re.compile(r"IM-\d+")


# ------------------------------------------------------------------------------------------------ reports
def parse_openi_report(xml_bytes: bytes | str, name: str) -> dict:
    """Parse one ``ecgen-radiology/<n>.xml`` report.

    Section texts have their whitespace runs collapsed to one space; MeSH terms too, per ``/``-part (the source has
    ``"Technical Quality of Image Unsatisfactory "`` and ``"Subcutaneous  Emphysema"``).

    Args:
        xml_bytes: the file's content.
        name: the file's name, used in errors.

    Returns:
        ``{"id": "CXR1", "findings": str, "impression": str, "text": findings + "\\n" + impression (empty parts
        skipped), "mesh": [major terms], "images": ["CXR1_1_IM-0001-3001", ...], "group": "IM-0001" (the image
        number of the first image, the report id when there is none), "license": licence URL}``.

    Raises:
        ValueError: malformed XML or no ``<uId id=...>``, naming ``name``.
    """
    try:
        root = ET.fromstring(xml_bytes)
    except ET.ParseError as e:
        raise ValueError(f"{name}: malformed XML ({e}).") from e
    uid = root.find("uId")
    report_id = "" if uid is None else (uid.get("id") or "").strip()
    if not report_id:
        raise ValueError(f"{name}: no <uId id=...> element; is this an OpenI report?")
    sections = {}
    for element in root.iter("AbstractText"):
        sections[(element.get("Label") or "").upper()] = " ".join("".join(element.itertext()).split())
    findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
    mesh = ["/".join(" ".join(p.split()) for p in (m.text or "").split("/")) for m in root.iter("major")]
    images = [p.get("id") for p in root.iter("parentImage") if p.get("id")]
    number = _IMAGE_NUMBER.search(images[0]) if images else None
    return {
        "id": report_id,
        "findings": findings,
        "impression": impression,
        "text": "\n".join(part for part in (findings, impression) if part),
        "mesh": [m for m in mesh if m],
        "images": images,
        "group": number.group() if number else report_id,
        "license": (root.findtext("licenseURL") or "").strip(),
    }


def torchxrayvision_data(name: str, hint: str) -> Path:
    """Path of ``data/<name>`` inside the installed torchxrayvision package, found without importing it (slow).

    Raises:
        FileNotFoundError: torchxrayvision is not installed, or its copy lacks the file; ``hint`` says what to pass
            instead.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"torchxrayvision is not installed; it ships {name} ({hint}).")
    path = Path(spec.origin).parent / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed torchxrayvision; {hint}.")
    return path


def openi_reports_tgz() -> Path:
    """Path of ``NLMCXR_reports.tgz`` inside the installed torchxrayvision package.

    Raises:
        FileNotFoundError: torchxrayvision is not installed, or its copy lacks the file.
    """
    return torchxrayvision_data("NLMCXR_reports.tgz", "pass tgz=...")


def _read_reports(tgz: Path) -> tuple[list[dict], list[dict]]:
    """Parsed reports of every ``*.xml`` in ``tgz`` and ``{"file", "reason"}`` of those that did not parse."""
    reports, bad = [], []
    try:
        with tarfile.open(tgz, "r:*") as archive:
            for member in sorted(archive.getmembers(), key=lambda m: m.name):
                if not (member.isfile() and member.name.endswith(".xml")):
                    continue
                name = f"{tgz.name}:{member.name}"
                try:
                    reports.append({**parse_openi_report(archive.extractfile(member).read(), name), "file": name})
                except ValueError as e:
                    bad.append({"file": name, "reason": str(e)})
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError(f"{tgz}: cannot read the archive ({e}).") from e
    if not reports and not bad:
        raise ValueError(f"{tgz}: no *.xml reports inside.")
    return reports, bad


def _skip_reason(report: dict) -> str | None:
    reasons = []
    if not report["text"]:
        reasons.append("no FINDINGS and no IMPRESSION text")
    if all(m.lower() == "no indexing" for m in report["mesh"]):
        reasons.append("MeSH is 'No Indexing' only" if report["mesh"] else "no MeSH terms")
    return "; ".join(reasons) or None


def _group_components(reports: Sequence[dict]) -> list[str]:
    """Per report, the smallest image number (or report id) connected to it through shared image numbers."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    keys = [sorted({m.group() for i in r["images"] for m in [_IMAGE_NUMBER.search(i)] if m} | {r["group"]})
            for r in reports]
    for ks in keys:
        for k in ks[1:]:
            a, b = root(ks[0]), root(k)
            parent[max(a, b)] = min(a, b)
    return [root(ks[0]) for ks in keys]


def _report_number(report_id: str) -> tuple:
    digits = re.findall(r"\d+", report_id)
    return (int(digits[0]) if digits else -1, report_id)


def _write_datalist(data: dict, path: Path) -> None:
    """JSON with one datalist item per line: readable, and a tenth of the size of an indented dump."""
    parts = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in data.items() if k not in SPLITS]
    for split in SPLITS:
        parts.append(f'"{split}": [\n' + ",\n".join(f"        {json.dumps(item)}" for item in data[split]) + "\n    ]")
    path.write_text("{\n    " + ",\n    ".join(parts) + "\n}\n")


def convert_openi_reports(
    out_dir: PathLike,
    tgz: PathLike | None = None,
    table_path: PathLike | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Convert the OpenI reports to a multi-label datalist with silver entities, split by image number.

    The target of a report is the findings of its MeSH major terms
    (:func:`common.data.findings_table.mesh_findings`); ``normal`` only when MeSH says ``normal``; a report whose terms
    match no key has an all-zero label. Reports with neither FINDINGS nor IMPRESSION text, or with only ``No
    Indexing`` for MeSH, are skipped. Reports sharing an ``IM-####`` number (the closest the XML has to a patient) are
    connected, and connected reports stay in one split. Writes::

        <out_dir>/datalist.json  {"name": "openi_reports", "findings": [ids], "license": ..., "training": [
            {"id": "CXR1", "text": ..., "label": [0/1 per finding], "findings": [ids], "mesh": [...],
             "entities": silver_entities(text), "group": "IM-0001"}, ...], "validation": [...], "test": [...]}
        <out_dir>/report.json    the returned summary

    Args:
        out_dir: output folder, created when missing.
        tgz: the reports archive; None uses torchxrayvision's copy (:func:`openi_reports_tgz`).
        table_path: the findings table; None uses :data:`common.data.findings_table.DEFAULT_FINDINGS_TABLE`.
        val_fraction: share of the reports for validation, in [0, 1). Default 0.15.
        test_fraction: share for test, in [0, 1); with ``val_fraction`` below 1. Default 0.15.
        seed: seed of the group draw; the split depends on nothing else. Default 0.
        overwrite: replace an existing ``datalist.json``. Default False.

    Returns:
        summary: ``datalist`` and ``report`` (paths), ``source``, ``table``, ``reports`` (read), ``kept``,
        ``skipped`` (``[{"id", "file", "reason"}]``), ``splits`` (reports per split), ``groups`` (distinct ``group``
        values, total and per split), ``positives`` (split -> finding -> reports), ``seed``, ``val_fraction``,
        ``test_fraction``, ``license``.

    Raises:
        FileExistsError: ``datalist.json`` exists and ``overwrite`` is False.
        FileNotFoundError: the archive or the table is missing.
        ValueError: bad fractions or seed, an unreadable archive or table.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} should be in [0, 1), got {value!r}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction should be below 1, got {val_fraction} + {test_fraction}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed should be a non-negative integer, got {seed!r}.")
    out_dir = Path(out_dir)
    datalist_path, report_path = out_dir / "datalist.json", out_dir / "report.json"
    if datalist_path.exists() and not overwrite:
        raise FileExistsError(f"{datalist_path} already exists; pass overwrite=True to replace it.")
    tgz = openi_reports_tgz() if tgz is None else Path(tgz)
    if not tgz.is_file():
        raise FileNotFoundError(f"{tgz}: reports archive not found.")
    table = load_findings_table(table_path)
    findings = table["findings"]

    reports, skipped = _read_reports(tgz)
    skipped = [{"id": "", **s} for s in skipped]
    kept, seen = [], set()
    for report in sorted(reports, key=lambda r: _report_number(r["id"])):
        reason = _skip_reason(report) or (f"duplicate report id {report['id']}" if report["id"] in seen else None)
        seen.add(report["id"])
        if reason:
            skipped.append({"id": report["id"], "file": report["file"], "reason": reason})
        else:
            kept.append(report)

    data = {"name": "openi_reports", "description": f"Indiana University / OpenI chest X-ray reports from {tgz.name}, "
            "MeSH-derived finding labels and silver entities; made by common.data.openi.convert_openi_reports.",
            "findings": findings, "license": table["license"], **{s: [] for s in SPLITS}}
    for report, split in zip(kept, assign_splits(_group_components(kept), val_fraction, test_fraction, seed)):
        positive = mesh_findings(report["mesh"], table)
        data[split].append({
            "id": report["id"], "text": report["text"], "label": [int(f in positive) for f in findings],
            "findings": positive, "mesh": report["mesh"], "entities": silver_entities(report["text"], table),
            "group": report["group"],
        })

    summary = {
        "datalist": str(datalist_path), "report": str(report_path), "source": str(tgz),
        "table": str(Path(DEFAULT_FINDINGS_TABLE if table_path is None else table_path)),
        "reports": len(reports) + sum(1 for s in skipped if not s["id"]), "kept": len(kept), "skipped": skipped,
        "splits": {s: len(data[s]) for s in SPLITS},
        "groups": {"total": len({r["group"] for r in kept}), **{s: len({i["group"] for i in data[s]}) for s in SPLITS}},
        "positives": {s: {f: sum(i["label"][k] for i in data[s]) for k, f in enumerate(findings)} for s in SPLITS},
        "seed": int(seed), "val_fraction": val_fraction, "test_fraction": test_fraction,
        "license": table["license"], "license_urls": sorted({r["license"] for r in kept if r["license"]}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_datalist(data, datalist_path)
    report_path.write_text(json.dumps(summary, indent=4) + "\n")
    return summary
