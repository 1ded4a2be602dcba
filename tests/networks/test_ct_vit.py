from __future__ import annotations

import math
import warnings

import pytest
import torch
from monai.data import MetaTensor

from common.networks.ct_vit import (
    CTViT,
    _CTViTBlock,
    _reference_attention,
    _sdpa_z_attention,
    _SliceAwareSelfAttention,
    ct_vit_base,
    ct_vit_small,
    ct_vit_tiny,
    patch_region_assignment,
    token_bias,
)

# a config sized for CPU tests: 16 x 64 x 64 volumes, 4 x 16 x 16 patches -> 4 x 4 x 4 = 64 tokens
TINY = {"img_size": (16, 64, 64), "patch_size": (4, 16, 16), "hidden_size": 32, "num_layers": 3, "num_heads": 4,
        "num_regions": 3, "out_dim": 16}

# [kwargs, volume shape, with mask, N]
TEST_CASES = [
    [TINY, (2, 1, 16, 64, 64), True, 64],
    [TINY, (1, 1, 16, 64, 64), False, 64],
    [TINY, (2, 1, 8, 32, 48), True, 2 * 2 * 3],  # another grid: interpolated positions
    [{**TINY, "in_channels": 2, "multiscale_layers": (3,)}, (1, 2, 12, 32, 32), True, 3 * 2 * 2],
    # the feature pyramid on the reference grid and on odd grids (3 x 2 x 2 -> 2 x 1 x 1 -> 1 x 1 x 1)
    [{**TINY, "multiscale_fusion": "fpn"}, (2, 1, 16, 64, 64), True, 64],
    [{**TINY, "multiscale_fusion": "fpn"}, (1, 1, 12, 32, 32), True, 3 * 2 * 2],
    [{**TINY, "num_regions": 20}, (2, 1, 16, 64, 64), True, 64],  # the design's 20 regions
]

# kwargs, the error message's start
ILL_CASES = [
    [{"img_size": (15, 64, 64)}, "img_size should be divisible by patch_size"],
    [{"patch_size": (0, 16, 16)}, "patch_size should be"],
    [{"patch_size": (4, 16)}, "patch_size should be"],
    [{"hidden_size": 30}, "num_heads should divide hidden_size=30"],  # not divisible by 4 heads
    [{"num_layers": 0}, "num_layers should be"],
    [{"num_regions": 0}, "num_regions should be"],
    [{"out_dim": 2.5}, "out_dim should be"],
    [{"mlp_ratio": 0.0}, "mlp_ratio should be"],
    [{"multiscale_layers": (0, 3)}, "multiscale_layers should be"],
    [{"multiscale_layers": (4,)}, "multiscale_layers should be"],
    [{"attention_impl": "xformers"}, "Unsupported option 'xformers'"],
    [{"multiscale_fusion": "bifpn"}, "'bifpn' is not a valid value"],
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net(**kwargs) -> CTViT:
    torch.manual_seed(0)
    return CTViT(**{**TINY, **kwargs}).eval()


def _inputs(shape=(2, 1, 16, 64, 64), num_regions: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    volume = torch.rand(shape, generator=g)
    mask = torch.randint(0, num_regions + 1, (shape[0], 1, *shape[2:]), generator=g)
    mask[:, :, :, :16] = 0  # a row of background-only patches
    mask[mask == 2] = 1  # region 2 absent
    return volume, mask


@pytest.mark.parametrize("kwargs, shape, with_mask, n", TEST_CASES)
def test_encode_shapes(kwargs, shape, with_mask, n):
    net = CTViT(**kwargs).eval()
    volume, mask = _inputs(shape, kwargs["num_regions"])
    with torch.no_grad():
        out = net.encode(volume, mask if with_mask else None)
    b, r, d, c = shape[0], kwargs["num_regions"], kwargs["out_dim"], kwargs["hidden_size"]
    assert out["global"].shape == (b, d)
    assert out["local"].shape == (b, n, d)
    assert out["region"].shape == (b, r, d) and out["region_local"].shape == (b, r, d)
    assert out["region_present"].shape == (b, r) and out["region_present"].dtype == torch.bool
    assert out["tokens"].shape == (b, n, c)
    assert out["assignment"].shape == (b, n, r + 1)
    torch.testing.assert_close(out["assignment"].sum(-1), torch.ones(b, n))
    if with_mask:  # region 2 was removed from every mask
        assert out["region_present"][:, 1].logical_not().all() and out["region_present"][:, 0].all()
    else:
        assert not out["region_present"].any()
    # absent regions pool to zero features
    assert torch.all(out["region"][~out["region_present"]] == 0)
    # a region's patch-level embedding is the assignment-weighted mean of its patches' local embeddings
    weights = out["assignment"][..., 1:] / out["assignment"][..., 1:].sum(1, keepdim=True).clamp_min(1e-12)
    torch.testing.assert_close(out["region_local"], torch.einsum("bnr,bnd->brd", weights, out["local"]),
                               atol=1e-5, rtol=1e-4)


def test_feature_pyramid_modules_and_top_down_path():
    concat, fpn = _net(), _net(multiscale_fusion="fpn")
    assert "fuse.weight" in concat.state_dict() and not any(k.startswith("fpn_") for k in concat.state_dict())
    assert "fuse.weight" not in fpn.state_dict() and len(fpn.fpn_lateral) == len(fpn.fpn_smooth) == 3
    # with one level the pyramid is the smoothing convolution of the lateral projection of that layer
    one = _net(multiscale_fusion="fpn", multiscale_layers=(3,))
    scales = [torch.randn(2, 64, 32)]
    volume = one.fpn_lateral[0](scales[0]).transpose(1, 2).reshape(2, 32, 4, 4, 4)
    expected = one.fpn_smooth[0](volume).flatten(2).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(one._pyramid(scales, (4, 4, 4)), expected)
        # top-down: the deepest layer reaches every token through its 1 x 1 x 1 level (4 -> 2 -> 1 per axis), the
        # shallowest only the neighbours of the changed token, through the finest 3 x 3 x 3 smoothing
        layers = [torch.randn(1, 64, 32) for _ in range(3)]
        base = fpn._pyramid(layers, (4, 4, 4))
        moved = []
        for k in (2, 0):
            changed = [t.clone() for t in layers]
            changed[k][:, 0] += 10.0
            moved.append((fpn._pyramid(changed, (4, 4, 4)) - base).abs().sum(-1)[0].reshape(4, 4, 4))
    assert moved[0].min() > 0
    assert moved[1][:2, :2, :2].min() > 0 and moved[1][2:].max() == 0 and moved[1][:, 2:].max() == 0


def test_forward_is_global_embedding():
    net = _net()
    volume, mask = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(net(volume, mask), net.encode(volume, mask)["global"])


def test_docstring_example_and_factories():
    torch.manual_seed(0)
    net = ct_vit_tiny().eval()
    with torch.no_grad():
        out = net.encode(torch.rand(2, 1, 16, 64, 64), torch.randint(0, 9, (2, 1, 16, 64, 64)))
        assert out["local"].shape == (2, 64, 64) and out["region"].shape == (2, 8, 64)
        assert net(torch.rand(2, 1, 16, 64, 64)).shape == (2, 64)
    with torch.device("meta"):  # sizes only, no memory
        base, small = ct_vit_base(), ct_vit_small()
    assert base.grid == (16, 32, 32) and base.gradient_checkpointing
    assert small.grid == (8, 16, 16)
    assert round(sum(p.numel() for p in base.parameters()) / 1e6, 1) == 132.5


@pytest.mark.parametrize("kwargs, message", ILL_CASES)
def test_ill_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CTViT(**{**TINY, **kwargs})


def test_bad_inputs():
    net = _net()
    volume, mask = _inputs()
    bad = [
        (torch.rand(2, 1, 2, 64, 64), None, "positive multiples"),  # smaller than one patch
        (torch.rand(2, 1, 16, 60, 64), None, "positive multiples"),  # not divisible
        (torch.rand(2, 2, 16, 64, 64), None, "should have shape"),
        (volume.clone().index_fill_(0, torch.tensor([1]), float("nan")), None, "finite"),
        (volume, mask[:, :, :8], "match the volume"),
        (volume, mask[:1], "match the volume"),
        (volume, mask.clone().fill_(4), "ids should be in"),
        (volume, mask.clone().fill_(-1), "ids should be in"),
        (volume, mask.float() + 0.5, "integer region ids"),
    ]
    for v, m, match in bad:
        with pytest.raises(ValueError, match=match):
            net.encode(v, m)


def test_float_and_meta_tensor_inputs():
    net = _net()
    volume, mask = _inputs()
    with torch.no_grad():
        expected = net.encode(volume, mask)["local"]
        got = net.encode(MetaTensor(volume), MetaTensor(mask.float()))["local"]
    torch.testing.assert_close(got, expected)


def test_patch_region_assignment_exact_fractions():
    # (2, 4, 4) volume, 2 x 2 x 2 patches -> a 1 x 2 x 2 grid of 8-voxel patches
    mask = torch.zeros(1, 1, 2, 4, 4, dtype=torch.long)
    mask[0, 0, 0, 0, 0] = 1  # patch 0: 1 voxel of region 1 ...
    mask[0, 0, 1, 1, 1] = 2  # ... and 2 voxels of region 2
    mask[0, 0, 1, 0, 1] = 2
    mask[0, 0, :, 0:2, 2:4] = 3  # patch 1: all region 3
    mask[0, 0, 0, 2:4, 0:2] = 1  # patch 2: half region 1
    # patch 3: background only
    expected = torch.tensor([[
        [5 / 8, 1 / 8, 2 / 8, 0.0],
        [0.0, 0.0, 0.0, 1.0],
        [4 / 8, 4 / 8, 0.0, 0.0],
        [1.0, 0.0, 0.0, 0.0],
    ]])
    assert torch.equal(patch_region_assignment(mask, (2, 2, 2), 3), expected)


def test_position_embedding_interpolation():
    net = _net()
    assert torch.equal(net.position_embedding(net.grid), net.pos_embed.flatten(2).transpose(1, 2))
    assert net.position_embedding((2, 3, 5)).shape == (1, 30, 32)
    assert net.position_embedding((8, 8, 8)).shape == (1, 512, 32)


def test_slope_bias_by_hand():
    attn = _SliceAwareSelfAttention(dim=8, num_heads=2)
    with torch.no_grad():
        attn.z_decay.copy_(torch.log(torch.expm1(torch.tensor([0.5, 2.0]))))
    bias = token_bias(attn.slab_bias(3), (3, 1, 2))  # z = 0, 0, 1, 1, 2, 2
    dz = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1],
                       [2, 2, 1, 1, 0, 0], [2, 2, 1, 1, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(bias, torch.stack([-0.5 * dz, -2.0 * dz]))


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_attention_weights_follow_z_distance(impl):
    # zero queries and keys: every score is the bias alone, so the weights are softmax_j(-s |z_i - z_j|); one-hot
    # values read them out
    attn = _SliceAwareSelfAttention(dim=8, num_heads=2)
    with torch.no_grad():
        attn.z_decay.copy_(torch.log(torch.expm1(torch.tensor([0.5, 2.0]))))
    n, grid = 6, (3, 1, 2)
    q = torch.zeros(1, 2, n, 4)
    v = torch.eye(n).expand(1, 2, n, n)
    slopes = attn.slopes()
    if impl == "sdpa":
        weights = _sdpa_z_attention(q, q, v, slopes, grid[0])
    else:
        weights = _reference_attention(q, q, v, token_bias(attn.slab_bias(grid[0]), grid))[0]
    z = torch.tensor([0, 0, 1, 1, 2, 2])
    for h, s in enumerate([0.5, 2.0]):
        expected = torch.softmax(-s * (z[:, None] - z[None, :]).abs().float(), dim=-1)
        torch.testing.assert_close(weights[0, h], expected)
    # nearer slabs get more weight: token 0 weighs slab 0 > slab 1 > slab 2
    row = weights[0, 0, 0]
    assert row[0] > row[2] > row[4]


def _assert_sdpa_matches_reference(attn: _SliceAwareSelfAttention, x: torch.Tensor, bias_param: torch.nn.Parameter):
    """The fused path against the dense reference: outputs, and gradients of the input, the bias and qkv."""
    outputs, grads = {}, {}
    for impl in ("sdpa", "reference"):
        attn.zero_grad()
        xi = x.clone().requires_grad_(True)
        out = attn(xi, (4, 3, 2), impl)
        out.square().sum().backward()
        outputs[impl] = out.detach()
        grads[impl] = (xi.grad, bias_param.grad.clone(), attn.qkv.weight.grad.clone())
    torch.testing.assert_close(outputs["sdpa"], outputs["reference"], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads["sdpa"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert grads["sdpa"][1].abs().min() > 0  # every head (and bin) of the bias learns
    return outputs["reference"]


def test_sdpa_matches_reference_with_gradients():
    torch.manual_seed(0)
    attn = _SliceAwareSelfAttention(dim=32, num_heads=4)
    _assert_sdpa_matches_reference(attn, torch.randn(2, 4 * 3 * 2, 32), attn.z_decay)


def test_flex_selected_on_cuda_only_and_matches_reference():
    net = _net()
    assert net.resolve_attention_impl("cpu") == "sdpa"
    assert net.resolve_attention_impl(torch.device("cuda")) == "flex"
    assert _net(attention_impl="reference").resolve_attention_impl("cuda") == "reference"
    # FlexAttention runs eagerly on CPU for inference (no CPU backward), which checks the score_mod numerically
    volume, mask = _inputs()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = _net(attention_impl="flex").encode(volume, mask)["tokens"]
        reference = _net(attention_impl="reference").encode(volume, mask)["tokens"]
    torch.testing.assert_close(flex, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention has no CPU backward; training needs CUDA")
def test_flex_backward_on_cuda():  # pragma: no cover - CPU-only CI
    net = _net(attention_impl="flex").cuda().train()
    volume, mask = _inputs()
    net.encode(volume.cuda(), mask.cuda())["global"].sum().backward()
    assert net.blocks[0].self_attn.z_decay.grad is not None


def test_all_paths_agree_end_to_end():
    volume, mask = _inputs()
    with torch.no_grad():
        sdpa = _net(attention_impl="sdpa").encode(volume, mask)
        reference = _net(attention_impl="reference").encode(volume, mask)
    for key in ("global", "local", "region", "tokens"):
        torch.testing.assert_close(sdpa[key], reference[key], atol=1e-5, rtol=1e-5)


def test_block_shapes_and_region_masking():
    torch.manual_seed(0)
    block = _CTViTBlock(dim=32, num_heads=4, mlp_ratio=2.0).eval()
    volume, mask = _inputs((1, 1, 16, 64, 64))
    assignment = patch_region_assignment(mask, (4, 16, 16), 3)  # (1, 64, 4)
    log_assignment = torch.log(assignment).clamp_min(-1.0e4)
    x, regions = torch.randn(1, 64, 32), torch.randn(1, 4, 32)
    with torch.no_grad():
        for impl in ("sdpa", "reference"):
            assert block(x, regions, log_assignment, (4, 4, 4), impl).shape == (1, 64, 32)
        weights = block.cross_attn.attention_weights(block.norm2(x), block.norm_regions(regions), log_assignment)
    assert weights.shape == (1, 4, 64, 4)
    unassigned = (assignment == 0).unsqueeze(1).expand_as(weights)
    assert unassigned.any() and torch.all(weights[unassigned] == 0)  # exactly zero, not just small
    assert torch.all(weights[~unassigned] > 0)
    background_only = assignment[0, :, 0] == 1  # these patches attend to the "no region" token alone
    assert background_only.any()
    torch.testing.assert_close(weights[0, :, background_only, 0], torch.ones(4, int(background_only.sum())))
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 4, 64))


def test_checkpointing_same_outputs_and_gradients():
    volume, mask = _inputs()
    results = []
    for flag in (False, True):
        net = _net(gradient_checkpointing=flag).train()
        out = net.encode(volume, mask)
        loss = out["global"].square().sum() + out["region"].square().sum() + out["local"].square().mean()
        loss.backward()
        results.append((out["local"].detach(), {n: p.grad.clone() for n, p in net.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], msg=name)


def test_bf16_autocast_runs():
    net = _net()
    volume, mask = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.encode(volume, mask)
    assert out["assignment"].dtype == torch.float32
    assert all(bool(torch.isfinite(out[k].float()).all()) for k in ("global", "local", "region"))
    reference = net.encode(volume, mask)["global"]
    assert torch.nn.functional.cosine_similarity(out["global"].float(), reference).min() > 0.98


def test_region_features_use_the_mask():
    net = _net()
    volume, mask = _inputs()
    with torch.no_grad():
        a = net.encode(volume, mask)
        shuffled = mask.clone()
        shuffled[mask == 1], shuffled[mask == 3] = 3, 1
        b = net.encode(volume, shuffled)
    assert not torch.allclose(a["tokens"], b["tokens"])
    assert math.isclose(float(a["assignment"][..., 1].sum()), float(b["assignment"][..., 3].sum()))


def test_segmentation_head_maps_each_token_to_its_patch_voxels():
    net = _net(seg_head=True)
    volume, mask = _inputs()
    with torch.no_grad():
        out = net.encode(volume, mask)
    b, r = volume.shape[0], net.num_regions
    assert out["seg_logits"].shape == (b, r + 1, *volume.shape[2:])
    assert "seg_logits" not in _net().encode(volume, mask)  # off by default
    # token (0, 1, 2) of the (4, 4, 4) grid covers voxels [0:4, 16:32, 32:48]; its logits come from that token only
    pd, ph, pw = net.patch_size
    token = out["tokens"][:, 1 * 4 + 2]
    expected = net.seg_head(token).reshape(b, r + 1, pd, ph, pw)
    torch.testing.assert_close(out["seg_logits"][:, :, 0:4, 16:32, 32:48], expected)


def test_slice_bias_table_starts_as_the_slopes_and_every_path_agrees_with_gradients():
    torch.manual_seed(0)
    slope = _SliceAwareSelfAttention(dim=32, num_heads=4)
    table = _SliceAwareSelfAttention(dim=32, num_heads=4, slice_bias="table", slice_bias_bins=3)
    table.load_state_dict({k: v for k, v in slope.state_dict().items() if k != "z_decay"}, strict=False)
    assert "z_decay" not in table.state_dict() and table.z_table.shape == (4, 3)
    # at initialisation the table is the slope form up to the last bin, which distances 2 and 3 share
    bias_slope, bias_table = slope.slab_bias(4), table.slab_bias(4)
    torch.testing.assert_close(bias_table[:, 0, :3], bias_slope[:, 0, :3])
    torch.testing.assert_close(bias_table[:, 0, 3], bias_slope[:, 0, 2])
    with torch.no_grad():  # a non-monotonic table: slabs 2 apart weigh more than neighbours
        table.z_table.copy_(torch.tensor([[0.0, -3.0, 1.0]] * 4))
    x = torch.randn(2, 4 * 3 * 2, 32)
    reference = _assert_sdpa_matches_reference(table, x, table.z_table)
    with torch.no_grad(), warnings.catch_warnings():  # FlexAttention's score_mod, eager on CPU
        warnings.simplefilter("ignore")
        torch.testing.assert_close(table(x, (4, 3, 2), "flex"), reference, atol=1e-5, rtol=1e-5)


def test_slice_bias_table_through_the_network():
    volume, mask = _inputs()
    net = _net(slice_bias="table", slice_bias_bins=4)
    with torch.no_grad():
        sdpa = net.encode(volume, mask)["tokens"]
        net.attention_impl = "reference"
        torch.testing.assert_close(sdpa, net.encode(volume, mask)["tokens"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="slice_bias_bins should be an integer >= 2"):
        _net(slice_bias="table", slice_bias_bins=1)
