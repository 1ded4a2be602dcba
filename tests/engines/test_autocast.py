"""AutocastInferer: bf16 on CPU tensors when enabled, untouched fp32 otherwise, float32 out either way."""

from __future__ import annotations

import pytest
import torch

from common.engines import AutocastInferer


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> dict:
        y = self.conv(x)
        self.seen.append(y.dtype)
        return {"pred": y * scale, "mask": x > 0}


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))


def test_bf16_inside_float32_outside(image):
    net = _Net()
    reference = net(image)["pred"]
    out = AutocastInferer()(image, net, scale=2.0)
    assert net.seen[-1] == torch.bfloat16  # the convolution really ran in bf16
    assert out["pred"].dtype == torch.float32 and out["mask"].dtype == torch.bool
    torch.testing.assert_close(out["pred"], 2.0 * reference, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("enabled", [False, "false", "0"])
def test_disabled_is_plain_fp32(image, enabled):
    net = _Net()
    out = AutocastInferer(enabled=enabled)(image, net)
    assert net.seen == [torch.float32]
    torch.testing.assert_close(out["pred"], net.conv(image), atol=0, rtol=0)


def test_gradients_reach_float32_weights(image):
    net = _Net()
    AutocastInferer()(image, net)["pred"].square().mean().backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.dtype == torch.float32


def test_bad_flag_is_refused():
    with pytest.raises(ValueError, match="enabled"):
        AutocastInferer(enabled="maybe")
