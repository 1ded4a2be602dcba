from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.data.reports import LoadReportd, list_reports, normalize_report_text
from common.data.robust import ERROR_KEY, ErrorTolerantDataset

OPENI_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><MedlineCitation Owner="Indiana University"><Article><Abstract>
  <AbstractText Label="COMPARISON">None.</AbstractText>
  <AbstractText Label="INDICATION">XXXX-year-old male, chest pain.</AbstractText>
  <AbstractText Label="FINDINGS">The cardiac silhouette is within normal limits.
     There is no pulmonary edema.</AbstractText>
  <AbstractText Label="IMPRESSION">Normal chest x-XXXX.</AbstractText>
</Abstract></Article></MedlineCitation></eCitation>
"""
ONLY_IMPRESSION_XML = OPENI_XML.replace(
    """<AbstractText Label="FINDINGS">The cardiac silhouette is within normal limits.
     There is no pulmonary edema.</AbstractText>""", '<AbstractText Label="FINDINGS"></AbstractText>')
NO_SECTION_XML = '<eCitation><Abstract><AbstractText Label="INDICATION">Cough.</AbstractText></Abstract></eCitation>'

# raw file content -> text LoadReportd keeps
TEST_CASES = [
    [b"Heart size normal.  Lungs are clear.\r\n\r\nNo effusion. ", "Heart size normal. Lungs are clear.\nNo effusion."],
    ["\ufeffFINDINGS:\tMild cardiomegaly.\n\nIMPRESSION: Cardiomegaly.".encode(),
     "FINDINGS: Mild cardiomegaly.\nIMPRESSION: Cardiomegaly."],
    ["Opacité basale droite, épanchement.".encode(), "Opacité basale droite, épanchement."],
]
# (file name, raw content, words the error must hold besides the file's path)
ILL_CASES = [
    ["empty.txt", b"", ["empty report"]],
    ["blank.txt", b" \n\t \r\n", ["empty report"]],
    ["binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["NUL bytes", "byte offset 8"]],
    ["control.txt", bytes(range(1, 9)) * 20 + b"some text", ["not printable", "binary"]],
    ["latin1.txt", "Épanchement pleural.".encode("latin-1"), ["not UTF-8", "byte offset 0", "0xc9"]],
    ["utf16.txt", "No effusion.".encode("utf-16"), ["UTF-16"]],
    ["long.txt", b"No acute cardiopulmonary process. " * 3000, ["101999 characters", "max_chars=20000"]],
    ["nosection.xml", NO_SECTION_XML.encode(), ["no FINDINGS or IMPRESSION"]],
    ["broken.xml", b"<eCitation><Abstract>", ["not well-formed XML"]],
]


def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


@pytest.mark.parametrize("raw, expected", TEST_CASES)
def test_load_report_file(tmp_path, raw, expected):
    path = _write(tmp_path / "case 1.txt", raw)
    (item,) = list_reports(path)
    assert item == {"report": str(path.resolve()), "text": None, "report_id": "case 1"}
    out = LoadReportd()(item)
    assert out["text"] == expected and out["report_id"] == "case 1"


def test_openi_xml(tmp_path):
    out = LoadReportd()(list_reports(_write(tmp_path / "CXR1.xml", OPENI_XML))[0])
    assert out["text"] == ("The cardiac silhouette is within normal limits. There is no pulmonary edema.\n"
                           "Normal chest x-XXXX.")
    assert out["report_id"] == "CXR1"
    # an empty FINDINGS part is left out, not joined as a blank line
    assert LoadReportd()(list_reports(_write(tmp_path / "CXR2.xml", ONLY_IMPRESSION_XML))[0])["text"] == \
        "Normal chest x-XXXX."


@pytest.mark.parametrize("name, raw, words", ILL_CASES)
def test_load_report_refuses(tmp_path, name, raw, words):
    path = _write(tmp_path / name, raw)
    with pytest.raises(ValueError) as e:
        LoadReportd()(list_reports(path)[0])
    assert str(path.resolve()) in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_missing_file_fails_as_its_case(tmp_path):
    (item,) = list_reports(tmp_path / "gone.txt")  # kept at listing: the error belongs to the case
    with pytest.raises(FileNotFoundError, match="gone.txt: file not found"):
        LoadReportd()(item)


def test_row_texts_checked_too():
    rows = [{"report": "t.csv:7", "text": "  ", "report_id": "7"}, {"report": "t.csv:8", "text": "x" * 101},
            {"report": "t.csv:9", "text": "a\x00b"}]
    for row, word in zip(rows, ["empty report", "101 characters", "NUL"]):
        with pytest.raises(ValueError, match=f"^{row['report']}: .*{word}"):
            LoadReportd(max_chars=100)(row)
    with pytest.raises(ValueError, match="max_chars should be a positive integer"):
        LoadReportd(max_chars=0)


def test_normalize_keeps_punctuation():
    assert normalize_report_text(" No pneumothorax; small (2 cm) effusion?\u00a0 Yes.\x1b ") == \
        "No pneumothorax; small (2 cm) effusion? Yes."


def test_list_folder_glob_and_list(tmp_path):
    for name in ("b.txt", "a.XML", "c.png", ".hidden.txt", "sub/d.txt", "notes.md"):
        _write(tmp_path / name, "x")
    folder = list_reports(tmp_path)
    assert [Path(i["report"]).name for i in folder] == ["a.XML", "b.txt"]
    assert all(i["text"] is None for i in folder)
    assert [Path(i["report"]).name for i in list_reports(str(tmp_path / "*.txt"))] == ["b.txt"]
    assert list_reports(str(tmp_path / "*.none")) == []
    both = list_reports([tmp_path / "b.txt", str(tmp_path / "sub"), {"text": "Clear lungs.", "report_id": "r9"}])
    assert [i["report_id"] for i in both] == ["b", "d", "r9"]


def test_csv_rows(tmp_path):
    csv_file = _write(tmp_path / "reports.csv", 'study,Report\ns1,"Clear lungs."\ns2,"Line one.\nLine two."\ns3,\n')
    items = list_reports(csv_file)  # "report" matched case-insensitively
    src = str(csv_file.resolve())
    # no id column: line numbers (header is line 1; the quoted two-line report starts on line 3)
    assert items == [{"report": f"{src}:2", "text": "Clear lungs.", "report_id": "reports_2"},
                     {"report": f"{src}:3", "text": "Line one.\nLine two.", "report_id": "reports_3"},
                     {"report": f"{src}:5", "text": "", "report_id": "reports_5"}]
    with pytest.raises(ValueError, match="empty report"):  # the blank row fails as its own case
        LoadReportd()(items[2])
    with_ids = _write(tmp_path / "ids.csv", "report_id,findings\nA-1,Effusion.\n,Edema.\n")
    items = list_reports(with_ids, column="findings")
    assert [(i["report"].split(":")[-1], i["report_id"]) for i in items] == [("A-1", "A-1"), ("3", "ids_3")]


def test_csv_problems(tmp_path):
    path = _write(tmp_path / "t.csv", "id,impression\n1,Clear.\n")
    with pytest.raises(ValueError) as e:
        list_reports(path, column="report")
    assert str(path.resolve()) in str(e.value) and "no column 'report'" in str(e.value)
    assert "['id', 'impression']" in str(e.value)
    bad = _write(tmp_path / "bad.csv", b"id,report\n1,\xe9panchement\n")
    with pytest.raises(ValueError, match=r"bad.csv: not UTF-8 CSV: byte 0xe9 at byte offset 12"):
        list_reports(bad)
    with pytest.raises(FileNotFoundError, match="missing.csv: file not found"):
        list_reports(tmp_path / "missing.csv")
    # a report longer than the csv module's default field limit is listed, then refused alone
    big = _write(tmp_path / "big.csv", f"id,report\n1,{'x' * 200_000}\n2,Clear.\n")
    items = list_reports(big)
    assert len(items) == 2 and LoadReportd()(items[1])["text"] == "Clear."
    with pytest.raises(ValueError, match="200000 characters"):
        LoadReportd()(items[0])


def test_json_lists_and_datalists(tmp_path):
    texts = _write(tmp_path / "texts.json", json.dumps(["Clear.", "Edema."]))
    items = list_reports(texts)
    assert [(i["report"], i["report_id"], i["text"]) for i in items] == [
        (f"{texts.resolve()}#0", "texts_0", "Clear."), (f"{texts.resolve()}#1", "texts_1", "Edema.")]
    dicts = _write(tmp_path / "dicts.json", json.dumps([{"id": "p7", "text": "Effusion."}, {"text": "Clear."}]))
    assert [(i["report"].split("#")[1], i["report_id"]) for i in list_reports(dicts)] == [
        ("p7", "p7"), ("1", "dicts_1")]
    datalist = _write(tmp_path / "dl.json", json.dumps(
        {"validation": [{"id": "v1", "text": "Edema.", "labels": [1, 0]}], "test": [{"id": "t1", "text": "Clear."}]}))
    (item,) = list_reports(datalist, key="validation")
    assert item == {"report": f"{datalist.resolve()}#v1", "text": "Edema.", "report_id": "v1", "labels": [1, 0]}
    assert list_reports(datalist)[0]["report_id"] == "t1"
    with pytest.raises(KeyError, match="no 'training' split"):
        list_reports(_write(tmp_path / "only.json", json.dumps({"other": []})), key="training")
    with pytest.raises(ValueError, match=r"bad.json: entry 1 of 'test' should be a report text"):
        list_reports(_write(tmp_path / "bad.json", json.dumps({"test": [{"text": "a"}, {"id": 2}]})))
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        list_reports(_write(tmp_path / "broken.json", "[1,"))


def test_one_bad_file_does_not_stop_the_others(tmp_path):
    _write(tmp_path / "a_good.txt", "No acute findings.")
    _write(tmp_path / "b_binary.txt", b"\x00\x01\x02")
    _write(tmp_path / "c_empty.txt", b"")
    _write(tmp_path / "d_good.xml", OPENI_XML)
    _write(tmp_path / "e_long.txt", "Clear. " * 3000)
    data = ErrorTolerantDataset(list_reports(tmp_path), transform=LoadReportd())
    out = [data[i] for i in range(len(data))]
    assert [o.get("report_id") for o in out] == ["a_good", None, None, "d_good", None]
    assert out[0]["text"] == "No acute findings."
    for o, name, problem in zip([out[1], out[2], out[4]], ["b_binary.txt", "c_empty.txt", "e_long.txt"],
                                ["NUL bytes", "empty report", "max_chars"]):
        assert name in o[ERROR_KEY] and problem in o[ERROR_KEY]
