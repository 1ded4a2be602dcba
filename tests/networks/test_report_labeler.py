"""ReportLabeler: tag conversion, what the weights file holds, trainable layers, shapes."""

from __future__ import annotations

import pytest
import torch

from common.networks import ENTITY_TAGS, ReportLabeler, decode_entities, spans_to_tags

TEXT = "No pleural effusion. The heart is enlarged."
ENTITIES = [{"start": 3, "end": 19, "type": "FINDING", "negated": True},
            {"start": 25, "end": 30, "type": "ANATOMY", "negated": False},
            {"start": 34, "end": 42, "type": "FINDING", "negated": False}]


@pytest.fixture(scope="module")
def labeler():
    torch.manual_seed(0)
    return ReportLabeler(num_classes=3)


def test_tags_round_trip_to_the_same_spans(labeler):
    encoded = labeler.tokenizer(TEXT, return_offsets_mapping=True)
    tags = spans_to_tags(encoded["offset_mapping"], ENTITIES)
    names = [ENTITY_TAGS[t] for t in tags]
    assert names[:5] == ["O", "O", "B-NEG_FINDING", "I-NEG_FINDING", "I-NEG_FINDING"]
    assert names.count("B-ANATOMY") == 1 and names.count("B-FINDING") == 1
    assert decode_entities(tags, encoded["offset_mapping"]) == ENTITIES
    assert [TEXT[e["start"]:e["end"]] for e in ENTITIES] == ["pleural effusion", "heart", "enlarged"]


def test_decode_starts_an_entity_at_a_stray_inside_tag():
    offsets = [(0, 0), (0, 4), (5, 9), (0, 0)]
    tags = [0, ENTITY_TAGS.index("I-ANATOMY"), ENTITY_TAGS.index("I-ANATOMY"), 0]
    assert decode_entities(tags, offsets) == [{"start": 0, "end": 9, "type": "ANATOMY", "negated": False}]


def test_weights_leave_out_the_frozen_embeddings_and_load_strictly_in_half_precision(labeler):
    state = labeler.state_dict()
    assert not any(k.startswith("encoder.backbone.embeddings.") for k in state)
    assert "thresholds" in state
    other = ReportLabeler(num_classes=3)
    other.load_state_dict({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    head = dict(other.named_parameters())["head.4.weight"]
    assert torch.allclose(head, labeler.head[4].weight.half().float())
    # the embeddings come from the installed encoder package, identical in both
    assert torch.equal(other.encoder.backbone.embeddings.word_embeddings.weight,
                       labeler.encoder.backbone.embeddings.word_embeddings.weight)


def test_trainable_layers_follow_the_stage_and_embeddings_never_train(labeler):
    def trainable_layers():
        return [all(p.requires_grad for p in layer.parameters()) for layer in labeler.encoder.layers]

    labeler.set_trainable_layers(0)
    assert trainable_layers() == [False] * 6 and labeler.head[1].weight.requires_grad
    labeler.set_trainable_layers(2)
    assert trainable_layers() == [False] * 4 + [True] * 2
    labeler.set_trainable_layers(None)
    assert trainable_layers() == [True] * 6
    assert not any(p.requires_grad for p in labeler.encoder.backbone.embeddings.parameters())


def test_forward_shapes_and_tag_likelihood(labeler):
    batch = labeler.tokenizer([TEXT, "Normal chest."], padding=True, return_offsets_mapping=True,
                              return_tensors="pt")
    tags = torch.tensor([spans_to_tags(o, ENTITIES if i == 0 else []) for i, o in
                         enumerate(batch["offset_mapping"].tolist())])
    labeler.eval()
    out = labeler(batch["input_ids"], batch["attention_mask"], tags=tags)
    length = batch["input_ids"].shape[1]
    assert out["logits"].shape == (2, 3) and out["emissions"].shape == (2, length, len(ENTITY_TAGS))
    assert out["tag_nll"].ndim == 0 and out["tag_nll"] > 0
    decoded = labeler.decode_tags(out["emissions"], batch["attention_mask"])
    assert [len(d) for d in decoded] == batch["attention_mask"].sum(1).tolist()


def test_bad_class_count_is_refused():
    with pytest.raises(ValueError, match="num_classes should be a positive integer"):
        ReportLabeler(num_classes=0)
