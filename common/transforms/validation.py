"""Input checks that fail with the file and the problem named: image size and dimensions, matching grids, region masks,
reports."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["ValidateImaged", "CheckSameGridd", "ValidateRegionMaskd", "ValidateReportd", "source_name"]


def source_name(img) -> str:
    """The file an image came from, for error messages."""
    meta = getattr(img, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<in-memory image>"))


class ValidateImaged(MapTransform):
    """Reject images a model cannot use, naming the file and the problem.

    Checks, per key, a channel-first array: ``spatial_dims`` spatial axes (a 2D slice where a 3D volume is needed is
    refused), at least ``min_size`` voxels per axis, the expected channel count, only finite values, not one constant
    value (an all-air or blank image gives a model nothing to read, yet it would answer with confidence), and, for
    DICOM input, a ``Modality`` tag among ``modalities`` (a CT slice given to a radiograph model). Placed again after
    resampling with a larger ``min_size``, it refuses volumes that vanish on the model's grid (a thin slab).

    Args:
        keys: keys to check.
        spatial_dims: required number of spatial axes. Default 3.
        channels: required channel count, or None for any. Default 1.
        min_size: smallest size of each spatial axis, or one per axis (e.g. a network's patch size). Default 2.
        reject_constant: refuse images whose voxels all have one value. Default True.
        modalities: DICOM ``Modality`` values accepted (e.g. ``["CR", "DX"]``); None accepts any, and inputs
            without the tag (NIfTI, PNG) are not checked. Default None.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int = 3,
        channels: int | None = 1,
        min_size: int | Sequence[int] = 2,
        reject_constant: bool = True,
        modalities: Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.min_size = min_size
        self.reject_constant = reject_constant
        self.modalities = None if modalities is None else [str(m).upper() for m in modalities]

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
            minimum = [self.min_size] * len(spatial) if isinstance(self.min_size, int) else list(self.min_size)
            if len(minimum) != len(spatial) or any(s < m for s, m in zip(spatial, minimum)):
                raise ValueError(f"{name}: image is too small, spatial shape {list(spatial)}; "
                                 f"needs at least {minimum}.")
            if self.channels is not None and img.shape[0] != self.channels:
                raise ValueError(f"{name}: expected {self.channels} channel(s), got {img.shape[0]}.")
            finite = torch.isfinite(torch.as_tensor(img))
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise ValueError(f"{name}: image has {bad} non-finite voxel(s) (NaN or Inf).")
            values = torch.as_tensor(img)
            if self.reject_constant and bool(values.max() == values.min()):
                raise ValueError(f"{name}: every voxel has the value {float(values.max()):g}; a constant image holds "
                                 "nothing to read.")
            modality = str((getattr(img, "meta", None) or {}).get("Modality", "") or "").upper()
            if self.modalities is not None and modality and modality not in self.modalities:
                raise ValueError(f"{name}: DICOM modality {modality}, but this model reads "
                                 f"{'/'.join(self.modalities)} images.")
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


class ValidateRegionMaskd(MapTransform):
    """Require region masks to hold integer region ids in ``[0, num_regions]`` (0 = no region), naming the file.

    Args:
        keys: mask keys.
        num_regions: the highest id the model knows.
        allow_missing_keys: skip absent keys (a volume without a mask). Default True.
    """

    def __init__(self, keys: KeysCollection, num_regions: int, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(num_regions, bool) or not isinstance(num_regions, int) or num_regions < 1:
            raise ValueError(f"num_regions should be a positive integer, got {num_regions}.")
        self.num_regions = num_regions

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            mask = torch.as_tensor(d[key])
            if mask.is_floating_point() and not bool((torch.isfinite(mask) & (mask == mask.round())).all()):
                raise ValueError(f"{source_name(d[key])}: {key} should hold integer region ids, got non-integral "
                                 "values.")
            low, high = int(mask.min()), int(mask.max())
            if low < 0 or high > self.num_regions:
                raise ValueError(f"{source_name(d[key])}: {key} has region ids in [{low}, {high}], above the "
                                 f"configured number of regions {self.num_regions} (ids 0..{self.num_regions}).")
        return d


class ValidateReportd(MapTransform):
    """Require a usable report (layout of :mod:`common.data.synthetic_ct_reports`): a non-empty impression, findings
    and reasoning steps with text, and region ids in ``[0, num_regions]``. Errors name the case's image.

    Args:
        keys: report keys.
        num_regions: the highest region id the model knows.
        image_key: key whose source file names the case. Default ``"image"``.
    """

    def __init__(self, keys: KeysCollection, num_regions: int, image_key: str = "image") -> None:
        super().__init__(keys)
        self.num_regions = num_regions
        self.image_key = image_key

    def _problem(self, report) -> str | None:
        if not isinstance(report, Mapping):
            return f"should be a dict, got {type(report).__name__}"
        if not str(report.get("impression") or "").strip():
            return "has an empty impression"
        for kind, items, text_key, id_key in (("finding", report.get("findings", []), "text", "region_id"),
                                              ("reasoning step", report.get("cot", []), "step", "mask_region")):
            for i, item in enumerate(items):
                if not str(item.get(text_key) or "").strip():
                    return f"has an empty {kind} {i}"
                region = item.get(id_key, 0)
                if isinstance(region, bool) or not isinstance(region, int) or not 0 <= region <= self.num_regions:
                    return (f"{kind} {i} has region id {region!r}, outside 0..{self.num_regions} (the configured "
                            "number of regions)")
        return None

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            problem = self._problem(d[key])
            if problem is not None:
                source = d.get(self.image_key)
                name = source_name(source) if hasattr(source, "meta") else str(source)
                raise ValueError(f"{name}: {key} {problem}.")
        return d
