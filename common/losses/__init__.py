"""Losses."""

from .ignore_channels import IgnoreChannelsLoss
