"""Pure math: no Lightning import, no logging, no I/O. Device measurements are tensor functions
with no host sync (except where a docstring says so, e.g. ``CollapseAccumulator.compute``); the
decisions (baselines, windows, rules' statistics) are small stateful objects on the host in
float64 numpy (:mod:`~lightning_diag.metrics.state`). Tested against float64 references."""

from lightning_diag.metrics.collapse import CollapseAccumulator, neural_collapse_metrics
from lightning_diag.metrics.logits import (
    AttentionLogitRecorder,
    AttentionLogitStats,
    OutputLogitStats,
    attention_logit_stats,
    mha_attention_stats,
    output_logit_stats,
    sdpa_attention_stats,
)
from lightning_diag.metrics.neural_collapse import NeuralCollapse
from lightning_diag.metrics.norms import count_nonfinite, grouped_norms, tensor_norms, total_norm
from lightning_diag.metrics.sharpness import (
    EigenEstimate,
    GroupStability,
    HessianVectorProduct,
    SharpnessEstimator,
    SharpnessResult,
    TrainingStateGuard,
    hutchinson_trace,
    optimizer_stability,
    random_unit_vector,
    top_eigenvalue,
)
from lightning_diag.metrics.spectral import (
    AlignmentSummary,
    alignment_histogram,
    alignment_summary,
    power_iteration,
    spectral_alignment,
    stable_rank,
)
from lightning_diag.metrics.state import Stateful
from lightning_diag.metrics.stats import EmaBaseline, zclip_coefficient
from lightning_diag.metrics.windows import RollingWindow, linear_fit

__all__ = [
    "AlignmentSummary",
    "AttentionLogitRecorder",
    "AttentionLogitStats",
    "CollapseAccumulator",
    "EigenEstimate",
    "EmaBaseline",
    "GroupStability",
    "HessianVectorProduct",
    "NeuralCollapse",
    "OutputLogitStats",
    "RollingWindow",
    "SharpnessEstimator",
    "SharpnessResult",
    "Stateful",
    "TrainingStateGuard",
    "alignment_histogram",
    "alignment_summary",
    "attention_logit_stats",
    "count_nonfinite",
    "grouped_norms",
    "hutchinson_trace",
    "linear_fit",
    "mha_attention_stats",
    "neural_collapse_metrics",
    "optimizer_stability",
    "output_logit_stats",
    "power_iteration",
    "random_unit_vector",
    "sdpa_attention_stats",
    "spectral_alignment",
    "stable_rank",
    "tensor_norms",
    "top_eigenvalue",
    "total_norm",
    "zclip_coefficient",
]
