"""Networks: ``nn.Module`` definitions only, no I/O."""

from .backbones import BACKBONES, build_backbone, load_backbone_weights
from .csr import CSRNet, csr_densenet121, csr_resnet50, csr_tiny, csr_vit_b16
from .iris import IRISNet, iris_full, iris_small, masked_average_pool, pixel_shuffle, pixel_unshuffle
from .memory_bank import ClassMemoryBank
