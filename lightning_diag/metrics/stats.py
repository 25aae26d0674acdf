"""Running baselines of scalar streams: warm-up then EMA mean and variance (the ZClip rule).

:class:`EmaBaseline` is the one baseline of the package: the gradient-norm z-score, the loss
z-score and the per-layer collapse baselines are all instances of it. It runs on the host in
float64 numpy over a vector of streams (one numpy pass per update, whatever the number of
streams); :func:`zclip_coefficient` is the device half of ZClip's adaptive clip, which needs only
the baseline's mean and standard deviation as Python floats, so it never syncs.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from lightning_diag._checks import check_int, check_number
from lightning_diag.metrics.state import Stateful

__all__ = ["EmaBaseline", "zclip_coefficient"]


class EmaBaseline(Stateful):
    """Mean and variance of ``size`` streams: exact over a warm-up, then an exponential moving average.

    The rule of ZClip (Kumar et al. 2025, arXiv 2504.02507): the first ``warmup`` finite values of
    a stream initialise its mean and (population) variance exactly; after that both follow an EMA
    with decay ``alpha``::

        mean <- alpha * mean + (1 - alpha) * x
        var  <- alpha * var  + (1 - alpha) * (x - mean)^2      (with the new mean)

    and ``z = (x - mean) / (sqrt(var) + eps)``, 0 until the warm-up is over. Non-finite values and
    values masked out of :meth:`update` are never absorbed, so a NaN step or a spike does not
    poison the baseline; absorb :meth:`winsorized` values to keep spikes from inflating it.

    Args:
        size: number of streams (each entry of ``x`` is one stream).
        alpha: EMA decay in ``(0, 1)``; the baseline remembers about ``1 / (1 - alpha)`` values.
        warmup: finite values averaged exactly before z-scores are reported (>= 1).
        eps: added to the standard deviation.

    Example:
        >>> ema = EmaBaseline(alpha=0.9, warmup=3)
        >>> for x in [1.0, 2.0, 3.0]:
        ...     ema.update([x])
        >>> ema.mean.tolist(), round(float(ema.score([2.0 + 3 * (2 / 3) ** 0.5])[0]), 3)
        ([2.0], 3.0)
    """

    def __init__(self, size: int = 1, *, alpha: float = 0.97, warmup: int = 25, eps: float = 1e-6) -> None:
        check_number("alpha", alpha, 0.0, 1.0)
        check_int("warmup", warmup, 1)
        check_int("size", size, 0)
        check_number("eps", eps, 0.0, low_open=False)
        self.alpha, self.warmup, self.eps = alpha, warmup, eps
        self.add_state("count", 0, size=size, dtype=np.int64)  # finite values absorbed
        self.add_state("mean", 0.0, size=size, dtype=np.float64)
        self.add_state("var", 0.0, size=size, dtype=np.float64)

    @property
    def ready(self) -> np.ndarray:
        """Per stream: the warm-up is over and z-scores are meaningful."""
        return self.count >= self.warmup

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var)

    def score(self, x: ArrayLike) -> np.ndarray:
        """Z-score of ``x`` against the current baseline (0 in warm-up, NaN for NaN); no state change."""
        x = np.asarray(x, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return np.where(self.ready, (x - self.mean) / (self.std + self.eps), 0.0)

    def winsorized(self, x: ArrayLike, z_threshold: float) -> np.ndarray:
        """ZClip's clipped value: a spike ``z > z_threshold`` becomes ``mean + z_threshold**2 / z * std``.

        The bigger the outlier, the tighter the clip; other values (warm-up, non-finite) pass
        unchanged. Absorb the result to keep spikes from inflating the baseline.
        """
        x = np.asarray(x, dtype=np.float64)
        z = self.score(x)
        with np.errstate(invalid="ignore", divide="ignore"):
            spike = (z > z_threshold) & np.isfinite(x)
            return np.where(spike, self.mean + z_threshold**2 / np.where(spike, z, 1.0) * self.std, x)

    def update(self, x: ArrayLike, absorb: ArrayLike | None = None) -> None:
        """Absorb ``x`` (one value per stream) where it is finite and ``absorb`` (default: everywhere)."""
        x = np.asarray(x, dtype=np.float64)
        take = np.isfinite(x) if absorb is None else np.isfinite(x) & np.asarray(absorb, dtype=bool)
        x = np.where(take, x, self.mean)
        n = self.count + 1
        warming = self.count < self.warmup
        delta = x - self.mean
        warm_mean = self.mean + delta / n  # Welford: exact running mean and population variance
        warm_var = (self.var * self.count + delta * (x - warm_mean)) / n
        ema_mean = self.alpha * self.mean + (1 - self.alpha) * x
        ema_var = self.alpha * self.var + (1 - self.alpha) * (x - ema_mean) ** 2
        self.mean = np.where(take, np.where(warming, warm_mean, ema_mean), self.mean)
        self.var = np.where(take, np.where(warming, warm_var, ema_var), self.var)
        self.count = np.where(take, n, self.count)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, alpha={self.alpha}, warmup={self.warmup}, eps={self.eps})"


def zclip_coefficient(
    norm: Tensor, mean: float, std: float, z_threshold: float, *, ready: bool = True, eps: float = 1e-6
) -> Tensor:
    """The factor that ZClip multiplies gradients by, on the norm's device (no host sync).

    ``mean`` and ``std`` are the baseline *before* this norm (host floats, from
    :class:`EmaBaseline`); a spike ``z = (norm - mean) / std > z_threshold`` is scaled to
    ``mean + z_threshold**2 / z * std``. The factor is 1 for other norms, non-finite ones, a zero
    norm, and while the baseline is not ``ready``. Computed in float64, as the host does.

    Example:
        >>> round(float(zclip_coefficient(torch.tensor(12.0), mean=2.0, std=1.0, z_threshold=2.5)), 4)
        0.2188
    """
    if not ready:
        return torch.ones((), dtype=torch.float64, device=norm.device)
    g = norm.to(torch.float64)
    excess = g - mean  # z * (std + eps), as EmaBaseline.score and .winsorized define z
    target = mean + z_threshold**2 * std * (std + eps) / excess.clamp_min(np.finfo(np.float64).tiny)
    spike = (excess > z_threshold * (std + eps)) & torch.isfinite(g) & (g > 0)
    return torch.where(spike, target / g, 1.0)
