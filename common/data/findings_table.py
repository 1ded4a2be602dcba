"""The findings table of chest X-ray reports, and what reads report text with it: MeSH terms to finding ids
(:func:`mesh_findings`), NegEx-style negation (:func:`negated`) and silver entity spans (:func:`silver_entities`).

Shared by the OpenI converter (:mod:`common.data.openi`), the report labeler's evaluation
(:mod:`common.engines.report_labeler`) and its keyword baseline (:mod:`common.engines.report_baselines`).

What a finding is lives in one table, ``bundles/cxr_report_labeler/configs/findings.json`` (pass another file to
override it), read by :func:`load_findings_table`, with the keys:

- ``findings``: the ordered finding ids; ``label`` vectors follow this order.
- ``mesh``: MeSH path prefix -> finding id. A key is a term (``"Cardiomegaly"``) or a term with leading
  qualifiers (``"Lung/hypoinflation"``); a MeSH major matches a key when its ``/``-parts start with the key's parts
  (case- and whitespace-insensitive); when several keys match, the longest wins.
- ``keywords``: finding id -> lowercase phrases that mention it in report text.
- ``anatomy``: lowercase anatomy phrases.
- ``vindr``: finding id -> the VinDr-CXR label column it corresponds to (:mod:`common.data.vindr`), or null.
- ``negation_cues``: ``{"pre": [...], "post": [...], "terminators": [...]}`` for :func:`negated` (NegEx style,
  Chapman et al. 2001, https://doi.org/10.1006/jbin.2001.1029).
- ``license``: the reports' licence, copied to the OpenI converter's ``report.json``.

Keys starting with ``_`` are comments and are ignored.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_FINDINGS_TABLE",
    "load_findings_table",
    "mesh_findings",
    "negated",
    "silver_entities",
]

PathLike = str | os.PathLike

# the bundle's table in this repository (a packaged bundle passes its own configs/findings.json)
DEFAULT_FINDINGS_TABLE = Path(__file__).resolve().parents[2] / "bundles/cxr_report_labeler/configs/findings.json"
TABLE_KEYS = ("findings", "mesh", "keywords", "anatomy", "vindr", "negation_cues", "license")
PRE_CUE_WINDOW = 6  # most words between a pre-negation cue and the mention it negates
POST_CUE_WINDOW = 4  # most words between a mention and a post-negation cue

_WORD = re.compile(r"\w+")
# a sentence ends at . ! ? ; followed by a space or the end, or at a line break (FINDINGS and IMPRESSION are joined
# by one); "1.5 cm" does not end one
_SENTENCE_END = re.compile(r"[.!?;](?=\s|$)|\n")
_PHRASE = re.compile(r"\w(?:.*\w)?")  # starts and ends with a word character, so word boundaries are defined


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
