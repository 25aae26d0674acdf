"""LossSpikeDetector: non-finite, z-score, k x running-minimum and trend rules on the loss, with actions
that skip the bad step, roll back to a healthy snapshot, reduce the LR, recover (all three, as a
ladder), stop or raise."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning.pytorch.utilities import rank_zero_info

from lightning_diag._checks import check_int, check_number
from lightning_diag.alerts import Above, Alert, NonFinite, Rule
from lightning_diag.callbacks._base import DiagnosticCallback, Figures, HostFigures, action
from lightning_diag.callbacks._interventions import (
    Snapshots, StepControl, nonfinite_count, nonfinite_weights, serious_alert,
)  # fmt: skip
from lightning_diag.callbacks._sharding import local_grads
from lightning_diag.callbacks._trainer import has_grad_scaler, loss_scale, warn
from lightning_diag.keys import Key
from lightning_diag.metrics.spikes import LossStatistics

__all__ = ["LossSpikeDetector", "SpikeAction"]

SpikeAction = Union[
    Literal["log", "warn", "stop", "raise", "skip", "rollback", "reduce_lr", "recover"],
    Callable[[Alert, "pl.Trainer"], None],
]
_MAX_BAD_BATCHES = 100_000
_LOSS, _RULES, _COUNTS = "loss and EMA baseline", "ratio to minimum, trend", "events, skips, rollbacks, LR scale"


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
    - ``"reduce_lr"``: multiply the learning rates the optimizers use by ``lr_factor``, for the rest
      of the run (``lr_scale``). The scale is applied around each optimizer's ``step`` and the
      schedule's own values are put back after it, so every scheduler (``SequentialLR``,
      ``ChainedScheduler``, ``OneCycleLR``, ``ReduceLROnPlateau``, ...) keeps it: the rate in use
      is the schedule's times ``lr_scale`` (``param_groups`` and ``LearningRateMonitor`` show
      the schedule's).
    - ``"rollback"``: on an alert, go back to the newest healthy snapshot and remove the cause:
      the model, optimizer state (moments, step counts, hyperparameters) and LR schedulers' states
      are restored bit for bit; the learning rate in use is multiplied by ``lr_factor`` for the
      rest of the run (the same ``lr_scale`` as ``"reduce_lr"``); the data does not rewind, so the
      batches seen since the snapshot are not trained on again, and ``rollback_skip_batches``
      more are skipped. The detectors' statistics are kept (no second warm-up: the explosion was
      absorbed winsorized). After ``max_rollbacks`` rollbacks the next one restores and stops the
      run with a critical alert.
    - ``"recover"``: the escalation ladder, one rung at a time: (1) **skip** every bad step as
      ``"skip"`` does; (2) **lower the learning rate** by ``lr_factor`` when the factor or trend
      rule fires (a sustained rise); (3) **roll back** as ``"rollback"`` does when skipping does
      not help: ``rollback_after`` bad steps in a row (the weights themselves are bad, e.g. a
      non-finite loss after skips); (4) **stop** with a critical alert when the budget is spent
      (``max_rollbacks``). Each rung is counted (``skipped``, ``lr_scale``, ``rollbacks``) and
      each rollback is a warning alert (``loss_spike/rollbacks``).

    **Snapshots** (``"rollback"`` and ``"recover"``) are of healthy states only: taken at train
    start and then at most every ``snapshot_every_n_steps`` steps when no rule of this detector
    was active for that long, no lightning_diag monitor has a warning or critical alert in that
    span (:func:`~lightning_diag.callbacks._interventions.serious_alert`), the loss is finite and
    at most one standard deviation above its baseline, and every weight is finite (one fused
    check, one host read, global under DDP and FSDP2). ``keep_snapshots`` are held at growing
    distances (:class:`~lightning_diag.callbacks._interventions.Snapshots`: 0, 1, 2-3, 4-7, ...
    intervals old), so a slow rise does not leave only broken ones. **Memory**: each is a host
    copy of the model and optimizer state of this rank (its shards under FSDP2; pinned and
    non-blocking from a GPU): with AdamW in float32, 12 bytes per parameter, so up to
    ``12 * keep_snapshots`` bytes per parameter of host memory (a 1B-parameter model: 36 GB at
    the default 3). :attr:`snapshot_bytes` says what is held now, and the first snapshot says it
    once. ``snapshot_dir`` puts them on disk instead (one file per snapshot and rank). Every rank
    decides from the same global figures, so all roll back to the same snapshot at the same step.

    **Skipped batches survive a resume**: the batches still to skip after a rollback, and the
    ``skip_batches`` given (e.g. a crashed run's :attr:`bad_batches`), are in the checkpoint, so a
    run resumed from it skips them too (by ``(epoch, batch_idx)``: the data order must be the same).

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
            ``"reduce_lr"``, ``"recover"`` or ``callable(alert, trainer)``.
        snapshot_every_n_steps: minimum steps between snapshots (and of calm before one).
        keep_snapshots: snapshots held, at growing distances (memory: see above).
        snapshot_dir: a directory for the snapshots instead of host memory, or ``None``.
        max_rollbacks: rollbacks allowed; the next one restores and stops the run.
        rollback_after: ``"recover"``: bad (skipped) steps in a row that call for a rollback.
        rollback_skip_batches: batches skipped after a rollback, beyond those already seen since
            the snapshot (PaLM skipped 200-500 around a spike).
        max_consecutive_skips: skipped steps in a row before the run stops (a critical alert).
        lr_factor: multiplier of the learning rates for ``"reduce_lr"``, for each rollback and for
            each sustained rise under ``"recover"``, in ``(0, 1)``.
        skip_batches: batches to skip when met, as ``(epoch, batch_idx)`` pairs or the dicts of
            :attr:`bad_batches`.
        rules: a rule or a list of extra rules on the logged keys, e.g. ``Above("loss_spike/loss", 10.0)``.
        prefix: the first part of the keys in place of ``loss_spike`` (two detectors on one trainer, e.g.
            one that skips spikes and one that watches the trend, need two).

    Example:
        >>> skip = LossSpikeDetector(action="skip", trend_window=None)  # drop bad batches
        >>> survive = LossSpikeDetector(action="recover")  # skip, lower the LR, roll back, then stop
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
        Key("skipped", "optimizer steps skipped (bad steps, and batches skipped after a rollback)", _COUNTS,
            rate="step", requires="skipping", note="with action='skip', 'rollback' or 'recover'", host=True),
        Key("rollbacks", "rollbacks to a healthy snapshot so far", _COUNTS, rate="step", requires="rolling_back",
            note="with action='rollback' or 'recover'", host=True),
        Key("lr_scale", "factor on the schedule's learning rates (product of the reductions)", _COUNTS, rate="step",
            requires="reducing_lr", note="with action='reduce_lr', 'rollback' or 'recover'", host=True),
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
        snapshot_every_n_steps: int = 50,
        keep_snapshots: int = 3,
        snapshot_dir: str | None = None,
        max_rollbacks: int = 3,
        rollback_after: int = 3,
        rollback_skip_batches: int = 0,
        max_consecutive_skips: int = 10,
        lr_factor: float = 0.5,
        skip_batches: Iterable[Any] = (),
        rules: Rule | Sequence[Rule] = (),
        prefix: str | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules, prefix=prefix)
        self._validate(monitor, check_on, action, z_threshold, factor, trend_window, trend_threshold, lr_factor)
        for name, value in (("nonfinite_patience", nonfinite_patience), ("zscore_patience", zscore_patience),
                            ("factor_patience", factor_patience), ("trend_patience", trend_patience),
                            ("snapshot_every_n_steps", snapshot_every_n_steps), ("keep_snapshots", keep_snapshots),
                            ("rollback_after", rollback_after),
                            ("max_consecutive_skips", max_consecutive_skips)):  # fmt: skip
            check_int(name, value, 1)
        check_int("max_rollbacks", max_rollbacks, 0)
        check_int("rollback_skip_batches", rollback_skip_batches, 0)
        if snapshot_dir is not None and not isinstance(snapshot_dir, (str, os.PathLike)):
            raise ValueError(f"`snapshot_dir` must be None or a directory path, got {snapshot_dir!r}")
        self.monitor, self.mode, self.check_on, self.factor, self.trend_window = (
            monitor, mode, check_on, factor, trend_window
        )
        self.snapshot_every_n_steps, self.max_rollbacks = snapshot_every_n_steps, max_rollbacks
        self.keep_snapshots, self.snapshot_dir = keep_snapshots, snapshot_dir
        self.rollback_after, self.rollback_skip_batches = rollback_after, rollback_skip_batches
        self.max_consecutive_skips, self.lr_factor = max_consecutive_skips, lr_factor
        self.stats = LossStatistics(mode=mode, alpha=alpha, warmup=warmup, trend_window=trend_window,
                                    winsorize=z_threshold or 6.0)  # fmt: skip
        loss, family = f"{self.family}/loss", self.family
        self._batch_rules: list[Rule] = [NonFinite(loss, patience=nonfinite_patience),
                                         Above(f"{family}/nonfinite_grads", 0.5, patience=nonfinite_patience, severity="critical")]
        if z_threshold is not None:
            self._batch_rules.append(_StatisticAbove(f"{family}/zscore", z_threshold, patience=zscore_patience))
        if factor is not None:
            self._batch_rules.append(_StatisticAbove(f"{family}/ratio_to_min", factor, patience=factor_patience))
        self._trend_rule = (_StatisticAbove(f"{family}/trend", trend_threshold, patience=trend_patience)
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
        self._control = StepControl(skip=self._skip_now, lr_scale=self._lr_scale)
        self.snapshots = Snapshots(keep_snapshots, None if snapshot_dir is None else os.fspath(snapshot_dir))
        self.skip_positions: set[tuple[int, int]] = {_position(b) for b in skip_batches}
        self.pending_skips = 0  # batches still to skip after a rollback
        self._skip_batch = False  # this batch is one to skip (every optimizer step of it)
        self._window_step = -1  # the optimizer step the current micro-batches accumulate for
        self._rollback_due: Alert | None = None  # done between steps, at the next batch boundary
        self._last_z = 0.0  # the last step's z-score, for the snapshot decision
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
        if action in ("skip", "recover") and monitor is not None:
            raise ValueError(f"`action={action!r}` decides before the update, from the training loss; it needs "
                             f"`monitor=None`, got monitor={monitor!r} (use 'rollback' or 'stop')")  # fmt: skip
        check_number("z_threshold", z, 0.0, optional=True)
        check_number("factor", factor, 1.0, optional=True)
        if window is not None:
            check_int("trend_window", window, 3)
        check_number("trend_threshold", trend, 0.0)
        check_number("lr_factor", lr, 0.0, 1.0)

    gating = property(lambda self: self.action in ("skip", "recover"))  # the guard skips bad steps
    skipping = property(lambda self: self.action in ("skip", "rollback", "recover"))  # steps may be skipped
    rolling_back = property(lambda self: self.action in ("rollback", "recover"))
    reducing_lr = property(lambda self: self.action in ("reduce_lr", "rollback", "recover"))

    @property
    def snapshot_bytes(self) -> int:
        """Host memory (or disk, with ``snapshot_dir``) the held snapshots take on this rank, in bytes."""
        return self.snapshots.nbytes

    @property
    def state_key(self) -> str:
        # Not keyed on `action`: a run may resume with another action and keep its statistics.
        rules = ",".join(r.metric.rpartition("/")[2] for r in self._builtin_rules)
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, check_on=self.check_on, rules=rules)

    # -- measuring --------------------------------------------------------------------------------

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loss_sum, self._micro, self._micro_batches, self._gate = None, 0, [], None
        self._trainer_ref, self._rollback_due = trainer, None
        if self.skipping or self.reducing_lr or self.skip_positions:
            self._control.install(trainer.optimizers)
        if self.rolling_back:
            self.snapshots.clear()
            self._take_snapshot(trainer)

    def detach(self) -> None:
        self._control.remove()
        self.snapshots.clear()
        self._loss_sum, self._trainer_ref = None, None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._roll_back_if_due(trainer)  # an alert read at this batch's start (on a GPU)
        self._batches_seen += 1
        self._micro_batches.append((trainer.current_epoch, batch_idx))
        position = (trainer.current_epoch, batch_idx)
        skip = self.pending_skips > 0 or position in self.skip_positions
        if skip:
            self.pending_skips = max(self.pending_skips - 1, 0)
            self.skip_positions.discard(position)
        if trainer.global_step != self._window_step:  # the first micro-batch of an optimizer step
            self._window_step, self._skip_batch = trainer.global_step, skip
        else:  # under gradient accumulation a micro-batch to skip takes its whole step with it
            self._skip_batch = self._skip_batch or skip

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
        self._roll_back_if_due(trainer)  # asked for inside the step (recover's gate): the step is over now
        if self.monitor is not None and self.check_on == "step" and step > self._measured_step >= -1:
            self._measured_step = step
            self._step_batches[step], self._micro_batches = self._micro_batches, []
            self.record(step, Figures({"loss": self._read_metric(trainer), "nonfinite_grads": torch.zeros(())}))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._roll_back_if_due(trainer)
        if self.rolling_back and self._snapshot_due(trainer):
            self.drain(trainer, step, wait=True)  # on a GPU this step's loss may still be on its way: is it bad?
            self._roll_back_if_due(trainer)
            if self._snapshot_due(trainer) and self._healthy(trainer):
                self._take_snapshot(trainer)

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
        loss = host.scalars["loss"]
        self._last_z = figures["zscore"] if np.isfinite(loss) else np.inf
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
        """StepControl's question, after the closure: skip this optimizer step? A batch to skip (after a
        rollback, or recorded) is skipped outright; the guard (``"skip"``, ``"recover"``) decides on
        this step's loss and gradients (one host read per step)."""
        if self._skip_batch:
            self.skipped += 1
            return True
        if not self.gating:
            return False
        trainer = self._trainer_ref
        if self._measured_step == trainer.global_step:  # measured now: decide on this step's loss and gradients
            self.drain(trainer, trainer.global_step, wait=True)
        skip = self._gate is not None and self._gate == (self._batches_seen, True)
        if not skip and self._measured_step != trainer.global_step:  # an optimizer stepping after another's
            flag = self._nonfinite_grads(trainer, optimizer)  # measurement (manual optimization): any rank's
            if trainer.world_size > 1:  # shard counts, and every rank decides alike
                flag = trainer.strategy.reduce(flag, reduce_op="sum")
            skip = bool(flag > 0)
            if skip:
                self._gate, self._cause = (self._batches_seen, True), "nonfinite_grads"
        self._consecutive_skips = self._consecutive_skips + 1 if skip else 0
        self.skipped += int(skip)
        if self.action == "recover" and self._consecutive_skips >= self.rollback_after:
            # skipping did not help: the weights themselves are bad (rung 3, done between steps)
            self._rollback_due = self._rollback_due or (f"{self._consecutive_skips} bad steps in a row ({self._cause})")
        elif self._consecutive_skips >= self.max_consecutive_skips and not trainer.should_stop:
            self._say(trainer, trainer.global_step, "skipped", self._consecutive_skips, self.max_consecutive_skips,
                      f"{self.source}: {self._consecutive_skips} steps skipped in a row (max_consecutive_skips="
                      f"{self.max_consecutive_skips}), each for {self._cause}: the model no longer trains; stopping the run",
                      stop=True)  # fmt: skip
        return skip

    def _say(self, trainer: pl.Trainer, step: int, figure: str, value: float, threshold: float, message: str,
             *, stop: bool) -> None:
        """An alert of the detector's own doing (a spent budget, a rollback): recorded and logged as every
        alert, warned, and critical when it stops the run."""
        alert = Alert(self.source, f"{self.family}/{figure}", step, float(value), float(threshold),
                      "critical" if stop else "warning", message, acted_step=step)  # fmt: skip
        self._raise(trainer, [alert], step, act=False)
        trainer.should_stop = trainer.should_stop or stop
        warn(f"lightning_diag: {alert}")

    def _lr_scale(self, optimizer: Any) -> float:
        return self.lr_scale

    @action("skip")
    def _skip(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        self._warn(trainer, alerts)  # the gate itself acts on every bad step, alert or not

    @action("rollback")
    def _rollback(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        self._rollback_due = self._rollback_due or str(alerts[0])
        self._roll_back_if_due(trainer)  # alerts reach this action between steps (it has no gate inside one)

    @action("reduce_lr")
    def _reduce_lr(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        self.lr_scale *= self.lr_factor
        warn(f"lightning_diag: {alerts[0]} -> learning rates in use multiplied by {self.lr_factor:g} "
             f"(now x{self.lr_scale:g} of the schedule's)")  # fmt: skip

    @action("recover")
    def _recover(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        """Rung 1 (skip) is the gate's and rung 3 (rollback) the gate's streak; here rung 2: a sustained
        rise (the factor or trend rule fired) lowers the learning rate."""
        rises = [a for a in alerts if a.metric in (f"{self.family}/ratio_to_min", f"{self.family}/trend")]
        self._warn(trainer, [a for a in alerts if a not in rises])
        if rises:
            self._reduce_lr(trainer, rises)

    def _roll_back_if_due(self, trainer: pl.Trainer) -> None:
        """Roll back to the newest healthy snapshot and remove the cause: lower the learning rate, skip
        ``rollback_skip_batches`` batches; the statistics are kept. Past ``max_rollbacks``: restore, stop."""
        if self._rollback_due is None:
            return
        why, self._rollback_due = self._rollback_due, None
        now, snapshot = trainer.global_step - 1, self.snapshots.newest()
        self._consecutive_skips, self._gate = 0, None
        self._last_trouble = max(self._last_trouble, now)  # the next snapshot waits for a calm stretch
        for rule in self._batch_rules:  # a bad step after the rollback is a new event (the trend's streak goes on:
            rule.start[:], rule.fired[:], rule.active[:] = -1, False, False  # its window still holds the rise)
        self.rollbacks += 1
        done = self.rollbacks > self.max_rollbacks or snapshot is None
        if snapshot is not None:
            snapshot.restore(trainer)
            self.snapshots.pop_newest()
        if not done:
            self.lr_scale *= self.lr_factor
            self.pending_skips += self.rollback_skip_batches
        where = f"the snapshot of step {snapshot.step}" if snapshot is not None else "no snapshot (none was healthy)"
        message = (f"{self.source}: {why} -> rolled back model, optimizer and schedulers to {where}"
                   + (f"; stopping: budget spent (max_rollbacks={self.max_rollbacks})" if done else
                      f", learning rate x{self.lr_scale:g} of the schedule's, skipping {self.pending_skips} more "
                      f"batches (rollback {self.rollbacks}/{self.max_rollbacks})"))  # fmt: skip
        self._say(trainer, now, "rollbacks", self.rollbacks, self.max_rollbacks, message, stop=done)

    # -- snapshots --------------------------------------------------------------------------------

    def _snapshot_due(self, trainer: pl.Trainer) -> bool:
        """``snapshot_every_n_steps`` steps done since the last snapshot and since the last step a rule was active."""
        newest = self.snapshots.newest()
        last = newest.step if newest is not None else -(10**12)  # steps done when it was taken
        return trainer.global_step - max(self._last_trouble + 1, last) >= self.snapshot_every_n_steps

    def _healthy(self, trainer: pl.Trainer) -> bool:
        """The loss is finite and at most one standard deviation above its baseline, no monitor holds a
        serious alert of the last ``snapshot_every_n_steps`` steps, and every weight is finite (checked
        last: the one host read)."""
        if not self._last_z <= 1.0 or serious_alert(trainer, self.snapshot_every_n_steps) is not None:
            return False
        return not nonfinite_weights(trainer)

    def _take_snapshot(self, trainer: pl.Trainer) -> None:
        if self.snapshots.taken == 0 and nonfinite_weights(trainer):
            self.warn_once("snapshot", "the weights are not finite at train start: no snapshot to roll back to yet")
            return
        snapshot = self.snapshots.add(trainer)
        if self.snapshots.taken == 1:
            where = f"on disk in {self.snapshots.directory}" if self.snapshots.directory else "of host memory"
            rank_zero_info(f"lightning_diag: {self.source}: a rollback snapshot takes {snapshot.nbytes / 2**20:.1f} "
                           f"MiB {where} (model and optimizer state of this rank); up to keep_snapshots="
                           f"{self.keep_snapshots} are held (`snapshot_bytes`)")  # fmt: skip

    # -- checkpoint state -------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        return {"stats": self.stats.state_dict(), "bad_batches": list(self.bad_batches), "events": self.events,
                "skipped": self.skipped, "consecutive_skips": self._consecutive_skips, "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale, "pending_skips": self.pending_skips,
                "skip_positions": [list(p) for p in sorted(self.skip_positions)]}  # fmt: skip

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "stats" in state:
            self.stats.load_state_dict(state["stats"])
        self.bad_batches = list(state.get("bad_batches", []))
        self.events, self.skipped = int(state.get("events", 0)), int(state.get("skipped", 0))
        self._consecutive_skips, self.rollbacks = int(state.get("consecutive_skips", 0)), int(state.get("rollbacks", 0))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.pending_skips = int(state.get("pending_skips", 0))
        self.skip_positions |= {_position(p) for p in state.get("skip_positions", [])}


def _position(batch: Any) -> tuple[int, int]:
    """``(epoch, batch_idx)`` of a batch given as a pair or as a dict of :attr:`LossSpikeDetector.bad_batches`."""
    if isinstance(batch, dict):
        batch = (batch.get("epoch"), batch.get("batch_idx"))
    try:
        epoch, index = batch
        return int(epoch), int(index)
    except (TypeError, ValueError):
        raise ValueError(f"a batch to skip must be (epoch, batch_idx) or a dict with 'epoch' and 'batch_idx', "
                         f"got {batch!r}") from None
