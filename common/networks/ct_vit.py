"""CT-ViT: a 3D CT vision transformer with slice-aware attention and an anatomical structure encoder.

The image tower of a volume-report alignment model (CLIP-style training, Radford et al. 2021,
https://arxiv.org/abs/2103.00020; 3D CT with reports as in CT-CLIP, Hamamci et al. 2024,
https://arxiv.org/abs/2403.17834). The z-distance bias is an ALiBi-style linear penalty (Press et al. 2022,
https://arxiv.org/abs/2108.12409) along the slice axis only, or optionally a learned per-head table over distance bins
(as T5's relative position buckets, Raffel et al. 2020, https://arxiv.org/abs/1910.10683).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.blocks import MLPBlock
from monai.utils import look_up_option
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.bundle.args import as_bool

try:  # FlexAttention appeared in torch 2.5
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:  # pragma: no cover - the pinned torch has it
    _flex_attention = None

__all__ = [
    "ATTENTION_IMPLS",
    "MULTISCALE_FUSIONS",
    "SLICE_BIASES",
    "CTViT",
    "ct_vit_base",
    "ct_vit_small",
    "ct_vit_tiny",
    "patch_region_assignment",
    "token_bias",
]

ATTENTION_IMPLS = ("auto", "flex", "sdpa", "reference")
MULTISCALE_FUSIONS = ("concat", "fpn")
SLICE_BIASES = ("slope", "table")
# log-assignment floor: exp(-1e4) underflows to exactly 0 in fp32 and bf16, so a region holding none of a patch's
# voxels gets zero weight, without -inf arithmetic in any attention kernel
_LOG_ZERO = -1.0e4
_compiled_flex = None


def _flex_kernel(device_type: str):
    """FlexAttention compiled once per process on CUDA (fused kernel); eager elsewhere (unfused, inference only)."""
    global _compiled_flex
    if device_type != "cuda":
        return _flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(_flex_attention, dynamic=False)
    return _compiled_flex


def _triple(value: int | Sequence[int], name: str) -> tuple[int, int, int]:
    values = (value,) * 3 if isinstance(value, int) else tuple(value)
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{name} should be a positive integer or 3 positive integers, got {value}.")
    return values


def _to_patches(x: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """``(B, C, D, H, W) -> (B, N, C * pd * ph * pw)``, patches in the token order of the patch embedding."""
    b, c, d, h, w = x.shape
    pd, ph, pw = patch
    x = x.reshape(b, c, d // pd, pd, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(b, (d // pd) * (h // ph) * (w // pw), c * pd * ph * pw)


def _from_patches(x: torch.Tensor, patch: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`_to_patches`: ``(B, N, C * pd * ph * pw) -> (B, C, D, H, W)`` for a ``(gd, gh, gw)`` grid."""
    b = x.shape[0]
    (pd, ph, pw), (gd, gh, gw) = patch, grid
    x = x.reshape(b, gd, gh, gw, -1, pd, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, x.shape[1], gd * pd, gh * ph, gw * pw)


def patch_region_assignment(region_mask: torch.Tensor, patch_size: Sequence[int], num_regions: int) -> torch.Tensor:
    """Soft patch-to-region assignment: the fraction of each patch's voxels in each region.

    Average pooling of each region's one-hot mask with kernel = stride = patch, one region at a time so the peak
    extra memory is one float copy of the mask. Fractions are exact for power-of-two patch volumes.

    Args:
        region_mask: ``(B, 1, D, H, W)`` integer region ids in ``[0, num_regions]``, 0 = no region; each spatial size
            divisible by the patch.
        patch_size: ``(pd, ph, pw)``.
        num_regions: ``R``.

    Returns:
        float32 ``(B, N, R + 1)`` with ``N = (D / pd) (H / ph) (W / pw)``; column 0 is the background ("no region")
        fraction, column ``r`` region ``r``; rows sum to 1.
    """
    patch = tuple(patch_size)
    columns = [
        F.avg_pool3d((region_mask == r).float(), kernel_size=patch, stride=patch).flatten(1)
        for r in range(num_regions + 1)
    ]
    return torch.stack(columns, dim=-1)


def token_bias(slab_bias: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """The dense per-token bias ``(H, N, N)`` from the bias between slabs ``slab_bias`` ``(H, gd, gd)``.

    Only the reference path materialises this; tokens are in ``(gd, gh, gw)`` order, so ``z_i = i // (gh * gw)``.
    """
    gd, gh, gw = grid
    z = torch.arange(gd, device=slab_bias.device).repeat_interleave(gh * gw)
    return slab_bias[:, z][:, :, z]


def _reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain ``softmax(q k^T / sqrt(d) + bias) v``; returns the output and the ``(B, H, Nq, Nk)`` weights."""
    weights = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias, dim=-1)
    return weights @ v, weights


def _sdpa_z_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, gd: int) -> torch.Tensor:
    """Slice-biased attention through ``F.scaled_dot_product_attention`` with no bias tensor at all.

    ``|z_i - z_j|`` counts the slab boundaries ``t = 0 .. gd - 2`` between two tokens: with ``a_t(i) = [z_i <= t]``,
    ``|z_i - z_j| = sum_t (a_t(i) - a_t(j))^2 = sum_t a_t(i) + sum_t a_t(j) (1 - 2 a_t(i))``. The first sum is the
    same for every key of query ``i``, so softmax ignores it, and the second is a dot product: ``gd - 1`` features
    ``-slope * sqrt(d) * (1 - 2 a_t(i))`` appended to the queries and ``a_t(j)`` to the keys give exactly the
    biased scores with ``scale = 1 / sqrt(d)``. The bias then needs no ``attn_mask``, so the fused kernels (CPU
    flash, CUDA flash / memory-efficient) run and the slopes get their gradient through the queries; a bias tensor
    that requires grad forces the math backend, which keeps the full ``(B, H, N, N)`` softmax for backward.

    Memory: ``O(B H N (d + gd))``; compute grows by about ``(d + gd) / d`` (head dims padded to a multiple of 8).
    Measured on CPU for 8,192 tokens (grid 16 x 16 x 32), 4 heads, forward + backward: 87 MB of extra peak memory,
    against 3.4 GB for the reference path.
    """
    b, h, n, d = q.shape
    dv = v.shape[-1]
    if gd > 1:
        z = torch.arange(gd, device=q.device).repeat_interleave(n // gd)
        below = (z[:, None] <= torch.arange(gd - 1, device=q.device)[None, :]).to(torch.float32)  # (N, gd - 1)
        q_extra = (1.0 - 2.0 * below) * (-slopes.float() * math.sqrt(d)).view(1, h, 1, 1)
        width = d + gd - 1
        pad = -width % 8
        q = torch.cat([q, q_extra.to(q.dtype).expand(b, h, n, gd - 1), q.new_zeros(b, h, n, pad)], dim=-1)
        k = torch.cat([k, below.to(k.dtype).expand(b, h, n, gd - 1), k.new_zeros(b, h, n, pad)], dim=-1)
        v = F.pad(v, (0, max(width + pad - dv, 0)))  # flash kernels want one head dim for q, k and v
    return F.scaled_dot_product_attention(q, k, v, scale=d**-0.5)[..., :dv]


def _sdpa_slab_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slab_bias: torch.Tensor) -> torch.Tensor:
    """Attention with any per-head bias between slabs, ``slab_bias[h, z_i, z_j]`` ``(H, gd, gd)``, through
    ``F.scaled_dot_product_attention`` with no bias tensor.

    The bias is a dot product of ``gd`` extra features: the query's row of the table, ``slab_bias[h, z_i, :] *
    sqrt(d)``, against the key's one-hot slab ``[z_j = t]``. As in :func:`_sdpa_z_attention`, the fused kernels then
    run and the table gets its gradient through the queries; memory ``O(B H N (d + gd))``.
    """
    b, h, n, d = q.shape
    dv, gd = v.shape[-1], slab_bias.shape[-1]
    z = torch.arange(gd, device=q.device).repeat_interleave(n // gd)
    q_extra = slab_bias.float()[:, z, :] * math.sqrt(d)  # (H, N, gd)
    width = d + gd
    pad = -width % 8
    q = torch.cat([q, q_extra.to(q.dtype).expand(b, h, n, gd), q.new_zeros(b, h, n, pad)], dim=-1)
    k = torch.cat([k, F.one_hot(z, gd).to(k.dtype).expand(b, h, n, gd), k.new_zeros(b, h, n, pad)], dim=-1)
    v = F.pad(v, (0, max(width + pad - dv, 0)))
    return F.scaled_dot_product_attention(q, k, v, scale=d**-0.5)[..., :dv]


def _flex_table_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, plane: int):
    """FlexAttention adding ``table[h, min(|z_i - z_j|, bins - 1)]`` per score inside the kernel."""
    last = table.shape[1] - 1

    def score_mod(score, batch, head, q_idx, kv_idx):
        return score + table[head, torch.clamp(torch.abs(q_idx // plane - kv_idx // plane), max=last)]

    return _flex_kernel(q.device.type)(q, k, v, score_mod=score_mod)


def _flex_z_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, plane: int):
    """FlexAttention with the slice-distance bias computed per score inside the kernel: ``O(B H N d)`` memory."""

    def score_mod(score, batch, head, q_idx, kv_idx):
        return score - slopes[head] * torch.abs(q_idx // plane - kv_idx // plane)

    return _flex_kernel(q.device.type)(q, k, v, score_mod=score_mod)


class _SliceAwareSelfAttention(nn.Module):
    """Multi-head self-attention with a per-head bias on the distance ``|z_i - z_j|`` between patch slabs ``z``.

    ``slice_bias="slope"``: ``bias_h = -softplus(w_h) * |z_i - z_j|``; softplus keeps every slope positive, so the
    bias decreases monotonically with z-distance; the slopes start at ALiBi's geometric ``2^(-8 (h + 1) / H)``, from
    almost local to almost global heads. ``"table"``: a learned value per head and distance bin, ``bias_h =
    T[h, min(|z_i - z_j|, bins - 1)]`` (distances from ``bins - 1`` on share the last bin), free to be non-monotonic;
    it starts as the slope form (``T[h, k] = -slope_h * k``).
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, slice_bias: str = "slope", slice_bias_bins: int = 8
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.slice_bias: str = look_up_option(slice_bias, SLICE_BIASES)
        slopes = 2.0 ** (-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float32) / num_heads)
        if self.slice_bias == "slope":
            self.z_decay = nn.Parameter(torch.log(torch.expm1(slopes)))  # softplus^-1
        else:
            self.z_table = nn.Parameter(-slopes[:, None] * torch.arange(slice_bias_bins, dtype=torch.float32))

    def slopes(self) -> torch.Tensor:
        """Positive per-head slopes ``(H,)`` in float32 (``slice_bias="slope"``)."""
        return F.softplus(self.z_decay.float())

    def slab_bias(self, gd: int) -> torch.Tensor:
        """The bias between slabs ``(H, gd, gd)`` in float32, either form."""
        z = torch.arange(gd, device=self.qkv.weight.device)
        distance = (z[:, None] - z[None, :]).abs()
        if self.slice_bias == "slope":
            return -self.slopes()[:, None, None] * distance.float()
        return self.z_table.float()[:, distance.clamp(max=self.z_table.shape[1] - 1)]

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int], impl: str) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.slice_bias == "table":
            out = self._table_attention(q, k, v, grid, impl)
            return self.proj(out.transpose(1, 2).reshape(b, n, c))
        if impl == "flex":
            out = _flex_z_attention(q, k, v, self.slopes(), grid[1] * grid[2])
        elif impl == "sdpa":
            out = _sdpa_z_attention(q, k, v, self.slopes(), grid[0])
        else:
            out = _reference_attention(q, k, v, token_bias(self.slab_bias(grid[0]), grid).to(q.dtype))[0]
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def _table_attention(self, q, k, v, grid: tuple[int, int, int], impl: str) -> torch.Tensor:
        if impl == "flex":
            return _flex_table_attention(q, k, v, self.z_table.float(), grid[1] * grid[2])
        bias = self.slab_bias(grid[0])
        if impl == "sdpa":
            return _sdpa_slab_attention(q, k, v, bias)
        return _reference_attention(q, k, v, token_bias(bias, grid).to(q.dtype))[0]


class _RegionCrossAttention(nn.Module):
    """Patches attend to the region tokens with the additive bias ``log A`` (floored at ``_LOG_ZERO``).

    ``A`` ``(B, N, R + 1)`` holds each patch's voxel fractions; column 0 is the background, whose token is the learned
    "no region" token. A patch attends only to regions it overlaps, in proportion to the overlap times
    ``exp(q . k / sqrt(d))``, and a patch with no region voxels attends to the "no region" token alone. Every row
    of ``A`` sums to 1, so no row is fully masked.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        hd = c // self.num_heads
        q = self.q(x).view(b, n, self.num_heads, hd).transpose(1, 2)
        k, v = self.kv(regions).view(b, regions.shape[1], 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        return q, k, v

    def attention_weights(self, x: torch.Tensor, regions: torch.Tensor, log_assignment: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, R + 1)`` attention weights of the reference path, for inspection."""
        q, k, v = self._qkv(x, regions)
        return _reference_attention(q, k, v, log_assignment.unsqueeze(1).to(q.dtype))[1]

    def forward(self, x: torch.Tensor, regions: torch.Tensor, log_assignment: torch.Tensor, impl: str) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._qkv(x, regions)
        bias = log_assignment.unsqueeze(1).to(q.dtype)  # (B, 1, N, R + 1), broadcast over heads
        if impl == "reference":
            out = _reference_attention(q, k, v, bias)[0]
        else:  # R + 1 keys: small in any case, and the bias needs no gradient, so the fused kernels take it
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(b, self.num_heads, n, -1))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _CTViTBlock(nn.Module):
    """Pre-norm block: slice-aware self-attention, region cross-attention, MLP, each residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = True, slice_bias: str = "slope",
                 slice_bias_bins: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = _SliceAwareSelfAttention(dim, num_heads, qkv_bias, slice_bias, slice_bias_bins)
        self.norm2 = nn.LayerNorm(dim)
        self.norm_regions = nn.LayerNorm(dim)
        self.cross_attn = _RegionCrossAttention(dim, num_heads, qkv_bias)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), dropout_rate=0.0)

    def forward(
        self,
        x: torch.Tensor,
        regions: torch.Tensor,
        log_assignment: torch.Tensor,
        grid: tuple[int, int, int],
        impl: str,
    ) -> torch.Tensor:
        """``(B, N, C)`` tokens, ``(B, R + 1, C)`` region tokens, ``(B, N, R + 1)`` log-assignment -> ``(B, N, C)``."""
        x = x + self.self_attn(self.norm1(x), grid, impl)
        x = x + self.cross_attn(self.norm2(x), self.norm_regions(regions), log_assignment, impl)
        return x + self.mlp(self.norm3(x))


class _RegionEncoder(nn.Module):
    """Anatomical structure encoder: one token per region id from the mask and the image, ``(B, R + 1, C)``.

    Token ``r >= 1`` is ``id_embedding[r] + mlp(mask_encoder([u_r, s_r])) + p_r`` where, with assignment weights
    ``A[n, r]`` normalised over the patches,

    - ``u_r`` is the weighted mean over patches of the flattened image patch masked by region ``r`` (voxels outside
      the region zeroed) and ``s_r`` the weighted mean of the region's binary mask patch, so the linear
      ``mask_encoder`` applied to them equals the weighted mean of a patch embedding (kernel = stride = patch) of
      the masked image and mask -- by linearity, without running a convolution per region;
    - ``p_r`` is the weighted mean of the patches' positional embeddings: where the region lies.

    Token 0, the "no region" token of background patches, is ``id_embedding[0]`` alone. Pooling runs in float32
    whatever the autocast dtype. A region absent from a volume gets a token that no patch attends to.
    """

    def __init__(self, num_regions: int, dim: int, patch_voxels: int, in_channels: int) -> None:
        super().__init__()
        self.num_regions = num_regions
        self.id_embedding = nn.Embedding(num_regions + 1, dim)
        self.mask_encoder = nn.Linear(patch_voxels * (in_channels + 1), dim)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
        nn.init.normal_(self.id_embedding.weight, std=0.02)

    def forward(
        self, image_patches: torch.Tensor, mask_patches: torch.Tensor, assignment: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """``(B, N, C_in * P)`` image patches, ``(B, N, P)`` region ids, ``(B, N, R + 1)`` assignment,
        ``(1, N, C)`` positions -> ``(B, R + 1, C)``."""
        weights = assignment[..., 1:]
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)  # (B, N, R), zero columns stay zero
        with torch.autocast(device_type=image_patches.device.type, enabled=False):
            image_patches = image_patches.float()
            c_in = image_patches.shape[-1] // mask_patches.shape[-1]
            pooled = []
            for r in range(1, self.num_regions + 1):
                inside = (mask_patches == r).float()
                masked = image_patches * inside.repeat(1, 1, c_in)
                w = weights[..., r - 1]
                pooled.append(torch.cat([torch.einsum("bnp,bn->bp", masked, w),
                                         torch.einsum("bnp,bn->bp", inside, w)], dim=-1))
            pooled = torch.stack(pooled, dim=1)  # (B, R, (C_in + 1) P)
            where = torch.einsum("bnr,nc->brc", weights, pos[0].float())
        dtype = self.mask_encoder.weight.dtype
        features = self.mask_encoder(pooled.to(dtype))
        tokens = self.id_embedding.weight[1:] + self.mlp(features) + where.to(features.dtype)
        background = self.id_embedding.weight[:1].expand(tokens.shape[0], 1, -1).to(tokens.dtype)
        return torch.cat([background, tokens], dim=1)


class CTViT(nn.Module):
    """3D CT vision transformer with slice-aware attention and region-aware cross-attention.

    Pipeline:
        1. Patch embedding: ``Conv3d`` with kernel = stride = ``patch_size``, tokens in ``(gd, gh, gw)`` order, plus
           learned positional embeddings for the reference grid ``img_size / patch_size``, trilinearly interpolated
           (``align_corners=False``) to any other grid; at the reference grid they are used as stored.
        2. Anatomical structure encoder (optional ``region_mask`` with ids ``0..R``, 0 = no region): soft
           assignment ``A`` ``(B, N, R + 1)`` = fraction of each patch's voxels in each region
           (:func:`patch_region_assignment`), and one token per region id (``_RegionEncoder``: id embedding + pooled
           masked-patch embedding + mean position). Token 0 is a learned "no region" token. Without a mask every
           patch is background.
        3. ``num_layers`` pre-norm blocks: slice-aware self-attention with ``bias_h(i, j) = -softplus(w_h) |z_i -
           z_j|`` (``z`` = slab index of a patch, in patch units along D; or a learned table over distance bins,
           ``slice_bias="table"``), region cross-attention with bias
           ``log A`` (regions a patch does not touch get exactly zero weight), MLP.
        4. Multi-scale aggregation of the outputs of ``multiscale_layers`` (default after blocks ``L/3, 2L/3, L``,
           rounded), each layer-normed, then a final LayerNorm: ``tokens``. ``multiscale_fusion="concat"``
           (default): concatenated per token and fused by a linear layer, all at the token grid.
           ``"fpn"``: a feature pyramid (Lin et al. 2017, https://arxiv.org/abs/1612.03144) over the token grid,
           the ``k``-th chosen layer (shallowest first) average-pooled to ``1 / 2^k`` of the grid (each axis
           halved, rounding up), then top-down from the deepest: ``P_k = smooth_k(lateral_k(F_k) +
           up(P_{k+1}))`` with linear laterals, nearest upsampling and ``3 x 3 x 3`` smoothing convolutions;
           ``tokens`` come from ``P_0`` at the full grid.
        5. Pooling and heads (bias-free linear projections to ``out_dim``): ``global`` from the mean over patches,
           ``local`` per patch, ``region`` from the assignment-weighted mean of tokens over each region's patches
           (zeros for regions absent from the volume, flagged by ``region_present``).
        6. Optional auxiliary segmentation head (``seg_head=True``): a linear layer per token to the ``R + 1`` region
           logits of each of the patch's voxels, reassembled into a voxel map (the "naive" decoder of SETR, Zheng
           et al. 2021, https://arxiv.org/abs/2012.15840). Trained against the region mask, it asks the tokens to
           know where region boundaries run inside each patch, which the patch-level assignment alone does not give.

    Attention implementations (``attention_impl``), all computing the same function:
        - ``"flex"``: FlexAttention with a ``score_mod`` adding the bias per score inside the kernel; compiled on
          CUDA, ``O(B H N d)`` memory. On CPU it runs eagerly (unfused, full score matrix) and has no backward.
        - ``"sdpa"``: ``F.scaled_dot_product_attention`` with the bias folded into ``gd - 1`` extra query/key
          features (see ``_sdpa_z_attention``), so fused kernels run without an attention mask: ``O(B H N (d +
          gd))`` memory; compute grows by about ``(d + gd) / d``.
        - ``"reference"``: plain ``softmax(q k^T / sqrt(d) + bias) v`` with the dense ``(H, N, N)`` bias,
          ``O(B H N^2)`` memory; for tests. At full size (16,384 tokens) one head's fp32 scores take 1 GiB.
        - ``"auto"`` (default): ``"flex"`` on CUDA when FlexAttention is available, else ``"sdpa"``.

    Region cross-attention has only ``R + 1`` keys and always uses SDPA (plain softmax for ``"reference"``).

    Shapes:
        - ``volume``: ``(B, in_channels, D, H, W)``, float (e.g. HU scaled by a CT window); each of ``D, H, W`` a
          multiple of the patch size and at least one patch. ``D`` is the slice (z) axis: a NIfTI loaded as
          ``(C, X, Y, Z)`` needs its axes reordered (e.g. ``Transposed(indices=(0, 3, 2, 1))``).
        - ``region_mask``: ``(B, 1, D, H, W)`` integer ids in ``[0, num_regions]`` (float masks with integral values
          are accepted), or None.
        - ``forward``: ``(B, out_dim)`` global embedding.
        - :meth:`encode`: ``global`` ``(B, out_dim)``, ``local`` ``(B, N, out_dim)``, ``region`` ``(B, R, out_dim)``
          (row ``r - 1`` = region id ``r``), ``region_local`` ``(B, R, out_dim)`` (the mean ``local`` embedding of
          each region's patches, weighted by the assignment), ``region_present`` ``(B, R)`` bool, ``tokens``
          ``(B, N, hidden_size)``, ``assignment`` ``(B, N, R + 1)`` float32, with ``N = (D / pd) (H / ph) (W / pw)``;
          with ``seg_head`` also ``seg_logits`` ``(B, R + 1, D, H, W)``.

    Args:
        img_size: reference ``(D, H, W)`` of the positional embedding grid. Default ``(64, 512, 512)``.
        patch_size: ``(pd, ph, pw)``, dividing ``img_size``. Default ``(4, 16, 16)``.
        in_channels: image channels. Default 1.
        hidden_size: token width ``C``; divisible by ``num_heads``. Default 768.
        num_layers: blocks ``L``. Default 12.
        num_heads: attention heads. Default 12.
        mlp_ratio: MLP hidden width over ``C``. Default 4.
        num_regions: region ids ``R`` (ids ``1..R``). Default 8.
        out_dim: width of the projection heads (the shared image-text space). Default 512.
        multiscale_layers: 1-based blocks whose outputs are aggregated; default ``L/3, 2L/3, L`` rounded, deduplicated.
        multiscale_fusion: ``"concat"`` or ``"fpn"`` (step 4). Default ``"concat"``.
        slice_bias: ``"slope"`` (one learned slope per head) or ``"table"`` (a learned value per head and slab
            distance bin; see ``_SliceAwareSelfAttention``). Default ``"slope"``.
        slice_bias_bins: distance bins of the ``"table"`` form, >= 2; distances from ``bins - 1`` slabs on share the
            last. Default 8.
        attention_impl: ``"auto"``, ``"flex"``, ``"sdpa"`` or ``"reference"``. Default ``"auto"``.
        gradient_checkpointing: recompute each block in backward (``torch.utils.checkpoint``, non-reentrant) while
            training with gradients. Default False.
        qkv_bias: biases of the query/key/value projections. Default True.
        seg_head: add the auxiliary segmentation head (step 6). Default False.

    Example::

        net = ct_vit_tiny()
        out = net.encode(torch.rand(2, 1, 16, 64, 64), torch.randint(0, 9, (2, 1, 16, 64, 64)))
        out["local"].shape, out["region"].shape  # (2, 64, 64), (2, 8, 64)
        net(torch.rand(2, 1, 16, 64, 64)).shape  # (2, 64)
    """

    def __init__(
        self,
        img_size: Sequence[int] = (64, 512, 512),
        patch_size: Sequence[int] = (4, 16, 16),
        in_channels: int = 1,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_regions: int = 8,
        out_dim: int = 512,
        multiscale_layers: Sequence[int] | None = None,
        attention_impl: str = "auto",
        gradient_checkpointing: bool = False,
        qkv_bias: bool = True,
        seg_head: bool = False,
        multiscale_fusion: str = "concat",
        slice_bias: str = "slope",
        slice_bias_bins: int = 8,
    ) -> None:
        super().__init__()
        self.img_size = _triple(img_size, "img_size")
        self.patch_size = _triple(patch_size, "patch_size")
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size should be divisible by patch_size {self.patch_size}, got {self.img_size}.")
        for name, value in [("in_channels", in_channels), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("num_regions", num_regions), ("out_dim", out_dim)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} should be a positive integer, got {value}.")
        if hidden_size % num_heads:
            raise ValueError(f"num_heads should divide hidden_size={hidden_size}, got {num_heads}.")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio should be positive, got {mlp_ratio}.")
        if multiscale_layers is None:
            multiscale_layers = sorted({max(1, round(num_layers * k / 3)) for k in (1, 2, 3)})
        self.multiscale_layers = tuple(int(i) for i in multiscale_layers)
        if not self.multiscale_layers or any(not 1 <= i <= num_layers for i in self.multiscale_layers):
            raise ValueError(
                f"multiscale_layers should be block indices in [1, {num_layers}], got {multiscale_layers}."
            )
        self.attention_impl: str = look_up_option(attention_impl, ATTENTION_IMPLS)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.in_channels = in_channels
        self.num_regions = num_regions
        self.grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))

        self.patch_embed = nn.Conv3d(in_channels, hidden_size, kernel_size=self.patch_size, stride=self.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, hidden_size, *self.grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.region_encoder = _RegionEncoder(num_regions, hidden_size, math.prod(self.patch_size), in_channels)
        if isinstance(slice_bias_bins, bool) or not isinstance(slice_bias_bins, int) or slice_bias_bins < 2:
            raise ValueError(f"slice_bias_bins should be an integer >= 2, got {slice_bias_bins}.")
        self.blocks = nn.ModuleList(
            _CTViTBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, slice_bias, slice_bias_bins)
            for _ in range(num_layers)
        )
        self.scale_norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in self.multiscale_layers)
        self.multiscale_fusion: str = look_up_option(multiscale_fusion, MULTISCALE_FUSIONS)
        if self.multiscale_fusion == "concat":
            self.fuse = nn.Linear(hidden_size * len(self.multiscale_layers), hidden_size)
        else:
            self.fpn_lateral = nn.ModuleList(nn.Linear(hidden_size, hidden_size) for _ in self.multiscale_layers)
            self.fpn_smooth = nn.ModuleList(
                nn.Conv3d(hidden_size, hidden_size, kernel_size=3, padding=1) for _ in self.multiscale_layers
            )
        self.norm = nn.LayerNorm(hidden_size)
        self.global_head = nn.Linear(hidden_size, out_dim, bias=False)
        self.local_head = nn.Linear(hidden_size, out_dim, bias=False)
        self.region_head = nn.Linear(hidden_size, out_dim, bias=False)
        self.seg_head = (
            nn.Linear(hidden_size, (num_regions + 1) * math.prod(self.patch_size))
            if as_bool(seg_head, "seg_head") else None
        )

    # --------------------------------------------------------------------------------------------------- helpers

    def resolve_attention_impl(self, device: torch.device | str) -> str:
        """The implementation a forward pass on ``device`` uses: ``"auto"`` -> flex on CUDA, sdpa elsewhere."""
        if self.attention_impl != "auto":
            return self.attention_impl
        return "flex" if torch.device(device).type == "cuda" and _flex_attention is not None else "sdpa"

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """``(1, N, C)`` positional embeddings for a token grid: stored at the reference grid, trilinear elsewhere."""
        pos = self.pos_embed
        if tuple(grid) != self.grid:
            pos = F.interpolate(pos.float(), size=tuple(grid), mode="trilinear", align_corners=False).to(pos.dtype)
        return pos.flatten(2).transpose(1, 2)

    def _check_inputs(self, volume: torch.Tensor, region_mask: torch.Tensor | None) -> torch.Tensor | None:
        if volume.dim() != 5 or volume.shape[1] != self.in_channels:
            raise ValueError(f"volume should have shape (B, {self.in_channels}, D, H, W), got {list(volume.shape)}.")
        spatial = tuple(volume.shape[2:])
        if any(s < p or s % p for s, p in zip(spatial, self.patch_size)):
            raise ValueError(
                f"volume spatial sizes should be positive multiples of the patch size {self.patch_size}, got {spatial}."
            )
        if not bool(torch.isfinite(volume).all()):
            raise ValueError("volume should hold finite values, got NaN or Inf.")
        if region_mask is None:
            return None
        if tuple(region_mask.shape) != (volume.shape[0], 1, *spatial):
            raise ValueError(
                f"region_mask should have shape {[volume.shape[0], 1, *spatial]} to match the volume, "
                f"got {list(region_mask.shape)}."
            )
        if region_mask.is_floating_point():
            if not bool(torch.isfinite(region_mask).all()) or not torch.equal(region_mask, region_mask.round()):
                raise ValueError("region_mask should hold integer region ids, got non-integral values.")
        region_mask = region_mask.long()
        low, high = int(region_mask.min()), int(region_mask.max())
        if low < 0 or high > self.num_regions:
            raise ValueError(f"region_mask ids should be in [0, {self.num_regions}], got values in [{low}, {high}].")
        return region_mask

    def _run_blocks(
        self,
        x: torch.Tensor,
        regions: torch.Tensor,
        log_assignment: torch.Tensor,
        grid: tuple[int, int, int],
        impl: str,
    ) -> torch.Tensor:
        """Blocks, then the multi-scale fusion of the chosen layers' outputs: ``(B, N, C)``."""
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        scales = []
        for i, block in enumerate(self.blocks, start=1):
            if use_checkpoint:
                x = checkpoint(block, x, regions, log_assignment, grid, impl, use_reentrant=False)
            else:
                x = block(x, regions, log_assignment, grid, impl)
            if i in self.multiscale_layers:
                scales.append(self.scale_norms[len(scales)](x))
        if self.multiscale_fusion == "fpn":
            return self.norm(self._pyramid(scales, grid))
        return self.norm(self.fuse(torch.cat(scales, dim=-1)))

    def _pyramid(self, scales: list[torch.Tensor], grid: tuple[int, int, int]) -> torch.Tensor:
        """Top-down feature pyramid over ``K`` ``(B, N, C)`` layer outputs (shallowest first) -> ``(B, N, C)``."""
        b, n, c = scales[0].shape
        levels, size = [], tuple(grid)
        for k, features in enumerate(scales):
            volume = features.transpose(1, 2).reshape(b, c, *grid)
            if k:
                size = tuple((s + 1) // 2 for s in size)
                volume = F.adaptive_avg_pool3d(volume, size)
            levels.append(volume)
        merged = None
        for k in reversed(range(len(levels))):
            lateral = self.fpn_lateral[k](levels[k].flatten(2).transpose(1, 2))
            lateral = lateral.transpose(1, 2).reshape(b, c, *levels[k].shape[2:])
            if merged is not None:
                lateral = lateral + F.interpolate(merged, size=lateral.shape[2:], mode="nearest")
            merged = self.fpn_smooth[k](lateral)
        return merged.flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------------------------------------- inference

    def forward(self, volume: torch.Tensor, region_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C_in, D, H, W)`` volume, optional ``(B, 1, D, H, W)`` region ids -> global embedding ``(B, out_dim)``.

        A thin wrapper of :meth:`encode` for tools that expect one tensor out, such as bundle inference.
        """
        return self.encode(volume, region_mask)["global"]

    def encode(self, volume: torch.Tensor, region_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every output of the encoder; shapes in the class docstring."""
        if isinstance(volume, MetaTensor):
            volume = volume.as_tensor()
        if isinstance(region_mask, MetaTensor):
            region_mask = region_mask.as_tensor()
        if not volume.is_floating_point():
            volume = volume.float()
        region_mask = self._check_inputs(volume, region_mask)
        b = volume.shape[0]
        grid = tuple(s // p for s, p in zip(volume.shape[2:], self.patch_size))
        impl = self.resolve_attention_impl(volume.device)
        if region_mask is None:
            region_mask = torch.zeros((b, 1, *volume.shape[2:]), dtype=torch.long, device=volume.device)

        x = self.patch_embed(volume).flatten(2).transpose(1, 2)  # (B, N, C)
        pos = self.position_embedding(grid)
        assignment = patch_region_assignment(region_mask, self.patch_size, self.num_regions)
        regions = self.region_encoder(
            _to_patches(volume, self.patch_size), _to_patches(region_mask, self.patch_size), assignment, pos
        )
        log_assignment = torch.log(assignment).clamp_min(_LOG_ZERO)
        tokens = self._run_blocks(x + pos.to(x.dtype), regions.to(x.dtype), log_assignment, grid, impl)
        out = self._pool(tokens, assignment)
        if self.seg_head is not None:
            out["seg_logits"] = _from_patches(self.seg_head(tokens), self.patch_size, grid)
        return out

    def _pool(self, tokens: torch.Tensor, assignment: torch.Tensor) -> dict[str, torch.Tensor]:
        mass = assignment[..., 1:].sum(1)  # (B, R): patches' worth of each region
        weights = assignment[..., 1:] / mass.clamp_min(1e-12).unsqueeze(1)
        region_tokens = torch.einsum("bnr,bnc->brc", weights.to(tokens.dtype), tokens)
        return {
            "global": self.global_head(tokens.mean(1)),
            "local": self.local_head(tokens),
            "region": self.region_head(region_tokens),
            # the local head is linear and bias-free, so this is the assignment-weighted mean of the region's
            # patch embeddings: what a reasoning step about the region is aligned with at patch level
            "region_local": self.local_head(region_tokens),
            "region_present": mass > 0,
            "tokens": tokens,
            "assignment": assignment,
        }


def ct_vit_base(**kwargs) -> CTViT:
    """Full size for one 80 GB GPU: 64 x 512 x 512 volumes, patch 4 x 16 x 16 (16,384 tokens), 768 wide, 12 blocks,
    12 heads, 8 regions, 512-d heads; 132.5M parameters (12.6M of them the positional grid). Gradient checkpointing
    is on by default."""
    return CTViT(**{"img_size": (64, 512, 512), "patch_size": (4, 16, 16), "hidden_size": 768, "num_layers": 12,
                    "num_heads": 12, "out_dim": 512, "gradient_checkpointing": True, **kwargs})


def ct_vit_small(**kwargs) -> CTViT:
    """32 x 256 x 256 volumes, patch 4 x 16 x 16 (2,048 tokens), 256 wide, 6 blocks, 8 heads, 256-d heads; 8.2M
    parameters."""
    return CTViT(**{"img_size": (32, 256, 256), "patch_size": (4, 16, 16), "hidden_size": 256, "num_layers": 6,
                    "num_heads": 8, "out_dim": 256, **kwargs})


def ct_vit_tiny(**kwargs) -> CTViT:
    """For tests and CPU demos: 16 x 64 x 64 volumes, patch 4 x 16 x 16 (64 tokens), 64 wide, 2 blocks, 4 heads;
    0.36M parameters."""
    return CTViT(**{"img_size": (16, 64, 64), "patch_size": (4, 16, 16), "hidden_size": 64, "num_layers": 2,
                    "num_heads": 4, "out_dim": 64, **kwargs})
