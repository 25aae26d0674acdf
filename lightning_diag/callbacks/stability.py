"""StabilityGovernor: how far each optimizer step overshoots on its own batch, and a learning-rate
scale that caps it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_diag._checks import check_bool, check_callable, check_int, check_number
from lightning_diag.alerts import Above, Action, Below, NonFinite, Rule
from lightning_diag.callbacks._base import Cadence, DiagnosticCallback, Figures, HostFigures
from lightning_diag.callbacks._interventions import StepControl
from lightning_diag.callbacks._sharding import local_tensor, sharding_of, sum_over_ranks
from lightning_diag.callbacks._trainer import grad_scale, loss_scale
from lightning_diag.callbacks.sharpness import LossFn, training_step_loss
from lightning_diag.keys import Key
from lightning_diag.metrics.overshoot import OvershootController, fused_dot, overshoot_ratio
from lightning_diag.metrics.sharpness import TrainingStateGuard

__all__ = ["StabilityGovernor"]

_RATIO, _LR = "overshoot ratio (0.5: line minimum, 1: no progress)", "learning rate: in use and critical"


class StabilityGovernor(DiagnosticCallback):
    """Measures how far each optimizer step overshoots on its own batch, and caps the learning rate on it.

    **What it measures.** On a check step, on the step's own batch: ``f0`` the step's loss, ``f1``
    the loss after the update (one extra forward, no backward) and ``gD = <g, D>`` the first-order
    change along the actual update ``D = theta_new - theta_old``, which give the overshoot ratio
    (:func:`~lightning_diag.metrics.overshoot.overshoot_ratio`, the stochastic Armijo ratio of
    Vaswani et al. 2019)::

        r = (f1 - f0 - gD) / (-gD)        (= D^T H D / (2 |gD|) on a quadratic)

    ``r = 0.5``: the step lands on the minimum along its own direction; ``1``: it undoes its
    first-order progress; ``> 1``: it raises the loss it was computed to lower. Adam's
    preconditioning and momentum are in ``D``, so one formula serves every optimizer; for plain
    SGD ``r = lr g^T H g / (2 |g|^2)``. ``lr / r`` is the critical learning rate, where ``r``
    would be 1. A check where ``gD >= 0`` or ``|gD| < min_relative_decrease * |f0|`` is invalid
    (``r`` would be noise over a tiny number): its ratio is logged as NaN and it moves nothing.

    **How.** ``gD`` is ``<g, theta>`` after the update minus before it, each in float64 over all
    parameters in a few fused kernels (:func:`~lightning_diag.metrics.overshoot.fused_dot`), with
    no copy of the weights. Both are taken inside the optimizer's ``step`` (a
    :class:`~lightning_diag.callbacks._interventions.StepControl`, whose ``before``/``after`` run
    after the closure), so ``g`` is the final gradient the optimizer used: unscaled under fp16
    (divided by the scaler's scale where a fused optimizer still holds it scaled), and clipped if
    Lightning clips. With norm clipping (``gradient_clip_algorithm="norm"``) ``gD`` is corrected
    to the unclipped gradient, the one whose first-order term ``f`` follows, by the clip factor
    (``|g|`` before clipping, read in ``on_before_optimizer_step``, over ``|g|`` after); with value
    clipping it is the clipped gradient's (said once). ``f1`` re-runs ``training_step(batch,
    batch_idx)`` (its ``"loss"`` if a dict; ``self.log``/``log_dict`` muted) or ``loss_fn(pl_module,
    batch, batch_idx)``, under ``torch.no_grad`` and the precision plugin's autocast, in the RNG
    state the step's own forward started from (so dropout draws the same masks for ``f0`` and
    ``f1``), inside a :class:`~lightning_diag.metrics.sharpness.TrainingStateGuard`: RNG streams,
    buffers (BatchNorm statistics, ``num_batches_tracked``) and train/eval flags are put back, so
    the extra forward leaves no trace. **Gradient accumulation:** ``f0`` is the mean loss of the
    step's micro-batches, ``f1`` is recomputed on every one of them (each in its own RNG state) and
    averaged, and ``g`` is the accumulated gradient, i.e. exactly the ratio of the loss the step
    descended. **Manual optimization** needs ``loss_fn``: ``f0`` and ``f1`` are then both
    ``loss_fn`` on the batch, around the first optimizer step of the check step (whose parameters
    ``gD`` covers); without it nothing is measured (said once). **DDP:** ``f0``, ``f1`` and
    ``gD`` are global (the mean of the ranks' losses), one all-reduce of a packed 3-vector;
    **FSDP2:** ``gD`` adds the ranks' local dot products of their shards in that same all-reduce.
    Every rank then decides alike. Not measured: FSDP1, DeepSpeed, LBFGS (said once).

    **What it does with it** (``govern=True``). The learning rates in use are the schedule's times
    ``scale <= 1`` (applied around each optimizer's ``step``, so every scheduler keeps its own
    values). :class:`~lightning_diag.metrics.overshoot.OvershootController` cuts ``scale`` when the
    smoothed ratio passes ``target`` (to the scale where it is ``target``; at once when a step
    raised its own loss, ``r > 1``), and lets it grow back by ``recovery`` per check once the
    ratio is below ``target * (1 - margin)``, never above 1 nor below ``min_scale``. While the
    scale is exactly 1 training is bit-identical to a run without the governor. ``govern=False``
    measures and alerts only: ``scale`` is then the scale it would apply, and the rates are never
    touched (the ``StepControl`` only measures around the step).

    **Cost.** One forward (about a third of a step) per check, plus two fused dot products and a
    3-float host read; no host sync between checks. Checks run every ``check_every_n_steps``
    steps and at logging steps while the smoothed ratio is below ``target / 2``, and every step
    while it is above (the governor is then at work). A check step cost 1.6 steps on a CPU MLP
    (4 x 512, AdamW): the default, 25 (aligned with Lightning's 50-step logging), costs about 2.4%
    there while the ratio is low.

    Alerts: ``stability/scale`` below ``warn_scale`` (warning: the run needs a much lower rate
    than its schedule); ``stability/pinned_checks`` reaching ``pin_patience`` (critical: the scale
    sits at ``min_scale`` and steps still raise their own loss, the scale cannot hold the run);
    a non-finite ``stability/loss_change`` (critical: the loss before or after the step is NaN/inf).

    Args:
        target: smoothed ratio the scale holds the run at (> 0). 0.65 is what the runs-saved
            benchmark chose leave-one-family-out (on 14 of its 15 folds, and on all families), from
            0.5, 0.65, 0.8 and 1.0 (``docs/runs_saved.md``).
        smoothing: EMA decay of the smoothed ratio, in ``[0, 1)``.
        recovery: growth factor of the scale per check while the ratio is low (> 1).
        min_scale: floor of the scale, in ``(0, 1]``.
        margin: dead band below ``target`` (fraction of it) where the scale holds still, ``[0, 1)``.
        check_every_n_steps: cadence of the checks while the ratio is low.
        min_relative_decrease: a check is valid when ``-gD >= min_relative_decrease * |f0|``.
        govern: apply the scale (``False``: measure and alert only).
        loss_fn: ``callable(pl_module, batch, batch_idx) -> scalar loss`` for ``f1`` (and ``f0``
            under manual optimization); it must be the loss whose gradient the optimizer steps on.
            ``None``: ``training_step``, muted.
        warn_scale: warning threshold on ``scale`` (``None``: no warning).
        pin_patience: consecutive checks at the floor with ``r > 1`` before the critical alert.
        every_n_steps: logging cadence (``None``: the trainer's ``log_every_n_steps``).
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``callable(alert, trainer)``.
        rules: extra rules on the logged keys, e.g. ``Above("stability/ratio", 2.0)``.
        prefix: the first part of the keys in place of ``stability`` (two of these monitors on one
            trainer need two prefixes).

    Example:
        >>> governor = StabilityGovernor(target=0.65, check_every_n_steps=25)
        >>> governor.family, [rule.metric for rule in governor.book.rules]
        ('stability', ['stability/loss_change', 'stability/scale', 'stability/pinned_checks'])
    """

    family = "stability"
    KEYS = (
        Key("ratio", "overshoot ratio r = (f1 - f0 - gD) / (-gD) of the checked step on its own batch; NaN on an "
            "invalid check (gD >= 0, or |gD| < min_relative_decrease |f0|)", _RATIO, rate="check", host=True),
        Key("ratio_smoothed", "smoothed ratio at the scale of the checked step (rises at once above 1, decays "
            "by `smoothing`); the scale is cut when it passes `target`", _RATIO, rate="check", host=True),
        Key("critical_lr", "lr / r: the rate at which the step would undo its first-order progress (NaN when "
            "r is NaN or <= 0)", _LR, rate="check", host=True),
        Key("lr", "learning rate in use at the checked step: the first parameter group's, times the scale",
            _LR, rate="check", host=True),
        Key("scale", "factor on the schedule's learning rates from the next step on (the one it would apply, "
            "with govern=False)", rate="check", host=True),
        Key("batch_loss", "f0: the checked step's loss on its batch (mean over micro-batches and ranks)",
            rate="check"),
        Key("loss_change", "f1 - f0: what the update did to that batch's loss (one extra forward)", rate="check"),
        Key("predicted_change", "gD = <g, theta_new - theta_old>: the first-order change", rate="check"),
        Key("pinned_checks", "consecutive valid checks with the scale at min_scale and r > 1", rate="check",
            host=True),
    )  # fmt: skip

    def __init__(
        self,
        *,
        target: float = 0.65,
        smoothing: float = 0.9,
        recovery: float = 1.05,
        min_scale: float = 0.01,
        margin: float = 0.2,
        check_every_n_steps: int = 25,
        min_relative_decrease: float = 1e-6,
        govern: bool = True,
        loss_fn: LossFn | None = None,
        warn_scale: float | None = 0.1,
        pin_patience: int = 3,
        every_n_steps: int | None = None,
        action: Action = "warn",
        rules: Rule | Sequence[Rule] = (),
        prefix: str | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules, prefix=prefix)
        check_int("check_every_n_steps", check_every_n_steps, 1)
        check_int("pin_patience", pin_patience, 1)
        check_number("min_relative_decrease", min_relative_decrease, 0.0, low_open=False)
        check_bool("govern", govern)
        check_callable("loss_fn", loss_fn, optional=True)
        check_number("warn_scale", warn_scale, 0.0, 1.0, optional=True)
        # OvershootController validates target, smoothing, recovery, min_scale and margin.
        self.controller = OvershootController(target=target, smoothing=smoothing, recovery=recovery,
                                              min_scale=min_scale, margin=margin)  # fmt: skip
        self.target, self.check_every_n_steps, self.govern = float(target), check_every_n_steps, govern
        self.min_relative_decrease, self.loss_fn = float(min_relative_decrease), loss_fn
        self.checks = Cadence(check_every_n_steps)
        self._builtin_rules: list[Rule] = [NonFinite(f"{self.family}/loss_change")]
        if warn_scale is not None:
            self._builtin_rules.append(Below(f"{self.family}/scale", warn_scale))
        self._builtin_rules.append(Above(f"{self.family}/pinned_checks", pin_patience - 0.5, severity="critical"))
        self._control = StepControl(lr_scale=self._lr_scale if govern else None, before=self._before,
                                    after=self._after)  # fmt: skip
        self._trainer: pl.Trainer | None = None
        self._active = False
        self._reset_check()
        self._pending: dict[int, tuple[float, float]] = {}  # step -> (schedule's lr, scale used)

    def _reset_check(self) -> None:
        """Forget the current check's captured batches and partial figures."""
        self._micro: list[list[Any]] = []  # [batch, batch_idx, RNG state at its start, its loss f0 or None]
        self._optimizer: Any = None
        self._params: list[Tensor] = []
        self._before_dot: Tensor | None = None
        self._clip_squares: tuple[Tensor | None, Tensor | None] = (None, None)  # |g|^2 before and after clipping
        self._f0: Tensor | None = None
        self._lr = math.nan

    # -- set-up -----------------------------------------------------------------------------------

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer, self._pending = trainer, {}
        self._reset_check()
        self._active = self._supported(trainer, pl_module)
        if self._active:
            params = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
            sharding = sharding_of(trainer, params)
            self._sharded = sharding.reduces
            self._owned = {id(p) for i, p in enumerate(params) if sharding.owns(i)}
            self._control.install(trainer.optimizers)
            if trainer.gradient_clip_val and not _norm_clipping(trainer):
                self.warn_once("clip", "with gradient_clip_algorithm='value' the first-order change gD is that of the "
                                       "clipped gradient, not the loss's own gradient (norm clipping is corrected)")

    def _supported(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        why = None
        if not pl_module.automatic_optimization and self.loss_fn is None:
            why = ("under manual optimization it needs `loss_fn(pl_module, batch, batch_idx)`: `training_step` "
                   "steps the optimizers itself and cannot be recomputed")  # fmt: skip
        elif isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            why = f"{type(trainer.strategy).__name__} is not supported (FSDP2 and DDP are)"
        elif any(isinstance(opt, torch.optim.LBFGS) for opt in trainer.optimizers):
            why = "LBFGS re-evaluates the closure inside step(), so an update cannot be measured"
        if why is not None:
            self.warn_once("unsupported", f"nothing is measured: {why}")
        return why is None

    def detach(self) -> None:
        self._control.remove()
        self._reset_check()
        self._trainer, self._active = None, False

    # -- which steps are checked ------------------------------------------------------------------

    def is_check_step(self, step: int) -> bool:
        if not self._active:
            return False
        high = self.controller.ratio_now() > self.target / 2  # NaN (no valid check yet): False
        return high or self.checks.at(step) or self._is_logging_step(step)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._active and self._armed_step == trainer.global_step:  # every micro-batch of a check step
            entry = [batch, batch_idx, _rng_state(pl_module), None]  # references: nothing is copied
            self._micro = [*self._micro, entry] if pl_module.automatic_optimization else [entry]

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        super().on_before_backward(trainer, pl_module, loss)
        if self._armed_step != trainer.global_step or not self._micro or not pl_module.automatic_optimization:
            return
        loss = loss.detach().double()  # float64: f1 - f0 must keep every bit of both
        if trainer.accumulate_grad_batches > 1:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it for accumulation
        scale = loss_scale(trainer)
        self._micro[-1][3] = loss / scale if scale is not None else loss  # fp16: the hook sees the scaled loss

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, logging: bool) -> None:
        """Before Lightning clips: ``|g|^2`` of the unclipped gradient, for the clip factor."""
        if self._active and self._micro and _norm_clipping(trainer):
            self._clip_squares = (fused_dot(*[self._grads(optimizer)[1]] * 2), None)
        return None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._micro and trainer.global_step != self._armed_step:
            self._reset_check()  # the check step is over (measured, or skipped by an fp16 overflow): keep nothing
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    # -- around the update ------------------------------------------------------------------------

    def _grads(self, optimizer: Any) -> tuple[list[Tensor], list[Tensor]]:
        """This rank's parts of the parameters of ``optimizer`` that have a gradient, and the gradients."""
        params = [p for g in optimizer.param_groups for p in g["params"]
                  if p.grad is not None and p.grad.layout == torch.strided and id(p) in self._owned]  # fmt: skip
        return [local_tensor(p) for p in params], [local_tensor(p.grad) for p in params]

    def _checking(self, optimizer: Any) -> bool:
        trainer = self._trainer
        return (trainer is not None and self._active and self._armed_step == trainer.global_step
                and bool(self._micro) and (self._optimizer is None or self._optimizer is optimizer))  # fmt: skip

    def _before(self, optimizer: Any) -> None:
        if not self._checking(optimizer) or self._optimizer is not None:
            return
        trainer, pl_module = self._trainer, self._trainer.lightning_module
        with torch.no_grad():
            if pl_module.automatic_optimization:  # the micro-batches that reached backward
                self._micro = [entry for entry in self._micro if entry[3] is not None]
                if not self._micro:
                    return
                self._f0 = torch.stack([entry[3] for entry in self._micro]).mean()
            else:
                self._f0 = self._mean_loss(trainer, pl_module)
                if self._f0 is None:
                    return
            self._optimizer = optimizer
            params, grads = self._grads(optimizer)
            self._params = [p for g in optimizer.param_groups for p in g["params"]]
            self._before_dot = fused_dot(grads, params)
            if self._clip_squares[0] is not None:
                self._clip_squares = (self._clip_squares[0], fused_dot(grads, grads))
        lr = optimizer.param_groups[0]["lr"]
        self._lr = float(lr) if not isinstance(lr, Tensor) or lr.device.type == "cpu" else math.nan

    def _after(self, optimizer: Any) -> None:
        if self._optimizer is not optimizer or self._before_dot is None:
            return
        trainer, pl_module = self._trainer, self._trainer.lightning_module
        step = trainer.global_step
        with torch.no_grad():
            params, grads = self._grads(optimizer)
            gD = fused_dot(grads, params) - self._before_dot
            scale = grad_scale(trainer, optimizer)
            if scale is not None:
                gD = gD / scale  # a fused optimizer under fp16: its gradients are still scaled
            before_clip, after_clip = self._clip_squares
            if before_clip is not None and after_clip is not None:  # back to the unclipped gradient
                gD = gD * torch.where(after_clip > 0, (before_clip / after_clip).sqrt(), 1.0)
            f0, f1 = self._f0, self._mean_loss(trainer, pl_module)
            if f0 is None or f1 is None:
                self._reset_check()
                return
            f0, f1, gD = f0.double(), f1.double().to(f0.device), gD.to(f0.device)
            world = trainer.world_size
            if world > 1:  # one all-reduce: the mean of the ranks' losses; gD summed over shards, or already global
                gD = gD if self._sharded else gD / world
                f0, f1, gD = sum_over_ranks(torch.stack([f0 / world, f1 / world, gD])).unbind()
        self._pending[step] = (self._lr, float(self.controller.scale) if self.govern else 1.0)
        self._reset_check()  # a second optimizer stepping in this step (manual optimization) is not measured
        self.record(step, Figures({"batch_loss": f0, "loss_change": f1 - f0, "predicted_change": gD}))

    def _mean_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor | None:
        """The loss on the check's micro-batches at the current weights, each in its forward's RNG
        state; None (said once) if the recomputation failed."""
        loss_fn = self.loss_fn or training_step_loss
        total = None
        try:
            with TrainingStateGuard(pl_module), trainer.precision_plugin.train_step_context():
                for batch, batch_idx, rng, _ in self._micro:
                    _set_rng_state(rng)
                    loss = loss_fn(pl_module, batch, batch_idx).detach().double()
                    total = loss if total is None else total + loss
        except Exception as error:  # noqa: BLE001 - a monitor never crashes the run
            self.warn_once("forward", f"recomputing the loss failed ({type(error).__name__}: {error}); nothing "
                                      "more is measured (pass `loss_fn=`)")  # fmt: skip
            self._active = False
            return None
        return None if total is None else total / len(self._micro)

    def _lr_scale(self, optimizer: Any) -> float:
        return float(self.controller.scale)

    # -- deciding, on the host --------------------------------------------------------------------

    def derive(self, host: HostFigures) -> dict[str, float | np.ndarray]:
        f0, change, gD = (host.scalars[k] for k in ("batch_loss", "loss_change", "predicted_change"))
        r = overshoot_ratio(f0, f0 + change, gD, rtol=self.min_relative_decrease)
        lr, scale_used = self._pending.pop(host.step, (math.nan, 1.0))
        self.controller.update(r, scale_used)
        in_use = lr * scale_used
        return {"ratio": r, "ratio_smoothed": float(self.controller.smoothed) * scale_used,
                "critical_lr": in_use / r if r > 0 else math.nan, "lr": in_use,
                "scale": float(self.controller.scale), "pinned_checks": float(self.controller.pinned)}  # fmt: skip

    # -- checkpoint state -------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "controller" in state:
            self.controller.load_state_dict(state["controller"])


def _norm_clipping(trainer: pl.Trainer) -> bool:
    """Lightning clips by norm (its default algorithm when only ``gradient_clip_val`` is set)."""
    algorithm = trainer.gradient_clip_algorithm
    return bool(trainer.gradient_clip_val) and (algorithm is None or str(algorithm) == "norm")


def _rng_state(pl_module: pl.LightningModule) -> dict[str, Any]:
    """The torch RNG streams a forward draws dropout from: the CPU one and the module's CUDA device's."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    device = pl_module.device
    if device.type == "cuda":
        state["cuda"] = (device.index or 0, torch.cuda.get_rng_state(device))
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        index, cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda, index)
