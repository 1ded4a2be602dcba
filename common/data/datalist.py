"""Datalists, query lists and reference sets: plain functions over paths."""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from common.bundle.args import as_bool
from common.data.dicom import is_dicom_file, is_dicom_series

__all__ = [
    "ReferenceSet",
    "load_datalist",
    "load_datalists",
    "resolve_item_paths",
    "list_images",
    "load_references",
    "references_from_datalist",
    "IMAGE_SUFFIXES",
    "write_references",
    "select_references",
    "write_volume_list",
    "datalist_target",
    "write_split_datalist",
]

logger = logging.getLogger(__name__)

# item keys holding a path, and keys holding a {name: path} mapping, resolved against the datalist's folder
PATH_KEYS = ("image", "label", "roi", "mask")
PATH_MAP_KEYS = ("concept_masks",)

# files a folder expands to (DICOM files without a suffix are found by their preamble); ".raw" data files that
# ".mhd"/".nhdr" headers name are read through their header
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class ReferenceSet:
    """Labelled reference examples: images with label maps, and the classes (name -> label value) they define."""

    classes: dict[str, int]
    items: list[dict[str, str]]
    source: str = "<in memory>"
    extra: dict = field(default_factory=dict)

    def select(self, names: Sequence[str] | None) -> ReferenceSet:
        """The same references restricted to ``names`` (all classes when None), in the order given."""
        if names is None:
            return self
        if isinstance(names, str):
            names = [names]
        unknown = [n for n in names if n not in self.classes]
        if unknown:
            raise ValueError(f"{self.source}: classes {unknown} are not defined; defined: {sorted(self.classes)}.")
        return ReferenceSet({n: self.classes[n] for n in names}, self.items, self.source, self.extra)


def _read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e


def _resolve(base: Path, value: str) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_item_paths(item: Mapping, base: str | os.PathLike) -> dict:
    """A copy of a datalist item whose relative paths (:data:`PATH_KEYS` values and :data:`PATH_MAP_KEYS` mappings'
    values) are made absolute against ``base``."""
    item, base = dict(item), Path(base)
    for k in PATH_KEYS:
        if isinstance(item.get(k), str):
            item[k] = _resolve(base, item[k])
    for k in PATH_MAP_KEYS:
        if isinstance(item.get(k), Mapping):
            item[k] = {name: _resolve(base, v) for name, v in item[k].items()}
    return item


def load_datalist(path: str | os.PathLike, key: str = "training", drop_heldout: bool = False) -> list[dict]:
    """Items of one split of a decathlon-style datalist, with absolute paths.

    Each item gets ``dataset`` (the datalist's ``name``) and ``class_names`` (label value as str -> class name,
    from the datalist's ``labels``), which episodic training needs to tell classes of several datasets apart.

    Args:
        path: datalist JSON; relative paths inside are relative to its folder.
        key: split to read, e.g. ``"training"``, ``"validation"``, ``"test"``.
        drop_heldout: leave the classes listed in the datalist's ``heldout_labels`` out of ``class_names``, so
            training never sees them.
    """
    path = Path(path)
    data = _read_json(path)
    if key not in data:
        splits = [k for k, v in data.items() if isinstance(v, list)]
        raise KeyError(f"{path}: no '{key}' split; splits present: {splits}.")
    heldout = set(data.get("heldout_labels", [])) if as_bool(drop_heldout, "drop_heldout") else set()
    # not "label_*": MONAI's Spacingd merges NIfTI headers into every "label_*" key of a dict
    class_names = {str(k): str(v) for k, v in data.get("labels", {}).items() if str(k) != "0" and v not in heldout}
    items = []
    for i, entry in enumerate(data[key]):
        entry = {"image": entry} if isinstance(entry, str) else dict(entry)
        if "image" not in entry and "text" not in entry:  # an image, or a report (the report labeler's datalists)
            raise ValueError(f"{path}: item {i} of '{key}' has no 'image' (nor a report 'text').")
        entry = resolve_item_paths(entry, path.parent)
        entry.setdefault("dataset", data.get("name", path.stem))
        entry.setdefault("class_names", class_names)
        items.append(entry)
    return items


def load_datalists(
    paths: str | os.PathLike | Sequence[str | os.PathLike], key: str = "training", drop_heldout: bool = False
) -> list[dict]:
    """Concatenated items of several datalists (multi-dataset training); see :func:`load_datalist`."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return [item for p in paths for item in load_datalist(p, key, drop_heldout)]


def _folder_cases(folder: Path) -> list[dict]:
    """Cases of a folder: the folder itself when it holds nothing but slices of one DICOM series, else one case per
    image file inside (each DICOM file on its own) and per sub-folder that is a series."""
    if is_dicom_series(folder):
        return [{"image": str(folder.resolve())}]
    cases = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir() and is_dicom_series(path):
            cases.append({"image": str(path.resolve())})
        elif path.is_file() and (path.name.lower().endswith(IMAGE_SUFFIXES) or is_dicom_file(path)):
            cases.append({"image": str(path.resolve())})
    if not cases:
        logger.warning("%s: holds no image file and no DICOM series", folder)
    return cases


def _path_cases(path: str) -> list[dict]:
    return _folder_cases(Path(path)) if os.path.isdir(path) else [{"image": str(Path(path).resolve())}]


def list_images(spec: str | os.PathLike | Sequence[str], key: str = "test") -> list[dict]:
    """Query items ``[{"image": path}, ...]`` from a glob pattern, a file, a folder, a datalist JSON or a list.

    A folder is one case (a DICOM series) only when it holds nothing but slices of one series (one
    SeriesInstanceUID); any other folder gives one case per image file inside (:data:`IMAGE_SUFFIXES` or a DICOM
    preamble; each DICOM file on its own) and per sub-folder that is a series. Folders matched by a glob pattern
    follow the same rule. A ``.json`` file is read as a datalist (split ``key``, or ``"testing"``, or a plain list
    of paths).
    """
    if not isinstance(spec, (str, os.PathLike)):
        return [item for s in spec for item in list_images(s, key)]
    spec = os.path.expanduser(str(spec))
    if spec.endswith(".json"):
        data = _read_json(spec)
        if isinstance(data, list):
            return [{"image": _resolve(Path(spec).parent, str(p))} for p in data]
        for k in (key, "testing", "test"):
            if k in data:
                return load_datalist(spec, k)
        raise KeyError(f"{spec}: no '{key}' split.")
    if glob.has_magic(spec) and not os.path.exists(spec):
        matches = sorted(glob.glob(spec))
        if not matches:
            # not an error here: a workflow is built before its data exists; engines refuse an empty run
            logger.warning("no file matches the pattern %s", spec)
        return [item for m in matches for item in _path_cases(m)]
    # a missing single file is kept: its loading error is then reported with the others of the run
    return _path_cases(spec)


def load_references(path: str | os.PathLike, classes: Sequence[str] | None = None) -> ReferenceSet:
    """Read a references file.

    Format (paths relative to the file)::

        {"classes": {"liver": 1, "spleen": 2},
         "references": [{"image": "ref0.nii.gz", "label": "ref0_label.nii.gz"}, ...]}

    Args:
        path: the references JSON.
        classes: names to keep (all when None).
    """
    path = Path(path)
    data = _read_json(path)
    refs, class_map = data.get("references"), data.get("classes")
    if not isinstance(refs, list) or not refs:
        raise ValueError(f"{path}: 'references' should be a non-empty list of {{'image', 'label'}} items.")
    if not isinstance(class_map, Mapping) or not class_map:
        raise ValueError(f"{path}: 'classes' should map class names to label values, e.g. {{\"liver\": 1}}.")
    items = []
    for i, ref in enumerate(refs):
        if not isinstance(ref, Mapping) or "image" not in ref or "label" not in ref:
            raise ValueError(f"{path}: reference {i} should have 'image' and 'label', got {ref}.")
        items.append({"image": _resolve(path.parent, ref["image"]), "label": _resolve(path.parent, ref["label"])})
    try:
        class_values = {str(k): int(v) for k, v in class_map.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: class label values should be integers, got {dict(class_map)}.") from e
    if any(v <= 0 for v in class_values.values()):
        raise ValueError(f"{path}: label values should be positive (0 is background), got {class_values}.")
    extra = {k: v for k, v in data.items() if k not in ("references", "classes")}
    return ReferenceSet(class_values, items, str(path), extra).select(classes)


def references_from_datalist(
    items: Sequence[Mapping], classes: Sequence[str] | None = None, num_references: int = 3, seed: int = 0
) -> ReferenceSet:
    """Pick up to ``num_references`` labelled items that together show every requested class.

    Items are taken greedily (in a seeded random order) by how many still-missing classes their label map holds,
    then topped up by items holding the most classes. All items must share one dataset's label names.

    Args:
        items: datalist items with ``image``, ``label`` and ``class_names`` (see :func:`load_datalist`).
        classes: class names to cover (an error when one is in no volume); when None, every class of the datalist
            that some volume shows.
        num_references: how many references to return.
        seed: order of the candidates.
    """
    if not items:
        raise ValueError("items should hold at least one labelled volume.")
    names = {v: int(k) for k, v in items[0].get("class_names", {}).items()}
    wanted = list(names) if classes is None else list(classes)
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise ValueError(f"classes {unknown} are not in the datalist labels {sorted(names)}.")
    order = np.random.default_rng(seed).permutation(len(items))
    present = {}
    for i in order:
        values = set(np.unique(np.asarray(nib.load(items[i]["label"]).dataobj)).astype(int).tolist())
        present[i] = {c for c in wanted if names[c] in values}
    chosen: list[int] = []
    missing = set(wanted)
    while len(chosen) < num_references:
        rest = [i for i in order if i not in chosen]
        if not rest:
            break
        best = max(rest, key=lambda i: (len(present[i] & missing), len(present[i])))
        if not present[best]:
            break
        chosen.append(best)
        missing -= present[best]
    if missing and classes is not None:
        raise ValueError(f"no volume of the datalist shows the classes {sorted(missing)}.")
    if missing:
        logger.warning("no volume of the datalist shows the classes %s; they are left out", sorted(missing))
        wanted = [c for c in wanted if c not in missing]
    refs = [{"image": items[i]["image"], "label": items[i]["label"]} for i in chosen]
    return ReferenceSet({c: names[c] for c in wanted}, refs, f"datalist references (seed {seed})")


def write_references(path: str | os.PathLike, items: Sequence[Mapping], classes: Mapping[str, int]) -> Path:
    """Write a references file (see :func:`load_references`) with paths relative to its folder."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path}: already exists; remove it or choose another path.")
    refs = [
        {k: os.path.relpath(Path(item[k]).resolve(), path.parent.resolve()) for k in ("image", "label")}
        for item in items
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"classes": dict(classes), "references": refs}, indent=4) + "\n")
    return path


def select_references(
    references_file: str | os.PathLike | None = None,
    datalists: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    classes: Sequence[str] | None = None,
    num_references: int = 3,
    seed: int = 0,
    include_heldout: bool = False,
) -> ReferenceSet:
    """References from a references file when given, else picked from the training split of ``datalists``.

    Args:
        references_file: a references JSON (see :func:`load_references`); empty or None to pick from datalists.
        datalists: datalist JSON(s) whose ``training`` split provides the references.
        classes: class names to keep or cover; all when None.
        num_references: references picked from the datalists.
        seed: order of the candidates.
        include_heldout: allow the datalists' held-out classes (to evaluate classes unseen in training).
    """
    if references_file:
        return load_references(references_file).select(classes)
    if not datalists:
        raise ValueError("either references_file or datalists should be given.")
    items = load_datalists(datalists, "training", drop_heldout=not as_bool(include_heldout, "include_heldout"))
    return references_from_datalist(items, classes, num_references, seed)


def write_volume_list(
    datalist: str | os.PathLike, out: str | os.PathLike, keys: Sequence[str] = ("image", "mask")
) -> Path:
    """Write the items of every split of ``datalist`` as one query list ``{"test": [...]}`` for inference.

    Each item keeps only ``keys`` (those it has); paths stay relative, now to ``out``'s folder. Splits are read in
    file order: every list of items (dicts with an ``image``) in the datalist.
    """
    datalist, out = Path(datalist), Path(out)
    data = _read_json(datalist)
    items = []
    for value in data.values():
        entries = value if isinstance(value, list) else []
        for entry in entries:
            if not isinstance(entry, Mapping) or "image" not in entry:
                continue
            items.append({k: os.path.relpath(_resolve(datalist.parent, entry[k]), out.parent.resolve())
                          for k in keys if isinstance(entry.get(k), str)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"test": items}, indent=4) + "\n")
    return out


def datalist_target(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``out_dir/datalist.json`` for a generator or converter to write, checked before any work is done.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is False (nothing the user has is replaced unasked).
    """
    path = Path(out_dir) / "datalist.json"
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    return path


def write_split_datalist(
    path: str | os.PathLike, header: Mapping, items: Sequence[Mapping], split: Sequence[float]
) -> Path:
    """Write ``header`` plus ``training``/``validation``/``test`` lists of ``items``, split in index order.

    Validation and test take ``round(len(items) * fraction)`` items each (``split[1]``, ``split[2]``) and training
    the rest, which suits independent draws such as synthetic cases. The file is written last by the generators,
    so its presence means the data set is complete.
    """
    n = len(items)
    num_val, num_test = round(n * split[1]), round(n * split[2])
    num_train = max(n - num_val - num_test, 0)
    datalist = {
        **header,
        "training": list(items[:num_train]),
        "validation": list(items[num_train: num_train + num_val]),
        "test": list(items[num_train + num_val:]),
    }
    path = Path(path)
    path.write_text(json.dumps(datalist, indent=4) + "\n")
    return path
