"""Per-case outputs of segmentation bundles: existence check, JSON summary and PNG preview."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import FolderLayout
from monai.transforms import MapTransform

from common.bundle.args import as_bool
from common.transforms.labels import class_values
from common.transforms.validation import source_name
from common.visualize.preview import save_orthogonal_preview

__all__ = ["CheckOutputsd", "SaveSegmentationSummaryd", "SaveOrthogonalPreviewd", "output_path"]


def output_path(source: str | os.PathLike, output_dir: str | os.PathLike, postfix: str, extension: str) -> Path:
    """Where a per-case output of ``source`` goes: the naming of ``SaveImaged(separate_folder=False)``."""
    layout = FolderLayout(output_dir, postfix=postfix, extension=extension, parent=False, makedirs=False)
    return Path(layout.filename(subject=str(source)))


class CheckOutputsd(MapTransform):
    """Refuse to process a case whose outputs already exist, unless ``overwrite`` is set.

    Placed first in preprocessing, so the refusal is reported per case before any work, and nothing a user
    already has is replaced silently.

    Args:
        keys: the key holding the source path (before loading).
        output_dir: output folder.
        outputs: ``(postfix, extension)`` pairs of every file written per case.
        overwrite: allow replacing existing outputs.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        outputs: Sequence[Sequence[str]],
        overwrite: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = output_dir
        self.outputs = [tuple(o) for o in outputs]
        self.overwrite = as_bool(overwrite, "overwrite")

    def __call__(self, data: Mapping[Hashable, str]) -> dict[Hashable, str]:
        d = dict(data)
        if self.overwrite:
            return d
        for key in self.key_iterator(d):
            paths = [output_path(d[key], self.output_dir, post, ext) for post, ext in self.outputs]
            existing = [p for p in paths if p.exists()]
            if existing:
                raise FileExistsError(
                    f"{d[key]}: outputs already exist ({', '.join(map(str, existing))}); "
                    "set overwrite to true to replace them."
                )
        return d


def _voxel_volume_ml(img) -> float | None:
    affine = getattr(img, "affine", None)
    if affine is None:  # unknown spacing: JSON null rather than NaN
        return None
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3]))) / 1000.0


class SaveSegmentationSummaryd(MapTransform):
    """Write ``<name>_summary.json``: per class its label value, voxel count and volume in mL.

    The label map must be in the query's original grid (after ``Invertd``) so volumes use the original spacing.

    Args:
        keys: label-map key.
        output_dir: output folder.
        classes: ``{name: value}`` or an object with ``.classes`` (see ``ProbabilitiesToLabelMapd``).
        postfix: file postfix. Default ``summary``.
    When ``classes`` is an in-context prompt, its strategy is recorded too.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        classes,
        postfix: str = "summary",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = output_dir
        self.classes = classes
        self.postfix = postfix

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            voxel_ml = _voxel_volume_ml(label)
            counts = {
                name: int((torch.as_tensor(label) == value).sum()) for name, value in class_values(self.classes).items()
            }
            summary = {
                "source": source_name(label),
                "spatial_shape": list(label.shape[1:]),
                "voxel_volume_ml": voxel_ml,
                "classes": {
                    name: {
                        "label_value": value,
                        "voxels": counts[name],
                        "volume_ml": None if voxel_ml is None else counts[name] * voxel_ml,
                    }
                    for name, value in class_values(self.classes).items()
                },
            }
            if hasattr(self.classes, "strategy"):
                summary["strategy"] = self.classes.strategy
            path = output_path(summary["source"], self.output_dir, self.postfix, ".json")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(summary, indent=4))
        return d


class SaveOrthogonalPreviewd(MapTransform):
    """Write ``<name>_preview.png``: axial, coronal and sagittal slices of the image with the label map overlaid.

    Args:
        keys: ``(image_key, label_key)``.
        output_dir: output folder.
        classes: ``{name: value}`` or an object with ``.classes``, for the legend.
        postfix: file postfix. Default ``preview``.
    """

    def __init__(
        self, keys: KeysCollection, output_dir: str | os.PathLike, classes=None, postfix: str = "preview"
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys should be (image_key, label_key), got {self.keys}.")
        self.output_dir = output_dir
        self.classes = classes
        self.postfix = postfix

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image, label = d[self.keys[0]], d[self.keys[1]]
        source = source_name(label)
        path = output_path(source, self.output_dir, self.postfix, ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        names = {v: n for n, v in class_values(self.classes).items()} if self.classes is not None else None
        spacing = getattr(label, "pixdim", None)
        save_orthogonal_preview(
            np.asarray(torch.as_tensor(image).detach().cpu()[0]),
            path,
            label=np.asarray(torch.as_tensor(label).detach().cpu()[0]),
            class_names=names,
            spacing=None if spacing is None else [float(s) for s in spacing[:3]],
            title=Path(source).name,
            overwrite=True,
        )
        return d
