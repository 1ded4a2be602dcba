"""Training-side glue for episodes: how an episode batch feeds ``monai.engines.SupervisedTrainer``, and how a
trained in-context network's class memory bank is filled from episodes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["fill_memory_bank", "prepare_episode_batch"]


def prepare_episode_batch(
    batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], dict]:
    """``prepare_batch`` for episodes: the trainer then calls ``network(image, ref_image, ref_label)``.

    Returns ``(image, label, (ref_image, ref_label), {})`` on ``device``, the form ``SupervisedTrainer`` passes on
    as ``inferer(inputs, network, *args)`` and ``loss_function(pred, label)``.
    """

    def move(key: str) -> torch.Tensor:
        return batchdata[key].to(device=device, non_blocking=non_blocking, **kwargs)

    return move("image"), move("label"), (move("ref_image"), move("ref_label")), {}


@torch.no_grad()
def fill_memory_bank(
    network: torch.nn.Module, episodes: Sequence[dict], class_names: Sequence[str], device: str | torch.device = "cpu"
) -> dict[str, int]:
    """Update ``network.memory_bank`` with the task embeddings of named-class episodes; no weight changes.

    Training on domain-randomised episodes alone teaches the task but never shows the bank a named class; this
    fills it afterwards, as :class:`common.handlers.MemoryBankUpdater` would have during training, so the
    ``memory`` and ``memory_ensemble`` strategies work with those weights. The network runs in eval mode.

    Args:
        network: an in-context network with ``encode_task`` and ``memory_bank`` (possibly DDP-wrapped).
        episodes: items of :class:`common.data.EpisodeDataset`: ``ref_image`` ``(R, 1, *S)``, ``ref_label``
            ``(R, K, *S)`` (unused channels ``-1``) and ``class_ids`` ``(K,)`` (indices into ``class_names``, -1 for
            unused).
        class_names: the episodes' class vocabulary (``EpisodeDataset.class_names``).
        device: where to encode.

    Returns:
        Updates per class name over this call.
    """
    from common.engines.utils import unwrap

    net = unwrap(network)
    was_training = net.training
    net.eval()
    net.memory_bank.register(list(class_names))
    updates: dict[str, int] = {}
    try:
        for item in episodes:
            ids = torch.as_tensor(item["class_ids"])
            keep = ids >= 0
            if not bool(keep.any()):
                continue
            masks = torch.as_tensor(item["ref_label"]).float().clamp_min(0)
            embeddings = net.encode_task(torch.as_tensor(item["ref_image"]).float()[None].to(device),
                                         masks[None].to(device))[0]
            names = [class_names[i] for i in ids[keep].tolist()]
            net.memory_bank.update(names, embeddings[keep].float())
            for name in names:
                updates[name] = updates.get(name, 0) + 1
    finally:
        net.train(was_training)
    return updates
