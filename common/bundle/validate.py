"""Checks that a bundle folder follows the MONAI bundle specification and the house conventions.

Every check runs offline: metadata is validated against the schema shipped in this package (MONAI's
``verify_metadata`` would download one), and the network checks build the network from the bundle's own config with
random weights, so neither trained weights nor datasets are needed.

Conventions beyond MONAI's tools:
    - every entry of ``network_data_format.inputs`` other than ``image`` is a keyword argument of the network's
      ``forward`` with the same name, fed a random tensor of shape ``(1, num_channels, *spatial_shape)``;
    - a bundle whose network cannot be TorchScripted says so in ``docs/README.md`` with a line
      ``TorchScript export: not supported, <reason>``.
"""

from __future__ import annotations

import importlib
import json
import re
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from monai.bundle import (
    BundleWorkflow,
    ConfigParser,
    ConfigWorkflow,
    ReferenceResolver,
    ckpt_export,
    verify_net_in_out,
)
from monai.bundle.scripts import _get_fake_spatial_shape
from monai.bundle.utils import EXPR_KEY, ID_REF_KEY, ID_SEP_KEY
from monai.utils import BundleProperty, BundlePropertyConfig, get_equivalent_dtype, look_up_option

__all__ = [
    "MASK_FORMATS",
    "README_SECTIONS",
    "REQUIRED_FILES",
    "TORCHSCRIPT_OPT_OUT",
    "check_bundle_layout",
    "check_workflow_properties",
    "export_torchscript",
    "fake_network_inputs",
    "find_bundles",
    "load_metadata_schema",
    "torchscript_exclusion",
    "validate_metadata",
    "verify_network_io",
]

SCHEMA_PATH = Path(__file__).with_name("metadata_schema.json")

# Paths relative to the bundle root; a trailing "/" marks a folder.
REQUIRED_FILES = (
    "configs/metadata.json",
    "configs/inference.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "LICENSE",
    "models/",
)

# The sections every docs/README.md has, in this order.
README_SECTIONS = (
    "Model Overview",
    "Data",
    "Training configuration",
    "Performance",
    "Bundle Commands",
    "Limitations",
    "References",
    "License",
)

# Input formats that hold masks, so their fake inputs are random 0/1 values rather than uniform noise.
MASK_FORMATS = ("segmentation", "label", "labels", "classes")

TORCHSCRIPT_OPT_OUT = "TorchScript export: not supported"

_CONFIGS = {"train": "configs/train.json", "infer": "configs/inference.json"}
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


def load_metadata_schema() -> dict:
    """The JSON schema (draft 2020-12) of ``configs/metadata.json`` shipped with this package."""
    return json.loads(SCHEMA_PATH.read_text())


@lru_cache(maxsize=1)
def _validator() -> Draft202012Validator:
    schema = load_metadata_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@lru_cache(maxsize=1)
def _version_pattern() -> re.Pattern:
    # One definition of a release number, shared with the schema's monai/pytorch/numpy versions.
    return re.compile(_validator().schema["$defs"]["package_version"]["pattern"])


def _schema_problems(meta: Any) -> list[str]:
    problems = []
    for error in sorted(_validator().iter_errors(meta), key=lambda e: (e.json_path, e.message)):
        message = error.message
        if error.context:  # anyOf/oneOf: say which alternative came closest and why it failed
            message += f" ({best_match(error.context).message})"
        problems.append(f"{error.json_path}: {message}")
    return problems


def _semantic_problems(meta: Mapping) -> list[str]:
    """What the schema cannot express; every check skips values the schema already rejects."""
    problems = []
    version, changelog = meta.get("version"), meta.get("changelog")
    if isinstance(version, str) and isinstance(changelog, Mapping) and version not in changelog:
        problems.append(f"$.changelog: should have an entry for the current version '{version}'.")

    if "optional_packages_version" in meta:
        # MONAI's parser renames the key to required_packages_version, replacing any list already there.
        problems.append(
            "$.optional_packages_version: MONAI renames it to required_packages_version and drops the original; "
            "list the packages under required_packages_version."
        )
    pattern = _version_pattern()
    for key in ("required_packages_version", "optional_packages_version"):
        packages = meta.get(key)
        if not isinstance(packages, Mapping):
            continue
        for name, value in packages.items():
            if isinstance(value, str) and not pattern.match(value):
                problems.append(f"$.{key}.{name}: should be a release number such as '1.2.3', got '{value}'.")

    data_format = meta.get("network_data_format")
    for side in ("inputs", "outputs"):
        tensors = data_format.get(side) if isinstance(data_format, Mapping) else None
        if not isinstance(tensors, Mapping):
            continue
        for name, spec in tensors.items():
            if isinstance(spec, Mapping):
                problems += _tensor_problems(f"$.network_data_format.{side}.{name}", spec)
    return problems


def _tensor_problems(path: str, spec: Mapping) -> list[str]:
    problems = []
    num_channels, channel_def = spec.get("num_channels"), spec.get("channel_def")
    if isinstance(num_channels, int) and not isinstance(num_channels, bool) and isinstance(channel_def, Mapping):
        expected = [str(i) for i in range(num_channels)]
        if sorted(channel_def, key=lambda k: (len(k), k)) != expected:
            problems.append(
                f"{path}.channel_def: should have keys '0'..'{num_channels - 1}' for num_channels={num_channels}, "
                f"got {sorted(channel_def)}."
            )
    value_range = spec.get("value_range")
    if (
        isinstance(value_range, list)
        and len(value_range) == 2
        and all(isinstance(v, (int, float)) for v in value_range)
        and value_range[0] > value_range[1]
    ):
        problems.append(f"{path}.value_range: minimum should not exceed maximum, got {value_range}.")
    return problems


def validate_metadata(meta: Mapping | str | Path) -> None:
    """Validate a bundle's ``configs/metadata.json`` against :func:`load_metadata_schema` and the rules it cannot
    express (the changelog has the current version, ``channel_def`` keys are ``"0"``..``"num_channels - 1"``,
    package versions are release numbers, ``value_range`` is ordered).

    Args:
        meta: the parsed metadata, or the path of the JSON file.

    Raises:
        ValueError: listing every problem found, one per line, each with its JSON path (``$.changelog``).
    """
    source = "metadata"
    if isinstance(meta, (str, Path)):
        source = str(meta)
        meta = json.loads(Path(meta).read_text())
    problems = _schema_problems(meta)
    if isinstance(meta, Mapping):
        problems += _semantic_problems(meta)
    if problems:
        raise ValueError(f"{source} is invalid:\n  " + "\n  ".join(problems))


def _readme_headings(text: str) -> list[str]:
    """ATX headings outside fenced code, normalised: lower case, without a trailing ``(...)`` or ``: ...``."""
    headings, in_fence = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else _HEADING.match(line)
        if match:
            title = re.split(r"[(:]", match.group(2), maxsplit=1)[0]
            headings.append(" ".join(title.split()).lower())
    return headings


def check_bundle_layout(bundle_dir: str | Path) -> list[str]:
    """Problems with a bundle's files: each missing entry of :data:`REQUIRED_FILES` (as its relative path), then
    each of :data:`README_SECTIONS` missing from ``docs/README.md`` or out of order. Empty when all is well."""
    root = Path(bundle_dir)
    problems = []
    for rel in REQUIRED_FILES:
        path = root / rel
        if not (path.is_dir() if rel.endswith("/") else path.is_file()):
            problems.append(rel)

    readme = root / "docs" / "README.md"
    if readme.is_file():
        headings = _readme_headings(readme.read_text())
        wanted = [s.lower() for s in README_SECTIONS]
        problems += [f"docs/README.md: missing section '{s}'" for s in README_SECTIONS if s.lower() not in headings]
        found = [h for h in headings if h in wanted]
        first_seen = list(dict.fromkeys(found))
        if len(first_seen) == len(wanted) and first_seen != wanted:
            problems.append(f"docs/README.md: sections should come in the order {list(README_SECTIONS)}")
    return problems


def find_bundles(bundles_dir: str | Path) -> list[Path]:
    """Folders directly under ``bundles_dir`` that hold a ``configs/metadata.json``, sorted by name."""
    root = Path(bundles_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "configs" / "metadata.json").is_file())


def _read_metadata(bundle_dir: Path) -> dict:
    return json.loads((bundle_dir / "configs" / "metadata.json").read_text())


def check_workflow_properties(
    bundle_dir: str | Path, workflow_type: str, work_dir: str | Path | None = None, **override: Any
) -> list[str]:
    """Required workflow properties missing from a bundle's config, plus optional ones defined under a wrong ID.

    Loads ``configs/train.json`` (``workflow_type="train"``) or ``configs/inference.json`` (``"infer"``) in a
    ``ConfigWorkflow`` with the bundle's metadata and logging config, runs ``initialize`` and checks the properties
    MONAI's ``TrainProperties``/``InferProperties`` and ``MetaProperties`` define, as ``check_properties`` does.
    ``bundle_root`` points at ``bundle_dir`` and ``output_dir``, where the config has it, at a folder under
    ``work_dir`` (a temporary folder when ``None``), so checking writes nothing into the bundle. ``dataset_dir`` keeps
    the bundle's default: every bundle ships an embedded sample that its configs read by default.

    Args:
        bundle_dir: the bundle's root folder.
        workflow_type: ``"train"`` or ``"infer"``.
        work_dir: where the overridden ``output_dir`` lives. Default a temporary folder.
        override: further config id -> value overrides.

    Returns:
        Property names, empty when the workflow has all it needs.
    """
    config = look_up_option(workflow_type, _CONFIGS)
    if work_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return check_workflow_properties(bundle_dir, workflow_type, tmp, **override)
    root, work = Path(bundle_dir).resolve(), Path(work_dir)
    workflow = ConfigWorkflow(
        config_file=str(root / config),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        **{"bundle_root": str(root), **override},
    )
    if workflow_type == "train" and not _trainer_uses_inferer(workflow.parser):
        # a trainer that runs its own forward passes (ultralytics') has no use for `train#inferer`
        workflow.properties.pop("train_inferer", None)
    # MONAI raises on the first absent required ID; listing them up front names every one.
    absent = [
        name
        for name, prop in workflow.properties.items()
        if prop.get(BundleProperty.REQUIRED, False) and prop[BundlePropertyConfig.ID] not in workflow.parser
    ]
    if absent:
        return absent
    if "output_dir" not in override and "output_dir" in workflow.parser:
        workflow.parser["output_dir"] = str(work / "output_dir")
    workflow.initialize()
    missing = BundleWorkflow.check_properties(workflow) or []
    wrong = [
        name
        for name, prop in workflow.properties.items()
        if not prop.get(BundleProperty.REQUIRED, False) and not _refers_by_id(workflow.parser, name, prop)
    ]
    return missing + wrong


def _trainer_uses_inferer(parser: ConfigParser) -> bool:
    """False when ``train#trainer``'s class says ``uses_inferer = False``; True otherwise (MONAI's trainers)."""
    target = parser.get(f"train{ID_SEP_KEY}trainer{ID_SEP_KEY}_target_")
    if not isinstance(target, str) or target.startswith(EXPR_KEY):
        return True
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return True
    return bool(getattr(cls, "uses_inferer", True))


def _refers_by_id(parser: ConfigParser, name: str, prop: Mapping) -> bool:
    """Whether the config item that consumes an optional property refers to it by its ID (``"@<id>"``).

    Mirrors ``ConfigWorkflow._check_optional_id``, which fails with ``AttributeError`` when the consumer holds an
    inline value (a list of handlers, an interval number) instead of a reference; that counts as a wrong ID here.
    """
    prop_id, ref_id = prop.get(BundlePropertyConfig.ID), prop.get(BundlePropertyConfig.REF_ID)
    if ref_id is None:
        return True
    ref = None
    if name in ("evaluator", "val_interval"):
        # consumed by a ValidationHandler at an unknown index of train#handlers
        handlers = parser.get(f"train{ID_SEP_KEY}handlers", [])
        for handler in handlers if isinstance(handlers, list) else []:
            if isinstance(handler, Mapping) and handler.get("_target_") == "ValidationHandler":
                ref = handler.get(ref_id)
    else:
        ref = parser.get(ref_id)
    if ref is None or (isinstance(ref, str) and ref.startswith(EXPR_KEY)):
        return True
    if not isinstance(ref, str):
        return False  # an inline value where a reference belongs
    # "#" and "::" both separate ID parts; parsing rewrites the first into the second
    return ReferenceResolver.normalize_id(ref) == ID_REF_KEY + ReferenceResolver.normalize_id(prop_id)


def fake_network_inputs(
    network_data_format: Mapping, p: int = 1, n: int = 1, any: int = 1, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random tensors for every entry of ``network_data_format["inputs"]``, keyed by input name.

    Shapes are ``(1, num_channels, *spatial_shape)`` with expressions in ``spatial_shape`` resolved as MONAI's
    ``verify_net_in_out`` does (``p``, ``n``, ``any`` for ``"*"``). Inputs whose ``format`` is one of
    :data:`MASK_FORMATS` get 0/1 values, integer dtypes get integers in ``[0, 2)``, other inputs ``U[0, 1)``.
    """
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, spec in network_data_format["inputs"].items():
        shape = (1, spec["num_channels"], *_get_fake_spatial_shape(spec["spatial_shape"], p=p, n=n, any=any))
        dtype = get_equivalent_dtype(spec["dtype"], torch.Tensor)
        if spec.get("format") in MASK_FORMATS or not (dtype.is_floating_point or dtype.is_complex):
            value = torch.randint(0, 2, shape, generator=generator).to(dtype)
        else:
            value = torch.rand(shape, generator=generator).to(dtype)
        tensors[name] = value
    return tensors


def verify_network_io(
    bundle_dir: str | Path, device: str = "cpu", p: int = 1, n: int = 1, any: int = 1, **override: Any
) -> None:
    """Run MONAI's ``verify_net_in_out`` on ``network_def`` of ``configs/inference.json``: the output's channels and
    dtype match ``outputs.pred``. Inputs other than ``image`` are passed as keyword arguments of the same name.

    A text network (``inputs.image.type`` ``"tokens"``: token ids ``(B, T)``, other inputs such as an attention mask
    ``(B, T)`` too) is checked the same way without MONAI's image-shaped test tensor; when it returns a mapping,
    its ``"logits"`` entry is the ``pred`` checked.

    Raises:
        ValueError: the output's channel number or dtype differ from the metadata.
    """
    root = Path(bundle_dir).resolve()
    meta = _read_metadata(root)
    if meta["network_data_format"]["inputs"]["image"].get("type") == "tokens":
        return _verify_token_network_io(root, meta["network_data_format"], device, any, **override)
    extra = fake_network_inputs(meta["network_data_format"], p=p, n=n, any=any)
    extra.pop("image")
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "inference.json"),
        device=device,
        p=p,
        n=n,
        any=any,
        extra_forward_args={k: v.to(device) for k, v in extra.items()},
        bundle_root=str(root),
        **override,
    )


def _verify_token_network_io(root: Path, data_format: Mapping, device: str, length: int, **override: Any) -> None:
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(root), **override})
    network = parser.get_parsed_content("network_def").to(device).eval()
    generator = torch.Generator().manual_seed(0)
    length = max(int(length), 8)
    inputs = {}
    for name, spec in data_format["inputs"].items():
        low, high = (spec["value_range"] or [0, 1])
        inputs[name] = torch.randint(int(low), int(high) + 1, (1, length), generator=generator).to(device)
        if name != "image":
            inputs[name] = torch.ones_like(inputs[name])  # e.g. an attention mask: every token is text
    with torch.no_grad():
        output = network(inputs.pop("image"), **inputs)
    pred = output["logits"] if isinstance(output, Mapping) else output
    expected = data_format["outputs"]["pred"]
    if pred.shape[1] != expected["num_channels"]:
        raise ValueError(f"output channel number `{pred.shape[1]}` doesn't match: `{expected['num_channels']}`.")
    if pred.dtype != get_equivalent_dtype(expected["dtype"], torch.Tensor):
        raise ValueError(f"dtype of output data `{pred.dtype}` doesn't match: {expected['dtype']}.")


def torchscript_exclusion(bundle_dir: str | Path) -> str | None:
    """The reason a bundle gives in ``docs/README.md`` for not exporting to TorchScript, or ``None``.

    The reason is the rest of a line starting ``TorchScript export: not supported``, also as a list item or quote.

    Raises:
        ValueError: the line is there without a reason.
    """
    readme = Path(bundle_dir) / "docs" / "README.md"
    if not readme.is_file():
        return None
    for line in readme.read_text().splitlines():
        line = line.strip().lstrip("-*+> \t")
        if line.startswith(TORCHSCRIPT_OPT_OUT):
            reason = line[len(TORCHSCRIPT_OPT_OUT):].strip(" \t,.;:-\u2013\u2014()")
            if not reason:
                raise ValueError(f"{readme}: '{TORCHSCRIPT_OPT_OUT}' should be followed by a reason.")
            return reason
    return None


def export_torchscript(
    bundle_dir: str | Path, out_path: str | Path, atol: float = 1e-4, rtol: float = 1e-4, **override: Any
) -> torch.jit.ScriptModule:
    """Export ``network_def`` of ``configs/inference.json`` with MONAI's ``ckpt_export`` and check it.

    The network is built with random weights, saved as a checkpoint next to ``out_path`` and exported through that
    checkpoint, so the bundle's trained weights are not needed. The exported module must reproduce the eager
    network's outputs on :func:`fake_network_inputs`.

    Args:
        bundle_dir: the bundle's root folder.
        out_path: where the TorchScript file goes; its folder receives the checkpoint too.
        atol: absolute tolerance of the comparison. Default 1e-4.
        rtol: relative tolerance of the comparison. Default 1e-4.
        override: further config id -> value overrides.

    Returns:
        The exported module, loaded back from ``out_path``.

    Raises:
        ValueError: the exported module's outputs differ from the eager network's.
    """
    root, out_path = Path(bundle_dir).resolve(), Path(out_path)
    meta_file, config_file = root / "configs" / "metadata.json", root / "configs" / "inference.json"
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.read_meta(str(meta_file))
    parser.update({"bundle_root": str(root), **override})
    network = parser.get_parsed_content("network_def").eval()

    ckpt_file = out_path.with_name(out_path.stem + "_weights.pt")
    torch.save(network.state_dict(), ckpt_file)
    ckpt_export(
        net_id="network_def",
        filepath=str(out_path),
        ckpt_file=str(ckpt_file),
        meta_file=str(meta_file),
        config_file=str(config_file),
        bundle_root=str(root),
        **override,
    )
    scripted = torch.jit.load(str(out_path), map_location="cpu").eval()

    inputs = fake_network_inputs(_read_metadata(root)["network_data_format"])
    image = inputs.pop("image")
    with torch.no_grad():
        expected = network(image, **inputs)
        actual = scripted(image, **inputs)
    try:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    except AssertionError as e:
        raise ValueError(f"TorchScript export of {root.name} differs from the eager network: {e}") from e
    return scripted
