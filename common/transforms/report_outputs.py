"""Per-report outputs of the report labeler: a JSON file per report, and one VinDr-style labels CSV per run."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import MapTransform, Transform

from common.bundle.args import as_bool
from common.data.reports import report_id_of
from common.data.vindr import VINDR_GLOBAL_LABELS, VINDR_LOCAL_LABELS
from common.visualize.preview import save_report_preview

__all__ = ["CheckReportOutputsd", "ReportLabelsCSVWriter", "SaveReportLabelsd", "report_output_path"]

logger = logging.getLogger(__name__)

VINDR_COLUMNS = VINDR_LOCAL_LABELS + VINDR_GLOBAL_LABELS
NO_FINDING = "No finding"
# prefix of the per-finding columns of labels.csv: finding ids such as "cardiomegaly" would otherwise match the VinDr
# column "Cardiomegaly" (VinDr readers match column names case-insensitively) and be read in its place
FINDING_COLUMN_PREFIX = "finding:"


def report_output_path(output_dir: str | os.PathLike, report_id: str) -> Path:
    """``<output_dir>/<report_id>.json``, with characters other than letters, digits, ``.``, ``_`` and ``-``
    replaced by ``_`` and leading dots dropped, so no id (``../x``, ``a/b``) writes outside ``output_dir``.

    Ids are used whole (``1.2.840`` -> ``1.2.840.json``): unlike image file names they have no extension to strip.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", str(report_id)).lstrip(".") or "_"
    return Path(output_dir) / f"{name}.json"


def _written_for(path: Path) -> str:
    """`` (written for <source>)`` when ``path`` is an output of this module naming its report, else ``""``."""
    try:
        source = json.loads(path.read_text(encoding="utf-8")).get("report")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (written for {source})" if source else ""


class CheckReportOutputsd(MapTransform):
    """Refuse a report whose output JSON already exists, unless ``overwrite`` is set: ``CheckOutputsd`` for reports.

    Placed first in preprocessing (the items of ``list_reports`` already hold ``report_id``), so the refusal is
    reported per case (a ``FileExistsError``, which ``ErrorTolerantDataset`` lists as skipped) before any work, and
    nothing a user has is replaced silently. ``CheckOutputsd`` itself names outputs after the source file and strips
    what looks like an extension, which would merge ids such as ``1.2.3`` and ``1.2.4``.

    Args:
        output_dir: output folder.
        overwrite: allow replacing existing outputs. Default False.
        keys: key of the report id. Default ``"report_id"``.
        source_key: key of the source, named in the refusal. Default ``"report"``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        overwrite: bool = False,
        keys: str = "report_id",
        source_key: str = "report",
    ) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.output_dir = output_dir
        self.overwrite = as_bool(overwrite, "overwrite")
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        if self.overwrite:
            return d
        report_id = d.get(self.keys[0]) or report_id_of({"report": d.get(self.source_key)})
        path = report_output_path(self.output_dir, str(report_id))
        if path.exists():
            raise FileExistsError(f"{d.get(self.source_key)}: output already exists ({path}{_written_for(path)}); "
                                  "set overwrite to true to replace it.")
        return d


def _vector(value, n: int, name: str, source: str) -> np.ndarray:
    """``value`` (tensor, array, list or one number) as ``(n,)`` finite floats, or ValueError naming ``source``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    array = np.asarray(value, dtype=float)
    if array.ndim == 0:
        array = np.full(n, float(array))
    array = array.reshape(-1) if array.size == n else array
    if array.shape != (n,):
        raise ValueError(f"{source}: {name} has shape {list(array.shape)}, expected ({n},): one value per finding.")
    if not np.isfinite(array).all():
        raise ValueError(f"{source}: {name} has non-finite values (NaN or Inf): {array.tolist()}.")
    return array


def _entities(entities, text: str, source: str) -> list[dict]:
    """Entities with their text, checked to be spans of ``text``."""
    out = []
    for i, e in enumerate(entities or []):
        start, end = int(e["start"]), int(e["end"])
        if not 0 <= start <= end <= len(text):
            raise ValueError(f"{source}: entity {i} spans characters [{start}, {end}), outside the report's "
                             f"{len(text)} characters.")
        out.append({"text": text[start:end], "start": start, "end": end, "type": str(e["type"]),
                    "negated": bool(e.get("negated", False))})
    return out


def _write_new(path: Path, content: str) -> None:
    """Write through a temporary file in the same folder, so a failure never leaves half a file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SaveReportLabelsd(Transform):
    """Write ``<output_dir>/<report_id>.json`` for one labelled report and add its ``decisions``.

    Reads, from the case dict (batch and engine output merged, one case after decollation): ``report_id``,
    ``report`` (the source), ``text``, ``probs`` ``(C,)`` (tensor, array or list), ``thresholds`` ``(C,)`` or one
    number, ``entities`` (optional; ``[{"start", "end", "type", "negated"}, ...]``, character spans into ``text``)
    and ``evidence`` (optional; ``C`` sentences, ``""`` where none). A finding is positive when its probability is at
    least its threshold. Writes::

        {"report": source, "text": text,
         "findings": {name: {"probability": 0.8123, "positive": true, "threshold": 0.5, "evidence": "..."}, ...},
         "positive": [names of positive findings],
         "entities": [{"text": text[start:end], "start": 12, "end": 24, "type": "finding", "negated": false}, ...]}

    (probabilities and thresholds rounded to 4 decimals) and returns the case with ``decisions``: an ``int64``
    array ``(C,)`` of 0/1 in ``finding_names`` order.

    An existing file is refused (``FileExistsError``) unless ``overwrite``; a second report of the run with the same
    id (output name) is refused (``ValueError``) naming the first, whatever ``overwrite`` says. Put
    :class:`CheckReportOutputsd` first in preprocessing so existing outputs are skipped before any work.

    With ``preview``, ``<report_id>.png`` beside it shows the text with its entities marked and the probabilities
    against the thresholds (:func:`common.visualize.save_report_preview`).

    Args:
        output_dir: output folder.
        finding_names: the ``C`` finding ids, in the order of ``probs``.
        overwrite: allow replacing outputs of earlier runs. Default False.
        preview: also write the PNG preview. Default True.
    """

    def __init__(self, output_dir: str | os.PathLike, finding_names: Sequence[str], overwrite: bool = False,
                 preview: bool = True) -> None:
        names = [finding_names] if isinstance(finding_names, str) else list(finding_names)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"finding_names should be distinct non-empty strings, got {finding_names!r}.")
        self.output_dir = output_dir
        self.finding_names = names
        self.overwrite = as_bool(overwrite, "overwrite")
        self.preview = as_bool(preview, "preview")
        self._written: dict[Path, str] = {}  # output -> source, for this object's life (one run)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        source = str(d.get("report", "<in-memory report>"))
        text = d.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{source}: text should be the report's text, got {type(text).__name__}.")
        n = len(self.finding_names)
        probs = _vector(d.get("probs"), n, "probs", source)
        thresholds = _vector(d.get("thresholds"), n, "thresholds", source)
        evidence = [""] * n if d.get("evidence") is None else list(d["evidence"])
        if len(evidence) != n:
            raise ValueError(f"{source}: evidence has {len(evidence)} sentences, expected {n}: one per finding.")
        positive = probs >= thresholds
        result = {
            "report": source,
            "text": text,
            "findings": {
                name: {"probability": round(float(p), 4), "positive": bool(y), "threshold": round(float(t), 4),
                       "evidence": str(e or "")}
                for name, p, t, y, e in zip(self.finding_names, probs, thresholds, positive, evidence)
            },
            "positive": [name for name, y in zip(self.finding_names, positive) if y],
            "entities": _entities(d.get("entities"), text, source),
        }
        path = report_output_path(self.output_dir, report_id_of(d))
        earlier = self._written.get(path)
        if earlier is not None and earlier != source:
            raise ValueError(f"{source}: its output {path} is that of {earlier} in this run (same report id); give the "
                             "reports distinct ids or run them into different output folders.")
        png = path.with_suffix(".png")
        if path.exists() and not self.overwrite:
            raise FileExistsError(f"{source}: output already exists ({path}{_written_for(path)}); set overwrite to "
                                  "true to replace it.")
        if self.preview and png.exists() and not self.overwrite:
            raise FileExistsError(f"{source}: output already exists ({png}); set overwrite to true to replace it.")
        _write_new(path, json.dumps(result, indent=4, ensure_ascii=False, allow_nan=False) + "\n")
        if self.preview:
            save_report_preview(text, png, self.finding_names, probs, thresholds, result["entities"],
                                title=f"{report_id_of(d)}: {', '.join(result['positive']) or 'no finding positive'}",
                                overwrite=True)
        self._written[path] = source
        d["decisions"] = positive.astype(np.int64)
        return d


class ReportLabelsCSVWriter:
    """Write the run's decisions as one ``labels.csv`` shaped like VinDr-CXR's ``image_labels_*.csv``.

    Columns: ``image_id`` (the report id), ``rad_id`` (``rad_id``), the 28 VinDr labels (:data:`VINDR_LOCAL_LABELS`
    then :data:`VINDR_GLOBAL_LABELS`; a label is 1 when a positive finding maps to it in ``vindr_map``, "No finding"
    is 1 when no finding is positive other than those mapped to it, e.g. ``normal``), then ``finding:<id>`` per
    finding (0/1; prefixed because VinDr readers match columns case-insensitively and ``cardiomegaly`` would be read
    as ``Cardiomegaly``). The file reads back with
    ``common.data.vindr.convert_vindr_classification``.

    Collects ``decisions`` ``(C,)`` (added by :class:`SaveReportLabelsd`) and ``report_id`` of each completed case at
    ``ITERATION_COMPLETED`` (failed and skipped cases have no output and are left out) and writes at ``COMPLETED``; a
    run that decided no case writes nothing. An earlier ``labels.csv`` in the folder is kept, renamed
    ``labels_<its time>.csv``.

    Args:
        output_dir: folder of the CSV.
        finding_names: the finding ids, in the order of ``decisions``.
        vindr_map: ``{finding id: VinDr label or None}``; findings left out map to None.
        filename: CSV name. Default ``labels.csv``.
        rad_id: value of the ``rad_id`` column. Default ``"cxr_report_labeler"``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        finding_names: Sequence[str],
        vindr_map: Mapping[str, str | None],
        filename: str = "labels.csv",
        rad_id: str = "cxr_report_labeler",
    ) -> None:
        self.finding_names = [finding_names] if isinstance(finding_names, str) else list(finding_names)
        unknown = [k for k in vindr_map if k not in self.finding_names]
        if unknown:
            raise ValueError(f"vindr_map names findings {unknown} that are not in finding_names {self.finding_names}.")
        targets = [v for v in vindr_map.values() if v is not None and v not in VINDR_COLUMNS]
        if targets:
            raise ValueError(f"vindr_map maps to {targets}, which are not VinDr labels; "
                             f"expected one of {list(VINDR_COLUMNS)} or null.")
        self.vindr_map = {name: vindr_map.get(name) for name in self.finding_names}
        self.path = Path(output_dir) / filename
        self.rad_id = rad_id
        self.rows: list[tuple[str, np.ndarray]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        outputs, batches = engine.state.output, engine.state.batch
        if outputs is None:  # a failed or skipped case
            return
        if isinstance(outputs, Mapping):
            outputs, batches = [outputs], [batches]
        if not isinstance(batches, list):
            batches = [None] * len(outputs)
        for output, batch in zip(outputs, batches):
            case = {**(batch if isinstance(batch, Mapping) else {}), **(output if isinstance(output, Mapping) else {})}
            if "decisions" not in case:
                logger.warning("%s: no decisions in the engine output (is SaveReportLabelsd in postprocessing?); "
                               "left out of %s", case.get("report", "a case"), self.path.name)
                continue
            decisions = np.asarray(torch.as_tensor(case["decisions"]).detach().cpu()).reshape(-1).astype(bool)
            if decisions.size != len(self.finding_names):
                raise ValueError(f"{case.get('report')}: {decisions.size} decisions but {len(self.finding_names)} "
                                 "findings are configured for labels.csv.")
            self.rows.append((report_id_of(case), decisions))

    def row(self, report_id: str, decisions: np.ndarray) -> list:
        """One CSV row: ``image_id``, ``rad_id``, the 28 VinDr labels and the findings, as 0/1."""
        positive = {self.vindr_map[n] for n, y in zip(self.finding_names, decisions) if y}
        # "No finding" is derived, whatever maps to it: 1 exactly when no finding outside it is positive
        abnormal = any(y and self.vindr_map[n] != NO_FINDING for n, y in zip(self.finding_names, decisions))
        vindr = [int(c in positive) for c in VINDR_COLUMNS[:-1]] + [int(not abnormal)]
        return [report_id, self.rad_id, *vindr, *(int(y) for y in decisions)]

    def __call__(self, engine: Engine | None = None) -> Path | None:
        if not self.rows:
            logger.info("no case decided in this run; %s not written", self.path)
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from common.handlers.case_report import keep_earlier  # here: common.handlers imports this package

        keep_earlier(self.path)
        buffer = [["image_id", "rad_id", *VINDR_COLUMNS, *(FINDING_COLUMN_PREFIX + n for n in self.finding_names)]]
        buffer += [self.row(report_id, decisions) for report_id, decisions in self.rows]
        with open(self.path, "w", encoding="utf-8", newline="") as f:
            csv.writer(f).writerows(buffer)
        logger.info("labels of %d report(s) in %s", len(self.rows), self.path)
        return self.path
