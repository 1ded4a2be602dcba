"""Training items from a MONAI Label studies folder, for bundles whose labels are not label maps.

MONAI Label's datastore pairs each study with one label map (``labels/final/<id>.nii.gz``). The CSR classifier, the
CT report encoder and the YOLO detector train on other labels; they are kept next to the label maps, one file per
study, named by the study's id:

- ``labels/final/<id>.json``: the study's datalist fields other than ``image``, as in the bundle's
  ``sample/datalist.json`` (CSR: ``concepts`` and ``diseases``, as lists of the names present or as 0/1 vectors; CT
  encoder: ``report`` and ``mask``). Paths in it (``mask``, ``label``, ``roi``, ``concept_masks``) are relative to
  the studies folder.
- ``labels/final/<id>.txt``: YOLO boxes, one ``class cx cy w h`` line per box, normalised to the image's width and
  height (ultralytics' label format); an empty file marks an image without findings.

MONAI Label's datastore does not list ``.json`` and ``.txt`` files as labels (its file extensions are images'), so
these readers take the files from the studies folder themselves: local studies folders only.

:class:`LabelledReferences` turns the studies labelled with label maps (``labels/final/<id>.nii.gz``) into the
references of an in-context bundle (IRIS), so that labelling one study is enough to segment the others.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy
from monailabel.interfaces.datastore import DefaultLabelTag

from common.data.datalist import resolve_item_paths, write_references

from .train import LABEL_MAP_SUFFIXES

__all__ = ["LABELS_DIR", "JsonLabels", "LabelledReferences", "YoloLabels", "image_size", "label_file"]

logger = logging.getLogger(__name__)

LABELS_DIR = os.path.join("labels", "final")


def label_file(image_path: str | os.PathLike, image_id: str, suffix: str) -> Path:
    """``<studies>/labels/final/<image_id><suffix>`` for a study stored at ``image_path`` in the studies folder."""
    return Path(image_path).resolve().parent / LABELS_DIR / f"{image_id}{suffix}"


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of a 2D image file: DICOM (Columns, Rows, read without pixel data), NIfTI/NRRD (first
    two axes, as MONAI loads them) or any format PIL reads (PNG, JPEG, TIFF)."""
    path = str(path)
    lower = path.lower()
    if lower.endswith(".dcm"):
        import pydicom

        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        return int(header.Columns), int(header.Rows)
    if lower.endswith((".nii", ".nii.gz", ".nrrd", ".nhdr")):
        import nibabel as nib

        shape = nib.load(path).shape if not lower.endswith((".nrrd", ".nhdr")) else _nrrd_shape(path)
        return int(shape[0]), int(shape[1])
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _nrrd_shape(path: str) -> tuple[int, ...]:
    import nrrd

    return tuple(nrrd.read_header(path)["sizes"])


def _multi_hot(value: Any, names: Sequence[str], field: str, source: Path) -> list[int]:
    """0/1 vector over ``names`` from a list of the names present, a ``{name: 0/1}`` mapping or a 0/1 vector."""
    if isinstance(value, Mapping):
        value = [k for k, v in value.items() if v]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{source}: '{field}' should be a list of names from {list(names)} or a 0/1 vector.")
    if all(isinstance(v, str) for v in value):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{source}: '{field}' names {unknown} are not among {list(names)}.")
        return [int(n in value) for n in names]
    if len(value) != len(names) or any(v not in (0, 1) for v in value):
        raise ValueError(f"{source}: '{field}' should be {len(names)} values of 0 or 1 (one per name of "
                         f"{list(names)}), got {value}.")
    return [int(v) for v in value]


class JsonLabels:
    """The item of a study whose ``labels/final/<id>.json`` has the fields a bundle trains on.

    Args:
        required: fields the JSON must have (a study without them is not an item of this bundle).
        vectors: fields given as names that the bundle reads as 0/1 vectors, with the names in vector order,
            e.g. ``{"concepts": concept_names, "diseases": disease_names}``.

    Calling it with a study's id and image path returns ``{"image": path, **fields}`` (paths resolved against the
    studies folder), or None when the study has no such JSON or the JSON lacks a required field.
    """

    suffix = ".json"

    def __init__(self, required: Sequence[str], vectors: Mapping[str, Sequence[str]] | None = None) -> None:
        self.required = tuple(required)
        self.vectors = {k: list(v) for k, v in (vectors or {}).items()}

    def __call__(self, image_id: str, image_path: str) -> dict | None:
        path = label_file(image_path, image_id, self.suffix)
        if not path.is_file():
            return None
        try:
            fields = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e}).") from e
        if not isinstance(fields, dict) or any(k not in fields for k in self.required):
            return None
        fields.pop("image", None)
        item = resolve_item_paths(fields, path.parents[2])  # relative to the studies folder
        for key, names in self.vectors.items():
            if key in item:
                item[key] = _multi_hot(item[key], names, key, path)
        return {"image": str(image_path), **item}


class YoloLabels:
    """The item of a study with YOLO boxes in ``labels/final/<id>.txt``: ``{"image", "boxes": [[class, x0, y0,
    x1, y1], ...]}`` in the image's pixels, as the detection bundle's datalists hold them.

    Args:
        num_classes: number of box classes; class indices outside ``[0, num_classes)`` are refused.
    """

    suffix = ".txt"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)

    def __call__(self, image_id: str, image_path: str) -> dict | None:
        path = label_file(image_path, image_id, self.suffix)
        if not path.is_file():
            return None
        width, height = image_size(image_path)
        boxes = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            fields = line.split()
            try:
                if len(fields) != 5:
                    raise ValueError
                cls, cx, cy, w, h = int(fields[0]), *(float(v) for v in fields[1:])
            except ValueError:
                raise ValueError(f"{path}:{number}: should be 'class cx cy w h' (class an integer, the others "
                                 f"normalised to [0, 1]), got {line!r}.") from None
            if not 0 <= cls < self.num_classes:
                raise ValueError(f"{path}:{number}: class should be in [0, {self.num_classes}), got {cls}.")
            if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
                raise ValueError(f"{path}:{number}: cx, cy, w, h should be normalised to [0, 1], got {line!r}.")
            boxes.append([cls, (cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                          (cy + h / 2) * height])
        return {"image": str(image_path), "boxes": boxes}


class LabelledReferences:
    """References of an in-context bundle from the studies labelled in a MONAI Label datastore.

    The most recently labelled studies (by their final label map's modification time) come first; a study whose
    label map holds none of ``label_values``' values is passed over, and the study being segmented is never its
    own reference.

    Args:
        datastore: MONAI Label datastore; its final label maps (``labels/final``) are read.
        label_values: class name -> label value, e.g. the bundle's ``metadata.json`` ``label_values``. The
            references' classes are those whose value one of the chosen label maps holds.
        num_references: at most this many references. Default 3.
        label_suffixes: label map files accepted. Default NIfTI and NRRD.

    Calling it with a study's image path and a references file to write returns the ids of the studies written as
    references, or an empty list (and writes nothing) when no other study has a usable label map.
    """

    def __init__(
        self,
        datastore: Any,
        label_values: Mapping[str, int],
        num_references: int = 3,
        label_suffixes: Sequence[str] = LABEL_MAP_SUFFIXES,
    ) -> None:
        if num_references < 1:
            raise ValueError(f"num_references should be >= 1, got {num_references}.")
        self.datastore = datastore
        self.label_values = {str(k): int(v) for k, v in label_values.items()}
        self.num_references = int(num_references)
        self.label_suffixes = tuple(label_suffixes)

    def labelled(self, exclude: str | None = None) -> list[tuple[str, str, str]]:
        """``(image_id, image_path, label_path)`` of the studies with a final label map, most recent first,
        without the study whose image is ``exclude``."""
        exclude = os.path.realpath(exclude) if exclude else None
        studies = []
        for image_id in self.datastore.get_labeled_images(DefaultLabelTag.FINAL):
            image = self.datastore.get_image_uri(image_id)
            label = self.datastore.get_label_uri(image_id, DefaultLabelTag.FINAL)
            if not image or not label or not label.lower().endswith(self.label_suffixes) or not os.path.isfile(label):
                continue
            if exclude and os.path.realpath(image) == exclude:
                continue
            studies.append((os.path.getmtime(label), image_id, image, label))
        studies.sort(key=lambda s: (-s[0], s[1]))
        return [s[1:] for s in studies]

    def __call__(self, image: str, path: str | os.PathLike) -> list[str]:
        from monai.transforms import LoadImage

        load = LoadImage(image_only=True)
        known = set(self.label_values.values())
        chosen, present = [], set()
        for image_id, image_path, label_path in self.labelled(exclude=image):
            values = set(numpy.unique(numpy.asarray(load(label_path))).astype(int).tolist()) & known
            if not values:
                logger.info("%s: label map holds none of the values %s; not a reference", image_id, sorted(known))
                continue
            chosen.append((image_id, {"image": image_path, "label": label_path}))
            present |= values
            if len(chosen) == self.num_references:
                break
        if not chosen:
            return []
        classes = {name: value for name, value in self.label_values.items() if value in present}
        write_references(path, [item for _, item in chosen], classes)
        return [image_id for image_id, _ in chosen]
