"""Pure math: no Lightning import, no logging, no I/O. Device measurements are tensor functions
with no host sync (except where a docstring says so, e.g. ``CollapseAccumulator.compute``); the
decisions (baselines, windows, rules' statistics) are small stateful objects on the host in
float64 numpy (:mod:`~lightning_diag.metrics.state`). Tested against float64 references."""

from lightning_diag.metrics.collapse import CollapseAccumulator, neural_collapse_metrics
from lightning_diag.metrics.neural_collapse import NeuralCollapse
from lightning_diag.metrics.norms import count_nonfinite, grouped_norms, tensor_norms, total_norm
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
    "CollapseAccumulator",
    "EmaBaseline",
    "NeuralCollapse",
    "RollingWindow",
    "Stateful",
    "alignment_histogram",
    "alignment_summary",
    "count_nonfinite",
    "grouped_norms",
    "linear_fit",
    "neural_collapse_metrics",
    "power_iteration",
    "spectral_alignment",
    "stable_rank",
    "tensor_norms",
    "total_norm",
    "zclip_coefficient",
]
