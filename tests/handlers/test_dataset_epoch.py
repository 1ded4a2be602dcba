from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader

from common.data import RandomEpisodeDataset
from common.handlers import DatasetEpochHandler


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_epoch_sees_its_own_episodes(num_workers):
    """The epoch is set before the epoch's workers start, so epoch ``e`` holds episodes ``e * len ...``."""
    ds = RandomEpisodeDataset(image_size=(16, 16, 16), episodes_per_epoch=4, seed=2)
    seen: list[tuple[int, torch.Tensor]] = []
    engine = Engine(lambda e, batch: seen.append((e.state.epoch, batch["image"])))
    DatasetEpochHandler(ds).attach(engine)
    engine.run(DataLoader(ds, batch_size=2, num_workers=num_workers), max_epochs=3)
    assert [epoch for epoch, _ in seen] == [1, 1, 2, 2, 3, 3]
    for step, (epoch, images) in enumerate(seen):
        first = (epoch - 1) * 4 + 2 * (step % 2)
        expected = torch.stack([ds.episode(first)["image"], ds.episode(first + 1)["image"]])
        assert torch.equal(images, expected)


def test_dataset_without_set_epoch_raises():
    with pytest.raises(ValueError, match="set_epoch"):
        DatasetEpochHandler([1, 2, 3])
