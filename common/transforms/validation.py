from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["ValidateImaged", "CheckSameGridd", "source_name"]


def source_name(img) -> str:
    """The file an image came from, for error messages."""
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<in-memory image>"))


class ValidateImaged(MapTransform):
    """Reject images a model cannot use, naming the file and the problem.

    Checks, per key, a channel-first array: ``spatial_dims`` spatial axes (a 2D slice where a 3D volume is needed is
    refused), at least ``min_size`` voxels per axis, the expected channel count, and only finite values.

    Args:
        keys: keys to check.
        spatial_dims: required number of spatial axes. Default 3.
        channels: required channel count, or None for any. Default 1.
        min_size: smallest size of each spatial axis. Default 2.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int = 3,
        channels: int | None = 1,
        min_size: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.min_size = min_size

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            name = source_name(img)
            spatial = tuple(img.shape[1:])
            # a degenerate axis (e.g. a single slice saved as 3D) is a 2D image in disguise
            real_dims = sum(s > 1 for s in spatial)
            if len(spatial) != self.spatial_dims or real_dims < self.spatial_dims:
                raise ValueError(
                    f"{name}: expected a {self.spatial_dims}D image, got spatial shape {list(spatial)} "
                    f"({real_dims}D); this model needs {self.spatial_dims}D input."
                )
            if min(spatial) < self.min_size:
                raise ValueError(f"{name}: image is too small, spatial shape {list(spatial)}.")
            if self.channels is not None and img.shape[0] != self.channels:
                raise ValueError(f"{name}: expected {self.channels} channel(s), got {img.shape[0]}.")
            finite = torch.isfinite(torch.as_tensor(img))
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise ValueError(f"{name}: image has {bad} non-finite voxel(s) (NaN or Inf).")
        return d


class CheckSameGridd(MapTransform):
    """Require each key's spatial shape to equal ``reference_key``'s (e.g. a doctor's ROI drawn on the image).

    Args:
        keys: keys to check (e.g. ``"roi"``).
        reference_key: the image they must match. Default ``"image"``.
        allow_missing_keys: skip absent keys (an image without an ROI).
    """

    def __init__(self, keys: KeysCollection, reference_key: str = "image", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref = d[self.reference_key]
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != tuple(ref.shape[1:]):
                raise ValueError(
                    f"{source_name(d[key])}: {key} has spatial shape {list(d[key].shape[1:])} but the image "
                    f"{source_name(ref)} has {list(ref.shape[1:])}; it must be drawn on the same grid."
                )
        return d
