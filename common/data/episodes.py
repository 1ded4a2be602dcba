"""The episode sampler for in-context training, shared by every in-context bundle."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, MetaTensor
from torch.utils.data import Dataset

__all__ = ["EpisodeDataset"]


def _plain(x) -> torch.Tensor:
    """Episodes carry plain tensors: their metadata would be meaningless after mixing volumes."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class EpisodeDataset(Dataset):
    """Episodes drawn from labelled volumes of one or more datasets.

    Each episode picks a dataset (by ``dataset_weights``), a query volume, up to ``classes_per_episode`` classes
    present in it, and ``references_per_episode`` *other* volumes of the same dataset chosen to show those classes.
    Volumes are preprocessed once, when the dataset is built (``transform``, cached in this process), and augmented
    independently per episode (``augmentation``), so a reference is never a copy of the query. Data-loader workers
    forked from this process inherit the cache: more workers, or more epochs, never preprocess a volume again.
    Randomness comes from torch's generator, which ``monai.utils.set_determinism`` and the data loader's worker
    seeding make reproducible.

    Output of ``__getitem__`` (spatial size S of the preprocessed volumes, K classes, R references):
        - ``image``: ``(1, *S)`` query image.
        - ``label``: ``(K, *S)`` binary query masks; channels without a class are filled with ``ignore_value``.
        - ``ref_image``: ``(R, 1, *S)``; ``ref_label``: ``(R, K, *S)`` binary masks (zeros where absent).
        - ``class_ids``: ``(K,)`` indices into :attr:`class_names`, -1 for unused channels.

    Args:
        data: datalist items with ``image``, ``label`` and ``class_names``/``dataset`` (see ``load_datalist``).
        transform: deterministic preprocessing of ``{"image", "label"}`` (cached).
        augmentation: random transform applied to each volume of an episode, or None.
        classes_per_episode: K. Default 3.
        references_per_episode: R. Default 1.
        episodes_per_epoch: length of the dataset. Default 100.
        exclude_classes: class names never used (held out for evaluation).
        dataset_weights: sampling weight per dataset name; uniform over datasets when None.
        cache_rate: fraction of volumes cached. Default 1.0.
        num_workers: workers used to fill the cache.
        ignore_value: fill of unused label channels. Default -1.
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        transform: Callable | None = None,
        augmentation: Callable | None = None,
        classes_per_episode: int = 3,
        references_per_episode: int = 1,
        episodes_per_epoch: int = 100,
        exclude_classes: Sequence[str] = (),
        dataset_weights: Mapping[str, float] | None = None,
        cache_rate: float = 1.0,
        num_workers: int = 0,
        ignore_value: float = -1.0,
    ) -> None:
        if classes_per_episode < 1 or references_per_episode < 1 or episodes_per_epoch < 1:
            raise ValueError(
                "classes_per_episode, references_per_episode and episodes_per_epoch should be >= 1, got "
                f"{classes_per_episode}, {references_per_episode}, {episodes_per_epoch}."
            )
        self.data = list(data)
        if len(self.data) < 2:
            raise ValueError(f"data should hold at least two labelled volumes, got {len(self.data)}.")
        self.transform = transform
        self.augmentation = augmentation
        self.classes_per_episode = classes_per_episode
        self.references_per_episode = references_per_episode
        self.episodes_per_epoch = episodes_per_epoch
        self.exclude_classes = set(exclude_classes)
        if dataset_weights is not None:
            known = {str(item.get("dataset", "")) for item in self.data}
            bad = {k: w for k, w in dataset_weights.items() if k not in known or not w >= 0}
            if bad or not any(w > 0 for w in dataset_weights.values()):
                raise ValueError(
                    f"dataset_weights should map dataset names {sorted(known)} to weights >= 0 (some > 0), "
                    f"got {dict(dataset_weights)}."
                )
        self.dataset_weights = dict(dataset_weights) if dataset_weights else None
        self.cache_rate = cache_rate
        self.num_workers = num_workers
        self.ignore_value = ignore_value
        names = {n for item in self.data for n in item.get("class_names", {}).values()}
        self.class_names: list[str] = sorted(names - self.exclude_classes)
        if not self.class_names:
            raise ValueError("no trainable class: the datalist has no 'class_names' left after exclude_classes.")
        # built here, in the process that makes the data loader, so that its forked workers share one cache
        # (built lazily in __getitem__, every worker of every epoch would preprocess every volume again)
        self._volumes = CacheDataset(
            self.data, self.transform, cache_rate=self.cache_rate, num_workers=self.num_workers, progress=False
        )
        self._present: list[dict[str, int]] = [self._classes_in(i) for i in range(len(self.data))]

    def __len__(self) -> int:
        return self.episodes_per_epoch

    @property
    def volumes(self) -> CacheDataset:
        """The preprocessed volumes, cached when the dataset is built."""
        return self._volumes

    def _classes_in(self, i: int) -> dict[str, int]:
        """Trainable classes (name -> label value) with voxels in volume ``i`` after preprocessing."""
        values = set(torch.unique(_plain(self._volumes[i]["label"])).int().tolist())
        names = self.data[i].get("class_names", {})
        return {n: int(v) for v, n in names.items() if int(v) in values and n not in self.exclude_classes}

    def _draw_volumes(self, rng: np.random.Generator) -> tuple[int, list[str], list[int]]:
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(self.data):
            groups.setdefault(str(item.get("dataset", "")), []).append(i)
        datasets = sorted(groups)
        weights = np.array([(self.dataset_weights or {}).get(d, 1.0) for d in datasets], dtype=float)
        for _ in range(100):
            members = groups[datasets[rng.choice(len(datasets), p=weights / weights.sum())]]
            query = int(rng.choice(members))
            others = [i for i in members if i != query]
            shared = [c for c in self._present[query] if any(c in self._present[i] for i in others)]
            if shared:
                break
        else:
            raise RuntimeError("could not draw an episode: no two volumes of a dataset share a class.")
        k = min(self.classes_per_episode, len(shared))
        classes = [shared[j] for j in rng.choice(len(shared), size=k, replace=False)]
        refs: list[int] = []
        for _ in range(self.references_per_episode):
            covered = {c for r in refs for c in classes if c in self._present[r]}
            pool = [i for i in others if i not in refs] or others
            score = np.array([len({c for c in classes if c in self._present[i]} - covered) + 0.5 * any(
                c in self._present[i] for c in classes) for i in pool])
            best = [pool[j] for j in np.flatnonzero(score == score.max())]
            refs.append(int(rng.choice(best)))
        classes = [c for c in classes if any(c in self._present[r] for r in refs)]
        return query, classes, refs

    def _masks(self, index: int, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        volume = dict(self.volumes[index])
        if self.augmentation is not None:
            volume = self.augmentation(volume)
        label = _plain(volume["label"])[0]
        values = self.data[index].get("class_names", {})
        by_name = {n: int(v) for v, n in values.items()}
        masks = torch.zeros(self.classes_per_episode, *label.shape)
        for k, c in enumerate(classes):
            if c in self._present[index]:
                masks[k] = (label == by_name[c]).float()
        return _plain(volume["image"]).float(), masks, label

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
        query, classes, refs = self._draw_volumes(rng)
        image, label, _ = self._masks(query, classes)
        label[len(classes):] = self.ignore_value
        ref_images, ref_masks = zip(*[self._masks(r, classes)[:2] for r in refs])
        class_ids = torch.full((self.classes_per_episode,), -1, dtype=torch.long)
        class_ids[: len(classes)] = torch.tensor([self.class_names.index(c) for c in classes])
        return {
            "image": image,
            "label": label,
            "ref_image": torch.stack(ref_images),
            "ref_label": torch.stack(ref_masks),
            "class_ids": class_ids,
        }
