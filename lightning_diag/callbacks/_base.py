"""What every monitor shares, written once: cadence, the one host transfer per logging step,
logging to every logger, alert rules, actions, and checkpoint state."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_diag._checks import check_int
from lightning_diag.alerts import Action, Alert, DivergenceError, Rule, validate_action
from lightning_diag.callbacks._dashboard import custom_scalars_layout
from lightning_diag.callbacks._trainer import log_metrics, log_text, show_alert_count, write_dashboard_once

__all__ = ["DiagnosticCallback", "diagnostic_callbacks", "total_alerts"]

_WARNINGS_PER_KEY = 5  # "warn" action: at most this many warnings per metric, then log only
_MAX_ALERTS = 10_000  # history kept in memory and in checkpoints


class DiagnosticCallback(Callback):
    """Base of the lightning_diag monitors.

    A subclass measures on device tensors, updates its built-in rules every time it measures,
    and on logging steps calls :meth:`publish` with its figures as one 1-D device tensor.
    :meth:`publish` reads that tensor and every rule's pending firings back in one transfer,
    logs ``{key: value}`` plus ``alerts/<source>`` to every logger, and applies ``action`` to
    the new alerts.

    Args:
        every_n_steps: logging cadence in optimizer steps; ``None`` follows
            ``Trainer(log_every_n_steps=...)``. Alerts surface at the first logging step at or
            after the step where a rule fired (``Alert.step`` is the step where it fired).
        action: what to do with a ``"warning"`` or ``"critical"`` alert (``"info"`` alerts are
            recorded and logged, never acted on): ``"log"`` (only log it), ``"warn"`` (rank-zero warning,
            at most 5 per metric), ``"stop"`` (``trainer.should_stop = True``, agreed across DDP
            ranks, so checkpoint callbacks still run), ``"raise"`` (:class:`DivergenceError` on
            every rank), or a callable ``action(alert, trainer)``. Every alert is logged in any case.
        rules: extra rules (:class:`~lightning_diag.alerts.Above`, ``Below``, ``ZScore``,
            ``NonFinite``) on this monitor's logged keys, evaluated on logging steps.
    """

    def __init__(
        self, *, every_n_steps: int | None = None, action: Action = "warn", rules: Sequence[Rule] = ()
    ) -> None:
        check_int("every_n_steps", every_n_steps, 1, optional=True)
        validate_action(action)
        for rule in rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"`rules` must hold lightning_diag.alerts.Rule objects, got {rule!r}")
        self.every_n_steps, self.action, self.rules = every_n_steps, action, list(rules)
        self.alerts: list[Alert] = []
        self._builtin_rules: list[Rule] = []
        self._rule_index: dict[tuple[str, ...], list[list[int]]] = {}
        self._warned: Counter[str] = Counter()
        self._once: set[str] = set()
        self.published_extra: list[float] = []  # host copy of publish(extra=...), read by _act

    # -- identity and cadence -------------------------------------------------------------------

    @property
    def source(self) -> str:
        return type(self).__name__

    def _cadence(self, trainer: pl.Trainer) -> int:
        return self.every_n_steps or max(int(trainer.log_every_n_steps), 1)

    def is_logging_step(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is one this monitor logs, as Lightning does."""
        return (step + 1) % self._cadence(trainer) == 0

    def warn_once(self, cause: str, message: str) -> None:
        """A rank-zero warning shown once per monitor and cause, never per step."""
        if cause not in self._once:
            self._once.add(cause)
            rank_zero_warn(f"{self.source}: {message}")

    # -- the one host transfer ------------------------------------------------------------------

    def publish(
        self, trainer: pl.Trainer, step: int, keys: Sequence[str], values: Tensor, extra: Tensor | None = None
    ) -> dict[str, float]:
        """Log ``values`` (1-D device tensor, one per key) and act on every pending alert.

        This is the monitor's only host sync: figures and all rules' pending firings travel in
        one ``.tolist()``. ``extra`` (optional 1-D device tensor) travels in the same transfer
        without being logged; its host copy is :attr:`published_extra` while :meth:`_act` runs,
        for a subclass whose actions need more than the alerts. Returns the logged dict.
        """
        keys = tuple(keys)
        for rule, index in zip(self.rules, self._bind_rules(keys)):
            rule.update(values[index], step)
        rules = [*self._builtin_rules, *self.rules]
        # A rule's pending() is usually [steps..., values...]; a rule may append more (its own take reads it).
        pendings = [r.pending() for r in rules]
        tail = [] if extra is None else [extra.detach().to(device=values.device, dtype=torch.float64).reshape(-1)]
        packed = torch.cat([values.detach().to(torch.float64).reshape(-1), *pendings, *tail])
        host = packed.tolist()
        metrics = dict(zip(keys, host[: len(keys)]))
        offset, new_alerts = len(keys), []
        for rule, pending in zip(rules, pendings):
            size = pending.numel()
            new_alerts += rule.take(host[offset : offset + size], self.source)
            offset += size
        new_alerts.sort(key=lambda a: a.step)
        self.alerts = (self.alerts + new_alerts)[-_MAX_ALERTS:]
        metrics[f"alerts/{self.source}"] = float(len(self.alerts))
        write_dashboard_once(trainer, lambda: custom_scalars_layout(diagnostic_callbacks(trainer)))
        show_alert_count(trainer, total_alerts)
        log_metrics(trainer, metrics, step)
        for alert in new_alerts:
            log_text(trainer, f"alerts/{self.source}", alert.message, alert.step)
        self.published_extra = host[offset:]
        self._act(trainer, [a for a in new_alerts if a.severity != "info"])  # info: recorded, never acted on
        return metrics

    def _bind_rules(self, keys: tuple[str, ...]) -> list[list[int]]:
        if keys not in self._rule_index:  # bound once per key set (rebinding resets a rule)
            self._rule_index[keys] = [rule.bind(keys) for rule in self.rules]
        return self._rule_index[keys]

    # -- actions --------------------------------------------------------------------------------

    def _act(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        action = self.action
        if callable(action):
            for alert in alerts:
                action(alert, trainer)
        elif action == "warn":
            self._warn(alerts)
        elif action in ("stop", "raise"):
            # Every rank reaches this line at the same steps, so the collective is safe; a rank
            # that saw nothing still stops (or raises) with the others instead of hanging.
            decision = trainer.strategy.reduce_boolean_decision(bool(alerts), all=False)
            if not decision:
                return
            reason = alerts[0].message if alerts else f"{self.source}: alert on another rank"
            if action == "raise":
                raise DivergenceError(alerts or [])
            trainer.should_stop = True
            rank_zero_info(f"{reason} -> stopping the run (trainer.should_stop = True)")

    def _warn(self, alerts: list[Alert]) -> None:
        """The ``"warn"`` action: a rank-zero warning per alert, at most 5 per metric."""
        for alert in alerts:
            self._warned[alert.metric] += 1
            if self._warned[alert.metric] <= _WARNINGS_PER_KEY:
                suffix = " (further alerts on this metric are logged only)" if (
                    self._warned[alert.metric] == _WARNINGS_PER_KEY) else ""
                rank_zero_warn(alert.message + suffix)

    def dashboard_charts(self) -> dict[str, list[str]]:
        """This monitor's charts on the TensorBoard dashboard: title -> tag regexes (override)."""
        return {}

    # -- checkpoint state -----------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """Running state of the subclass (override); saved with the alerts and rules."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (override)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "alerts": [a.as_dict() for a in self.alerts],
            "builtin_rules": [r.state_dict() for r in self._builtin_rules],
            "rules": [r.state_dict() for r in self.rules],
            "warned": dict(self._warned),
            **self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alerts = [Alert(**a) for a in state_dict.get("alerts", [])]
        self._warned = Counter(state_dict.get("warned", {}))
        for rules, states in ((self._builtin_rules, "builtin_rules"), (self.rules, "rules")):
            for rule, s in zip(rules, state_dict.get(states, [])):
                rule.load_state_dict(s)
        self.load_extra_state(state_dict)


def diagnostic_callbacks(trainer: pl.Trainer) -> list[DiagnosticCallback]:
    """The lightning_diag monitors among the trainer's callbacks, in their order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, DiagnosticCallback)]


def total_alerts(trainer: pl.Trainer) -> int:
    """Alerts raised so far by all the trainer's monitors (the progress bar's ``alerts`` item)."""
    return sum(len(cb.alerts) for cb in diagnostic_callbacks(trainer))
