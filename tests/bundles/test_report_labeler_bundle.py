"""The report labeler bundle run as a user runs it: inference on reports of every accepted form with bad inputs
named and skipped, nothing overwritten, labels.csv read back by the VinDr converter; training under torchrun."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from common.data import convert_vindr_classification
from common.data.findings_table import load_findings_table
from common.networks import ReportLabeler
from tests.bundles.runner import BUNDLES, assert_kept, bundle_run, snapshot, torchrun_bundle

BUNDLE = BUNDLES / "cxr_report_labeler"
SAMPLE = BUNDLE / "sample"
FINDINGS = load_findings_table()["findings"]


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    """Untrained weights in the shipped format (half precision, no embeddings): the pipeline, not the model, is
    under test here."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    state = ReportLabeler(num_classes=len(FINDINGS)).state_dict()
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    return path


def _bad_reports(folder: Path) -> dict[str, str]:
    """File name -> the problem its failure must name."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.txt").write_text("   \n")
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02PK\x03\x04" * 20)
    (folder / "latin1.txt").write_bytes("Kardiomegalie, Pleuraerguss rechts \xe9".encode("latin-1"))
    (folder / "huge.txt").write_text("No pleural effusion. " * 5000)  # ~100 kB
    return {"empty.txt": "empty", "binary.txt": "NUL", "latin1.txt": "UTF-8", "huge.txt": "characters"}


def test_inference_reads_every_form_names_bad_reports_and_writes_labels_for_the_converters(random_weights, tmp_path):
    reports = tmp_path / "reports"
    problems = _bad_reports(reports)
    for good in sorted((SAMPLE / "reports").iterdir()):
        (reports / good.name).write_bytes(good.read_bytes())
    out = tmp_path / "out"
    proc = bundle_run(BUNDLE, "inference.json", "--ckpt_path", str(random_weights), "--reports", str(reports),
                      "--output_dir", str(out), check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    run = json.loads((out / "run_report.json").read_text())
    assert len(run["completed"]) == 7
    failed = {Path(f["source"]).name: f["error"] for f in run["failed"]}
    assert sorted(failed) == sorted(problems)
    for name, problem in problems.items():
        assert str(reports / name) in failed[name] and problem in failed[name], failed[name]
    written = json.loads((out / "r02_cardiomegaly_effusion.json").read_text())
    assert list(written["findings"]) == FINDINGS and written["text"].startswith("The heart is enlarged.")
    for entity in written["entities"]:
        assert written["text"][entity["start"]:entity["end"]] == entity["text"]
    # labels.csv is what the chest X-ray converters read
    with open(out / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image_id"] for r in rows) == sorted(p.stem for p in (SAMPLE / "reports").iterdir())
    converted = convert_vindr_classification(out / "labels.csv", None, tmp_path / "vindr.json", val_fraction=0.0)
    assert converted["images"] == 7 and not converted["skipped"]
    datalist = json.loads((tmp_path / "vindr.json").read_text())
    by_id = {item["image_id"]: item for item in datalist["training"]}
    decided = {row["image_id"]: row for row in rows}
    for image_id, item in by_id.items():  # the converter reads back exactly the decisions written
        values = [int(decided[image_id][name]) for name in datalist["concepts"] + datalist["diseases"]]
        assert item["concepts"] + item["diseases"] == values


def test_a_csv_column_and_a_json_list_are_inputs_too(random_weights, tmp_path):
    table = tmp_path / "reports.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "report_text"])
        writer.writerow(["a1", "Heart is enlarged. Small right pleural effusion."])
        writer.writerow(["a2", ""])
    listed = tmp_path / "reports.json"
    listed.write_text(json.dumps([{"id": "b1", "text": "Normal chest. No acute disease."}]))
    out = tmp_path / "out"
    proc = bundle_run(BUNDLE, "inference.json", "--ckpt_path", str(random_weights), "--reports",
                      str([str(table), str(listed)]), "--text_column", "report_text", "--output_dir", str(out),
                      check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*.json") if p.name != "run_report.json") == ["a1.json", "b1.json"]
    failed = json.loads((out / "run_report.json").read_text())["failed"]
    assert len(failed) == 1 and "empty" in failed[0]["error"] and str(table) in failed[0]["error"]


def test_overwrite_false_keeps_existing_outputs(random_weights, tmp_path):
    out = tmp_path / "out"
    bundle_run(BUNDLE, "inference.json", "--ckpt_path", str(random_weights), "--output_dir", str(out))
    before = snapshot(out)
    bundle_run(BUNDLE, "inference.json", "--ckpt_path", str(random_weights), "--output_dir", str(out),
               "--overwrite", "false")
    assert_kept(before, out)
    run = json.loads((out / "run_report.json").read_text())
    assert len(run["skipped"]) == 7 and not run["completed"]


def test_multi_gpu_train_runs_under_torchrun_on_cpu(tmp_path):
    """Two CPU processes on the embedded sample, one epoch per stage: rank 0 alone writes the half-precision
    weights, with thresholds chosen on the validation split, and they load into the inference network."""
    models = tmp_path / "models"
    torchrun_bundle(BUNDLE, "--ckpt_dir", str(models), "--output_dir", str(tmp_path / "eval"), "--max_epochs", "2",
                    "--batch_size", "2", "--fine_tuning_stages", "[[1, 0], [2, 1]]")
    assert sorted(p.name for p in models.glob("*.pt")) == ["checkpoint_epoch=2.pt", "model.pt"]
    state = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert state["head.1.weight"].dtype == torch.float16
    network = ReportLabeler(num_classes=len(FINDINGS))
    network.load_state_dict(state, strict=True)
    assert not torch.equal(network.thresholds, torch.full_like(network.thresholds, 0.5))


def test_shipped_weights_label_the_sample_reports(tmp_path):
    """Known answers on the embedded sample (written for the bundle, never trained on): the four reports whose
    findings the shipped weights get exactly right (docs, Performance), a negated mention tagged as such, and
    their labels.csv rows."""
    out = tmp_path / "out"
    bundle_run(BUNDLE, "inference.json", "--output_dir", str(out))
    expected = {"r01_normal": ["normal"], "r02_cardiomegaly_effusion": ["cardiomegaly", "pleural_effusion"],
                "r03_granuloma_spine": ["calcified_granuloma", "degenerative_spine"],
                "r04_atelectasis": ["lung_opacity", "atelectasis"]}
    for report_id, positive in expected.items():
        assert json.loads((out / f"{report_id}.json").read_text())["positive"] == positive, report_id
    normal = json.loads((out / "r01_normal.json").read_text())
    negated = {e["text"]: e["negated"] for e in normal["entities"] if e["type"] == "FINDING"}
    assert negated["pleural effusion"] is True and negated["consolidation"] is True
    with open(out / "labels.csv", newline="") as f:
        rows = {row["image_id"]: row for row in csv.DictReader(f)}
    assert rows["r01_normal"]["No finding"] == "1" and rows["r02_cardiomegaly_effusion"]["No finding"] == "0"
    both = rows["r02_cardiomegaly_effusion"]
    assert both["Cardiomegaly"] == both["Pleural effusion"] == "1"
