"""A rolling window of a scalar stream and the least-squares trend across it (host, float64 numpy)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from lightning_diag._checks import check_int
from lightning_diag.metrics.state import Stateful

__all__ = ["RollingWindow", "linear_fit"]


def linear_fit(steps: ArrayLike, values: ArrayLike) -> tuple[float, float, float, float]:
    """Ordinary least-squares line ``value ~ a + slope * step``: ``(slope, stderr, mean, span)``.

    ``stderr`` is the textbook standard error of the slope, ``sqrt(SSR / (n - 2) / Sxx)``
    (Gaussian residuals); ``mean`` the mean of the values; ``span = max(step) - min(step)``.
    Computed centred in float64. With fewer than 3 points or a single distinct step, ``slope``
    and ``stderr`` are 0.

    Example:
        >>> steps = np.arange(5.0)
        >>> [round(v, 6) for v in linear_fit(steps, 2.0 * steps + 1)]
        [2.0, 0.0, 5.0, 4.0]
    """
    t = np.asarray(steps, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    if t.size == 0:
        return 0.0, 0.0, float("nan"), 0.0
    mean = float(x.mean())
    dt, dx = t - t.mean(), x - mean
    sxx = float(dt @ dt)
    span = float(t.max() - t.min())
    if t.size < 3 or sxx <= 0:
        return 0.0, 0.0, mean, span
    slope = float(dt @ dx) / sxx
    ssr = float(np.sum((dx - slope * dt) ** 2))
    return slope, (ssr / (t.size - 2) / sxx) ** 0.5, mean, span


class RollingWindow(Stateful):
    """The last ``size`` finite values of a scalar stream and the steps they were seen at.

    :meth:`update` ignores non-finite values (they never enter the window), so one NaN step does
    not poison the statistics. :meth:`relative_rise` is the sustained-divergence statistic of
    :class:`~lightning_diag.LossSpikeDetector`: the rise of the least-squares line across the
    window, relative to the window mean, at a lower confidence bound (``slope - confidence *
    stderr``), so that noise alone rarely makes it positive.

    Args:
        size: number of values kept (>= 3).

    Example:
        >>> window = RollingWindow(4)
        >>> for step, x in enumerate([1.0, 1.1, 1.2, 1.3, 1.4]):
        ...     window.update(x, step)
        >>> window.ordered()[1].tolist()
        [1.1, 1.2, 1.3, 1.4]
        >>> round(window.relative_rise(confidence=0.0), 4)  # 0.3 over a mean of 1.25
        0.24
    """

    def __init__(self, size: int) -> None:
        check_int("size", size, 3)
        self.add_state("values", 0.0, size=size, dtype=np.float64)
        self.add_state("steps", 0.0, size=size, dtype=np.float64)
        self.add_state("count", 0, dtype=np.int64)  # finite values seen; the write position is count % size

    @property
    def full(self) -> bool:
        return int(self.count) >= self.size

    def update(self, x: float, step: int) -> None:
        """Write ``x`` seen at ``step`` over the oldest slot, unless it is non-finite."""
        if np.isfinite(x):
            slot = int(self.count) % self.size
            self.values[slot], self.steps[slot] = x, step
            self.count = self.count + 1

    def ordered(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` held, oldest first."""
        n = min(int(self.count), self.size)
        order = (np.arange(n) + int(self.count) - n) % self.size
        return self.steps[order], self.values[order]

    def relative_rise(self, confidence: float = 3.0) -> float:
        """``(slope - confidence * stderr) * span / |mean|``, or 0 until the window is full.

        The rise of the fitted line across the window as a fraction of the window mean, at the lower
        confidence bound of the slope: with ``confidence=3`` a stationary stream gives a positive
        value with probability ~0.2% per independent window (t distribution, n >= 30).
        """
        if not self.full:
            return 0.0
        slope, stderr, mean, span = linear_fit(*self.ordered())
        return (slope - confidence * stderr) * span / max(abs(mean), 1e-12)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"
