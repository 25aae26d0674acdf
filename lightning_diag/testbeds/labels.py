"""Ground truth for early warning: when did a run explode, and which of its steps were healthy?

:func:`explosion_step` is the one written definition the early-warning suite labels every run with;
:func:`healthy_end` marks the end of a run's healthy phase, inside which any warning is a false
alarm. :func:`divergence_step` is the older, purely relative rule (kept for the demo); it misfires
on losses near 0, where batch noise alone triples the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["divergence_step", "explosion_step", "healthy_end"]

Losses = Sequence[float] | Tensor | np.ndarray


def _as_float64(values: Losses) -> np.ndarray:
    return torch.as_tensor(values).detach().to("cpu", torch.float64).numpy().reshape(-1)


def _first_sustained(above: np.ndarray, finite: np.ndarray, patience: int) -> int | None:
    """Start of the first run of ``patience`` steps in ``above``, or of the run a non-finite value ends."""
    run = 0
    for step in range(len(above)):
        if not finite[step]:
            return step - run  # a climb that ends in inf/nan started where the climb did
        run = run + 1 if above[step] else 0
        if run == patience:
            return step - patience + 1
    return None


def explosion_step(
    losses: Losses,
    *,
    reference: float | None = None,
    progress_lost: float = 0.5,
    min_ratio: float = 1.5,
    patience: int = 10,
    reference_steps: int = 5,
) -> int | None:
    """First step of a loss explosion, or None: the suite's one definition of an exploded run.

    Let ``m_t`` be the minimum of the finite losses before step ``t`` and ``R`` a reference loss, the
    loss of an uninformed model (by default the median of the first ``reference_steps`` finite
    losses: at initialisation a classifier or language model predicts about uniformly, so this is
    close to ``log(num_classes)``). Step ``t`` is *above* when its loss has given back at least
    ``progress_lost`` of the progress made from ``R`` down to ``m_t`` **and** is at least
    ``min_ratio`` times ``m_t``::

        loss_t > max(m_t + progress_lost * (R - m_t), min_ratio * m_t)

    The explosion starts at the first run of ``patience`` consecutive *above* steps, or at the first
    non-finite loss, whichever comes first; a non-finite loss that ends a shorter run of *above*
    steps dates the explosion to the start of that run.

    Why two terms: a rule relative to the minimum alone (``loss > 3 m_t``) misfires near 0, where a
    loss of 0.01 triples on batch noise; the progress term asks for a loss back at least half-way
    to an uninformed model's. Before any progress (``m_t`` near ``R``) the progress term is no
    margin at all, and the ratio term asks for 50% above the best loss yet.

    Args:
        losses: per-step training losses, index = optimizer step.
        reference: the uninformed loss ``R`` (e.g. ``math.log(num_classes)``); None: from the first steps.
        progress_lost: share of the progress ``R - m_t`` the loss must give back, in (0, 1].
        min_ratio: the loss must also exceed ``min_ratio * m_t``; > 1.
        patience: consecutive steps the loss must stay above.
        reference_steps: steps whose median is ``R`` when ``reference`` is None.

    Example:
        >>> near_zero = [2.3, 2.0, 1.0, 0.05, 0.02, 0.04, 0.06, 0.05]  # tripled by noise: not an explosion
        >>> explosion_step(near_zero, reference=2.3, patience=2) is None
        True
        >>> explosion_step([2.3, 2.0, 1.0, 0.5, 1.5, 1.6, 1.7], reference=2.3, patience=3)  # back past half-way
        4
        >>> explosion_step([2.3, 2.0, 1.0, 1.2, float("nan")]), explosion_step([2.3, 2.0, 1.0, 1.9, float("inf")])
        (4, 3)
    """
    if not 0.0 < progress_lost <= 1.0:
        raise ValueError(f"`progress_lost` must be in (0, 1], got {progress_lost!r}")
    if not min_ratio > 1.0:
        raise ValueError(f"`min_ratio` must be > 1, got {min_ratio!r}")
    for name, value in (("patience", patience), ("reference_steps", reference_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    values = _as_float64(losses)
    finite = np.isfinite(values)
    if reference is None:
        head = values[finite][:reference_steps]
        reference = float(np.median(head)) if head.size else float("nan")
    best_before = np.full(len(values), np.inf)
    if len(values) > 1:
        best_before[1:] = np.minimum.accumulate(np.where(finite, values, np.inf))[:-1]
    with np.errstate(invalid="ignore"):  # inf - inf before the first finite loss: not above
        threshold = np.maximum(best_before + progress_lost * (reference - best_before), min_ratio * best_before)
        above = values > threshold
    return _first_sustained(above, finite, patience)


def healthy_end(
    lrs: Sequence[float] | np.ndarray,
    safe_lr: float | None = None,
    *,
    fault_step: int | None = None,
    explosion: int | None = None,
    rtol: float = 1e-6,
) -> int:
    """End (exclusive) of a run's healthy phase: steps ``0 .. healthy_end - 1`` are healthy.

    The healthy phase ends at the first of: the first step whose learning rate exceeds ``safe_lr``
    (the highest learning rate the run's stable twins trained at without exploding: up to there, the
    run is doing what a stable run did), ``fault_step`` (an injected fault: a poisoned batch, a
    learning-rate shock), and ``explosion``. A run with none of them is healthy throughout
    (``len(lrs)``). A warning inside the healthy phase is a false alarm.

    Args:
        lrs: the learning rate of each step.
        safe_lr: the stable twins' highest learning rate; None: no learning-rate limit.
        fault_step: the step of an injected fault, or None.
        explosion: the explosion step, or None.
        rtol: relative tolerance of the learning-rate comparison (schedules recomputed in float).

    Example:
        >>> lrs = [0.01 * 1.1**t for t in range(50)]
        >>> healthy_end(lrs, safe_lr=lrs[20]), healthy_end(lrs, safe_lr=lrs[20], fault_step=12), healthy_end(lrs)
        (21, 12, 50)
    """
    end = len(lrs)
    if safe_lr is not None:
        over = np.flatnonzero(np.asarray(lrs, dtype=np.float64) > safe_lr * (1 + rtol))
        if over.size:
            end = int(over[0])
    for step in (fault_step, explosion):
        if step is not None:
            end = min(end, int(step))
    return end


def divergence_step(losses: Losses, factor: float = 3.0, patience: int = 10) -> int | None:
    """Index of the first step of a loss explosion by a purely relative rule, or None.

    The explosion starts at the first run of ``patience`` consecutive losses above ``factor`` times
    the running minimum of the losses before them, or at the first non-finite loss, whichever comes
    first; a non-finite loss that ends a shorter run above the threshold dates the explosion to the
    start of that run. The demo uses it; the early-warning suite uses :func:`explosion_step`, which
    does not misfire on losses near 0.

    Args:
        losses: per-step training losses (non-negative), index = step.
        factor: how far above the running minimum counts as exploded.
        patience: how many consecutive steps it must stay there.

    Example:
        >>> divergence_step([3.0, 2.0, 1.0, 1.2, 5.0, 6.0, 7.0], factor=3.0, patience=3)
        4
        >>> divergence_step([3.0, 2.0, float("nan")]), divergence_step([3.0, 1.0, 4.0, float("inf")])
        (2, 2)
        >>> divergence_step([3.0, 2.0, 1.0]) is None
        True
    """
    if factor <= 1.0:
        raise ValueError(f"`factor` must be > 1, got {factor!r}")
    if not isinstance(patience, int) or patience < 1:
        raise ValueError(f"`patience` must be a positive int, got {patience!r}")
    values = _as_float64(losses)
    finite = np.isfinite(values)
    # above[t]: loss t exceeds factor x the minimum of the finite losses before it
    running_min = np.minimum.accumulate(np.where(finite, values, np.inf))
    above = np.zeros(len(values), dtype=bool)
    above[1:] = values[1:] > factor * running_min[:-1]
    return _first_sustained(above, finite, patience)
