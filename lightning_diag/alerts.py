"""The alert layer shared by every monitor: the :class:`Alert` record and threshold rules.

A rule is evaluated on device tensors every time its monitor measures (no host sync): it keeps a
per-element streak of consecutive hits and, when a streak reaches ``patience``, records the step
and value of that firing. The monitor reads the pending firings back together with its other
figures, in its one host transfer per logging step, and turns them into :class:`Alert` records.
A rule fires once per streak: a metric that stays above its threshold for 1,000 steps is one
alert, not 1,000.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
from torch import Tensor

from lightning_diag._checks import check_int
from lightning_diag.metrics.stats import EmaZScore

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "ACTIONS",
    "Above",
    "Action",
    "Alert",
    "Below",
    "DivergenceError",
    "NonFinite",
    "Rule",
    "ZScore",
    "validate_action",
]

Severity = Literal["info", "warning", "critical"]
SEVERITIES = ("info", "warning", "critical")
ACTIONS = ("log", "warn", "stop", "raise")
Action = Union[Literal["log", "warn", "stop", "raise"], Callable[["Alert", "pl.Trainer"], None]]


@dataclass(frozen=True)
class Alert:
    """One firing of a rule.

    Attributes:
        source: the monitor that raised it (its class name).
        metric: the logged key that crossed the threshold, e.g. ``"grad_norm/zscore"``.
        step: the trainer's global step at which the rule fired.
        value: the metric's value at that step.
        threshold: the threshold it crossed.
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        message: one human-readable line with all of the above.
    """

    source: str
    metric: str
    step: int
    value: float
    threshold: float
    severity: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class DivergenceError(RuntimeError):
    """Raised by a monitor whose ``action="raise"``; ``.alerts`` holds what fired."""

    def __init__(self, alerts: Sequence[Alert]) -> None:
        self.alerts = list(alerts)
        super().__init__("; ".join(a.message for a in self.alerts) or "divergence alert")


def validate_action(action: Any) -> None:
    """Raise a ``ValueError`` unless ``action`` is one of :data:`ACTIONS` or a callable."""
    if callable(action) or action in ACTIONS:
        return
    raise ValueError(f"`action` must be one of {ACTIONS} or a callable(alert, trainer), got {action!r}")


class Rule:
    """Base of the threshold rules: fires when ``hits(value)`` holds ``patience`` times in a row.

    Args:
        metric: the logged key the rule watches, or a glob pattern over the monitor's keys
            (``"grad_norm/*"``); each matching key is watched independently.
        threshold: the value the metric is compared with.
        patience: consecutive hits needed to fire (>= 1).
        severity: ``"info"``, ``"warning"`` or ``"critical"``.

    Subclasses define :meth:`hits` and :attr:`relation` (a word for messages).
    """

    relation = "crossed"

    def __init__(
        self, metric: str, threshold: float, *, patience: int = 1, severity: Severity = "warning"
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"`metric` must be a non-empty string, got {metric!r}")
        check_int("patience", patience, 1)
        if severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}, got {severity!r}")
        self.metric, self.threshold, self.patience, self.severity = metric, float(threshold), patience, severity
        self.keys: list[str] = [metric]
        self.reset()

    def hits(self, value: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        steps = f" for {self.patience} checks" if self.patience > 1 else ""
        return f"{self.relation} {self.threshold:g}{steps}"

    def bind(self, keys: Sequence[str]) -> list[int]:
        """Match :attr:`metric` against a monitor's keys; returns the indices watched.

        Raises:
            ValueError: nothing matches; the message lists the available keys.
        """
        index = [i for i, k in enumerate(keys) if fnmatch.fnmatchcase(k, self.metric)]
        if not index:
            raise ValueError(
                f"{self!r} watches {self.metric!r}, which matches none of this monitor's keys: "
                f"{sorted(keys)}"
            )
        matched = [keys[i] for i in index]
        if matched != self.keys:  # same keys (e.g. after a checkpoint load): keep the state
            self.keys = matched
            self.reset()
        return index

    def reset(self) -> None:
        n = len(self.keys)
        self.streak = torch.zeros(n, dtype=torch.long)
        self.pending_step = torch.full((n,), -1.0, dtype=torch.float64)
        self.pending_value = torch.zeros(n, dtype=torch.float64)

    def update(self, value: Tensor, step: int) -> None:
        """Evaluate the rule on ``value`` (shape ``(len(keys),)`` or scalar) at ``step``: device only."""
        value = value.detach().reshape(-1).to(torch.float64)
        if self.streak.device != value.device:
            self.streak, self.pending_step, self.pending_value = (
                t.to(value.device) for t in (self.streak, self.pending_step, self.pending_value)
            )
        self.streak = torch.where(self.hits(value), self.streak + 1, 0)
        fired = (self.streak == self.patience) & (self.pending_step < 0)
        self.pending_step = torch.where(fired, float(step), self.pending_step)
        self.pending_value = torch.where(fired, value, self.pending_value)

    def pending(self) -> Tensor:
        """The pending firings as one float64 vector ``[steps..., values...]`` for the host transfer."""
        return torch.cat([self.pending_step, self.pending_value])

    def take(self, host: Sequence[float], source: str) -> list[Alert]:
        """Turn the host copy of :meth:`pending` into alerts and clear what was pending."""
        n = len(self.keys)
        alerts = []
        for key, step, value in zip(self.keys, host[:n], host[n:]):
            if step >= 0:
                message = (
                    f"{source}: {key} = {value:.4g} ({self.describe()}) at step {int(step)}"
                )
                alerts.append(Alert(source, key, int(step), value, self.threshold, self.severity, message))
        if alerts:
            self.pending_step.fill_(-1.0)
        return alerts

    def state_dict(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "streak": self.streak.cpu(), "pending_step": self.pending_step.cpu(),
                "pending_value": self.pending_value.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = list(state.get("keys", self.keys))
        if keys != self.keys and self.keys != [self.metric]:
            return  # bound to other keys (another model or layer set): start afresh
        self.keys = keys
        self.streak = state["streak"].clone()
        self.pending_step = state["pending_step"].clone()
        self.pending_value = state["pending_value"].clone()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.metric!r}, {self.threshold:g}, patience={self.patience}, "
            f"severity={self.severity!r})"
        )


class Above(Rule):
    """Fires when the metric is above ``threshold`` (NaN counts as a hit: it is never "fine").

    Example:
        >>> rule = Above("grad_norm/total", 10.0, patience=2)
        >>> for step, v in enumerate([11.0, 12.0, 13.0]):
        ...     rule.update(torch.tensor(v), step)
        >>> [a.step for a in rule.take(rule.pending().tolist(), "demo")]
        [1]
    """

    relation = "above"

    def hits(self, value: Tensor) -> Tensor:
        return (value > self.threshold) | torch.isnan(value)


class Below(Rule):
    """Fires when the metric is below ``threshold`` (NaN counts as a hit)."""

    relation = "below"

    def hits(self, value: Tensor) -> Tensor:
        return (value < self.threshold) | torch.isnan(value)


class NonFinite(Rule):
    """Fires when the metric is inf or NaN; ``threshold`` is unused (reported as inf)."""

    relation = "non-finite"

    def __init__(self, metric: str, *, patience: int = 1, severity: Severity = "critical") -> None:
        super().__init__(metric, float("inf"), patience=patience, severity=severity)

    def describe(self) -> str:
        return "non-finite" + (f" for {self.patience} checks" if self.patience > 1 else "")

    def hits(self, value: Tensor) -> Tensor:
        return ~torch.isfinite(value)


class ZScore(Rule):
    """Fires when the metric's z-score against its own EMA baseline exceeds ``threshold``.

    The baseline is an :class:`~lightning_diag.metrics.stats.EmaZScore` per watched key (ZClip's
    rule: warm-up, then EMA mean and variance with decay ``alpha``). Values that fire are not
    absorbed into the baseline, so a run of spikes does not teach the rule that spikes are normal.

    Example:
        >>> rule = ZScore("loss", 3.0, warmup=5)
        >>> for step, v in enumerate([1.0, 1.1, 0.9, 1.0, 1.05, 9.0]):
        ...     rule.update(torch.tensor(v), step)
        >>> [a.step for a in rule.take(rule.pending().tolist(), "demo")]
        [5]
    """

    relation = "z-score above"

    def __init__(
        self,
        metric: str,
        threshold: float = 3.0,
        *,
        alpha: float = 0.97,
        warmup: int = 25,
        patience: int = 1,
        severity: Severity = "warning",
    ) -> None:
        self.alpha, self.warmup = alpha, warmup
        super().__init__(metric, threshold, patience=patience, severity=severity)

    def reset(self) -> None:
        super().reset()
        self.baselines = [EmaZScore(self.alpha, self.warmup) for _ in self.keys]

    def hits(self, value: Tensor) -> Tensor:
        z = torch.stack([b.score(v) for b, v in zip(self.baselines, value)]).to(value.dtype)
        hit = z > self.threshold
        for b, v, h in zip(self.baselines, value, hit):
            b.update(torch.where(h, float("nan"), v.float()))  # non-finite: a spike is not absorbed
        return hit

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "baselines": [b.state_dict() for b in self.baselines]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.keys == list(state.get("keys", [])) and len(state.get("baselines", [])) == len(self.keys):
            self.baselines = [EmaZScore(self.alpha, self.warmup) for _ in self.keys]
            for b, s in zip(self.baselines, state["baselines"]):
                b.load_state_dict(s)
