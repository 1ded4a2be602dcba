from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.losses.prototype_contrastive import PrototypeContrastiveLoss

# [loss kwargs, vectors shape, prototypes shape, concept_present shape]
ILL_CASES = [
    [{"temperature": 0.0}, (1, 2, 4), (4, 4), (1, 2)],
    [{"temperature": -1.0}, (1, 2, 4), (4, 4), (1, 2)],
    [{}, (2, 4), (4, 4), (1, 2)],  # vectors without a concept axis
    [{}, (1, 2, 4), (4, 3), (1, 2)],  # prototype dimension 3 != 4
    [{}, (1, 2, 4), (5, 4), (1, 2)],  # 5 prototypes do not split over 2 concepts
    [{}, (1, 2, 4), (4, 4), (2, 2)],  # concept_present batch 2 != 1
    [{"reduction": "max"}, (1, 2, 4), (4, 4), (1, 2)],
]


def _reference(vectors, prototypes, present, tau):
    """Loop over (b, k) pairs, straight from the formula."""
    k_, m = vectors.shape[1], prototypes.shape[0] // vectors.shape[1]
    p = F.normalize(prototypes, dim=-1)
    losses = []
    for b in range(vectors.shape[0]):
        for k in range(k_):
            if present[b, k] > 0.5:
                logits = F.normalize(vectors[b, k], dim=0) @ p.T / tau
                losses.append(-torch.log(logits[k * m:(k + 1) * m].exp().sum() / logits.exp().sum()))
    return torch.stack(losses).mean()


def test_worked_example_one_prototype_per_concept():
    # K=2, M=1, D=2, tau=0.1; prototypes along x (concept 0) and y (concept 1)
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    vectors = torch.tensor(
        [
            [[3.0, 0.0], [1.0, 1.0]],  # image 0: both concepts present
            [[0.0, 1.0], [5.0, -5.0]],  # image 1: only concept 0 present; concept 1 is ignored
        ]
    )
    present = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # (0, 0): v = x, logits (10, 0)            -> -log(e^10 / (e^10 + e^0))
    # (0, 1): v = (x + y) / sqrt 2, logits (c, c) with c = 10 / sqrt 2 -> -log(1 / 2)
    # (1, 0): v = y, logits (0, 10), positive is prototype 0 -> -log(e^0 / (e^0 + e^10))
    expected = (
        -math.log(math.exp(10) / (math.exp(10) + 1.0)) + math.log(2.0) - math.log(1.0 / (1.0 + math.exp(10)))
    ) / 3
    loss = PrototypeContrastiveLoss(temperature=0.1)(vectors, prototypes, present)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_worked_example_two_prototypes_per_concept():
    # K=2, M=2, D=2, tau=0.1; concept 0 owns +x and +y, concept 1 owns -x and -y
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    vectors = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    present = torch.ones(1, 2)
    # both pairs see logits (10, 0, -10, 0)
    denominator = math.exp(10) + 1.0 + math.exp(-10) + 1.0
    expected = (-math.log((math.exp(10) + 1.0) / denominator) - math.log((math.exp(-10) + 1.0) / denominator)) / 2
    loss = PrototypeContrastiveLoss(temperature=0.1)(vectors, prototypes, present)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_per_prototype_form_by_hand():
    # the two-prototype example above: concept 0's pair has logits +x: 10, +y: 0 against -x: -10, -y: 0, so its
    # terms are -log(e^10 / (e^10 + e^-10 + 1)) and -log(1 / (1 + e^-10 + 1)); concept 1's are the mirror image
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    vectors = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    neg0 = math.exp(-10) + 1.0  # concept 0's negatives: -x and -y
    neg1 = math.exp(10) + 1.0  # concept 1's negatives: +x and +y
    pair0 = (-math.log(math.exp(10) / (math.exp(10) + neg0)) - math.log(1.0 / (1.0 + neg0))) / 2
    pair1 = (-math.log(math.exp(-10) / (math.exp(-10) + neg1)) - math.log(1.0 / (1.0 + neg1))) / 2
    loss = PrototypeContrastiveLoss(temperature=0.1, form="per_prototype", reduction="none")(
        vectors, prototypes, torch.ones(1, 2))
    assert loss[0].tolist() == pytest.approx([pair0, pair1], rel=1e-6)
    # every positive must match: the multi-positive form is content with +x alone (loss ~1e-4 for concept 0)
    multi = PrototypeContrastiveLoss(temperature=0.1, reduction="none")(vectors, prototypes, torch.ones(1, 2))
    assert multi[0, 0] < 1e-3 < loss[0, 0]
    with pytest.raises(ValueError, match="per_anchor"):
        PrototypeContrastiveLoss(form="per_anchor")


@pytest.mark.parametrize("tau", [0.05, 0.1, 1.0])
def test_matches_pairwise_formula(tau):
    torch.manual_seed(0)
    vectors, prototypes = torch.randn(3, 4, 8, dtype=torch.float64), torch.randn(12, 8, dtype=torch.float64)
    present = (torch.rand(3, 4) > 0.4).double()
    present[0, 0] = 1.0
    loss = PrototypeContrastiveLoss(temperature=tau)(vectors, prototypes, present)
    torch.testing.assert_close(loss, _reference(vectors, prototypes, present, tau))


def test_no_present_concept_gives_zero_with_graph():
    vectors = torch.randn(2, 3, 4, requires_grad=True)
    prototypes = torch.randn(6, 4, requires_grad=True)
    loss = PrototypeContrastiveLoss()(vectors, prototypes, torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(vectors.grad, torch.zeros_like(vectors))
    assert torch.equal(prototypes.grad, torch.zeros_like(prototypes))


def test_gradient_reaches_vectors_and_prototypes_of_present_pairs_only():
    torch.manual_seed(1)
    vectors = torch.randn(2, 3, 4, requires_grad=True)
    prototypes = torch.randn(6, 4, requires_grad=True)
    present = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    PrototypeContrastiveLoss()(vectors, prototypes, present).backward()
    grad_norm = vectors.grad.norm(dim=-1)
    assert (grad_norm[present > 0] > 0).all()
    assert (grad_norm[present == 0] == 0).all()
    assert (prototypes.grad.norm(dim=-1) > 0).all()  # every prototype is in every denominator


def test_temperature_sharpens():
    # concept 0's vector at 60 degrees from its prototype, 30 degrees from the other concept's
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vectors = torch.tensor([[[0.5, math.sqrt(3) / 2], [0.0, 1.0]]])
    present = torch.tensor([[1.0, 0.0]])
    for tau in (1.0, 0.1):
        a, b = 0.5 / tau, (math.sqrt(3) / 2) / tau
        expected = -math.log(math.exp(a) / (math.exp(a) + math.exp(b)))
        loss = PrototypeContrastiveLoss(temperature=tau)(vectors, prototypes, present)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    # a wrong nearest prototype costs more at a lower temperature, a right one less
    hard, soft = PrototypeContrastiveLoss(temperature=0.1), PrototypeContrastiveLoss(temperature=1.0)
    assert hard(vectors, prototypes, present) > soft(vectors, prototypes, present)
    right = torch.tensor([[[math.sqrt(3) / 2, 0.5], [0.0, 1.0]]])
    assert hard(right, prototypes, present) < soft(right, prototypes, present)


def test_reductions():
    torch.manual_seed(2)
    vectors, prototypes = torch.randn(2, 3, 4), torch.randn(9, 4)
    present = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    pairs = PrototypeContrastiveLoss(reduction="none")(vectors, prototypes, present)
    assert pairs.shape == (2, 3)
    assert (pairs[present == 0] == 0).all() and (pairs[present > 0] > 0).all()
    torch.testing.assert_close(PrototypeContrastiveLoss(reduction="sum")(vectors, prototypes, present), pairs.sum())
    torch.testing.assert_close(PrototypeContrastiveLoss()(vectors, prototypes, present), pairs.sum() / 4)


@pytest.mark.parametrize("kwargs, v_shape, p_shape, present_shape", ILL_CASES)
def test_ill_arguments(kwargs, v_shape, p_shape, present_shape):
    with pytest.raises(ValueError):
        PrototypeContrastiveLoss(**kwargs)(torch.randn(*v_shape), torch.randn(*p_shape), torch.ones(*present_shape))
