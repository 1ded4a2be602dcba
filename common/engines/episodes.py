"""Training-side glue for episodes: how an episode batch feeds ``monai.engines.SupervisedTrainer``."""

from __future__ import annotations

import torch

__all__ = ["prepare_episode_batch"]


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
