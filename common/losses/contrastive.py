"""Image-text contrastive losses: CLIP's symmetric InfoNCE and a multi-level version (volume, region, reasoning step,
and optionally the step against the region's patches)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.loss import _Loss

from common.bundle.args import as_bool

__all__ = ["MultiLevelContrastiveLoss", "SymmetricInfoNCE"]


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that keeps every input in the graph, so distributed and accumulating loops see all parameters."""
    return sum(0.0 * t.sum() for t in tensors)


class SymmetricInfoNCE(_Loss):
    """CLIP loss (Radford et al. 2021, https://arxiv.org/abs/2103.00020) over L2-normalised embeddings.

    With ``logits = norm(image) @ norm(text)^T / tau``: image->text is the cross-entropy of each image row against its
    text, text->image the same over columns, and the loss is their mean. With a ``positives`` matrix a row may have
    several matching columns; its term is ``-log(sum_{j in pos} softmax(row)_j)`` (any match counts), and rows or
    columns without a positive are left out.

    The temperature is ``exp(log_tau)`` with ``log_tau`` a parameter when ``learnable``, clamped in the forward pass
    to ``[log(min_temperature), log(max_temperature)]``: the default floor 0.01 is CLIP's cap of 100 on the logit
    scale (sharper makes training unstable), the ceiling 1 keeps cosine logits from flattening to a uniform softmax.
    At a bound the clamp passes no gradient, so the temperature stays there until the other terms pull it back.

    Args:
        temperature: initial ``tau``, within the bounds. Default 0.07 (CLIP's).
        learnable: learn ``log_tau`` (a parameter; else a buffer). Default True.
        min_temperature: lower bound. Default 0.01.
        max_temperature: upper bound. Default 1.0.

    Shapes:
        ``image`` ``(N, D)``, ``text`` ``(M, D)``; without ``positives`` ``N == M`` and row ``i`` matches column
        ``i``; ``valid`` ``(N,)`` bool drops pairs (rows and columns); ``positives`` ``(N, M)`` bool -> scalar.
        With no pair left the loss is a graph-connected zero.

    Example::

        loss = SymmetricInfoNCE(temperature=1.0, learnable=False)
        loss(torch.eye(2), torch.eye(2))  # log(1 + exp(-1)) = 0.3133
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable: bool = True,
        min_temperature: float = 0.01,
        max_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < min_temperature <= temperature <= max_temperature:
            raise ValueError(
                f"temperature should be in [min_temperature, max_temperature] = [{min_temperature}, "
                f"{max_temperature}] with min_temperature > 0, got {temperature}."
            )
        self.log_bounds = (math.log(min_temperature), math.log(max_temperature))
        log_tau = torch.tensor(math.log(temperature))
        if as_bool(learnable, "learnable"):
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    @property
    def temperature(self) -> torch.Tensor:
        """The clamped temperature used by the forward pass (a 0-d tensor)."""
        return self.log_temperature.clamp(*self.log_bounds).exp()

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        valid: torch.Tensor | None = None,
        positives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
            raise ValueError(
                f"image and text should have shapes (N, D) and (M, D), got {list(image.shape)} and {list(text.shape)}."
            )
        if positives is None:
            if image.shape[0] != text.shape[0]:
                raise ValueError(f"image and text should have as many rows without positives, got {list(image.shape)} "
                                 f"and {list(text.shape)}.")
            if valid is not None:
                if valid.shape != (image.shape[0],):
                    raise ValueError(f"valid should have shape ({image.shape[0]},), got {list(valid.shape)}.")
                image, text = image[valid.bool()], text[valid.bool()]
            positives = torch.eye(image.shape[0], dtype=torch.bool, device=image.device)
        elif valid is not None:
            raise ValueError("valid should be None when positives are given; leave rows out of positives instead.")
        elif positives.shape != (image.shape[0], text.shape[0]):
            raise ValueError(
                f"positives should have shape {[image.shape[0], text.shape[0]]}, got {list(positives.shape)}."
            )
        positives = positives.bool()
        rows, cols = positives.any(1), positives.any(0)
        if not bool(rows.any()):
            return _zero(image, text, self.log_temperature)
        logits = F.normalize(image.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T / self.temperature
        image_to_text = self._multi_positive_ce(logits[rows], positives[rows])
        text_to_image = self._multi_positive_ce(logits.T[cols], positives.T[cols])
        return 0.5 * (image_to_text + text_to_image)

    @staticmethod
    def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """Mean over rows of ``-log(sum_{pos} softmax(row))``; every row holds at least one positive."""
        log_positive = torch.logsumexp(logits.masked_fill(~positives, float("-inf")), dim=-1)
        return (torch.logsumexp(logits, dim=-1) - log_positive).mean()


class MultiLevelContrastiveLoss(_Loss):
    """Weighted sum of three :class:`SymmetricInfoNCE` levels, each with its own learnable temperature.

    Pairing, over one batch (region index ``r - 1`` in the ``R`` axis holds region id ``r``):

    1. ``global``: volume embedding ``b`` <-> impression embedding ``b`` (optionally only where ``global_valid``);
       negatives are the other volumes / impressions of the batch.
    2. ``region``: every ``(b, r)`` with ``region_mentioned[b, r]`` (and ``region_present[b, r]`` when given: the
       region is in the image's mask) pairs the image's region feature ``image_regions[b, r - 1]`` with the
       embedding of the report's sentences about region ``r`` ``region_text[b, r - 1]``. All ``M`` such pairs of the
       batch form one ``M x M`` problem: negatives are every other pair, the same region in other volumes and other
       regions of the same volume alike.
    3. ``step``: reasoning step ``s`` (text ``step_text[s]``, from case ``step_batch[s]``, grounded by
       ``step_region[s]``) pairs with ``image_regions[step_batch[s], step_region[s] - 1]``. Steps with region id 0
       (no region) or with an absent region are left out. Several steps can point at one ``(b, r)``; the distinct
       targets are the image side, so step->region is a plain cross-entropy over targets and region->step counts
       any of the region's steps as a match (``positives`` in :class:`SymmetricInfoNCE`).

    4. ``step_patch`` (``patch_weights[0]``): as ``step``, with the image side ``image_region_local[b, r - 1]``, the
       mean of the region's per-patch (``local``) embeddings, so the patch embeddings themselves learn the step's
       meaning (the region head and the local head are separate projections of the tokens).
    5. ``step_anchor`` (``patch_weights[1]``): each kept step attends over its volume's patches with
       ``softmax_n(cos(step_text[s], image_local[b, n]) / tau)`` (``tau`` the ``step_patch`` temperature), and the loss
       is ``-log`` of the attention that falls on the step's region, each patch counted by the fraction of its voxels
       inside the region (``assignment[b, n, r]``): the step's attention is anchored on the mentioned region.

    A level whose inputs are None, or whose weight is 0, is skipped. :meth:`levels` returns each level's loss and the
    weighted ``total`` (what ``forward`` returns).

    Args:
        weights: ``(global, region, step)`` non-negative weights. Default ``(1.0, 1.0, 1.0)``.
        temperature: initial temperature of each level. Default 0.07.
        learnable: learn the temperatures. Default True.
        patch_weights: ``(step_patch, step_anchor)`` non-negative weights of the patch levels. Default ``(0.0, 0.0)``
            (off); their temperature (``step_patch_loss``) exists only when one of them is on, so the state dict of
            a loss without them is unchanged.

    Shapes:
        ``image_global``, ``text_global`` ``(B, D)``; ``global_valid`` ``(B,)``; ``image_regions``, ``region_text``,
        ``image_region_local`` ``(B, R, D)``; ``region_mentioned``, ``region_present`` ``(B, R)`` bool; ``step_text``
        ``(S, D)``; ``step_batch``, ``step_region`` ``(S,)`` integers; ``image_local`` ``(B, N, D)``; ``assignment``
        ``(B, N, R + 1)`` (column 0 = no region) -> scalar.
    """

    LEVELS = ("global", "region", "step", "step_patch", "step_anchor")

    def __init__(
        self,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        temperature: float = 0.07,
        learnable: bool = True,
        patch_weights: Sequence[float] = (0.0, 0.0),
    ) -> None:
        super().__init__()
        weights = tuple(float(w) for w in weights)
        if len(weights) != 3 or any(not w >= 0 for w in weights):
            raise ValueError(f"weights should be 3 non-negative numbers (global, region, step), got {weights}.")
        patch_weights = tuple(float(w) for w in patch_weights)
        if len(patch_weights) != 2 or any(not w >= 0 for w in patch_weights):
            raise ValueError(
                f"patch_weights should be 2 non-negative numbers (step_patch, step_anchor), got {patch_weights}."
            )
        self.weights = dict(zip(self.LEVELS, weights + patch_weights))
        self.global_loss = SymmetricInfoNCE(temperature, learnable)
        self.region_loss = SymmetricInfoNCE(temperature, learnable)
        self.step_loss = SymmetricInfoNCE(temperature, learnable)
        self.step_patch_loss = SymmetricInfoNCE(temperature, learnable) if any(patch_weights) else None

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.levels(*args, **kwargs)["total"]

    def levels(
        self,
        image_global: torch.Tensor,
        text_global: torch.Tensor,
        image_regions: torch.Tensor | None = None,
        region_text: torch.Tensor | None = None,
        region_mentioned: torch.Tensor | None = None,
        region_present: torch.Tensor | None = None,
        step_text: torch.Tensor | None = None,
        step_batch: torch.Tensor | None = None,
        step_region: torch.Tensor | None = None,
        global_valid: torch.Tensor | None = None,
        image_region_local: torch.Tensor | None = None,
        image_local: torch.Tensor | None = None,
        assignment: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Each computed level's loss and ``total`` = the weighted sum."""
        out = {}
        if self.weights["global"] > 0:
            out["global"] = self.global_loss(image_global, text_global, valid=global_valid)
        if self.weights["region"] > 0 and region_text is not None:
            out["region"] = self._region_level(image_regions, region_text, region_mentioned, region_present)
        if self.weights["step"] > 0 and step_text is not None:
            out["step"] = self._step_level(image_regions, step_text, step_batch, step_region, region_present)
        if self.weights["step_patch"] > 0 and step_text is not None and image_region_local is not None:
            out["step_patch"] = self._step_level(
                image_region_local, step_text, step_batch, step_region, region_present, self.step_patch_loss
            )
        if self.weights["step_anchor"] > 0 and step_text is not None and image_local is not None:
            out["step_anchor"] = self._anchor_level(image_local, assignment, step_text, step_batch, step_region)
        total = sum(self.weights[k] * v for k, v in out.items())
        out["total"] = total if out else _zero(image_global, text_global)
        return out

    @staticmethod
    def _check_regions(image_regions: torch.Tensor | None, region_present: torch.Tensor | None) -> None:
        if image_regions is None or image_regions.dim() != 3:
            raise ValueError(f"image_regions should have shape (B, R, D), got "
                             f"{None if image_regions is None else list(image_regions.shape)}.")
        if region_present is not None and region_present.shape != image_regions.shape[:2]:
            raise ValueError(f"region_present should have shape {list(image_regions.shape[:2])}, "
                             f"got {list(region_present.shape)}.")

    def _region_level(self, image_regions, region_text, region_mentioned, region_present) -> torch.Tensor:
        self._check_regions(image_regions, region_present)
        if region_text.shape != image_regions.shape:
            raise ValueError(
                f"region_text should have shape {list(image_regions.shape)}, got {list(region_text.shape)}."
            )
        if region_mentioned is None or region_mentioned.shape != image_regions.shape[:2]:
            raise ValueError(f"region_mentioned should have shape {list(image_regions.shape[:2])}, got "
                             f"{None if region_mentioned is None else list(region_mentioned.shape)}.")
        valid = region_mentioned.bool()
        if region_present is not None:
            valid = valid & region_present.bool()
        if not bool(valid.any()):
            return _zero(image_regions, region_text, self.region_loss.log_temperature)
        return self.region_loss(image_regions[valid], region_text[valid])

    @staticmethod
    def _check_steps(step_text, step_batch, step_region, b: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = step_text.shape[0]
        if step_text.dim() != 2 or step_batch is None or step_region is None \
                or step_batch.shape != (s,) or step_region.shape != (s,):
            raise ValueError(f"step_text, step_batch and step_region should have shapes (S, D), (S,), (S,), got "
                             f"{list(step_text.shape)}, {None if step_batch is None else list(step_batch.shape)}, "
                             f"{None if step_region is None else list(step_region.shape)}.")
        step_batch, step_region = step_batch.long(), step_region.long()
        if bool(((step_batch < 0) | (step_batch >= b) | (step_region < 0) | (step_region > r)).any()):
            raise ValueError(f"step_batch should be in [0, {b}) and step_region in [0, {r}], got "
                             f"{step_batch.tolist()} and {step_region.tolist()}.")
        return step_batch, step_region

    def _step_level(
        self, image_regions, step_text, step_batch, step_region, region_present, loss: SymmetricInfoNCE | None = None
    ) -> torch.Tensor:
        loss = self.step_loss if loss is None else loss
        self._check_regions(image_regions, region_present)
        b, r = image_regions.shape[:2]
        step_batch, step_region = self._check_steps(step_text, step_batch, step_region, b, r)
        keep = step_region > 0
        if region_present is not None:
            keep &= region_present.bool()[step_batch, (step_region - 1).clamp_min(0)]
        if not bool(keep.any()):
            return _zero(image_regions, step_text, loss.log_temperature)
        key = step_batch[keep] * r + step_region[keep] - 1  # flat (b, r) index of each kept step's target
        targets, owner = torch.unique(key, return_inverse=True)
        positives = owner[None, :] == torch.arange(len(targets), device=key.device)[:, None]  # (K, S_kept)
        return loss(image_regions.flatten(0, 1)[targets], step_text[keep], positives=positives)

    def _anchor_level(self, image_local, assignment, step_text, step_batch, step_region) -> torch.Tensor:
        if image_local is None or image_local.dim() != 3 or assignment is None or assignment.dim() != 3 \
                or assignment.shape[:2] != image_local.shape[:2]:
            raise ValueError(f"image_local and assignment should have shapes (B, N, D) and (B, N, R + 1), got "
                             f"{None if image_local is None else list(image_local.shape)} and "
                             f"{None if assignment is None else list(assignment.shape)}.")
        b, r = image_local.shape[0], assignment.shape[2] - 1
        step_batch, step_region = self._check_steps(step_text, step_batch, step_region, b, r)
        inside = assignment.float()[step_batch, :, step_region]  # (S, N): fraction of each patch in the region
        keep = (step_region > 0) & (inside.sum(1) > 0)
        tau = self.step_patch_loss.temperature
        if not bool(keep.any()):
            return _zero(image_local, step_text, tau)
        text = F.normalize(step_text[keep].float(), dim=-1)
        local = F.normalize(image_local.float(), dim=-1)[step_batch[keep]]  # (S_kept, N, D)
        attention = torch.softmax(torch.einsum("sd,snd->sn", text, local) / tau, dim=-1)
        on_region = (attention * inside[keep]).sum(1)
        # the floor only guards log(0) at initialisation; any trained attention puts far more on the region
        return -torch.log(on_region.clamp_min(1e-6)).mean()
