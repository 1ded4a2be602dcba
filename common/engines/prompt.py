"""What an in-context model should segment, and the five ways to turn that into task embeddings."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from monai.losses import DiceCELoss
from monai.utils import look_up_option
from tqdm import tqdm

from common.data.datalist import ReferenceSet, load_references
from common.data.robust import root_cause
from common.engines.utils import unwrap

__all__ = ["InContextPrompt", "STRATEGIES"]

STRATEGIES = ("one_shot", "ensemble", "memory", "tuning", "memory_ensemble")
logger = logging.getLogger(__name__)


class InContextPrompt:
    """Classes to segment and how their task embeddings ``(1, K, T, C)`` are obtained.

    Strategies:
        - ``one_shot``: one reference per class, the first one that shows it.
        - ``ensemble``: the embeddings of all references, averaged.
        - ``memory``: the trained class memory bank, by class name; no reference image is read (a references file,
          when given, only supplies class names and label values).
        - ``tuning``: start from the ensemble and optimise only the embeddings for ``tuning_steps`` steps of
          Dice + BCE on the references themselves, network frozen.
        - ``memory_ensemble``: the ensemble of the given references, and for each class the memory bank knows, the
          weighted mean ``memory_weight * bank + (1 - memory_weight) * ensemble`` (the trained class prototype
          steadied by, or adapted to, the user's own references); classes the bank has not seen keep the ensemble.

    Args:
        strategy: one of :data:`STRATEGIES`.
        references: a references JSON path (see ``load_references``) or a :class:`ReferenceSet`; None for memory.
        classes: class names to segment; all classes of the references (or of the memory bank) when None.
        preprocessing: transform of ``{"image", "label"}`` dicts to the network grid (the query preprocessing,
            with ``allow_missing_keys``); required for reference strategies.
        tuning_steps: optimisation steps of ``tuning``. Default 20.
        tuning_lr: Adam learning rate of ``tuning``. Default 0.01.
        skip_unknown_classes: with ``memory``, leave out (with a warning) requested classes the bank has never seen
            instead of raising; evaluation sweeps use it so the other classes are still scored.
        memory_weight: weight of the memory-bank embedding in ``memory_ensemble``, in [0, 1]. Default 0.5.
    """

    def __init__(
        self,
        strategy: str = "ensemble",
        references: str | os.PathLike | ReferenceSet | None = None,
        classes: Sequence[str] | str | None = None,
        preprocessing: Callable | None = None,
        tuning_steps: int = 20,
        tuning_lr: float = 1e-2,
        skip_unknown_classes: bool = False,
        memory_weight: float = 0.5,
    ) -> None:
        self.strategy = strategy
        self.references = references
        self.classes_requested = [classes] if isinstance(classes, str) else classes
        self.preprocessing = preprocessing
        if tuning_steps < 0 or tuning_lr <= 0:
            raise ValueError(f"tuning_steps should be >= 0 and tuning_lr > 0, got {tuning_steps}, {tuning_lr}.")
        self.tuning_steps = tuning_steps
        self.tuning_lr = tuning_lr
        self.skip_unknown_classes = skip_unknown_classes
        if not 0.0 <= float(memory_weight) <= 1.0:
            raise ValueError(f"memory_weight should be in [0, 1], got {memory_weight}.")
        self.memory_weight = float(memory_weight)
        self.classes: dict[str, int] = {}
        self.tuning_losses: list[float] = []

    @property
    def strategy(self) -> str:
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        self._strategy = look_up_option(value, STRATEGIES)

    def reference_set(self) -> ReferenceSet:
        if self.references is None:
            raise ValueError(f"strategy '{self.strategy}' needs references: set a references file.")
        refs = self.references if isinstance(self.references, ReferenceSet) else load_references(self.references)
        return refs.select(self.classes_requested)

    @torch.no_grad()
    def load_references(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed references ``(1, R, 1, *S)`` and binary masks ``(1, R, K, *S)`` of the selected classes.

        For ``one_shot`` each class keeps only the first reference that shows it (references no class keeps are
        dropped). A class may be missing from some references of an ensemble: those are left out of that class's
        average. Raises ``ValueError`` naming the file when a reference cannot be read or its label map is empty,
        and naming the label files when a requested class has no voxel in any reference (before or after
        resampling to the network grid).
        """
        if self.preprocessing is None:
            raise ValueError("preprocessing should be set to load references.")
        refs = self.reference_set()
        images, masks = [], []
        for item in refs.items:
            try:
                data = self.preprocessing(dict(item))
            except Exception as e:  # report the reference, not the transform chain
                source = f"reference {item['image']} / {item['label']}"
                raise ValueError(f"{source}: cannot be loaded: {root_cause(e)}") from e
            label = torch.as_tensor(data["label"])[0]
            if not bool((label > 0).any()):
                raise ValueError(f"reference label {item['label']}: the mask is empty (no labelled voxel).")
            images.append(torch.as_tensor(data["image"]).float())
            masks.append(torch.stack([label == v for v in refs.classes.values()]).float())
        image_t, mask_t = torch.stack(images), torch.stack(masks)  # (R, 1, *S), (R, K, *S)
        present = mask_t.flatten(2).amax(-1) > 0  # (R, K)
        for k, (name, value) in enumerate(refs.classes.items()):
            if not bool(present[:, k].any()):
                files = ", ".join(item["label"] for item in refs.items)
                raise ValueError(
                    f"reference label {files}: label value {value} ('{name}') is absent "
                    "(or vanishes when resampled to the network grid)."
                )
        if self.strategy == "one_shot":
            keep = torch.zeros_like(present)
            keep[present.int().argmax(0), torch.arange(present.shape[1])] = True
            used = keep.any(1)
            image_t, mask_t = image_t[used], (mask_t * keep[(...,) + (None,) * (mask_t.dim() - 2)])[used]
        self.classes = dict(refs.classes)
        return image_t[None].to(device), mask_t[None].to(device)

    def encode(self, network: torch.nn.Module, device: torch.device | str | None = None) -> torch.Tensor:
        """Task embeddings ``(1, K, T, C)`` for this prompt; sets :attr:`classes` (name -> output label value)."""
        net = unwrap(network)
        device = torch.device(device) if device is not None else next(net.parameters()).device
        if self.strategy == "memory":
            bank = net.memory_bank
            if not bank.known_classes:
                raise ValueError("the network's memory bank is empty: load trained weights or use references.")
            # with references at hand, keep their label values so every strategy writes the same label map
            if self.references is not None:
                self.classes = dict(self.reference_set().classes)
            else:
                self.classes = {n: i + 1 for i, n in enumerate(self.classes_requested or bank.known_classes)}
            unknown = [n for n in self.classes if n not in bank.known_classes]
            if unknown and self.skip_unknown_classes:
                logger.warning("memory bank has no entry for %s; these classes are left out", unknown)
                self.classes = {n: v for n, v in self.classes.items() if n not in unknown}
            return bank.retrieve(list(self.classes))[None].to(device)
        images, masks = self.load_references(device)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                embeddings = net.encode_task(images, masks)
            if self.strategy == "tuning" and self.tuning_steps > 0:
                embeddings = self._tune(net, embeddings, images[0], masks[0])
            if self.strategy == "memory_ensemble":
                embeddings = self._blend_memory(net, embeddings)
        finally:
            net.train(was_training)
        return embeddings

    def _blend_memory(self, net: torch.nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
        """Blend the reference ensemble ``(1, K, T, C)`` with the memory bank for the classes it knows."""
        bank = getattr(net, "memory_bank", None)
        known = set(bank.known_classes) if bank is not None else set()
        names = list(self.classes)
        blended = embeddings.clone()
        for k, name in enumerate(names):
            if name in known:
                stored = bank.retrieve([name])[0].to(embeddings)
                blended[0, k] = self.memory_weight * stored + (1.0 - self.memory_weight) * embeddings[0, k]
        unknown = [n for n in names if n not in known]
        if unknown:
            logger.info("memory_ensemble: the memory bank has no entry for %s; their references alone are used",
                        unknown)
        return blended

    def _tune(
        self, net: torch.nn.Module, init: torch.Tensor, images: torch.Tensor, masks: torch.Tensor
    ) -> torch.Tensor:
        """Optimise only the task embeddings on the labelled references; every network weight stays frozen."""
        grad_state = [p.requires_grad for p in net.parameters()]
        for p in net.parameters():
            p.requires_grad_(False)
        embeddings = init.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([embeddings], lr=self.tuning_lr)
        loss_fn = DiceCELoss(sigmoid=True)
        target = masks.flatten(0, 1).unsqueeze(1)  # (R*K, 1, *S)
        self.tuning_losses = []
        try:
            with torch.enable_grad():
                for _ in tqdm(range(self.tuning_steps), desc="in-context tuning", leave=False, disable=None):
                    optimizer.zero_grad()
                    logits = net.segment(images, embeddings.expand(images.shape[0], -1, -1, -1))
                    loss = loss_fn(logits.flatten(0, 1).unsqueeze(1), target)
                    loss.backward()
                    optimizer.step()
                    self.tuning_losses.append(loss.item())
        finally:
            for p, g in zip(net.parameters(), grad_state):
                p.requires_grad_(g)
        logger.info("in-context tuning: loss %.4f -> %.4f", self.tuning_losses[0], self.tuning_losses[-1])
        return embeddings.detach()
