"""A stand-in detector with a known answer, for checking box coordinates end to end through the bundle."""

from __future__ import annotations

import torch
from torch import nn


class BrightBoxDetector(nn.Module):
    """Finds the bounding box of the pixels above ``threshold`` and reports it as one YOLO prediction.

    Output as ``common.networks.yolo.YOLODetector``'s in eval mode: ``(B, 4 + num_classes, 1)``, the box centre and
    size in input pixels and a score of 0.9 for class ``box_class`` (0 for the others). Pixel ``(r, c)`` spans
    ``[c, c + 1) x [r, r + 1)``, so a single bright pixel at column 3 gives ``x0 = 3, x1 = 4``.
    """

    def __init__(self, num_classes: int = 11, box_class: int = 2, threshold: float = 0.75, **_unused) -> None:
        super().__init__()
        self.num_classes, self.box_class, self.threshold = num_classes, box_class, threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 4 + self.num_classes, 1)
        for i, image in enumerate(x[:, 0]):
            rows, cols = torch.nonzero(image > self.threshold, as_tuple=True)
            if len(rows):
                x0, x1, y0, y1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
                out[i, :4, 0] = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]).float()
                out[i, 4 + self.box_class, 0] = 0.9
        return out
