"""Running statistics kept as device tensors: EMA mean/variance z-scores (the ZClip rule).

No method here reads a value back to the host: warm-up and branches are ``torch.where`` on
device flags, so a monitor can update its statistics every step without a sync.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_diag._checks import check_int

__all__ = ["EmaZScore", "zclip"]


class EmaZScore:
    """Z-score of a scalar stream against an exponential moving mean and variance.

    The rule of ZClip (Kumar et al. 2025, arXiv 2504.02507): the first ``warmup`` finite values
    initialise the mean and (population) variance exactly; after that both follow an EMA with
    decay ``alpha``::

        mean <- alpha * mean + (1 - alpha) * x
        var  <- alpha * var  + (1 - alpha) * (x - mean)^2

    and ``z = (x - mean) / (sqrt(var) + eps)``, 0 during warm-up. Non-finite values are never
    absorbed, so one NaN step does not poison the baseline. Feed :meth:`update` the *clipped*
    value when clipping (see :func:`zclip`) so that spikes do not inflate the baseline.

    Args:
        alpha: EMA decay in ``(0, 1)``; the baseline remembers about ``1 / (1 - alpha)`` values.
        warmup: number of finite values collected before z-scores are reported (>= 2).
        eps: added to the standard deviation.

    Example:
        >>> ema = EmaZScore(alpha=0.9, warmup=3)
        >>> for x in [1.0, 2.0, 3.0]:
        ...     ema.update(torch.tensor(x))
        >>> round(float(ema.score(torch.tensor(2.0 + 3 * (2 / 3) ** 0.5))), 3)
        3.0
    """

    def __init__(self, alpha: float = 0.97, warmup: int = 25, eps: float = 1e-6) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}")
        check_int("warmup", warmup, 2)
        if eps < 0:
            raise ValueError(f"`eps` must be >= 0, got {eps!r}")
        self.alpha, self.warmup, self.eps = alpha, warmup, eps
        self.reset()

    def reset(self) -> None:
        self.count = torch.zeros(())  # finite values absorbed (capped use: warm-up test)
        self.mean = torch.zeros(())
        self.var = torch.zeros(())

    @property
    def ready(self) -> Tensor:
        """Bool tensor: warm-up is over and z-scores are meaningful."""
        return self.count >= self.warmup

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    def _follow(self, x: Tensor) -> None:
        # State lives on the device of the stream (moves once, e.g. after a CPU checkpoint load).
        if self.mean.device != x.device:
            self.count, self.mean, self.var = (t.to(x.device) for t in (self.count, self.mean, self.var))

    def score(self, x: Tensor) -> Tensor:
        """Z-score of ``x`` against the current baseline (0 while warming up); no state change."""
        self._follow(x)
        z = (x.float() - self.mean) / (self.std + self.eps)
        return torch.where(self.ready, z, torch.zeros_like(z))

    def update(self, x: Tensor) -> None:
        """Absorb ``x`` (a 0-d tensor) into the baseline unless it is non-finite."""
        self._follow(x)
        x = x.float()
        finite = torch.isfinite(x)
        x = torch.where(finite, x, self.mean)
        n = self.count + 1
        # Warm-up: exact running mean and population variance (Welford).
        delta = x - self.mean
        warm_mean = self.mean + delta / n
        warm_var = (self.var * self.count + delta * (x - warm_mean)) / n
        # Afterwards: the EMA of ZClip.
        ema_mean = self.alpha * self.mean + (1 - self.alpha) * x
        ema_var = self.alpha * self.var + (1 - self.alpha) * (x - ema_mean).square()
        warming = self.count < self.warmup
        new_mean = torch.where(warming, warm_mean, ema_mean)
        new_var = torch.where(warming, warm_var, ema_var)
        self.mean = torch.where(finite, new_mean, self.mean)
        self.var = torch.where(finite, new_var, self.var)
        self.count = torch.where(finite, n, self.count)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count.cpu(), "mean": self.mean.cpu(), "var": self.var.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.mean, self.var = (
            torch.as_tensor(state[k], dtype=torch.float32).clone() for k in ("count", "mean", "var")
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha}, warmup={self.warmup}, eps={self.eps})"


def zclip(value: Tensor, ema: EmaZScore, z_threshold: float) -> tuple[Tensor, Tensor]:
    """ZClip's adaptive clip of a norm: returns ``(z, clipped)`` as device tensors.

    A spike (``z > z_threshold``) is clipped to ``mean + z_threshold**2 / z * std``: the bigger the
    outlier, the tighter the clip. Otherwise (and during warm-up, and for non-finite values)
    ``clipped == value``. The caller scales gradients by ``clipped / value`` and absorbs
    ``clipped`` into ``ema``.

    Example:
        >>> ema = EmaZScore(warmup=2)
        >>> ema.update(torch.tensor(1.0)); ema.update(torch.tensor(3.0))  # mean 2, std 1
        >>> z, clipped = zclip(torch.tensor(12.0), ema, z_threshold=2.5)
        >>> round(float(z), 3), round(float(clipped), 3)
        (10.0, 2.625)
    """
    z = ema.score(value)
    target = ema.mean + z_threshold**2 / z.clamp_min(z_threshold) * ema.std
    spike = (z > z_threshold) & torch.isfinite(value)
    return z, torch.where(spike, target, value.float())
