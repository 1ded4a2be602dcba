"""Training and inference steps of concept-based models (CSR): stage-wise training, explanation inference."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.utils import CommonKeys as Keys
from torch import nn

from common.engines.steps import StepTrainer, optimisation_step
from common.engines.utils import unwrap

__all__ = [
    "ExplainingModel",
    "ExplanationInferer",
    "ConceptStageTrainer",
    "PrepareBatchLabelKey",
    "concept_similarity",
    "csr_network",
]


def csr_network(network: nn.Module) -> nn.Module:
    """The concept network inside any DDP / :class:`ExplainingModel` wrappers."""
    network = unwrap(network)
    return getattr(network, "network", network)


def concept_similarity(scores: torch.Tensor, num_concepts: int) -> torch.Tensor:
    """Best prototype similarity per concept: ``(B, K * M) -> (B, K)``."""
    return scores.view(scores.shape[0], num_concepts, -1).amax(-1)


class ExplainingModel(nn.Module):
    """``forward`` = ``network.explain``: the training entry point, so DistributedDataParallel sees every output a
    stage's loss uses (calling ``explain`` on the wrapped module would bypass DDP's gradient synchronisation)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor, roi_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.network.explain(image, roi_mask)


class ExplanationInferer(Inferer):
    """Inferer returning one output of ``network.explain`` (or all of them when ``output`` is None).

    ``output="concept_similarity"`` gives each concept's best prototype similarity ``(B, K)``, the stage-2 score.
    Extra keyword arguments (e.g. ``roi_mask``) are passed to ``explain``.
    """

    def __init__(self, output: str | None = "logits") -> None:
        super().__init__()
        self.output = output

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs):
        net = csr_network(network)
        out = net.explain(inputs, *args, **kwargs)
        if self.output is None:
            return out
        if self.output == "concept_similarity":
            return concept_similarity(out["similarity_scores"], net.num_concepts)
        return out[self.output]


class PrepareBatchLabelKey:
    """``prepare_batch`` taking the target from ``label_key`` (e.g. ``"concepts"``), and an ROI when present."""

    def __init__(self, label_key: str = "label", roi_key: str = "roi") -> None:
        self.label_key = label_key
        self.roi_key = roi_key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image = batchdata[Keys.IMAGE].to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata.get(self.label_key)
        if isinstance(label, torch.Tensor):
            label = label.to(device=device, non_blocking=non_blocking, **kwargs).float()
        roi = batchdata.get(self.roi_key)
        extra = {"roi_mask": roi.to(device=device, non_blocking=non_blocking)} if isinstance(roi, torch.Tensor) else {}
        return image, label, (), extra


class ConceptStageTrainer(StepTrainer):
    """``SupervisedTrainer`` for one of CSR's three training stages.

    The network must be an :class:`ExplainingModel` (possibly in DDP) around a ``CSRNet`` frozen for ``stage``.
    Losses:
        1. ``concept_loss(concept_logits, concepts)`` (e.g. ``BCEWithLogitsLoss``);
        2. ``prototype_loss(local_concept_vectors, prototypes, concepts)``
           (``PrototypeContrastiveLoss``), only over concepts present in each image;
        3. ``task_loss(logits, targets)`` (e.g. ``BCEWithLogitsLoss``).

    Args:
        stage: 1, 2 or 3.
        concept_key: batch key of the ``(B, K)`` concept labels. Default ``"concepts"``.
        task_key: batch key of the ``(B, C)`` task labels. Default ``"diseases"``.
        concept_loss, prototype_loss, task_loss: the loss of each stage; the one of ``stage`` is required.
        Others as ``monai.engines.SupervisedTrainer`` (AMP on CUDA only, see :class:`StepTrainer`).
    """

    def __init__(
        self,
        *args,
        stage: int,
        concept_loss: Callable | None = None,
        prototype_loss: Callable | None = None,
        task_loss: Callable | None = None,
        concept_key: str = "concepts",
        task_key: str = "diseases",
        **kwargs,
    ) -> None:
        losses = {1: concept_loss, 2: prototype_loss, 3: task_loss}
        if stage not in losses:
            raise ValueError(f"stage should be 1, 2 or 3, got {stage}.")
        if losses[stage] is None:
            raise ValueError(f"stage {stage} needs its loss ({['concept', 'prototype', 'task'][stage - 1]}_loss).")
        super().__init__(*args, loss_function=losses[stage], **kwargs)
        self.stage = stage
        self.concept_key = concept_key
        self.task_key = task_key

    def _stage_loss(self, out: dict[str, torch.Tensor], concepts: torch.Tensor, targets: torch.Tensor):
        if self.stage == 1:
            return self.loss_function(out["concept_logits"], concepts)
        if self.stage == 2:
            net = csr_network(self.network)
            vectors = net.concept_vectors(out)
            return self.loss_function(vectors, net.prototypes, concepts)
        return self.loss_function(out["logits"], targets)

    def _iteration(self, engine: ConceptStageTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        move = {"device": engine.state.device, "non_blocking": engine.non_blocking}
        image = batchdata[Keys.IMAGE].to(**move)
        concepts = batchdata[self.concept_key].to(**move).float()
        targets = batchdata[self.task_key].to(**move).float() if self.task_key in batchdata else concepts
        engine.state.output = {Keys.IMAGE: image, Keys.LABEL: targets if self.stage == 3 else concepts}

        def _compute() -> None:
            out = engine.inferer(image, engine.network)  # SimpleInferer, or AutocastInferer for bf16 on CPU
            engine.state.output[Keys.PRED] = out["logits"] if self.stage == 3 else out["concept_logits"]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output[Keys.LOSS] = self._stage_loss(out, concepts, targets).mean()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        optimisation_step(engine, _compute)
        return engine.state.output
