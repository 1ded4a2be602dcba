from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from common.data.ct_rate import (
    CT_RATE_WINDOW,
    assign_region,
    convert_ct_rate,
    convert_omniabnorm_cot,
    load_region_table,
)
from common.transforms.intensity import CT_WINDOWS

# sentence -> region id of CT_REGIONS (0: none named)
REGION_CASES = [
    ["A 3.5 mm nodule in the right upper lobe.", 1],
    ["Minimal effusion in the left pleural space.", 2],
    ["Heart size is normal; no pericardial effusion.", 3],
    ["The liver is enlarged, with hepatic steatosis.", 4],
    ["Splenomegaly is not seen; the spleen is normal.", 5],
    ["Right kidney: simple cyst.", 6],
    ["Degenerative changes in the thoracic vertebrae.", 8],
    ["Trachea and both main bronchi are open.", 0],
    ["The liver cyst abuts the right kidney.", 4],  # the earliest region named wins
]


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"nifti")
    return path


def _write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["VolumeName", "ClinicalInformation_EN", "Findings_EN", "Impressions_EN"])
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("sentence, region_id", REGION_CASES)
def test_assign_region(sentence, region_id):
    assert assign_region(sentence) == region_id


def test_window_is_the_wide_window():
    assert CT_RATE_WINDOW == CT_WINDOWS["wide"] == (0.0, 2000.0)
    assert CT_WINDOWS["soft_tissue"] == (40.0, 400.0)  # the "40 / 400" window is soft tissue, not lung
    assert CT_WINDOWS["lung"] == (-600.0, 1500.0)


def test_convert_ct_rate_with_bad_rows(tmp_path):
    volumes = tmp_path / "dataset" / "train"
    for name in ("train_1_a_1", "train_1_a_2", "train_2_a_1", "train_3_a_1", "train_4_a_1"):
        patient = "_".join(name.split("_")[:2])
        _touch(volumes / patient / name[:-2] / f"{name}.nii.gz")  # the published nested layout
    masks = tmp_path / "masks"
    for name in ("train_1_a_1", "train_1_a_2", "train_2_a_1", "train_4_a_1"):
        _touch(masks / f"{name}.nii.gz")
    findings = "A 6 mm nodule in the right lower lobe.\nThe liver is normal. Trachea is midline."
    csv_path = _write_csv(tmp_path / "reports.csv", [
        ["train_1_a_1.nii.gz", "Cough.", findings, "Right lung nodule."],  # line 2-3 (quoted newline)
        ["train_1_a_2.nii.gz", "", "No findings in the heart.", "Normal."],  # line 4
        ["", "", "x.", "y."],  # line 5: empty name
        ["train_1_a_1.nii.gz", "", "Again.", "Again."],  # line 6: duplicate
        ["train_2_a_1.nii.gz", "", "nan", "Normal."],  # line 7: empty findings
        ["train_3_a_1.nii.gz", "", "Spleen normal.", "Normal."],  # line 8: no mask
        ["train_4_a_1.nii.gz", "", "Left kidney cyst.", ""],  # line 9: empty impression
        ["train_9_a_1.nii.gz", "", "Spleen normal.", "Normal."],  # line 10: no volume
    ])
    out = tmp_path / "out" / "datalist.json"
    report = convert_ct_rate(csv_path, tmp_path / "dataset", out, mask_dir=masks, val_fraction=0.0)
    assert report["rows"] == 8 and report["cases"] == 2 and report["training"] == 2 and report["validation"] == 0
    reasons = {(s["row"], s["reason"].split(" (")[0].split(" below")[0]) for s in report["skipped"]}
    assert reasons == {(5, "empty VolumeName"), (6, "duplicate VolumeName"), (7, "empty findings"),
                       (8, "mask file not found"), (9, "empty impression"), (10, "volume file not found")}
    datalist = json.loads(out.read_text())
    first = datalist["training"][0]
    assert first["case_id"] == "train_1_a_1"
    assert first["image"] == "../dataset/train/train_1/train_1_a/train_1_a_1.nii.gz"
    assert first["mask"] == "../masks/train_1_a_1.nii.gz" and (out.parent / first["mask"]).is_file()
    assert [f["region_id"] for f in first["report"]["findings"]] == [1, 4, 0]
    assert first["report"]["regions_mentioned"] == [1, 4] and first["report"]["cot"] == []
    assert first["report"]["impression"] == "Right lung nodule."
    assert datalist["regions"]["1"] == "right_lung"


def test_ct_rate_patients_share_a_split(tmp_path):
    rows = []
    for patient in range(1, 7):
        for scan in ("a_1", "b_1"):
            name = f"train_{patient}_{scan}.nii.gz"
            _touch(tmp_path / "vol" / name)
            rows.append([name, "", "Heart normal.", "Normal."])
    out = tmp_path / "datalist.json"
    report = convert_ct_rate(_write_csv(tmp_path / "r.csv", rows), tmp_path / "vol", out, val_fraction=0.5)
    assert report["validation"] == 6 and not report["skipped"]
    datalist = json.loads(out.read_text())
    patients = [{c["case_id"].rsplit("_", 2)[0] for c in datalist[k]} for k in ("training", "validation")]
    assert len(patients[0]) == len(patients[1]) == 3 and not patients[0] & patients[1]


@pytest.mark.parametrize("form", ["csv", "json"])
def test_ct_rate_question_answer_records_join_their_cases(tmp_path, form):
    """CT-RATE's VQA records, one per question with volumename / question / answer, as a CSV or a JSON list."""
    for name in ("train_1_a_1", "train_2_a_1"):
        _touch(tmp_path / "vol" / f"{name}.nii.gz")
    reports = _write_csv(tmp_path / "r.csv", [["train_1_a_1.nii.gz", "", "Heart normal.", "Normal."],
                                              ["train_2_a_1.nii.gz", "", "Liver cyst.", "Cyst."]])
    records = [
        {"volumename": "train_1_a_1.nii.gz", "question": "Is there a pleural effusion?", "answer": "No."},
        {"volumename": "train_2_a_1.nii.gz", "question": "Where is the lesion?", "answer": "In the liver."},
        {"volumename": "train_1_a_1.nii.gz", "question": "Is the heart enlarged?", "answer": "No, normal size."},
        {"volumename": "train_7_a_1.nii.gz", "question": "Any nodule?", "answer": "Yes."},  # not converted
        {"volumename": "train_2_a_1.nii.gz", "question": "Any fracture?", "answer": ""},  # no answer
    ]
    if form == "csv":
        qa = tmp_path / "vqa.csv"
        with open(qa, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["volumename", "question", "answer"])
            writer.writeheader()
            writer.writerows(records)
        where = [5, 6]  # CSV lines
    else:
        qa = tmp_path / "vqa.json"
        qa.write_text(json.dumps(records))
        where = [4, 5]  # positions in the list
    out = tmp_path / "datalist.json"
    report = convert_ct_rate(reports, tmp_path / "vol", out, val_fraction=0.0, qa=qa)
    assert report["cases"] == 2 and report["qa"] == 3
    assert [(s["record"], s["reason"]) for s in report["skipped_qa"]] == [
        (where[0], "volume not among the converted cases"), (where[1], "empty answer")]
    cases = {c["case_id"]: c for c in json.loads(out.read_text())["training"]}
    assert cases["train_1_a_1"]["report"]["qa"] == [
        {"question": "Is there a pleural effusion?", "answer": "No."},
        {"question": "Is the heart enlarged?", "answer": "No, normal size."}]
    assert cases["train_2_a_1"]["report"]["qa"] == [{"question": "Where is the lesion?", "answer": "In the liver."}]


def test_ct_rate_question_answer_records_with_other_keys_are_named(tmp_path):
    _touch(tmp_path / "vol" / "train_1_a_1.nii.gz")
    reports = _write_csv(tmp_path / "r.csv", [["train_1_a_1.nii.gz", "", "Heart normal.", "Normal."]])
    (tmp_path / "vqa.json").write_text(json.dumps([{"volume": "train_1_a_1.nii.gz", "q": "?", "a": "!"}]))
    with pytest.raises(ValueError, match=r"vqa.json: records lack \['volumename', 'question', 'answer'\]"):
        convert_ct_rate(reports, tmp_path / "vol", tmp_path / "d.json", qa=tmp_path / "vqa.json")


def test_ct_rate_missing_columns(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("VolumeName,Findings_EN\na.nii.gz,x\n")
    (tmp_path / "vol").mkdir()
    with pytest.raises(ValueError, match="missing columns"):
        convert_ct_rate(path, tmp_path / "vol", tmp_path / "d.json")
    with pytest.raises(ValueError, match="val_fraction"):
        convert_ct_rate(path, tmp_path / "vol", tmp_path / "d.json", val_fraction=2.0)


def _step(text: str, region) -> dict:
    return {"step": text, "mask_region": region}


def test_convert_omniabnorm_with_bad_items(tmp_path):
    for name in ("img/c1.nii.gz", "seg/c1.nii.gz", "img/c2.nii.gz", "seg/c2.nii.gz", "img/c3.nii.gz"):
        _touch(tmp_path / name)
    items = [
        {"case_id": "c1", "image": "img/c1.nii.gz", "mask": "seg/c1.nii.gz", "region": "right lung",
         "category": "nodule", "cot_reasoning": [_step("Find the right lung.", 1), _step("Nodule there.", 1),
                                                 _step("Whole scan otherwise clear.", 0)]},
        {"case_id": "c1", "image": "img/c1.nii.gz", "mask": "seg/c1.nii.gz", "region": "liver",
         "category": "cyst", "cot_reasoning": [_step("Liver.", "4"), _step("Water density.", 4)]},  # merged
        {"case_id": "c2", "image": "img/c2.nii.gz", "mask": "seg/c2.nii.gz", "category": "mass",
         "cot_reasoning": [_step("Left lung.", 2)]},
        {"case_id": "c3", "image": "img/c3.nii.gz", "mask": "seg/c3.nii.gz", "cot_reasoning": [_step("x", 1)]},
        {"case_id": "c4", "image": "img/c2.nii.gz", "mask": "seg/c2.nii.gz", "cot_reasoning": []},
        {"case_id": "c5", "image": "img/c2.nii.gz", "mask": "seg/c2.nii.gz", "cot_reasoning": [_step(" ", 1)]},
        {"case_id": "c6", "image": "img/c2.nii.gz", "mask": "seg/c2.nii.gz", "cot_reasoning": [_step("a", "x")]},
        {"case_id": "c7", "image": "img/c2.nii.gz", "mask": "seg/c2.nii.gz", "cot_reasoning": [_step("a", 9)]},
        {"case_id": "c8", "image": "img/c2.nii.gz", "cot_reasoning": [_step("a", 1)]},
        {"case_id": "c1", "image": "img/c2.nii.gz", "mask": "seg/c2.nii.gz", "cot_reasoning": [_step("a", 1)]},
        "not a case",
    ]
    path = tmp_path / "cot.json"
    path.write_text(json.dumps(items))
    out = tmp_path / "out" / "datalist.json"
    report = convert_omniabnorm_cot(path, out, num_regions=8, val_fraction=0.0)
    assert report["rows"] == 11 and report["cases"] == 2
    reasons = {s["row"]: s["reason"] for s in report["skipped"]}
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8, 9, 10]
    assert reasons[3].startswith("mask file not found")
    assert reasons[4] == "empty cot_reasoning" and reasons[5] == "empty step 0"
    assert "unknown region name 'x'" in reasons[6] and "above num_regions 8" in reasons[7]
    assert reasons[8].startswith("missing keys") and reasons[9].startswith("image or mask differs")
    assert reasons[10] == "not an object"
    datalist = json.loads(out.read_text())
    c1, c2 = datalist["training"]
    assert c1["image"] == "../img/c1.nii.gz" and c1["mask"] == "../seg/c1.nii.gz"
    assert [s["mask_region"] for s in c1["report"]["cot"]] == [1, 1, 0, 4, 4]
    assert c1["report"]["findings"] == [{"text": "Nodule in the right lung.", "region": "right lung", "region_id": 1},
                                        {"text": "Cyst in the liver.", "region": "liver", "region_id": 4}]
    assert c1["report"]["impression"] == "Nodule in the right lung. Cyst in the liver."
    assert c1["report"]["regions_mentioned"] == [1, 4]
    assert c2["report"]["findings"][0]["text"] == "Mass." and c2["report"]["regions_mentioned"] == [2]


def test_convert_omniabnorm_design_records(tmp_path):
    """Records in the design's layout: image_path/mask_path, numbered steps with text, entities and region names."""
    for name in ("ct/case_0001.nii.gz", "masks/case_0001.nii.gz", "ct/case_0002.nii.gz", "masks/case_0002.nii.gz"):
        _touch(tmp_path / name)
    items = [
        {"case_id": "case_0001", "image_path": "ct/case_0001.nii.gz", "mask_path": "masks/case_0001.nii.gz",
         "region": "Bilateral hemithoraces", "category": "pleural effusion",
         "cot_reasoning": [
             {"step": 1, "text": "Locate both hemithoraces.", "anatomical_entities": ["hemithorax"],
              "mask_region": "Bilateral hemithoraces"},
             {"step": 2, "text": "Dependent fluid density along the right pleura.",
              "anatomical_entities": ["pleura", "right lung"], "mask_region": "Right_Lung"},
             {"step": 3, "text": "Heart size normal.", "anatomical_entities": ["heart"], "mask_region": "Heart"}]},
        {"case_id": "case_0002", "image_path": "ct/case_0002.nii.gz", "mask_path": "masks/case_0002.nii.gz",
         "region": "Pancreas", "category": "mass",
         "cot_reasoning": [{"step": 1, "text": "Locate the pancreas.", "anatomical_entities": ["pancreas"],
                            "mask_region": "Pancreas"}]},
    ]
    path = tmp_path / "omniabnorm_cot.json"
    path.write_text(json.dumps(items))
    report = convert_omniabnorm_cot(path, tmp_path / "datalist.json", val_fraction=0.0)
    assert report["cases"] == 1 and report["rows"] == 2
    assert report["skipped"] == [{"row": 1, "case_id": "case_0002", "reason": "step 0: unknown region name "
                                  "'Pancreas' (not in the region table; extend it with region_table)"}]
    case = json.loads((tmp_path / "datalist.json").read_text())["training"][0]
    assert case["image"] == "ct/case_0001.nii.gz" and case["mask"] == "masks/case_0001.nii.gz"
    cot = case["report"]["cot"]
    assert [s["step"] for s in cot] == ["Locate both hemithoraces.", "Dependent fluid density along the right pleura.",
                                        "Heart size normal."]
    assert [s["mask_region"] for s in cot] == [1, 1, 3] and cot[0]["mask_regions"] == [1, 2]
    assert "mask_regions" not in cot[1] and cot[1]["anatomical_entities"] == ["pleura", "right lung"]
    assert case["report"]["regions_mentioned"] == [1, 2, 3]
    assert case["report"]["findings"] == [{"text": "Pleural effusion in the Bilateral hemithoraces.",
                                           "region": "Bilateral hemithoraces", "region_id": 1}]

    # the unknown name converts once the table knows it (a JSON file, as the command line passes it)
    table = tmp_path / "regions.json"
    table.write_text(json.dumps({"pancreas": 0}))
    report = convert_omniabnorm_cot(path, tmp_path / "datalist2.json", val_fraction=0.0, region_table=table)
    assert report["cases"] == 2 and report["skipped"] == []
    with pytest.raises(ValueError, match="'pancreas' should map to a non-negative id"):
        load_region_table({"pancreas": -1})
    with pytest.raises(FileNotFoundError, match="region table not found"):
        load_region_table(tmp_path / "missing.json")


def test_omniabnorm_layout_errors(tmp_path):
    path = tmp_path / "cot.json"
    path.write_text(json.dumps({"case_id": "c1"}))
    with pytest.raises(ValueError, match="JSON list"):
        convert_omniabnorm_cot(path, tmp_path / "d.json")
    with pytest.raises(FileNotFoundError):
        convert_omniabnorm_cot(tmp_path / "missing.json", tmp_path / "d.json")
    with pytest.raises(ValueError, match="num_regions"):
        convert_omniabnorm_cot(path, tmp_path / "d.json", num_regions=0)
