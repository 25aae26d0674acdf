"""How far an optimizer step overshoots on its own batch, and the learning-rate scale that caps it.

The **overshoot ratio** of an update ``D = theta_new - theta_old`` on the loss ``f`` of the batch it
was computed on, with ``f0 = f(theta_old)``, ``f1 = f(theta_new)`` and ``gD = <grad f(theta_old), D>``::

    r = (f1 - f0 - gD) / (-gD)

is the curvature term of the step over its first-order progress: for a quadratic ``f`` it is
``D^T H D / (2 |gD|)`` exactly. ``r = 0.5``: the step lands on the minimum of ``f`` along ``D``;
``r = 1``: it undoes its first-order progress (``f1 = f0``); ``r > 1``: it raises the loss it was
computed to lower. One formula for every optimizer: preconditioning and momentum are in ``D``. It
is the stochastic Armijo ratio (Vaswani et al. 2019, "Painless Stochastic Gradient", arXiv
1905.09997: Armijo's condition with constant ``c`` holds iff ``r <= 1 - c``); for plain SGD
``r = lr g^T H g / (2 |g|^2)``. ``r`` is proportional to the learning rate (``D`` is), so the
rate at which ``r`` would be 1, the *critical* learning rate, is ``lr / r``.

:func:`fused_dot` gives ``<g, theta>`` in float64 over a whole model in a few kernels, so ``gD`` is
``<g, theta_new> - <g, theta_old>`` without a copy of the weights. :class:`OvershootController`
turns a stream of ratios into a learning-rate scale (pure host state, with ``state_dict``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from lightning_diag._checks import check_int, check_number
from lightning_diag.metrics.state import Stateful

__all__ = ["OvershootController", "fused_dot", "overshoot_ratio"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def overshoot_ratio(f0: ArrayLike, f1: ArrayLike, gD: ArrayLike, *, rtol: float = 1e-6) -> float | np.ndarray:
    """``r = (f1 - f0 - gD) / (-gD)`` in float64; NaN where the check is invalid.

    A check is invalid when ``gD >= 0`` (the update is not a descent direction to first order) or
    ``|gD| < rtol * |f0|`` (the predicted decrease is lost in the rounding noise of the loss itself,
    so ``r`` would be noise over a tiny number). NaN in gives NaN out; ``f1 = inf`` behind a finite
    ``f0`` and ``gD`` gives ``r = inf`` (the step blew the loss up).

    Example:
        >>> overshoot_ratio(1.0, 0.75, -0.5)  # a step that kept half its first-order progress
        0.5
        >>> overshoot_ratio(1.0, 0.9, 0.2), overshoot_ratio(1.0, 1.0, -1e-9)
        (nan, nan)
    """
    f0, f1, gD = (np.asarray(v, dtype=np.float64) for v in (f0, f1, gD))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        valid = (gD < 0) & (-gD >= rtol * np.abs(f0)) & np.isfinite(f0) & np.isfinite(gD)
        r = np.where(valid, (f1 - f0 - gD) / np.where(valid, -gD, 1.0), np.nan)
    return float(r) if r.ndim == 0 else r


def fused_dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """``sum_i <xs[i], ys[i]>`` as a 0-d float64 tensor, in a few kernels whatever ``len(xs)``.

    Per (device, dtype) group: one ``torch._foreach_mul`` and one ``cat`` + float64 ``sum``
    (float32 products carry a relative rounding of 6e-8 each, far below what ``<g, theta_new> -
    <g, theta_old>`` needs); float16/bfloat16 tensors are concatenated and multiplied in float32,
    where the product of two of them is exact. The temporaries are the size of the tensors. No host
    read: the result stays on the first tensor's device.

    Example:
        >>> fused_dot([torch.tensor([1.0, 2.0]), torch.ones(2, 2)], [torch.tensor([3.0, 4.0]), torch.full((2, 2), 0.5)])
        tensor(13., dtype=torch.float64)
    """
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = defaultdict(lambda: ([], []))
    for x, y in zip(xs, ys, strict=True):
        if x.numel():
            group = groups[(x.device, x.dtype)]
            group[0].append(x)
            group[1].append(y.to(x.dtype) if y.dtype != x.dtype else y)
    if not groups:
        return torch.zeros((), dtype=torch.float64, device=xs[0].device if len(xs) else None)
    sums = []
    for (_, dtype), (a, b) in groups.items():
        if dtype in _LOW_PRECISION:
            flat_a, flat_b = torch.cat([t.reshape(-1) for t in a]).float(), torch.cat([t.reshape(-1) for t in b]).float()
            sums.append((flat_a * flat_b).sum(dtype=torch.float64))
        else:
            products = torch._foreach_mul(a, b)
            sums.append(torch.cat([t.reshape(-1) for t in products]).sum(dtype=torch.float64))
    device = sums[0].device
    return sums[0] if len(sums) == 1 else torch.stack([s.to(device) for s in sums]).sum()


class OvershootController(Stateful):
    """A learning-rate scale from a stream of overshoot ratios: cut when the smoothed ratio passes
    ``target``, recover slowly when it falls back, never above 1.

    The controller works on ``rho = r / scale_used``, the ratio the step would have had at the
    schedule's own rate (``r`` is proportional to the learning rate), so a cut does not stay in its
    own memory and compound. Per valid check (NaN ratios are ignored, see :func:`overshoot_ratio`):

    1. **Smoothing, asymmetric.** If the ratio at the current scale is above 1 (the step raised its
       own loss) ``smoothed = max(smoothed, rho)`` at once; otherwise ``smoothed`` follows an EMA
       with decay ``smoothing``, so noise around the edge of stability moves it slowly either way.
       ``rho`` enters clipped to ``[0, target / min_scale]``: a negative ratio (negative curvature)
       counts as 0, and an infinite one (the loss overflowed) as the ratio that already pins the
       scale at its floor, so it can decay again.
    2. **Cut.** If ``smoothed * scale > target``: ``scale = max(min_scale, target / smoothed)``,
       the scale at which the smoothed ratio is ``target``.
    3. **Recover.** If ``smoothed * scale < target * (1 - margin)``: ``scale`` grows by the factor
       ``recovery``, but not above ``target * (1 - margin) / smoothed`` (the bottom of the band
       ``[target (1 - margin), target]``) nor above 1. Inside the band nothing moves: a recovery
       never overshoots into a cut, so a stationary ratio gives a still scale, not an oscillation.

    ``pinned`` counts consecutive valid checks with the scale at ``min_scale`` and the ratio at that
    scale above 1: the floor cannot hold the run.

    Args:
        target: the smoothed ratio the scale holds the run at (> 0; 0.5 is the exact line minimum).
        smoothing: EMA decay of the smoothed ratio in ``[0, 1)`` (0: no smoothing).
        recovery: growth factor of the scale per check while the ratio is low (> 1).
        min_scale: floor of the scale in ``(0, 1]``.
        margin: width of the dead band below ``target``, as a fraction of it, in ``[0, 1)``.

    Example:
        >>> c = OvershootController(target=0.8, recovery=1.5)
        >>> c.update(2.0), c.update(0.8, scale_used=0.4)  # r = 2 at full rate: cut to 0.4, then hold
        (0.4, 0.4)
    """

    def __init__(self, *, target: float = 0.65, smoothing: float = 0.9, recovery: float = 1.05,
                 min_scale: float = 0.01, margin: float = 0.2) -> None:  # fmt: skip
        check_number("target", target, 0.0)
        check_number("smoothing", smoothing, 0.0, 1.0, low_open=False)
        check_number("recovery", recovery, 1.0)
        check_number("min_scale", min_scale, 0.0, 1.0, high_open=False)
        check_number("margin", margin, 0.0, 1.0, low_open=False)
        self.target, self.smoothing, self.recovery = float(target), float(smoothing), float(recovery)
        self.min_scale, self.margin = float(min_scale), float(margin)
        self.add_state("smoothed", math.nan, dtype=np.float64)  # smoothed ratio at the schedule's rate
        self.add_state("scale", 1.0, dtype=np.float64)
        self.add_state("pinned", 0, dtype=np.int64)
        self.add_state("checks", 0, dtype=np.int64)  # valid checks seen

    def ratio_now(self) -> float:
        """The smoothed ratio at the current scale (NaN before the first valid check)."""
        return float(self.smoothed * self.scale)

    def update(self, r: float, scale_used: float | None = None) -> float:
        """Absorb the ratio ``r`` of a step taken at ``scale_used`` (default: the current scale);
        returns the new scale."""
        used = float(self.scale) if scale_used is None else float(scale_used)
        if math.isnan(r) or not used > 0:
            return float(self.scale)
        self.checks += 1
        at_floor = self.scale <= self.min_scale
        raw = r / used
        self.pinned = np.int64(self.pinned + 1 if at_floor and raw * self.scale > 1.0 else 0)
        rho = min(max(raw, 0.0), self.target / self.min_scale)
        if math.isnan(self.smoothed):
            self.smoothed = np.float64(rho)
        elif rho * self.scale > 1.0:
            self.smoothed = np.float64(max(float(self.smoothed), rho))
        else:
            self.smoothed = np.float64(self.smoothing * self.smoothed + (1.0 - self.smoothing) * rho)
        low = self.target * (1.0 - self.margin)
        smoothed, scale = float(self.smoothed), float(self.scale)
        if smoothed * scale > self.target:
            scale = max(self.min_scale, self.target / smoothed)
        elif smoothed * scale < low:
            scale = min(1.0, scale * self.recovery, low / smoothed if smoothed > 0 else math.inf)
        self.scale = np.float64(scale)
        return scale
