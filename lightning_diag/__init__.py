"""lightning_diag: Lightning callbacks that watch a training run from the inside and warn before
it blows up.

The names below are imported on first use (PEP 562), so ``import lightning_diag.cli`` (the
``lightning-diag`` command) does not pay for torch and Lightning before it parses its arguments.

Example:
    >>> from lightning_diag import GradNormWatcher
    >>> callbacks = [GradNormWatcher(action="warn")]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOME = {
    **dict.fromkeys(("Above", "Alert", "Below", "DiagnosticWarning", "DivergenceError", "NonFinite", "ZScore"),
                    "lightning_diag.alerts"),
    **dict.fromkeys(("GradNormWatcher", "HealthyCheckpoint", "LogitMonitor", "LossSpikeDetector", "NCTracker",
                     "SharpnessMonitor", "SpectralAlignmentMonitor", "StabilityGovernor"), "lightning_diag.callbacks"),
    "NeuralCollapse": "lightning_diag.metrics.neural_collapse",
}

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


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'lightning_diag' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # once: later look-ups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
