"""Unit tests of the bundle checks, on metadata written here and on small bundles built in a temporary folder."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from jsonschema import Draft202012Validator
from monai.bundle import ConfigParser

from common.bundle import (
    README_SECTIONS,
    REQUIRED_FILES,
    check_bundle_layout,
    check_workflow_properties,
    export_torchscript,
    fake_network_inputs,
    find_bundles,
    load_metadata_schema,
    torchscript_exclusion,
    validate_metadata,
    verify_network_io,
)
from common.bundle.validate import _trainer_uses_inferer

_DELETE = object()


def _tensor(fmt: str, num_channels: int, names: list[str], shape: list, value_range: list) -> dict:
    return {
        "type": "image",
        "format": fmt,
        "modality": "MR",
        "num_channels": num_channels,
        "spatial_shape": shape,
        "dtype": "float32",
        "value_range": value_range,
        "is_patch_data": False,
        "channel_def": {str(i): name for i, name in enumerate(names)},
    }


def _metadata(inputs: dict, outputs: dict) -> dict:
    return {
        "schema": "local:common/bundle/metadata_schema.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "first release", "0.0.1": "layout"},
        "monai_version": "1.6.1",
        "pytorch_version": "2.14.1",
        "numpy_version": "2.4.6",
        "required_packages_version": {"nibabel": "5.4.2"},
        "name": "Toy segmentation",
        "task": "Toy 2D segmentation",
        "description": "A tiny network for testing the bundle checks.",
        "authors": ["Test Author"],
        "copyright": "Copyright (c) the authors",
        "data_source": "synthetic",
        "data_type": "nifti",
        "intended_use": "Tests only.",
        "eval_metrics": {"mean_dice": 0.5},
        "references": ["None."],
        "network_data_format": {"inputs": inputs, "outputs": outputs},
    }


UNET_META = _metadata(
    {"image": _tensor("magnitude", 1, ["image"], ["32*n", "32*n"], [0, 1])},
    {"pred": _tensor("labels", 2, ["background", "foreground"], ["32*n", "32*n"], [])},
)
IRIS_META = _metadata(
    {
        "image": _tensor("magnitude", 1, ["image"], [16, 16], [0, 1]),
        "ref_image": _tensor("magnitude", 1, ["reference image"], [16, 16], [0, 1]),
        "ref_mask": _tensor("segmentation", 2, ["class a", "class b"], [16, 16], [0, 1]),
    },
    {"pred": _tensor("classes", 2, ["class a", "class b"], [16, 16], [])},
)
UNET_DEF = {
    "_target_": "BasicUNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 2,
    "features": [4, 4, 8, 8, 16, 4],
}
IRIS_DEF = {"_target_": "common.networks.iris_small", "spatial_dims": 2}

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=WARNING
handlers=console

[handler_console]
class=StreamHandler
level=WARNING
formatter=plain
args=(sys.stdout,)

[formatter_plain]
format=%(asctime)s %(name)s %(levelname)s %(message)s
"""


def _readme(sections=README_SECTIONS, extra: str = "") -> str:
    body = "\n\n".join(f"## {s}\n\nText." for s in sections)
    return f"# Toy bundle\n\n{body}\n{extra}"


def _transforms(keys: list[str]) -> dict:
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": keys},
            {"_target_": "EnsureChannelFirstd", "keys": keys},
            {"_target_": "ScaleIntensityd", "keys": "image"},
        ],
    }


def _inference_config(network_def: dict) -> dict:
    return {
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "dataset_dir": "/nonexistent/data",
        "output_dir": "$@bundle_root + '/eval'",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": _transforms(["image"]),
        "dataset": {
            "_target_": "Dataset",
            "data": [{"image": "$@dataset_dir + '/case0.nii.gz'"}],
            "transform": "@preprocessing",
        },
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        },
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
        "finalize": [],
    }


def _stage(name: str, shuffle: bool) -> dict:
    return {
        "preprocessing": _transforms(["image", "label"]),
        "dataset": {
            "_target_": "Dataset",
            "data": [{"image": "$@dataset_dir + '/img0.nii.gz'", "label": "$@dataset_dir + '/seg0.nii.gz'"}],
            "transform": f"@{name}#preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": f"@{name}#dataset",
            "batch_size": 1,
            "shuffle": shuffle,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False], "to_onehot": 2}
            ],
        },
        "key_metric": {
            f"{name}_mean_dice": {
                "_target_": "MeanDice",
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        },
    }


def _train_config(network_def: dict) -> dict:
    train, validate = _stage("train", True), _stage("validate", False)
    train["handlers"] = [
        {
            "_target_": "ValidationHandler",
            "validator": "@validate#evaluator",
            "epoch_level": True,
            "interval": "@val_interval",
        },
        {
            "_target_": "StatsHandler",
            "tag_name": "loss",
            "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
        },
    ]
    train["trainer"] = {
        "_target_": "SupervisedTrainer",
        "max_epochs": 1,
        "device": "@device",
        "train_data_loader": "@train#dataloader",
        "network": "@network",
        "loss_function": "@loss",
        "optimizer": "@optimizer",
        "inferer": "@train#inferer",
        "postprocessing": "@train#postprocessing",
        "key_train_metric": "@train#key_metric",
        "train_handlers": "@train#handlers",
    }
    validate["handlers"] = [
        {"_target_": "StatsHandler", "iteration_log": False},
        {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
        {
            "_target_": "CheckpointSaver",
            "save_dir": "@output_dir",
            "save_dict": {"model": "@network"},
            "save_key_metric": True,
        },
    ]
    validate["evaluator"] = {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@validate#dataloader",
        "network": "@network",
        "inferer": "@validate#inferer",
        "postprocessing": "@validate#postprocessing",
        "key_val_metric": "@validate#key_metric",
        "val_handlers": "@validate#handlers",
    }
    return {
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "dataset_dir": "/nonexistent/data",
        "output_dir": "$@bundle_root + '/eval'",
        "val_interval": 1,
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 1e-3},
        "train": train,
        "validate": validate,
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
        "finalize": [],
    }


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=4) + "\n")


def _write_bundle(root: Path, network_def: dict, meta: dict) -> Path:
    _write_json(root / "configs" / "metadata.json", meta)
    _write_json(root / "configs" / "inference.json", _inference_config(network_def))
    _write_json(root / "configs" / "train.json", _train_config(network_def))
    _write_json(root / "configs" / "evaluate.json", {"validate#handlers": [{"_target_": "StatsHandler"}]})
    _write_json(root / "configs" / "multi_gpu_train.json", {"device": "$torch.device('cuda:0')"})
    (root / "configs" / "logging.conf").write_text(LOGGING_CONF)
    (root / "docs").mkdir()
    (root / "docs" / "README.md").write_text(_readme())
    (root / "docs" / "data_license.txt").write_text("Synthetic data, no licence terms.\n")
    (root / "LICENSE").write_text("Apache License 2.0\n")
    (root / "models").mkdir()
    return root


@pytest.fixture(scope="module")
def unet_bundle(tmp_path_factory) -> Path:
    return _write_bundle(tmp_path_factory.mktemp("bundles") / "toy_unet", UNET_DEF, UNET_META)


@pytest.fixture(scope="module")
def iris_bundle(tmp_path_factory) -> Path:
    return _write_bundle(tmp_path_factory.mktemp("bundles") / "toy_iris", IRIS_DEF, IRIS_META)


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / bundle.name))


def _edit_json(path: Path, keys: tuple, value) -> None:
    content = json.loads(path.read_text())
    _set(content, keys, value)
    path.write_text(json.dumps(content, indent=4))


def _set(content: dict, keys: tuple, value) -> None:
    for key in keys[:-1]:
        content = content[key]
    if value is _DELETE:
        del content[keys[-1]]
    else:
        content[keys[-1]] = value


# ---- metadata ----

_IMAGE = ("network_data_format", "inputs", "image")
# [keys to change, new value, text the error message names]
ILL_CASES = [
    [("version",), "1.0", "$.version: '1.0' does not match"],
    [("version",), _DELETE, "$: 'version' is a required property"],
    [("eval_metrics",), _DELETE, "$: 'eval_metrics' is a required property"],
    [("changelog",), {"0.0.1": "layout"}, "$.changelog: should have an entry for the current version '0.1.0'"],
    [("changelog",), {"first": "layout"}, "$.changelog: 'first' does not match"],
    [("monai_version",), "latest", "$.monai_version: 'latest' does not match"],
    [("required_packages_version",), {"nibabel": ">=5"}, "$.required_packages_version.nibabel: should be a release"],
    [("optional_packages_version",), {}, "$.optional_packages_version: MONAI renames it"],
    [("authors",), 3, "$.authors: 3 is not valid under any of the given schemas"],
    [_IMAGE + ("num_channels",), "1", "$.network_data_format.inputs.image.num_channels: '1' is not of type"],
    [_IMAGE + ("dtype",), "float", "$.network_data_format.inputs.image.dtype: 'float' is not one of"],
    [_IMAGE + ("spatial_shape",), ["16*k", 16], "$.network_data_format.inputs.image.spatial_shape[0]"],
    [_IMAGE + ("value_range",), [1], "$.network_data_format.inputs.image.value_range: [1] is not valid"],
    [_IMAGE + ("value_range",), [1, 0], "$.network_data_format.inputs.image.value_range: minimum should not"],
    [_IMAGE + ("is_patch_data",), "false", "$.network_data_format.inputs.image.is_patch_data"],
    [_IMAGE + ("modality",), _DELETE, "$.network_data_format.inputs.image: 'modality' is a required property"],
    [_IMAGE + ("channel_def",), {"1": "image"}, "$.network_data_format.inputs.image.channel_def: should have keys"],
    [_IMAGE + ("channel_def",), {"0": "a", "1": "b"}, "channel_def: should have keys '0'..'0' for num_channels=1"],
    [_IMAGE + ("channel_def",), {"zero": "image"}, "$.network_data_format.inputs.image.channel_def: 'zero' does"],
    [("network_data_format", "outputs", "pred"), _DELETE, "$.network_data_format.outputs: 'pred' is a required"],
]


def test_schema_is_valid_draft_2020_12():
    schema = load_metadata_schema()
    Draft202012Validator.check_schema(schema)
    assert {"version", "changelog", "network_data_format", "intended_use", "eval_metrics"} <= set(schema["required"])


def test_valid_metadata_passes():
    validate_metadata(UNET_META)
    validate_metadata(IRIS_META)


def test_own_keys_are_allowed():
    meta = copy.deepcopy(UNET_META)
    meta["display_name"] = "Toy"
    meta["network_data_format"]["inputs"]["image"]["sample_spacing"] = [1.0, 1.0]
    validate_metadata(meta)


@pytest.mark.parametrize("keys, value, expected", ILL_CASES)
def test_invalid_metadata_names_the_problem(keys, value, expected):
    meta = copy.deepcopy(UNET_META)
    _set(meta, keys, value)
    with pytest.raises(ValueError) as excinfo:
        validate_metadata(meta)
    assert expected in str(excinfo.value)


def test_every_problem_is_listed(tmp_path):
    meta = copy.deepcopy(UNET_META)
    meta["changelog"] = {"0.0.1": "layout"}
    meta["numpy_version"] = 2
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 0
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError) as excinfo:
        validate_metadata(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path} is invalid:")
    for expected in ("$.changelog:", "$.numpy_version:", "$.network_data_format.outputs.pred.num_channels:"):
        assert expected in message


def test_metadata_must_be_an_object():
    with pytest.raises(ValueError, match=r"\$: \[\] is not of type 'object'"):
        validate_metadata([])


# ---- layout ----


def test_complete_bundle_has_no_layout_problems(unet_bundle):
    assert check_bundle_layout(unet_bundle) == []


def test_missing_files_are_named(unet_bundle, tmp_path):
    bundle = _copy(unet_bundle, tmp_path)
    (bundle / "configs" / "evaluate.json").unlink()
    (bundle / "docs" / "data_license.txt").unlink()
    (bundle / "models").rmdir()
    assert check_bundle_layout(bundle) == ["configs/evaluate.json", "docs/data_license.txt", "models/"]


def test_empty_folder_misses_everything(tmp_path):
    assert check_bundle_layout(tmp_path) == list(REQUIRED_FILES)


def test_readme_sections(unet_bundle, tmp_path):
    bundle = _copy(unet_bundle, tmp_path)
    readme = bundle / "docs" / "README.md"
    # a heading inside a code block is not a section; "(inputs/outputs)" after a title is allowed
    sections = [s for s in README_SECTIONS if s != "Limitations"]
    sections[2] = "Training configuration (inputs/outputs)"
    readme.write_text(_readme(sections, extra="```bash\n# Limitations\n```\n"))
    assert check_bundle_layout(bundle) == ["docs/README.md: missing section 'Limitations'"]

    readme.write_text(_readme(README_SECTIONS[::-1]))
    assert check_bundle_layout(bundle) == [
        f"docs/README.md: sections should come in the order {list(README_SECTIONS)}"
    ]


def test_find_bundles(unet_bundle, tmp_path):
    assert find_bundles(unet_bundle.parent) == [unet_bundle]
    (tmp_path / "not_a_bundle").mkdir()
    assert find_bundles(tmp_path) == []
    assert find_bundles(tmp_path / "missing") == []


# ---- workflows ----


@pytest.mark.parametrize("workflow_type", ["train", "infer"])
def test_workflow_has_all_properties(unet_bundle, workflow_type, tmp_path):
    before = sorted(unet_bundle.rglob("*"))
    assert check_workflow_properties(unet_bundle, workflow_type, work_dir=tmp_path) == []
    # outputs (here TensorBoard's log folder, made when training initialises) go to the work folder
    assert sorted(unet_bundle.rglob("*")) == before
    assert (tmp_path / "output_dir").is_dir() == (workflow_type == "train")


@pytest.mark.parametrize(
    "config, keys, value, workflow_type, expected",
    [
        ["train.json", ("train", "trainer", "max_epochs"), _DELETE, "train", ["max_epochs"]],
        ["train.json", ("train", "inferer"), _DELETE, "train", ["train_inferer"]],
        ["inference.json", ("dataset_dir",), _DELETE, "infer", ["dataset_dir"]],
        # optional properties defined under an ID the engine does not use
        ["inference.json", ("evaluator", "val_handlers"), [], "infer", ["handlers"]],
        ["train.json", ("validate", "dataset", "transform"), "%validate#preprocessing", "train", ["val_preprocessing"]],
        ["train.json", ("train", "handlers", 0, "interval"), 1, "train", ["val_interval"]],
    ],
)
def test_missing_property_is_named(unet_bundle, tmp_path, config, keys, value, workflow_type, expected):
    bundle = _copy(unet_bundle, tmp_path)
    _edit_json(bundle / "configs" / config, keys, value)
    assert check_workflow_properties(bundle, workflow_type, work_dir=tmp_path / "work") == expected


@pytest.mark.parametrize("target, expected", [
    ("SupervisedTrainer", True),
    ("monai.engines.SupervisedTrainer", True),
    ("common.yolo.UltralyticsTrainer", False),  # runs ultralytics' own forward passes
    ("$SupervisedTrainer", True),
])
def test_only_a_trainer_that_declares_it_goes_without_an_inferer(target, expected):
    parser = ConfigParser({"train": {"trainer": {"_target_": target}}})
    assert _trainer_uses_inferer(parser) is expected


def test_unknown_workflow_type(unet_bundle):
    with pytest.raises(ValueError):
        check_workflow_properties(unet_bundle, "deploy")


# ---- network ----


def test_fake_network_inputs():
    inputs = fake_network_inputs(IRIS_META["network_data_format"])
    assert list(inputs) == ["image", "ref_image", "ref_mask"]
    assert inputs["image"].shape == (1, 1, 16, 16) and inputs["image"].dtype == torch.float32
    assert inputs["ref_mask"].shape == (1, 2, 16, 16)
    assert set(inputs["ref_mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(inputs["image"], fake_network_inputs(IRIS_META["network_data_format"])["image"])

    data_format = copy.deepcopy(UNET_META["network_data_format"])
    data_format["inputs"]["points"] = {**data_format["inputs"]["image"], "spatial_shape": ["*"], "dtype": "int64"}
    inputs = fake_network_inputs(data_format, n=2, any=5)
    assert inputs["image"].shape == (1, 1, 64, 64)
    assert inputs["points"].shape == (1, 1, 5) and inputs["points"].dtype == torch.int64


@pytest.mark.parametrize("bundle", ["unet_bundle", "iris_bundle"])
def test_verify_network_io(bundle, request):
    verify_network_io(request.getfixturevalue(bundle))


def test_verify_network_io_catches_wrong_channels(unet_bundle, tmp_path):
    bundle = _copy(unet_bundle, tmp_path)
    pred = ("network_data_format", "outputs", "pred")
    _edit_json(bundle / "configs" / "metadata.json", pred + ("num_channels",), 3)
    with pytest.raises(ValueError, match="output channel number `2` doesn't match: `3`"):
        verify_network_io(bundle)


@pytest.mark.parametrize("bundle", ["unet_bundle", "iris_bundle"])
def test_export_torchscript(bundle, request, tmp_path):
    bundle_dir = request.getfixturevalue(bundle)
    scripted = export_torchscript(bundle_dir, tmp_path / "model.ts")
    assert isinstance(scripted, torch.jit.ScriptModule)
    # ckpt_export stores the metadata and the config inside the TorchScript file
    extra_files = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(tmp_path / "model.ts"), _extra_files=extra_files)
    assert json.loads(extra_files["metadata.json"])["version"] == "0.1.0"
    assert "network_def" in json.loads(extra_files["inference.json"])
    assert not (bundle_dir / "models" / "model.ts").exists()


def test_torchscript_exclusion(unet_bundle, tmp_path):
    assert torchscript_exclusion(unet_bundle) is None
    bundle = _copy(unet_bundle, tmp_path)
    readme = bundle / "docs" / "README.md"
    readme.write_text(_readme(extra="\nTorchScript export: not supported, FlexAttention cannot be scripted.\n"))
    assert torchscript_exclusion(bundle) == "FlexAttention cannot be scripted"
    readme.write_text(_readme(extra="\n- TorchScript export: not supported (dynamic shapes).\n"))
    assert torchscript_exclusion(bundle) == "dynamic shapes"
    readme.write_text(_readme(extra="\nTorchScript export: not supported.\n"))
    with pytest.raises(ValueError, match="should be followed by a reason"):
        torchscript_exclusion(bundle)
