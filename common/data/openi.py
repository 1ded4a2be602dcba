"""Indiana University / OpenI chest X-ray reports: parser, MeSH-to-finding labels, silver entities and a group split.

The collection (Demner-Fushman et al. 2016, https://doi.org/10.1093/jamia/ocv080) ships with torchxrayvision as
``torchxrayvision/data/NLMCXR_reports.tgz``: 3,955 files ``ecgen-radiology/<n>.xml``, licensed CC BY-NC-ND 4.0.
Each XML holds the report sections (``<AbstractText Label="FINDINGS">``, ``"IMPRESSION"``, also ``"COMPARISON"``
and ``"INDICATION"``), the indexers' MeSH terms (``<MeSH><major>Opacity/lung/base/left/mild</major>...``: the
first ``/``-part is the term, the rest qualifiers; ``normal`` for a normal study, ``No Indexing`` when none was
made), ``<uId id="CXR1"/>`` and 0..n ``<parentImage id="CXR1_1_IM-0001-3001">``. Anonymisation left tokens such as
``XXXX`` in the text; they are kept. The XML has no patient id; the ``IM-####`` number of the images is the closest
thing to one (it repeats across reports), so splits keep every ``IM-####`` number on one side.

What a finding is lives in one table, ``bundles/cxr_report_labeler/configs/findings.json`` (pass another file to
override it), with the keys:

- ``findings``: the ordered finding ids; ``label`` vectors follow this order.
- ``mesh``: MeSH path prefix -> finding id. A key is a term (``"Cardiomegaly"``) or a term with leading
  qualifiers (``"Lung/hypoinflation"``); a MeSH major matches a key when its ``/``-parts start with the key's parts
  (case- and whitespace-insensitive); when several keys match, the longest wins.
- ``keywords``: finding id -> lowercase phrases that mention it in report text.
- ``anatomy``: lowercase anatomy phrases.
- ``vindr``: finding id -> the VinDr-CXR label column it corresponds to (:mod:`common.data.vindr`), or null.
- ``negation_cues``: ``{"pre": [...], "post": [...], "terminators": [...]}`` for :func:`negated` (NegEx style,
  Chapman et al. 2001, https://doi.org/10.1006/jbin.2001.1029).
- ``license``: the reports' licence, copied to ``report.json``.

Keys starting with ``_`` are comments and are ignored.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_FINDINGS_TABLE",
    "SPLITS",
    "convert_openi_reports",
    "load_findings_table",
    "mesh_findings",
    "negated",
    "openi_reports_tgz",
    "parse_openi_report",
    "silver_entities",
]

PathLike = str | os.PathLike

# the bundle's table in this repository (a packaged bundle passes its own configs/findings.json)
DEFAULT_FINDINGS_TABLE = Path(__file__).resolve().parents[2] / "bundles/cxr_report_labeler/configs/findings.json"
SPLITS = ("training", "validation", "test")
TABLE_KEYS = ("findings", "mesh", "keywords", "anatomy", "vindr", "negation_cues", "license")
PRE_CUE_WINDOW = 6  # most words between a pre-negation cue and the mention it negates
POST_CUE_WINDOW = 4  # most words between a mention and a post-negation cue

_WORD = re.compile(r"\w+")
# a sentence ends at . ! ? ; followed by a space or the end, or at a line break (FINDINGS and IMPRESSION are joined
# by one); "1.5 cm" does not end one
_SENTENCE_END = re.compile(r"[.!?;](?=\s|$)|\n")
_PHRASE = re.compile(r"\w(?:.*\w)?")  # starts and ends with a word character, so word boundaries are defined
_IMAGE_NUMBER = re.compile(r"IM-\d+")


# ------------------------------------------------------------------------------------------------ the findings table
def _phrase_list(value, where: str, path: Path) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"{path}: {where} should be a list of phrases, got {type(value).__name__}.")
    for phrase in value:
        if not isinstance(phrase, str) or phrase != phrase.lower() or not _PHRASE.fullmatch(phrase):
            raise ValueError(
                f"{path}: {where} has {phrase!r}; phrases should be lowercase strings that start and end with a "
                "letter or digit."
            )
    return value


def _known_finding(finding, where: str, findings: Sequence[str], path: Path) -> None:
    if finding not in findings:
        raise ValueError(f"{path}: {where} names unknown finding {finding!r}; findings are {list(findings)}.")


def load_findings_table(path: PathLike | None = None) -> dict:
    """Read and check the findings table (MeSH mapping, keyword and anatomy lexicons, negation cues).

    Args:
        path: the JSON file; None reads :data:`DEFAULT_FINDINGS_TABLE`, the ``cxr_report_labeler`` bundle's
            ``configs/findings.json``.

    Returns:
        the table as a dict with the keys ``findings, mesh, keywords, anatomy, vindr, negation_cues, license``
        (module docstring), ``_``-prefixed comment keys dropped.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not JSON, a key is missing or unknown, a finding id is unknown or repeated, a phrase
            is not lowercase or is listed for two findings, a VinDr label is not a VinDr-CXR column; the message names
            the file and the entry.
    """
    from common.data.vindr import VINDR_GLOBAL_LABELS, VINDR_LOCAL_LABELS

    path = Path(DEFAULT_FINDINGS_TABLE if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: findings table not found.")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: should hold a JSON object, got {type(raw).__name__}.")
    table = {k: v for k, v in raw.items() if not k.startswith("_")}
    missing, unknown = [k for k in TABLE_KEYS if k not in table], sorted(set(table) - set(TABLE_KEYS))
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {missing}, unknown keys {unknown}; expected {list(TABLE_KEYS)}.")

    findings = table["findings"]
    if not isinstance(findings, list) or not findings or not all(isinstance(f, str) and f for f in findings):
        raise ValueError(f"{path}: 'findings' should be a non-empty list of ids, got {findings!r}.")
    repeated = sorted(f for f, n in Counter(findings).items() if n > 1)
    if repeated:
        raise ValueError(f"{path}: 'findings' repeats {repeated}.")
    for name in ("mesh", "keywords", "vindr"):
        if not isinstance(table[name], dict):
            raise ValueError(f"{path}: {name!r} should be an object, got {type(table[name]).__name__}.")
    for key, finding in table["mesh"].items():
        if not _mesh_parts(key):
            raise ValueError(f"{path}: 'mesh' has an empty key {key!r}.")
        _known_finding(finding, f"'mesh' entry {key!r}", findings, path)
    owner: dict[str, str] = {}
    for finding, phrases in table["keywords"].items():
        _known_finding(finding, f"'keywords' key {finding!r}", findings, path)
        for phrase in _phrase_list(phrases, f"'keywords'[{finding!r}]", path):
            if owner.setdefault(phrase, finding) != finding:
                raise ValueError(f"{path}: keyword {phrase!r} is listed for both {owner[phrase]!r} and {finding!r}.")
    for phrase in _phrase_list(table["anatomy"], "'anatomy'", path):
        if phrase in owner:
            raise ValueError(f"{path}: anatomy phrase {phrase!r} is also a keyword of {owner[phrase]!r}.")
    vindr_labels = VINDR_LOCAL_LABELS + VINDR_GLOBAL_LABELS
    for finding, label in table["vindr"].items():
        _known_finding(finding, f"'vindr' key {finding!r}", findings, path)
        if label is not None and label not in vindr_labels:
            raise ValueError(f"{path}: 'vindr'[{finding!r}] is {label!r}, not a VinDr-CXR label {list(vindr_labels)}.")
    cues = table["negation_cues"]
    if not isinstance(cues, dict) or sorted(cues) != ["post", "pre", "terminators"]:
        raise ValueError(f"{path}: 'negation_cues' should have exactly the keys pre, post, terminators, got {cues!r}.")
    for name, phrases in cues.items():
        _phrase_list(phrases, f"'negation_cues'[{name!r}]", path)
    if not isinstance(table["license"], str):
        raise ValueError(f"{path}: 'license' should be a string, got {table['license']!r}.")
    return table


def _mesh_parts(term: str) -> tuple[str, ...]:
    """``"Thoracic  Vertebrae/Degenerative "`` -> ``("thoracic vertebrae", "degenerative")``; empty parts dropped."""
    return tuple(p for p in (" ".join(part.split()).lower() for part in term.split("/")) if p)


def mesh_findings(mesh: Sequence[str], table: Mapping) -> list[str]:
    """Finding ids of a report's MeSH major terms, in table order.

    Args:
        mesh: MeSH major strings such as ``["Opacity/lung/base/left/mild", "Cardiomegaly/mild"]``.
        table: a findings table from :func:`load_findings_table`.

    Returns:
        the findings whose ``mesh`` keys match a term (a term matches a key when its ``/``-parts start with the key's
        parts, case-insensitive; the longest matching key decides); terms matching no key add nothing.

    Example:
        >>> mesh_findings(["Lung/hypoinflation", "Calcified Granuloma/lung/upper lobe"], load_findings_table())
        ['calcified_granuloma', 'hypoinflation']
    """
    keys = sorted(((_mesh_parts(k), f) for k, f in table["mesh"].items()), key=lambda kf: -len(kf[0]))
    found = set()
    for term in mesh:
        parts = _mesh_parts(term)
        for key, finding in keys:
            if parts[: len(key)] == key:
                found.add(finding)
                break
    return [f for f in table["findings"] if f in found]


# ------------------------------------------------------------------------------------------------ negation, entities
def _alternation(phrases: Sequence[str]) -> str:
    """Regex matching any of ``phrases`` as whole words, any whitespace between words, longest phrase first."""
    ordered = sorted(set(phrases), key=lambda p: (-len(p), p))
    return r"\b(?:" + "|".join(r"\s+".join(map(re.escape, p.split())) for p in ordered) + r")\b"


@functools.lru_cache(maxsize=16)
def _cue_patterns(pre: tuple, post: tuple, terminators: tuple) -> tuple:
    never = re.compile(r"(?!)")  # an empty cue list matches nothing
    return tuple(re.compile(_alternation(c), re.IGNORECASE) if c else never for c in (pre, post, terminators))


def negated(
    text: str, start: int, end: int, cues: Mapping[str, Sequence[str]], pre_window: int = PRE_CUE_WINDOW,
    post_window: int = POST_CUE_WINDOW,
) -> bool:
    """Whether the mention ``text[start:end]`` is negated, NegEx style.

    A mention is negated when, within its sentence, (a) a ``pre`` cue ends at most ``pre_window`` words before it
    (that many words in between) with no ``terminators`` phrase in between, or (b) a ``post`` cue starts at most
    ``post_window`` words after it with no terminator in between. Cues match whole words, case-insensitively, any
    whitespace between their words. A sentence ends at ``. ! ? ;`` followed by a space or the end of the text, or at
    a line break.

    Args:
        text: the report text.
        start: first character of the mention.
        end: one past its last character.
        cues: ``{"pre": [...], "post": [...], "terminators": [...]}``, e.g. a table's ``negation_cues``.
        pre_window: most words between a pre cue and the mention. Default 6.
        post_window: most words between the mention and a post cue. Default 4.

    Returns:
        True when negated.

    Raises:
        ValueError: ``0 <= start < end <= len(text)`` does not hold, or a window is negative.

    Example:
        >>> cues = load_findings_table()["negation_cues"]
        >>> negated("No pleural effusion.", 3, 19, cues), negated("Effusion is not seen.", 0, 8, cues)
        (True, True)
    """
    if not 0 <= start < end <= len(text):
        raise ValueError(f"start and end should satisfy 0 <= start < end <= {len(text)}, got {start}, {end}.")
    if pre_window < 0 or post_window < 0:
        raise ValueError(f"pre_window and post_window should be >= 0, got {pre_window}, {post_window}.")
    pre, post, terminators = _cue_patterns(tuple(cues["pre"]), tuple(cues["post"]), tuple(cues["terminators"]))
    sentence_start = max((m.end() for m in _SENTENCE_END.finditer(text, 0, start)), default=0)
    following = _SENTENCE_END.search(text, end)
    before, after = text[sentence_start:start], text[end: following.start() if following else len(text)]
    for cue in pre.finditer(before):
        gap = before[cue.end():]
        if len(_WORD.findall(gap)) <= pre_window and not terminators.search(gap):
            return True
    for cue in post.finditer(after):
        gap = after[: cue.start()]
        if len(_WORD.findall(gap)) <= post_window and not terminators.search(gap):
            return True
    return False


@functools.lru_cache(maxsize=8)
def _lexicon(key: str) -> dict[str, list[tuple[re.Pattern, str, str | None]]]:
    """First word -> ``(pattern, type, finding)`` of the phrases starting with it, longest phrase first."""
    table = json.loads(key)
    phrases: dict[str, tuple[str, str | None]] = {}
    for finding, words in table["keywords"].items():
        phrases.update({p: ("FINDING", finding) for p in words})
    for term, finding in table["mesh"].items():
        # a MeSH term names its finding only when it has no qualifier ("Lung/hypoinflation" is not "lung"), and
        # "normal" alone is mostly "heart size is normal", not a normal study
        name = " ".join(term.split()).lower()
        if "/" not in term and finding != "normal" and _PHRASE.fullmatch(name):
            phrases.setdefault(name, ("FINDING", finding))
    for p in table["anatomy"]:
        phrases.setdefault(p, ("ANATOMY", None))
    index: dict[str, list] = {}
    for phrase in sorted(phrases, key=lambda p: (-len(p), p)):
        pattern = re.compile(r"\s+".join(map(re.escape, phrase.split())) + r"\b", re.IGNORECASE)
        index.setdefault(_WORD.match(phrase).group().lower(), []).append((pattern, *phrases[phrase]))
    return index


def silver_entities(text: str, table: Mapping) -> list[dict]:
    """Silver-standard entity spans of a report from the table's lexicons: dictionary matches, not annotations.

    FINDING phrases are the ``keywords`` and the unqualified ``mesh`` terms other than ``normal``, lowercased
    ("calcified granuloma"); ANATOMY phrases are ``anatomy``. Phrases match whole words, case-insensitively, any
    whitespace between words. Among overlapping matches the longest wins (then the earliest), so "enlarged cardiac
    silhouette" is one FINDING rather than an ANATOMY inside one. FINDING spans carry :func:`negated` with the
    table's ``negation_cues``; ANATOMY spans are never negated. Lexicon matching misses paraphrases and mislabels
    homonyms; use these spans as weak labels or features, and measure against human annotation before trusting them.

    Args:
        text: the report text.
        table: a findings table from :func:`load_findings_table`.

    Returns:
        ``[{"start": int, "end": int, "type": "FINDING" | "ANATOMY", "negated": bool, "finding": id | None}, ...]``,
        non-overlapping, sorted by ``start``; ``text[start:end]`` is the mention.

    Example:
        >>> [(e["start"], e["end"], e["type"], e["negated"]) for e in silver_entities("No left effusion.", table)]
        [(8, 16, 'FINDING', True)]
    """
    key = json.dumps({k: table[k] for k in ("keywords", "mesh", "anatomy")}, sort_keys=True)
    index = _lexicon(key)
    candidates = []
    for word in _WORD.finditer(text):
        for pattern, kind, finding in index.get(word.group().lower(), ()):
            match = pattern.match(text, word.start())
            if match:
                candidates.append((match.start(), match.end(), kind, finding))
    taken = np.zeros(len(text) + 1, dtype=bool)
    spans = []
    for start, end, kind, finding in sorted(candidates, key=lambda c: (c[0] - c[1], c[0])):
        if not taken[start:end].any():
            taken[start:end] = True
            spans.append((start, end, kind, finding))
    cues = table["negation_cues"]
    return [
        {
            "start": start, "end": end, "type": kind,
            "negated": kind == "FINDING" and negated(text, start, end, cues), "finding": finding,
        }
        for start, end, kind, finding in sorted(spans)
    ]


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


def openi_reports_tgz() -> Path:
    """Path of ``NLMCXR_reports.tgz`` inside the installed torchxrayvision package.

    Raises:
        FileNotFoundError: torchxrayvision is not installed, or its copy lacks the file.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("torchxrayvision is not installed; it ships NLMCXR_reports.tgz (pass tgz=...).")
    path = Path(spec.origin).parent / "data" / "NLMCXR_reports.tgz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found in the installed torchxrayvision; pass tgz=... .")
    return path


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


def _assign_splits(components: Sequence[str], val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """Split name per report: whole components, drawn in a seeded order, fill test then validation to
    ``round(n * fraction)`` reports; the rest is training."""
    sizes = Counter(components)
    order = sorted(sizes)
    targets = {"test": round(len(components) * test_fraction), "validation": round(len(components) * val_fraction)}
    counts, split_of = {"test": 0, "validation": 0}, {}
    for i in np.random.default_rng(seed).permutation(len(order)):
        split = next((s for s in ("test", "validation") if counts[s] < targets[s]), "training")
        split_of[order[i]] = split
        if split != "training":
            counts[split] += sizes[order[i]]
    return [split_of[c] for c in components]


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

    The target of a report is the findings of its MeSH major terms (:func:`mesh_findings`); ``normal`` only when
    MeSH says ``normal``; a report whose terms match no key has an all-zero label. Reports with neither FINDINGS nor
    IMPRESSION text, or with only ``No Indexing`` for MeSH, are skipped. Reports sharing an ``IM-####`` number (the
    closest the XML has to a patient) are connected, and connected reports stay in one split. Writes::

        <out_dir>/datalist.json  {"name": "openi_reports", "findings": [ids], "license": ..., "training": [
            {"id": "CXR1", "text": ..., "label": [0/1 per finding], "findings": [ids], "mesh": [...],
             "entities": silver_entities(text), "group": "IM-0001"}, ...], "validation": [...], "test": [...]}
        <out_dir>/report.json    the returned summary

    Args:
        out_dir: output folder, created when missing.
        tgz: the reports archive; None uses torchxrayvision's copy (:func:`openi_reports_tgz`).
        table_path: the findings table; None uses :data:`DEFAULT_FINDINGS_TABLE`.
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
    for report, split in zip(kept, _assign_splits(_group_components(kept), val_fraction, test_fraction, seed)):
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
