"""SharpnessMonitor: the top Hessian eigenvalue against the optimizer's stability limit, on check steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_diag._checks import check_bool, check_int, check_number
from lightning_diag.alerts import Above, Action, NonFinite, Rule
from lightning_diag.callbacks._base import Cadence, DiagnosticCallback, Figures
from lightning_diag.callbacks._sharding import DTensor, mean_over_ranks
from lightning_diag.keys import Key
from lightning_diag.metrics.sharpness import SharpnessEstimator, TrainingStateGuard

__all__ = ["LossFn", "SharpnessMonitor", "training_step_loss"]

LossFn = Callable[[pl.LightningModule, Any, int], Tensor]
_RATIO, _LAMBDA = "stability ratio (1 = edge of stability)", "sharpness lambda_max"


def training_step_loss(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Tensor:
    """The default ``loss_fn``: ``training_step`` on the batch, with ``self.log``/``log_dict`` muted.

    Returns the tensor ``training_step`` returned, or its ``"loss"`` entry. The module's own
    logging calls are swallowed for the duration, so a recomputation logs nothing twice.
    """
    muted = {name: vars(pl_module).get(name) for name in ("log", "log_dict")}
    pl_module.log = pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        out = pl_module.training_step(batch, batch_idx)
    finally:
        for name, previous in muted.items():
            if previous is None:
                delattr(pl_module, name)
            else:
                setattr(pl_module, name, previous)
    loss = out["loss"] if isinstance(out, dict) else out
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise ValueError(f"the loss for the sharpness check must be a scalar tensor, `training_step` gave {out!r}; "
                         "pass `loss_fn=`")  # fmt: skip
    return loss


class SharpnessMonitor(DiagnosticCallback):
    """Sharpness (top Hessian eigenvalue of the loss) against the optimizer's stability limit.

    Gilmer et al. 2021 ("A Loss Curvature Perspective on Training Instability", arXiv 2110.04369):
    gradient descent diverges along a direction of curvature ``lambda`` once ``lr * lambda > 2``
    (``2 + 2 beta`` with heavy-ball momentum ``beta``). Cohen et al. 2022 ("Adaptive Gradient
    Methods at the Edge of Stability", arXiv 2207.14484): for Adam the quantity is the
    preconditioned sharpness ``lambda_max(P^-1 H)``, ``P = (sqrt(v_hat) + eps) / lr``, whose limit
    is ``(2 + 2 beta1) / (1 - beta1)`` (38 for ``beta1 = 0.9``). ``sharpness/stability_ratio`` is
    the optimizer-appropriate quantity over its limit: 1 is the edge of stability, where healthy
    full-batch training hovers; the alarm is a sustained excursion well above it.

    **How it measures.** On check steps, in ``on_before_optimizer_step`` (gradients complete and
    unscaled, weights not yet updated), :class:`~lightning_diag.metrics.sharpness.SharpnessEstimator`
    runs a restarted Lanczos iteration on Hessian-vector products of the loss recomputed on the
    step's batch, warm-started from the previous check's vector (``iters`` products per operator;
    ``cold_iters`` the first time; the vectors are checkpointed, so a resumed run measures what the
    uninterrupted one would): double backward, or finite differences of gradients where a kernel
    has no double backward (flash attention, ``torch.compile``'d submodules; which ran is in the
    warning it gives once). Sparse gradients (``nn.Embedding(sparse=True)``) are densified.
    The loss comes from ``loss_fn(pl_module, batch, batch_idx)``, by default
    :func:`training_step_loss`; every evaluation runs under a
    :class:`~lightning_diag.metrics.sharpness.TrainingStateGuard`: buffers (BatchNorm statistics),
    train/eval flags and RNG streams are restored afterwards and dropout masks are the same across
    the products of one check, so training is unchanged. Under DDP every rank takes part and each
    product is averaged over ranks (the Hessian of the global batch). Not supported: manual
    optimization without a ``loss_fn``, FSDP2 (DTensor) parameters (one warning; nothing measured).

    **Cost.** A warm check costs about ``iters + 1`` forward+backward passes per operator (twice
    that under Adam, whose preconditioned operator is a second one; on the benchmark transformer
    about 10 steps' worth, flash attention having no double backward): keep ``check_every_n_steps``
    large (the default 250 stays under 5% of a CPU step there; ``benchmarks/overhead.py``).

    Alerts: ``sharpness/stability_ratio`` above ``stability_threshold`` for ``patience`` steps
    (warning; the defaults, 30 for two checks in a row, are what the early-warning suite chose,
    ``docs/early_warning.md``: mini-batch training sits well above the edge of stability, 1, all the
    time); a non-finite ``sharpness/lambda_max`` (critical: the loss or its curvature is broken).

    Args:
        check_every_n_steps: measure on optimizer steps ``s`` with ``(s + 1) % n == 0``.
        every_n_steps: logging cadence (``None``: the trainer's ``log_every_n_steps``).
        loss_fn: ``callable(pl_module, batch, batch_idx) -> scalar loss`` (default: ``training_step``, muted).
        iters: Hessian-vector products per operator per warm check; ``cold_iters`` on a cold start.
        method: ``"auto"`` (double backward, falling back to finite differences), ``"autograd"`` or
            ``"finite_difference"``.
        per_group: per-parameter-group figures (``None``: when groups have different learning rates).
        trace_probes: Hutchinson probes for ``sharpness/trace`` (0: none).
        stability_threshold: alert threshold on the stability ratio (``None``: no alert).
        patience: steps the ratio must stay above it (checks are ``check_every_n_steps`` apart).
        seed: seed of the cold-start vectors and probes, in ``[0, 2**63)``.
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``callable(alert, trainer)``.
        rules: extra rules on the logged keys, e.g. ``Above("sharpness/lambda_max", 1e4)``.
        prefix: the first part of the keys in place of ``sharpness`` (two of these monitors on one
            trainer need two prefixes).

    Example:
        >>> monitor = SharpnessMonitor(check_every_n_steps=200, iters=4)
        >>> monitor.family, [rule.metric for rule in monitor.book.rules]
        ('sharpness', ['sharpness/lambda_max', 'sharpness/stability_ratio'])
    """

    family = "sharpness"
    KEYS = (
        Key("lambda_max", "top eigenvalue of the loss Hessian (Lanczos on Hessian-vector products)", _LAMBDA,
            rate="check"),
        Key("preconditioned_lambda_max", "lambda_max(P^-1 H), P the optimizer's preconditioner (1/lr for SGD)",
            _LAMBDA, rate="check"),
        Key("stability_ratio", "preconditioned sharpness / the optimizer's limit (2, 2 + 2 beta, 38 for Adam)",
            _RATIO, rate="check"),
        Key("lambda_max/{layer}", "top eigenvalue of the parameter group's diagonal Hessian block", rate="check",
            requires="per_group_figures", note="per parameter group ('layer' = group name)"),
        Key("preconditioned_lambda_max/{layer}", "the group's block, preconditioned", rate="check",
            requires="per_group_figures", note="per parameter group"),
        Key("stability_ratio/{layer}", "the group's block over its limit", _RATIO, rate="check",
            requires="per_group_figures", note="per parameter group"),
        Key("trace", "Hutchinson estimate of the Hessian trace", rate="check", requires="trace_probes",
            note="with trace_probes > 0"),
    )  # fmt: skip

    def __init__(
        self,
        *,
        check_every_n_steps: int = 250,
        every_n_steps: int | None = None,
        loss_fn: LossFn | None = None,
        iters: int = 4,
        cold_iters: int = 20,
        method: Literal["auto", "autograd", "finite_difference"] = "auto",
        per_group: bool | None = None,
        trace_probes: int = 0,
        stability_threshold: float | None = 30.0,
        patience: int = 250,
        seed: int = 0,
        action: Action = "warn",
        rules: Rule | Sequence[Rule] = (),
        prefix: str | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules, prefix=prefix)
        check_int("check_every_n_steps", check_every_n_steps, 1)
        check_int("patience", patience, 1)
        check_int("seed", seed, 0, maximum=2**63 - 1)  # a generator seed: 2**70 would overflow at the first check
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be None or a callable(pl_module, batch, batch_idx), got {loss_fn!r}")
        check_number("stability_threshold", stability_threshold, 0.0, optional=True)
        if per_group is not None:
            check_bool("per_group", per_group)
        # SharpnessEstimator validates iters, cold_iters, method and trace_probes with the same messages.
        self.estimator = SharpnessEstimator(iters=iters, cold_iters=cold_iters, method=method, per_group=per_group,
                                            trace_probes=trace_probes, seed=seed)  # fmt: skip
        self.check_every_n_steps, self.loss_fn, self.trace_probes = check_every_n_steps, loss_fn, trace_probes
        self.per_group_figures = False  # per-group keys: set at fit start (several groups, and per_group or distinct LRs)
        self.checks = Cadence(check_every_n_steps)
        self._builtin_rules: list[Rule] = [NonFinite(f"{self.family}/lambda_max")]
        if stability_threshold is not None:
            self._builtin_rules.append(Above(f"{self.family}/stability_ratio", stability_threshold, patience=patience))
        self._batch: tuple[Any, int] | None = None
        self._params: list[Tensor] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(loss_fn=getattr(self.loss_fn, "__qualname__", self.loss_fn))

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization and self.loss_fn is None:
            raise ValueError("SharpnessMonitor under manual optimization needs `loss_fn(pl_module, batch, batch_idx)`: "
                             "`training_step` steps the optimizers itself and cannot be recomputed")  # fmt: skip
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        if any(isinstance(p, DTensor) for p in self._params):
            self.warn_once("dtensor", "sharded (DTensor) parameters are not supported; sharpness is not measured")
            self._params = []
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        per_group = self.estimator.per_group
        self.per_group_figures = len(groups) > 1 and (per_group if per_group is not None
                                                      else len({id(lr) if isinstance(lr, Tensor) else lr
                                                                for lr in (g["lr"] for g in groups)}) > 1)  # fmt: skip
        self.layers = [g.get("name", f"group{i}") for i, g in enumerate(groups)] if self.per_group_figures else []

    def arm(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._batch = (batch, batch_idx)  # a reference: the step's own batch, already on the device

    def detach(self) -> None:
        self._batch = None

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, logging: bool
    ) -> Figures | None:
        batch, self._batch = self._batch, None
        if batch is None or not self._params:
            return None
        loss_fn = self.loss_fn or training_step_loss
        with torch.enable_grad(), TrainingStateGuard(pl_module) as guard:
            result = self.estimator.estimate(guard.wrap(lambda: loss_fn(pl_module, *batch)), self._params, optimizer,
                                             reduce=mean_over_ranks if trainer.world_size > 1 else None)  # fmt: skip
        if result.fallback_reason:
            self.warn_once("method", f"{_no_second_derivative(result.fallback_reason)} has no second derivative, so "
                           "the curvature is measured by finite differences of gradients instead (one extra backward "
                           "per Hessian-vector product; the figures mean the same)")  # fmt: skip
        for figure, why in result.notes.items():
            self.warn_once(f"note-{figure}", f"sharpness/{figure}: {why}")
        groups = sorted({k.split("/")[1] for k in result.figures if "/" in k})
        values = {k: v for k, v in result.figures.items() if "/" not in k}
        for name in ("lambda_max", "preconditioned_lambda_max", "stability_ratio"):
            if all(f"{name}/{g}" in result.figures for g in groups) and groups:
                values[f"{name}/{{layer}}"] = torch.stack([result.figures[f"{name}/{g}"] for g in groups])
        return Figures(values, groups)

    def extra_state(self) -> dict[str, Any]:
        return {"estimator": self.estimator.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "estimator" in state:
            self.estimator.load_state_dict(state["estimator"])


def _no_second_derivative(reason: str) -> str:
    """What in the model has no double backward, in a user's words, from PyTorch's error.

    Example:
        >>> _no_second_derivative("the derivative for '_scaled_dot_product_flash_attention' is not implemented")
        'flash attention (F.scaled_dot_product_attention)'
    """
    if "donated buffers" in reason or "compile" in reason:
        return "a torch.compile'd module"
    if "attention" in reason or "NotImplemented" in reason:
        return "flash attention (F.scaled_dot_product_attention)"
    return f"a layer of the model ({reason})"

