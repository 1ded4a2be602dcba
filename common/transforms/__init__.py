"""MONAI dictionary transforms."""

from .intensity import CT_WINDOWS, NormalizeIntensityd
from .labels import ProbabilitiesToLabelMapd, class_values
from .outputs import CheckOutputsd, SaveOrthogonalPreviewd, SaveSegmentationSummaryd, output_path
from .validation import ValidateImaged, source_name
