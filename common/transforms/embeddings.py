"""Per-case outputs of volume encoders: embeddings as ``.npy`` and a PNG preview with the region mask."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.transforms.outputs import output_path
from common.transforms.validation import source_name
from common.visualize.preview import save_orthogonal_preview

__all__ = ["EMBEDDING_OUTPUTS", "SaveEmbeddingsd"]

EMBEDDING_OUTPUTS = (("global", ".npy"), ("regions", ".npy"), ("preview", ".png"))
"""``(postfix, extension)`` of every file :class:`SaveEmbeddingsd` writes per case (for ``CheckOutputsd``)."""


def _zyx_to_xyz(x) -> np.ndarray:
    """``(1, D, H, W)`` network layout -> ``(X, Y, Z)`` for the preview writer."""
    return np.asarray(torch.as_tensor(x).detach().float().cpu()[0]).transpose(2, 1, 0)


class SaveEmbeddingsd(MapTransform):
    """Write ``<name>_global.npy`` ``(out_dim,)``, ``<name>_regions.npy`` ``(R, out_dim)`` (rows of absent regions
    are zeros) and ``<name>_preview.png`` (orthogonal slices with the region mask) for one case.

    ``pred`` is the dict of :class:`common.engines.EncodingInferer` (``global``, ``region``, ``region_present``);
    the image is the network input ``(1, D, H, W)``, shown back in ``(X, Y, Z)`` order.

    Args:
        keys: ``(image_key, pred_key)``.
        output_dir: output folder.
        mask_key: key of the region mask drawn on the preview, if the case has one. Default ``"mask"``.
        region_names: names of region ids ``1..R`` for the legend. Default ``None``.
        spacing: ``(sx, sy, sz)`` voxel size of the previewed grid in mm. Default isotropic.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        mask_key: str = "mask",
        region_names: Sequence[str] | None = None,
        spacing: Sequence[float] | None = None,
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys should be (image_key, pred_key), got {self.keys}.")
        self.output_dir = output_dir
        self.mask_key = mask_key
        self.region_names = None if region_names is None else {i + 1: n for i, n in enumerate(region_names)}
        self.spacing = spacing

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        image, pred = d[self.keys[0]], d[self.keys[1]]
        source = source_name(image)
        paths = {post: output_path(source, self.output_dir, post, ext) for post, ext in EMBEDDING_OUTPUTS}
        Path(self.output_dir).mkdir(parents=True, exist_ok=True)
        np.save(paths["global"], pred["global"].detach().float().cpu().numpy())
        np.save(paths["regions"], pred["region"].detach().float().cpu().numpy())
        mask = d.get(self.mask_key)
        save_orthogonal_preview(
            _zyx_to_xyz(image), paths["preview"], label=None if mask is None else _zyx_to_xyz(mask),
            class_names=self.region_names, spacing=self.spacing, title=Path(source).name, overwrite=True,
        )
        d["embedding_files"] = {k: str(v) for k, v in paths.items()}
        return d
