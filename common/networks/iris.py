"""IRIS: in-context segmentation of any structure from labelled reference examples.

Gao et al., "Show and Segment: Universal Medical Image Segmentation via In-Context Learning", CVPR 2025.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, MLPBlock, UnetResBlock
from monai.networks.blocks.dynunet_block import get_conv_layer
from monai.networks.layers import Conv
from torch import nn

from common.networks.memory_bank import ClassMemoryBank

__all__ = ["IRISNet", "iris_full", "iris_small", "masked_average_pool", "pixel_shuffle", "pixel_unshuffle"]

DEFAULT_NORM = ("instance", {"affine": True})
DEFAULT_ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def _linear_interp_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in) weights of 1D linear interpolation, identical to ``F.interpolate(..., align_corners=False)``."""
    eye = torch.eye(n_in, device=device, dtype=dtype).unsqueeze(0)
    return F.interpolate(eye, size=[n_out], mode="linear", align_corners=False)[0].transpose(0, 1)


def masked_average_pool(features: torch.Tensor, masks: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Average of (tri)linearly upsampled features under each mask.

    Equal to upsampling ``features`` to the mask grid and averaging under each mask, but the upsampled features are
    never materialised: upsampling is separable and linear, so the masks are contracted with the transposed 1D
    interpolation matrices instead (a full-size 256-channel 128^3 upsample would need 2 GB per reference).

    Args:
        features: ``(N, C, *spatial_low)``.
        masks: ``(N, K, *spatial_high)``, values in [0, 1].
        eps: floor of the mask volume, so an empty mask pools to zeros.

    Returns:
        ``(N, K, C)``.
    """
    weights = masks.to(features.dtype)
    for axis in range(features.dim() - 2):
        dim = axis + 2
        u = _linear_interp_matrix(features.shape[dim], masks.shape[dim], features.device, features.dtype)
        weights = torch.movedim(torch.movedim(weights, dim, -1) @ u, -1, dim)
    pooled = torch.einsum("nck,njk->njc", features.flatten(2), weights.flatten(2))
    return pooled / masks.flatten(2).sum(-1).to(features.dtype).clamp_min(eps).unsqueeze(-1)


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``(N, C * r^d, *s) -> (N, C, *(s * r))`` for 2D or 3D; the inverse of :func:`pixel_unshuffle`.

    Written with explicit reshapes because ``monai.networks.utils.pixelshuffle`` cannot be TorchScripted.
    """
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    d = len(spatial)
    c_out = c // int(scale**d)
    if d == 2:
        x = x.reshape(n, c_out, scale, scale, spatial[0], spatial[1]).permute(0, 1, 4, 2, 5, 3)
    else:
        x = x.reshape(n, c_out, scale, scale, scale, spatial[0], spatial[1], spatial[2])
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape([n, c_out] + [s * scale for s in spatial])


def pixel_unshuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """``(N, C, *s) -> (N, C * r^d, *(s / r))`` for 2D or 3D; every spatial size divisible by ``scale``."""
    n, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    low = [s // scale for s in spatial]
    if len(spatial) == 2:
        x = x.reshape(n, c, low[0], scale, low[1], scale).permute(0, 1, 3, 5, 2, 4)
    else:
        x = x.reshape(n, c, low[0], scale, low[1], scale, low[2], scale).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape([n, c * int(scale ** len(spatial))] + low)


class _Attention(nn.Module):
    """Pre-norm residual multi-head attention: ``q + MHA(LN(q), LN(kv))``."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(kv)
        return q + self.attn(self.norm_q(q), kv, kv, need_weights=False)[0]


class _FeedForward(nn.Module):
    """Pre-norm residual MLP."""

    def __init__(self, dim: int, mlp_ratio: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, dim * mlp_ratio, dropout_rate=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _ResidualEncoder(nn.Module):
    """Stem plus stride-2 residual stages; returns the features of every stage, finest first."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int], norm, act) -> None:
        super().__init__()
        self.stem = UnetResBlock(spatial_dims, in_channels, channels[0], 3, 1, norm_name=norm, act_name=act)
        self.stages = nn.ModuleList(
            UnetResBlock(spatial_dims, c_in, c_out, 3, 2, norm_name=norm, act_name=act)
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stem(x)]
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features


class _TaskEncoder(nn.Module):
    """Task embedding of each class from reference features and masks: ``(N, K, m + 1, C)``.

    Token 0 is the foreground-pooled feature. Tokens 1..m are learnable queries that cross-attend to a context
    stream: the features are expanded and pixel-shuffled to the mask grid, concatenated with the mask, convolved,
    and unshuffled back, so the mask's fine detail conditions the context tokens.
    """

    def __init__(
        self, spatial_dims: int, channels: int, scale: int, num_tokens: int, num_heads: int, mlp_ratio: int, norm, act
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.scale = scale
        r = scale**spatial_dims
        self.context_channels = max(1, math.ceil(channels / r))
        conv = Conv[Conv.CONV, spatial_dims]
        self.pre_shuffle = conv(channels, self.context_channels * r, kernel_size=1)
        self.context_conv = Convolution(
            spatial_dims, self.context_channels + 1, self.context_channels, kernel_size=3, norm=norm, act=act
        )
        self.post_unshuffle = conv(self.context_channels * r, channels, kernel_size=1)
        self.query_tokens = nn.Parameter(torch.randn(num_tokens, channels) * channels**-0.5)
        self.cross_attn = _Attention(channels, num_heads)
        self.self_attn = _Attention(channels, num_heads)
        self.mlp = _FeedForward(channels, mlp_ratio)

    def forward(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``(B, R, C, *low)`` features and ``(B, R, K, *high)`` masks of R references -> ``(B, K, m + 1, C)``.

        References with an empty mask for a class are left out of that class's average.
        """
        b, r, k = masks.shape[0], masks.shape[1], masks.shape[2]
        embeddings = self._encode(features.flatten(0, 1), masks.flatten(0, 1))
        embeddings = embeddings.view(b, r, k, embeddings.shape[2], embeddings.shape[3])
        present = (masks.flatten(3).amax(-1) > 0).to(embeddings.dtype)  # (B, R, K)
        weights = present / present.sum(1, keepdim=True).clamp_min(1.0)
        return (embeddings * weights[..., None, None]).sum(1)

    def _encode(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``(N, C, *low)`` features and ``(N, K, *high)`` masks -> ``(N, K, m + 1, C)``."""
        n, k = masks.shape[0], masks.shape[1]
        foreground = masked_average_pool(features, masks)  # (N, K, C)
        context = pixel_shuffle(self.pre_shuffle(features), self.scale)
        context = context.repeat_interleave(k, dim=0)
        context = torch.cat([context, masks.flatten(0, 1).unsqueeze(1).to(context.dtype)], dim=1)
        context = pixel_unshuffle(self.context_conv(context), self.scale)
        context = self.post_unshuffle(context) + features.repeat_interleave(k, dim=0)
        context = context.flatten(2).transpose(1, 2)  # (N*K, L, C)
        tokens = self.query_tokens.unsqueeze(0).expand(n * k, -1, -1)
        tokens = self.cross_attn(tokens, context)
        tokens = self.mlp(self.self_attn(tokens, tokens))
        tokens = torch.cat([foreground.flatten(0, 1).unsqueeze(1), tokens], dim=1)
        return tokens.view(n, k, tokens.shape[1], tokens.shape[2])


class _BidirectionalBlock(nn.Module):
    """Tokens attend to features, features attend to tokens, then token self-attention and MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.tokens_to_features = _Attention(dim, num_heads)
        self.features_to_tokens = _Attention(dim, num_heads)
        self.token_self_attn = _Attention(dim, num_heads)
        self.token_mlp = _FeedForward(dim, mlp_ratio)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens_to_features(tokens, features)
        features = self.features_to_tokens(features, tokens)
        tokens = self.token_mlp(self.token_self_attn(tokens, tokens))
        return features, tokens


class _FiLMUpStage(nn.Module):
    """Transposed-conv upsampling with skip fusion, then FiLM ``x * (1 + gamma) + beta`` from the task summary."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, embed_dim: int, norm, act) -> None:
        super().__init__()
        self.up = get_conv_layer(
            spatial_dims, in_channels, out_channels, kernel_size=2, stride=2, conv_only=True, is_transposed=True
        )
        self.fuse = UnetResBlock(spatial_dims, 2 * out_channels, out_channels, 3, 1, norm_name=norm, act_name=act)
        self.film = nn.Linear(embed_dim, 2 * out_channels)
        # zero init: every stage starts as the identity modulation
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, task_summary: torch.Tensor) -> torch.Tensor:
        x = self.fuse(torch.cat([self.up(x), skip], dim=1))
        gamma, beta = self.film(task_summary).chunk(2, dim=-1)
        shape = [x.shape[0], x.shape[1]] + [1] * (x.dim() - 2)
        return x * (1.0 + gamma.reshape(shape)) + beta.reshape(shape)


class IRISNet(nn.Module):
    """IRIS in-context segmentation network with a class memory bank.

    A residual UNet encoder (stem plus ``len(channels) - 1`` stride-2 stages, instance norm, LeakyReLU 0.01)
    encodes both the query and the reference images. The task encoder turns each reference mask into a task
    embedding of ``m + 1`` tokens per class; embeddings of several references are averaged. The mask decoder runs
    bidirectional cross-attention between the query's deepest features and each class's tokens, then upsamples
    with skips and FiLM conditioning to one logit map per class, all classes in one pass.

    Shapes (3D; 2D works the same with ``spatial_dims=2``):
        - ``image``: ``(B, in_channels, D, H, W)``; every spatial size divisible by ``2 ** (len(channels) - 1)``.
        - ``ref_image``: ``(B, R, in_channels, D, H, W)`` for R references, or ``(B, in_channels, D, H, W)``.
        - ``ref_mask``: ``(B, R, K, D, H, W)`` binary masks of K classes, or ``(B, K, D, H, W)``.
        - task embeddings: ``(B, K, m + 1, C)`` with ``C = channels[-1]``.
        - output: ``(B, K, D, H, W)`` logits, one channel per requested class.

    Args:
        spatial_dims: 2 or 3. Default 3.
        in_channels: image channels. Default 1.
        channels: encoder channels, stem first. Default ``(32, 64, 128, 256)``.
        num_query_tokens: learnable query tokens ``m`` of the task encoder. Default 8.
        num_heads: attention heads; must divide ``channels[-1]``. Default 8.
        mlp_ratio: hidden width of the token MLPs relative to ``channels[-1]``. Default 4.
        decoder_depth: bidirectional attention blocks in the decoder. Default 2.
        memory_capacity: classes the memory bank can hold. Default 128.
        memory_momentum: EMA momentum of the memory bank. Default 0.999.
        norm: MONAI norm spec. Default instance norm with affine.
        act: MONAI activation spec. Default LeakyReLU(0.01).

    Example::

        net = iris_small()
        logits = net(torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32), torch.ones(1, 2, 32, 32, 32))
        logits.shape  # (1, 2, 32, 32, 32)
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        num_query_tokens: int = 8,
        num_heads: int = 8,
        mlp_ratio: int = 4,
        decoder_depth: int = 2,
        memory_capacity: int = 128,
        memory_momentum: float = 0.999,
        norm: tuple | str = DEFAULT_NORM,
        act: tuple | str = DEFAULT_ACT,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims should be 2 or 3, got {spatial_dims}.")
        if len(channels) < 2:
            raise ValueError(f"channels should list at least two stages, got {channels}.")
        if channels[-1] % num_heads != 0:
            raise ValueError(f"num_heads should divide channels[-1]={channels[-1]}, got {num_heads}.")
        if num_query_tokens < 1 or decoder_depth < 1:
            raise ValueError(
                f"num_query_tokens and decoder_depth should be >= 1, got {num_query_tokens}, {decoder_depth}."
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.divisor = 2 ** (len(channels) - 1)
        embed_dim = channels[-1]
        self.encoder = _ResidualEncoder(spatial_dims, in_channels, channels, norm, act)
        self.task_encoder = _TaskEncoder(
            spatial_dims, embed_dim, self.divisor, num_query_tokens, num_heads, mlp_ratio, norm, act
        )
        self.decoder_blocks = nn.ModuleList(
            _BidirectionalBlock(embed_dim, num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(embed_dim)
        self.up_stages = nn.ModuleList(
            _FiLMUpStage(spatial_dims, c_in, c_out, embed_dim, norm, act)
            for c_in, c_out in zip(channels[::-1][:-1], channels[::-1][1:])
        )
        self.head = Conv[Conv.CONV, spatial_dims](channels[0], 1, kernel_size=1)
        self.memory_bank = ClassMemoryBank(num_query_tokens + 1, embed_dim, memory_capacity, memory_momentum)

    def _check_image(self, image: torch.Tensor, name: str) -> None:
        if image.dim() != self.spatial_dims + 2 or image.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} should have shape (B, {self.in_channels}, *spatial) with {self.spatial_dims} spatial dims, "
                f"got {list(image.shape)}."
            )
        for s in image.shape[2:]:
            if s % self.divisor != 0:
                raise ValueError(
                    f"{name} spatial sizes should be divisible by {self.divisor}, got {list(image.shape)}."
                )

    def encode_task(self, ref_image: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
        """Task embeddings ``(B, K, m + 1, C)`` from references; references with an empty mask for a class are
        left out of that class's average."""
        if ref_image.dim() == self.spatial_dims + 2:
            ref_image, ref_mask = ref_image.unsqueeze(1), ref_mask.unsqueeze(1)
        if ref_image.shape[:2] != ref_mask.shape[:2] or ref_image.shape[3:] != ref_mask.shape[3:]:
            raise ValueError(
                f"ref_image {list(ref_image.shape)} and ref_mask {list(ref_mask.shape)} should share batch, "
                "reference and spatial sizes."
            )
        images = ref_image.flatten(0, 1)
        self._check_image(images, "ref_image")
        features = self.encoder(images)[-1]
        features = features.view([ref_image.shape[0], ref_image.shape[1]] + list(features.shape[1:]))
        return self.task_encoder(features, ref_mask)

    def segment(self, image: torch.Tensor, task_embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K, *spatial)`` of ``image`` for each class of ``task_embeddings`` ``(B or 1, K, T, C)``."""
        self._check_image(image, "image")
        return self._decode(self.encoder(image), task_embeddings)

    def _decode(self, features: list[torch.Tensor], task_embeddings: torch.Tensor) -> torch.Tensor:
        b = features[0].shape[0]
        if task_embeddings.dim() != 4 or task_embeddings.shape[0] not in (1, b):
            raise ValueError(
                f"task_embeddings should have shape (1 or {b}, K, T, C), got {list(task_embeddings.shape)}."
            )
        if task_embeddings.shape[0] != b:
            task_embeddings = task_embeddings.expand(b, -1, -1, -1)
        k = task_embeddings.shape[1]
        x = features[-1].repeat_interleave(k, dim=0)  # (B*K, C, *low)
        tokens = task_embeddings.flatten(0, 1)
        seq = x.flatten(2).transpose(1, 2)
        for block in self.decoder_blocks:
            seq, tokens = block(seq, tokens)
        x = self.decoder_norm(seq).transpose(1, 2).reshape(x.shape)
        summary = tokens.mean(dim=1)
        n_skips = len(features) - 1
        for i, stage in enumerate(self.up_stages):
            x = stage(x, features[n_skips - 1 - i].repeat_interleave(k, dim=0), summary)
        logits = self.head(x)
        return logits.reshape([b, k] + list(logits.shape[2:]))

    def forward(self, image: torch.Tensor, ref_image: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
        """One-pass in-context segmentation: ``segment(image, encode_task(ref_image, ref_mask))``.

        When query and references share a grid, one encoder pass takes them all as a batch (the same result, as
        instance norm is per sample), which is markedly faster, especially for single queries on CPU.
        """
        if ref_image.dim() == self.spatial_dims + 2:
            ref_image, ref_mask = ref_image.unsqueeze(1), ref_mask.unsqueeze(1)
        if ref_image.shape[3:] != image.shape[2:] or ref_image.shape[2] != image.shape[1]:
            return self.segment(image, self.encode_task(ref_image, ref_mask))
        self._check_image(image, "image")
        if ref_image.shape[:2] != ref_mask.shape[:2] or ref_image.shape[3:] != ref_mask.shape[3:]:
            raise ValueError(
                f"ref_image {list(ref_image.shape)} and ref_mask {list(ref_mask.shape)} should share batch, "
                "reference and spatial sizes."
            )
        b, r = image.shape[0], ref_image.shape[1]
        features = self.encoder(torch.cat([image, ref_image.flatten(0, 1)], dim=0))
        ref_features = features[-1][b:]
        ref_features = ref_features.view([ref_image.shape[0], r] + list(ref_features.shape[1:]))
        task_embeddings = self.task_encoder(ref_features, ref_mask)
        return self._decode([f[:b] for f in features], task_embeddings)


def iris_full(**kwargs) -> IRISNet:
    """IRIS at its published size: 32-64-128-256 channels, 8 query tokens, 8 heads, for 128^3 inputs."""
    return IRISNet(**{"channels": (32, 64, 128, 256), "num_query_tokens": 8, "num_heads": 8, **kwargs})


def iris_small(**kwargs) -> IRISNet:
    """A CPU-sized IRIS for tests and quick runs: 8-16-32-64 channels, 4 query tokens, 4 heads."""
    return IRISNet(
        **{"channels": (8, 16, 32, 64), "num_query_tokens": 4, "num_heads": 4, "mlp_ratio": 2, **kwargs}
    )
