"""``python -m common.cli convert <kind>``: each kind run through fire as a user types it, on a small input in the
real format, gives what its converter function gives when called directly."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fire
import pytest

from common.cli import CLI, CONVERT_KINDS
from common.data.ct_rate import convert_ct_rate, convert_omniabnorm_cot
from common.data.openi import convert_openi_reports
from common.data.vindr import convert_vindr_classification, convert_vindr_detection
from tests.data.test_ct_rate import _step, _touch
from tests.data.test_ct_rate import _write_csv as _write_reports_csv
from tests.data.test_openi import SMALL_REPORTS, _report_xml
from tests.data.test_vindr import DETECTION_HEADER, DETECTION_ROWS, LABELS, _label_row, _write_csv, _write_dicom


def convert(*args: str, capsys) -> dict:
    """Run ``convert`` through fire's parsing (strings in, as from a shell) and return the JSON it printed."""
    capsys.readouterr()
    fire.Fire(CLI, command=["convert", *args])
    return json.loads(capsys.readouterr().out)


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_vindr_boxes(tmp_path, capsys):
    images = tmp_path / "train"
    images.mkdir()
    # img2 has no file, so it is skipped as a whole beside the two bad rows of the others
    for image_id, (rows, columns) in {"img1": (100, 200), "img3": (64, 64), "img4": (256, 256)}.items():
        _write_dicom(images / f"{image_id}.dicom", rows, columns)
    annotations = _write_csv(tmp_path / "train.csv", DETECTION_HEADER, DETECTION_ROWS)
    summary = convert("vindr", "--out", str(tmp_path / "cli"), "--csv", str(annotations), "--image_dir", str(images),
                      "--val_fraction", "0", "--yolo_labels", "true", capsys=capsys)
    direct = convert_vindr_detection(annotations, tmp_path / "direct", image_dir=images, val_fraction=0.0,
                                     yolo_labels=True)
    assert _read(tmp_path / "cli" / "datalist.json") == _read(tmp_path / "direct" / "datalist.json")
    assert summary["images"] == direct["images"] == 3 and summary["skipped"] == len(direct["skipped"]) == 3
    assert summary["per_class"] == direct["per_class"] == {"Cardiomegaly": 1, "Nodule/Mass": 1, "Pleural effusion": 1}
    assert sorted(p.name for p in (tmp_path / "cli" / "labels").iterdir()) == ["img1.txt", "img3.txt", "img4.txt"]
    # the flag named 'false' is a boolean, not a truthy string
    summary = convert("vindr", "--out", str(tmp_path / "no_labels"), "--csv", str(annotations), "--image_dir",
                      str(images), "--yolo_labels", "false", capsys=capsys)
    assert summary["images"] == 3 and not (tmp_path / "no_labels" / "labels").exists()


def test_vindr_image_labels(tmp_path, capsys):
    rows = [_label_row("A", "R1", ["Nodule/Mass", "Lung tumor"]), _label_row("A", "R2", ["Nodule/Mass"]),
            _label_row("A", "R3", ["Lung tumor"]), _label_row("B", "R4", ["No finding"]),
            _label_row("C", "R5", {"No finding": "yes"})]
    labels = _write_csv(tmp_path / "image_labels_train.csv", ["image_id", "rad_id", *LABELS], rows)
    summary = convert("vindr-labels", "--out", str(tmp_path / "cli"), "--csv", str(labels), "--val_fraction", "0.5",
                      "--seed", "3", capsys=capsys)
    direct = convert_vindr_classification(labels, None, tmp_path / "direct" / "datalist.json", split_seed=3,
                                          val_fraction=0.5)
    assert _read(tmp_path / "cli" / "datalist.json") == _read(tmp_path / "direct" / "datalist.json")
    assert summary["images"] == direct["images"] == 2 and summary["skipped"] == 1
    assert summary["training"] == summary["validation"] == 1


def test_ct_rate(tmp_path, capsys):
    for name in ("train_1_a_1", "train_1_a_2", "train_2_a_1"):
        _touch(tmp_path / "dataset" / "train" / "_".join(name.split("_")[:2]) / f"{name}.nii.gz")
        _touch(tmp_path / "masks" / f"{name}.nii.gz")
    reports = _write_reports_csv(tmp_path / "reports.csv", [
        ["train_1_a_1.nii.gz", "", "A 6 mm nodule in the right lower lobe. The liver is normal.", "Nodule."],
        ["train_1_a_2.nii.gz", "", "Heart normal.", "Normal."],
        ["train_2_a_1.nii.gz", "", "nan", "Normal."],  # empty findings
        ["train_9_a_1.nii.gz", "", "Spleen normal.", "Normal."],  # no volume
    ])
    summary = convert("ct-rate", "--out", str(tmp_path / "cli"), "--csv", str(reports), "--volume_dir",
                      str(tmp_path / "dataset"), "--mask_dir", str(tmp_path / "masks"), "--val_fraction", "0",
                      capsys=capsys)
    direct = convert_ct_rate(reports, tmp_path / "dataset", tmp_path / "direct" / "datalist.json",
                             mask_dir=tmp_path / "masks", val_fraction=0.0)
    datalist = _read(tmp_path / "cli" / "datalist.json")
    assert datalist == _read(tmp_path / "direct" / "datalist.json")
    assert summary == {"datalist": str(tmp_path / "cli" / "datalist.json"), "cases": 2, "training": 2,
                       "validation": 0, "rows": 4, "skipped": 2} and direct["cases"] == 2
    assert [f["region_id"] for f in datalist["training"][0]["report"]["findings"]] == [1, 4]


def test_omniabnorm(tmp_path, capsys):
    for name in ("img/c1.nii.gz", "seg/c1.nii.gz", "img/c2.nii.gz", "seg/c2.nii.gz"):
        _touch(tmp_path / "data" / name)
    items = [
        {"case_id": "c1", "image": "img/c1.nii.gz", "mask": "seg/c1.nii.gz", "region": "right lung",
         "category": "nodule", "cot_reasoning": [_step("Find the right lung.", 1), _step("Nodule there.", 1)]},
        {"case_id": "c2", "image": "img/c2.nii.gz", "mask": "seg/c2.nii.gz", "region": "pancreas",
         "category": "mass", "cot_reasoning": [_step("Locate the pancreas.", "Pancreas")]},
        {"case_id": "c3", "image": "img/c2.nii.gz", "mask": "seg/c2.nii.gz", "cot_reasoning": [_step("a", 9)]},
    ]
    cot = tmp_path / "cot.json"
    cot.write_text(json.dumps(items))
    table = tmp_path / "regions.json"
    table.write_text(json.dumps({"pancreas": 4}))
    args = ["--cot_json", str(cot), "--image_root", str(tmp_path / "data"), "--num_regions", "8", "--region_table",
            str(table), "--val_fraction", "0"]
    summary = convert("omniabnorm", "--out", str(tmp_path / "cli"), *args, capsys=capsys)
    direct = convert_omniabnorm_cot(cot, tmp_path / "direct" / "datalist.json", image_root=tmp_path / "data",
                                    num_regions=8, region_table=table, val_fraction=0.0)
    assert _read(tmp_path / "cli" / "datalist.json") == _read(tmp_path / "direct" / "datalist.json")
    assert summary["cases"] == direct["cases"] == 2 and summary["rows"] == 3 and summary["skipped"] == 1


def test_openi(tmp_path, capsys):
    tgz = tmp_path / "reports.tgz"
    with tarfile.open(tgz, "w:gz") as archive:
        for report in SMALL_REPORTS:
            data = _report_xml(*report).encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{report[0][3:]}.xml")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    summary = convert("openi", "--out", str(tmp_path / "cli"), "--tgz", str(tgz), "--val_fraction", "0.25",
                      "--test_fraction", "0.25", "--seed", "3", capsys=capsys)
    direct = convert_openi_reports(tmp_path / "direct", tgz=tgz, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert _read(tmp_path / "cli" / "datalist.json") == _read(tmp_path / "direct" / "datalist.json")
    assert summary["kept"] == direct["kept"] == 8 and summary["reports"] == 10 and summary["skipped"] == 2
    assert summary["splits"] == direct["splits"] and (tmp_path / "cli" / "report.json").is_file()


def test_unknown_kind_names_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="unknown kind 'vinder'; choose from vindr, vindr-labels, ct-rate"):
        CLI().convert("vinder", str(tmp_path))
    assert set(CONVERT_KINDS) == {"vindr", "vindr-labels", "ct-rate", "omniabnorm", "openi"}
    assert not any(tmp_path.iterdir())


def test_refuses_to_overwrite_unless_asked(tmp_path, capsys):
    labels = _write_csv(tmp_path / "labels.csv", ["image_id", "rad_id", *LABELS], [_label_row("A", "R1", [])])
    out = tmp_path / "out"
    convert("vindr-labels", "--out", str(out), "--csv", str(labels), capsys=capsys)
    (out / "datalist.json").write_text("{}\n")
    for kind, args in [("vindr-labels", ["--csv", str(labels)]), ("vindr", ["--csv", str(labels)]),
                       ("openi", ["--tgz", str(tmp_path / "none.tgz")])]:
        with pytest.raises(SystemExit, match=f"{out / 'datalist.json'} already exists; pass --overwrite true"):
            convert(kind, "--out", str(out), *args, "--overwrite", "false", capsys=capsys)
    assert (out / "datalist.json").read_text() == "{}\n"
    summary = convert("vindr-labels", "--out", str(out), "--csv", str(labels), "--overwrite", "true", capsys=capsys)
    assert summary["images"] == 1 and _read(out / "datalist.json")["training"][0]["image_id"] == "A"


def test_bad_inputs_are_named(tmp_path, capsys):
    missing = tmp_path / "nothing.csv"
    with pytest.raises(SystemExit, match=f"convert ct-rate failed: {missing}: file not found"):
        convert("ct-rate", "--out", str(tmp_path / "o"), "--csv", str(missing), "--volume_dir", str(tmp_path),
                capsys=capsys)
    with pytest.raises(SystemExit, match=f"convert vindr failed: {missing}: file not found"):
        convert("vindr", "--out", str(tmp_path / "o"), "--csv", str(missing), capsys=capsys)
    with pytest.raises(SystemExit, match=f"convert omniabnorm failed: {tmp_path / 'cot.json'}: file not found"):
        convert("omniabnorm", "--out", str(tmp_path / "o"), "--cot_json", str(tmp_path / "cot.json"), capsys=capsys)
    with pytest.raises(SystemExit, match=f"--image_dir {tmp_path / 'images'}: folder not found"):
        convert("vindr", "--out", str(tmp_path / "o"), "--image_dir", str(tmp_path / "images"), capsys=capsys)
    with pytest.raises(SystemExit, match="--csv and --volume_dir required"):
        convert("ct-rate", "--out", str(tmp_path / "o"), capsys=capsys)
    with pytest.raises(SystemExit, match="--volume_dir not taken by vindr; it takes --csv, --image_dir"):
        convert("vindr", "--out", str(tmp_path / "o"), "--volume_dir", str(tmp_path), capsys=capsys)
    with pytest.raises(ValueError, match="--yolo_labels"):
        convert("vindr", "--out", str(tmp_path / "o"), "--yolo_labels", "maybe", capsys=capsys)
    assert not (tmp_path / "o").exists()
