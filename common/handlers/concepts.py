"""Handlers of concept-based models: prototype initialisation and doctor interventions."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from ignite.engine import Engine, Events

from common.engines.concepts import csr_network

__all__ = ["PrototypeKMeansInit", "ConceptIntervention"]

logger = logging.getLogger(__name__)


class PrototypeKMeansInit:
    """Before stage-2 training, place each concept's prototypes at k-means centres of its local concept vectors.

    Runs once when the trainer starts (after any checkpoint loader listed before it has loaded the stage-1
    weights): the frozen backbone and concept head give CAMs and the projector's features for every training image,
    the spatial-softmax local vectors of each concept present in an image are collected, and
    ``CSRNet.init_prototypes_kmeans`` clusters them.

    Args:
        data_loader: the training images with their ``concept_key`` labels.
        concept_key: batch key of the ``(B, K)`` concept labels. Default ``"concepts"``.
        seed: k-means seed. Default 0.
    """

    def __init__(self, data_loader: Iterable, concept_key: str = "concepts", seed: int = 0) -> None:
        self.data_loader = data_loader
        self.concept_key = concept_key
        self.seed = seed

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch > 0:  # a resumed run keeps its trained prototypes
            return
        net = csr_network(engine.network)
        was_training = net.training
        net.eval()
        vectors, present = [], []
        for batch in self.data_loader:
            out = net.explain(batch["image"].to(engine.state.device))
            vectors.append(net.concept_vectors(out).cpu())
            present.append(torch.as_tensor(batch[self.concept_key]).float().cpu())
        net.train(was_training)
        net.init_prototypes_kmeans(torch.cat(vectors), torch.cat(present), seed=self.seed)
        logger.info("prototypes initialised by k-means over %d images", sum(len(v) for v in vectors))


class ConceptIntervention:
    """Apply a doctor's concept intervention when the run starts (after the weights are loaded).

    Args:
        concept_names: the model's concepts in order.
        off: concept names switched off (their prototypes contribute nothing).
        on: concept names switched on (their prototypes count as a perfect match).
    """

    def __init__(self, concept_names: Sequence[str], off: Sequence[str] = (), on: Sequence[str] = ()) -> None:
        unknown = [c for c in [*off, *on] if c not in concept_names]
        if unknown:
            raise ValueError(f"unknown concepts {unknown}; the model's concepts are {list(concept_names)}.")
        both = set(off) & set(on)
        if both:
            raise ValueError(f"concepts {sorted(both)} cannot be switched both off and on.")
        self.off = [list(concept_names).index(c) for c in off]
        self.on = [list(concept_names).index(c) for c in on]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        net = csr_network(engine.network)
        net.clear_intervention()
        if self.off or self.on:
            net.set_concept_intervention(off=self.off, on=self.on)
            logger.info("concept intervention: off %s, on %s", self.off, self.on)
