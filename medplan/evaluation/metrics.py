"""The paper's metrics, imported from here as well: they live in :mod:`medplan.metrics`, below
the trainers (validation) and inference that use them too (issue 12, one-way layering)."""
from medplan.metrics import (  # noqa: F401
    LOSSES,
    MetricAccumulator,
    confusion_counts,
    logits_to_labels,
    logits_to_probs,
    probabilities_to_labels,
    summarize,
    summary_dict,
)

__all__ = [
    "LOSSES",
    "MetricAccumulator",
    "confusion_counts",
    "logits_to_labels",
    "logits_to_probs",
    "probabilities_to_labels",
    "summarize",
    "summary_dict",
]
