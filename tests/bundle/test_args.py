"""Command-line values: one boolean coercion for every config id and CLI flag; overrides checked against configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.bundle.args import as_bool, check_command_line, config_ids, is_bundle_runner, parse_overrides
from common.engines.detection import YOLODetectionInferer
from common.handlers import ResumableCheckpoint
from common.transforms.outputs import CheckOutputsd
from tests.bundles.runner import BUNDLES

TRUE_CASES = [True, 1, "true", "True", "TRUE", "yes", "Yes", "on", "ON", "1", " true "]
FALSE_CASES = [False, 0, "false", "False", "FALSE", "no", "No", "off", "OFF", "0"]
ILL_CASES = ["maybe", "", "2", 2, None, 0.5, "truee"]

RUNNER = "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"
IRIS_INFERENCE = str(BUNDLES / "iris_incontext_segmentation" / "configs" / "inference.json")


@pytest.mark.parametrize("value", TRUE_CASES)
def test_true_words(value):
    assert as_bool(value, "x") is True


@pytest.mark.parametrize("value", FALSE_CASES)
def test_false_words(value):
    assert as_bool(value, "x") is False


@pytest.mark.parametrize("value", ILL_CASES)
def test_anything_else_names_the_id(value):
    with pytest.raises(ValueError, match="overwrite should be a boolean"):
        as_bool(value, "overwrite")


def test_parse_overrides():
    argv = ["run", "--config_file", "a.json", "--overwrite=false", "--flag", "--images", "x", "--n", "3"]
    assert parse_overrides(argv) == {"config_file": "a.json", "overwrite": "false", "flag": "true", "images": "x",
                                     "n": "3"}


def test_config_ids_in_override_notation():
    ids = dict(config_ids({"a": {"b": [1, {"c": True}]}, "d": False}))
    assert ids["a#b#1#c"] is True and ids["d"] is False and ids["a#b#0"] == 1


def test_only_monai_runner_is_checked(tmp_path):
    assert is_bundle_runner([RUNNER, "run"]) and not is_bundle_runner(["pytest", "run"])
    # a workflow built in Python (pytest's argv) is never refused
    check_command_line(["pytest", "--querys", "x"])


def test_known_ids_and_booleans_pass():
    check_command_line([RUNNER, "run", "--config_file", IRIS_INFERENCE, "--overwrite", "No",
                        "--images", "x", "--network_def#memory_momentum", "0.9", "--meta_file", "m.json"])


def test_unknown_id_lists_known_ones():
    message = r"unknown config id\(s\) '--imagez' \(did you mean '--images'\?\); known ids: .*overwrite"
    with pytest.raises(SystemExit, match=message):
        check_command_line([RUNNER, "run", "--config_file", IRIS_INFERENCE, "--imagez", "x"])


def test_boolean_id_refuses_other_words():
    with pytest.raises(SystemExit, match="--overwrite should be a boolean.*got 'maybe'"):
        check_command_line([RUNNER, "run", "--config_file", IRIS_INFERENCE, "--overwrite", "maybe"])


def test_components_read_false_as_false(tmp_path):
    (tmp_path / "case_seg.nii.gz").write_bytes(b"x")
    check = CheckOutputsd("image", tmp_path, [("seg", ".nii.gz")], overwrite="false")
    with pytest.raises(FileExistsError, match="outputs already exist"):
        check({"image": "/data/case.nii.gz"})
    assert CheckOutputsd("image", tmp_path, [("seg", ".nii.gz")], overwrite="true")({"image": "case.nii.gz"})
    assert YOLODetectionInferer(image_size=64, tta_flip="false").flips == (False,)
    assert YOLODetectionInferer(image_size=64, tta_flip="on").flips == (False, True)
    assert ResumableCheckpoint(tmp_path, {}, resume="false").resume is False
    with pytest.raises(ValueError, match="tta_flip should be a boolean"):
        YOLODetectionInferer(image_size=64, tta_flip="maybe")


def test_training_refuses_to_replace_weights_it_did_not_write(tmp_path):
    from ignite.engine import Engine

    (tmp_path / "model.pt").write_bytes(b"shipped")
    steps = []
    engine = Engine(lambda e, b: steps.append(b))
    ResumableCheckpoint(tmp_path, {}, outputs=["model.pt"], overwrite="false").attach(engine)  # building is fine
    with pytest.raises(FileExistsError, match="model.pt; training would replace them"):
        engine.run([0])
    assert steps == [] and (tmp_path / "model.pt").read_bytes() == b"shipped"
    allowed = Engine(lambda e, b: steps.append(b))
    ResumableCheckpoint(tmp_path, {}, outputs=["model.pt"], overwrite="true", save_interval=10).attach(allowed)
    allowed.run([0])
    assert steps == [0] and (tmp_path / "model.pt").read_bytes() == b"shipped"  # this run wrote no model.pt


@pytest.mark.slow
def test_command_line_refusals_end_with_the_message(tmp_path):
    """A misspelled id and a non-boolean exit 1 with the problem as the last line, before any case runs."""
    for args, message in [(["--querys", "x"], "unknown config id(s) '--querys'"),
                          (["--overwrite", "maybe"], "--overwrite should be a boolean")]:
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", IRIS_INFERENCE,
               "--output_dir", str(tmp_path / "out"), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        assert message in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "out" / "run_report.json").exists()


def test_cli_flags_use_the_same_coercion(tmp_path):
    """``python -m common.cli ... --overwrite false`` keeps an existing datalist; ``maybe`` is refused."""
    out = tmp_path / "cxr"
    base = [sys.executable, "-m", "common.cli", "synth_cxr", "--out", str(out), "--num_images", "2", "--size", "64"]
    subprocess.run(base, check=True, capture_output=True, timeout=300)
    before = (out / "datalist.json").read_bytes()
    proc = subprocess.run([*base, "--overwrite", "false"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "already exists" in proc.stderr
    assert (out / "datalist.json").read_bytes() == before
    proc = subprocess.run([*base, "--overwrite", "maybe"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--overwrite should be a boolean" in proc.stderr
    json.loads(before)
