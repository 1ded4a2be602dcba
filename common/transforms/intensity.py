"""Intensity windowing of CT (a ``[center, width]`` window in HU) and MR (percentiles) to [0, 1]."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRangePercentiles
from monai.utils import look_up_option

__all__ = ["ScaleIntensityWindowd", "CT_WINDOWS"]

# Named CT windows as (center, width) in HU.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (60.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "wide": (0.0, 2000.0),
}


class ScaleIntensityWindowd(MapTransform):
    """Scale intensities to [0, 1] by a CT window or by MR percentiles: MONAI's ``ScaleIntensityRange`` or
    ``ScaleIntensityRangePercentiles``, chosen by ``mode`` so one config serves CT and MR.

    ``mode="ct"`` clips to ``window`` (a name from :data:`CT_WINDOWS` or ``(center, width)`` in HU);
    ``mode="mr"`` maps the ``percentiles`` of each image to [0, 1] and clips, since MR has no absolute scale.

    Args:
        keys: image keys.
        mode: ``"ct"`` or ``"mr"``.
        window: CT window name or ``(center, width)``. Default ``"wide"`` (-1000..1000 HU).
        percentiles: MR lower and upper percentiles. Default ``(0.5, 99.5)``.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: str = "ct",
        window: str | Sequence[float] = "wide",
        percentiles: Sequence[float] = (0.5, 99.5),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mode = look_up_option(mode, ("ct", "mr"))
        if isinstance(window, str):
            window = look_up_option(window, CT_WINDOWS)
        if len(window) != 2 or window[1] <= 0:
            raise ValueError(f"window should be a name or (center, width > 0), got {window}.")
        if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"percentiles should satisfy 0 <= lower < upper <= 100, got {percentiles}.")
        center, width = float(window[0]), float(window[1])
        self.scaler = (
            ScaleIntensityRange(center - width / 2, center + width / 2, 0.0, 1.0, clip=True)
            if self.mode == "ct"
            else ScaleIntensityRangePercentiles(percentiles[0], percentiles[1], 0.0, 1.0, clip=True)
        )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key])
        return d
