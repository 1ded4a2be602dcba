from __future__ import annotations

import json

import pytest

from common.data.findings_table import (
    DEFAULT_FINDINGS_TABLE,
    load_findings_table,
    mesh_findings,
    negated,
    silver_entities,
)

FINDINGS = [
    "normal", "cardiomegaly", "lung_opacity", "atelectasis", "calcinosis", "calcified_granuloma", "degenerative_spine",
    "scarring", "pleural_effusion", "airspace_disease", "nodule", "atherosclerosis", "scoliosis", "medical_device",
    "hyperinflation", "hypoinflation",
]


@pytest.fixture(scope="module")
def table() -> dict:
    return load_findings_table()


# ------------------------------------------------------------------------------------------------ the findings table
def test_default_table(table):
    assert DEFAULT_FINDINGS_TABLE.is_file()
    assert table["findings"] == FINDINGS
    assert table["vindr"]["cardiomegaly"] == "Cardiomegaly"
    assert table["vindr"]["nodule"] == "Nodule/Mass"
    assert table["vindr"]["scoliosis"] is None
    assert {"no", "without", "free of"} <= set(table["negation_cues"]["pre"])
    assert "cardiomegaly" in table["keywords"]["cardiomegaly"]
    assert "CC BY-NC-ND 4.0" in table["license"]


# edit applied to the default table -> words the error must contain
ILL_TABLES = [
    (lambda t: t["mesh"].update({"Pneumothorax": "pneumothorax"}), ["'Pneumothorax'", "pneumothorax"]),
    (lambda t: t.pop("anatomy"), ["missing keys ['anatomy']"]),
    (lambda t: t.update({"extra": 1}), ["unknown keys ['extra']"]),
    (lambda t: t["keywords"]["nodule"].append("Mass Lesion"), ["'Mass Lesion'", "lowercase"]),
    (lambda t: t["keywords"]["scarring"].append("cardiomegaly"), ["'cardiomegaly'", "scarring"]),
    (lambda t: t["keywords"].update({"edema": ["edema"]}), ["'edema'"]),
    (lambda t: t["vindr"].update({"nodule": "Nodule"}), ["'Nodule'", "VinDr-CXR"]),
    (lambda t: t["findings"].append("normal"), ["repeats ['normal']"]),
    (lambda t: t["negation_cues"].pop("post"), ["negation_cues"]),
]


@pytest.mark.parametrize("edit, words", ILL_TABLES)
def test_ill_table_names_file_and_entry(tmp_path, edit, words):
    data = json.loads(DEFAULT_FINDINGS_TABLE.read_text())
    edit(data)
    path = tmp_path / "findings.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        load_findings_table(path)
    for word in [str(path), *words]:
        assert word in str(err.value)


def test_table_comments_and_bad_json(tmp_path):
    data = json.loads(DEFAULT_FINDINGS_TABLE.read_text())
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"_comment": "local override", **data}))
    assert "_comment" not in load_findings_table(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="ok.json: not valid JSON"):
        load_findings_table(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_findings_table(tmp_path / "missing.json")


MESH_CASES = [
    (["normal"], ["normal"]),
    (["Cardiomegaly/mild", "Opacity/lung/base/left/mild"], ["cardiomegaly", "lung_opacity"]),
    (["thoracic  vertebrae/Degenerative/mild"], ["degenerative_spine"]),  # case and spaces do not matter
    (["Thoracic Vertebrae/scattered"], []),  # the key's qualifier must come first
    (["Lung/hyperdistention", "Lung/hypoinflation/mild"], ["hyperinflation", "hypoinflation"]),
    (["Lung/hilum", "Lung"], []),
    (["Subcutaneous Emphysema/neck"], []),  # "Emphysema" matches whole parts only
    (["Granulomatous Disease", "Calcified Granuloma/lung"], ["calcified_granuloma"]),
    (["Catheters, Indwelling/right", "Pulmonary Emphysema"], ["medical_device", "hyperinflation"]),
    (["No Indexing"], []),
]


@pytest.mark.parametrize("mesh, expected", MESH_CASES)
def test_mesh_findings(table, mesh, expected):
    assert mesh_findings(mesh, table) == expected


# ------------------------------------------------------------------------------------------------ negation, entities
# text, mention, expected
NEGATION_CASES = [
    ("No pleural effusion.", "pleural effusion", True),
    ("Small left pleural effusion.", "pleural effusion", False),
    ("No pneumothorax but there is a small effusion", "effusion", False),  # terminator
    ("Effusion is not seen.", "Effusion", True),  # post cue
    ("The lungs are free of focal airspace disease.", "airspace disease", True),
    ("No pneumothorax. Small effusion.", "effusion", False),  # the cue is in another sentence
    ("NO evidence of pleural effusion.", "pleural effusion", True),  # case-insensitive
    ("No a b c d e f effusion.", "effusion", True),  # 6 words between
    ("No a b c d e f g effusion.", "effusion", False),  # 7 words between
    ("Effusion a b c d is not seen.", "Effusion", True),  # 4 words before the post cue
    ("Effusion a b c d e is not seen.", "Effusion", False),
    ("Cardiomegaly. Knot effusion.", "effusion", False),  # "not" inside "Knot" is no cue
    ("No change in the cardiomegaly.", "cardiomegaly", False),  # "change" terminates the scope
]


@pytest.mark.parametrize("text, mention, expected", NEGATION_CASES)
def test_negated(table, text, mention, expected):
    start = text.index(mention)
    assert negated(text, start, start + len(mention), table["negation_cues"]) is expected


def test_negated_ill_span(table):
    with pytest.raises(ValueError, match="start and end"):
        negated("No effusion.", 5, 3, table["negation_cues"])


def test_silver_entities_exact_spans(table):
    text = ("Enlarged cardiac silhouette. No pleural effusion at the left base, but calcified granulomas in the right "
            "upper lobe.")
    expected = [
        (0, 27, "FINDING", False, "cardiomegaly"),  # longest match: not ANATOMY "cardiac silhouette"
        (32, 48, "FINDING", True, "pleural_effusion"),
        (61, 65, "ANATOMY", False, None),
        (71, 91, "FINDING", False, "calcified_granuloma"),  # not "calcified" (calcinosis); "but" ends the "No"
        (99, 115, "ANATOMY", False, None),
    ]
    got = [(e["start"], e["end"], e["type"], e["negated"], e["finding"]) for e in silver_entities(text, table)]
    assert got == expected
    assert [text[s:e] for s, e, *_ in got] == [
        "Enlarged cardiac silhouette", "pleural effusion", "base", "calcified granulomas", "right upper lobe"
    ]
    # word boundaries: "nodularity" holds "nodular", "effusions" is its own keyword, "Pleural  Effusion" any spacing
    got = [(e["start"], e["end"]) for e in silver_entities("Nodularity. Pleural  Effusions.", table)]
    assert got == [(12, 30)]
