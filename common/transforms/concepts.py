"""Loading CSR's per-concept ROI masks into a concept-mask tensor."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, LoadImage, MapTransform

__all__ = ["LoadConceptMasksd"]


class LoadConceptMasksd(MapTransform):
    """Stack an image's per-concept region masks into one ``(K, *spatial)`` tensor in model concept order.

    The key holds ``{concept name: mask path}`` for the concepts drawn in the image (as written by the synthetic
    chest X-ray generator); concepts without a mask get zeros. The result goes to ``output_key`` on the grid of
    ``reference_key`` (masks are loaded like the image, so both share MONAI's axis order), ready to be resized with
    the image.

    Args:
        keys: the key of the name -> path mapping. Default ``"concept_masks"``.
        concept_names: concepts in model order.
        reference_key: the image whose grid the masks share. Default ``"image"``.
        output_key: where the stacked masks go. Default ``"concept_mask"``.
    """

    def __init__(
        self,
        keys: KeysCollection = "concept_masks",
        concept_names: Sequence[str] = (),
        reference_key: str = "image",
        output_key: str = "concept_mask",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.concept_names = list(concept_names)
        self.reference_key = reference_key
        self.output_key = output_key
        self.loader = LoadImage(image_only=True)
        self.channel_first = EnsureChannelFirst()

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        ref = d[self.reference_key]
        for key in self.key_iterator(d):
            paths = d[key] or {}
            unknown = [n for n in paths if n not in self.concept_names]
            if unknown:
                raise ValueError(f"{key}: unknown concepts {unknown}; known: {self.concept_names}.")
            masks = torch.zeros((len(self.concept_names), *ref.shape[1:]))
            for name, path in paths.items():
                mask = self.channel_first(self.loader(path))[0]
                if tuple(mask.shape) != tuple(ref.shape[1:]):
                    raise ValueError(
                        f"{path}: mask shape {list(mask.shape)} differs from the image's {list(ref.shape[1:])}."
                    )
                masks[self.concept_names.index(name)] = (torch.as_tensor(mask) > 0).float()
            meta = dict(getattr(ref, "meta", {}))
            d[self.output_key] = MetaTensor(masks, affine=getattr(ref, "affine", None), meta=meta)
        return d
