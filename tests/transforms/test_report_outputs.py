from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from common.data.reports import LoadReportd, list_reports
from common.data.robust import ERROR_KEY, SKIPPED_KEY, ErrorTolerantDataset
from common.data.vindr import VINDR_GLOBAL_LABELS, VINDR_LOCAL_LABELS, convert_vindr_classification
from common.transforms.report_outputs import (
    CheckReportOutputsd,
    ReportLabelsCSVWriter,
    SaveReportLabelsd,
    report_output_path,
)

NAMES = ["cardiomegaly", "pleural_effusion", "pneumothorax", "support_device"]
VINDR_MAP = {"cardiomegaly": "Cardiomegaly", "pleural_effusion": "Pleural effusion", "pneumothorax": "Pneumothorax",
             "support_device": None}
TEXT = "Enlarged heart. No pneumothorax. Left effusion."


def _case(report_id="r1", source="/data/r1.txt", **kw):
    case = {"report_id": report_id, "report": source, "text": TEXT,
            "probs": torch.tensor([0.812345, 0.3, 0.5, 0.1]), "thresholds": np.array([0.5, 0.4, 0.5, 0.5]),
            "entities": [{"start": 0, "end": 15, "type": "finding", "negated": False},
                         {"start": 19, "end": 31, "type": "finding", "negated": torch.tensor(True)}],
            "evidence": ["Enlarged heart.", "", "No pneumothorax.", ""]}
    case.update(kw)
    return case


# case overrides -> words of the ValueError
ILL_CASES = [
    [{"probs": [0.1, 0.2]}, "probs has shape [2], expected (4,)"],
    [{"probs": [0.1, float("nan"), 0.2, 0.3]}, "probs has non-finite values"],
    [{"thresholds": [0.5] * 3}, "thresholds has shape [3]"],
    [{"evidence": ["a"]}, "evidence has 1 sentences, expected 4"],
    [{"entities": [{"start": 40, "end": 60, "type": "finding"}]}, "entity 0 spans characters [40, 60)"],
    [{"text": None}, "text should be the report's text"],
]


def test_save_report_labels(tmp_path):
    out = SaveReportLabelsd(tmp_path, NAMES)(_case())
    assert out["decisions"].tolist() == [1, 0, 1, 0] and out["decisions"].dtype == np.int64
    saved = json.loads((tmp_path / "r1.json").read_text())
    assert saved == {
        "report": "/data/r1.txt",
        "text": TEXT,
        "findings": {
            "cardiomegaly": {"probability": 0.8123, "positive": True, "threshold": 0.5, "evidence": "Enlarged heart."},
            "pleural_effusion": {"probability": 0.3, "positive": False, "threshold": 0.4, "evidence": ""},
            # at the threshold counts as positive (p >= t)
            "pneumothorax": {"probability": 0.5, "positive": True, "threshold": 0.5, "evidence": "No pneumothorax."},
            "support_device": {"probability": 0.1, "positive": False, "threshold": 0.5, "evidence": ""},
        },
        "positive": ["cardiomegaly", "pneumothorax"],
        "entities": [{"text": "Enlarged heart.", "start": 0, "end": 15, "type": "finding", "negated": False},
                     {"text": "pneumothorax", "start": 19, "end": 31, "type": "finding", "negated": True}],
    }


@pytest.mark.parametrize("override, words", ILL_CASES)
def test_save_report_labels_refuses(tmp_path, override, words):
    with pytest.raises(ValueError) as e:
        SaveReportLabelsd(tmp_path, NAMES)(_case(**override))
    assert str(e.value).startswith("/data/r1.txt: ") and words in str(e.value)
    assert not (tmp_path / "r1.json").exists()


def test_overwrite_false_keeps_existing_outputs(tmp_path):
    path = tmp_path / "r1.json"
    path.write_bytes(b'{"report": "/old/r1.txt"}\n')
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match=r"/data/r1.txt: output already exists .*written for /old/r1.txt"):
        SaveReportLabelsd(tmp_path, NAMES, overwrite="false")(_case())
    with pytest.raises(FileExistsError, match="set overwrite to true"):
        CheckReportOutputsd(tmp_path)({"report": "/data/r1.txt", "text": None, "report_id": "r1"})
    assert path.read_bytes() == before
    assert CheckReportOutputsd(tmp_path, overwrite=True)({"report_id": "r1"}) == {"report_id": "r1"}
    SaveReportLabelsd(tmp_path, NAMES, overwrite=True)(_case())
    assert json.loads(path.read_text())["report"] == "/data/r1.txt"


def test_existing_outputs_are_skipped_not_failed(tmp_path):
    reports, out = tmp_path / "reports", tmp_path / "out"
    reports.mkdir()
    for name in ("a", "b"):
        (reports / f"{name}.txt").write_text("Clear lungs.")
    out.mkdir()
    (out / "a.json").write_text("{}")
    data = ErrorTolerantDataset(list_reports(reports), transform=[CheckReportOutputsd(out), LoadReportd()])
    first, second = data[0], data[1]
    assert first[SKIPPED_KEY] and "a.txt: output already exists" in first[ERROR_KEY]
    assert second["text"] == "Clear lungs." and ERROR_KEY not in second
    assert (out / "a.json").read_text() == "{}"


def test_same_report_id_refused_for_the_later(tmp_path):
    save = SaveReportLabelsd(tmp_path, NAMES, overwrite=True)
    save(_case(source="/a/r1.txt"))
    with pytest.raises(ValueError, match=r"^/b/r1.txt: its output .*r1.json is that of /a/r1.txt in this run"):
        save(_case(source="/b/r1.txt"))
    assert json.loads((tmp_path / "r1.json").read_text())["report"] == "/a/r1.txt"


def test_output_names_stay_in_the_folder(tmp_path):
    assert report_output_path(tmp_path, "../etc/x") == tmp_path / "_etc_x.json"
    assert report_output_path(tmp_path, "1.2.840") == tmp_path / "1.2.840.json"
    assert report_output_path(tmp_path, "..") == tmp_path / "_.json"
    with pytest.raises(ValueError, match="finding_names should be distinct"):
        SaveReportLabelsd(tmp_path, ["a", "a"])


def _run(writer: ReportLabelsCSVWriter, cases: list) -> Engine:
    """An engine whose outputs are the given decollated cases (None: a failed case)."""
    engine = Engine(lambda e, batch: None if batch is None else [batch])
    writer.attach(engine)
    engine.run(cases, max_epochs=1)
    return engine


def test_labels_csv_round_trip(tmp_path):
    writer = ReportLabelsCSVWriter(tmp_path, NAMES, VINDR_MAP)
    cases = [{"report_id": "r1", "decisions": np.array([1, 0, 1, 0])}, None,
             {"report_id": "r2", "decisions": torch.tensor([0, 0, 0, 1])},  # only an unmapped finding
             {"report_id": "r3", "decisions": np.array([0, 0, 0, 0])}]
    _run(writer, cases)
    with open(tmp_path / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    columns = VINDR_LOCAL_LABELS + VINDR_GLOBAL_LABELS
    assert rows[0] == ["image_id", "rad_id", *columns, *(f"finding:{n}" for n in NAMES)]
    assert [r[:2] for r in rows[1:]] == [["r1", "cxr_report_labeler"], ["r2", "cxr_report_labeler"],
                                         ["r3", "cxr_report_labeler"]]
    assert rows[1][-4:] == ["1", "0", "1", "0"] and rows[2][-4:] == ["0", "0", "0", "1"]

    summary = convert_vindr_classification(tmp_path / "labels.csv", None, tmp_path / "dl.json", val_fraction=0.0)
    assert summary["images"] == 3 and summary["skipped"] == []
    items = {i["image_id"]: i for i in json.loads((tmp_path / "dl.json").read_text())["training"]}

    def expected(*positive):
        label = [int(c in positive) for c in columns]
        return label[:len(VINDR_LOCAL_LABELS)], label[len(VINDR_LOCAL_LABELS):]

    assert (items["r1"]["concepts"], items["r1"]["diseases"]) == expected("Cardiomegaly", "Pneumothorax")
    # a positive finding without a VinDr label is still a finding: "No finding" stays 0
    assert (items["r2"]["concepts"], items["r2"]["diseases"]) == expected()
    assert (items["r3"]["concepts"], items["r3"]["diseases"]) == expected("No finding")


def test_labels_csv_keeps_earlier_file(tmp_path):
    earlier = tmp_path / "labels.csv"
    earlier.write_text("image_id,rad_id\nold,x\n")
    _run(ReportLabelsCSVWriter(tmp_path, NAMES, VINDR_MAP), [{"report_id": "r1", "decisions": [0, 1, 0, 0]}])
    kept = [p for p in tmp_path.glob("labels_*.csv")]
    assert len(kept) == 1 and kept[0].read_text() == "image_id,rad_id\nold,x\n"
    assert earlier.read_text().splitlines()[1].startswith("r1,cxr_report_labeler,")
    # a run that decided nothing leaves the folder as it is
    _run(ReportLabelsCSVWriter(tmp_path, NAMES, VINDR_MAP), [None])
    assert len(list(tmp_path.glob("labels*.csv"))) == 2


def test_labels_csv_checks_its_map(tmp_path):
    with pytest.raises(ValueError, match=r"vindr_map names findings \['edema'\]"):
        ReportLabelsCSVWriter(tmp_path, NAMES, {"edema": "Edema"})
    with pytest.raises(ValueError, match=r"vindr_map maps to \['Heart'\]"):
        ReportLabelsCSVWriter(tmp_path, NAMES, {"cardiomegaly": "Heart"})
    with pytest.raises(ValueError, match="3 decisions but 4 findings"):
        _run(ReportLabelsCSVWriter(tmp_path, NAMES, VINDR_MAP), [{"report_id": "r1", "decisions": [0, 1, 0]}])
