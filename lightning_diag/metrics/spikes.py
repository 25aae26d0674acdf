"""The statistics of :class:`~lightning_diag.LossSpikeDetector`, on the host: one loss in, its figures out.

Per value ``x`` of a loss stream (in the "bad is up" direction):

- ``zscore``: ``(x - mean) / std`` against an :class:`~lightning_diag.metrics.stats.EmaBaseline`
  (warm-up, then EMA). A spike enters the baseline winsorized to ``mean + w**2 / z * std``
  (ZClip's clip, ``w`` the winsorizing z), a non-finite value not at all, so spikes neither inflate
  the baseline nor hide the next one.
- ``ema``: the baseline's mean.
- ``ratio_to_min``: ``x / best`` where ``best`` is the lowest baseline mean seen after warm-up (the
  smoothed loss, so one lucky batch does not lower the floor); 0 until there is a positive best.
- ``trend``: the relative rise of the least-squares line over the last ``trend_window`` absorbed
  values at its lower 3-sigma confidence bound (:meth:`RollingWindow.relative_rise`): slow blow-ups
  that never spike, which a z-score absorbs as drift.

**A non-finite value** (NaN or inf) gives NaN ``zscore``, ``ratio_to_min`` and ``trend`` at its
step (NaN in, NaN out: never a healthy-looking 0), and ``ema`` stays the baseline's mean (NaN
before the first finite value). It enters nothing: the baseline, ``best`` and the trend window
are as if the step had not happened, so the next finite value gets exactly the figures it would
have had without it (the trend's line is fitted at the steps of the values it holds).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from lightning_diag._checks import check_number
from lightning_diag.metrics.state import Stateful
from lightning_diag.metrics.stats import EmaBaseline
from lightning_diag.metrics.windows import RollingWindow

__all__ = ["LossStatistics"]


class LossStatistics(Stateful):
    """Z-score, EMA, ratio to the running minimum and trend of a loss stream (float64, host).

    Args:
        mode: ``"min"`` (a loss: bad is up) or ``"max"`` (e.g. an accuracy: bad is down; the ratio
            becomes ``best / x``).
        alpha: EMA decay of the baseline.
        warmup: values that initialise the baseline; ``zscore`` and ``ratio_to_min`` are 0 until then.
        winsorize: the z-score above which a value enters the baseline clipped (> 0).
        trend_window: values in the trend window (>= 3), or ``None`` for no trend.
        trend_confidence: the trend is taken at ``slope - trend_confidence * stderr`` (>= 0).

    Example:
        >>> stats = LossStatistics(warmup=3, trend_window=None)
        >>> for step, x in enumerate([2.0, 2.1, 1.9, 2.0]):
        ...     figures = stats.update(x, step)
        >>> sorted(figures), round(figures["ratio_to_min"], 3)
        (['ema', 'ratio_to_min', 'zscore'], 1.0)
    """

    def __init__(
        self,
        *,
        mode: Literal["min", "max"] = "min",
        alpha: float = 0.98,
        warmup: int = 50,
        winsorize: float = 6.0,
        trend_window: int | None = 100,
        trend_confidence: float = 3.0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be one of ('min', 'max'), got {mode!r}")
        check_number("winsorize", winsorize, 0.0)
        check_number("trend_confidence", trend_confidence, 0.0, low_open=False)
        self.mode, self.winsorize, self.trend_confidence = mode, winsorize, trend_confidence
        self.baseline = EmaBaseline(1, alpha=alpha, warmup=warmup)
        self.window = RollingWindow(trend_window) if trend_window is not None else None
        self.add_state("best", np.inf, dtype=np.float64)  # lowest baseline mean after warm-up, signed

    def update(self, value: float, step: int) -> dict[str, float]:
        """Absorb the value seen at ``step``; returns its figures (0 in warm-up, NaN for a non-finite value)."""
        sign = 1.0 if self.mode == "min" else -1.0
        x = sign * value
        if not math.isfinite(x):  # NaN out, and nothing absorbed: the next value sees no trace of this step
            ema = sign * float(self.baseline.mean[0]) if self.baseline.count[0] > 0 else math.nan  # no value yet
            figures = {"zscore": math.nan, "ema": ema, "ratio_to_min": math.nan}
            return figures if self.window is None else {**figures, "trend": math.nan}
        ready = bool(self.baseline.ready[0])
        z = float(self.baseline.score([x])[0])
        absorbed = float(self.baseline.winsorized([x], self.winsorize)[0])
        best = sign * float(self.best)  # back in the stream's own direction
        ratio = 0.0
        if ready and 0 < best < np.inf:
            ratio = value / best if self.mode == "min" else best / value
        self.baseline.update([absorbed])
        if self.baseline.ready[0]:
            self.best = np.minimum(self.best, self.baseline.mean[0])
        figures = {"zscore": z, "ema": sign * float(self.baseline.mean[0]), "ratio_to_min": ratio}
        if self.window is not None:
            self.window.update(absorbed, step)
            figures["trend"] = self.window.relative_rise(self.trend_confidence)
        return figures

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "baseline": self.baseline.state_dict(),
                "window": self.window.state_dict() if self.window is not None else None}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.baseline.load_state_dict(state["baseline"])
        if self.window is not None and state.get("window") is not None:
            self.window.load_state_dict(state["window"])
