"""The alert layer shared by every monitor: the :class:`Alert` record, threshold rules and the book
that evaluates them.

A rule watches one logged key, every key matching a glob pattern, or every layer's key of a
template such as ``"grad_norm/layer/{layer}"`` (each key independently), and fires when its
condition has held for ``patience`` consecutive **steps**, once per streak: a metric that stays
above its threshold for 1,000 steps is one alert, not 1,000. Patience counts steps, not
measurements, so it means the same for a figure known every step and one known every tenth step
(a streak that begins at a check and still holds at the next one has lasted the steps between).

Rules run on the host, in float64 numpy, one vectorized pass per rule over all its keys: a
monitor's figures reach the host asynchronously (``callbacks/_base.py``), so deciding there costs
no device kernel and no sync. :class:`RuleBook` is what a monitor holds: its built-in rules and the
user's, bound to its keys; in a checkpoint each rule's state is filed under the rule's kind and
arguments (:meth:`Rule.state_key`), so ``rules=`` may be given in another order on resume.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Union

import numpy as np

from lightning_diag._checks import check_int, check_number
from lightning_diag.keys import LAYER, split_key
from lightning_diag.metrics.stats import EmaBaseline

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "ACTIONS",
    "SEVERITIES",
    "Above",
    "Action",
    "Alert",
    "Below",
    "DiagnosticWarning",
    "DivergenceError",
    "NonFinite",
    "Rule",
    "RuleBook",
    "ZScore",
    "as_rules",
]

Severity = Literal["info", "warning", "critical"]
SEVERITIES = ("info", "warning", "critical")
ACTIONS = ("log", "warn", "stop", "raise")
Action = Union[Literal["log", "warn", "stop", "raise"], Callable[["Alert", "pl.Trainer"], None]]
_LAYERS_SHOWN = 3  # layers named in the message of a per-layer alert; the rest are counted (all in `layers`)


@dataclass(frozen=True)
class Alert:
    """One firing of a rule.

    Attributes:
        source: the monitor that raised it (its class name).
        metric: the logged key that crossed the threshold, e.g. ``"grad_norm/total"``.
        step: the optimizer step (``trainer.global_step`` while it was measured) at which it fired.
        value: the metric's value at that step.
        threshold: the threshold it crossed.
        severity: ``"info"`` (recorded, never acted on), ``"warning"`` or ``"critical"``.
        message: one human-readable line with all of the above.
        acted_step: the step during which the monitor's action took effect (``step`` on the
            CPU, at most ``step + 1`` on a GPU, where the figures reach the host one step late to
            avoid a sync); ``None`` until then.
        layers: when one rule fired at one step on one figure of several layers, the one alert of
            that event names them all here (``metric`` is then the template, ``"grad_norm/layer/{layer}"``,
            and ``value`` the first layer's); empty for an alert on one key.
    """

    source: str
    metric: str
    step: int
    value: float
    threshold: float
    severity: str
    message: str
    acted_step: int | None = None
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))  # a list when read back from JSON or a checkpoint

    def as_dict(self) -> dict[str, Any]:
        # A list, not a tuple: the checkpoint loads with torch.load(weights_only=True) and reads as JSON alike.
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

    def __str__(self) -> str:
        return f"[{self.severity}] {self.message}"


class DiagnosticWarning(UserWarning):
    """The category of every warning lightning_diag shows (filter it with ``warnings.filterwarnings``)."""


class DivergenceError(RuntimeError):
    """Raised by a monitor whose ``action="raise"``; ``.alerts`` holds what fired."""

    def __init__(self, alerts: Sequence[Alert]) -> None:
        self.alerts = list(alerts)
        super().__init__("; ".join(a.message for a in self.alerts) or "divergence alert")

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from the alerts (the default passes the message as ``alerts``): a multiprocessing
        # launcher pickles the error of a rank to raise it in the main process.
        return type(self), (self.alerts,), self.__dict__


def _check_threshold(threshold: Any, low: float, allowed: str) -> None:
    """:func:`check_number` on a threshold (inf allowed; -inf too when it is ``low``), its message saying
    what is ``allowed`` in a rule's words (``-inf`` as a bound would tell a user nothing)."""
    try:
        check_number("threshold", threshold, low, low_open=low > -np.inf, high_open=False)
    except ValueError:
        raise ValueError(f"`threshold` {allowed}, got {threshold!r}") from None


class Rule:
    """Base of the threshold rules: fires when :meth:`hits` holds for ``patience`` steps in a row.

    Args:
        metric: the logged key the rule watches, a glob pattern over the monitor's keys
            (``"grad_norm/layer/*"``) or a declared template (``"grad_norm/layer/{layer}"``: every
            layer's key); each matching key is watched independently.
        threshold: the value the metric is compared with (a number, not NaN).
        patience: steps the condition must hold, counting the first, before the rule fires (>= 1).
        severity: ``"info"`` (recorded and logged, never acted on), ``"warning"`` or ``"critical"``.

    Subclasses define :meth:`hits` (vectorized over the keys) and :attr:`relation`.
    """

    relation = "crossed"

    def __init__(
        self, metric: str, threshold: float, *, patience: int = 1, severity: Severity = "warning"
    ) -> None:
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"`metric` must be a non-empty string, got {metric!r}")
        _check_threshold(threshold, -np.inf, "must be a number (not NaN)")  # inf is allowed: NonFinite's
        check_int("patience", patience, 1)
        if severity not in SEVERITIES:
            raise ValueError(f"`severity` must be one of {SEVERITIES}, got {severity!r}")
        self.metric, self.threshold, self.patience, self.severity = metric, float(threshold), patience, severity
        self._pattern = metric.replace(LAYER, "*")  # a template watches every layer (a layer in a key has no "/")
        self.keys: list[str] = []
        self.start = np.zeros(0, dtype=np.int64)  # step at which each key's streak began, -1: none
        self.fired = np.zeros(0, dtype=bool)  # the current streak has fired
        self.active = np.zeros(0, dtype=bool)  # in firing state at the last update

    def watches(self, key: str) -> bool:
        return fnmatch.fnmatchcase(key, self._pattern)

    def hits(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Bool per value: the condition holds (``slots`` index the rule's own keys)."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.relation} {self.threshold:g}{self._for()}"

    def _for(self) -> str:
        return f" for {self.patience} steps" if self.patience > 1 else ""

    def slots(self, keys: Sequence[str]) -> np.ndarray:
        """The rule's state slot of each key (new keys get fresh slots)."""
        for key in keys:
            if key not in self.keys:
                self.keys.append(key)
        self._resize(len(self.keys))
        position = {k: i for i, k in enumerate(self.keys)}
        return np.array([position[k] for k in keys], dtype=np.int64)

    def _resize(self, n: int) -> None:
        if n > self.start.size:
            grow = n - self.start.size
            self.start = np.concatenate([self.start, np.full(grow, -1, dtype=np.int64)])
            self.fired = np.concatenate([self.fired, np.zeros(grow, dtype=bool)])
            self.active = np.concatenate([self.active, np.zeros(grow, dtype=bool)])

    def update(
        self, step: int, keys: Sequence[str], values: np.ndarray, slots: np.ndarray | None = None
    ) -> list[tuple[str, float]]:
        """Evaluate the rule on ``values`` (one per key) seen at ``step``; returns the ``(key, value)`` that fire.

        ``slots`` (from :meth:`slots`, which a caller may cache per key list) saves the lookup.
        """
        slots = self.slots(keys) if slots is None else slots
        hit = np.asarray(self.hits(values, slots), dtype=bool)
        start = np.where(hit, np.where(self.start[slots] < 0, step, self.start[slots]), -1)
        active = hit & (step - start + 1 >= self.patience)
        fire = active & ~self.fired[slots]
        self.start[slots], self.active[slots], self.fired[slots] = start, active, hit & (self.fired[slots] | fire)
        return [(keys[i], float(values[i])) for i in np.flatnonzero(fire)]

    def alert(self, source: str, key: str, step: int, value: float) -> Alert:
        message = f"{source}: {key} = {value:.4g} ({self.describe()}) at step {step}"
        return Alert(source, key, step, value, self.threshold, self.severity, message)

    def layers_alert(self, source: str, template: str, step: int, fired: Sequence[tuple[str, float]]) -> Alert:
        """One alert for the ``(layer, value)`` pairs of ``template`` that fired together at ``step``."""
        shown = ", ".join(f"{layer} ({value:.4g})" for layer, value in fired[:_LAYERS_SHOWN])
        more = f" and {len(fired) - _LAYERS_SHOWN} more" if len(fired) > _LAYERS_SHOWN else ""
        value = fired[0][1]
        message = (f"{source}: {template} = {value:.4g} ({self.describe()}) at step {step} in {len(fired)} layers: "
                   f"{shown}{more}")  # fmt: skip
        return Alert(source, template, step, value, self.threshold, self.severity, message,
                     layers=tuple(layer for layer, _ in fired))  # fmt: skip

    def state_key(self) -> str:
        """What the rule's state is filed under in a checkpoint: its kind and arguments, not its place in a list."""
        return f"{type(self).__name__}({self.metric!r}, {self.threshold!r}, {self.patience}, {self.severity!r})"

    def state_dict(self) -> dict[str, Any]:
        # Lists, not arrays: a checkpoint must load with torch.load(weights_only=True).
        return {"keys": list(self.keys), "start": self.start.tolist(), "fired": self.fired.tolist(),
                "active": self.active.tolist()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.keys = list(state["keys"])
        self.start = np.asarray(state["start"], dtype=np.int64).copy()
        self.fired = np.asarray(state["fired"], dtype=bool).copy()
        self.active = np.asarray(state.get("active", np.zeros(len(self.keys))), dtype=bool).copy()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.metric!r}, {self.threshold:g}, patience={self.patience}, "
            f"severity={self.severity!r})"
        )


class Above(Rule):
    """Fires when the metric is above ``threshold``; NaN counts as a hit (it is never "fine").

    Example:
        >>> rule = Above("grad_norm/total", 10.0, patience=2)
        >>> [rule.update(step, ["grad_norm/total"], np.array([v])) for step, v in enumerate([11.0, 12.0, 13.0])]
        [[], [('grad_norm/total', 12.0)], []]
    """

    relation = "above"

    def hits(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return ~(values <= self.threshold)  # True for NaN


class Below(Rule):
    """Fires when the metric is below ``threshold``; NaN counts as a hit."""

    relation = "below"

    def hits(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return ~(values >= self.threshold)


class NonFinite(Rule):
    """Fires when the metric is inf or NaN; ``threshold`` is unused (reported as inf)."""

    relation = "non-finite"

    def __init__(self, metric: str, *, patience: int = 1, severity: Severity = "critical") -> None:
        super().__init__(metric, float("inf"), patience=patience, severity=severity)

    def describe(self) -> str:
        return "non-finite" + self._for()

    def hits(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return ~np.isfinite(values)


class ZScore(Rule):
    """Fires when the metric's z-score against its own baseline exceeds ``threshold`` (> 0).

    The baseline is an :class:`~lightning_diag.metrics.stats.EmaBaseline` per watched key
    (ZClip's rule: warm-up, then EMA mean and variance with decay ``alpha``). Values that hit are
    not absorbed, so a run of spikes does not teach the rule that spikes are normal; non-finite
    values neither hit nor enter the baseline (pair with :class:`NonFinite`).

    Example:
        >>> rule = ZScore("loss", 3.0, warmup=5)
        >>> fired = [rule.update(s, ["loss"], np.array([v])) for s, v in enumerate([1.0, 1.1, 0.9, 1.0, 1.05, 9.0])]
        >>> fired[-1]
        [('loss', 9.0)]
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
        _check_threshold(threshold, 0.0, "of a z-score must be > 0 (a z-score <= 0 fires on everything)")
        super().__init__(metric, threshold, patience=patience, severity=severity)
        self.baseline = EmaBaseline(0, alpha=alpha, warmup=warmup)

    def state_key(self) -> str:
        return f"{super().state_key()[:-1]}, alpha={self.baseline.alpha!r}, warmup={self.baseline.warmup})"

    def _resize(self, n: int) -> None:
        super()._resize(n)
        self.baseline.grow(n)

    def hits(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        full = np.full(self.baseline.size, np.nan)
        full[slots] = values
        hit = self.baseline.score(full)[slots] > self.threshold
        absorb = np.zeros(self.baseline.size, dtype=bool)
        absorb[slots] = ~hit
        self.baseline.update(full, absorb)
        return hit

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "baseline": self.baseline.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.baseline.grow(len(self.keys))
        self.baseline.load_state_dict(state["baseline"])


def as_rules(rules: Rule | Sequence[Rule] | None) -> list[Rule]:
    """``rules=`` as a list: one rule or a sequence of rules; anything else is a ``ValueError``."""
    if rules is None:
        return []
    if isinstance(rules, Rule):
        return [rules]
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise ValueError(f"`rules` must be a rule or a list of rules (Above, Below, NonFinite, ZScore), got {rules!r}")
    for rule in rules:
        if not isinstance(rule, Rule):
            raise ValueError(f"`rules` must hold lightning_diag rules (Above, Below, NonFinite, ZScore), got {rule!r}")
    return list(rules)


class RuleBook:
    """The rules of one monitor: its built-in rules and the user's, evaluated together on the host.

    :meth:`update` takes every key the monitor measured at a step (one float64 vector) and runs
    each rule on the keys it watches, one numpy pass per rule; the key-to-rule matching is cached
    per key set. A key that is not measured at a step leaves its streaks as they are.

    Args:
        source: the monitor's name, for the alert messages.
        builtin: the monitor's own rules.
        user: the user's ``rules=``.

    Example:
        >>> book = RuleBook("demo", [NonFinite("loss")], [Above("loss", 5.0, severity="info")])
        >>> [a.message for a in book.update(3, ["loss"], np.array([7.0]))]
        ['demo: loss = 7 (above 5) at step 3']
    """

    def __init__(self, source: str, builtin: Sequence[Rule] = (), user: Sequence[Rule] = ()) -> None:
        self.source, self.builtin, self.user = source, list(builtin), list(user)
        self._index: dict[tuple[str, ...], list[tuple[np.ndarray, list[str], np.ndarray]]] = {}

    @property
    def rules(self) -> list[Rule]:
        return [*self.builtin, *self.user]

    def check_patterns(self, available: Sequence[str]) -> None:
        """Raise a ``ValueError`` for a user rule that matches none of ``available`` (the keys or templates).

        The message lists each key once, sorted, the keys of every layer as their template, and the
        closest ones as "did you mean".

        Example:
            >>> book = RuleBook("demo", user=[Above("grad_norm/totl", 1.0)])
            >>> try:
            ...     book.check_patterns(["grad_norm/total", "grad_norm/layer/fc", "grad_norm/layer/{layer}"])
            ... except ValueError as error:
            ...     print(str(error).split("keys: ")[1])
            ['grad_norm/layer/{layer}', 'grad_norm/total']; did you mean 'grad_norm/total' or 'grad_norm/layer/fc'?
        """
        unique = sorted(set(available))
        shown = sorted({_template(k) for k in unique})
        for rule in self.user:
            if not any(rule.watches(k) for k in unique):
                close = list(dict.fromkeys(difflib.get_close_matches(rule.metric, unique + shown, n=3)))
                hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
                raise ValueError(
                    f"{rule!r} watches {rule.metric!r}, which matches none of this monitor's keys: {shown}{hint}"
                )

    def update(self, step: int, keys: Sequence[str], values: np.ndarray) -> list[Alert]:
        """Run every rule on the keys it watches; returns the alerts that fired, ordered by rule.

        A rule that fires at one step on one figure of several layers (a NaN reaches every layer at
        once) gives one alert naming the layers (:meth:`Rule.layers_alert`), not one per layer.
        """
        keys = tuple(keys)
        if keys not in self._index:  # once per key set: which keys each rule watches, and their state slots
            self._index[keys] = []
            for rule in self.rules:
                index = np.array([i for i, k in enumerate(keys) if rule.watches(k)], dtype=np.int64)
                watched = [keys[i] for i in index]
                self._index[keys].append((index, watched, rule.slots(watched)))
        alerts = []
        for rule, (index, watched, slots) in zip(self.rules, self._index[keys]):
            if index.size:
                alerts += self._alerts(rule, step, rule.update(step, watched, values[index], slots))
        return alerts

    def _alerts(self, rule: Rule, step: int, fired: list[tuple[str, float]]) -> list[Alert]:
        """The alerts of what one rule fired at one step: the layers of one figure together, in order of firing."""
        events: dict[str, list[tuple[str, str, float]]] = {}  # template (or the key itself) -> (key, layer, value)
        for key, value in fired:
            template, layer = _template(key), _layer(key)
            events.setdefault(template if layer is not None else key, []).append((key, layer or "", value))
        return [rule.alert(self.source, event[0][0], step, event[0][2]) if len(event) == 1
                else rule.layers_alert(self.source, template, step, [(layer, value) for _, layer, value in event])
                for template, event in events.items()]  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Each rule's state under its :meth:`~Rule.state_key` (so the order of ``rules=`` may change)."""
        return {group: {name: rule.state_dict() for name, rule in _named(rules).items()}
                for group, rules in (("builtin", self.builtin), ("user", self.user))}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore each rule from the state filed under its :meth:`~Rule.state_key`, else under the same kind
        and metric (a monitor may set a built-in rule's patience at fit start, after the load); a rule
        found under neither (a new one) starts afresh."""
        for group, rules in (("builtin", self.builtin), ("user", self.user)):
            saved, named = state.get(group, {}), _named(rules)
            # A checkpoint of a version that filed the states by position: read as then.
            saved = dict(zip(named, saved)) if isinstance(saved, list) else dict(saved)
            unmatched = [(name, rule) for name, rule in named.items() if name not in saved]
            for name, rule in named.items():
                if name in saved:
                    rule.load_state_dict(saved.pop(name))
            for _, rule in unmatched:
                kind = f"{type(rule).__name__}({rule.metric!r}, "
                name = next((n for n in saved if n.startswith(kind)), None)
                if name is not None:
                    rule.load_state_dict(saved.pop(name))
        self._index.clear()  # the rules' slots were replaced


def _layer(key: str) -> str | None:
    """The layer of a per-layer key (its name, unescaped), else None (a model-level key or any other name)."""
    try:
        return split_key(key)[2] if LAYER not in key else None
    except ValueError:
        return None


def _template(key: str) -> str:
    """The template of a per-layer key (``"grad_norm/layer/{layer}"``); any other key as it is."""
    if _layer(key) is None:
        return key
    family, figure, _ = split_key(key)
    return f"{family}/{figure}/{LAYER}"


def _named(rules: Sequence[Rule]) -> dict[str, Rule]:
    """The rules by :meth:`~Rule.state_key`; a repeated rule is numbered (``" #2"``) in its order of appearance."""
    seen: Counter[str] = Counter()
    named = {}
    for rule in rules:
        key = rule.state_key()
        seen[key] += 1
        named[key if seen[key] == 1 else f"{key} #{seen[key]}"] = rule
    return named
