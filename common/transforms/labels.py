"""From per-class probabilities to a label map with the bundle's class values."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from common.bundle.args import as_bool

__all__ = ["ClassMasksd", "ProbabilitiesToLabelMapd", "class_values", "most_probable_class"]


def class_values(classes) -> dict[str, int]:
    """``{name: label value}`` from a mapping or from an object holding one in ``.classes`` (a prompt)."""
    return dict(getattr(classes, "classes", classes))


def most_probable_class(prob: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The label-map rule: each voxel's most probable class, kept where its probability reaches ``threshold``.

    Args:
        prob: ``(K, *S)`` per-class probabilities.

    Returns:
        ``(1, *S)`` class index (the first of tied classes) and ``(1, *S)`` bool, whether the voxel is labelled.
    """
    best, idx = prob.max(dim=0, keepdim=True)
    return idx, best >= threshold


class ClassMasksd(MapTransform):
    """Per-class probabilities ``(K, *S)`` -> binary masks ``(K, *S)``, either each class on its own (``p >=
    threshold``: the per-class binary masks of the IRIS paper's evaluation) or ``exclusive``: the masks of the label
    map that :class:`ProbabilitiesToLabelMapd` writes (each voxel in its most probable class only), so an evaluation
    scores exactly what inference delivers.

    Args:
        keys: prediction keys.
        threshold: minimum probability of a foreground voxel. Default 0.5.
        exclusive: one class per voxel, as in the written label map. Default False; the string ``'false'`` of the
            bundle runner's command line counts as False.
    """

    def __init__(self, keys: KeysCollection, threshold: float = 0.5, exclusive=False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = float(threshold)
        self.exclusive = as_bool(exclusive, "exclusive")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            prob = d[key]
            if not self.exclusive:
                d[key] = (prob >= self.threshold).to(prob.dtype)
                continue
            idx, keep = most_probable_class(prob, self.threshold)
            classes = torch.arange(prob.shape[0], device=prob.device).view(-1, *([1] * (prob.dim() - 1)))
            d[key] = ((idx == classes) & keep).to(prob.dtype)
        return d


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
            idx, keep = most_probable_class(prob, self.threshold)
            lut = torch.tensor(values, dtype=torch.int16, device=idx.device)
            d[key] = torch.where(keep, lut[idx], torch.zeros_like(idx, dtype=torch.int16))
        return d
