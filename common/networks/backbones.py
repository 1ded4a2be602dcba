"""2D feature backbones for image-level classifiers that need a spatial feature map (CAMs, prototypes).

Every backbone maps ``(B, in_channels, H, W) -> (B, F, h, w)``; :func:`build_backbone` returns it with ``F``.
Nothing is ever downloaded: pretrained weights come from a local file through ``weights_path``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.nets import DenseNet121
from monai.utils import look_up_option
from torch import nn
from torchvision.models import resnet18, resnet50, vit_b_16

__all__ = ["BACKBONES", "VIT_IMAGE_SIZE", "build_backbone", "load_backbone_weights"]

VIT_IMAGE_SIZE = 224
# prefixes that training wrappers put in front of a backbone's keys (DataParallel, SSL heads, MAE encoders)
_STRIP_PREFIXES = ("module.", "backbone.", "encoder.", "model.")
# keys under which checkpoints nest the state dict (Lightning, MAE / timm, MONAI CheckpointSaver)
_WRAPPER_KEYS = ("state_dict", "model", "network")


class _DenseNetFeatures(nn.Module):
    """MONAI DenseNet121 ``features`` followed by the ReLU that its classifier applies first.

    The attribute is named ``features`` so the keys equal those of a full MONAI ``DenseNet121`` state dict.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.features = DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=1).features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.features(x))


class _ViTPatchFeatures(nn.Module):
    """torchvision ViT-B/16 encoder returning the patch tokens, class token dropped, as a 14 x 14 map.

    The class token still takes part in attention, as in the classifier. Attribute names equal torchvision's, so
    a ``vit_b_16`` state dict loads directly (its ``heads`` are left out).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        vit = vit_b_16(weights=None, image_size=VIT_IMAGE_SIZE)
        self.image_size = VIT_IMAGE_SIZE
        self.patch_size = vit.patch_size
        self.hidden_dim = vit.hidden_dim
        self.conv_proj = vit.conv_proj
        if in_channels != 3:
            self.conv_proj = nn.Conv2d(in_channels, vit.hidden_dim, kernel_size=vit.patch_size, stride=vit.patch_size)
            # same initialisation as torchvision's patchify stem
            fan_in = in_channels * vit.patch_size * vit.patch_size
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1.0 / fan_in))
            nn.init.zeros_(self.conv_proj.bias)
        self.class_token = vit.class_token
        self.encoder = vit.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != self.image_size or x.shape[3] != self.image_size:
            # the learned position embedding has a fixed number of tokens
            raise ValueError(
                f"image should be {self.image_size} x {self.image_size} for vit_b_16, got {x.shape[2]} x {x.shape[3]}."
            )
        n = x.shape[0]
        x = self.conv_proj(x)
        h, w = x.shape[2], x.shape[3]
        tokens = torch.cat([self.class_token.expand(n, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        tokens = self.encoder(tokens)[:, 1:]
        return tokens.transpose(1, 2).reshape(n, self.hidden_dim, h, w)


def _resnet(factory: Callable[..., nn.Module], in_channels: int, last_layer: int = 4) -> nn.Module:
    net = factory(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    names = ("conv1", "bn1", "relu", "maxpool", *(f"layer{i}" for i in range(1, last_layer + 1)))
    # torchvision's child names are kept, so a resnet state dict loads without renaming
    return nn.Sequential(OrderedDict((name, getattr(net, name)) for name in names))


def _tiny(in_channels: int) -> nn.Module:
    """Three stride-2 conv-BN-ReLU stages, 8-16-32 channels, output stride 8; for tests and CPU demos."""
    channels = (in_channels, 8, 16, 32)
    return nn.Sequential(
        *(
            Convolution(2, c_in, c_out, strides=2, kernel_size=3, norm="batch", act="relu")
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
    )


_DENSE_LAYER_KEY = re.compile(r"^(.*denselayer\d+\.)(?:layers\.)?(norm|relu|conv)\.?(\d)\.(.+)$")
_VIT_KEY_RULES = [
    (re.compile(r"^cls_token$"), "class_token"),
    (re.compile(r"^pos_embed$"), "encoder.pos_embedding"),
    (re.compile(r"^patch_embed\.proj\."), "conv_proj."),
    (re.compile(r"^norm\."), "encoder.ln."),
    (re.compile(r"^blocks\.(\d+)\.norm1\."), r"encoder.layers.encoder_layer_\1.ln_1."),
    (re.compile(r"^blocks\.(\d+)\.norm2\."), r"encoder.layers.encoder_layer_\1.ln_2."),
    (re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"),
     r"encoder.layers.encoder_layer_\1.self_attention.in_proj_\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\."), r"encoder.layers.encoder_layer_\1.self_attention.out_proj."),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc1\."), r"encoder.layers.encoder_layer_\1.mlp.0."),
    (re.compile(r"^blocks\.(\d+)\.mlp\.fc2\."), r"encoder.layers.encoder_layer_\1.mlp.3."),
]


def _densenet_key(key: str) -> str:
    """torchvision DenseNet names (``denselayer1.norm1``, legacy ``denselayer1.norm.1``) -> MONAI's."""
    return _DENSE_LAYER_KEY.sub(r"\1layers.\2\3.\4", key)


def _vit_key(key: str) -> str:
    """timm / MAE ViT names (``blocks.0.attn.qkv``, the layout MedMAE checkpoints use) -> torchvision's.

    Both stack q, k and v in one ``(3 * dim, dim)`` projection, so the tensors map one to one.
    """
    for pattern, replacement in _VIT_KEY_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def _identity_key(key: str) -> str:
    return key


# name -> (builder taking in_channels, output channels F, key of the first conv's weight, checkpoint key mapping)
BACKBONES: dict[str, tuple[Callable[[int], nn.Module], int, str, Callable[[str], str]]] = {
    "densenet121": (_DenseNetFeatures, 1024, "features.conv0.weight", _densenet_key),
    "resnet50": (lambda c: _resnet(resnet50, c), 2048, "conv1.weight", _identity_key),
    "resnet18": (lambda c: _resnet(resnet18, c), 512, "conv1.weight", _identity_key),
    # stops after layer3: output stride 16, so CPU-sized inputs keep usable similarity maps (12 x 12 at 192)
    "resnet18_os16": (lambda c: _resnet(resnet18, c, last_layer=3), 256, "conv1.weight", _identity_key),
    "vit_b_16": (_ViTPatchFeatures, 768, "conv_proj.weight", _vit_key),
    "tiny": (_tiny, 32, "0.conv.weight", _identity_key),
}


def build_backbone(
    name: str, in_channels: int, spatial_dims: int = 2, weights_path: str | Path | None = None
) -> tuple[nn.Module, int]:
    """Build a named 2D backbone, optionally with weights from a local file.

    ============  ======  ==============================================================================
    name          F       ``(B, C, H, W) -> (B, F, h, w)``
    ============  ======  ==============================================================================
    densenet121   1024    MONAI ``DenseNet121.features`` + ReLU; ``h, w = H / 32, W / 32`` (sizes >= 32)
    resnet50      2048    torchvision ResNet-50 up to ``layer4``; ``h, w = ceil(H / 32), ceil(W / 32)``
    resnet18      512     torchvision ResNet-18 up to ``layer4``; ``h, w = ceil(H / 32), ceil(W / 32)``
    resnet18_os16 256     torchvision ResNet-18 up to ``layer3``; ``h, w = ceil(H / 16), ceil(W / 16)``
    vit_b_16      768     torchvision ViT-B/16 patch tokens; ``H = W = 224`` only, ``h = w = 14``
    tiny          32      three conv-BN-ReLU stages (8-16-32), ``h, w = ceil(H / 8), ceil(W / 8)``
    ============  ======  ==============================================================================

    Args:
        name: one of the names above.
        in_channels: image channels; the first conv is built for them (1 for chest X-rays).
        spatial_dims: only 2 is supported. Default 2.
        weights_path: a local checkpoint loaded with :func:`load_backbone_weights`. Default None (random init).

    Returns:
        ``(backbone, F)``.

    Example::

        backbone, channels = build_backbone("tiny", in_channels=1)
        backbone(torch.rand(2, 1, 64, 64)).shape  # (2, 32, 8, 8); channels == 32
    """
    if spatial_dims != 2:
        raise ValueError(f"spatial_dims should be 2, got {spatial_dims}.")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels should be a positive integer, got {in_channels}.")
    builder, channels, stem_key, translate = look_up_option(name, BACKBONES)
    backbone = builder(in_channels)
    if weights_path is not None:
        load_backbone_weights(backbone, weights_path, stem_key=stem_key, translate=translate)
    return backbone, channels


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ValueError(f"weights_path should be an existing file, got {path}.")
    try:
        # weights_only: a checkpoint is data, never code to run
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"weights_path should be a torch state dict file, got {path} ({type(e).__name__}).") from e
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights_path should hold a state dict, got {path} holding {type(obj).__name__}.")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _target_key(key: str, target: Mapping[str, torch.Tensor], translate: Callable[[str], str]) -> str | None:
    """The backbone key of a checkpoint key: as is, translated, or after stripping wrapper prefixes one by one."""
    candidate = key
    while True:
        for name in (candidate, translate(candidate)):
            if name in target:
                return name
        prefix = next((p for p in _STRIP_PREFIXES if candidate.startswith(p)), None)
        if prefix is None:
            return None
        candidate = candidate[len(prefix):]


def _adapt_stem(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """First-conv weights for ``in_channels`` inputs.

    One channel: the sum over the checkpoint's channels, so a grey image ``x`` replicated to RGB gives the same
    response as ``x`` alone. Otherwise the checkpoint's channels are cycled and scaled by ``c_ckpt / in_channels``.
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = math.ceil(in_channels / weight.shape[1])
    return weight.repeat(1, reps, 1, 1)[:, :in_channels] * (weight.shape[1] / in_channels)


def _key_list(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def load_backbone_weights(
    backbone: nn.Module,
    weights_path: str | Path,
    stem_key: str | None = None,
    translate: Callable[[str], str] = _identity_key,
) -> tuple[list[str], list[str]]:
    """Load a local checkpoint into ``backbone``, keeping what matches.

    The checkpoint may nest its state dict under ``state_dict``, ``model`` or ``network``. Each key is matched as
    is, through ``translate`` (e.g. timm -> torchvision ViT names), and after stripping the prefixes ``module.``,
    ``backbone.``, ``encoder.`` and ``model.`` one at a time; classifier heads and other extra keys are ignored.
    The weight at ``stem_key`` is adapted when its input channels differ (see ``_adapt_stem``: summed for one
    channel). Backbone keys the file does not provide keep their initialisation, with a warning.

    Args:
        backbone: the module to load into.
        weights_path: a file written by ``torch.save``, read with ``weights_only=True``.
        stem_key: state-dict key of the first conv's weight. Default None (no adaptation).
        translate: maps a checkpoint key to a backbone key. Default identity.

    Returns:
        ``(missing, unexpected)``: backbone keys left at their initialisation and checkpoint keys not used.

    Raises:
        ValueError: the file is missing or unreadable, no key matches, or a matched tensor has the wrong shape.
    """
    path = Path(weights_path)
    source = _read_state_dict(path)
    target = backbone.state_dict()
    matched: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for key, value in source.items():
        name = _target_key(key, target, translate)
        if name is None:
            unexpected.append(key)
            continue
        expected = target[name].shape
        if name == stem_key and value.dim() == 4 and value.shape[1] != expected[1]:
            value = _adapt_stem(value, expected[1])
        if value.shape != expected:
            mismatched.append(f"{key} {list(value.shape)} != {list(expected)}")
            continue
        matched[name] = value
    # BatchNorm step counters are absent from many published checkpoints and unused in eval
    missing = [k for k in target if k not in matched and not k.endswith("num_batches_tracked")]
    if mismatched:
        raise ValueError(f"weights_path {path} should match the backbone's shapes, got {_key_list(mismatched)}.")
    if not matched:
        raise ValueError(
            f"weights_path {path} should hold weights of this backbone, got no matching key: "
            f"missing keys {_key_list(missing)}, unexpected keys {_key_list(unexpected)}."
        )
    backbone.load_state_dict(matched, strict=False)
    if missing:
        warnings.warn(f"{path}: {len(missing)} backbone keys keep their initialisation: {_key_list(missing)}.")
    return missing, unexpected
