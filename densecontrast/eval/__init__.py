"""Quick evaluation of pre-trained backbones: correspondence accuracy and a dense linear probe.

``python -m densecontrast.eval CHECKPOINT`` writes a markdown report with both and the pictures.
"""

from densecontrast.eval.correspondence import correspondence_accuracy, match_correctness
from densecontrast.eval.linear_probe import dense_linear_probe, extract_dense_features, segmentation_metrics

__all__ = [
    "correspondence_accuracy",
    "dense_linear_probe",
    "extract_dense_features",
    "match_correctness",
    "segmentation_metrics",
]
