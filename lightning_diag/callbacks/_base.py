"""What every monitor shares, written once: the step loop, cadence, the host hand-off, rules,
logging, actions and checkpoint state.

A monitor **declares** its keys (:data:`DiagnosticCallback.KEYS`) and **measures** device tensors
(:meth:`~DiagnosticCallback.measure`); the base does everything else:

1. ``on_before_optimizer_step``: once per optimizer step that the monitor measures, the monitor
   returns its :class:`Figures`. The *streams* among them (keys of rate ``step``, ``check`` or
   ``eval``: a few floats) leave for the host at once, asynchronously (:class:`HostCopy`); the
   rest stays on the device until the next logging step.
2. As soon as a copy has arrived (at once on the CPU; by the next step on a GPU) the host derives
   its own figures from the streams (:meth:`~DiagnosticCallback.derive`: z-scores, baselines),
   runs every rule in one numpy pass per rule (:class:`~lightning_diag.alerts.RuleBook`), and acts
   on new alerts: an action takes effect within one step of the rule firing, without a host sync.
3. On logging steps the held figures are read in one transfer and logged with the host's figures
   to every logger; ``<family>/alerts`` counts the warnings and criticals (``info`` alerts are
   recorded in :attr:`~DiagnosticCallback.alerts` and logged as text, not counted).

Actions come from a registry: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` here, and a monitor
adds its own with :func:`action` (``LossSpikeDetector`` adds ``"skip"``, ``"rollback"``,
``"reduce_lr"``) instead of overriding the dispatch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_diag._checks import check_int
from lightning_diag.alerts import Alert, DivergenceError, Rule, RuleBook, as_rules
from lightning_diag.callbacks._dashboard import custom_scalars_layout
from lightning_diag.callbacks._trainer import (
    HostCopy, log_metrics, log_text, show_alert_count, warn, write_alert_lines, write_dashboard_once,
)  # fmt: skip
from lightning_diag.keys import Key, keys_table, layer_in_key, split_key

__all__ = [
    "Cadence", "DiagnosticCallback", "Figures", "HostFigures", "action", "diagnostic_callbacks", "serious",
    "total_alerts",
]  # fmt: skip

_WARNINGS_PER_KEY = 5  # "warn" action: at most this many warnings per metric, then log only
_MAX_ALERTS = 10_000  # history kept in memory and in checkpoints
STREAM_RATES = ("step", "check", "eval")
_HOOKS = {n for n, f in vars(Callback).items() if callable(f) and not n.startswith("_")}  # Lightning calls these
_LIVE: weakref.WeakSet[DiagnosticCallback] = weakref.WeakSet()  # for twins' state keys before they meet a trainer


def serious(alerts: Sequence[Alert]) -> list[Alert]:
    """The warnings and criticals among ``alerts`` (what a count shows; ``info`` alerts are only recorded)."""
    return [a for a in alerts if a.severity != "info"]


@dataclass
class Cadence:
    """Every ``every`` optimizer steps: the one cadence helper (logging, checks, histograms, epochs).

    :meth:`at` is Lightning's rule, ``(step + 1) % every == 0``, for a cadence visited every step.
    :meth:`due` is for one visited only at some steps (histograms at logging steps): due at the
    first visited step at or after each multiple, once; :meth:`start` aligns it with a resumed run.

    Example:
        >>> c = Cadence(3)
        >>> [s for s in range(9) if c.at(s)], [s for s in (1, 4, 6, 7) if c.due(s)]
        ([2, 5, 8], [4, 6])
    """

    every: int | None
    last: int = -1

    def at(self, step: int) -> bool:
        return self.every is not None and (step + 1) % self.every == 0

    def start(self, step: int) -> None:
        self.last = step - 1

    def due(self, step: int) -> bool:
        if self.every is None or (step + 1) // self.every <= (self.last + 1) // self.every:
            return False
        self.last = step
        return True


@dataclass
class Figures:
    """Device tensors of one measurement.

    ``values[name]`` (``name`` as in the monitor's :class:`~lightning_diag.keys.Key` declarations)
    is 0-d for a model-level key and ``(len(layers),)`` for a per-layer key; ``layers`` names the
    layers measured this time (a layer that was not measured is left out, never logged as NaN).
    """

    values: dict[str, Tensor]
    layers: Sequence[str] = ()


@dataclass
class HostFigures:
    """The streams of one measurement on the host: floats by name, per-layer arrays over ``layers``."""

    step: int
    scalars: dict[str, float]
    layers: tuple[str, ...]
    per_layer: dict[str, np.ndarray]


def _no_stop_iteration(hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` with a ``StopIteration`` turned into a ``RuntimeError`` (as PEP 479 does in generators):
    Lightning's loop reads a ``StopIteration`` from any hook as the end of the data and ends the epoch
    without a word, so a bug would silently cut the run short."""

    @functools.wraps(hook)
    def guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return hook(self, *args, **kwargs)
        except StopIteration as error:
            raise RuntimeError(f"lightning_diag: {type(self).__name__}.{hook.__name__} raised StopIteration (a "
                               "bug: Lightning would have read it as the end of the data)") from error

    return guarded


def _binds_first(setup: Callable[..., Any]) -> Callable[..., Any]:
    """A monitor's own ``setup``, after the base's (:meth:`DiagnosticCallback._bind`), whether it calls super or not."""

    @functools.wraps(setup)
    def bound(self: Any, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        DiagnosticCallback._bind(self, trainer)
        return setup(self, trainer, *args, **kwargs)

    return bound


def action(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a method ``handler(self, trainer, alerts)`` as the action ``name`` of a monitor class."""

    def mark(handler: Callable[..., None]) -> Callable[..., None]:
        handler._action_name = name  # type: ignore[attr-defined]
        return handler

    return mark


@dataclass
class _Held:
    """Figures waiting on the device for the next logging step."""

    step: int
    keys: tuple[str, ...]
    values: Tensor
    extra: list[tuple[tuple[str, ...], Tensor]] = field(default_factory=list)


class DiagnosticCallback(Callback):
    """Base of the lightning_diag monitors: declare keys, measure tensors; the base does the rest.

    Args:
        every_n_steps: logging cadence in optimizer steps; ``None`` follows
            ``Trainer(log_every_n_steps=...)``. Rules see each figure as often as it is measured
            (every step for most), whatever the logging cadence.
        action: what to do with a ``"warning"`` or ``"critical"`` alert (``"info"`` alerts are
            recorded and logged, never acted on): ``"log"`` (only log it), ``"warn"`` (a
            :class:`~lightning_diag.alerts.DiagnosticWarning`, at most 5 per metric), ``"stop"``
            (``trainer.should_stop = True``; checkpoint callbacks still run), ``"raise"``
            (:class:`~lightning_diag.alerts.DivergenceError`), a monitor's own action, or a
            callable ``action(alert, trainer)``. It takes effect within one step of the rule firing
            (``alert.acted_step``). Figures are global (equal on every rank), so every rank takes
            the same decision at the same step, without a collective.
        rules: extra rules (``Above``, ``Below``, ``ZScore``, ``NonFinite``) on this monitor's keys.
        prefix: the first part of the logged keys, in place of the monitor's family (``"grad_norm"``):
            two monitors of one kind on a trainer need two prefixes (``GradNormWatcher(prefix="enc_grad")``
            logs ``enc_grad/total``; its rules watch ``enc_grad/...``). ``None``: the family.

    Attributes:
        alerts: every alert raised so far, ``info`` ones included; :attr:`serious_alerts` leaves those out.
    """

    family: ClassVar[str] = ""
    KEYS: ClassVar[tuple[Key, ...]] = ()
    _actions: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in _HOOKS & vars(cls).keys():
            setattr(cls, name, _no_stop_iteration(vars(cls)[name]))
        if "setup" in vars(cls):
            cls.setup = _binds_first(cls.setup)  # type: ignore[method-assign]
        own = {f._action_name: name for name, f in vars(cls).items() if hasattr(f, "_action_name")}
        cls._actions = {**cls._actions, **own}
        if cls.KEYS and cls.__doc__ and "Logged keys" not in cls.__doc__:  # generated, so it cannot drift
            table = keys_table(cls.family, cls.KEYS, rst=True).replace("\n", "\n    ")
            cls.__doc__ = cls.__doc__.rstrip() + f"\n\n    Logged keys:\n\n    {table}\n"

    def __init__(
        self, *, every_n_steps: int | None = None, action: Any = "warn", rules: Any = (), prefix: str | None = None
    ) -> None:
        check_int("every_n_steps", every_n_steps, 1, optional=True)
        if not (callable(action) or (isinstance(action, str) and action in self._actions)):
            raise ValueError(
                f"`action` must be one of {tuple(self._actions)} or a callable(alert, trainer), got {action!r}"
            )
        if prefix is not None and (not isinstance(prefix, str) or not prefix or "/" in prefix):
            raise ValueError(f"`prefix` must be None or a non-empty string without '/', got {prefix!r}")
        if prefix is not None:
            self.family = prefix
        self.every_n_steps, self.action, self.rules = every_n_steps, action, as_rules(rules)
        self._bound = False  # set up by a trainer at least once: the state key is final
        _LIVE.add(self)
        self.alerts: list[Alert] = []
        self.layers: list[str] = []
        self._builtin_rules: list[Rule] = []
        self._book_cache: RuleBook | None = None
        self._warned: Counter[str] = Counter()
        self._once: set[str] = set()
        self._log_cadence = Cadence(every_n_steps)
        self.checks = Cadence(None)  # a monitor that measures on check steps sets its cadence here
        self._armed_step = -1
        self._ending = False  # the run is ending on an exception: record and log alerts, take no action
        self._measured_step = -1
        self._in_flight: list[HostCopy] = []
        self._held: _Held | None = None
        self._host: tuple[int, tuple[str, ...], np.ndarray] | None = None  # last step the host processed
        self._logged_step = -1
        self._unacted: list[Alert] = []
        self._keys: dict[tuple[Any, ...], tuple[tuple[str, ...], np.ndarray]] = {}
        self._is_stream: dict[tuple[str, ...], np.ndarray] = {}  # packed keys -> which are streams (by declaration)
        self._device_index: dict[tuple[Any, ...], Tensor] = {}
        self._logged_only: dict[tuple[str, ...], np.ndarray] = {}

    # -- identity, declarations -------------------------------------------------------------------

    @property
    def source(self) -> str:
        """The monitor's name in alerts: its class, with its prefix when it has one (``GradNormWatcher[enc]``)."""
        name = type(self).__name__
        return name if self.family == type(self).family else f"{name}[{self.family}]"

    @property
    def serious_alerts(self) -> list[Alert]:
        """The warnings and criticals among :attr:`alerts` (``info`` alerts are recorded, never acted on)."""
        return serious(self.alerts)

    @property
    def state_key(self) -> str:
        """Lightning's key of the monitor's checkpoint state: the class, and the prefix when there is one."""
        return self._generate_state_key() if self.family != type(self).family else self._unique(type(self).__qualname__)

    def _generate_state_key(self, **kwargs: Any) -> str:
        if self.family != type(self).family:
            kwargs.setdefault("prefix", self.family)
        return self._unique(super()._generate_state_key(**kwargs))

    def _unique(self, key: str) -> str:
        """``key``, told apart from an identical twin's until a trainer sets them up.

        Lightning refuses two callbacks with one state key when the Trainer is built, with a
        traceback that does not say what to do. Until set up, twins get distinct keys, so that
        :meth:`_bind` can say it at fit start (and tell the user to pass ``prefix=``); once set up
        the key is the plain one, the one a checkpoint is saved and restored under.
        """
        if self._bound or getattr(self, "_plain_key", False):
            return key
        twins = [m for m in list(_LIVE) if m is not self and type(m) is type(self) and not m._bound]
        return f"{key}#{id(self):x}" if any(m._plain_state_key() == key for m in twins) else key

    def _plain_state_key(self) -> str | None:
        """The state key without the twin suffix; None for a monitor whose constructor raised (it is in
        ``_LIVE`` until collected, but it is no twin: it never reaches a trainer)."""
        self._plain_key = True
        try:
            return self.state_key
        except AttributeError:
            return None
        finally:
            self._plain_key = False

    @property
    def book(self) -> RuleBook:
        """The monitor's rules (built-in, then the user's), bound on first use."""
        if self._book_cache is None:
            self._book_cache = RuleBook(self.source, self._builtin_rules, self.rules)
        return self._book_cache

    def declared_keys(self) -> list[Key]:
        """The keys this monitor logs with its settings (a key with ``requires`` needs that attribute true)."""
        return [k for k in self.KEYS if k.requires is None or getattr(self, k.requires)]

    def dashboard_charts(self) -> dict[str, list[str]]:
        """Chart title -> tag regexes, from the declared keys (scalars with a ``chart``)."""
        charts: dict[str, list[str]] = {}
        for key in self.declared_keys():
            if key.kind == "scalar" and key.chart:
                charts.setdefault(key.chart, []).append(key.regex(self.family))
        return charts

    def warn_once(self, cause: str, message: str) -> None:
        """A warning shown once per monitor and cause, never per step."""
        if cause not in self._once:
            self._once.add(cause)
            warn(f"lightning_diag: {self.source}: {message}")

    # -- what a monitor implements ----------------------------------------------------------------

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve what to watch (after ``configure_model`` and the strategy's wrapping); set ``layers``."""

    def detach(self) -> None:
        """Remove hooks and drop captured tensors (teardown, exception, re-attach)."""

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training begins (``on_train_start``), after the base's own set-up."""

    def arm(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """A check step begins (its first micro-batch): start capturing what the check needs."""

    def disarm(self) -> None:
        """Stop capturing: the forward of the check step is over (also on teardown and exceptions)."""

    def is_check_step(self, step: int) -> bool:
        """Whether ``step`` is a check step (``self.checks``; a monitor may add steps, e.g. adaptively)."""
        return self.checks.at(step)

    def measures(self, step: int) -> bool:
        """Whether optimizer step ``step`` is one this monitor measures in ``on_before_optimizer_step``
        (default: the check steps it armed for)."""
        return self._armed_step == step

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, logging: bool
    ) -> Figures | None:
        """Device figures of this step (``on_before_optimizer_step``): the streams always, the rest when ``logging``."""
        return None

    def measure_after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Figures | None:
        """Figures known only after ``optimizer.step()`` (logging steps only)."""
        return None

    def derive(self, host: HostFigures) -> dict[str, float | np.ndarray]:
        """Host figures from the streams of one measurement: name -> float, or an array over ``host.layers``."""
        return {}

    def after_rules(self, step: int) -> dict[str, float]:
        """Host bookkeeping once the rules have seen a step (e.g. counters); returns figures to log."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Running state of the monitor (saved with the alerts and rules)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    # -- the step loop ----------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The base's set-up (:meth:`_bind`); a monitor's own ``setup`` runs after it, super() or not."""
        self._bind(trainer)

    def _bind(self, trainer: pl.Trainer) -> None:
        """Refuse two monitors logging under one family (their keys, counts and states would collide);
        from now on the state key is the plain one (set up before a checkpoint is restored)."""
        same = [c for c in diagnostic_callbacks(trainer) if c.family == self.family]
        if len(same) > 1:
            kinds = sorted({type(c) for c in same}, key=lambda c: c.__name__)
            fix = " or ".join(f"{k.__name__}(prefix='{self.family}_2')" for k in kinds
                              if "prefix" in inspect.signature(k).parameters)  # fmt: skip
            raise ValueError(
                f"lightning_diag: {len(same)} monitors on this trainer ({', '.join(c.source for c in same)}) log "
                f"under '{self.family}/': their figures, alert counts and checkpoint states would collide. "
                + (f"Give each its own `prefix=`, e.g. {fix}, the first part of its keys." if fix else
                   "Attach one of them per trainer.")  # fmt: skip
            )
        self._bound = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()
        self.attach(trainer, pl_module)
        self.book.check_patterns([k.key(self.family, layer) for k in self.declared_keys()
                                  for layer in (self.layers if k.per_layer else [None])]
                                 + [k.full(self.family) for k in self.declared_keys()])  # fmt: skip

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_cadence = Cadence(self.every_n_steps or max(int(trainer.log_every_n_steps), 1))
        self._measured_step, self._logged_step = -1, trainer.global_step - 1
        monitors = diagnostic_callbacks(trainer)
        if monitors and monitors[0] is self:  # one warning for the trainer, by its first monitor
            self._warn_if_cadence_outlasts_the_run(trainer, monitors)
        self.start(trainer, pl_module)

    def _warn_if_cadence_outlasts_the_run(self, trainer: pl.Trainer, monitors: list[DiagnosticCallback]) -> None:
        """Say once which monitors log less often than the run lasts (not those whose figures are logged
        at evaluations): their figures reach the loggers once, at the end."""
        try:
            left = int(float(trainer.estimated_stepping_batches)) - trainer.global_step
        except Exception:  # noqa: BLE001 - an iterable dataset of unknown length: nothing to compare
            return
        late: dict[int, list[str]] = {}
        for monitor in monitors:
            every = monitor.every_n_steps or max(int(trainer.log_every_n_steps), 1)
            if every > left and any(k.kind == "scalar" and k.rate != "eval" for k in monitor.declared_keys()):
                late.setdefault(every, []).append(monitor.source)
        said = "; ".join(f"{', '.join(names)} log{'s' if len(names) == 1 else ''} every {every} steps"
                         for every, names in late.items())  # fmt: skip
        if late and "cadence" not in self._once:  # not warn_once: the warning speaks for every monitor
            self._once.add("cadence")
            warn(f"lightning_diag: {said} (`every_n_steps`, or the trainer's `log_every_n_steps`) but the run has "
                 f"{left} steps left: their figures are logged once, at the end of the run (the last measurement of "
                 "those known every step or check); alerts are still raised and logged as they fire")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.drain(trainer, trainer.global_step, wait=True)  # the previous step's copy: due now at the latest
        step = trainer.global_step
        if self._armed_step != step and self.is_check_step(step):  # first micro-batch only
            self._armed_step = step
            self.arm(trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.disarm()  # a forward recomputed in backward (activation checkpointing) is not captured

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if step == self._measured_step or not self.measures(step):  # once per step (several optimizers)
            return
        self._measured_step = step
        with torch.no_grad():
            figures = self.measure(trainer, pl_module, optimizer, logging=self._is_logging_step(step))
        if figures is not None:
            self.record(step, figures)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.disarm()
        step = trainer.global_step - 1  # the optimizer step that just ran (if one did)
        if self._held is not None and self._held.step == step and self._is_logging_step(step):
            with torch.no_grad():
                after = self.measure_after_step(trainer, pl_module)
            if after is not None:
                self._held.extra.append(self._pack(after))
        self.drain(trainer, step, wait=self._is_logging_step(step))
        if self._is_logging_step(step) and step > self._logged_step:
            self.publish(trainer, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step - 1
        self.drain(trainer, step, wait=True)  # nothing is lost after the last logging step
        if self._host is not None and self._host[0] > self._logged_step:
            self.publish(trainer, self._host[0])

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._ending = True  # record (and log) what fired before the failure; no action: the run is ending anyway
        try:  # the figures held for a logging step too: the rules on them (per-layer ones) run when they are read
            self.drain(trainer, trainer.global_step, wait=True, act=False)
            if self._held is not None:
                self.publish(trainer, self._held.step)
        except Exception as error:  # noqa: BLE001 - never mask the run's own exception
            self.warn_once("exception", f"could not record the last alerts ({type(error).__name__}: {error})")
        finally:
            self._ending = False
            self._release()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        self.disarm()
        self.detach()
        self._armed_step = -1
        self._in_flight, self._held = [], None

    def _is_logging_step(self, step: int) -> bool:
        return self._log_cadence.at(step)

    # -- from device to host ----------------------------------------------------------------------

    def _pack(self, figures: Figures) -> tuple[tuple[str, ...], Tensor]:
        """All figures of a measurement as ``(keys, one 1-D device tensor)``: one stack, one cat."""
        cache = (tuple(figures.values), tuple(figures.layers))
        if cache not in self._keys:
            declared = {k.name: k for k in self.KEYS}
            # In the order of the packed tensor: the model-level figures, then each per-layer one. A key's rate
            # is its declaration's: never parsed back from the key (a layer's name may hold anything).
            names = sorted(figures.values, key=lambda n: declared[n].per_layer)
            each = [(declared[n].key(self.family, layer), declared[n].rate in STREAM_RATES) for n in names
                    for layer in (figures.layers if declared[n].per_layer else [None])]  # fmt: skip
            keys, is_stream = tuple(k for k, _ in each), np.array([s for _, s in each], dtype=bool)
            self._is_stream[keys] = is_stream
            self._keys[cache] = (keys, np.flatnonzero(is_stream))
        keys, _ = self._keys[cache]
        scalars = [v for n, v in figures.values.items() if not n.endswith("{layer}")]
        layered = [v for n, v in figures.values.items() if n.endswith("{layer}")]
        if len(scalars) == 1 and not layered:
            return keys, scalars[0]  # 0-d: no op at all
        parts = ([torch.stack(scalars)] if scalars else []) + layered
        return keys, parts[0] if len(parts) == 1 else torch.cat(parts)

    def record(self, step: int, figures: Figures) -> None:
        """Hand one measurement to the base: its streams leave for the host now, the rest waits."""
        keys, values = self._pack(figures)
        cache = (tuple(figures.values), tuple(figures.layers))
        _, streams = self._keys[cache]
        if streams.size == len(keys):
            self._in_flight.append(HostCopy(step, keys, values))
        elif streams.size:  # the index is built on the device once: a blocking host-to-device copy would sync
            if (cache, values.device) not in self._device_index:
                self._device_index[(cache, values.device)] = torch.as_tensor(streams, device=values.device)
            index = self._device_index[(cache, values.device)]
            self._in_flight.append(HostCopy(step, tuple(keys[i] for i in streams), values.index_select(0, index)))
        if streams.size < len(keys):  # figures read at the next logging step (the latest measurement's)
            self._held = _Held(step, keys, values)

    def drain(self, trainer: pl.Trainer | None, now: int, *, wait: bool, act: bool = True) -> None:
        """Process the copies that have reached the host (all of them with ``wait``), then act."""
        while self._in_flight and (wait or self._in_flight[0].ready()):
            copy = self._in_flight.pop(0)
            self._process(copy.step, copy.keys, np.asarray(copy.values(), dtype=np.float64))
        if trainer is not None and self._unacted:
            alerts, self._unacted = self._unacted, []
            self._raise(trainer, alerts, now, act)

    def _process(self, step: int, keys: tuple[str, ...], values: np.ndarray) -> None:
        derived = self.derive(_host_figures(step, keys, values))
        if derived:
            extra_keys, extra_values = self._flatten(derived, _host_layers(keys))
            keys, values = keys + extra_keys, np.concatenate([values, extra_values])
        self._unacted += self.book.update(step, keys, values)
        counters = self.after_rules(step)
        if counters:
            extra_keys, extra_values = self._flatten(counters, ())
            self._unacted += self.book.update(step, extra_keys, extra_values)  # a user's rules on the counters
            keys, values = keys + extra_keys, np.concatenate([values, extra_values])
        self._host = (step, keys, values)

    def _flatten(self, derived: dict[str, Any], layers: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
        keys: list[str] = []
        values: list[Any] = []
        for name, value in derived.items():
            if name.endswith("/{layer}"):
                keys += [f"{self.family}/{name[:-8]}/{layer_in_key(layer)}" for layer in layers]
                values += list(np.asarray(value, dtype=np.float64).reshape(-1))
            else:
                keys.append(f"{self.family}/{name}")
                values.append(float(value))
        return tuple(keys), np.asarray(values, dtype=np.float64)

    def publish(self, trainer: pl.Trainer, step: int) -> None:
        """Log the held device figures (one transfer) with the host's figures of the same step."""
        metrics: dict[str, float] = {}
        held, self._held = self._held, None
        if held is None and self._host is not None and self._logged_step < self._host[0] < step:
            step = self._host[0]  # a check between two logging steps is logged at the next one, at its own step
        if held is not None:
            parts = [(held.keys, held.values), *held.extra]
            flat = torch.cat([v.reshape(-1).to(torch.float64) for _, v in parts]).tolist()  # the one host read
            keys = tuple(k for keys, _ in parts for k in keys)
            metrics.update(zip(keys, flat))
            self._rules_on_logged(trainer, held.step, step, parts, flat)
            step = held.step
        if self._host is not None and self._host[0] == step:
            metrics.update(zip(self._host[1], self._host[2].tolist()))
        if not metrics:
            return
        metrics[f"{self.family}/alerts"] = float(len(self.serious_alerts))
        self._logged_step = max(self._logged_step, step)
        write_dashboard_once(trainer, lambda: custom_scalars_layout(diagnostic_callbacks(trainer)))
        show_alert_count(trainer, total_alerts)
        log_metrics(trainer, metrics, step)

    def _rules_on_logged(self, trainer: pl.Trainer, step: int, now: int,
                         parts: list[tuple[tuple[str, ...], Tensor]], values: list[float]) -> None:
        """The rules on logging-rate figures, which reach the host only here (the streams were ruled on already)."""
        keys = tuple(k for part, _ in parts for k in part)
        if keys not in self._logged_only:
            self._logged_only[keys] = np.flatnonzero(~np.concatenate([self._is_stream[part] for part, _ in parts]))
        index = self._logged_only[keys]
        alerts = self.book.update(step, [keys[i] for i in index], np.asarray(values, dtype=np.float64)[index])
        if alerts:
            self._raise(trainer, alerts, now, act=True)

    # -- alerts and actions -----------------------------------------------------------------------

    def _raise(self, trainer: pl.Trainer, alerts: list[Alert], now: int, act: bool) -> None:
        act = act and not self._ending
        if act:
            alerts = [dataclasses.replace(a, acted_step=now) if a.severity != "info" else a for a in alerts]
        self.alerts = (self.alerts + alerts)[-_MAX_ALERTS:]
        for alert in alerts:
            log_text(trainer, f"{self.family}/alerts", str(alert), alert.step)
        actionable = serious(alerts)
        if actionable:  # the count is of warnings and criticals: an info alert leaves it as it is
            log_metrics(trainer, {f"{self.family}/alerts": float(len(self.serious_alerts))}, alerts[-1].step)
        write_alert_lines(trainer, alerts)
        if act and actionable:
            if callable(self.action):
                for alert in actionable:
                    self.action(alert, trainer)
            else:
                getattr(self, self._actions[self.action])(trainer, actionable)

    @action("log")
    def _log_only(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        """Alerts are logged (and kept in ``alerts``) in any case."""

    @action("warn")
    def _warn(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        for alert in alerts:
            self._warned[alert.metric] += 1
            if self._warned[alert.metric] <= _WARNINGS_PER_KEY:
                last = self._warned[alert.metric] == _WARNINGS_PER_KEY
                warn(f"lightning_diag: {alert}" + (" (further alerts on this metric are logged only)" if last else ""))

    @action("stop")
    def _stop(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        trainer.should_stop = True
        rank_zero_info(f"lightning_diag: {alerts[0]} -> stopping the run (trainer.should_stop = True)")

    @action("raise")
    def _raise_error(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        raise DivergenceError(alerts)

    # -- checkpoint state -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        self.drain(None, -1, wait=True)  # nothing in flight is left out of a checkpoint
        return {
            "alerts": [a.as_dict() for a in self.alerts],
            "unacted": [a.as_dict() for a in self._unacted],
            "rules": self.book.state_dict(),
            "warned": dict(self._warned),
            **self.extra_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.alerts = [Alert(**a) for a in state_dict.get("alerts", [])]
        self._unacted = [Alert(**a) for a in state_dict.get("unacted", [])]
        self._warned = Counter(state_dict.get("warned", {}))
        if "rules" in state_dict:
            self.book.load_state_dict(state_dict["rules"])
        self.load_extra_state(state_dict)


DiagnosticCallback._actions = {
    f._action_name: n for n, f in vars(DiagnosticCallback).items() if hasattr(f, "_action_name")
}
for _name in _HOOKS & vars(DiagnosticCallback).keys():
    setattr(DiagnosticCallback, _name, _no_stop_iteration(vars(DiagnosticCallback)[_name]))


def _host_layers(keys: Sequence[str]) -> tuple[str, ...]:
    """The layers of the per-layer keys, in order of first appearance."""
    return _layout(tuple(keys))[0]


@functools.lru_cache(maxsize=256)
def _layout(keys: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, int], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """How a key set splits into figures, once per key set: ``(layers, scalar -> index, figure -> (key
    indices, layer positions))``."""
    parts = [split_key(k) for k in keys]  # the layers' own names (a key escapes a "/" in one)
    layers = tuple(dict.fromkeys(layer for _, _, layer in parts if layer is not None))
    position = {layer: i for i, layer in enumerate(layers)}
    scalars: dict[str, int] = {}
    per_layer: dict[str, tuple[list[int], list[int]]] = {}
    for i, (_, figure, layer) in enumerate(parts):
        if layer is not None:
            index, slots = per_layer.setdefault(figure + "/{layer}", ([], []))
            index.append(i)
            slots.append(position[layer])
        else:
            scalars[figure] = i
    return layers, scalars, {f: (np.array(a), np.array(b)) for f, (a, b) in per_layer.items()}


def _host_figures(step: int, keys: Sequence[str], values: np.ndarray) -> HostFigures:
    layers, scalars, per_layer = _layout(tuple(keys))
    figures = {}
    for figure, (index, slots) in per_layer.items():
        figures[figure] = np.full(len(layers), np.nan)
        figures[figure][slots] = values[index]
    return HostFigures(step, {name: float(values[i]) for name, i in scalars.items()}, layers, figures)


def diagnostic_callbacks(trainer: pl.Trainer) -> list[DiagnosticCallback]:
    """The lightning_diag monitors among the trainer's callbacks, in their order."""
    return [cb for cb in trainer.callbacks if isinstance(cb, DiagnosticCallback)]


def total_alerts(trainer: pl.Trainer) -> int:
    """Warnings and criticals raised so far by all the trainer's monitors (the progress bar's ``alerts`` item)."""
    return sum(len(cb.serious_alerts) for cb in diagnostic_callbacks(trainer))
