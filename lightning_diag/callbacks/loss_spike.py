"""LossSpikeDetector: non-finite, z-score, k x running-minimum and trend rules on the loss, evaluated
on the device every step, with actions that skip the bad step, roll back, reduce the LR, stop or raise."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_diag._checks import check_int
from lightning_diag.alerts import ACTIONS, Above, Alert, DivergenceError, NonFinite, Rule
from lightning_diag.callbacks._base import DiagnosticCallback
from lightning_diag.callbacks._trainer import log_metrics, loss_scale
from lightning_diag.metrics.stats import EmaZScore, zclip
from lightning_diag.metrics.windows import RollingWindow

__all__ = ["SPIKE_ACTIONS", "LossSpikeDetector", "SpikeAction"]

SPIKE_ACTIONS = (*ACTIONS, "skip", "rollback", "reduce_lr")
SpikeAction = Union[
    Literal["log", "warn", "stop", "raise", "skip", "rollback", "reduce_lr"],
    Callable[[Alert, "pl.Trainer"], None],
]
_CHANGES_TRAINING = ("stop", "raise", "rollback", "reduce_lr")
_DEFAULT_Z_THRESHOLD = 6.0  # winsorises what the statistics absorb when rule (b) is disabled
_TREND_CONFIDENCE = 3.0  # the trend rule uses the slope's lower 3-sigma bound (see RollingWindow)
_MAX_BAD_BATCHES = 100_000

LOSS, ZSCORE, EMA, RATIO, TREND = (f"loss_spike/{k}" for k in ("loss", "zscore", "ema", "ratio_to_min", "trend"))
EVENTS, SKIPPED, ROLLBACKS, LR_SCALE = (f"loss_spike/{k}" for k in ("events", "skipped", "rollbacks", "lr_scale"))


@dataclass
class _Snapshot:
    """A good state to roll back to: taken after ``step`` optimizer steps, held on the CPU."""

    step: int
    model: dict[str, Any]
    optimizer_states: list[dict[Any, Any]]
    detector: dict[str, Any]


def _cpu_copy(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor copied to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class LossSpikeDetector(DiagnosticCallback):
    """Detects loss spikes, non-finite losses and slow divergence on the device, and acts on them.

    Every optimizer step the loss goes through four rules on the loss's device, without a host
    sync (about 190 scalar kernels, 125 without rule (d); ~1 ms of host time per step on a slow
    2-core CPU); each rule fires after ``*_patience`` consecutive hits, once per streak:

    (a) **non-finite**: the loss is inf or NaN.
    (b) **z-score**: ``z = (loss - mean) / std`` against an EMA mean and variance (ZClip's rule,
        Kumar et al. 2025, arXiv 2504.02507: the first ``warmup`` losses initialise the baseline,
        then decay ``alpha``) exceeds ``z_threshold`` (6, OLMo-core's threshold). Robustness
        comes from what the baseline absorbs: a spike enters it clipped to
        ``mean + z_threshold**2 / z * std`` (the bigger the spike, the less it moves the
        baseline) and a non-finite loss not at all. We chose this over a windowed median/MAD: it
        is O(1) state and a few dozen scalar kernels per step, with no sort of a window; a falling loss
        is followed with a lag of ~``1 / (1 - alpha)`` steps rather than half a window; and it is
        the baseline the rest of the package uses, so z-scores read the same everywhere.
    (c) **k x running minimum**: ``loss > factor * best``, where ``best`` is the lowest EMA mean
        seen after warm-up (the smoothed loss, so one lucky batch does not lower the floor).
        ``factor=2`` with ``factor_patience=5`` is llm-foundry's ``KillLossSpike`` default. For
        positive losses; ``mode="max"`` reads it as ``value < best / factor``.
    (d) **sustained trend**: over the last ``trend_window`` losses (winsorised as in (b)), the
        least-squares line's rise across the window, relative to the window mean, at the lower
        3-sigma confidence bound of the slope, exceeds ``trend_threshold``. It catches slow
        blow-ups that never spike (a z-score absorbs a smooth drift; DESIGN.md section 7) while a
        spike moves a least-squares slope over ``trend_window`` points very little once winsorised,
        and the confidence bound keeps noise from firing it: a stationary stream has a positive
        bound with probability ~0.2% per window. We chose it over an EMA-fast / EMA-slow ratio,
        which has no confidence bound and reacts to every spike the fast EMA absorbs.

    Drops never alarm (a sudden fall of the loss is benign): every rule looks in the bad direction
    only (up for ``mode="min"``).

    **Which loss.** With ``monitor=None`` the detector reads the training loss as Lightning hands
    it to backward (``on_before_backward``), i.e. the ``loss`` that ``training_step`` returned
    (tensor or ``{"loss": ...}``): Lightning's division by ``accumulate_grad_batches`` and the
    fp16 loss scale are undone, and the loss of an optimizer step is the **mean of its
    micro-batch losses** under gradient accumulation. It is read there rather than from
    ``outputs`` in ``on_train_batch_end`` because ``outputs`` arrives after the optimizer step,
    too late for ``action="skip"``. Under manual optimization the loss is the mean of the
    tensors passed to ``manual_backward`` since the previous optimizer step. With a
    ``monitor`` name, the value is read from ``trainer.callback_metrics`` after every optimizer
    step (``check_on="step"``) or after every validation run (``check_on="validation"``, e.g.
    ``monitor="val_loss"``).

    **fp16.** The loss scaler's overflow steps are not spikes, and this detector never confuses
    them: it watches the loss, which the scaler does not touch (the loss is finite; only the
    scaled *gradients* overflow, and ``GradScaler`` skips those steps and lowers its scale). A
    non-finite *loss* (a forward-pass overflow) is a real fault and is flagged by rule (a).

    **Actions** (``action=``), taken at logging steps (every ``every_n_steps``; ``None``:
    ``Trainer(log_every_n_steps)``) when a rule fired since the previous one, except ``"skip"``:

    - ``"log"``, ``"warn"``, ``"stop"``, ``"raise"``, callable: as in every monitor.
    - ``"skip"``: decided every step, before the update. The optimizer's ``step`` is wrapped
      while training runs: the closure Lightning passes (forward, backward and this detector's
      rules) runs first, then a 0/1 device flag (rules a-c in firing state) decides whether the
      wrapped ``step`` runs at all. A skipped step leaves parameters, Adam moments, step counts
      and weight decay untouched; ``trainer.global_step`` and LR schedulers still advance, as for
      a step the fp16 scaler skips. The flag is read on the host once per optimizer step (with
      ``"skip"`` only): whether a step runs is a Python branch for an arbitrary optimizer, and
      the alternative (snapshot parameters and optimizer state every step and undo the update
      with masked copies) costs 2-4 extra copies of the model's memory per step. Under the fp16
      scaler the read is free (``GradScaler.step`` syncs at the same point). Rule (d) does not
      gate steps (a trend is not a bad batch). Alerts are warned as with ``"warn"``. After
      ``max_consecutive_skips`` skipped steps in a row the loss has moved to a new level that
      skipping cannot fix: the run stops.
    - ``"rollback"``: restore the model and optimizer state from the last good in-memory
      snapshot (CPU copies, taken at a logging step with no alert and no bad step, at least
      ``snapshot_every_n_steps`` after the previous one, and at the start of training) and
      continue with the next batches (the data since the snapshot is not replayed, so the bad
      batches are skipped). The detector's statistics return to the snapshot too; learning rates,
      ``global_step`` and LR schedulers are not rewound. After ``max_rollbacks`` rollbacks, the
      next alert restores the snapshot and stops the run. Holds one copy of the model and
      optimizer state in host memory; keep ``snapshot_every_n_steps`` above ``trend_window`` so a
      snapshot predates a slow divergence.
    - ``"reduce_lr"``: multiply every learning rate by ``lr_factor`` (also each group's
      ``initial_lr`` and each LR scheduler's ``base_lrs``, so that schedulers computing the LR
      from them, e.g. ``LambdaLR``, keep the reduction). Schedulers that set absolute LRs from
      other fields (``OneCycleLR``, ``CyclicLR``) overwrite it.

    **DDP.** Each rank runs the rules on its own loss. Actions agree across ranks: at each
    logging step one all-reduce (max) of a small vector (the per-step bad flags of the window and
    whether a rule fired) tells every rank what any rank saw, so all ranks stop, roll back or
    reduce the LR together and keep the same bad-batch list; with ``"skip"`` the per-step flag is
    all-reduced too (a replica that skipped alone would leave the others). Without DDP there is no
    collective.

    The bad batches (optimizer steps where rule a, b or c was in firing state, on any rank) are
    kept in :attr:`bad_batches` as ``{"epoch", "batch_idx", "step"}`` records (one per micro-batch;
    ``batch_idx`` is ``None`` for validation checks), like the skip-list of Lightning's
    ``SpikeDetection``, and saved with the checkpoint together with the detector's statistics, so a
    resumed run continues where it stopped.

    Logged keys (at logging steps):

    ===========================  ===============================================================
    ``loss_spike/loss``           the monitored loss of the step (micro-batch mean)
    ``loss_spike/zscore``         its z-score against the EMA baseline (0 in warm-up / non-finite)
    ``loss_spike/ema``            EMA mean of the loss (the baseline)
    ``loss_spike/ratio_to_min``   ``loss / best`` (``best / value`` in max mode; with ``factor``)
    ``loss_spike/trend``          relative rise over the window, lower bound (with ``trend_window``)
    ``loss_spike/events``         bad steps so far (any rank)
    ``loss_spike/skipped``        steps skipped (``action="skip"``)
    ``loss_spike/rollbacks``      rollbacks so far (``action="rollback"``)
    ``loss_spike/lr_scale``       product of the LR reductions (``action="reduce_lr"``)
    ``alerts/LossSpikeDetector``  number of alerts so far (texts go to TensorBoard)
    ===========================  ===============================================================

    Args:
        monitor: ``None`` for the training loss, or the name of a logged metric.
        mode: ``"min"`` (a loss: bad is up) or ``"max"`` (e.g. an accuracy: bad is down).
        check_on: when a named ``monitor`` is read: ``"step"`` or ``"validation"``.
        every_n_steps: logging and action cadence in optimizer steps (``None``: the trainer's
            ``log_every_n_steps``). Each logging step costs one host transfer (and under DDP one
            small all-reduce); actions other than ``"skip"`` happen at most this late.
        z_threshold: rule (b) threshold, or ``None`` to disable the rule (the statistics still
            absorb spikes winsorised at 6 sigma).
        alpha: EMA decay of the baseline (memory ~``1 / (1 - alpha)`` steps).
        warmup: losses that initialise the baseline; rules (b) and (c) are silent until then.
        factor: rule (c) factor (> 1), or ``None`` to disable the rule.
        trend_window: rule (d) window (>= 3 steps), or ``None`` to disable the rule.
        trend_threshold: rule (d) threshold on the relative rise (0.1 = up 10% across the window).
        nonfinite_patience: consecutive non-finite losses before rule (a) fires.
        zscore_patience: consecutive hits before rule (b) fires.
        factor_patience: consecutive hits before rule (c) fires.
        trend_patience: consecutive hits before rule (d) fires.
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"``, ``"skip"``, ``"rollback"``,
            ``"reduce_lr"`` or ``callable(alert, trainer)``.
        snapshot_every_n_steps: minimum steps between rollback snapshots.
        max_rollbacks: rollbacks allowed before the next alert stops the run.
        max_consecutive_skips: skipped steps in a row before the run stops.
        lr_factor: multiplier of the learning rates for ``"reduce_lr"``, in ``(0, 1)``.
        rules: extra alert rules on the logged keys, e.g. ``Above("loss_spike/loss", 10.0)``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> skip = LossSpikeDetector(action="skip", trend_window=None)  # drop bad batches
        >>> guard = LossSpikeDetector(action="stop", z_threshold=None, factor=None)  # stop slow blow-ups
        >>> trainer = Trainer(callbacks=[skip, guard])  # doctest: +SKIP
    """

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
        factor: float | None = 2.0,
        trend_window: int | None = 100,
        trend_threshold: float = 0.1,
        nonfinite_patience: int = 1,
        zscore_patience: int = 1,
        factor_patience: int = 5,
        trend_patience: int = 1,
        action: SpikeAction = "warn",
        snapshot_every_n_steps: int = 100,
        max_rollbacks: int = 3,
        max_consecutive_skips: int = 100,
        lr_factor: float = 0.5,
        rules: Sequence[Rule] = (),
    ) -> None:
        if not (callable(action) or action in SPIKE_ACTIONS):
            raise ValueError(f"`action` must be one of {SPIKE_ACTIONS} or a callable(alert, trainer), got {action!r}")
        super().__init__(every_n_steps=every_n_steps, action="log", rules=rules)
        self.action = action
        if monitor is not None and (not isinstance(monitor, str) or not monitor):
            raise ValueError(f"`monitor` must be None (the training loss) or a metric name, got {monitor!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be one of ('min', 'max'), got {mode!r}")
        if check_on not in ("step", "validation"):
            raise ValueError(f"`check_on` must be one of ('step', 'validation'), got {check_on!r}")
        if check_on == "validation" and monitor is None:
            raise ValueError("`check_on='validation'` needs `monitor`, the name of a validation metric")
        if action == "skip" and monitor is not None:
            raise ValueError(
                f"`action='skip'` decides before the update, from the training loss; it needs `monitor=None`, got "
                f"monitor={monitor!r} (a logged metric is known only after the step: use 'rollback' or 'stop')"
            )
        if z_threshold is not None and not z_threshold > 0:
            raise ValueError(f"`z_threshold` must be None or > 0, got {z_threshold!r}")
        if factor is not None and not factor > 1:
            raise ValueError(f"`factor` must be None or > 1, got {factor!r}")
        if trend_window is not None:
            check_int("trend_window", trend_window, 3)
        if not trend_threshold > 0:
            raise ValueError(f"`trend_threshold` must be > 0, got {trend_threshold!r}")
        for name, value in (("nonfinite_patience", nonfinite_patience), ("zscore_patience", zscore_patience),
                            ("factor_patience", factor_patience), ("trend_patience", trend_patience),
                            ("snapshot_every_n_steps", snapshot_every_n_steps),
                            ("max_consecutive_skips", max_consecutive_skips)):
            check_int(name, value, 1)
        check_int("max_rollbacks", max_rollbacks, 0)
        if not 0 < lr_factor < 1:
            raise ValueError(f"`lr_factor` must be in (0, 1), got {lr_factor!r}")
        self.monitor, self.mode, self.check_on = monitor, mode, check_on
        self.z_threshold, self.factor, self.trend_threshold = z_threshold, factor, trend_threshold
        self.snapshot_every_n_steps, self.max_rollbacks = snapshot_every_n_steps, max_rollbacks
        self.max_consecutive_skips, self.lr_factor = max_consecutive_skips, lr_factor
        self.baseline = EmaZScore(alpha=alpha, warmup=warmup)
        self.window = RollingWindow(trend_window) if trend_window is not None else None
        self._best = torch.tensor(float("inf"))  # lowest EMA mean after warm-up, in the "min" direction

        self._nonfinite_rule = NonFinite(LOSS, patience=nonfinite_patience)
        self._zscore_rule = Above(ZSCORE, z_threshold, patience=zscore_patience) if z_threshold else None
        self._factor_rule = Above(RATIO, factor, patience=factor_patience) if factor else None
        self._trend_rule = Above(TREND, trend_threshold, patience=trend_patience) if self.window else None
        self._batch_rules = [r for r in (self._nonfinite_rule, self._zscore_rule, self._factor_rule) if r]
        self._builtin_rules = [*self._batch_rules, *([self._trend_rule] if self._trend_rule else [])]
        self._figure_keys = [LOSS, ZSCORE, EMA, *([RATIO] if factor else []), *([TREND] if self.window else [])]

        self.bad_batches: list[dict[str, Any]] = []
        self._events = torch.zeros(())
        self._skipped_steps = self._consecutive_skips = self._rollbacks = 0
        self._lr_scale = 1.0
        # per-step bookkeeping between logging steps
        self._window_bad: Tensor = torch.zeros(1)  # 0/1 per step of the logging window, on the device
        self._window_steps: list[int] = []
        self._step_batches: dict[int, list[tuple[int, int | None]]] = {}
        self._micro_batches: list[tuple[int, int | None]] = []
        self._figures: dict[str, Tensor] | None = None
        self._loss_sum: Tensor | None = None
        self._micro = 0
        self._gate: Tensor | None = None
        self._seen_global_step = 0
        self._gates: list[tuple[torch.optim.Optimizer, Callable[..., Any], bool, Any]] = []
        self._snapshot: _Snapshot | None = None
        self._final = False
        self._publish_step = -1

    @property
    def state_key(self) -> str:
        # Not keyed on `action`: a run may resume with another action and keep its statistics. Two
        # detectors on one loss (e.g. "skip" on spikes, "stop" on the trend) differ by their rules.
        rules = ",".join(r.metric.rpartition("/")[2] for r in self._builtin_rules)
        return self._generate_state_key(monitor=self.monitor, mode=self.mode, check_on=self.check_on, rules=rules)

    # -- hooks ----------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        size = 1 if self.check_on == "validation" else self._cadence(trainer)
        if self._window_bad.numel() != size:
            self._window_bad = torch.zeros(size)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_global_step = trainer.global_step
        self._loss_sum, self._micro, self._gate, self._micro_batches = None, 0, None, []
        if self.action == "skip":
            self._install_gates(trainer)
        if self.action == "rollback":
            self._take_snapshot(trainer)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.monitor is not None:
            return
        loss = loss.detach().float()
        if pl_module.automatic_optimization:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it for accumulation
        scale = loss_scale(trainer)
        if scale is not None:
            loss = loss / scale  # fp16: the hook sees the scaled loss
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._micro += 1

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._gate = None
        if self.monitor is not None or self._loss_sum is None:
            return
        loss, self._loss_sum, self._micro = self._loss_sum / self._micro, None, 0
        self._evaluate(loss, trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.check_on == "validation":
            return
        self._micro_batches.append((trainer.current_epoch, batch_idx))
        if trainer.global_step == self._seen_global_step:
            return  # accumulating: no optimizer step with this batch yet
        self._seen_global_step = trainer.global_step
        step = trainer.global_step - 1
        if self.monitor is not None:
            self._evaluate(self._read_metric(trainer), step)
        self._step_batches[step], self._micro_batches = self._micro_batches, []
        if self.is_logging_step(trainer, step):
            self._publish(trainer, step)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.check_on != "validation" or trainer.sanity_checking:
            return
        self._evaluate(self._read_metric(trainer), trainer.global_step)
        self._publish(trainer, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_gates()
        if self._window_steps:  # the last partial window: log and record it; training is over
            self._final = True
            try:
                self._publish(trainer, self._window_steps[-1])
            finally:
                self._final = False
        self._snapshot = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_gates()
        self._snapshot = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_gates()
        self._snapshot = None

    def dashboard_charts(self) -> dict[str, list[str]]:
        return {
            "loss and EMA baseline": [r"loss_spike/(loss|ema)$"],
            "z-score": [r"loss_spike/zscore$"],
            "ratio to minimum, trend": [r"loss_spike/(ratio_to_min|trend)$"],
            "events, skips, rollbacks, LR scale": [r"loss_spike/(events|skipped|rollbacks|lr_scale)$"],
        }

    # -- the rules, on the device ---------------------------------------------------------------

    def _read_metric(self, trainer: pl.Trainer) -> Tensor:
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ValueError(
                f"{self.source}(monitor={self.monitor!r}, check_on={self.check_on!r}) found no such metric; logged "
                f"metrics are: {sorted(metrics)}"
            )
        value = metrics[self.monitor]
        return value if isinstance(value, Tensor) else torch.tensor(float(value))

    def _evaluate(self, value: Tensor, step: int) -> None:
        """Run every rule on ``value`` seen at ``step``; device ops only (see the class docstring)."""
        x = value.detach().reshape(()).float()
        finite = torch.isfinite(x)
        signed = x if self.mode == "min" else -x  # the statistics live in the "bad is up" direction
        # Spikes enter the baseline and the trend window winsorised, whether or not rule (b) alerts.
        z, absorbed = zclip(signed, self.baseline, self.z_threshold or _DEFAULT_Z_THRESHOLD)
        z = torch.where(finite, z, 0.0)  # non-finite is rule (a)'s alone
        figures = {LOSS: x, ZSCORE: z}
        if self._factor_rule is not None:
            best = self._best.to(x.device)
            best_value = best if self.mode == "min" else -best
            ratio = x / best_value if self.mode == "min" else best_value / x
            usable = self.baseline.ready & finite & (best_value > 0) & (best_value < float("inf"))
            figures[RATIO] = ratio = torch.where(usable, ratio, 0.0)
        self.baseline.update(absorbed)
        if self._factor_rule is not None:
            self._best = torch.where(self.baseline.ready, torch.minimum(best, self.baseline.mean), best)
            self._factor_rule.update(ratio, step)
        self._nonfinite_rule.update(x, step)
        if self._zscore_rule is not None:
            self._zscore_rule.update(z, step)
        if self.window is not None and self._trend_rule is not None:
            self.window.update(absorbed, step)
            figures[TREND] = rise = self.window.relative_rise(_TREND_CONFIDENCE)
            self._trend_rule.update(rise, step)
        bad = functools.reduce(torch.logical_or, [r.streak >= r.patience for r in self._batch_rules]).reshape(())
        self._gate = bad
        self._window_bad = self._window_bad.to(x.device)
        self._window_bad[step % self._window_bad.numel()] = bad
        self._window_steps.append(step)
        self._figures = figures  # stacked only at logging steps

    # -- logging steps: one all-reduce (DDP only), one host transfer, then the action ------------

    def _publish(self, trainer: pl.Trainer, step: int) -> None:
        if self._figures is None:
            self._window_steps, self._step_batches = [], {}
            return
        device = self._figures[LOSS].device
        size = self._window_bad.numel()
        ema = self.baseline.mean if self.mode == "min" else -self.baseline.mean
        figures = torch.stack([self._figures[LOSS], self._figures[ZSCORE], ema, *(
            self._figures[k].float() for k in (RATIO, TREND) if k in self._figures)])
        fired = torch.stack([(r.pending_step >= 0).any().to(device) for r in self._builtin_rules]).any()
        trend_on = (self._trend_rule.streak >= self._trend_rule.patience).any().to(device) if (
            self._trend_rule is not None) else torch.zeros((), dtype=torch.bool, device=device)
        agreed = torch.cat([self._window_bad.to(device), fired.float().view(1), trend_on.float().view(1)])
        if trainer.world_size > 1:
            agreed = trainer.strategy.reduce(agreed, reduce_op="max")
        self._events = self._events.to(device) + agreed[:size].sum()
        keys, counters = [*self._figure_keys, EVENTS], []
        if self.action == "skip":
            keys.append(SKIPPED)
            counters.append(float(self._skipped_steps))
        if self.action == "rollback":
            keys.append(ROLLBACKS)
            counters.append(float(self._rollbacks))
        if self.action == "reduce_lr":
            keys.append(LR_SCALE)
            counters.append(self._lr_scale)
        values = torch.cat([figures, self._events.view(1), torch.tensor(counters, device=device)])
        self._publish_step = step
        try:
            self.publish(trainer, step, keys, values, extra=agreed)
        finally:
            self._window_bad.zero_()
            self._window_steps, self._step_batches = [], {}

    def _act(self, trainer: pl.Trainer, alerts: list[Alert]) -> None:
        host, size = self.published_extra, self._window_bad.numel()
        bad_steps = [s for s in self._window_steps if host[s % size] > 0]
        fired_anywhere, trend_on = host[size] > 0, host[size + 1] > 0
        self._record_bad_batches(trainer, bad_steps)
        action = self.action
        if self.rules and action in _CHANGES_TRAINING:  # user rules ran after the all-reduce: agree on them
            fired_anywhere = trainer.strategy.reduce_boolean_decision(bool(alerts) or fired_anywhere, all=False)
        if callable(action):
            for alert in alerts:
                action(alert, trainer)
        elif action in ("warn", "skip"):
            self._warn(alerts)
            if fired_anywhere and not alerts and action == "warn":
                rank_zero_warn(f"{self.source}: a rule fired on another rank before step {self._seen_global_step}")
        elif fired_anywhere and action != "log":
            reason = alerts[0].message if alerts else f"{self.source}: alert on another rank"
            if action == "raise":
                raise DivergenceError(alerts)
            if self._final:
                return  # training is over: nothing left to stop, roll back or slow down
            if action == "stop":
                trainer.should_stop = True
                rank_zero_info(f"{reason} -> stopping the run (trainer.should_stop = True)")
            elif action == "rollback":
                self._rollback(trainer, reason)
                log_metrics(trainer, {ROLLBACKS: float(self._rollbacks)}, self._publish_step)  # after the action
            elif action == "reduce_lr":
                self._reduce_lr(trainer, reason)
                log_metrics(trainer, {LR_SCALE: self._lr_scale}, self._publish_step)
        if action == "rollback" and not (fired_anywhere or bad_steps or trend_on or self._final):
            if trainer.global_step - self._snapshot_step() >= self.snapshot_every_n_steps:
                self._take_snapshot(trainer)

    def _record_bad_batches(self, trainer: pl.Trainer, bad_steps: list[int]) -> None:
        for step in bad_steps:
            for epoch, batch_idx in self._step_batches.get(step, [(trainer.current_epoch, None)]):
                self.bad_batches.append({"epoch": epoch, "batch_idx": batch_idx, "step": step})
        del self.bad_batches[:-_MAX_BAD_BATCHES]

    # -- "skip": a gated optimizer step ---------------------------------------------------------

    def _install_gates(self, trainer: pl.Trainer) -> None:
        self._remove_gates()
        for optimizer in trainer.optimizers:
            if isinstance(optimizer, torch.optim.LBFGS):
                raise ValueError(
                    "`action='skip'` cannot gate LBFGS, which re-evaluates the closure inside step(); "
                    "use 'rollback', 'stop' or 'raise'"
                )
            inner = optimizer.step
            had_own = "step" in vars(optimizer)

            @functools.wraps(inner)  # keeps the LR scheduler's `_wrapped_by_lr_sched` marker
            def gated_step(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
                return self._gated_step(trainer, _inner, *args, **kwargs)

            optimizer.step = gated_step  # type: ignore[method-assign]
            self._gates.append((optimizer, gated_step, had_own, inner))

    def _remove_gates(self) -> None:
        for optimizer, gated_step, had_own, inner in reversed(self._gates):
            if vars(optimizer).get("step") is gated_step:  # something wrapped on top of us: leave it (we pass through)
                if had_own:
                    optimizer.step = inner  # type: ignore[method-assign]
                else:
                    del optimizer.step
        self._gates = []

    def _gated_step(self, trainer: pl.Trainer, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._gates:  # removed, but still in someone else's wrapper chain
            return inner(*args, **kwargs)
        closure = kwargs.get("closure", args[0] if args else None)
        result = None
        if closure is not None:
            result = closure()  # forward, backward, on_before_optimizer_step: the rules run here

            def replay() -> Any:
                return result

            if "closure" in kwargs:
                kwargs["closure"] = replay
            else:
                args = (replay, *args[1:])
        if self._skip_now(trainer):
            return result
        return inner(*args, **kwargs)

    def _skip_now(self, trainer: pl.Trainer) -> bool:
        gate, self._gate = self._gate, None
        if trainer.world_size > 1:  # every rank, every step: a replica that skipped alone would drift away
            local = gate.float().reshape(1) if gate is not None else torch.zeros(1, device=trainer.strategy.root_device)
            gate = trainer.strategy.reduce(local, reduce_op="max")
        elif gate is None:
            return False
        if not bool(gate.any()):  # the one host read per step of action="skip"
            self._consecutive_skips = 0
            return False
        self._skipped_steps += 1
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.max_consecutive_skips and not trainer.should_stop:
            trainer.should_stop = True
            rank_zero_warn(
                f"{self.source}: {self._consecutive_skips} steps skipped in a row (max_consecutive_skips="
                f"{self.max_consecutive_skips}); the loss has left its baseline for good -> stopping the run"
            )
        return True

    # -- "rollback" and "reduce_lr" -------------------------------------------------------------

    def _snapshot_step(self) -> int:
        return self._snapshot.step if self._snapshot is not None else -(10**12)

    def _take_snapshot(self, trainer: pl.Trainer) -> None:
        self._snapshot = _Snapshot(
            step=trainer.global_step,
            model=_cpu_copy(trainer.lightning_module.state_dict()),
            optimizer_states=[_cpu_copy(opt.state_dict()["state"]) for opt in trainer.optimizers],
            detector=_cpu_copy(self._statistics_state()),
        )

    def _rollback(self, trainer: pl.Trainer, reason: str) -> None:
        snapshot = self._snapshot
        if snapshot is None:  # cannot happen after on_train_start; be safe rather than sorry
            trainer.should_stop = True
            rank_zero_warn(f"{reason} -> no snapshot to roll back to: stopping the run")
            return
        trainer.lightning_module.load_state_dict(snapshot.model)
        for optimizer, state in zip(trainer.optimizers, snapshot.optimizer_states):
            # Moments and step counts come back; hyperparameters (the LR schedule) keep going.
            groups = optimizer.state_dict()["param_groups"]
            optimizer.load_state_dict({"state": copy.deepcopy(state), "param_groups": groups})
        self._load_statistics_state(copy.deepcopy(snapshot.detector))
        self._loss_sum, self._micro, self._gate = None, 0, None
        self._rollbacks += 1
        if self._rollbacks > self.max_rollbacks:
            trainer.should_stop = True
            rank_zero_warn(
                f"{reason} -> restored the snapshot of step {snapshot.step} and stopping the run: "
                f"{self.max_rollbacks} rollbacks already (max_rollbacks={self.max_rollbacks})"
            )
            return
        rank_zero_warn(
            f"{reason} -> rolled back model and optimizer to the snapshot of step {snapshot.step} "
            f"(rollback {self._rollbacks}/{self.max_rollbacks})"
        )

    def _reduce_lr(self, trainer: pl.Trainer, reason: str) -> None:
        f = self.lr_factor
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for key in ("lr", "initial_lr"):
                    if isinstance(group.get(key), Tensor):
                        group[key].mul_(f)  # keep the tensor (capturable / compiled optimizers hold it)
                    elif isinstance(group.get(key), (int, float)):
                        group[key] = group[key] * f
        for config in trainer.lr_scheduler_configs:
            base_lrs = getattr(config.scheduler, "base_lrs", None)
            if isinstance(base_lrs, list):
                config.scheduler.base_lrs = [b * f for b in base_lrs]
        self._lr_scale *= f
        rank_zero_warn(f"{reason} -> learning rates multiplied by {f:g} (now x{self._lr_scale:g} of the original)")

    # -- checkpoint state -----------------------------------------------------------------------

    def _statistics_state(self) -> dict[str, Any]:
        """What a rollback rewinds: the baseline, the running best, the window and the rules' streaks."""
        return {
            "baseline": self.baseline.state_dict(),
            "best": self._best.cpu(),
            "window": self.window.state_dict() if self.window is not None else None,
            "builtin_rules": [r.state_dict() for r in self._builtin_rules],
        }

    def _load_statistics_state(self, state: dict[str, Any]) -> None:
        if "baseline" in state:
            self.baseline.load_state_dict(state["baseline"])
        if "best" in state:
            self._best = torch.as_tensor(state["best"], dtype=torch.float32).clone()
        if self.window is not None and state.get("window") is not None:
            self.window.load_state_dict(state["window"])
        for rule, rule_state in zip(self._builtin_rules, state.get("builtin_rules", [])):
            rule.load_state_dict(rule_state)

    def extra_state(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in self._statistics_state().items() if k != "builtin_rules"},  # the base saves rules
            "bad_batches": list(self.bad_batches),
            "events": self._events.cpu(),
            "skipped_steps": self._skipped_steps,
            "consecutive_skips": self._consecutive_skips,
            "rollbacks": self._rollbacks,
            "lr_scale": self._lr_scale,
            "window_bad": self._window_bad.cpu(),
            "window_steps": list(self._window_steps),
            "step_batches": {k: list(v) for k, v in self._step_batches.items()},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._load_statistics_state({k: v for k, v in state.items() if k in ("baseline", "best", "window")})
        self.bad_batches = list(state.get("bad_batches", []))
        self._events = torch.as_tensor(state.get("events", 0.0), dtype=torch.float32).clone()
        self._skipped_steps = int(state.get("skipped_steps", 0))
        self._consecutive_skips = int(state.get("consecutive_skips", 0))
        self._rollbacks = int(state.get("rollbacks", 0))
        self._lr_scale = float(state.get("lr_scale", 1.0))
        window_bad = state.get("window_bad")
        if window_bad is not None and window_bad.numel() == self._window_bad.numel():  # same cadence
            self._window_bad = window_bad.clone().float()
            self._window_steps = list(state.get("window_steps", []))
            self._step_batches = {int(k): list(v) for k, v in state.get("step_batches", {}).items()}
