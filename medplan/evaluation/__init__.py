"""Evaluation: the paper's metrics (:mod:`medplan.metrics`), aggregation and reports."""
from medplan.metrics import (
    MetricAccumulator,
    confusion_counts,
    logits_to_labels,
    logits_to_probs,
    probabilities_to_labels,
    summarize,
    summary_dict,
)

__all__ = [
    "MetricAccumulator",
    "confusion_counts",
    "logits_to_labels",
    "logits_to_probs",
    "probabilities_to_labels",
    "summarize",
    "summary_dict",
]
