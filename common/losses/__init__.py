"""Losses."""

from .contrastive import MultiLevelContrastiveLoss, SymmetricInfoNCE
from .ignore_channels import IgnoreChannelsLoss
from .prototype_contrastive import PrototypeContrastiveLoss
