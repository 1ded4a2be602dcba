"""Training and inference steps plugged into MONAI workflows."""

from .autocast import AutocastInferer
from .concept_evaluation import evaluate_concept_model, peak_inside
from .concepts import (
    ConceptStageTrainer,
    ExplainingModel,
    ExplanationInferer,
    PrepareBatchLabelKey,
    concept_similarity,
    csr_network,
)
from .contrastive import (
    ContrastiveTrainer,
    EncodingInferer,
    ImageTextModel,
    PrepareVolumeBatch,
    TrainableState,
    embed_texts,
)
from .detection import (
    Letterbox,
    YOLODetectionInferer,
    boxes_to_original,
    letterbox,
    letterbox_geometry,
    non_max_suppression,
)
from .detection_metrics import detection_map, map_markdown, write_map_report
from .episodes import fill_memory_bank, prepare_episode_batch
from .steps import StepTrainer, optimisation_step
from .evaluation import (
    BASELINES,
    CopyReference,
    Foreground,
    IntensityMatch,
    copy_reference_masks,
    evaluate_strategies,
    per_class_dice_table,
)
from .evaluator import InContextEvaluator, labels_to_class_channels
from .prompt import STRATEGIES, InContextPrompt
from .report_baselines import KeywordLabeler, TfidfLabeler
from .report_labeler import (
    ProgressiveFineTuning,
    ReportFindingsd,
    ReportLabelerLoss,
    ThresholdSelection,
    TokenizeReportd,
    evaluate_report_labeler,
    layerwise_param_groups,
    load_weights,
    predict_reports,
    prepare_report_batch,
    span_metrics,
)
from .retrieval import RetrievalEvaluator, evaluate_retrieval
from .robust import CasesFailedError, RobustEvaluator
from .utils import unwrap
