"""The config ids the bundles share, with one meaning each, and the check that keeps them so.

A user who learns one bundle's command line should know them all: ``--images``, ``--datalist``, ``--image_size``
mean the same thing in every bundle that has them. :data:`VOCABULARY` says what each shared id means and, for ids
whose value is a literal, what a literal must look like; :data:`RETIRED` lists names that were replaced, so they
do not come back. :func:`check_vocabulary` returns every breach over a ``bundles/`` folder: an id used by two or
more bundles but not defined here, a literal of the wrong form, a retired name in a config or a bundle README,
a ``--id`` in a README's ``monai.bundle run`` command that no config of that bundle defines, a reference into a
list by position (``@train#deterministic_transforms#3``), and metadata ``class_names`` that differ from the
configs'.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["RETIRED", "RUNNER_ARGS", "Term", "VOCABULARY", "check_vocabulary", "config_ids"]


def _is_expression(value: Any) -> bool:
    """A value the parser computes: an expression or reference, or an object built from ``_target_``."""
    return (isinstance(value, str) and value.startswith(("$", "@", "%"))) or (
        isinstance(value, dict) and "_target_" in value)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _non_negative_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def _positive_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _text(v: Any) -> bool:
    return isinstance(v, str) and bool(v)


def _path_or_paths(v: Any) -> bool:
    return _text(v) or (isinstance(v, list) and bool(v) and all(_text(p) for p in v))


def _optional_path(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _image_size(v: Any) -> bool:
    if isinstance(v, int) and not isinstance(v, bool):
        return v > 0
    return isinstance(v, list) and len(v) in (2, 3) and all(isinstance(n, int) and n > 0 for n in v)


def _pixdim(v: Any) -> bool:
    return isinstance(v, list) and len(v) in (2, 3) and all(_positive_number(n) for n in v)


def _window(v: Any) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(isinstance(n, (int, float)) for n in v) and v[1] > 0


def _names(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(_text(n) for n in v) and len(set(v)) == len(v)


def _component(v: Any) -> bool:
    return isinstance(v, dict)


def _steps(v: Any) -> bool:
    return isinstance(v, list)


@dataclass(frozen=True)
class Term:
    """One shared config id.

    Attributes:
        meaning: what the id means, in every bundle that has it.
        literal: for a value the parser does not compute (no ``$``, ``@``, ``%`` or ``_target_``), whether it has
            the right form; None
            where any value goes (e.g. an object built from ``_target_``).
    """

    meaning: str
    literal: Callable[[Any], bool] | None = None


VOCABULARY: dict[str, Term] = {
    # where things are
    "bundle_root": Term("the bundle's folder; other paths default under it", _text),
    "dataset_dir": Term("folder of the data the configs read by default (the bundle's `sample/`)", _text),
    "datalist": Term("datalist JSON with `training`/`validation`/`test` splits; IRIS also takes a list of them",
                     _path_or_paths),
    "images": Term("inference inputs: glob, folder, file, datalist JSON (its `test` split) or JSON list of paths",
                   _text),
    "ckpt_dir": Term("folder of the weights (`model.pt`) and of training checkpoints", _text),
    "ckpt_path": Term("the weights file inference and evaluation load (`<ckpt_dir>/model.pt`)", _optional_path),
    "output_dir": Term("where a run writes its outputs; existing files are kept unless `overwrite`", _text),
    "overwrite": Term("replace existing outputs (a boolean; the string 'false' is false)", _bool),
    "resume": Term("continue training from the last checkpoint in `ckpt_dir` (a boolean)", _bool),
    # data and model grid
    "class_names": Term("names of the model's output classes, in output order (also `class_names` in metadata.json)",
                        _names),
    "image_size": Term("model input grid in the image's (x, y[, z]) voxel order; one int for a square 2D letterbox",
                       _image_size),
    "pixdim": Term("voxel spacing in mm the images are resampled to, (x, y, z)", _pixdim),
    "ct_window_center_width": Term("CT intensity window [center, width] in HU, scaled to [0, 1]", _window),
    "evaluate_split": Term("datalist split that evaluate.json scores", _text),
    "eval_name": Term("file name (without extension) of evaluate.json's metrics", _text),
    # training
    "seed": Term("seed of every random draw of a run (data order, augmentation, initialisation)", _count),
    "max_epochs": Term("training epochs", _count),
    "batch_size": Term("training batch size per process", _count),
    "learning_rate": Term("peak learning rate of the optimizer", _positive_number),
    "warmup_epochs": Term("epochs of linear learning-rate warm-up before the schedule", _non_negative_number),
    "val_interval": Term("validate every this many epochs", _count),
    "num_workers": Term("data-loader worker processes", _count),
    "device": Term("torch device the network runs on (CUDA when available)"),
    "is_not_rank0": Term("true in every process but the first of a distributed run (which alone writes files)"),
    # components, as in MONAI's model-zoo configs
    "imports": Term("modules the config's expressions use", _steps),
    "network_def": Term("the network to build (`_target_` and its arguments); `models/model.pt` is its state dict",
                        _component),
    "network": Term("`network_def` on `device`"),
    "train_network": Term("the training-time wrapper of `network` (auxiliary losses' outputs)"),
    "loss": Term("training loss"),
    "optimizer": Term("optimizer of the training run"),
    "lr_scheduler": Term("learning-rate schedule of the training run"),
    "prepare_batch": Term("how a batch becomes the network's inputs and target"),
    "preprocessing": Term("transforms from a datalist item to the network's input"),
    "postprocessing": Term("transforms from the network's output to what is written or scored"),
    "dataset": Term("inference dataset"),
    "dataloader": Term("inference data loader"),
    "inferer": Term("how the network is applied to a batch (sliding window, autocast, in-context prompt)"),
    "evaluator": Term("the inference engine"),
    "handlers": Term("inference event handlers (weights loading, logging, writers)", _steps),
    "train": Term("the training workflow: dataset, loader, engine, handlers", _component),
    "validate": Term("the validation workflow, also what evaluate.json runs", _component),
    "initialize": Term("expressions run before `run` (determinism, folders)", _steps),
    "run": Term("what the config runs", _steps),
    "finalize": Term("expressions run after `run`", _steps),
    "trt_args": Term("inference_trt.json: arguments of MONAI's trt_compile (precision, batch range, fallback)",
                     _component),
}

# Names that were replaced; they must not come back in a config or a bundle README.
RETIRED: dict[str, str] = {
    "queries": "images",
    "datalists": "datalist",
    "validation_split": "evaluate_split",
    "metrics_filename": "eval_name",
    "ct_window": "ct_window_center_width",
    "disease_names": "class_names",
    "finding_names": "class_names",
    "region_names": "class_names",
}

# Arguments of MONAI's bundle runner and of torchrun, not config ids.
RUNNER_ARGS = frozenset({
    "config_file", "meta_file", "logging_file", "args_file", "bundle_root", "tracking", "standalone", "nnodes",
    "nproc_per_node",
})

CONFIG_FILE = re.compile(r"^(train.*|inference.*|evaluate|multi_gpu_train)\.json$")
# an id path into a list by position ("@train#deterministic_transforms#3", "train#handlers#0#interval"): such
# references break silently when the list changes, so configs name what they reach (as model-zoo's do)
LIST_POSITION = re.compile(r'(?:"|@|%)[A-Za-z_]\w*(?:#\w+)*#\d+(?![\w.])')


def config_ids(bundle_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{config file name: {top-level id: raw value}}`` of a bundle's workflow configs and their overlays (not
    metadata or data files); ids with ``#`` (overrides of another file's entries) are left out."""
    out = {}
    for path in sorted(Path(bundle_dir, "configs").glob("*.json")):
        if CONFIG_FILE.match(path.name):
            # "+id" (MONAI's merge into the base config's id) counts as the id itself
            out[path.name] = {k.lstrip("+"): v for k, v in json.loads(path.read_text()).items() if "#" not in k}
    return out


def _readme_run_options(text: str) -> list[str]:
    """``--id`` options of the ``monai.bundle run`` commands in a README's fenced code blocks."""
    options = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        command = ""
        for line in block.split("\n"):
            command += line.rstrip().rstrip("\\") + " "
            if line.rstrip().endswith("\\"):
                continue
            if re.search(r"monai\.bundle run\b", command):
                options += re.findall(r"(?<![\w-])--([A-Za-z_][\w#]*)", command)
            command = ""
    return options


def _check_class_names(bundle: Path, configs: dict[str, dict[str, Any]]) -> list[str]:
    """metadata.json's ``class_names``: a list of names, the same as the configs' ``class_names`` where they have
    one (an expression is resolved by MONAI's config parser)."""
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    names = meta.get("class_names")
    if not _names(names):
        return [f"{bundle.name}/configs/metadata.json: 'class_names' should be a list of distinct names, "
                f"got {names!r}."]
    problems = []
    for name, values in configs.items():
        if "class_names" not in values:
            continue
        value = values["class_names"]
        if _is_expression(value):
            from monai.bundle import ConfigParser

            parser = ConfigParser()
            parser.read_config([bundle / "configs" / name])
            parser["bundle_root"] = str(bundle)
            value = list(parser.get_parsed_content("class_names"))
        if value != names:
            problems.append(f"{bundle.name}/configs/{name}: 'class_names' {value} differs from metadata.json's "
                            f"{names}.")
    return problems


def check_vocabulary(bundles_dir: str | os.PathLike) -> list[str]:
    """Every breach of the shared vocabulary under ``bundles_dir`` (empty when there is none); see the module
    docstring."""
    from common.bundle.validate import find_bundles

    problems: list[str] = []
    users: dict[str, list[str]] = {}
    for bundle in find_bundles(bundles_dir):
        configs = config_ids(bundle)
        ids = {k for values in configs.values() for k in values}
        for path in sorted((bundle / "configs").glob("*.json")):
            if CONFIG_FILE.match(path.name):
                for found in sorted(set(LIST_POSITION.findall(path.read_text()))):
                    problems.append(f"{bundle.name}/configs/{path.name}: '{found.lstrip(chr(34))}' reaches into a "
                                    "list by position; give the item an id and refer to that.")
        for name, values in configs.items():
            for key, value in values.items():
                where = f"{bundle.name}/configs/{name}: '{key}'"
                if key in RETIRED:
                    problems.append(f"{where} is a retired name; use '{RETIRED[key]}'.")
                term = VOCABULARY.get(key)
                if term is not None and term.literal is not None and not _is_expression(value) \
                        and not term.literal(value):
                    problems.append(f"{where} = {value!r} does not fit its meaning: {term.meaning}.")
        for key in ids:
            users.setdefault(key, []).append(bundle.name)
        problems += _check_class_names(bundle, configs)
        readme = bundle / "docs" / "README.md"
        text = readme.read_text() if readme.is_file() else ""
        for old, new in RETIRED.items():
            if re.search(rf"`(--)?{old}`|--{old}\b", text):
                problems.append(f"{bundle.name}/docs/README.md names '{old}', retired for '{new}'.")
        for option in sorted(set(_readme_run_options(text))):
            if option.split("#")[0] not in ids | RUNNER_ARGS:
                problems.append(f"{bundle.name}/docs/README.md: '--{option}' in a run command is no config id of "
                                "this bundle.")
    for key, bundles in sorted(users.items()):
        if len(bundles) > 1 and key not in VOCABULARY:
            problems.append(f"'{key}' is used by {', '.join(sorted(bundles))} but has no meaning in "
                            "common.bundle.vocabulary.VOCABULARY.")
    return problems
