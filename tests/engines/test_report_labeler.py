"""Report labeler training pieces: tokens and tags, batches, the optimizer's layer-wise groups, progressive stages,
thresholds and span scores."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from common.engines import (
    ProgressiveFineTuning,
    ReportLabelerLoss,
    TokenizeReportd,
    layerwise_param_groups,
    prepare_report_batch,
    span_metrics,
)
from common.networks import ENTITY_TAGS, ReportLabeler


@pytest.fixture(scope="module")
def labeler():
    torch.manual_seed(0)
    return ReportLabeler(num_classes=2, max_length=32)


def _item(text, entities=()):
    return {"text": text, "label": [1, 0], "entities": list(entities)}


def test_tokenize_pads_to_max_length_and_batches_trim_to_the_longest_report(labeler):
    tokenize = TokenizeReportd(labeler.tokenizer, max_length=32)
    effusion = {"start": 11, "end": 27, "type": "FINDING", "negated": False}
    items = [tokenize(_item("Small left pleural effusion.", [effusion])), tokenize(_item("Normal."))]
    assert items[0]["input_ids"].shape == (32,) and items[0]["offsets"].shape == (32, 2)
    assert ENTITY_TAGS[int(items[0]["tags"][3])] == "B-FINDING"
    batch = {k: torch.stack([i[k] for i in items]) for k in ("input_ids", "attention_mask", "tags", "offsets")}
    batch["label"] = torch.stack([i["label"] for i in items])
    ids, targets, (mask,), kwargs = prepare_report_batch(batch)
    longest = int(items[0]["attention_mask"].sum())
    assert ids.shape == mask.shape == kwargs["tags"].shape == (2, longest)
    assert targets["label"].dtype == torch.float32
    loss = ReportLabelerLoss(tag_weight=0.5)
    out = labeler(ids, mask, **kwargs)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"], targets["label"])
    assert torch.allclose(loss(out, targets), bce + 0.5 * out["tag_nll"])


def test_layerwise_learning_rates_decay_from_the_top_layer(labeler):
    groups = layerwise_param_groups(labeler, lr=1e-3, encoder_lr=1e-4, layer_decay=0.5)
    assert groups[0]["lr"] == 1e-3
    assert [g["lr"] for g in groups[1:]] == pytest.approx([1e-4 * 0.5 ** k for k in range(5, -1, -1)])
    in_groups = {id(p) for g in groups for p in g["params"]}
    # left out: the frozen embeddings and the pooler, which mean pooling does not use
    fixed = {id(p) for p in labeler.encoder.backbone.embeddings.parameters()}
    fixed |= {id(p) for p in labeler.encoder.backbone.pooler.parameters()}
    assert not in_groups & fixed
    assert in_groups | fixed == {id(p) for p in labeler.parameters()}


def test_progressive_fine_tuning_follows_the_stages(labeler):
    stages = ProgressiveFineTuning(labeler, [[1, 0], [3, 2], [5, None]])
    engine = Engine(lambda e, b: None)
    stages.attach(engine)
    seen = []

    @engine.on(Events.EPOCH_STARTED)
    def record(e):
        seen.append(sum(all(p.requires_grad for p in layer.parameters()) for layer in labeler.encoder.layers))

    engine.run([0], max_epochs=6)
    assert seen == [0, 0, 2, 2, 6, 6]
    with pytest.raises(ValueError, match="start at epoch 1"):
        ProgressiveFineTuning(labeler, [[2, 0]])


def test_span_scores_against_silver_spans():
    silver = [[{"start": 0, "end": 5, "type": "FINDING", "negated": True},
               {"start": 10, "end": 15, "type": "ANATOMY", "negated": False}],
              [{"start": 0, "end": 8, "type": "FINDING", "negated": False}]]
    predicted = [[{"start": 0, "end": 5, "type": "FINDING", "negated": False},
                  {"start": 10, "end": 15, "type": "ANATOMY", "negated": False}],
                 [{"start": 0, "end": 8, "type": "FINDING", "negated": False},
                  {"start": 9, "end": 12, "type": "FINDING", "negated": False}]]
    scores = span_metrics(predicted, silver)
    assert scores["FINDING"]["precision"] == pytest.approx(2 / 3) and scores["FINDING"]["recall"] == 1.0
    assert scores["ANATOMY"]["f1"] == 1.0
    assert scores["negation_accuracy"] == 0.5 and scores["negation_support"] == 2
