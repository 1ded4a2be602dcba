"""Networks: ``nn.Module`` definitions only, no I/O."""

from .iris import IRISNet, iris_full, iris_small, masked_average_pool, pixel_shuffle, pixel_unshuffle
from .memory_bank import ClassMemoryBank
