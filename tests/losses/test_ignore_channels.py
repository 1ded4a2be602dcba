from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss, DiceLoss

from common.losses import IgnoreChannelsLoss

# [shape (B, K, *S), ignored (b, k) channels, ignore_value]
TEST_CASES = [
    [(2, 3, 6, 5, 4), [(0, 2), (1, 1), (1, 2)], -1.0],
    [(1, 4, 8, 8), [(0, 0), (0, 3)], -1.0],
    [(3, 2, 4, 4, 4), [], -1.0],
    [(2, 2, 5, 5, 5), [(1, 0)], 255.0],
]

ILL_SHAPES = [
    [(1, 2, 4, 4, 4), (1, 3, 4, 4, 4)],
    [(1, 2, 4, 4, 4), (1, 2, 4, 4, 2)],
    [(2, 2, 4, 4), (1, 2, 4, 4)],
]


def _inputs(shape, ignored, ignore_value):
    torch.manual_seed(0)
    logits = torch.randn(*shape, dtype=torch.float64)
    target = (torch.rand(*shape) > 0.5).double()
    for b, k in ignored:
        target[b, k] = ignore_value
    return logits, target


@pytest.mark.parametrize("shape, ignored, ignore_value", TEST_CASES)
def test_equals_wrapped_loss_on_kept_channels(shape, ignored, ignore_value):
    logits, target = _inputs(shape, ignored, ignore_value)
    wrapped = DiceCELoss(sigmoid=True)
    loss = IgnoreChannelsLoss(wrapped, ignore_value=ignore_value)(logits, target)
    kept = [(b, k) for b in range(shape[0]) for k in range(shape[1]) if (b, k) not in ignored]
    expected = wrapped(
        torch.stack([logits[b, k] for b, k in kept]).unsqueeze(1),
        torch.stack([target[b, k] for b, k in kept]).unsqueeze(1),
    )
    assert loss.ndim == 0
    torch.testing.assert_close(loss, expected)


def test_each_kept_channel_is_its_own_sample():
    # a sigmoid Dice over channels as samples: the mean of per-channel Dice losses, not one pooled Dice
    logits, target = _inputs((1, 3, 6, 6, 6), [(0, 1)], -1.0)
    loss = IgnoreChannelsLoss(DiceLoss(sigmoid=True))(logits, target)
    per_channel = [DiceLoss(sigmoid=True)(logits[:, k: k + 1], target[:, k: k + 1]) for k in (0, 2)]
    torch.testing.assert_close(loss, sum(per_channel) / 2)


def test_ignored_channels_get_no_gradient():
    logits, target = _inputs((2, 3, 4, 4, 4), [(0, 2), (1, 0)], -1.0)
    logits.requires_grad_(True)
    IgnoreChannelsLoss(DiceCELoss(sigmoid=True))(logits, target).backward()
    assert torch.count_nonzero(logits.grad[0, 2]) == 0 and torch.count_nonzero(logits.grad[1, 0]) == 0
    assert torch.count_nonzero(logits.grad[0, 0]) > 0 and torch.count_nonzero(logits.grad[1, 2]) > 0


def test_integer_target_is_cast():
    logits, target = _inputs((1, 2, 4, 4, 4), [(0, 1)], -1.0)
    loss = IgnoreChannelsLoss(DiceCELoss(sigmoid=True))(logits, target.long())
    torch.testing.assert_close(loss, IgnoreChannelsLoss(DiceCELoss(sigmoid=True))(logits, target))


def test_all_ignored_raises():
    logits = torch.randn(2, 2, 4, 4, 4)
    with pytest.raises(ValueError, match="ignored"):
        IgnoreChannelsLoss(DiceCELoss(sigmoid=True))(logits, torch.full_like(logits, -1.0))


@pytest.mark.parametrize("input_shape, target_shape", ILL_SHAPES)
def test_shape_mismatch_raises(input_shape, target_shape):
    with pytest.raises(ValueError, match="same shape"):
        IgnoreChannelsLoss(DiceCELoss(sigmoid=True))(torch.randn(*input_shape), torch.zeros(*target_shape))
