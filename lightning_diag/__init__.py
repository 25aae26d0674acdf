"""lightning_diag: Lightning callbacks that watch a training run from the inside and warn before
it blows up.

Example:
    >>> from lightning_diag import GradNormWatcher
    >>> callbacks = [GradNormWatcher(action="warn")]
"""

from lightning_diag.alerts import Above, Alert, Below, DiagnosticWarning, DivergenceError, NonFinite, ZScore
from lightning_diag.callbacks import (
    GradNormWatcher,
    HealthyCheckpoint,
    LogitMonitor,
    LossSpikeDetector,
    NCTracker,
    SharpnessMonitor,
    SpectralAlignmentMonitor,
    StabilityGovernor,
)
from lightning_diag.metrics.neural_collapse import NeuralCollapse

__all__ = [
    "Above",
    "Alert",
    "Below",
    "DiagnosticWarning",
    "DivergenceError",
    "GradNormWatcher",
    "HealthyCheckpoint",
    "LogitMonitor",
    "LossSpikeDetector",
    "NCTracker",
    "NeuralCollapse",
    "NonFinite",
    "SharpnessMonitor",
    "SpectralAlignmentMonitor",
    "StabilityGovernor",
    "ZScore",
]
__version__ = "0.2.0"
