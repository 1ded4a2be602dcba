from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.networks import IRISNet, iris_full, iris_small, masked_average_pool, pixel_shuffle, pixel_unshuffle

# [factory kwargs, (B, R, K), spatial size, expected output shape]
TEST_CASES = [
    [{}, (1, 1, 1), (16, 16, 16), (1, 1, 16, 16, 16)],
    [{}, (2, 3, 2), (16, 16, 16), (2, 2, 16, 16, 16)],
    [{}, (1, 2, 3), (32, 16, 24), (1, 3, 32, 16, 24)],
    [{"in_channels": 2}, (2, 1, 2), (16, 24, 16), (2, 2, 16, 24, 16)],
    [{"spatial_dims": 2}, (2, 2, 3), (32, 16), (2, 3, 32, 16)],
    [{"channels": (8, 16, 32), "decoder_depth": 1}, (1, 2, 2), (12, 8, 16), (1, 2, 12, 8, 16)],
]

IMAGE, REF = (1, 1, 16, 16, 16), (1, 1, 1, 16, 16, 16)
# [factory kwargs, image shape, reference image shape, reference mask shape, the error message's start]
ILL_CASES = [
    [{}, (1, 2, 16, 16, 16), (1, 1, 2, 16, 16, 16), REF, "^image should have shape"],  # 2 channels, in_channels=1
    [{}, IMAGE, (1, 1, 2, 16, 16, 16), REF, "^ref_image should have shape"],  # references with 2 channels
    [{}, (1, 1, 20, 16, 16), REF, REF, "^image spatial sizes should be divisible by 8"],  # 20
    [{}, IMAGE, (1, 1, 1, 16, 12, 16), (1, 1, 1, 16, 12, 16), "^ref_image spatial sizes should be divisible by 8"],
    [{}, (1, 1, 16, 16), REF, REF, "^image should have shape .* with 3 spatial dims"],  # 2D query, 3D network
    [{}, IMAGE, REF, (1, 1, 1, 16, 16, 8), "ref_mask .* should share batch, reference and spatial sizes"],
    [{"spatial_dims": 4}, IMAGE, REF, REF, "spatial_dims should be 2 or 3"],
    [{"num_heads": 3}, IMAGE, REF, REF, "num_heads should divide channels"],  # 3 does not divide 64
    [{"channels": (8,)}, IMAGE, REF, REF, "channels should list at least two stages"],
    [{"num_query_tokens": 0}, IMAGE, REF, REF, "num_query_tokens and decoder_depth should be >= 1, got 0, 2"],
    [{"decoder_depth": 0}, IMAGE, REF, REF, "num_query_tokens and decoder_depth should be >= 1, got 4, 0"],
]

# [feature shape (N, C, *low), mask shape (N, K, *high), interpolation mode]
POOL_CASES = [
    [(2, 5, 4, 4, 4), (2, 3, 16, 16, 16), "trilinear"],
    [(1, 4, 3, 5, 2), (1, 2, 16, 8, 7), "trilinear"],  # non-integer, anisotropic ratios
    [(2, 6, 4, 6), (2, 3, 16, 18), "bilinear"],
    [(1, 3, 5, 5), (1, 1, 5, 5), "bilinear"],  # same grid: a plain masked mean
]

# [shape, scale]
SHUFFLE_CASES = [
    [(2, 16, 3, 4, 5), 2],
    [(1, 54, 2, 2, 2), 3],
    [(2, 8, 3, 4), 2],
    [(1, 18, 2, 5), 3],
]


def _net(**kwargs) -> IRISNet:
    torch.manual_seed(0)
    return iris_small(**kwargs).eval()


def _masks(*shape: int) -> torch.Tensor:
    return (torch.rand(*shape) > 0.6).float()


@pytest.mark.parametrize("kwargs, brk, spatial, expected", TEST_CASES)
def test_output_shape(kwargs, brk, spatial, expected):
    net = _net(**kwargs)
    b, r, k = brk
    c = net.in_channels
    with torch.no_grad():
        out = net(torch.rand(b, c, *spatial), torch.rand(b, r, c, *spatial), _masks(b, r, k, *spatial))
    assert out.shape == expected
    assert torch.isfinite(out).all()


def test_single_reference_without_reference_axis():
    net = _net()
    torch.manual_seed(1)
    image, ref, mask = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16), _masks(2, 3, 16, 16, 16)
    with torch.no_grad():
        out5 = net(image, ref, mask)
        out6 = net(image, ref[:, None], mask[:, None])
    assert out5.shape == (2, 3, 16, 16, 16)
    torch.testing.assert_close(out5, out6)


@pytest.mark.parametrize("kwargs, image_shape, ref_shape, mask_shape, message", ILL_CASES)
def test_ill_arguments(kwargs, image_shape, ref_shape, mask_shape, message):
    with pytest.raises(ValueError, match=message):
        net = iris_small(**kwargs)
        net(torch.rand(*image_shape), torch.rand(*ref_shape), torch.ones(*mask_shape))


@pytest.mark.parametrize("feature_shape, mask_shape, mode", POOL_CASES)
def test_masked_average_pool_equals_upsample_then_average(feature_shape, mask_shape, mode):
    torch.manual_seed(0)
    features = torch.randn(*feature_shape, dtype=torch.float64)
    masks = torch.rand(*mask_shape, dtype=torch.float64)
    masks[:, 0] = masks[:, 0] > 0.5  # one binary mask next to the soft ones
    upsampled = F.interpolate(features, size=mask_shape[2:], mode=mode, align_corners=False)
    expected = (upsampled[:, None] * masks[:, :, None]).flatten(3).sum(-1) / masks.flatten(2).sum(-1)[..., None]
    pooled = masked_average_pool(features, masks)
    assert pooled.shape == (feature_shape[0], mask_shape[1], feature_shape[1])
    torch.testing.assert_close(pooled, expected, rtol=1e-10, atol=1e-12)


def test_masked_average_pool_of_empty_mask_is_zero():
    masks = torch.zeros(2, 3, 8, 8, 8)
    masks[0, 1, :4] = 1.0
    pooled = masked_average_pool(torch.randn(2, 4, 2, 2, 2) + 5.0, masks)
    assert torch.count_nonzero(pooled[0, 1]) == 4
    pooled[0, 1] = 0.0
    assert torch.equal(pooled, torch.zeros(2, 3, 4))


@pytest.mark.parametrize("shape, scale", SHUFFLE_CASES)
def test_pixel_unshuffle_inverts_pixel_shuffle(shape, scale):
    x = torch.randn(*shape)
    up = pixel_shuffle(x, scale)
    spatial_dims = len(shape) - 2
    assert up.shape == (shape[0], shape[1] // scale**spatial_dims, *(s * scale for s in shape[2:]))
    assert torch.equal(pixel_unshuffle(up, scale), x)
    assert torch.equal(pixel_shuffle(pixel_unshuffle(up, scale), scale), up)


@pytest.mark.parametrize("shape, scale", [c for c in SHUFFLE_CASES if len(c[0]) == 4])
def test_pixel_shuffle_2d_matches_torch(shape, scale):
    x = torch.randn(*shape)
    assert torch.equal(pixel_shuffle(x, scale), F.pixel_shuffle(x, scale))
    y = torch.randn(shape[0], shape[1], shape[2] * scale, shape[3] * scale)
    assert torch.equal(pixel_unshuffle(y, scale), F.pixel_unshuffle(y, scale))


def test_encode_task_averages_references():
    net = _net()
    torch.manual_seed(2)
    refs, masks = torch.rand(2, 3, 1, 16, 16, 16), _masks(2, 3, 2, 16, 16, 16)
    with torch.no_grad():
        together = net.encode_task(refs, masks)
        singles = [net.encode_task(refs[:, r], masks[:, r]) for r in range(3)]
    assert together.shape == (2, 2, 5, 64)
    torch.testing.assert_close(together, sum(singles) / 3, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(singles[0], singles[1])  # the average is not trivially of equal parts


def test_encode_task_leaves_out_references_with_an_empty_mask():
    net = _net()
    torch.manual_seed(3)
    refs, masks = torch.rand(1, 2, 1, 16, 16, 16), _masks(1, 2, 2, 16, 16, 16)
    masks[0, 1, 0] = 0.0  # reference 1 does not show class 0
    with torch.no_grad():
        together = net.encode_task(refs, masks)
        first = net.encode_task(refs[:, 0], masks[:, 0])
        second = net.encode_task(refs[:, 1], masks[:, 1])
    torch.testing.assert_close(together[:, 0], first[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together[:, 1], (first[:, 1] + second[:, 1]) / 2, rtol=1e-5, atol=1e-6)


def test_segment_broadcasts_one_task_over_a_batch():
    net = _net()
    torch.manual_seed(4)
    images = torch.rand(3, 1, 16, 16, 16)
    with torch.no_grad():
        task = net.encode_task(torch.rand(1, 2, 1, 16, 16, 16), _masks(1, 2, 2, 16, 16, 16))
        batched = net.segment(images, task)
        one_by_one = torch.cat([net.segment(images[i: i + 1], task) for i in range(3)])
    assert task.shape == (1, 2, 5, 64) and batched.shape == (3, 2, 16, 16, 16)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)


def test_forward_is_segment_of_encode_task():
    net = _net()
    torch.manual_seed(5)
    image, refs, masks = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 2, 1, 16, 16, 16), _masks(1, 2, 3, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(image, refs, masks), net.segment(image, net.encode_task(refs, masks)))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_torchscript_matches_eager(spatial_dims):
    net = _net(spatial_dims=spatial_dims)
    scripted = torch.jit.script(net)
    torch.manual_seed(6)
    spatial = (16,) * spatial_dims
    image, refs, masks = torch.rand(2, 1, *spatial), torch.rand(2, 2, 1, *spatial), _masks(2, 2, 2, *spatial)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image, refs, masks), net(image, refs, masks), rtol=1e-5, atol=1e-5)


def test_memory_bank_sized_by_network():
    net = _net(memory_capacity=7, memory_momentum=0.5)
    assert net.memory_bank.embeddings.shape == (7, 5, 64)
    assert net.memory_bank.momentum == 0.5


def test_parameter_counts():
    full = sum(p.numel() for p in iris_full().parameters())
    small = sum(p.numel() for p in iris_small().parameters())
    assert 9_000_000 <= full <= 12_000_000
    assert 400_000 <= small <= 1_000_000
