"""Bundles run from any working directory: ``bundle_root`` comes from the config file's path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.bundle import find_bundles
from common.bundle.root import bundle_root

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, expected", [
    (["run", "--config_file", "bundles/b/configs/inference.json"], "bundles/b"),
    (["run", "--config_file", "['bundles/b/configs/train.json', 'bundles/b/configs/evaluate.json']"], "bundles/b"),
    (["run", "--config_file=/srv/b/configs/train.json", "--max_epochs", "1"], "/srv/b"),
    (["run", "--config_file", "extra/train.json"], "extra"),  # a config outside configs/: its own folder
    (["run", "--meta_file", "b/configs/metadata.json"], "."),  # no config file: the default
])
def test_bundle_root_from_the_command_line(argv, expected):
    assert bundle_root(argv=argv) == expected


@pytest.mark.parametrize("bundle", find_bundles(REPO / "bundles"), ids=lambda p: p.name)
def test_configs_take_bundle_root_from_their_path(bundle):
    for name in ("train.json", "inference.json"):
        config = json.loads((bundle / "configs" / name).read_text())
        assert config["bundle_root"] == {"_target_": "common.bundle.root.bundle_root"}, f"{bundle.name}/{name}"


@pytest.mark.slow
def test_inference_runs_as_a_user_types_it_from_the_repository_root(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "monai.bundle", "run",
           "--config_file", "bundles/ct_report_encoder/configs/inference.json", "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "run_report.json").read_text())
    assert report["completed"] and not report["failed"]  # the embedded sample, found through bundle_root
