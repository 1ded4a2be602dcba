"""Filling a trained network's memory bank from named-class episodes."""

from __future__ import annotations

import torch

from common.engines import fill_memory_bank
from common.networks import iris_small


def _episode(class_ids: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ref_label = (torch.rand(2, len(class_ids), 16, 16, 16, generator=g) > 0.7).float()
    for k, c in enumerate(class_ids):
        if c < 0:
            ref_label[:, k] = -1.0  # an unused channel, as EpisodeDataset fills it
    return {"ref_image": torch.rand(2, 1, 16, 16, 16, generator=g), "ref_label": ref_label,
            "class_ids": torch.tensor(class_ids)}


def test_fill_memory_bank_stores_the_episode_embeddings_and_keeps_the_weights():
    torch.manual_seed(0)
    net = iris_small().train()
    weights = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor) and "memory" not in k}
    episodes = [_episode([0, 2, -1], seed=1), _episode([1, 2, 0], seed=2)]
    updates = fill_memory_bank(net, episodes, ["liver", "spleen", "kidney"])

    assert updates == {"liver": 2, "spleen": 1, "kidney": 2}
    assert net.training  # restored
    for k, v in net.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k
    assert sorted(net.memory_bank.known_classes) == ["kidney", "liver", "spleen"]
    net.eval()
    with torch.no_grad():
        second = net.encode_task(episodes[1]["ref_image"][None], episodes[1]["ref_label"][None])[0]
    # spleen was seen once, in the second episode: the bank holds exactly that embedding (first update)
    torch.testing.assert_close(net.memory_bank.retrieve(["spleen"])[0], second[0])


def test_fill_memory_bank_skips_episodes_without_named_classes():
    net = iris_small()
    assert fill_memory_bank(net, [_episode([-1, -1], seed=3)], ["liver"]) == {}
    assert net.memory_bank.known_classes == []
