"""MONAI dictionary transforms."""

from .clahe import CLAHEd
from .concepts import LoadConceptMasksd
from .detection import DetectionBoxesd, SaveDetectionsd, detections_report
from .embeddings import EMBEDDING_OUTPUTS, SaveEmbeddingsd
from .explanations import SaveConceptExplanationd
from .intensity import CT_WINDOWS, ScaleIntensityWindowd
from .io import LoadMedicalImaged
from .labels import ClassMasksd, ProbabilitiesToLabelMapd, class_values, most_probable_class
from .outputs import CheckOutputsd, SaveOrthogonalPreviewd, SaveSegmentationSummaryd, output_path
from .report_outputs import CheckReportOutputsd, ReportLabelsCSVWriter, SaveReportLabelsd, report_output_path
from .validation import CheckSameGridd, ValidateImaged, ValidateRegionMaskd, ValidateReportd, source_name
