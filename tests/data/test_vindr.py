from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from common.data.vindr import (
    VINDR_DETECTION_CLASSES,
    VINDR_GLOBAL_LABELS,
    VINDR_LOCAL_LABELS,
    convert_vindr_classification,
    convert_vindr_detection,
)

_XRV = importlib.util.find_spec("torchxrayvision")
VINBIGDATA_CSV = Path(_XRV.origin).parent / "data" / "vinbigdata-train.csv.gz" if _XRV else None
LABELS = VINDR_LOCAL_LABELS + VINDR_GLOBAL_LABELS
NODULE = VINDR_DETECTION_CLASSES.index("Nodule/Mass")  # 8
CARDIOMEGALY = VINDR_DETECTION_CLASSES.index("Cardiomegaly")  # 3


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _label_row(image_id: str, reader: str, positives: dict[str, str] | list[str]) -> list:
    values = positives if isinstance(positives, dict) else {name: "1" for name in positives}
    return [image_id, reader, *(values.get(name, "0") for name in LABELS)]


def _write_dicom(path: Path, rows: int, columns: int) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PhotometricInterpretation, ds.SamplesPerPixel = "DX", "MONOCHROME2", 1
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.zeros((rows, columns), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_majority_vote_by_hand(tmp_path):
    rows = [
        # A: nodule marked by 2 of 3 -> 1; cardiomegaly by 1 of 3 -> 0; lung tumor by 3 of 3 -> 1
        _label_row("A", "R1", ["Nodule/Mass", "Cardiomegaly", "Lung tumor"]),
        _label_row("A", "R2", ["Nodule/Mass", "Lung tumor"]),
        _label_row("A", "R3", ["Lung tumor"]),
        # B: three normal readers, the third row has a bad value and is dropped
        _label_row("B", "R4", ["No finding"]),
        _label_row("B", "R5", ["No finding", "Pneumonia"]),
        _label_row("B", "R6", {"No finding": "yes"}),
        # C: a single consensus row; its file is missing from the image folder
        _label_row("C", "R7", ["Pleural effusion"]),
    ]
    header = ["image_id", "rad_ID", *LABELS[:-2], "Other disease", "No finding"]  # test-set spellings
    labels_csv = _write_csv(tmp_path / "image_labels_train.csv", header, rows)
    images = tmp_path / "train"
    images.mkdir()
    for image_id in ("A", "B"):
        (images / f"{image_id}.dicom").write_bytes(b"")
    out = tmp_path / "lists" / "vindr_cls.json"
    report = convert_vindr_classification(labels_csv, images, out, val_fraction=0.0)
    datalist = json.loads(out.read_text())
    assert datalist["concepts"] == list(VINDR_LOCAL_LABELS) and datalist["diseases"] == list(VINDR_GLOBAL_LABELS)
    items = {item["image_id"]: item for item in datalist["training"]}
    assert sorted(items) == ["A", "B"] and datalist["validation"] == []
    a, b = items["A"], items["B"]
    assert a["image"] == "../train/A.dicom" and a["readers"] == 3 and b["readers"] == 2
    assert [VINDR_LOCAL_LABELS[i] for i, v in enumerate(a["concepts"]) if v] == ["Nodule/Mass"]
    assert [VINDR_GLOBAL_LABELS[i] for i, v in enumerate(a["diseases"]) if v] == ["Lung tumor"]
    # B keeps two readers: "No finding" 2 of 2 -> 1, pneumonia 1 of 2 -> 0
    assert not any(b["concepts"]) and [VINDR_GLOBAL_LABELS[i] for i, v in enumerate(b["diseases"]) if v] == [
        "No finding"]
    assert report["images"] == 2 and report["rows"] == 7 and report["readers"] == {2: 1, 3: 1}
    assert report["positives"]["Nodule/Mass"] == 1 and report["positives"]["Cardiomegaly"] == 0
    bad_row, missing = report["skipped"]
    assert bad_row["row"] == 7 and bad_row["image_id"] == "B" and "No finding='yes'" in bad_row["reason"]
    assert missing["image_id"] == "C" and "not found" in missing["reason"]

    # without an image folder every image converts, and a single reader decides alone
    report = convert_vindr_classification(labels_csv, None, out, val_fraction=0.5, split_seed=1)
    datalist = json.loads(out.read_text())
    assert report["images"] == 3 and (report["training"], report["validation"]) == (1, 2)  # round(1.5) == 2
    c = next(item for item in datalist["training"] + datalist["validation"] if item["image_id"] == "C")
    assert c["image"] == "C.dicom" and c["concepts"][VINDR_LOCAL_LABELS.index("Pleural effusion")] == 1


def test_classification_needs_every_label_column(tmp_path):
    labels_csv = _write_csv(tmp_path / "labels.csv", ["image_id", "rad_id", *LABELS[1:]], [])
    with pytest.raises(ValueError, match="Aortic enlargement"):
        convert_vindr_classification(labels_csv, None, tmp_path / "out.json")
    with pytest.raises(FileNotFoundError):
        convert_vindr_classification(tmp_path / "missing.csv", None, tmp_path / "out.json")
    with pytest.raises(ValueError, match="val_fraction"):
        convert_vindr_classification(labels_csv, None, tmp_path / "out.json", val_fraction=1.5)


DETECTION_HEADER = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
DETECTION_ROWS = [
    ["img1", "Nodule/Mass", 8, "R1", 10, 10, 30, 30],  # line 2: fuses with line 3
    ["img1", "Nodule/Mass", 8, "R2", 12, 10, 32, 30],  # line 3
    ["img1", "No finding", 14, "R3", "", "", "", ""],  # line 4: a third reader saw nothing
    ["img1", "Cardiomegaly", 3, "R1", 50, 40, 150, 90],  # line 5: one reader of three
    ["img1", "Aortic enlargement", 0, "R2", 150, 50, 250, 80],  # line 6: x_max 250 beyond the 200 wide image
    ["img2", "Pleural effusion", 10, "R1", 80, 20, 40, 60],  # line 7: x_max < x_min
    ["img2", "Dragon", 99, "R2", 10, 10, 20, 20],  # line 8: unknown class
    ["img2", "Pleural effusion", 10, "R3", "nan", 10, 20, 20],  # line 9: NaN coordinate
    ["img2", "Pleural effusion", 10, "R3", 10, 10, "", 20],  # line 10: missing coordinate
    ["img3", "No finding", 14, "R1", "", "", "", ""],  # lines 11-13: background
    ["img3", "No finding", 14, "R2", "", "", "", ""],
    ["img3", "No finding", 14, "R3", "", "", "", ""],
    ["img4", "Pleural effusion", 3, "R1", 10, 10, 20, 20],  # line 14: class_id of Cardiomegaly
    ["img4", "Pleural effusion", 10, "R2", 100, 100, 200, 220],  # line 15: good; R1 had no valid row
]
SIZES = {"img1": (100, 200), "img2": (100, 100), "img3": (64, 64), "img4": (256, 256)}


def test_detection_converter_by_hand(tmp_path):
    annotations = _write_csv(tmp_path / "train.csv", DETECTION_HEADER, DETECTION_ROWS)
    out = tmp_path / "det"
    report = convert_vindr_detection(annotations, out, image_sizes=SIZES, val_fraction=0.0, yolo_labels=True)
    reasons = {entry.get("row", entry["image_id"]): entry["reason"] for entry in report["skipped"]}
    assert "outside the 200x100 image" in reasons[6]
    assert "inverted box" in reasons[7]
    assert "unknown class name 'Dragon'" in reasons[8]
    assert "not finite" in reasons[9] and "x_max is missing" in reasons[10]
    assert "does not match" in reasons[14]
    assert reasons["img2"] == "no valid rows"  # all four rows of img2 were bad
    assert len(reasons) == 7
    assert report["images"] == 3 and report["background"] == 1 and report["rows"] == 14
    assert report["boxes"] == 4 and report["fused_boxes"] == 3 and report["unknown_size"] == []
    assert report["per_class"] == {"Cardiomegaly": 1, "Nodule/Mass": 1, "Pleural effusion": 1}

    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["lesion_classes"] == list(VINDR_DETECTION_CLASSES) and datalist["validation"] == []
    items = {item["image_id"]: item for item in datalist["training"]}
    img1 = items["img1"]
    assert img1["image"] == "img1.dicom" and img1["image_size"] == [100, 200] and img1["readers"] == 3
    assert img1["boxes"] == [[CARDIOMEGALY, 50, 40, 150, 90], [NODULE, 11, 10, 31, 30]]
    assert img1["box_scores"] == [round(1 / 3, 4), round(2 / 3, 4)]  # 1 and 2 of 3 readers
    assert items["img3"]["boxes"] == [] and items["img3"]["readers"] == 3
    assert items["img4"]["box_scores"] == [1.0] and items["img4"]["readers"] == 1  # readers with a valid row

    # YOLO: class cx cy w h, normalised by width 200 and height 100
    assert (out / img1["label"]).read_text() == ("3 0.500000 0.650000 0.500000 0.500000\n"
                                                 "8 0.105000 0.200000 0.100000 0.200000\n")
    assert (out / "labels" / "img3.txt").read_text() == ""
    assert (out / "labels" / "img4.txt").read_text() == "10 0.585938 0.625000 0.390625 0.468750\n"

    # agreement filter: only boxes drawn by at least half of the readers
    report = convert_vindr_detection(annotations, out, image_sizes=SIZES, val_fraction=0.0, min_score=0.5)
    assert report["per_class"] == {"Nodule/Mass": 1, "Pleural effusion": 1}


def test_detection_sizes_from_dicom_headers(tmp_path):
    images = tmp_path / "train"
    images.mkdir()
    _write_dicom(images / "img1.dicom", 100, 200)
    _write_dicom(images / "img3.dicom", 64, 64)
    annotations = _write_csv(tmp_path / "train.csv", DETECTION_HEADER, DETECTION_ROWS)
    report = convert_vindr_detection(annotations, tmp_path / "det", image_dir=images, val_fraction=0.0)
    reasons = {entry.get("row", entry["image_id"]): entry["reason"] for entry in report["skipped"]}
    assert "outside the 200x100 image" in reasons[6]  # the size came from Rows/Columns
    assert "not found" in reasons["img2"] and "not found" in reasons["img4"]
    datalist = json.loads((tmp_path / "det" / "datalist.json").read_text())
    assert [item["image"] for item in datalist["training"]] == ["../train/img1.dicom", "../train/img3.dicom"]
    assert datalist["training"][0]["image_size"] == [100, 200]


def test_detection_without_sizes_and_bad_header(tmp_path):
    annotations = _write_csv(tmp_path / "train.csv", DETECTION_HEADER, DETECTION_ROWS)
    report = convert_vindr_detection(annotations, tmp_path / "det", val_fraction=0.0)
    assert sorted(report["unknown_size"]) == ["img1", "img3", "img4"]
    assert 6 not in {entry.get("row") for entry in report["skipped"]}  # outside check skipped without a size
    report = convert_vindr_detection(annotations, tmp_path / "det", yolo_labels=True)
    assert report["images"] == 0 and all("size unknown" in e["reason"] for e in report["skipped"] if "row" not in e)
    no_boxes = _write_csv(tmp_path / "bad.csv", ["image_id", "class_name"], [["img1", "No finding"]])
    with pytest.raises(ValueError, match="x_min"):
        convert_vindr_detection(no_boxes, tmp_path / "det")


@pytest.mark.skipif(VINBIGDATA_CSV is None or not VINBIGDATA_CSV.is_file(),
                    reason="torchxrayvision's copy of the VinBigData train.csv is not installed")
def test_real_vinbigdata_rows(tmp_path):
    pd = pytest.importorskip("pandas")
    table = pd.read_csv(VINBIGDATA_CSV)
    # every row of the first 60 images (a few hundred rows), so the readers' boxes meet
    first = table["image_id"].drop_duplicates().iloc[:60]
    subset = table[table["image_id"].isin(set(first))]
    assert 150 < len(subset) < 600
    annotations = tmp_path / "train.csv"
    subset.to_csv(annotations, index=False)
    # sizes are unknown (no images), so boxes are not checked against the image bounds
    report = convert_vindr_detection(annotations, tmp_path / "det", image_sizes=None, yolo_labels=False)
    assert report["skipped"] == [] and report["images"] == 60 and report["rows"] == len(subset)
    assert report["training"] == 54 and report["validation"] == 6 and len(report["unknown_size"]) == 60
    findings = subset[subset["class_id"] != 14]
    assert report["boxes"] == len(findings) and 0 < report["fused_boxes"] <= len(findings)
    normal = subset.groupby("image_id")["class_id"].apply(lambda ids: bool((ids == 14).all()))
    assert report["background"] == int(normal.sum())
    datalist = json.loads((tmp_path / "det" / "datalist.json").read_text())
    items = datalist["training"] + datalist["validation"]
    readers = subset.groupby("image_id")["rad_id"].nunique()
    for item in items:
        assert item["readers"] == readers[item["image_id"]] and len(item["boxes"]) == len(item["box_scores"])
        for (class_index, x0, y0, x1, y1), score in zip(item["boxes"], item["box_scores"]):
            assert 0 <= class_index < 14 and 0 <= x0 < x1 and 0 <= y0 < y1 and 0 < score <= 1
