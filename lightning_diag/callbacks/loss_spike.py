"""LossSpikeDetector: non-finite, z-score, k x running-minimum and trend rules on the loss, with actions
that skip the bad step, roll back, reduce the LR, stop or raise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_diag._checks import check_int
from lightning_diag.alerts import Above, Alert, NonFinite, Rule
from lightning_diag.callbacks._base import DiagnosticCallback, Figures, HostFigures, action
from lightning_diag.callbacks._interventions import Snapshot, StepControl, nonfinite_count
from lightning_diag.callbacks._sharding import local_grads
from lightning_diag.callbacks._trainer import has_grad_scaler, loss_scale, warn
from lightning_diag.keys import Key
from lightning_diag.metrics.spikes import LossStatistics

__all__ = ["LossSpikeDetector", "SpikeAction"]

SpikeAction = Union[
    Literal["log", "warn", "stop", "raise", "skip", "rollback", "reduce_lr"], Callable[[Alert, "pl.Trainer"], None]
]
_MAX_BAD_BATCHES = 100_000
_LOSS, _RULES, _COUNTS = "loss and EMA baseline", "ratio to minimum, trend", "events, skips, rollbacks, LR scale"
_GRADS = "loss_spike/nonfinite_grads"


class _StatisticAbove(Above):
    """``Above`` on a statistic of the loss, blind to its NaN: the statistics are NaN at a non-finite
    loss, which is the NonFinite rule's alone (one event, one alert); the step neither hits nor breaks a streak."""

    def update(
        self, step: int, keys: Sequence[str], values: np.ndarray, slots: np.ndarray | None = None
    ) -> list[tuple[str, float]]:
        slots = self.slots(keys) if slots is None else slots
        seen = ~np.isnan(values)
        if seen.all():
            return super().update(step, keys, values, slots)
        return super().update(step, [k for k, s in zip(keys, seen) if s], values[seen], slots[seen])


class LossSpikeDetector(DiagnosticCallback):
    """Detects loss spikes, non-finite losses and slow divergence, and acts on them.

    Every optimizer step the loss reaches the host without a sync and goes through four rules
    (statistics in :class:`~lightning_diag.metrics.spikes.LossStatistics`; why these, in
    ``docs/loss_spike.md``); each fires after its patience in steps, once per streak:
    (a) **non-finite** loss, or a non-finite **gradient** behind a finite loss
    (``nonfinite_grads``, decided on the gradients the optimizer is about to use; under fp16 loss
    scaling the ``GradScaler`` skips such steps itself and they are not counted); (b) **z-score** above ``z_threshold`` (6, OLMo-core's) against a
    ZClip-style EMA baseline that absorbs spikes winsorized; (c) **k x running minimum**: ``loss >
    factor * best`` for ``factor_patience`` steps (llm-foundry's ``KillLossSpike`` uses 2 and 5), with
    ``best`` the lowest smoothed loss; (d) **trend**: over ``trend_window`` steps the least-squares
    rise, at its 3-sigma lower bound, exceeds ``trend_threshold`` of the window mean. Drops never
    alarm. Rules (a)-(c) mark a *bad step* (recorded in :attr:`bad_batches` and counted by
    ``events``); (d) is a slow signal and does not. ``factor=1.5`` and ``trend_threshold=0.2`` are
    what the early-warning suite chose, leave-one-family-out (``docs/early_warning.md``).

    **Which loss.** ``monitor=None``: the loss ``training_step`` returned, as Lightning hands it to
    backward, with the division by ``accumulate_grad_batches`` and the fp16 loss scale undone: the
    mean of the micro-batch losses of an optimizer step (under manual optimization, of the losses
    passed to ``manual_backward`` since the previous step), averaged over ranks under DDP, so every
    rank decides the same. With ``monitor="name"`` the value is read from
    ``trainer.callback_metrics`` after each optimizer step (``check_on="step"``) or validation run
    (``check_on="validation"``).

    **Actions** (``action=``), within one step of the rule firing:

    - ``"log"``, ``"warn"``, ``"stop"``, ``"raise"``, callable: as in every monitor.
    - ``"skip"``: the guard. Every optimizer's ``step`` is wrapped while training runs: after the
      closure (forward, backward, this detector's measurement), the step runs only if no rule
      (a)-(c) is in firing state, so a NaN or inf loss or gradient never reaches the weights or
      the optimizer's moments. A skipped step leaves parameters, moments and step counts untouched
      (``global_step`` and schedulers advance, as for an fp16 overflow step); under manual
      optimization every optimizer of a bad batch is skipped, whichever of its losses was bad.
      Costs one host read of the loss and gradient flag per step (whether a step runs is a Python
      branch); under DDP and FSDP2 both are global (one all-reduce), so every rank decides alike.
      After ``max_consecutive_skips`` skips in a row the run stops with a critical alert naming
      the cause, instead of skipping on a dead model. Alerts are warned as with ``"warn"``.
    - ``"rollback"``: restore the model, optimizer state and this detector's statistics from the
      last good in-memory snapshot (CPU copies, taken at the start and every
      ``snapshot_every_n_steps`` while no rule is active) and continue with the next batches. After
      ``max_rollbacks`` rollbacks the next alert restores and stops the run.
    - ``"reduce_lr"``: multiply the learning rates the optimizers use by ``lr_factor``, for the rest
      of the run (``lr_scale``). The scale is applied around each optimizer's ``step`` and the
      schedule's own values are put back after it, so every scheduler (``SequentialLR``,
      ``ChainedScheduler``, ``OneCycleLR``, ``ReduceLROnPlateau``, ...) keeps it: the rate in use
      is the schedule's times ``lr_scale`` (``param_groups`` and ``LearningRateMonitor`` show
      the schedule's).

    Args:
        monitor: ``None`` for the training loss, or the name of a logged metric.
        mode: ``"min"`` (a loss: bad is up) or ``"max"`` (bad is down).
        check_on: when a named ``monitor`` is read: ``"step"`` or ``"validation"``.
        every_n_steps: logging cadence (``None``: the trainer's ``log_every_n_steps``).
        z_threshold: rule (b) threshold (> 0), or ``None`` to disable it (spikes are still
            winsorized at 6 in the baseline).
        alpha: EMA decay of the baseline.
        warmup: losses that initialise the baseline; rules (b) and (c) are silent until then.
        factor: rule (c) factor (> 1), or ``None`` to disable it.
        trend_window: rule (d) window (>= 3 steps), or ``None`` to disable it.
        trend_threshold: rule (d) threshold on the relative rise (0.2: up 20% across the window).
        nonfinite_patience, zscore_patience, factor_patience, trend_patience: steps a rule's
            condition must hold before it fires.
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"``, ``"skip"``, ``"rollback"``,
            ``"reduce_lr"`` or ``callable(alert, trainer)``.
        snapshot_every_n_steps: minimum steps between rollback snapshots.
        max_rollbacks: rollbacks allowed before the next alert stops the run.
        max_consecutive_skips: skipped steps in a row before the run stops (a critical alert).
        lr_factor: multiplier of the learning rates for ``"reduce_lr"``, in ``(0, 1)``.
        rules: a rule or a list of extra rules on the logged keys, e.g. ``Above("loss_spike/loss", 10.0)``.

    Example:
        >>> skip = LossSpikeDetector(action="skip", trend_window=None)  # drop bad batches
        >>> guard = LossSpikeDetector(action="stop", z_threshold=None, factor=None)  # stop slow blow-ups
        >>> [rule.metric for rule in guard.book.rules]
        ['loss_spike/loss', 'loss_spike/nonfinite_grads', 'loss_spike/trend']
    """

    family = "loss_spike"
    KEYS = (
        Key("loss", "the monitored loss of the step (mean of its micro-batches and ranks)", _LOSS, rate="step"),
        Key("ema", "EMA mean of the loss (the baseline)", _LOSS, rate="step", host=True),
        Key("zscore", "z-score of the loss against the baseline (0 in warm-up)", "z-score", rate="step", host=True),
        Key("ratio_to_min", "loss / lowest smoothed loss (best / value in max mode)", _RULES, rate="step",
            requires="factor", host=True),
        Key("trend", "relative rise over the trend window, at the 3-sigma lower bound", _RULES, rate="step",
            requires="trend_window", host=True),
        Key("nonfinite_grads", "1 when a gradient holds NaN or inf behind a finite loss (0 under fp16 scaling)", _COUNTS,
            rate="step"),
        Key("events", "bad steps so far (rules a-c in firing state)", _COUNTS, rate="step", host=True),
        Key("skipped", "optimizer steps skipped", _COUNTS, rate="step", requires="skipping",
            note="with action='skip'", host=True),
        Key("rollbacks", "rollbacks so far", _COUNTS, rate="step", requires="rolling_back",
            note="with action='rollback'", host=True),
        Key("lr_scale", "factor on the schedule's learning rates (product of the reductions)", _COUNTS, rate="step", requires="reducing_lr",
            note="with action='reduce_lr'", host=True),
    )  # fmt: skip

    def __init__(
        self,
        *,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        check_on: Literal["step", "validation"] = "step",
        every_n_steps: int | None = None,
        z_threshold: float | None = 6.0,
        alpha: float = 0.98,
        warmup: int = 50,
        factor: float | None = 1.5,
        trend_window: int | None = 100,
        trend_threshold: float = 0.2,
        nonfinite_patience: int = 1,
        zscore_patience: int = 1,
        factor_patience: int = 5,
        trend_patience: int = 1,
        action: SpikeAction = "warn",
        snapshot_every_n_steps: int = 100,
        max_rollbacks: int = 3,
        max_consecutive_skips: int = 10,
        lr_factor: float = 0.5,
        rules: Rule | Sequence[Rule] = (),
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules)
        self._validate(monitor, check_on, action, z_threshold, factor, trend_window, trend_threshold, lr_factor)
        for name, value in (("nonfinite_patience", nonfinite_patience), ("zscore_patience", zscore_patience),
                            ("factor_patience", factor_patience), ("trend_patience", trend_patience),
                            ("snapshot_every_n_steps", snapshot_every_n_steps),
                            ("max_consecutive_skips", max_consecutive_skips)):  # fmt: skip
            check_int(name, value, 1)
        check_int("max_rollbacks", max_rollbacks, 0)
        self.monitor, self.mode, self.check_on, self.factor, self.trend_window = (
            monitor, mode, check_on, factor, trend_window
        )
        self.snapshot_every_n_steps, self.max_rollbacks = snapshot_every_n_steps, max_rollbacks
        self.max_consecutive_skips, self.lr_factor = max_consecutive_skips, lr_factor
        self.stats = LossStatistics(mode=mode, alpha=alpha, warmup=warmup, trend_window=trend_window,
                                    winsorize=z_threshold or 6.0)  # fmt: skip
        loss = "loss_spike/loss"
        self._batch_rules: list[Rule] = [NonFinite(loss, patience=nonfinite_patience),
                                         Above(_GRADS, 0.5, patience=nonfinite_patience, severity="critical")]
        if z_threshold is not None:
            self._batch_rules.append(_StatisticAbove("loss_spike/zscore", z_threshold, patience=zscore_patience))
        if factor is not None:
            self._batch_rules.append(_StatisticAbove("loss_spike/ratio_to_min", factor, patience=factor_patience))
        self._trend_rule = (_StatisticAbove("loss_spike/trend", trend_threshold, patience=trend_patience)
                            if trend_window else None)  # fmt: skip
        self._builtin_rules = [*self._batch_rules, *([self._trend_rule] if self._trend_rule else [])]
        self.bad_batches: list[dict[str, Any]] = []
        self.events = self.skipped = self.rollbacks = self._consecutive_skips = 0
        self.lr_scale = 1.0
        self._loss_sum: Tensor | None = None
        self._micro = self._batches_seen = 0
        self._micro_batches: list[tuple[int, int | None]] = []
        self._step_batches: dict[int, list[tuple[int, int | None]]] = {}
        self._gate: tuple[int, bool] | None = None  # (batch counter, skip it): every optimizer of a batch alike
        self._control = StepControl(skip=self._skip_now if self.skipping else None, lr_scale=self._lr_scale)
        self._snapshot: Snapshot | None = None
        self._trainer_ref: pl.Trainer | None = None  # the gate asks without a trainer argument
        self._last_trouble = -(10**12)  # last step at which a rule was active
        self._cause = "loss"  # the rules that made the last bad step bad

    @staticmethod
    def _validate(
        monitor: Any, check_on: Any, action: Any, z: Any, factor: Any, window: Any, trend: Any, lr: Any
    ) -> None:
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"`monitor` must be None (the training loss) or a metric name, got {monitor!r}")
        if check_on not in ("step", "validation"):
            raise ValueError(f"`check_on` must be one of ('step', 'validation'), got {check_on!r}")
        if check_on == "validation" and monitor is None:
            raise ValueError("`check_on='validation'` needs `monitor`, the name of a validation metric")
        if action == "skip" and monitor is not None:
            raise ValueError(f"`action='skip'` decides before the update, from the training loss; it needs "
                             f"`monitor=None`, got monitor={monitor!r} (use 'rollback' or 'stop')")  # fmt: skip
        for name, value, low in (("z_threshold", z, 0.0), ("factor", factor, 1.0)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low
            ):
                raise ValueError(f"`{name}` must be None or a number > {low:g}, got {value!r}")
        if window is not None:
            check_int("trend_window", window, 3)
        if isinstance(trend, bool) or not isinstance(trend, (int, float)) or not trend > 0:
            raise ValueError(f"`trend_threshold` must be a number > 0, got {trend!r}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1:
            raise ValueError(f"`lr_factor` must be in (0, 1), got {lr!r}")

    skipping = property(lambda self: self.action == "skip")
    rolling_back = property(lambda self: self.action == "rollback")
    reducing_lr = property(lambda self: self.action == "reduce_lr")

    @property
    def state_key(self) -> str:
        # Not keyed on `action`: a run may resume with another action and keep its statistics.
        rules = ",".join(r.metric.rpartition("/")[2] for r in self._builtin_rules)
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, check_on=self.check_on, rules=rules)

    # -- measuring --------------------------------------------------------------------------------

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss_sum, self._micro, self._micro_batches, self._gate = None, 0, [], None
        self._trainer_ref = trainer
        if self.skipping or self.reducing_lr:
            self._control.install(trainer.optimizers)
        if self.rolling_back:
            self._snapshot = Snapshot.take(trainer, self._statistics())

    def detach(self) -> None:
        self._control.remove()
        self._snapshot, self._loss_sum, self._trainer_ref = None, None, None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._batches_seen += 1
        self._micro_batches.append((trainer.current_epoch, batch_idx))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        if self.monitor is not None:
            return
        loss = loss.detach().float()
        if pl_module.automatic_optimization and trainer.accumulate_grad_batches > 1:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it for accumulation
        scale = loss_scale(trainer)
        if scale is not None:
            loss = loss / scale  # fp16: the hook sees the scaled loss
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._micro += 1

    def measures(self, step: int) -> bool:
        return self.monitor is None and self._loss_sum is not None

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, logging: bool) -> Figures:
        loss, self._loss_sum, self._micro = self._loss_sum / self._micro if self._micro > 1 else self._loss_sum, None, 0
        bad_grads = self._nonfinite_grads(trainer, optimizer)
        if trainer.world_size > 1:  # every rank decides on the same (global) loss and flag: one all-reduce
            loss, bad_grads = trainer.strategy.reduce(torch.stack([loss, bad_grads]), reduce_op="mean")
            bad_grads = (bad_grads > 0).float()  # any rank (a shard of a parameter under FSDP2)
        bad_grads = bad_grads * loss.isfinite()  # behind a finite loss: a NaN loss is one event, not two
        self._step_batches[trainer.global_step], self._micro_batches = self._micro_batches, []
        return Figures({"loss": loss, "nonfinite_grads": bad_grads})

    @staticmethod
    def _nonfinite_grads(trainer: pl.Trainer, optimizer: Any) -> Tensor:
        """1.0 when a gradient ``optimizer`` is about to use holds NaN or inf (a device tensor); 0 under
        fp16 loss scaling, where such steps are routine and the scaler skips them itself."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if has_grad_scaler(trainer) or not params:
            return torch.zeros((), device=params[0].device if params else None)
        return (nonfinite_count(local_grads(params)) > 0).float()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step - 1
        if self.monitor is not None and self.check_on == "step" and step > self._measured_step >= -1:
            self._measured_step = step
            self._step_batches[step], self._micro_batches = self._micro_batches, []
            self.record(step, Figures({"loss": self._read_metric(trainer), "nonfinite_grads": torch.zeros(())}))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.rolling_back and self._snapshot_due(trainer):
            self.drain(trainer, step, wait=True)  # on a GPU this step's loss may still be on its way: is it bad?
            if self._snapshot_due(trainer):
                self._snapshot = Snapshot.take(trainer, self._statistics())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_on == "validation" and not trainer.sanity_checking:
            self._step_batches[trainer.global_step] = [(trainer.current_epoch, None)]  # for bad_batches
            self.record(trainer.global_step, Figures({"loss": self._read_metric(trainer), "nonfinite_grads": torch.zeros(())}))
            self.drain(trainer, trainer.global_step, wait=True)
            self.publish(trainer, trainer.global_step)

    def _read_metric(self, trainer: pl.Trainer) -> Tensor:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ValueError(f"{self.source}(monitor={self.monitor!r}, check_on={self.check_on!r}) found no such "
                             f"metric; logged metrics are: {sorted(metrics)}")  # fmt: skip
        value = torch.as_tensor(metrics[self.monitor], dtype=torch.float32).detach()
        return trainer.strategy.reduce(value, reduce_op="mean") if trainer.world_size > 1 else value

    # -- deciding, on the host --------------------------------------------------------------------

    def derive(self, host: HostFigures) -> dict[str, float | np.ndarray]:
        figures = self.stats.update(host.scalars["loss"], host.step)
        if self.factor is None:  # without rule (c) the ratio is not a declared key: not logged
            del figures["ratio_to_min"]
        return figures

    def after_rules(self, step: int) -> dict[str, float]:
        bad = any(bool(rule.active.any()) for rule in self._batch_rules)
        if bad or any(bool(r.active.any()) for r in self._builtin_rules):
            self._last_trouble = step
        if bad:
            self.events += 1
            for epoch, batch_idx in self._step_batches.get(step, [(-1, None)]):
                self.bad_batches.append({"epoch": epoch, "batch_idx": batch_idx, "step": step})
            del self.bad_batches[:-_MAX_BAD_BATCHES]
        self._step_batches.pop(step, None)
        if bad:
            self._cause = ", ".join(r.metric.rpartition("/")[2] for r in self._batch_rules if r.active.any())
        sticky = self._gate is not None and self._gate == (self._batches_seen, True)  # a bad batch stays bad
        self._gate = (self._batches_seen, bad or sticky)
        return self._counters()

    def _counters(self) -> dict[str, float]:
        counters = {"events": float(self.events)}
        for key, on, value in (("skipped", self.skipping, self.skipped),
                               ("rollbacks", self.rolling_back, self.rollbacks),
                               ("lr_scale", self.reducing_lr, self.lr_scale)):  # fmt: skip
            if on:
                counters[key] = float(value)
        return counters

    def publish(self, trainer: pl.Trainer, step: int) -> None:
        # skip, rollback and reduce_lr act after the rules saw the step: log the counters as they stand after it
        if self._host is not None and self._host[0] == step:
            now, (_, keys, values) = self._counters(), self._host
            fresh = [now.get(key.rpartition("/")[2], value) for key, value in zip(keys, values.tolist())]
            self._host = (step, keys, np.asarray(fresh, dtype=np.float64))
        super().publish(trainer, step)

    # -- actions ----------------------------------------------------------------------------------

    def _skip_now(self, optimizer: Any) -> bool:
        """The guard's question, after the closure: skip this optimizer step? (one host read per step)"""
        trainer = self._trainer_ref
        if self._measured_step == trainer.global_step:  # measured now: decide on this step's loss and gradients
            self.drain(trainer, trainer.global_step, wait=True)
        skip = self._gate is not None and self._gate == (self._batches_seen, True)
        if not skip and self._measured_step != trainer.global_step:  # an optimizer stepping after another's
            skip = bool(self._nonfinite_grads(trainer, optimizer) > 0)  # measurement (manual optimization)
            if skip:
                self._gate, self._cause = (self._batches_seen, True), "nonfinite_grads"
        self._consecutive_skips = self._consecutive_skips + 1 if skip else 0
        self.skipped += int(skip)
        if self._consecutive_skips >= self.max_consecutive_skips and not trainer.should_stop:
            trainer.should_stop = True
            self._raise(trainer, [self._budget_alert(trainer.global_step)], trainer.global_step, act=False)
            warn(f"lightning_diag: {self._budget_alert(trainer.global_step)} -> stopping the run")
        return skip

    def _budget_alert(self, step: int) -> Alert:
        """The critical alert of a spent skip budget, naming what kept the steps bad."""
        return Alert(self.source, "loss_spike/skipped", step, float(self._consecutive_skips),
                     float(self.max_consecutive_skips), "critical",
                     f"{self.source}: {self._consecutive_skips} steps skipped in a row (max_consecutive_skips="
                     f"{self.max_consecutive_skips}), each for {self._cause}: the model no longer trains",
                     acted_step=step)  # fmt: skip

    def _lr_scale(self, optimizer: Any) -> float:
        return self.lr_scale

    @action("skip")
    def _skip(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        self._warn(trainer, alerts)  # the gate itself acts on every bad step, alert or not

    @action("rollback")
    def _rollback(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        snapshot = self._snapshot
        if snapshot is None:
            self._stop(trainer, alerts)
            return
        self._load_statistics(snapshot.restore(trainer))
        self._loss_sum, self._micro, self.rollbacks = None, 0, self.rollbacks + 1
        done = self.rollbacks > self.max_rollbacks
        trainer.should_stop = trainer.should_stop or done
        warn(f"lightning_diag: {alerts[0]} -> rolled back model and optimizer to the snapshot of step {snapshot.step} "
             + (f"and stopping: max_rollbacks={self.max_rollbacks} reached" if done
                else f"(rollback {self.rollbacks}/{self.max_rollbacks})"))  # fmt: skip

    @action("reduce_lr")
    def _reduce_lr(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        self.lr_scale *= self.lr_factor
        warn(f"lightning_diag: {alerts[0]} -> learning rates in use multiplied by {self.lr_factor:g} "
             f"(now x{self.lr_scale:g} of the schedule's)")  # fmt: skip

    def _snapshot_due(self, trainer: pl.Trainer) -> bool:
        """``snapshot_every_n_steps`` steps done since the last snapshot and since the last step a rule was active."""
        snapshot = self._snapshot.step if self._snapshot is not None else -(10**12)  # steps done when it was taken
        return trainer.global_step - max(self._last_trouble + 1, snapshot) >= self.snapshot_every_n_steps

    # -- checkpoint state -------------------------------------------------------------------------

    def _statistics(self) -> dict[str, Any]:
        """What a rollback rewinds: the statistics and the rules' streaks."""
        return {"stats": self.stats.state_dict(), "rules": self.book.state_dict()}

    def _load_statistics(self, state: dict[str, Any]) -> None:
        self.stats.load_state_dict(state["stats"])
        self.book.load_state_dict(state["rules"])

    def extra_state(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict(), "bad_batches": list(self.bad_batches), "events": self.events,
                "skipped": self.skipped, "consecutive_skips": self._consecutive_skips, "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale}  # fmt: skip

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "stats" in state:
            self.stats.load_state_dict(state["stats"])
        self.bad_batches = list(state.get("bad_batches", []))
        self.events, self.skipped = int(state.get("events", 0)), int(state.get("skipped", 0))
        self._consecutive_skips, self.rollbacks = int(state.get("consecutive_skips", 0)), int(state.get("rollbacks", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
