"""The Lightning callbacks of lightning_diag: one monitor per file, sharing ``_base``."""

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
