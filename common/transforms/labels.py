"""From per-class probabilities to a label map with the bundle's class values."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["ProbabilitiesToLabelMapd", "class_values"]


def class_values(classes) -> dict[str, int]:
    """``{name: label value}`` from a mapping or from an object holding one in ``.classes`` (a prompt)."""
    return dict(getattr(classes, "classes", classes))


class ProbabilitiesToLabelMapd(MapTransform):
    """Per-class probabilities ``(K, *S)`` -> label map ``(1, *S)`` holding each class's label value.

    A voxel takes the value of its most probable class when that probability reaches ``threshold``, else 0, so
    overlapping binary predictions resolve to one class.

    Args:
        keys: prediction keys.
        classes: ``{name: value}`` in channel order, or an object with such a ``.classes`` (read at call time,
            since an in-context prompt only knows its classes once encoded).
        threshold: minimum probability of a foreground voxel. Default 0.5.
    """

    def __init__(
        self, keys: KeysCollection, classes, threshold: float = 0.5, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.classes = classes
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        values = list(class_values(self.classes).values())
        for key in self.key_iterator(d):
            prob = d[key]
            if prob.shape[0] != len(values):
                raise ValueError(f"'{key}' has {prob.shape[0]} channels but {len(values)} classes are defined.")
            best, idx = prob.max(dim=0, keepdim=True)
            lut = torch.tensor(values, dtype=torch.int16, device=idx.device)
            d[key] = torch.where(best >= self.threshold, lut[idx], torch.zeros_like(idx, dtype=torch.int16))
        return d
