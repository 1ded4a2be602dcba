"""Every bundle packaged, installed with ``monai.bundle download`` and run where this repository's ``common`` is gone.

Each bundle is copied to a temporary folder with its shipped ``models/model.pt``, which must load into the objects the
inference config's ``CheckpointLoader`` fills with no missing or unexpected keys: a bundle whose weights do not load
fails here instead of being packaged with random ones. The installed bundle is then run and loaded by a launcher
that removes the editable install of this repository (its import finder, path hook and any ``sys.path`` entry holding
a ``common`` folder) before handing over to ``monai.bundle``; it refuses to start if ``common`` is still importable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from common.bundle.package import package_bundle
from common.bundle.validate import find_bundles, validate_metadata

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLES = find_bundles(REPO_ROOT / "bundles")
# The same small sizes the bundles' own tests run with, for speed.
SMALL = {
    "iris_incontext_segmentation": ["--image_size", "[32,32,32]", "--strategy", "one_shot"],
    "csr_cxr_classification": ["--image_size", "[128,128]"],
}

LAUNCHER = '''"""Run ``-m MODULE ARGS`` or ``-c CODE ARGS`` with the editable install of ``common`` removed."""
import importlib.util
import os
import runpy
import sys

sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p and not os.path.exists(os.path.join(p or ".", "common"))]
sys.path_importer_cache.clear()
sys.modules.pop("common", None)
importlib.invalidate_caches()
if importlib.util.find_spec("common") is not None:
    sys.exit("isolation failed: common is importable")
mode, target, *args = sys.argv[1:]
if mode == "-m":
    sys.argv = [target, *args]
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    sys.argv = ["-c", *args]
    exec(compile(target, "<check>", "exec"), {"__name__": "__main__"})
'''

# Loads the installed bundle as another MONAI app would and compares its network with the packaged weights.
# MONAI's load copies tensors only (copy_model_state reads every value's shape), so non-tensor entries such as IRIS's
# memory-bank class names (a module's extra state) are skipped there and restored with load_state_dict.
CHECK = '''
import json, os, sys
import torch
import monai.bundle

try:
    import common  # noqa: F401
    common_importable = True
except ModuleNotFoundError:
    common_importable = False
name, bundle_dir = sys.argv[1:3]
sys.path.insert(0, os.path.join(bundle_dir, name))  # where the bundle's scripts package lives
ckpt = torch.load(os.path.join(bundle_dir, name, "models", "model.pt"), map_location="cpu", weights_only=True)
# every bundle's model.pt is the state dict of its network_def, as monai.bundle.load expects
net = monai.bundle.load(name=name, bundle_dir=bundle_dir, workflow_type="inference", device="cpu",
                        copy_model_args={"exclude_vars": "_extra_state$"})
expected = ckpt
state = net.state_dict()
tensors = {k for k, v in expected.items() if isinstance(v, torch.Tensor)}
result = {
    "common_importable": common_importable,
    "network": type(net).__module__ + "." + type(net).__qualname__,
    "missing": sorted(set(expected) - set(state)),
    # compared in the file's precision: weights may ship in half precision (the report labeler's)
    "different": sorted(k for k in tensors & set(state)
                        if not torch.equal(state[k].cpu().to(expected[k].dtype), expected[k])),
}
net.load_state_dict(expected)
result["extra_state_restored"] = all(net.state_dict()[k] == expected[k] for k in set(expected) - tensors)
print(json.dumps(result))
'''


def _checkpointed(bundle: Path) -> dict[str, torch.nn.Module]:
    """The objects the inference config's ``CheckpointLoader`` fills from ``ckpt_path``, by ``load_dict`` key."""
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    for i, handler in enumerate(parser["handlers"]):
        if handler.get("_target_") == "CheckpointLoader" and handler.get("load_path") == "@ckpt_path":
            return {key: parser.get_parsed_content(f"handlers#{i}#load_dict#{key}") for key in handler["load_dict"]}
    return {"model": parser.get_parsed_content("network_def")}


def _bundle_with_shipped_weights(source: Path, tmp: Path) -> Path:
    """A copy of ``source`` whose shipped ``models/model.pt`` loads, strictly, into what the inference config's
    ``CheckpointLoader`` fills: a bare state dict for one object, else one state dict per ``load_dict`` key."""
    weights = source / "models" / "model.pt"
    assert weights.is_file(), f"{source.name}: no shipped weights at {weights}"
    bundle = tmp / source.name
    shutil.copytree(source, bundle, ignore=shutil.ignore_patterns("__pycache__", "eval"))
    ckpt = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    objects = _checkpointed(bundle)
    for key, obj in objects.items():
        state = ckpt if len(objects) == 1 else ckpt.get(key)
        assert isinstance(state, dict), f"{source.name}: models/model.pt has no state dict for '{key}'"
        try:  # strict: a missing, unexpected or mis-shaped entry raises
            obj.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, ValueError) as e:
            pytest.fail(f"{source.name}: shipped weights do not load into '{key}': {e}")
    return bundle


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _isolated(launcher: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-I", str(launcher), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


def _ok(proc: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def launcher(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("launcher") / "isolated.py"
    path.write_text(LAUNCHER)
    return path


def test_launcher_hides_common(launcher, tmp_path):
    # -I alone still runs site-packages' .pth files, so the editable install would make common importable
    assert subprocess.run([sys.executable, "-I", "-c", "import common"], cwd=tmp_path).returncode == 0
    proc = _isolated(launcher, "-c", "import common", cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'common'" in proc.stderr


@pytest.mark.parametrize("source", BUNDLES, ids=[b.name for b in BUNDLES])
def test_packaged_bundle_runs_without_this_repository(source, launcher, tmp_path):
    bundle = _bundle_with_shipped_weights(source, tmp_path / "src")
    before = _snapshot(bundle)
    zip_path = package_bundle(bundle, tmp_path / "dist")
    assert _snapshot(bundle) == before, "packaging changed the source bundle"
    name = source.name
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
    assert {n.split("/")[0] for n in names} == {name}
    assert f"{name}/scripts/common/__init__.py" in names and f"{name}/large_files.yml" in names

    installed = tmp_path / "installed"
    # installed as another app would, by MONAI's own command, already without this repository's common
    _ok(_isolated(
        launcher, "-m", "monai.bundle", "download", "--name", name, "--url", zip_path.as_uri(),
        "--bundle_dir", str(installed), "--progress", "False", cwd=tmp_path,
    ), f"monai.bundle download of {name}")
    root = installed / name
    # the installed bundle carries the shipped weights, byte for byte
    assert (root / "models" / "model.pt").read_bytes() == (source / "models" / "model.pt").read_bytes()
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    validate_metadata(meta)
    assert "clinical-imaging-bundles" not in meta["required_packages_version"]
    inference = (root / "configs" / "inference.json").read_text()
    assert '"common.' not in inference and '"scripts.common.' in inference

    out = tmp_path / "out"
    _ok(_isolated(
        launcher, "-m", "monai.bundle", "run", "--config_file", str(root / "configs" / "inference.json"),
        "--bundle_root", str(root), "--output_dir", str(out), *SMALL.get(name, []), cwd=tmp_path,
    ), f"inference of the installed {name}")
    assert any(out.iterdir()), "inference wrote nothing"
    report = out / "run_report.json"
    if report.is_file():
        report = json.loads(report.read_text())
        assert report["completed"] and not report["failed"], report

    check = _ok(_isolated(launcher, "-c", CHECK, name, str(installed), cwd=tmp_path), "monai.bundle.load")
    result = json.loads(check.stdout.strip().splitlines()[-1])
    assert not result["common_importable"]
    assert result["network"].startswith("scripts.common."), result["network"]
    assert result["missing"] == [] and result["different"] == [] and result["extra_state_restored"], result


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    """The smallest complete bundle to test errors on: IRIS without its sample."""
    source = REPO_ROOT / "bundles" / "iris_incontext_segmentation"
    bundle = tmp_path_factory.mktemp("small") / source.name
    shutil.copytree(source, bundle, ignore=shutil.ignore_patterns("__pycache__", "eval", "sample", "model.pt"))
    torch.save({"w": torch.zeros(1)}, bundle / "models" / "model.pt")
    return bundle


def test_existing_zip_is_kept_unless_overwrite(small_bundle, tmp_path):
    first = package_bundle(small_bundle, tmp_path)
    stamp = first.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="iris_incontext_segmentation.*exists"):
        package_bundle(small_bundle, tmp_path)
    assert first.stat().st_mtime_ns == stamp
    assert package_bundle(small_bundle, tmp_path, overwrite=True) == first


def test_large_files_names_the_weights_with_their_hash(small_bundle, tmp_path):
    import hashlib

    with zipfile.ZipFile(package_bundle(small_bundle, tmp_path, weights_url="https://example.org/m.pt")) as archive:
        text = archive.read(f"{small_bundle.name}/large_files.yml").decode()
    digest = hashlib.sha256((small_bundle / "models" / "model.pt").read_bytes()).hexdigest()
    assert 'path: "models/model.pt"' in text and 'url: "https://example.org/m.pt"' in text
    assert f'hash_val: "{digest}"' in text and 'hash_type: "sha256"' in text


@pytest.mark.parametrize(
    "remove, message",
    [("models/model.pt", "models/model.pt is missing"), ("configs/metadata.json", "configs/metadata.json is missing")],
)
def test_missing_files_name_the_bundle_and_the_file(small_bundle, tmp_path, remove, message):
    bundle = tmp_path / small_bundle.name
    shutil.copytree(small_bundle, bundle)
    os.remove(bundle / remove)
    with pytest.raises(FileNotFoundError, match=f"bundle 'iris_incontext_segmentation': {message}"):
        package_bundle(bundle, tmp_path / "dist")
    assert not (tmp_path / "dist").exists()


def test_invalid_metadata_and_unknown_references_name_the_bundle(small_bundle, tmp_path):
    bundle = tmp_path / small_bundle.name
    shutil.copytree(small_bundle, bundle)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    (bundle / "configs" / "metadata.json").write_text(json.dumps({**meta, "version": "one"}))
    with pytest.raises(ValueError, match="(?s)bundle 'iris_incontext_segmentation'.*version"):
        package_bundle(bundle, tmp_path / "dist")

    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["network_def"]["_target_"] = "common.nowhere.Net"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="bundle 'iris_incontext_segmentation': 'common.nowhere.Net' is not"):
        package_bundle(bundle, tmp_path / "dist")
