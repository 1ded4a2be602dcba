"""Ignite/MONAI handlers."""

from .case_report import CaseReportWriter
from .checkpoint import FinalWeights, ResumableCheckpoint, checkpoint_pattern, latest_checkpoint
from .concepts import ConceptIntervention, PrototypeKMeansInit
from .dataset_epoch import DatasetEpochHandler
from .detection_map import DetectionMAP
from .embedding_index import EmbeddingIndexWriter
from .gradient_clipping import GradientClipping
from .memory_bank import MemoryBankUpdater
