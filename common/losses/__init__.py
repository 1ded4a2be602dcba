"""Losses."""

from .ignore_channels import IgnoreChannelsLoss
from .prototype_contrastive import PrototypeContrastiveLoss
