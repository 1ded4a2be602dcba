from __future__ import annotations

import math

import pytest
import torch

from common.metrics import (
    RetrievalMetric,
    cross_modal_recall,
    recall_at_k,
    region_alignment_accuracy,
    retrieval_table,
    step_patch_auc,
)

# similarity, positives, ks, expected recalls
RECALL_CASES = [
    [[[0.9, 0.1], [0.8, 0.2]], [[1, 0], [0, 1]], (1, 2), {1: 0.5, 2: 1.0}],
    [[[0.1, 0.5, 0.9]], [[1, 0, 0]], (1, 2, 3), {1: 0.0, 2: 0.0, 3: 1.0}],
    # a tie with the best positive counts in the query's favour; any positive counts
    [[[0.5, 0.5, 0.1]], [[0, 1, 1]], (1,), {1: 1.0}],
]


@pytest.mark.parametrize("similarity, positives, ks, expected", RECALL_CASES)
def test_recall_at_k_by_hand(similarity, positives, ks, expected):
    assert recall_at_k(torch.tensor(similarity), torch.tensor(positives, dtype=torch.bool), ks) == expected


def test_recall_without_positives_is_nan_and_shapes_are_checked():
    assert math.isnan(recall_at_k(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool), (1,))[1])
    with pytest.raises(ValueError, match="share a"):
        recall_at_k(torch.zeros(2, 3), torch.zeros(2, 2, dtype=torch.bool))


def test_cross_modal_recall_both_directions_and_groups():
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])  # cases 1 and 2 swapped
    out = cross_modal_recall(image, text, ks=(1, 3))
    assert out["image_to_text_R@1"] == pytest.approx(1 / 3) and out["text_to_image_R@1"] == pytest.approx(1 / 3)
    assert out["image_to_text_R@3"] == 1.0
    # equal reports make their cases interchangeable
    grouped = cross_modal_recall(image, text, groups=["a", "b", "b"], ks=(1,))
    assert grouped["image_to_text_R@1"] == 1.0 and grouped["text_to_image_R@1"] == 1.0


def test_region_alignment_accuracy_by_hand():
    regions = torch.eye(3).unsqueeze(0)  # (1, 3, 3): region r along axis r
    text = torch.tensor([[[1.0, 0.1, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # region 2's sentence looks like 1
    valid = torch.tensor([[True, True, False]])
    present = torch.tensor([[True, True, True]])
    accuracy, chance, pairs = region_alignment_accuracy(regions, text, valid, present)
    assert (accuracy, pairs) == (0.5, 2) and chance == pytest.approx(1 / 3)
    # an absent region is no candidate: with region 1 absent, the first pair is invalid and region 2 wins
    accuracy, chance, pairs = region_alignment_accuracy(regions, text, valid, torch.tensor([[False, True, True]]))
    assert (accuracy, pairs) == (1.0, 1) and chance == 0.5


def test_retrieval_metric_accumulates_over_cases():
    metric = RetrievalMetric(name=None, ks=(1, 2))
    torch.manual_seed(0)
    emb = torch.randn(4, 8)
    metric.reset()
    for i in range(4):  # one case per update, as batch-size-1 evaluators give them
        metric.update((emb[i:i + 1], emb[i:i + 1], [f"report {i}"], emb[i:i + 1, None].expand(1, 2, 8),
                       emb[i:i + 1, None].expand(1, 2, 8), torch.ones(1, 2, dtype=torch.bool),
                       torch.ones(1, 2, dtype=torch.bool)))
    out = metric.compute()
    assert out["text_to_image_R@1"] == 1.0 and out["image_to_text_R@1"] == 1.0 and out["cases"] == 4
    assert out["chance_R@1"] == 0.25 and out["region_pairs"] == 8
    assert "| text to image | 1.000 | 1.000 |" in retrieval_table(out)
    single = RetrievalMetric(name="text_to_image_R@2", ks=(1, 2))
    single.reset()
    single.update((emb, -emb, [f"r{i}" for i in range(4)], emb[:, None], emb[:, None],
                   torch.ones(4, 1, dtype=torch.bool), torch.ones(4, 1, dtype=torch.bool)))
    assert single.compute() == 0.0  # each text is least like its own volume


# one volume, 5 patches: region 1 covers patches 0 and 1 fully and patch 2 partly (left out), 3 and 4 lie outside
STEP_ASSIGNMENT = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [0.75, 0.25], [1.0, 0.0], [1.0, 0.0]]])


def test_step_patch_auc_by_hand():
    local = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [1.0, 0.0], [0.8, 0.6], [-1.0, 0.0]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # step 0 scores inside (1, 0.6), outside (0.8, -1): 3 of 4 pairs ordered; step 1 scores inside (0, 0.8),
    # outside (0.6, 0): (0 vs 0.6) lost, (0 vs 0) a tie, 0.8 wins both: 2.5 / 4; step 2 names no region
    aucs = step_patch_auc(local, STEP_ASSIGNMENT, text, torch.tensor([0, 0, 0]), torch.tensor([1, 1, 0]))
    assert aucs == pytest.approx([0.75, 0.625])
    # a region covering every scored patch (no outside patch) cannot be scored
    full = torch.tensor([[[0.0, 1.0]] * 5])
    assert step_patch_auc(local, full, text[:1], torch.tensor([0]), torch.tensor([1])) == []
    with pytest.raises(ValueError, match="image_local"):
        step_patch_auc(local, STEP_ASSIGNMENT, text, torch.tensor([0]), torch.tensor([1]))


def test_retrieval_metric_adds_step_patch_auc_when_steps_are_given():
    emb = torch.eye(2)
    case = (emb[:1], emb[:1], ["r"], emb[:1, None], emb[:1, None], torch.ones(1, 1, dtype=torch.bool),
            torch.ones(1, 1, dtype=torch.bool))
    metric = RetrievalMetric(name=None, ks=(1,))
    metric.reset()
    metric.update(case)
    assert "step_patch_auc" not in metric.compute()
    local = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    metric.reset()
    for _ in range(2):
        metric.update(case + (local, STEP_ASSIGNMENT, torch.tensor([[1.0, 0.0]]), torch.tensor([0]),
                              torch.tensor([1])))
    out = metric.compute()
    assert out["step_patch_auc"] == 1.0 and out["step_patch_steps"] == 2
    assert "| 1.000 | 0.500 | 2 |" in retrieval_table(out)
