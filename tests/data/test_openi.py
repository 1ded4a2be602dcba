from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from common.data.findings_table import load_findings_table
from common.data.openi import convert_openi_reports, openi_reports_tgz, parse_openi_report
from common.engines.report_baselines import KeywordLabeler, TfidfLabeler

FINDINGS = [
    "normal", "cardiomegaly", "lung_opacity", "atelectasis", "calcinosis", "calcified_granuloma", "degenerative_spine",
    "scarring", "pleural_effusion", "airspace_disease", "nodule", "atherosclerosis", "scoliosis", "medical_device",
    "hyperinflation", "hypoinflation",
]
try:
    REAL_TGZ = openi_reports_tgz()
except FileNotFoundError:
    REAL_TGZ = None


def _report_xml(uid: str, findings: str, impression: str, mesh: list[str], images: list[str]) -> str:
    """An ``ecgen-radiology/<n>.xml`` with the real file's layout (trimmed of author and image-feature elements)."""
    majors = "".join(f"\n      <major>{m}</major>\n" for m in mesh)
    figures = "".join(
        f'<parentImage id="{i}">\n      <figureId>F1</figureId>\n      <caption>Xray Chest PA and Lateral</caption>\n'
        f"      <panel type=\"single\"><url>/hadoop/storage/radiology/extract/{i}.jpg</url></panel>\n"
        "   </parentImage>\n"
        for i in images
    )
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="{uid}"/>
   <pmcId id="{uid[3:]}"/>
   <docSource>CXR</docSource>
   <licenseType>open-access</licenseType>
   <licenseURL>http://creativecommons.org/licenses/by-nc-nd/4.0/</licenseURL>
   <ccLicense>byncnd</ccLicense>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <ArticleTitle>Indiana University Chest X-ray Collection</ArticleTitle>
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">XXXX-year-old male, chest pain.</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>{majors}</MeSH>
   {figures}</eCitation>
"""


# the small archive: id, findings, impression, mesh, images
SMALL_REPORTS = [
    ("CXR1", "The heart is normal in size. No pleural effusion.", "Normal chest x-XXXX.", ["normal"],
     ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
    ("CXR2", "Mild cardiomegaly.", "Cardiomegaly.", ["Cardiomegaly/mild"], ["CXR2_IM-0002-1001"]),
    ("CXR3", "Small left pleural effusion.", "", ["Pleural Effusion/left/small"], ["CXR3_IM-0002-1001"]),
    ("CXR4", "Low lung volumes.", "No acute disease.", ["Lung/hypoinflation"],
     ["CXR4_IM-0003-1001", "CXR4_IM-0004-1001"]),
    ("CXR5", "Scoliosis.", "", ["Scoliosis"], ["CXR5_IM-0004-2001"]),
    ("CXR6", "Calcified granuloma.", "No acute disease.", ["Calcified Granuloma/lung"], []),
    ("CXR7", "", "", ["normal"], ["CXR7_IM-0005-1001"]),
    ("CXR8", "Degenerative changes of the spine.", "", ["No Indexing"], ["CXR8_IM-0006-1001"]),
    ("CXR9", "Emphysema.", "COPD.", ["Emphysema"], ["CXR9_IM-0007-1001"]),
    ("CXR10", "Right PICC line.", "", ["Catheters, Indwelling/right"], ["CXR10_IM-0008-1001"]),
]


@pytest.fixture(scope="module")
def table() -> dict:
    return load_findings_table()


@pytest.fixture(scope="module")
def small_tgz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("openi") / "reports.tgz"
    with tarfile.open(path, "w:gz") as archive:
        files = [(f"ecgen-radiology/{r[0][3:]}.xml", _report_xml(*r).encode()) for r in SMALL_REPORTS]
        files.append(("ecgen-radiology/99.xml", b"<eCitation><uId id='CXR99'/>"))  # truncated
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real archive converted once with the defaults: (summary, datalist, parsed reports by id)."""
    if REAL_TGZ is None:
        pytest.skip("torchxrayvision with NLMCXR_reports.tgz is not installed")
    out = tmp_path_factory.mktemp("openi_real")
    summary = convert_openi_reports(out)
    datalist = json.loads((out / "datalist.json").read_text())
    parsed = {}
    with tarfile.open(REAL_TGZ) as archive:
        for member in archive.getmembers():
            if member.isfile() and member.name.endswith(".xml"):
                report = parse_openi_report(archive.extractfile(member).read(), member.name)
                parsed[report["id"]] = report
    return summary, datalist, parsed


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_report_exact():
    xml = _report_xml(
        "CXR1", "The cardiac silhouette and mediastinum size are within normal limits. There are no XXXX of a  pleural "
        "effusion.", "Normal chest x-XXXX.", ["normal", "Technical Quality of Image Unsatisfactory "],
        ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"],
    )
    report = parse_openi_report(xml.encode(), "1.xml")
    findings = ("The cardiac silhouette and mediastinum size are within normal limits. There are no XXXX of a pleural "
                "effusion.")
    assert report == {
        "id": "CXR1",
        "findings": findings,
        "impression": "Normal chest x-XXXX.",
        "text": findings + "\nNormal chest x-XXXX.",
        "mesh": ["normal", "Technical Quality of Image Unsatisfactory"],
        "images": ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"],
        "group": "IM-0001",
        "license": "http://creativecommons.org/licenses/by-nc-nd/4.0/",
    }


def test_parse_report_without_images_or_findings():
    report = parse_openi_report(_report_xml("CXR6", "", "Calcified granuloma.", ["Calcified Granuloma"], []), "6.xml")
    assert (report["text"], report["images"], report["group"]) == ("Calcified granuloma.", [], "CXR6")


def test_parse_report_errors_name_the_file():
    with pytest.raises(ValueError, match=r"ecgen-radiology/12\.xml: malformed XML"):
        parse_openi_report(b"<eCitation><uId id='CXR12'/>", "ecgen-radiology/12.xml")
    with pytest.raises(ValueError, match=r"13\.xml: no <uId"):
        parse_openi_report(b"<eCitation></eCitation>", "13.xml")


# ------------------------------------------------------------------------------------------------ conversion
def test_convert_small_archive(tmp_path, small_tgz):
    summary = convert_openi_reports(tmp_path, tgz=small_tgz, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert summary["reports"] == 11
    assert summary["kept"] == 8
    reasons = {s["file"].split(":")[-1]: s["reason"] for s in summary["skipped"]}
    assert reasons["ecgen-radiology/7.xml"] == "no FINDINGS and no IMPRESSION text"
    assert reasons["ecgen-radiology/8.xml"] == "MeSH is 'No Indexing' only"
    assert "ecgen-radiology/99.xml: malformed XML" in reasons["ecgen-radiology/99.xml"]
    datalist = json.loads((tmp_path / "datalist.json").read_text())
    assert json.loads((tmp_path / "report.json").read_text()) == summary
    assert datalist["findings"] == FINDINGS
    items = {i["id"]: (split, i) for split in ("training", "validation", "test") for i in datalist[split]}
    assert sorted(items, key=lambda k: int(k[3:])) == ["CXR1", "CXR2", "CXR3", "CXR4", "CXR5", "CXR6", "CXR9", "CXR10"]
    assert summary["splits"] == {s: sum(1 for v in items.values() if v[0] == s) for s in ("training", "validation",
                                                                                          "test")}
    # CXR2 and CXR3 share IM-0002; CXR4 and CXR5 are joined through IM-0004
    assert items["CXR2"][0] == items["CXR3"][0]
    assert items["CXR4"][0] == items["CXR5"][0]
    cxr4 = items["CXR4"][1]
    assert cxr4["text"] == "Low lung volumes.\nNo acute disease."
    assert cxr4["findings"] == ["hypoinflation"] and cxr4["label"] == [int(f == "hypoinflation") for f in FINDINGS]
    assert cxr4["group"] == "IM-0003" and cxr4["mesh"] == ["Lung/hypoinflation"]
    assert [(e["start"], e["end"], e["finding"]) for e in cxr4["entities"]] == [(0, 16, "hypoinflation"),
                                                                                (18, 34, "normal")]
    assert items["CXR6"][1]["group"] == "CXR6"
    assert items["CXR1"][1]["findings"] == ["normal"]
    assert items["CXR9"][1]["findings"] == ["hyperinflation"]
    assert summary["positives"][items["CXR2"][0]]["cardiomegaly"] == 1

    # same seed, same datalist; refuses to overwrite unless asked
    first = (tmp_path / "datalist.json").read_text()
    with pytest.raises(FileExistsError, match=re.escape(str(tmp_path / "datalist.json"))):
        convert_openi_reports(tmp_path, tgz=small_tgz, val_fraction=0.25, test_fraction=0.25, seed=3)
    convert_openi_reports(tmp_path, tgz=small_tgz, val_fraction=0.25, test_fraction=0.25, seed=3, overwrite=True)
    assert (tmp_path / "datalist.json").read_text() == first


ILL_CONVERT_CASES = [
    {"val_fraction": 1.0},
    {"test_fraction": -0.1},
    {"val_fraction": 0.5, "test_fraction": 0.5},
    {"seed": -1},
]


@pytest.mark.parametrize("kwargs", ILL_CONVERT_CASES)
def test_convert_ill_arguments(tmp_path, small_tgz, kwargs):
    with pytest.raises(ValueError):
        convert_openi_reports(tmp_path, tgz=small_tgz, **kwargs)


def test_convert_missing_or_broken_archive(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.tgz"):
        convert_openi_reports(tmp_path, tgz=tmp_path / "nothing.tgz")
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(b"not a tar file")
    with pytest.raises(ValueError, match="broken.tgz: cannot read"):
        convert_openi_reports(tmp_path, tgz=broken)


def test_cli_openi_reports(tmp_path, small_tgz, capsys):
    from common.cli import CLI

    CLI().openi_reports(str(tmp_path), tgz=str(small_tgz), overwrite="false")
    assert "8 of 11 reports" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already exists"):
        CLI().openi_reports(str(tmp_path), tgz=str(small_tgz))


def test_real_reports_counts(real):
    summary, datalist, parsed = real
    assert len(parsed) == summary["reports"] == 3955
    reasons = [s["reason"] for s in summary["skipped"]]
    assert reasons.count("no FINDINGS and no IMPRESSION text") == 28
    assert reasons.count("MeSH is 'No Indexing' only") == 95
    assert summary["kept"] == 3955 - len(reasons) == 3832
    splits = {s: datalist[s] for s in ("training", "validation", "test")}
    assert sum(len(v) for v in splits.values()) == summary["kept"]
    for name in ("validation", "test"):
        assert abs(len(splits[name]) - 0.15 * 3832) <= 10
    kept = [parsed[i["id"]] for items in splits.values() for i in items]

    # the labels follow MeSH: cardiomegaly = Cardiomegaly or Cardiac Shadow/enlarged, normal = exactly "normal"
    def has(report, prefix):
        return any(m.lower().startswith(prefix) for m in report["mesh"])

    positives = {f: sum(summary["positives"][s][f] for s in splits) for f in FINDINGS}
    assert sum(has(r, "cardiomegaly") for r in parsed.values()) == 375  # the whole archive, skipped ones included
    assert positives["cardiomegaly"] == sum(has(r, "cardiomegaly") or has(r, "cardiac shadow/enlarged") for r in kept)
    assert positives["normal"] == sum(r["mesh"] == ["normal"] for r in kept) == 1363
    assert positives["pleural_effusion"] == sum(has(r, "pleural effusion") for r in kept)
    for items in splits.values():
        for item in items:
            assert item["label"] == [int(f in item["findings"]) for f in FINDINGS]
            assert not (item["label"][0] and sum(item["label"]) > 1)  # normal stands alone
            ends = [(e["start"], e["end"]) for e in item["entities"]]
            assert ends == sorted(ends) and all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))

    # no image number on two sides
    side = {}
    for name, items in splits.items():
        for item in items:
            numbers = {re.search(r"IM-\d+", i).group() for i in parsed[item["id"]]["images"]} | {item["group"]}
            for number in numbers:
                assert side.setdefault(number, name) == name, number
    assert summary["groups"]["total"] == len({i["group"] for items in splits.values() for i in items})

    first = next(i for i in splits["training"] + splits["validation"] + splits["test"] if i["id"] == "CXR1")
    assert first["text"].endswith("There is no evidence of pneumothorax.\nNormal chest x-XXXX.")
    assert (first["findings"], first["group"]) == (["normal"], "IM-0001")


def test_real_keyword_baseline_agrees_with_mesh(real, table):
    """The lexicon is built from these reports; keywords should recover most MeSH labels (a smoke check of the
    table, not a benchmark)."""
    _, datalist, _ = real
    items = datalist["test"]
    scores = KeywordLabeler(table).predict_proba([i["text"] for i in items])
    labels = np.array([i["label"] for i in items])
    for f in ("cardiomegaly", "pleural_effusion", "atherosclerosis", "hypoinflation"):
        k = FINDINGS.index(f)
        recall = (scores[:, k] * labels[:, k]).sum() / labels[:, k].sum()
        assert recall > 0.8, (f, recall)


# ------------------------------------------------------------------------------------------------ baselines
KEYWORD_CASES = [
    ("Mild cardiomegaly. No pleural effusion or pneumothorax.", ["cardiomegaly"]),
    ("The lungs are clear. No acute cardiopulmonary abnormality.", ["normal"]),
    ("Low lung volumes with bibasilar atelectasis. Effusion is not seen.", ["atelectasis", "hypoinflation"]),
    ("No focal consolidation but there is a small right pleural effusion.", ["pleural_effusion"]),
    ("Right PICC line tip in the SVC. Thoracic spondylosis. Levoscoliosis.",
     ["degenerative_spine", "scoliosis", "medical_device"]),
    ("", ["normal"]),
]


def test_keyword_labeler(table):
    scores = KeywordLabeler(table).predict_proba([text for text, _ in KEYWORD_CASES])
    assert scores.shape == (len(KEYWORD_CASES), len(FINDINGS)) and scores.dtype == np.float32
    for row, (_, expected) in zip(scores, KEYWORD_CASES):
        assert [f for f, v in zip(FINDINGS, row) if v] == [f for f in FINDINGS if f in expected]


def test_tfidf_labeler_learns_and_is_deterministic():
    texts = ["mild cardiomegaly noted", "enlarged heart cardiomegaly", "heart is enlarged cardiomegaly",
             "small pleural effusion", "left pleural effusion", "pleural effusion right",
             "lungs are clear", "clear lungs no disease", "lungs clear"] * 2
    labels = np.array([[1, 0, 0]] * 3 + [[0, 1, 0]] * 3 + [[0, 0, 0]] * 3 + [[1, 0, 0]] * 3 + [[0, 1, 0]] * 3
                      + [[0, 0, 0]] * 3)
    first = TfidfLabeler(C=10.0).fit(texts, labels).predict_proba(texts)
    assert first.shape == (18, 3) and first.dtype == np.float32
    assert ((first[:, :2] > 0.5) == labels[:, :2].astype(bool)).all()
    assert (first[:, 2] == 0).all()  # one label value in training: its prior
    second = TfidfLabeler(C=10.0).fit(texts, labels).predict_proba(texts)
    np.testing.assert_array_equal(first, second)
    with pytest.raises(ValueError, match="labels should be"):
        TfidfLabeler().fit(texts, labels[:3])
    with pytest.raises(ValueError, match="not fitted"):
        TfidfLabeler().predict_proba(texts)
