from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from common.losses.contrastive import MultiLevelContrastiveLoss, SymmetricInfoNCE

ILL_CASES = [
    {"temperature": 0.0},
    {"temperature": 0.005},  # below the 0.01 floor
    {"temperature": 2.0},  # above the ceiling of 1
    {"temperature": 0.1, "min_temperature": 0.0},
]


def _log1p_exp(x: float) -> float:
    return math.log(1.0 + math.exp(x))


def test_info_nce_identity_by_hand():
    # logits [[1, 0], [0, 1]] at tau = 1: every row and column gives -log(e / (e + 1)) = log(1 + e^-1)
    loss = SymmetricInfoNCE(temperature=1.0, learnable=False)
    torch.testing.assert_close(loss(torch.eye(2), torch.eye(2)), torch.tensor(_log1p_exp(-1.0)))
    assert abs(_log1p_exp(-1.0) - 0.3133) < 1e-4


def test_info_nce_worked_example():
    # image rows (1, 0) and (3, 4) (normalised to (0.6, 0.8)), text rows e1 and 2 * e2; tau = 0.5 ->
    # logits [[2, 0], [1.2, 1.6]]
    image = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    image_to_text = 0.5 * (_log1p_exp(0.0 - 2.0) + _log1p_exp(1.2 - 1.6))  # rows: targets 2 and 1.6
    text_to_image = 0.5 * (_log1p_exp(1.2 - 2.0) + _log1p_exp(0.0 - 1.6))  # columns [2, 1.2] and [0, 1.6]
    expected = 0.5 * (image_to_text + text_to_image)
    loss = SymmetricInfoNCE(temperature=0.5, learnable=False)
    torch.testing.assert_close(loss(image, text), torch.tensor(expected))
    assert abs(expected - 0.29874) < 1e-5


def test_valid_drops_pairs():
    torch.manual_seed(0)
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    loss = SymmetricInfoNCE(temperature=0.2, learnable=False)
    valid = torch.tensor([True, False, True, True])
    torch.testing.assert_close(loss(image, text, valid=valid), loss(image[valid], text[valid]))
    none = loss(image.requires_grad_(True), text, valid=torch.zeros(4, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()
    assert image.grad is not None  # the zero stays in the graph


def test_positives_any_match_counts():
    # two texts both match image 0: image 0's term is -log(p_0 + p_1)
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    positives = torch.tensor([[True, True, False], [False, False, True]])
    loss = SymmetricInfoNCE(temperature=1.0, learnable=False)
    logits = F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    rows = [torch.logsumexp(logits[0], 0) - torch.logsumexp(logits[0, :2], 0),
            torch.logsumexp(logits[1], 0) - logits[1, 2]]
    cols = [torch.logsumexp(logits[:, j], 0) - logits[i, j] for j, i in [(0, 0), (1, 0), (2, 1)]]
    expected = 0.5 * (torch.stack(rows).mean() + torch.stack(cols).mean())
    torch.testing.assert_close(loss(image, text, positives=positives), expected)


def test_learnable_temperature_gets_gradient_and_is_clamped():
    torch.manual_seed(0)
    loss = SymmetricInfoNCE(temperature=0.07)
    assert isinstance(loss.log_temperature, torch.nn.Parameter)
    loss(torch.randn(4, 8), torch.randn(4, 8)).backward()
    assert loss.log_temperature.grad is not None and loss.log_temperature.grad != 0
    with torch.no_grad():
        loss.log_temperature.fill_(math.log(1e-4))
    torch.testing.assert_close(loss.temperature, torch.tensor(0.01))
    fixed = SymmetricInfoNCE(learnable=False)
    assert not any(True for _ in fixed.parameters())
    torch.testing.assert_close(fixed.temperature, torch.tensor(0.07))


@pytest.mark.parametrize("kwargs", ILL_CASES)
def test_ill_temperatures(kwargs):
    with pytest.raises(ValueError):
        SymmetricInfoNCE(**kwargs)


def test_bad_shapes():
    loss = SymmetricInfoNCE()
    with pytest.raises(ValueError, match="as many rows"):
        loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="valid should be None"):
        loss(torch.randn(2, 4), torch.randn(2, 4), valid=torch.ones(2), positives=torch.eye(2))
    with pytest.raises(ValueError, match="weights should be"):
        MultiLevelContrastiveLoss(weights=(1.0, -1.0, 1.0))


# hand-made batch: B = 2 volumes, R = 3 regions, D = 4
IMAGE_REGIONS = torch.tensor([
    [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]],
    [[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],  # region 3 absent in volume 1
])
REGION_PRESENT = torch.tensor([[True, True, True], [True, True, False]])


def _plain(temperature: float = 1.0) -> SymmetricInfoNCE:
    return SymmetricInfoNCE(temperature, learnable=False)


def test_region_level_pairs_mentioned_present_regions():
    torch.manual_seed(0)
    region_text = torch.randn(2, 3, 4)
    mentioned = torch.tensor([[True, False, True], [False, True, True]])  # (1, 3) is mentioned but absent
    loss = MultiLevelContrastiveLoss(weights=(0.0, 1.0, 0.0), temperature=1.0, learnable=False)
    got = loss.levels(torch.zeros(2, 4), torch.zeros(2, 4), IMAGE_REGIONS, region_text, mentioned, REGION_PRESENT)
    # pairs in row-major order: (0, r1), (0, r3), (1, r2); every other pair of the batch is a negative
    image = torch.stack([IMAGE_REGIONS[0, 0], IMAGE_REGIONS[0, 2], IMAGE_REGIONS[1, 1]])
    text = torch.stack([region_text[0, 0], region_text[0, 2], region_text[1, 1]])
    torch.testing.assert_close(got["region"], _plain()(image, text))
    assert "global" not in got and "step" not in got
    torch.testing.assert_close(got["total"], got["region"])


def test_step_level_pairs_steps_with_their_region():
    # 5 steps: two on (0, r1), one on (0, r2), one with no region (dropped), one on the absent (1, r3) (dropped)
    step_text = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.2, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0],
                              [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 1.0, 0.0]])
    step_batch = torch.tensor([0, 0, 0, 1, 1])
    step_region = torch.tensor([1, 1, 2, 0, 3])
    loss = MultiLevelContrastiveLoss(weights=(0.0, 0.0, 1.0), temperature=1.0, learnable=False)
    got = loss.levels(torch.zeros(2, 4), torch.zeros(2, 4), IMAGE_REGIONS, step_text=step_text,
                      step_batch=step_batch, step_region=step_region, region_present=REGION_PRESENT)["step"]
    # targets: region features (0, r1) and (0, r2); steps 0 and 1 match target 0, step 2 matches target 1
    image = torch.stack([IMAGE_REGIONS[0, 0], IMAGE_REGIONS[0, 1]])
    positives = torch.tensor([[True, True, False], [False, False, True]])
    torch.testing.assert_close(got, _plain()(image, step_text[:3], positives=positives))
    # by hand: step->region is a 2-way cross-entropy per step; region->step counts either of its steps
    logits = F.normalize(image, dim=-1) @ F.normalize(step_text[:3], dim=-1).T
    t2i = torch.stack([torch.logsumexp(logits[:, s], 0) - logits[t, s] for s, t in [(0, 0), (1, 0), (2, 1)]]).mean()
    i2t = torch.stack([torch.logsumexp(logits[0], 0) - torch.logsumexp(logits[0, :2], 0),
                       torch.logsumexp(logits[1], 0) - logits[1, 2]]).mean()
    torch.testing.assert_close(got, 0.5 * (t2i + i2t))


def test_three_levels_weighted_total_and_alignment():
    torch.manual_seed(0)
    b, r, d = 4, 3, 8
    image_global, image_regions = torch.randn(b, d), torch.randn(b, r, d)
    mentioned = torch.rand(b, r) > 0.3
    step_batch = torch.tensor([0, 0, 1, 2, 3, 3])
    step_region = torch.tensor([1, 2, 3, 1, 2, 2])
    step_text = image_regions[step_batch, step_region - 1]
    loss = MultiLevelContrastiveLoss(weights=(1.0, 0.5, 0.25), temperature=0.1, learnable=False)
    aligned = loss.levels(image_global, image_global, image_regions, image_regions, mentioned,
                          step_text=step_text, step_batch=step_batch, step_region=step_region)
    expected = aligned["global"] + 0.5 * aligned["region"] + 0.25 * aligned["step"]
    torch.testing.assert_close(aligned["total"], expected)
    torch.testing.assert_close(loss(image_global, image_global, image_regions, image_regions, mentioned,
                                    step_text=step_text, step_batch=step_batch, step_region=step_region), expected)
    shuffled = loss.levels(image_global, image_global.roll(1, 0), image_regions, image_regions.roll(1, 0), mentioned,
                           step_text=step_text.roll(1, 0), step_batch=step_batch, step_region=step_region)
    for level in ("global", "region", "step"):
        assert aligned[level] < shuffled[level], level


def test_learnable_level_temperatures_get_gradients():
    torch.manual_seed(0)
    loss = MultiLevelContrastiveLoss()
    image_regions = torch.randn(2, 3, 4)
    total = loss(torch.randn(2, 4), torch.randn(2, 4), image_regions, torch.randn(2, 3, 4), torch.ones(2, 3),
                 step_text=torch.randn(3, 4), step_batch=torch.tensor([0, 1, 1]), step_region=torch.tensor([1, 2, 3]))
    total.backward()
    assert all(p.grad is not None and p.grad != 0 for p in loss.parameters())
    assert len(list(loss.parameters())) == 3


def test_bad_step_inputs():
    loss = MultiLevelContrastiveLoss()
    with pytest.raises(ValueError, match="step_region in"):
        loss(torch.randn(2, 4), torch.randn(2, 4), IMAGE_REGIONS, step_text=torch.randn(1, 4),
             step_batch=torch.tensor([0]), step_region=torch.tensor([4]))
    with pytest.raises(ValueError, match="image_regions should"):
        loss(torch.randn(2, 4), torch.randn(2, 4), None, step_text=torch.randn(1, 4),
             step_batch=torch.tensor([0]), step_region=torch.tensor([1]))


def test_step_patch_level_is_the_step_level_on_the_regions_patch_embeddings():
    torch.manual_seed(0)
    region_local = torch.randn(2, 3, 4)
    step_text, step_batch, step_region = torch.randn(4, 4), torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2, 2, 0])
    both = MultiLevelContrastiveLoss(weights=(0.0, 0.0, 1.0), temperature=1.0, learnable=False,
                                     patch_weights=(1.0, 0.0))
    got = both.levels(torch.zeros(2, 4), torch.zeros(2, 4), IMAGE_REGIONS, step_text=step_text,
                      step_batch=step_batch, step_region=step_region, region_present=REGION_PRESENT,
                      image_region_local=region_local)
    plain = MultiLevelContrastiveLoss(weights=(0.0, 0.0, 1.0), temperature=1.0, learnable=False)
    expected = plain.levels(torch.zeros(2, 4), torch.zeros(2, 4), region_local, step_text=step_text,
                            step_batch=step_batch, step_region=step_region, region_present=REGION_PRESENT)["step"]
    torch.testing.assert_close(got["step_patch"], expected)
    assert not torch.allclose(got["step"], got["step_patch"])
    torch.testing.assert_close(got["total"], got["step"] + got["step_patch"])


def test_anchor_level_is_minus_log_of_the_steps_attention_on_its_region():
    # one volume, 3 patches, 2 regions: patch 0 all region 1, patch 1 half region 1 half region 2, patch 2 background
    local = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
    assignment = torch.tensor([[[0.0, 1.0, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]]])
    step_text = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    step_batch, step_region = torch.tensor([0, 0, 0]), torch.tensor([1, 2, 0])  # the third step names no region
    loss = MultiLevelContrastiveLoss(weights=(0.0, 0.0, 0.0), temperature=0.5, learnable=False,
                                     patch_weights=(0.0, 1.0))
    got = loss.levels(torch.zeros(1, 2), torch.zeros(1, 2), step_text=step_text, step_batch=step_batch,
                      step_region=step_region, image_local=local, assignment=assignment)
    # by hand, tau 0.5: step 0 scores (1, 0, -1) / 0.5, region 1 holds patch 0 and half of patch 1;
    # step 1 scores (0, 1, 0) / 0.5, region 2 holds half of patch 1
    a0 = torch.softmax(torch.tensor([2.0, 0.0, -2.0]), 0)
    a1 = torch.softmax(torch.tensor([0.0, 2.0, 0.0]), 0)
    expected = -(torch.log(a0[0] + 0.5 * a0[1]) + torch.log(0.5 * a1[1])) / 2
    torch.testing.assert_close(got["step_anchor"], expected)
    assert set(got) == {"step_anchor", "total"}
    # attention on the region lowers the loss: the same steps pointed at the wrong regions cost more
    wrong = loss.levels(torch.zeros(1, 2), torch.zeros(1, 2), step_text=step_text, step_batch=step_batch,
                        step_region=torch.tensor([2, 1, 0]), image_local=local, assignment=assignment)
    assert wrong["step_anchor"] > got["step_anchor"] + 0.5


def test_patch_levels_off_by_default_leave_the_state_dict_unchanged():
    assert set(MultiLevelContrastiveLoss().state_dict()) == {
        "global_loss.log_temperature", "region_loss.log_temperature", "step_loss.log_temperature"}
    on = MultiLevelContrastiveLoss(weights=(0.0, 0.0, 0.0), patch_weights=(0.0, 0.5))
    assert "step_patch_loss.log_temperature" in on.state_dict()
    with pytest.raises(ValueError, match="patch_weights should be 2 non-negative"):
        MultiLevelContrastiveLoss(patch_weights=(1.0, -1.0))
    with pytest.raises(ValueError, match="image_local and assignment"):
        on.levels(torch.zeros(1, 2), torch.zeros(1, 2), step_text=torch.randn(1, 2), step_batch=torch.tensor([0]),
                  step_region=torch.tensor([1]), image_local=torch.randn(1, 3, 2), assignment=torch.rand(1, 4, 3))
