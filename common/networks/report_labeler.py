"""The report labeler: one transformer encoder read two ways, a multi-label finding classifier on the pooled text and
a BiLSTM-CRF entity tagger on the tokens."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn as nn
from torchcrf import CRF

from .text_encoder import TextEncoder, mean_pool

__all__ = ["ENTITY_TAGS", "ReportLabeler", "decode_entities", "spans_to_tags"]

ENTITY_TAGS: tuple[str, ...] = ("O", "B-FINDING", "I-FINDING", "B-NEG_FINDING", "I-NEG_FINDING", "B-ANATOMY",
                                "I-ANATOMY")
"""BIO tags: a negated finding is its own entity type, so negation is learned with the span, not added by rule."""
_TAG_INDEX = {tag: i for i, tag in enumerate(ENTITY_TAGS)}


def _entity_type(entity: dict) -> str:
    if entity["type"] == "FINDING" and entity.get("negated"):
        return "NEG_FINDING"
    return str(entity["type"])


def spans_to_tags(offsets: Sequence[Sequence[int]], entities: Sequence[dict]) -> list[int]:
    """Character spans -> one BIO tag index per token.

    Args:
        offsets: ``(start, end)`` characters of each token, ``(0, 0)`` for special and padding tokens (a fast
            tokenizer's ``offset_mapping``).
        entities: ``{"start", "end", "type": "FINDING" | "ANATOMY", "negated"}`` character spans.

    Returns:
        ``len(offsets)`` indices into :data:`ENTITY_TAGS`: ``B-`` on the first token inside a span, ``I-`` on the
        following ones, ``O`` elsewhere.
    """
    tags = [0] * len(offsets)
    for entity in entities:
        kind, first = _entity_type(entity), True
        for i, (start, end) in enumerate(offsets):
            if end > start and start >= entity["start"] and end <= entity["end"]:
                tags[i] = _TAG_INDEX[f"{'B' if first else 'I'}-{kind}"]
                first = False
    return tags


def decode_entities(tags: Sequence[int], offsets: Sequence[Sequence[int]]) -> list[dict]:
    """BIO tag indices and token offsets -> ``{"start", "end", "type", "negated"}`` character spans.

    An ``I-`` tag that does not continue an entity of its type starts one (the tagger's CRF rarely emits it).
    """
    entities: list[dict] = []
    current: dict | None = None
    for tag, (start, end) in zip(tags, offsets):
        name = ENTITY_TAGS[int(tag)]
        if end <= start or name == "O":
            current = None if end > start else current  # special tokens neither end nor extend an entity
            continue
        prefix, kind = name.split("-", 1)
        if prefix == "I" and current is not None and current["kind"] == kind:
            current["end"] = end
            continue
        current = {"start": start, "end": end, "kind": kind}
        entities.append(current)
    return [{"start": e["start"], "end": e["end"], "type": "FINDING" if e["kind"] == "NEG_FINDING" else e["kind"],
             "negated": e["kind"] == "NEG_FINDING"} for e in entities]


_FIXED_PREFIXES = ("encoder.backbone.embeddings.", "encoder.backbone.pooler.")
"""Parts of :class:`ReportLabeler` that never train: kept out of its ``state_dict`` and filled back on loading."""


def _drop_fixed(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k[len(prefix):].startswith(_FIXED_PREFIXES)]:
        del state_dict[key]


def _fill_fixed(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    # parameters only: the embeddings' buffers (position and type ids) are not persistent
    for name, tensor in module.named_parameters(remove_duplicate=False):
        if name.startswith(_FIXED_PREFIXES) and prefix + name not in state_dict:
            state_dict[prefix + name] = tensor.detach()


class ReportLabeler(nn.Module):
    """Finding probabilities and entity tags of radiology reports from one MiniLM-sized encoder.

    - classifier: mean-pooled token states -> dropout -> linear to ``head_hidden`` -> ReLU -> dropout -> linear to
      ``num_classes`` logits (sigmoid per finding);
    - tagger: token states -> BiLSTM -> linear to the :data:`ENTITY_TAGS` emissions -> CRF (``pytorch-crf``);
    - ``thresholds`` ``(num_classes,)``: per-finding decision thresholds, a buffer set after training from the
      validation split, so they travel with the weights.

    The word, position and type embeddings never train (:meth:`set_trainable_layers` keeps them frozen) and are left
    out of the ``state_dict``: they are read from the installed encoder package at construction, and loading fills
    them back, so the weights file holds only what training changed (about half of MiniLM).

    Shapes:
        ``input_ids``, ``attention_mask`` ``(B, T)`` -> ``{"logits": (B, C), "emissions": (B, T, len(ENTITY_TAGS))}``
        (and ``"tag_nll"``, a scalar, when ``tags`` ``(B, T)`` are given).

    Args:
        num_classes: number of findings.
        model_dir: local transformer folder; default the packaged all-MiniLM-L6-v2.
        head_hidden: width of the classifier's hidden layer. Default 256.
        dropout: dropout of the classifier head. Default 0.1.
        lstm_hidden: hidden size per direction of the tagger's BiLSTM. Default 128.
        max_length: token budget per report. Default 192 (longer reports are truncated: 99% of the OpenI reports
            fit).
    """

    def __init__(self, num_classes: int, model_dir: str | os.PathLike | None = None, head_hidden: int = 256,
                 dropout: float = 0.1, lstm_hidden: int = 128, max_length: int = 192) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes should be a positive integer, got {num_classes!r}.")
        self.encoder = TextEncoder(out_dim=None, model_dir=model_dir, freeze="all", max_length=max_length)
        width = self.encoder.hidden_size
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, head_hidden), nn.ReLU(), nn.Dropout(dropout),
                                  nn.Linear(head_hidden, num_classes))
        self.lstm = nn.LSTM(width, lstm_hidden, batch_first=True, bidirectional=True)
        self.emission = nn.Linear(2 * lstm_hidden, len(ENTITY_TAGS))
        self.crf = CRF(len(ENTITY_TAGS), batch_first=True)
        self.register_buffer("thresholds", torch.full((num_classes,), 0.5))
        self.register_state_dict_post_hook(_drop_fixed)
        self.register_load_state_dict_pre_hook(_fill_fixed)
        # all layers trainable at construction, so data-parallel training registers every parameter; progressive
        # fine-tuning (common.engines.ProgressiveFineTuning) narrows that per epoch
        self.set_trainable_layers(None)

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def set_trainable_layers(self, num_layers: int | None) -> None:
        """Train the heads and the last ``num_layers`` transformer layers (``None``: all layers); the embeddings
        stay frozen."""
        self.encoder.set_trainable_layers(num_layers)
        self.encoder.backbone.embeddings.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                tags: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """With ``tags`` ``(B, T)`` (training), the output also holds ``tag_nll``, the CRF's per-token negative
        log-likelihood of them, computed here so that data-parallel training reduces the CRF's gradients too."""
        hidden = self.encoder.token_states(input_ids, attention_mask)
        logits = self.head(mean_pool(hidden, attention_mask))
        lengths = attention_mask.sum(1).clamp_min(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(hidden, lengths, batch_first=True, enforce_sorted=False)
        states, _ = self.lstm(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True, total_length=hidden.shape[1])
        out = {"logits": logits, "emissions": self.emission(states)}
        if tags is not None:
            out["tag_nll"] = self.tag_loss(out["emissions"], tags, attention_mask)
        return out

    def tag_loss(self, emissions: torch.Tensor, tags: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """CRF negative log-likelihood per token: ``(B, T, K)``, ``(B, T)``, ``(B, T)`` -> scalar."""
        return -self.crf(emissions, tags.long(), mask=attention_mask.bool(), reduction="token_mean")

    def decode_tags(self, emissions: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
        """Viterbi tags of each report's unmasked tokens."""
        return self.crf.decode(emissions, mask=attention_mask.bool())
