"""CSR's contrastive loss pulling local concept vectors towards their concept's prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch.nn.modules.loss import _Loss

__all__ = ["FORMS", "PrototypeContrastiveLoss"]

FORMS = ("multi_positive", "per_prototype")


class PrototypeContrastiveLoss(_Loss):
    """Multi-positive InfoNCE pulling each local concept vector towards its own concept's prototypes.

    Stage-2 loss of CSR (Huy et al., "Interactive Medical Image Analysis with Concept-based Similarity Reasoning",
    CVPR 2025). For every image ``b`` and concept ``k`` present in it, with L2-normalised ``v = v[b, k]`` and
    prototypes ``p_j``, ``logit_j = v . p_j / tau`` over all ``K * M`` prototypes and

        ``loss[b, k] = -log( sum_{j in pos(k)} exp(logit_j) / sum_j exp(logit_j) )``

    where ``pos(k)`` are the ``M`` prototypes of concept ``k`` (rows ``k * M .. k * M + M - 1``). ``form=
    "per_prototype"`` is the form of the CSR design instead: one InfoNCE term per positive prototype against the
    other concepts' prototypes only, averaged over the ``M`` positives,

        ``loss[b, k] = mean_{j in pos(k)} -log( exp(logit_j) / (exp(logit_j) + sum_{i not in pos(k)} exp(logit_i)) )``

    which asks every prototype of the concept to match the vector, where the multi-positive form is satisfied by
    one of them. Pairs whose concept
    is absent are left out; with no present pair in the batch the loss is ``0 * (v.sum() + P.sum())``, a zero that
    keeps the graph so distributed and accumulating training loops still see every parameter.

    Args:
        temperature: ``tau > 0``. Default 0.1.
        reduction: ``"mean"`` over present pairs (default), ``"sum"``, or ``"none"`` for the ``(B, K)`` matrix with
            zeros at absent pairs.
        form: ``"multi_positive"`` (default) or ``"per_prototype"`` (see above).

    Shapes:
        ``vectors`` ``(B, K, D)``, ``prototypes`` ``(K * M, D)``, ``concept_present`` ``(B, K)`` in {0, 1}
        -> scalar, or ``(B, K)`` for ``reduction="none"``.

    Example::

        loss = PrototypeContrastiveLoss(temperature=0.1)
        v = torch.tensor([[[1.0, 0.0]]])  # B=1, K=1, D=2
        loss(v, torch.tensor([[1.0, 0.0]]), torch.ones(1, 1))  # 0: the only prototype is a positive
    """

    def __init__(self, temperature: float = 0.1, reduction: str = "mean", form: str = "multi_positive") -> None:
        super().__init__(reduction=look_up_option(reduction, ("mean", "sum", "none")))
        if not temperature > 0:
            raise ValueError(f"temperature should be positive, got {temperature}.")
        self.temperature = float(temperature)
        self.form = look_up_option(form, FORMS)

    def forward(
        self, vectors: torch.Tensor, prototypes: torch.Tensor, concept_present: torch.Tensor
    ) -> torch.Tensor:
        if vectors.dim() != 3:
            raise ValueError(f"vectors should have shape (B, K, D), got {list(vectors.shape)}.")
        b, k, d = vectors.shape
        if prototypes.dim() != 2 or prototypes.shape[1] != d or prototypes.shape[0] % k != 0:
            raise ValueError(f"prototypes should have shape (K * M, {d}) with K={k}, got {list(prototypes.shape)}.")
        if concept_present.shape != (b, k):
            raise ValueError(f"concept_present should have shape {[b, k]}, got {list(concept_present.shape)}.")
        m = prototypes.shape[0] // k
        logits = torch.einsum("bkd,pd->bkp", F.normalize(vectors, dim=-1), F.normalize(prototypes, dim=-1))
        logits = logits / self.temperature
        owner = torch.arange(k * m, device=vectors.device) // m  # concept of each prototype
        positive = owner[None, :] == torch.arange(k, device=vectors.device)[:, None]  # (K, K*M)
        if self.form == "multi_positive":
            log_positive = torch.logsumexp(logits.masked_fill(~positive, float("-inf")), dim=-1)
            pair_loss = torch.logsumexp(logits, dim=-1) - log_positive  # (B, K)
        else:  # one term per positive prototype, against the other concepts' prototypes only
            log_negative = torch.logsumexp(logits.masked_fill(positive, float("-inf")), dim=-1, keepdim=True)
            per_positive = torch.logaddexp(logits, log_negative) - logits  # (B, K, K*M)
            pair_loss = (per_positive * positive).sum(-1) / m
        present = concept_present > 0.5
        pair_loss = torch.where(present, pair_loss, torch.zeros_like(pair_loss))
        if self.reduction == "none":
            return pair_loss
        if not bool(present.any()):
            return 0.0 * (vectors.sum() + prototypes.sum())
        total = pair_loss.sum()
        return total / present.sum() if self.reduction == "mean" else total
