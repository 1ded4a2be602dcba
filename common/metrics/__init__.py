"""Metrics: plain functions over tensors and the ignite metrics built on them."""

from .multilabel import format_table, multilabel_report, roc_auc, select_thresholds
from .retrieval import (
    RetrievalMetric,
    cross_modal_recall,
    recall_at_k,
    region_alignment_accuracy,
    retrieval_metrics,
    retrieval_table,
    step_patch_auc,
)
