"""CSR: concept-based similarity reasoning for interpretable chest X-ray classification.

Huy et al., "Interactive Medical Image Analysis with Concept-based Similarity Reasoning", CVPR 2025.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.utils import look_up_option
from torch import nn

from common.networks.backbones import build_backbone, load_backbone_weights

__all__ = ["CAM_POOLS", "ROI_MODES", "CSRNet", "csr_densenet121", "csr_resnet50", "csr_tiny", "csr_vit_b16"]

CAM_POOLS = ("lse", "max", "avg")
CONCEPT_POOLINGS = ("after_projector", "before_projector")
ROI_MODES = ("restrict", "weight")
# trainable parts of each training stage; 0 trains everything (joint fine-tuning)
_PARTS = ("backbone", "concept_head", "projector", "prototypes", "task_head")
_STAGE_PARTS = {
    0: _PARTS,
    1: ("backbone", "concept_head"),
    2: ("projector", "prototypes"),
    3: ("task_head",),
}


def _kmeans(x: torch.Tensor, m: int, num_iters: int, generator: torch.Generator) -> torch.Tensor:
    """``m`` centres of the rows of ``x`` ``(N, D)``: k-means++ seeding, then ``num_iters`` Lloyd steps.

    A cluster that loses all its points keeps its previous centre.
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    for _ in range(1, m):
        dist = torch.cdist(x, torch.stack(centres)).amin(1).pow(2).cpu()
        if float(dist.sum()) > 0:
            idx = int(torch.multinomial(dist, 1, generator=generator))
        else:  # every point coincides with a centre: any point will do
            idx = int(torch.randint(n, (1,), generator=generator))
        centres.append(x[idx])
    c = torch.stack(centres)
    for _ in range(num_iters):
        assign = torch.cdist(x, c).argmin(1)
        counts = torch.bincount(assign, minlength=m).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None], c)
    return c


class CSRNet(nn.Module):
    """Concept-based similarity reasoning (CSR) network: concept CAMs, concept prototypes and a linear task head.

    A backbone maps the image to features ``(B, F, h, w)``. The concept head (1x1 conv) gives one class activation
    map per concept, pooled to concept logits. A projector (1x1 conv, ReLU, 1x1 conv) maps the features to
    ``(B, D, h, w)``; every location is compared with ``K * M`` learned prototypes (``M`` per concept; rows
    ``k * M .. k * M + M - 1`` belong to concept ``k``) by cosine similarity. The best match of each prototype over
    the image (or over a doctor's region of interest) is its similarity score, and a linear layer on the ``K * M``
    scores gives the class logits, so every logit is a sum of "this region looks like that prototype" terms.

    Training runs in three stages (``training_stage`` / :meth:`freeze_stage`):
        1. backbone + concept head on concept labels, loss on ``concept_logits``;
        2. projector + prototypes with :class:`common.losses.prototype_contrastive.PrototypeContrastiveLoss` on
           :meth:`local_concept_vectors` (prototypes first set by :meth:`init_prototypes_kmeans`);
        3. the task head on class labels, loss on ``logits``.

    CAM pooling: ``"lse"`` (default) is log-sum-exp pooling ``(1 / r) * log(mean_p exp(r * cam(p)))``, between
    average (``r -> 0``) and max (``r -> inf``) pooling; ``"max"`` and ``"avg"`` are the limits.

    Interaction ("doctor steering"):
        - ROI: ``roi_mask`` ``(B or 1, 1, H', W')`` in ``[0, 1]`` at any size, usually the image's ``(H, W)`` or the
          feature grid's ``(h, w)``, is resized to ``(h, w)`` with area interpolation (adaptive average pooling:
          each feature cell gets the fraction of its footprint covered by the ROI). ``roi_mode="restrict"`` takes
          the max over cells with a non-zero fraction only (any overlap counts, so a small ROI on a coarse grid
          stays non-empty); ``"weight"`` multiplies the similarity maps by the fractions before the max. An ROI
          that is zero everywhere for a sample raises ``ValueError``.
        - Concept intervention: :meth:`set_concept_intervention` switches concepts off (their prototype scores
          become 0, removing their contribution to the logits) or on (scores 1, a perfect match). The state is the
          persistent buffer ``concept_intervention`` (``(K,)``, -1 off, 0 free, 1 on): it is saved with the
          weights and applied in training and inference alike; :meth:`clear_intervention` resets it.
        - Concept dropout (``concept_dropout`` > 0, training only): each concept of each image is switched off at
          random, as an intervention would, so a head trained in stage 3 does not lean on one concept where others
          carry the same evidence, and switching a concept off at inference costs only that concept's own share.

    TorchScript: ``forward``, :meth:`explain`, :meth:`pool_cams`, :meth:`similarity_maps` and
    :meth:`local_concept_vectors` script (``torch.jit.script(net)``). ``roi_mode`` is fixed at scripting time; the
    intervention stays a buffer of the scripted module, editable in place (``scripted.concept_intervention[k] = -1``).
    The ``set_*``, freezing and k-means methods are Python-only tools.

    Shapes:
        - ``image``: ``(B, in_channels, H, W)``; see :func:`common.networks.backbones.build_backbone` for ``(h, w)``
          (stride 32 for densenet121/resnet, 224 x 224 only for vit_b_16, stride 8 for tiny).
        - ``forward`` output: ``logits`` ``(B, C)``.
        - :meth:`explain` output: ``logits`` ``(B, C)``, ``similarity_scores`` ``(B, K * M)``, ``similarity_maps``
          ``(B, K * M, h, w)``, ``cams`` ``(B, K, h, w)``, ``features`` ``(B, F, h, w)``, ``projected_features``
          ``(B, D, h, w)``, ``concept_logits`` ``(B, K)``.

    Args:
        backbone: a name of :func:`~common.networks.backbones.build_backbone` or a module mapping
            ``(B, in_channels, H, W) -> (B, backbone_channels, h, w)``. Default ``"densenet121"``.
        in_channels: image channels. Default 1.
        num_concepts: concepts ``K``. Default 22.
        prototypes_per_concept: prototypes per concept ``M``. Default 5.
        proj_dim: prototype dimension ``D``. Default 128.
        num_classes: task classes ``C``. Default 6.
        proj_hidden: hidden channels of the projector. Default 256.
        backbone_channels: ``F``; required when ``backbone`` is a module, checked against the name otherwise.
        weights_path: local backbone checkpoint (see :func:`~common.networks.backbones.load_backbone_weights`).
            Default None.
        cam_pool: ``"lse"``, ``"max"`` or ``"avg"``. Default ``"lse"``.
        lse_r: sharpness ``r`` of LSE pooling. Default 10.
        roi_mode: ``"restrict"`` or ``"weight"``; see :meth:`set_roi_mode`. Default ``"restrict"``.
        attention_temperature: temperature of the spatial softmax in :meth:`local_concept_vectors`. Default 1.
        training_stage: 0 (everything trainable) or 1, 2, 3; see :meth:`freeze_stage`. Default 0.

    Example::

        net = csr_tiny(num_concepts=3, prototypes_per_concept=2, num_classes=4)
        net(torch.rand(2, 1, 64, 64)).shape  # (2, 4)
        net.explain(torch.rand(2, 1, 64, 64))["similarity_maps"].shape  # (2, 6, 8, 8)
    """

    # training bookkeeping; a TorchScript export only needs the weights and the intervention buffer
    __jit_ignored_attributes__ = ["_frozen_parts"]

    def __init__(
        self,
        backbone: str | nn.Module = "densenet121",
        in_channels: int = 1,
        num_concepts: int = 22,
        prototypes_per_concept: int = 5,
        proj_dim: int = 128,
        num_classes: int = 6,
        proj_hidden: int = 256,
        backbone_channels: int | None = None,
        weights_path: str | Path | None = None,
        cam_pool: str = "lse",
        lse_r: float = 10.0,
        roi_mode: str = "restrict",
        attention_temperature: float = 1.0,
        training_stage: int = 0,
        concept_dropout: float = 0.0,
        concept_pooling: str = "after_projector",
    ) -> None:
        super().__init__()
        for name, value in [
            ("in_channels", in_channels),
            ("num_concepts", num_concepts),
            ("prototypes_per_concept", prototypes_per_concept),
            ("proj_dim", proj_dim),
            ("num_classes", num_classes),
            ("proj_hidden", proj_hidden),
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} should be a positive integer, got {value}.")
        if lse_r <= 0:
            raise ValueError(f"lse_r should be positive, got {lse_r}.")
        if attention_temperature <= 0:
            raise ValueError(f"attention_temperature should be positive, got {attention_temperature}.")
        if isinstance(concept_dropout, bool) or not 0.0 <= float(concept_dropout) < 1.0:
            raise ValueError(f"concept_dropout should be in [0, 1), got {concept_dropout}.")
        self.concept_dropout = float(concept_dropout)
        self.concept_pooling: str = look_up_option(concept_pooling, CONCEPT_POOLINGS)
        self.backbone, feature_channels = self._make_backbone(backbone, in_channels, backbone_channels, weights_path)
        self.in_channels = in_channels
        self.num_concepts = num_concepts
        self.prototypes_per_concept = prototypes_per_concept
        self.num_classes = num_classes
        self.feature_channels = feature_channels
        self.cam_pool: str = look_up_option(cam_pool, CAM_POOLS)
        self.lse_r = float(lse_r)
        self.attention_temperature = float(attention_temperature)
        self.roi_mode: str = look_up_option(roi_mode, ROI_MODES)

        self.concept_head = nn.Conv2d(feature_channels, num_concepts, kernel_size=1)
        self.projector = nn.Sequential(
            nn.Conv2d(feature_channels, proj_hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(proj_hidden, proj_dim, kernel_size=1),
        )
        self.prototypes = nn.Parameter(torch.randn(num_concepts * prototypes_per_concept, proj_dim))
        self.task_head = nn.Linear(num_concepts * prototypes_per_concept, num_classes)
        self.register_buffer("concept_intervention", torch.zeros(num_concepts, dtype=torch.long))
        self._frozen_parts = []
        self.training_stage = 0
        self.freeze_stage(training_stage)

    @staticmethod
    def _make_backbone(
        backbone: str | nn.Module, in_channels: int, channels: int | None, weights_path: str | Path | None
    ) -> tuple[nn.Module, int]:
        if isinstance(backbone, str):
            module, out = build_backbone(backbone, in_channels, spatial_dims=2, weights_path=weights_path)
            if channels is not None and channels != out:
                raise ValueError(f"backbone_channels should be {out} for {backbone}, got {channels}.")
            return module, out
        if not isinstance(backbone, nn.Module):
            raise ValueError(f"backbone should be a backbone name or an nn.Module, got {type(backbone).__name__}.")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"backbone_channels should be a positive integer for a module backbone, got {channels}.")
        if weights_path is not None:
            load_backbone_weights(backbone, weights_path)
        return backbone, channels

    # ----------------------------------------------------------------------------------------------- inference

    def forward(self, image: torch.Tensor, roi_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, in_channels, H, W)`` image, optional ``(B or 1, 1, H', W')`` ROI -> logits ``(B, C)``."""
        return self.explain(image, roi_mask)["logits"]

    @torch.jit.export
    def explain(self, image: torch.Tensor, roi_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every intermediate of the forward pass; shapes in the class docstring."""
        if image.dim() != 4 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"image should have shape (B, {self.in_channels}, H, W), got {list(image.shape)}."
            )
        features = self.backbone(image)
        cams = self.concept_head(features)
        projected = self.projector(features)
        maps = self.similarity_maps(projected)
        scores = self._apply_intervention(self._max_similarity(maps, roi_mask))
        if self.training and self.concept_dropout > 0.0:
            scores = self._drop_concepts(scores)
        return {
            "logits": self.task_head(scores),
            "similarity_scores": scores,
            "similarity_maps": maps,
            "cams": cams,
            "features": features,
            "projected_features": projected,
            "concept_logits": self.pool_cams(cams),
        }

    @torch.jit.export
    def pool_cams(self, cams: torch.Tensor) -> torch.Tensor:
        """Concept logits ``(B, K)`` from CAMs ``(B, K, h, w)`` by ``cam_pool``."""
        flat = cams.flatten(2)
        if self.cam_pool == "max":
            return flat.amax(-1)
        if self.cam_pool == "avg":
            return flat.mean(-1)
        return (torch.logsumexp(self.lse_r * flat, dim=-1) - math.log(float(flat.shape[-1]))) / self.lse_r

    @torch.jit.export
    def similarity_maps(self, projected: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of every location with every prototype: ``(B, D, h, w) -> (B, K * M, h, w)``."""
        return torch.einsum("bdhw,pd->bphw", F.normalize(projected, dim=1), F.normalize(self.prototypes, dim=1))

    @torch.jit.export
    def local_concept_vectors(self, cams: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """Concept-attended projected features ``(B, K, D)`` from CAMs ``(B, K, h, w)`` and ``(B, D, h, w)``.

        ``v_k = sum_p softmax_p(cam_k / T)(p) * projected(p)`` with the spatial softmax over the ``h * w``
        locations and ``T = attention_temperature`` (default 1; smaller is closer to the CAM's peak location).
        """
        weights = torch.softmax(cams.flatten(2) / self.attention_temperature, dim=-1)
        return torch.einsum("bkn,bdn->bkd", weights, projected.flatten(2))

    def concept_vectors(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``(B, K, D)`` vectors stage 2 pulls towards the prototypes, from an :meth:`explain` output:
        ``concept_pooling="after_projector"`` pools the projected features under each concept's CAM attention
        (:meth:`local_concept_vectors`); ``"before_projector"``, the CSR design's order, pools the backbone features
        and projects the pooled vector (the projector is 1x1 convolutions, so it applies to one vector as to a map).
        """
        if self.concept_pooling == "after_projector":
            return self.local_concept_vectors(out["cams"], out["projected_features"])
        cams, features = out["cams"], out["features"]
        weights = torch.softmax(cams.flatten(2) / self.attention_temperature, dim=-1)
        pooled = torch.einsum("bkn,bfn->bkf", weights, features.flatten(2))  # (B, K, F)
        b, k, f = pooled.shape
        return self.projector(pooled.reshape(b * k, f, 1, 1)).reshape(b, k, -1)

    def _max_similarity(self, maps: torch.Tensor, roi_mask: torch.Tensor | None) -> torch.Tensor:
        """``(B, P, h, w) -> (B, P)``: max over locations, inside the ROI when given."""
        flat = maps.flatten(2)
        if roi_mask is None:
            return flat.amax(-1)
        batch_ok = roi_mask.shape[0] == 1 or roi_mask.shape[0] == maps.shape[0]
        if roi_mask.dim() != 4 or roi_mask.shape[1] != 1 or not batch_ok:
            raise ValueError(
                f"roi_mask should have shape ({maps.shape[0]} or 1, 1, H, W), got {list(roi_mask.shape)}."
            )
        roi = F.interpolate(roi_mask.to(maps.dtype), size=[maps.shape[2], maps.shape[3]], mode="area").flatten(2)
        if bool((roi.amax(-1) <= 0).any()):
            raise ValueError("roi_mask should cover part of the image for every sample, got an empty ROI.")
        if self.roi_mode == "restrict":
            return flat.masked_fill(roi <= 0, float("-inf")).amax(-1)
        return (flat * roi).amax(-1)

    def _drop_concepts(self, scores: torch.Tensor) -> torch.Tensor:
        """Training only: each concept of each image switched off (its ``M`` prototype scores 0, as
        :meth:`set_concept_intervention` does) with probability ``concept_dropout``, without rescaling, so the task
        head learns to predict from what is left when a doctor switches a concept off."""
        keep = torch.rand(scores.shape[0], self.num_concepts, device=scores.device) >= self.concept_dropout
        return scores * keep.repeat_interleave(self.prototypes_per_concept, dim=1).to(scores.dtype)

    def _apply_intervention(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores of "off" concepts' prototypes -> 0, of "on" concepts' prototypes -> 1."""
        state = self.concept_intervention.repeat_interleave(self.prototypes_per_concept)
        scores = torch.where(state < 0, torch.zeros_like(scores), scores)
        return torch.where(state > 0, torch.ones_like(scores), scores)

    # ------------------------------------------------------------------------------------------- interaction

    def set_roi_mode(self, roi_mode: str) -> None:
        """``"restrict"``: max only over cells the ROI overlaps; ``"weight"``: similarity times ROI fraction."""
        self.roi_mode = look_up_option(roi_mode, ROI_MODES)

    def set_concept_intervention(self, off: Sequence[int] = (), on: Sequence[int] = ()) -> None:
        """Replace the intervention: concepts in ``off`` score 0, concepts in ``on`` score 1, the rest are free.

        For concept ``k`` with prototype columns ``W_k`` of the task head, the logits change by
        ``W_k @ (new_scores_k - scores_k)``.
        """
        off, on = [int(k) for k in off], [int(k) for k in on]
        for name, ids in [("off", off), ("on", on)]:
            if any(not 0 <= k < self.num_concepts for k in ids):
                raise ValueError(f"{name} should hold concept indices in [0, {self.num_concepts}), got {ids}.")
        if set(off) & set(on):
            raise ValueError(f"off and on should not share concepts, got {sorted(set(off) & set(on))}.")
        self.concept_intervention.zero_()
        self.concept_intervention[off] = -1
        self.concept_intervention[on] = 1

    def clear_intervention(self) -> None:
        """Every concept back to its computed score."""
        self.concept_intervention.zero_()

    # ---------------------------------------------------------------------------------------------- training

    def _part_parameters(self, part: str) -> list[nn.Parameter]:
        if part == "prototypes":
            return [self.prototypes]
        return list(getattr(self, part).parameters())

    def trainable_parameters(self, stage: int | None = None) -> list[nn.Parameter]:
        """Parameters trained in ``stage`` (default: the current ``training_stage``), for the optimizer."""
        stage = self.training_stage if stage is None else stage
        parts = look_up_option(stage, _STAGE_PARTS)
        return [p for part in parts for p in self._part_parameters(part)]

    def freeze_stage(self, stage: int) -> None:
        """Freeze every part that training ``stage`` does not train.

        ===== ================================ =========================================
        stage trained                          frozen
        ===== ================================ =========================================
        0     everything                       nothing
        1     backbone, concept head           projector, prototypes, task head
        2     projector, prototypes            backbone, concept head, task head
        3     task head                        backbone, concept head, projector, prototypes
        ===== ================================ =========================================

        Frozen parameters get ``requires_grad=False``; frozen modules are put in eval mode and kept there by
        :meth:`train`, so BatchNorm running statistics and dropout stay fixed while the rest trains.
        """
        trained = look_up_option(stage, _STAGE_PARTS)
        for part in _PARTS:
            for p in self._part_parameters(part):
                p.requires_grad_(part in trained)
        self._frozen_parts = [part for part in _PARTS if part not in trained and part != "prototypes"]
        self.training_stage = stage
        self.train(self.training)

    def train(self, mode: bool = True) -> CSRNet:
        """``nn.Module.train``, except that the parts frozen by :meth:`freeze_stage` always stay in eval mode."""
        super().train(mode)
        for part in self._frozen_parts:
            getattr(self, part).train(False)
        return self

    @torch.no_grad()
    def init_prototypes_kmeans(
        self, local_vectors: torch.Tensor, concept_present: torch.Tensor, num_iters: int = 10, seed: int = 0
    ) -> None:
        """Set each concept's ``M`` prototypes to k-means centres of its local concept vectors.

        For concept ``k`` the vectors ``local_vectors[n, k]`` of the images where it is present are L2-normalised
        (the prototypes are compared by cosine) and clustered with k-means++ seeding and ``num_iters`` Lloyd
        steps, seeded by ``seed`` so the result is deterministic. A concept present in fewer than ``M`` images
        keeps its current (random) prototypes.

        Args:
            local_vectors: ``(N, K, D)``, e.g. :meth:`local_concept_vectors` gathered over the training set.
            concept_present: ``(N, K)`` in {0, 1}.
            num_iters: Lloyd iterations. Default 10.
            seed: seed of the k-means++ draws. Default 0.
        """
        k_, m, d = self.num_concepts, self.prototypes_per_concept, self.prototypes.shape[1]
        if local_vectors.dim() != 3 or local_vectors.shape[1:] != (k_, d):
            raise ValueError(f"local_vectors should have shape (N, {k_}, {d}), got {list(local_vectors.shape)}.")
        if concept_present.shape != local_vectors.shape[:2]:
            raise ValueError(
                f"concept_present should have shape {list(local_vectors.shape[:2])}, got {list(concept_present.shape)}."
            )
        generator = torch.Generator().manual_seed(seed)  # CPU draws: the same centres on any device
        present = concept_present.to(local_vectors.device) > 0.5
        for k in range(k_):
            x = F.normalize(local_vectors[present[:, k], k].float(), dim=-1)
            if x.shape[0] < m:
                continue
            self.prototypes[k * m:(k + 1) * m] = _kmeans(x, m, num_iters, generator).to(self.prototypes)


def csr_densenet121(**kwargs) -> CSRNet:
    """CSR on MONAI DenseNet-121 (F = 1024, stride 32), e.g. 512 x 512 chest X-rays -> 16 x 16 maps."""
    return CSRNet(**{"backbone": "densenet121", **kwargs})


def csr_resnet50(**kwargs) -> CSRNet:
    """CSR on torchvision ResNet-50 (F = 2048, stride 32)."""
    return CSRNet(**{"backbone": "resnet50", **kwargs})


def csr_vit_b16(**kwargs) -> CSRNet:
    """CSR on torchvision ViT-B/16 patch tokens (F = 768); 224 x 224 images -> 14 x 14 maps."""
    return CSRNet(**{"backbone": "vit_b_16", **kwargs})


def csr_tiny(**kwargs) -> CSRNet:
    """A CPU-sized CSR for tests and demos: the "tiny" backbone (F = 32, stride 8), projector 32 -> 16."""
    return CSRNet(**{"backbone": "tiny", "proj_hidden": 32, "proj_dim": 16, **kwargs})
