from __future__ import annotations

import torch

import common.engines
from common.engines.utils import unwrap


def test_unwrap():
    inner = torch.nn.Linear(2, 2)
    assert unwrap(torch.nn.DataParallel(inner)) is inner
    assert unwrap(inner) is inner
    assert common.engines.unwrap is unwrap
