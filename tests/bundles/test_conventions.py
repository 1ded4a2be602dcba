"""Conventions every bundle under ``bundles/`` follows; each check is a ``common.bundle`` function run per bundle.

A bundle is a folder of ``bundles/`` with a ``configs/metadata.json``. The checks need no trained weights and no data.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from common.bundle import (
    TORCHSCRIPT_OPT_OUT,
    check_bundle_layout,
    check_workflow_properties,
    export_torchscript,
    find_bundles,
    torchscript_exclusion,
    validate_metadata,
    verify_network_io,
)

BUNDLES_DIR = Path(__file__).resolve().parents[2] / "bundles"
# One xdist group per bundle: its checks share a worker, so the bundle's imports are paid once.
BUNDLES = [
    pytest.param(path, id=path.name, marks=pytest.mark.xdist_group(name=f"bundle-{path.name}"))
    for path in find_bundles(BUNDLES_DIR)
]


def test_bundles_folder_is_discovered():
    assert BUNDLES_DIR.is_dir(), f"{BUNDLES_DIR} should exist"
    # a folder without configs/metadata.json would silently escape every check below
    folders = [p for p in BUNDLES_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    bundles = find_bundles(BUNDLES_DIR)
    assert sorted(p.name for p in folders if p not in bundles) == [], "folders without configs/metadata.json"


@pytest.mark.parametrize("bundle_dir", BUNDLES)
def test_required_files(bundle_dir):
    assert check_bundle_layout(bundle_dir) == []


@pytest.mark.parametrize("bundle_dir", BUNDLES)
def test_metadata(bundle_dir):
    validate_metadata(bundle_dir / "configs" / "metadata.json")


@pytest.mark.parametrize("workflow_type", ["train", "infer"])
@pytest.mark.parametrize("bundle_dir", BUNDLES)
def test_workflow_properties(bundle_dir, workflow_type, tmp_path):
    assert check_workflow_properties(bundle_dir, workflow_type, work_dir=tmp_path) == []


@pytest.mark.parametrize("bundle_dir", BUNDLES)
def test_network_in_out(bundle_dir):
    verify_network_io(bundle_dir)


@pytest.mark.parametrize("bundle_dir", BUNDLES)
def test_torchscript_export(bundle_dir, tmp_path):
    reason = torchscript_exclusion(bundle_dir)
    if reason is not None:
        pytest.skip(f"{TORCHSCRIPT_OPT_OUT}: {reason}")
    export_torchscript(bundle_dir, tmp_path / "model.ts")
