"""Free-text radiology reports as cases: listing them from files, tables and datalists, and reading them safely.

:func:`list_reports` turns what the user points at into case items ``{"report": source, "text": str | None,
"report_id": str}``; :class:`LoadReportd` reads and checks each case's text. A report file is only listed, not read,
so a bad file fails as its own case (through ``ErrorTolerantDataset``) and the others go on; rows of a CSV or JSON
file carry their text in the item and are checked by the same transform.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = [
    "LoadReportd",
    "REPORT_SUFFIXES",
    "list_reports",
    "normalize_report_text",
    "read_report_file",
    "report_id_of",
]

logger = logging.getLogger(__name__)

# files a folder expands to: plain-text reports and OpenI (Indiana University) XML reports
REPORT_SUFFIXES = (".txt", ".xml")
# a file this large is no report (and reading it whole could exhaust memory); checked before reading
MAX_FILE_BYTES = 10 * 1024 * 1024
# above this fraction of control or unassigned characters, valid UTF-8 is still binary data, not a report
MAX_UNPRINTABLE_FRACTION = 0.1
# OpenI report sections that make up the text, in this order
XML_SECTIONS = ("FINDINGS", "IMPRESSION")
ID_COLUMNS = ("report_id", "id")


# ------------------------------------------------------------------------------------------------------- listing
def report_id_of(item: Mapping) -> str:
    """A case's report id: its ``report_id``, else the stem of its source file (``a/r12.txt`` -> ``r12``)."""
    if item.get("report_id") not in (None, ""):
        return str(item["report_id"])
    return Path(str(item.get("report", ""))).stem


def _file_item(path: str | os.PathLike) -> dict:
    path = Path(path).resolve()
    return {"report": str(path), "text": None, "report_id": path.stem}


def _decode(raw: bytes, source: str, what: str = "text") -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{source}: not UTF-8 {what}: byte 0x{raw[e.start]:02x} at byte offset {e.start} cannot be "
                         "decoded; save the file as UTF-8.") from None


def _csv_items(path: Path, column: str) -> list[dict]:
    """One item per row of a CSV file, the text of ``column`` in the item."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found.")
    text = _decode(path.read_bytes(), str(path), "CSV")
    limit = csv.field_size_limit()
    # the default limit (128 kB) would stop the whole file at one long report; long texts are refused per case
    csv.field_size_limit(max(limit, MAX_FILE_BYTES))
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [name.strip() for name in reader.fieldnames or []]
        if not header:
            raise ValueError(f"{path}: empty CSV file (no header row).")
        reader.fieldnames = header
        by_lower = {name.lower(): name for name in reversed(header)}  # first spelling wins
        text_column = column if column in header else by_lower.get(column.lower())
        if text_column is None:
            raise ValueError(f"{path}: no column '{column}' holding the report text; the file has columns {header}. "
                             "Set the report column to one of them.")
        id_column = next((by_lower[c] for c in ID_COLUMNS if c in by_lower), None)
        items = []
        start = reader.line_num + 1
        for row in reader:
            # DictReader counts physical lines: a quoted report spanning lines keeps the row's first line number
            row_id = (row.get(id_column) or "").strip() if id_column else ""
            if row_id:
                items.append({"report": f"{path}:{row_id}", "text": row.get(text_column) or "", "report_id": row_id})
            else:
                items.append({"report": f"{path}:{start}", "text": row.get(text_column) or "",
                              "report_id": f"{path.stem}_{start}"})
            start = reader.line_num + 1
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV file near line {reader.line_num}: {e}.") from None
    finally:
        csv.field_size_limit(limit)
    return items


def _json_entry(entry, index: int, path: Path, where: str) -> dict:
    """An item of a JSON report list: a string is one report's text; a dict has ``text`` and optionally ``id``."""
    if isinstance(entry, str):
        return {"report": f"{path}#{index}", "text": entry, "report_id": f"{path.stem}_{index}"}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("text"), str):
        raise ValueError(f"{path}: entry {index}{where} should be a report text or a dict with a 'text' string, got "
                         f"{str(entry)[:80]!r}.")
    item = {k: v for k, v in entry.items() if k not in ("id", "text")}
    has_id = entry.get("id") not in (None, "")
    item.update({"report": f"{path}#{entry['id'] if has_id else index}", "text": entry["text"],
                 "report_id": str(entry["id"]) if has_id else f"{path.stem}_{index}"})
    return item


def _json_items(path: Path, key: str) -> list[dict]:
    """Items of a JSON file: a list of texts or ``{"id", "text"}`` dicts, or a datalist with split ``key``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found.")
    try:
        data = json.loads(_decode(path.read_bytes(), str(path), "JSON"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    where = ""
    if isinstance(data, Mapping):
        split = next((k for k in (key, "testing", "test") if k in data), None)
        if split is None:
            splits = [k for k, v in data.items() if isinstance(v, list)]
            raise KeyError(f"{path}: no '{key}' split; splits present: {splits}.")
        data, where = data[split], f" of '{split}'"
    if not isinstance(data, list):
        raise ValueError(f"{path}: should hold a list of reports or a datalist of them, got {type(data).__name__}.")
    return [_json_entry(entry, i, path, where) for i, entry in enumerate(data)]


def _folder_items(folder: Path) -> list[dict]:
    files = [p for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in REPORT_SUFFIXES]
    if not files:
        logger.warning("%s: holds no report file (%s)", folder, ", ".join(REPORT_SUFFIXES))
    return [_file_item(p) for p in files]


def _path_items(path: str, column: str, key: str) -> list[dict]:
    if os.path.isdir(path):
        return _folder_items(Path(path))
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return _csv_items(Path(path).resolve(), column)
    if suffix == ".json":
        return _json_items(Path(path).resolve(), key)
    # a missing or unreadable report file is kept: its error is then reported with the others of the run
    return [_file_item(path)]


def list_reports(spec: str | os.PathLike | Sequence, column: str = "report", key: str = "test") -> list[dict]:
    """Report cases ``[{"report": source, "text": str | None, "report_id": str}, ...]`` from files, tables or lists.

    ``spec`` is one of:

    - a report file (``.txt``, or an OpenI ``.xml``): one case, ``text`` None (read by :class:`LoadReportd`);
    - a folder: one case per ``.txt``/``.xml`` file inside, sorted by name (other and hidden files are ignored,
      sub-folders are not searched);
    - a glob pattern: each match as above;
    - a ``.csv`` file: one case per row, the text from ``column`` (exact name, else matched case-insensitively);
      source ``<file>:<row id>`` with the row id from a ``report_id`` or ``id`` column, else the row's line number
      (the header is line 1);
    - a ``.json`` file holding a list of texts or of ``{"id", "text"}`` dicts (source ``<file>#<id or index>``), or
      a datalist whose split ``key`` (else ``"testing"``, ``"test"``) lists such entries; other keys of an entry
      (e.g. labels) are kept in the item;
    - a list of any of these, or of ready items (dicts with ``report`` and/or ``text``).

    ``report_id`` names the case's outputs: the file stem, the row's id, or ``<file stem>_<line or index>`` for rows
    without one.

    Args:
        spec: what to read, as above.
        column: CSV column holding the report text. Default ``"report"``.
        key: datalist split to read. Default ``"test"``.

    Returns:
        One item per report, in the order given.

    Raises:
        FileNotFoundError: a ``.csv`` or ``.json`` file that does not exist (a missing report file is kept as a case).
        ValueError: a CSV without ``column`` (naming the file and its columns), a file that is not UTF-8, JSON that
            does not parse or an entry without text.
        KeyError: a datalist without the split.

    Example::

        list_reports("reports/")  # [{"report": "/abs/reports/r1.txt", "text": None, "report_id": "r1"}, ...]
    """
    if isinstance(spec, Mapping):
        item = dict(spec)
        if "report" not in item and "text" not in item:
            raise ValueError(f"a report item should have 'report' (a file) or 'text', got keys {sorted(item)}.")
        item.setdefault("text", None)
        item.setdefault("report", str(item.get("report_id") or "<in-memory report>"))
        item.setdefault("report_id", report_id_of(item))
        return [item]
    if not isinstance(spec, (str, os.PathLike)):
        return [item for s in spec for item in list_reports(s, column, key)]
    spec = os.path.expanduser(str(spec))
    if glob.has_magic(spec) and not os.path.exists(spec):
        matches = sorted(glob.glob(spec))
        if not matches:
            # not an error here: a workflow is built before its data exists; engines refuse an empty run
            logger.warning("no file matches the pattern %s", spec)
        return [item for m in matches for item in _path_items(m, column, key)]
    return _path_items(spec, column, key)


# ------------------------------------------------------------------------------------------------------- reading
def normalize_report_text(text: str) -> str:
    """One space between words, one line per non-empty line, no leading or trailing blanks.

    Line breaks are kept (a section header such as ``FINDINGS:`` often ends without a full stop), punctuation is
    untouched; ``\\r\\n`` and ``\\r`` become ``\\n``, tabs and other blanks a single space, and control characters
    (already below :data:`MAX_UNPRINTABLE_FRACTION`) a space.

    Example::

        normalize_report_text("  Heart size  normal.\\r\\n\\r\\nNo effusion. ")  # "Heart size normal.\\nNo effusion."
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(" " if c != "\n" and unicodedata.category(c) == "Cc" else c for c in text)
    lines = (" ".join(line.split()) for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _check_text(text: str, source: str, max_chars: int) -> str:
    """The normalised text, or ValueError naming ``source`` and what is wrong with it."""
    if "\x00" in text:
        raise ValueError(f"{source}: holds NUL characters: binary data, not a text report.")
    unprintable = sum(1 for c in text if c not in "\t\n\r\f\v" and unicodedata.category(c) in ("Cc", "Cn", "Co", "Cs"))
    if text and unprintable > MAX_UNPRINTABLE_FRACTION * len(text):
        raise ValueError(f"{source}: {unprintable} of its {len(text)} characters are not printable: binary data, not "
                         "a text report.")
    text = normalize_report_text(text)
    if not text:
        raise ValueError(f"{source}: empty report (no text).")
    if len(text) > max_chars:
        raise ValueError(f"{source}: report is {len(text)} characters long, more than max_chars={max_chars}; "
                         "it is refused rather than cut (raise max_chars if such reports are expected).")
    return text


def _xml_text(raw: bytes, source: str) -> str:
    """FINDINGS and IMPRESSION of an OpenI report (``<AbstractText Label="FINDINGS">``), empty parts left out."""
    try:
        root = ET.fromstring(raw)
    except ET.ParseError as e:
        raise ValueError(f"{source}: not well-formed XML ({e}).") from None
    sections = {}
    for node in root.iter("AbstractText"):
        label = str(node.get("Label", "")).strip().upper()
        if label in XML_SECTIONS and label not in sections:
            sections[label] = " ".join("".join(node.itertext()).split())
    parts = [sections[s] for s in XML_SECTIONS if sections.get(s)]
    if not parts:
        raise ValueError(f"{source}: no FINDINGS or IMPRESSION text (an OpenI report's <AbstractText "
                         "Label=\"FINDINGS\"> or Label=\"IMPRESSION\"); nothing to label.")
    return "\n".join(parts)


def read_report_file(path: str | os.PathLike) -> str:
    """The raw text of a report file: a plain UTF-8 text file, or FINDINGS + newline + IMPRESSION of an OpenI XML.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, a file over :data:`MAX_FILE_BYTES`, binary data (NUL bytes, UTF-16), bytes that are not
            UTF-8 (naming the byte offset), XML that does not parse or has neither section. Each names the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found.")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a report file.")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: file is {size} bytes, too large for a report (at most {MAX_FILE_BYTES}).")
    raw = path.read_bytes()
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ValueError(f"{path}: UTF-16 text; save the report as UTF-8.")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{path}: holds NUL bytes (the first at byte offset {nul}): binary data, not a text report.")
    if path.suffix.lower() == ".xml":
        return _xml_text(raw, str(path))
    return _decode(raw, str(path))


class LoadReportd(MapTransform):
    """Read and check each case's report text, so a model only ever sees a usable report.

    A case from a file (``text`` None) is read with :func:`read_report_file` (``source_key`` holds the path); a case
    from a table row already holds its text. Either way the text is refused, with a ``ValueError`` naming the source
    and the problem, when it is empty or blank, binary (NUL characters, or more than
    :data:`MAX_UNPRINTABLE_FRACTION` control characters), or longer than ``max_chars`` characters after whitespace is
    normalised (a 100 kB paste is refused, never cut silently); files also when missing (``FileNotFoundError``), not
    UTF-8 (naming the byte offset), or OpenI XML without FINDINGS and IMPRESSION. The kept text is normalised by
    :func:`normalize_report_text`; entity spans found later index into it. Sets ``id_key`` (the file stem or row id)
    when absent.

    Args:
        keys: key of the text. Default ``"text"``.
        max_chars: longest accepted report, in characters. Default 20000.
        source_key: key of the source (the file path for file cases). Default ``"report"``.
        id_key: key of the report id. Default ``"report_id"``.
        allow_missing_keys: skip absent keys.

    Example::

        LoadReportd()({"report": "/data/r1.txt", "text": None})  # {"report": ..., "text": "...", "report_id": "r1"}
    """

    def __init__(
        self,
        keys: KeysCollection = "text",
        max_chars: int = 20000,
        source_key: str = "report",
        id_key: str = "report_id",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
            raise ValueError(f"max_chars should be a positive integer, got {max_chars!r}.")
        self.max_chars = max_chars
        self.source_key = source_key
        self.id_key = id_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        source = str(d.get(self.source_key, "<in-memory report>"))
        for key in self.key_iterator(d):
            text = d[key]
            if text is None:
                text = read_report_file(source)
            elif not isinstance(text, str):
                raise ValueError(f"{source}: {key} should be text, got {type(text).__name__}.")
            d[key] = _check_text(text, source, self.max_chars)
        if d.get(self.id_key) in (None, ""):
            d[self.id_key] = report_id_of(d)
        return d
