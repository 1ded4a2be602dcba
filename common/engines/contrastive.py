"""Volume-report contrastive training: the image-text model, its trainer step, batch preparation and inferer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer
from monai.utils import CommonKeys as Keys
from torch import nn

from common.data.report_text import report_text_batch
from common.engines.steps import StepTrainer, optimisation_step
from common.engines.utils import unwrap

__all__ = [
    "ContrastiveTrainer",
    "EncodingInferer",
    "ImageTextModel",
    "PrepareVolumeBatch",
    "TrainableState",
    "embed_texts",
]

logger = logging.getLogger(__name__)


class ImageTextModel(nn.Module):
    """A CT image encoder, a report text encoder and the multi-level contrastive loss in one module.

    One module, so DistributedDataParallel synchronises the gradients of both towers and of the learnable
    temperatures. ``forward`` runs both towers on a batch and returns the loss of each level (see
    :class:`common.losses.MultiLevelContrastiveLoss`).

    With a fully frozen text backbone (``TextEncoder(freeze="all")``) the mean-pooled backbone state of each text
    never changes, so it is computed once per distinct text and cached (``cache_text``); only the projection runs
    per step. The cache is not part of the ``state_dict``.

    Args:
        image_encoder: a :class:`common.networks.CTViT` (``encode(volume, region_mask)``).
        text_encoder: a :class:`common.networks.TextEncoder`.
        loss: a :class:`common.losses.MultiLevelContrastiveLoss`.
        cache_text: cache pooled text states when the text backbone is frozen. Default True.
        seg_loss: loss of the image encoder's auxiliary segmentation head, ``seg_loss(seg_logits, region_mask)``
            (e.g. ``monai.losses.DiceCELoss(to_onehot_y=True, softmax=True)``); used when ``seg_weight > 0``.
        seg_weight: weight of the segmentation loss in ``total``, added as level ``seg``; it needs an encoder built
            with ``seg_head=True`` and batches with region masks. Default 0 (off).
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        text_encoder: nn.Module,
        loss: nn.Module,
        cache_text: bool = True,
        seg_loss: nn.Module | None = None,
        seg_weight: float = 0.0,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.loss = loss
        self.seg_weight = float(seg_weight)
        if self.seg_weight < 0:
            raise ValueError(f"seg_weight should be non-negative, got {seg_weight}.")
        if self.seg_weight > 0 and (seg_loss is None or getattr(image_encoder, "seg_head", None) is None):
            raise ValueError("seg_weight > 0 needs a seg_loss and an image encoder built with seg_head=True.")
        self.seg_loss = seg_loss
        self.cache_text = bool(cache_text) and getattr(text_encoder, "freeze", "none") == "all"
        self._cache: dict[str, torch.Tensor] = {}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with ``requires_grad``: the image encoder, the trained text parts and the temperatures."""
        return [p for p in self.parameters() if p.requires_grad]

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``T`` texts -> ``(T, out_dim)`` embeddings; each distinct text is encoded once per call (or once ever
        with the cache)."""
        unique = list(dict.fromkeys(texts))
        device = self.text_encoder.projection.weight.device
        if self.cache_text:
            missing = [t for t in unique if t not in self._cache]
            if missing:
                with torch.no_grad():
                    batch = {k: v.to(device) for k, v in self.text_encoder.tokenize(missing).items()}
                    for text, state in zip(missing, self.text_encoder.pooled(**batch).float()):
                        self._cache[text] = state
            pooled = torch.stack([self._cache[t] for t in unique]).to(device)
        else:
            batch = {k: v.to(device) for k, v in self.text_encoder.tokenize(unique).items()}
            pooled = self.text_encoder.pooled(**batch)
        embeddings = self.text_encoder.projection(pooled.to(self.text_encoder.projection.weight.dtype))
        index = {t: i for i, t in enumerate(unique)}
        return embeddings[torch.tensor([index[t] for t in texts], device=device, dtype=torch.long)]

    def forward(
        self, volume: torch.Tensor, region_mask: torch.Tensor | None, reports: Sequence[Mapping]
    ) -> dict[str, torch.Tensor]:
        """``(B, 1, D, H, W)`` volumes, ``(B, 1, D, H, W)`` region ids (or None) and ``B`` reports -> each level's
        loss (``seg`` too when the segmentation loss is on and masks are given) and ``total``."""
        image = self.image_encoder.encode(volume, region_mask)
        num_regions = image["region"].shape[1]
        texts = report_text_batch(reports, num_regions)
        everything = texts["impressions"] + texts["region_texts"] + texts["step_texts"]
        embedded = self.embed_texts(everything).to(image["global"].dtype)
        b, m = len(texts["impressions"]), len(texts["region_texts"])
        region_text = image["region"].new_zeros(image["region"].shape)
        device = volume.device
        if m:
            region_text = region_text.index_put(
                (texts["region_batch"].to(device), texts["region_ids"].to(device) - 1), embedded[b: b + m]
            )
        steps = embedded[b + m:]
        levels = self.loss.levels(
            image["global"], embedded[:b],
            image_regions=image["region"],
            region_text=region_text if m else None,
            region_mentioned=texts["region_mentioned"].to(device),
            region_present=image["region_present"],
            step_text=steps if len(steps) else None,
            step_batch=texts["step_batch"].to(device),
            step_region=texts["step_region"].to(device),
            image_region_local=image["region_local"],
            image_local=image["local"],
            assignment=image["assignment"],
        )
        if self.seg_weight > 0 and region_mask is not None:
            levels["seg"] = self.seg_loss(image["seg_logits"].float(), region_mask.long())
            levels["total"] = levels["total"] + self.seg_weight * levels["seg"]
        return levels


def embed_texts(model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """``T`` texts -> ``(T, out_dim)`` through a :class:`common.networks.TextEncoder` or the text side (and text
    cache) of an :class:`ImageTextModel`, either possibly inside DDP."""
    model = unwrap(model)
    if isinstance(model, ImageTextModel):
        return model.embed_texts(texts)
    return model.embed(list(texts))


class TrainableState:
    """Checkpoint view of a module's trainable parameters only (e.g. a text encoder's projection, not its frozen
    backbone): ``state_dict`` holds the parameters that had ``requires_grad`` when this view was made, and
    ``load_state_dict`` loads exactly those (a missing or unexpected key raises)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().clone() for n in self.names}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        missing = [n for n in self.names if n not in state_dict]
        unexpected = [n for n in state_dict if n not in self.names]
        if strict and (missing or unexpected):
            raise KeyError(f"trainable state should hold {self.names}, missing {missing}, unexpected {unexpected}.")
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for n in self.names:
                if n in state_dict:
                    params[n].copy_(state_dict[n])


class PrepareVolumeBatch:
    """``prepare_batch`` of volume encoders: the image, no target, and the region mask (when the batch has one) as
    the ``region_mask`` keyword of ``encode``."""

    def __init__(self, mask_key: str = "mask") -> None:
        self.mask_key = mask_key

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        image = batchdata[Keys.IMAGE].to(device=device, non_blocking=non_blocking, **kwargs)
        mask = batchdata.get(self.mask_key)
        extra = {"region_mask": mask.to(device=device, non_blocking=non_blocking)} if isinstance(
            mask, torch.Tensor) else {}
        return image, None, (), extra


class EncodingInferer(Inferer):
    """Inferer returning the chosen outputs of ``network.encode`` as a dict (default global and region embeddings
    and which regions are present); extra keyword arguments (``region_mask``) go to ``encode``."""

    def __init__(self, outputs: Sequence[str] = ("global", "region", "region_present")) -> None:
        super().__init__()
        self.outputs = tuple(outputs)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args, **kwargs) -> dict[str, torch.Tensor]:
        out = unwrap(network).encode(inputs, *args, **kwargs)
        return {k: out[k] for k in self.outputs}


class ContrastiveTrainer(StepTrainer):
    """``SupervisedTrainer`` step for :class:`ImageTextModel` (possibly inside DDP): the network's forward gives the
    loss levels, whose ``total`` is back-propagated; AMP (autocast + gradient scaling) on CUDA only.

    Batches are dicts with ``image`` ``(B, 1, D, H, W)``, optional ``mask`` (region ids, same shape) and ``report``
    (a list of ``B`` report dicts; see :func:`common.data.collate_reports`). An empty batch (every case of it
    failed to load) is skipped. ``engine.state.output`` holds ``loss`` and ``loss_<level>`` of each level.

    Args:
        mask_key: batch key of the region masks. Default ``"mask"``.
        report_key: batch key of the reports. Default ``"report"``.
        Others as ``monai.engines.SupervisedTrainer`` (no ``loss_function``: the loss is inside the network).
    """

    def __init__(self, *args, mask_key: str = "mask", report_key: str = "report", **kwargs) -> None:
        super().__init__(*args, loss_function=None, **kwargs)
        self.mask_key = mask_key
        self.report_key = report_key

    def _iteration(self, engine: ContrastiveTrainer, batchdata: dict | None) -> dict:
        if not batchdata or Keys.IMAGE not in batchdata:
            logger.warning("skipping an empty batch: every case of it failed to load")
            return {Keys.LOSS: torch.tensor(float("nan"))}
        move = {"device": engine.state.device, "non_blocking": engine.non_blocking}
        image = batchdata[Keys.IMAGE].to(**move)
        mask = batchdata.get(self.mask_key)
        mask = mask.to(**move) if isinstance(mask, torch.Tensor) else None
        reports = batchdata[self.report_key]
        engine.state.output = {Keys.IMAGE: image}

        def _compute() -> None:
            levels = engine.inferer(image, engine.network, mask, reports)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output[Keys.LOSS] = levels["total"]
            engine.state.output.update({f"loss_{k}": v.detach() for k, v in levels.items() if k != "total"})
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        optimisation_step(engine, _compute)
        return engine.state.output
