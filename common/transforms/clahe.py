"""Contrast-limited adaptive histogram equalisation (CLAHE) of radiographs."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.transforms.validation import source_name

__all__ = ["CLAHEd"]


class CLAHEd(MapTransform):
    """Equalise each 2D channel with CLAHE (Zuiderveld, Graphics Gems IV, 1994) via
    ``skimage.exposure.equalize_adapthist``.

    The image must already be scaled to [0, 1] (e.g. by ``ScaleIntensityRangePercentilesd``); the output is in
    [0, 1], same shape, dtype float32, metadata kept. Tiles follow the image's own rows and columns: MONAI's
    ``(C, W, H)`` layout is transposed to ``(H, W)`` for the equalisation and back.

    Args:
        keys: image keys, ``(C, W, H)`` channel-first 2D.
        clip_limit: contrast limit in [0, 1] (higher: more contrast). Default 0.01.
        kernel_size: tile size ``(rows, columns)`` in pixels, or None for 1/8 of each side. Default None.
        nbins: histogram bins. Default 256.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        clip_limit: float = 0.01,
        kernel_size: int | Sequence[int] | None = None,
        nbins: int = 256,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= clip_limit <= 1.0:
            raise ValueError(f"clip_limit should be in [0, 1], got {clip_limit}.")
        if nbins < 2:
            raise ValueError(f"nbins should be at least 2, got {nbins}.")
        self.clip_limit, self.kernel_size, self.nbins = float(clip_limit), kernel_size, int(nbins)

    def equalize(self, image: np.ndarray) -> np.ndarray:
        """CLAHE of one ``(H, W)`` array in [0, 1]."""
        from skimage.exposure import equalize_adapthist  # imported here: the transform is optional in pipelines

        return equalize_adapthist(image, kernel_size=self.kernel_size, clip_limit=self.clip_limit, nbins=self.nbins)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim != 3:
                raise ValueError(f"{source_name(img)}: CLAHE needs a channel-first 2D image, got shape "
                                 f"{tuple(img.shape)}.")
            values = torch.as_tensor(img).detach().float().cpu().numpy()
            if values.size and (values.min() < -1e-6 or values.max() > 1 + 1e-6):
                raise ValueError(f"{source_name(img)}: CLAHE needs intensities in [0, 1], got "
                                 f"[{values.min():g}, {values.max():g}]; scale the image first.")
            values = np.clip(values, 0.0, 1.0)
            equalised = np.stack([self.equalize(channel.T).T for channel in values]).astype(np.float32)
            out = torch.as_tensor(equalised, device=torch.as_tensor(img).device)
            d[key] = MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out
        return d
