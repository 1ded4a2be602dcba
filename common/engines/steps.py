"""The base and the optimisation step shared by the collection's custom MONAI trainers."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

__all__ = ["StepTrainer", "optimisation_step"]


def optimisation_step(engine: SupervisedTrainer, compute: Callable[[], None]) -> None:
    """Run ``compute`` (forward pass and loss into ``engine.state.output[Keys.LOSS]``), backward and step.

    Mirrors ``SupervisedTrainer._iteration``: autocast and gradient scaling when the engine has AMP on, the same
    iteration events (``compute`` fires ``FORWARD_COMPLETED`` and ``LOSS_COMPLETED`` itself), so MONAI handlers
    such as gradient clipping work unchanged with trainers whose forward pass is not ``network(image)``.
    """
    engine.network.train()
    engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
    if engine.amp and engine.scaler is not None:
        with torch.autocast("cuda", **engine.amp_kwargs):
            compute()
        engine.scaler.scale(engine.state.output[Keys.LOSS]).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        compute()
        engine.state.output[Keys.LOSS].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
    engine.fire_event(IterationEvents.MODEL_COMPLETED)


class StepTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` for trainers whose ``_iteration`` runs :func:`optimisation_step`; AMP (autocast and
    gradient scaling) is used on CUDA only, whatever ``amp`` says, so one config serves both devices.

    Args: as ``monai.engines.SupervisedTrainer``.
    """

    def __init__(self, device: torch.device | str, *args, amp: bool = False, **kwargs) -> None:
        super().__init__(device, *args, amp=bool(amp) and torch.device(device).type == "cuda", **kwargs)
