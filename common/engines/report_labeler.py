"""Training, thresholds and evaluation of :class:`common.networks.ReportLabeler` in MONAI/ignite workflows.

The pieces a ``train.json`` wires together: :class:`TokenizeReportd` (text and silver entities to token ids and
BIO tags), :func:`prepare_report_batch`, :class:`ReportLabelerLoss` (BCE on findings + CRF likelihood of the tags),
:func:`layerwise_param_groups` and :class:`ProgressiveFineTuning` (head only, then the top layers, then all layers
with layer-wise learning-rate decay), and :class:`ThresholdSelection` (per-finding thresholds by validation F1, stored
in the network). :func:`evaluate_report_labeler` scores a model beside the keyword and TF-IDF baselines.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from ignite.engine import Engine, Events
from monai.transforms import MapTransform

from common.bundle.args import user_error
from common.data.report_text import split_sentences
from common.networks.report_labeler import ReportLabeler, decode_entities, spans_to_tags

__all__ = [
    "ProgressiveFineTuning",
    "ReportFindingsd",
    "ReportLabelerLoss",
    "ThresholdSelection",
    "TokenizeReportd",
    "evaluate_report_labeler",
    "layerwise_param_groups",
    "load_weights",
    "predict_reports",
    "prepare_report_batch",
    "span_metrics",
]

logger = logging.getLogger(__name__)


class TokenizeReportd(MapTransform):
    """Report text -> ``input_ids``, ``attention_mask`` ``(max_length,)`` and ``offsets`` ``(max_length, 2)``; with
    ``entities`` in the item, also ``tags`` ``(max_length,)`` (BIO indices of
    :data:`~common.networks.ENTITY_TAGS`); a ``label`` list becomes a float tensor ``(C,)``.

    Padding to ``max_length`` lets the default collation stack items; :func:`prepare_report_batch` trims each batch
    to its longest report.
    """

    def __init__(self, tokenizer, keys: str = "text", max_length: int = 192, entities_key: str = "entities") -> None:
        super().__init__(keys)
        self.tokenizer, self.max_length, self.entities_key = tokenizer, int(max_length), entities_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            encoded = self.tokenizer(str(d[key]), padding="max_length", truncation=True, max_length=self.max_length,
                                     return_offsets_mapping=True)
            d["input_ids"] = torch.tensor(encoded["input_ids"])
            d["attention_mask"] = torch.tensor(encoded["attention_mask"])
            d["offsets"] = torch.tensor(encoded["offset_mapping"])
            if self.entities_key in d:
                d["tags"] = torch.tensor(spans_to_tags(encoded["offset_mapping"], d[self.entities_key]))
        if "label" in d:  # a list would collate into one tensor per finding
            d["label"] = torch.as_tensor(d["label"], dtype=torch.float32)
        return d


def prepare_report_batch(batchdata: Mapping, device: str | torch.device | None = None, non_blocking: bool = False,
                         **kwargs) -> tuple:
    """``(input_ids, targets, (attention_mask,), kwargs)`` for MONAI's engines, trimmed to the batch's longest
    report; ``targets`` holds ``label`` ``(B, C)`` when the batch has it, and with silver ``tags`` in the batch
    ``kwargs`` is ``{"tags": (B, T)}`` so the network scores them (see :class:`ReportLabeler`)."""
    mask = batchdata["attention_mask"]
    length = int(mask.sum(1).max())
    ids, mask = batchdata["input_ids"][:, :length], mask[:, :length]
    mask = mask.to(device, non_blocking=non_blocking)
    targets, kwargs = {}, {}
    if "label" in batchdata:
        targets["label"] = torch.as_tensor(batchdata["label"]).float().to(device, non_blocking=non_blocking)
    if "tags" in batchdata:
        kwargs["tags"] = batchdata["tags"][:, :length].to(device, non_blocking=non_blocking)
    return ids.to(device, non_blocking=non_blocking), targets, (mask,), kwargs


class ReportLabelerLoss(nn.Module):
    """Binary cross-entropy of the finding logits plus ``tag_weight`` times the CRF's per-token negative
    log-likelihood of the silver tags (``pred["tag_nll"]``, computed by the network)."""

    def __init__(self, tag_weight: float = 1.0) -> None:
        super().__init__()
        self.tag_weight = float(tag_weight)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss = self.bce(pred["logits"], target["label"])
        if self.tag_weight and "tag_nll" in pred:
            loss = loss + self.tag_weight * pred["tag_nll"]
        return loss


def layerwise_param_groups(network: ReportLabeler, lr: float, encoder_lr: float, layer_decay: float = 0.8,
                           weight_decay: float = 0.01) -> list[dict]:
    """Optimizer parameter groups: the heads (classifier, BiLSTM, CRF) at ``lr``, transformer layer ``i`` of ``L``
    at ``encoder_lr * layer_decay ** (L - 1 - i)`` (layer-wise decay: the top layer at ``encoder_lr``, lower layers,
    which hold more general language, less), the frozen embeddings left out.

    Every group is in the optimizer from the start; :class:`ProgressiveFineTuning` decides which have gradients
    (AdamW skips parameters whose ``grad`` is ``None``).
    """
    layers = list(network.encoder.layers)
    groups = [{"params": [p for n, p in network.named_parameters() if not n.startswith("encoder.")], "lr": lr,
               "weight_decay": weight_decay}]
    for i, layer in enumerate(layers):
        groups.append({"params": list(layer.parameters()), "lr": encoder_lr * layer_decay ** (len(layers) - 1 - i),
                       "weight_decay": weight_decay})
    return groups


class ProgressiveFineTuning:
    """Progressive fine-tuning: at the start of each epoch, train the heads and the last ``layers`` transformer
    layers of the stage that epoch is in (``None``: all layers).

    Args:
        network: the :class:`ReportLabeler`.
        stages: ``[[first_epoch, layers], ...]`` in epoch order (1-based), e.g. ``[[1, 0], [3, 2], [5, null]]``:
            the heads alone, then the top two layers, then everything.
    """

    def __init__(self, network: ReportLabeler, stages: Sequence[Sequence]) -> None:
        stages = [(int(first), None if layers is None else int(layers)) for first, layers in stages]
        if not stages or stages[0][0] != 1 or any(a[0] >= b[0] for a, b in zip(stages, stages[1:])):
            raise ValueError(f"stages should start at epoch 1 in increasing epochs, got {stages}.")
        self.network, self.stages = network, stages

    def layers_at(self, epoch: int) -> int | None:
        return [layers for first, layers in self.stages if first <= epoch][-1]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        layers = self.layers_at(engine.state.epoch)
        self.network.set_trainable_layers(layers)
        logger.info("epoch %d: training the heads and %s transformer layers", engine.state.epoch,
                    "all" if layers is None else layers)


@torch.no_grad()
def predict_reports(network: ReportLabeler, loader, device: str | torch.device = "cpu") -> dict:
    """Run ``network`` in eval mode over a report loader: ``probs`` and, where the items have them, ``labels``
    ``(N, C)``; ``entities`` and ``silver`` (per report, character spans); ``texts``."""
    was_training = network.training
    network.eval()
    out: dict[str, list] = {"probs": [], "labels": [], "entities": [], "silver": [], "texts": []}
    for batch in loader:
        ids, targets, (mask,), kwargs = prepare_report_batch(batch, device)
        pred = network(ids, mask)
        out["probs"].append(torch.sigmoid(pred["logits"]).float().cpu())
        if "label" in targets:
            out["labels"].append(targets["label"].cpu())
        offsets = batch["offsets"][:, :ids.shape[1]].tolist()
        for tags, offset in zip(network.decode_tags(pred["emissions"], mask), offsets):
            out["entities"].append(decode_entities(tags, offset))
        if "tags" in kwargs:
            for tags, offset, m in zip(kwargs["tags"].tolist(), offsets, mask.tolist()):
                out["silver"].append(decode_entities(tags[:sum(m)], offset))
        out["texts"].extend(batch.get("text", []))
    network.train(was_training)
    result = {"probs": torch.cat(out["probs"]).numpy(), "entities": out["entities"], "silver": out["silver"],
              "texts": out["texts"]}
    if out["labels"]:
        result["labels"] = torch.cat(out["labels"]).numpy()
    return result


class ThresholdSelection:
    """Per-finding decision thresholds chosen by F1 on the validation loader at the end of every ``interval``-th
    epoch and at the last one, stored in ``network.thresholds``; logs validation macro-F1 and macro-AUC.

    Attach it before the checkpoint handler so the saved weights carry the thresholds of their epoch.
    """

    def __init__(self, network: ReportLabeler, val_loader, interval: int = 1) -> None:
        self.network, self.loader, self.interval = network, val_loader, max(1, int(interval))
        self.history: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if epoch % self.interval and epoch != engine.state.max_epochs:
            return
        from common.metrics.multilabel import multilabel_report, select_thresholds

        device = next(self.network.parameters()).device
        pred = predict_reports(self.network, self.loader, device)
        thresholds = select_thresholds(pred["probs"], pred["labels"])
        self.network.thresholds.copy_(torch.as_tensor(thresholds, dtype=self.network.thresholds.dtype))
        report = multilabel_report(pred["probs"], pred["labels"], thresholds, [str(i) for i in range(
            len(thresholds))])
        aucs = [c["auc"] for c in report["classes"].values() if c["auc"] is not None]
        entry = {"epoch": epoch, "val_macro_f1": report["macro_f1"], "val_macro_auc": float(np.mean(aucs))}
        self.history.append(entry)
        engine.state.metrics.update(entry)
        logger.info("epoch %d: validation macro-F1 %.3f, macro-AUC %.3f (thresholds chosen on it)", epoch,
                    entry["val_macro_f1"], entry["val_macro_auc"])


class ReportFindingsd(MapTransform):
    """Inference postprocessing: the network's ``pred`` of one report -> ``probs`` and ``thresholds`` ``(C,)``,
    ``entities`` (character spans decoded by the CRF) and ``evidence`` (for each positive finding, the sentence of
    the report the classifier scores highest for it; ``""`` otherwise)."""

    def __init__(self, network: ReportLabeler, keys: str = "pred", max_length: int = 192) -> None:
        super().__init__(keys)
        self.network, self.max_length = network, int(max_length)

    @torch.no_grad()
    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        pred = d[self.keys[0]]
        probs = torch.sigmoid(pred["logits"].float()).cpu()
        mask = d["attention_mask"].bool()
        length = int(mask.sum())
        emissions = pred["emissions"][:length].unsqueeze(0)
        tags = self.network.decode_tags(emissions, torch.ones(1, length, dtype=torch.bool,
                                                              device=emissions.device))[0]
        d["entities"] = decode_entities(tags, d["offsets"][:length].tolist())
        thresholds = self.network.thresholds.float().cpu()
        d["probs"], d["thresholds"] = probs, thresholds
        d["evidence"] = self._evidence(str(d["text"]), probs >= thresholds)
        return d

    def _evidence(self, text: str, positive: torch.Tensor) -> list[str]:
        evidence = [""] * len(positive)
        sentences = split_sentences(text)
        if not bool(positive.any()) or not sentences:
            return evidence
        device = self.network.thresholds.device
        batch = self.network.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_length,
                                       return_tensors="pt")
        logits = self.network(batch["input_ids"].to(device), batch["attention_mask"].to(device))["logits"]
        best = logits.float().argmax(0).cpu()
        for c in torch.nonzero(positive).flatten().tolist():
            evidence[c] = sentences[int(best[c])]
        return evidence


def load_weights(network: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """Load a ``model.pt`` (a ``state_dict``, possibly half precision, or ``{"model": state_dict}``) strictly;
    a missing or mismatched file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise user_error(f"{path}: weights file missing; train with train.json or pass --ckpt_path.",
                         FileNotFoundError)
    state = torch.load(path, map_location=device, weights_only=True)
    state = state.get("model", state) if isinstance(state, Mapping) else state
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise user_error(f"{path}: weights do not fit the network ({str(err).splitlines()[0]}).",
                         ValueError) from None


def span_metrics(predicted: Sequence[Sequence[dict]], silver: Sequence[Sequence[dict]]) -> dict:
    """Tagger scores against silver spans: exact-span F1 per type (start, end and type equal; negation ignored),
    and negation accuracy over predicted findings whose span matches a silver finding."""
    scores: dict[str, dict] = {}
    for kind in ("FINDING", "ANATOMY"):
        tp = fp = fn = 0
        for pred, gold in zip(predicted, silver):
            p = {(e["start"], e["end"]) for e in pred if e["type"] == kind}
            g = {(e["start"], e["end"]) for e in gold if e["type"] == kind}
            tp, fp, fn = tp + len(p & g), fp + len(p - g), fn + len(g - p)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        scores[kind] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    agree = total = 0
    for pred, gold in zip(predicted, silver):
        gold_neg = {(e["start"], e["end"]): bool(e["negated"]) for e in gold if e["type"] == "FINDING"}
        for e in pred:
            if e["type"] == "FINDING" and (e["start"], e["end"]) in gold_neg:
                total += 1
                agree += bool(e["negated"]) == gold_neg[(e["start"], e["end"])]
    scores["negation_accuracy"] = agree / total if total else None
    scores["negation_support"] = total
    return scores


def evaluate_report_labeler(network: ReportLabeler, datalist: str | os.PathLike, output_dir: str | os.PathLike,
                            table: str | os.PathLike | None = None, ckpt_path: str | os.PathLike | None = None,
                            split: str = "test", batch_size: int = 32, max_length: int = 192,
                            device: str | torch.device = "cpu") -> dict:
    """Score ``network`` on the ``test`` split of an OpenI datalist beside the baselines, with the same metrics:

    - ``keyword``: the keyword + negation rule labeler of the findings table (no training);
    - ``tfidf``: TF-IDF + logistic regression fitted on ``training``, thresholds chosen on ``validation`` F1 as the
      network's were;
    - the network with its stored thresholds (loaded from ``ckpt_path`` when given); and its tagger against the
      silver spans (span F1, negation accuracy).

    ``split`` names the scored split (``test``; ``validation`` only to compare with the thresholds' own split).
    Writes ``<output_dir>/metrics.json`` and ``<output_dir>/metrics.md`` and returns the metrics.
    """
    from monai.data import DataLoader

    from common.data import load_datalist
    from common.data.findings_table import load_findings_table
    from common.engines.report_baselines import KeywordLabeler, TfidfLabeler
    from common.metrics.multilabel import format_table, multilabel_report, select_thresholds

    out = Path(output_dir)
    if ckpt_path:
        load_weights(network, ckpt_path, device)
    findings = load_findings_table(table)
    names = list(findings["findings"])
    splits = {}
    for name in dict.fromkeys(("training", "validation", split)):
        try:
            splits[name] = load_datalist(str(datalist), name)
        except (KeyError, ValueError, FileNotFoundError) as err:
            raise user_error(f"{datalist}: cannot read its '{name}' split ({err}); write the datalist with "
                             "`python -m common.cli openi_reports --out <folder>`.", ValueError) from None
    test = splits[split]
    labels = np.asarray([item["label"] for item in test], dtype=np.float32)
    if labels.shape[1] != len(names) or network.thresholds.numel() != len(names):
        raise user_error(f"{datalist}: labels have {labels.shape[1]} findings, the table {len(names)} and the "
                         f"network {network.thresholds.numel()}.", ValueError)
    tokenize = TokenizeReportd(network.tokenizer, max_length=max_length)
    keep = ("text", "label", "input_ids", "attention_mask", "offsets", "tags")  # spans do not collate: tags do
    items = [tokenize({k: item[k] for k in ("text", "label", "entities")}) for item in test]
    loader = DataLoader([{k: v for k, v in item.items() if k in keep} for item in items], batch_size=batch_size,
                        shuffle=False)
    pred = predict_reports(network.to(device), loader, device)
    thresholds = network.thresholds.float().cpu().numpy()
    reports = {"model": multilabel_report(pred["probs"], labels, thresholds, names)}
    texts = [item["text"] for item in test]
    keyword = KeywordLabeler(findings)
    reports["keyword"] = multilabel_report(keyword.predict_proba(texts), labels, np.full(len(names), 0.5), names)
    tfidf = TfidfLabeler()
    tfidf.fit([item["text"] for item in splits["training"]], np.asarray([i["label"] for i in splits["training"]]))
    val_probs = tfidf.predict_proba([item["text"] for item in splits["validation"]])
    val_thresholds = select_thresholds(val_probs, np.asarray([i["label"] for i in splits["validation"]]))
    reports["tfidf"] = multilabel_report(tfidf.predict_proba(texts), labels, val_thresholds, names)
    tagger = span_metrics(pred["entities"], pred["silver"])
    metrics = {"split": split, "num_reports": len(test), "classifier": reports, "tagger": tagger}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    lines = [f"Reports of the '{split}' split: {len(test)}", "", format_table(reports), "",
             "| tagger (silver spans) | precision | recall | F1 |", "|---|---|---|---|"]
    lines += [f"| {kind} | {tagger[kind]['precision']:.3f} | {tagger[kind]['recall']:.3f} | {tagger[kind]['f1']:.3f} |"
              for kind in ("FINDING", "ANATOMY")]
    negation = tagger["negation_accuracy"]
    lines += ["", f"Negation accuracy on matched finding spans: "
              f"{'n/a' if negation is None else f'{negation:.3f}'} ({tagger['negation_support']} spans)"]
    (out / "metrics.md").write_text("\n".join(lines) + "\n")
    logger.info("report labeler: macro-F1 model %.3f, keyword %.3f, TF-IDF %.3f", reports["model"]["macro_f1"],
                reports["keyword"]["macro_f1"], reports["tfidf"]["macro_f1"])
    return metrics
