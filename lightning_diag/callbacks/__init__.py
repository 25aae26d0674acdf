"""The Lightning callbacks of lightning_diag: one monitor per file, sharing ``_base``; and
:class:`HealthyCheckpoint`, a ``ModelCheckpoint`` that writes only healthy states.

``__all__`` lists the monitors (the contract tests and the README key tables iterate it);
``HealthyCheckpoint`` is not a monitor and is exported beside it.
"""

from lightning_diag.callbacks.checkpoint import HealthyCheckpoint
from lightning_diag.callbacks.grad_norm import GradNormWatcher
from lightning_diag.callbacks.logits import LogitMonitor
from lightning_diag.callbacks.loss_spike import LossSpikeDetector
from lightning_diag.callbacks.neural_collapse import NCTracker
from lightning_diag.callbacks.sharpness import SharpnessMonitor
from lightning_diag.callbacks.spectral_alignment import SpectralAlignmentMonitor
from lightning_diag.callbacks.stability import StabilityGovernor

__all__ = [
    "GradNormWatcher",
    "LogitMonitor",
    "LossSpikeDetector",
    "NCTracker",
    "SharpnessMonitor",
    "SpectralAlignmentMonitor",
    "StabilityGovernor",
]
