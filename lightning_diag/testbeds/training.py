"""How every testbed trains: the learning-rate schedule, the optimizer, a poisoned batch, the CPU switch.

:class:`TestbedModule` is the shared base of the testbed ``LightningModule`` s. It reads its training
settings from the hyperparameters the subclass saved (any it did not save take the defaults in
:data:`TRAINING_DEFAULTS`), so each testbed keeps a flat, LightningCLI-friendly signature:

- ``optimizer``: ``"adamw"`` (with ``betas``, ``eps``) or ``"sgd"`` (with ``momentum``); ``weight_decay``.
- the schedule of :func:`lr_at_step`: ``lr``, ``lr_end``, ``ramp_steps``, ``warmup_steps``,
  ``shock_step``, ``shock_factor``.
- ``poison_step``: the optimizer step whose batch the subclass's :meth:`TestbedModule.poison` corrupts.

A subclass implements :meth:`TestbedModule.loss` and, if it can be poisoned, :meth:`TestbedModule.poison`.
The task loss of each step is logged as ``train_loss`` and kept, detached, as ``task_loss`` (what the
early-warning suite records; the returned loss may add a z-loss).
"""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["OPTIMIZERS", "TRAINING_DEFAULTS", "TestbedModule", "check_training_args", "flush_denormals", "lr_at_step"]

OPTIMIZERS = ("adamw", "sgd")
TRAINING_DEFAULTS: dict[str, Any] = {
    "optimizer": "sgd", "lr": 0.1, "lr_end": None, "ramp_steps": 2000, "warmup_steps": 0, "shock_step": None,
    "shock_factor": 1.0, "betas": (0.9, 0.999), "eps": 1e-8, "momentum": 0.0, "weight_decay": 0.0,
    "poison_step": None,
}  # fmt: skip


def flush_denormals(enabled: bool = True) -> bool:
    """Turn CPU flushing of denormal floats on or off; returns whether the CPU supports it.

    Once attention saturates at a high learning rate, denormals appear and a CPU run slows down
    about 10x (DESIGN.md section 7). Call this in CPU demos, benchmarks and fixtures, not at import:
    it changes process-wide float behaviour.

    Example:
        >>> supported = flush_denormals(True)
        >>> _ = flush_denormals(False)
    """
    return torch.set_flush_denormal(enabled)


def lr_at_step(
    step: int,
    lr: float,
    lr_end: float | None = None,
    ramp_steps: int = 2000,
    warmup_steps: int = 0,
    shock_step: int | None = None,
    shock_factor: float = 1.0,
) -> float:
    """Learning rate of optimizer step ``step`` (0-based) under the testbeds' schedule.

    Constant ``lr`` when ``lr_end`` is None; otherwise the exponential ramp of a learning-rate range
    test, ``lr * (lr_end / lr) ** (min(step, ramp_steps) / ramp_steps)``, held at ``lr_end`` after
    ``ramp_steps``. A linear warm-up, factor ``(step + 1) / warmup_steps`` for the first
    ``warmup_steps`` steps, multiplies either, and so does ``shock_factor`` from ``shock_step`` on
    (a sudden learning-rate shock).

    Example:
        >>> round(lr_at_step(1000, 1e-4, lr_end=1e-2, ramp_steps=2000), 12)
        0.001
        >>> lr_at_step(9, 0.1, shock_step=10, shock_factor=30.0), lr_at_step(10, 0.1, shock_step=10, shock_factor=30.0)
        (0.1, 3.0)
    """
    value = lr
    if lr_end is not None:
        value = lr * (lr_end / lr) ** (min(step, ramp_steps) / ramp_steps)
    if step < warmup_steps:
        value *= (step + 1) / warmup_steps
    if shock_step is not None and step >= shock_step:
        value *= shock_factor
    return value


def _lr_factor(step: int, **schedule: Any) -> float:
    """``LambdaLR`` multiplier: the scheduled learning rate over the base ``lr``."""
    return lr_at_step(step, **schedule) / schedule["lr"]


def check_training_args(
    *, optimizer: str, lr: float, lr_end: float | None, ramp_steps: int, warmup_steps: int,
    shock_step: int | None, shock_factor: float, poison_step: int | None = None,
) -> None:  # fmt: skip
    """``ValueError`` naming the first bad training setting and what is allowed.

    Example:
        >>> check_training_args(optimizer="adam", lr=0.1, lr_end=None, ramp_steps=10, warmup_steps=0,
        ...                     shock_step=None, shock_factor=1.0)
        Traceback (most recent call last):
        ...
        ValueError: `optimizer` must be one of ('adamw', 'sgd'), got 'adam'
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not lr > 0 or (lr_end is not None and not lr_end > 0):
        raise ValueError(f"`lr` and `lr_end` must be positive, got lr={lr!r}, lr_end={lr_end!r}")
    if not isinstance(ramp_steps, int) or ramp_steps < 1:
        raise ValueError(f"`ramp_steps` must be a positive int, got {ramp_steps!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"`warmup_steps` must be a non-negative int, got {warmup_steps!r}")
    for name, value in (("shock_step", shock_step), ("poison_step", poison_step)):
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ValueError(f"`{name}` must be None or a non-negative int, got {value!r}")
    if not shock_factor > 0:
        raise ValueError(f"`shock_factor` must be positive, got {shock_factor!r}")


class TestbedModule(pl.LightningModule):
    """Base of the testbeds: optimizer and schedule from the hyperparameters, poisoned batch, loss logging.

    Subclasses call ``save_hyperparameters`` with the settings listed in the module docstring and
    implement :meth:`loss`; a testbed that supports ``poison_step`` implements :meth:`poison`.
    """

    __test__ = False  # not a pytest test class, whatever its name says
    task_loss: Tensor | None = None

    def _setting(self, name: str) -> Any:
        return self.hparams.get(name, TRAINING_DEFAULTS[name])

    def loss(self, batch: Any) -> tuple[Tensor, Tensor]:
        """``(task loss, loss to minimise)`` of a batch; the two differ by regularisers such as a z-loss."""
        raise NotImplementedError

    def poison(self, batch: Any) -> Any:
        """The corrupted version of ``batch`` trained on at ``poison_step``."""
        raise NotImplementedError(f"{type(self).__name__} has no poisoned batch")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self._setting("poison_step") is not None and self.global_step == self._setting("poison_step"):
            batch = self.poison(batch)
        task, total = self.loss(batch)
        self.task_loss = task.detach()
        self.log("train_loss", task, on_step=True, on_epoch=False, batch_size=len(batch[-1]))
        return total

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups; by default every trainable parameter with ``weight_decay``."""
        return [{"params": [p for p in self.parameters() if p.requires_grad],
                 "weight_decay": self._setting("weight_decay")}]

    def configure_optimizers(self) -> dict[str, Any]:
        lr = self._setting("lr")
        if self._setting("optimizer") == "adamw":
            betas = tuple(self._setting("betas"))
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(self.parameter_groups(), lr=lr, betas=betas,
                                                                 eps=self._setting("eps"))  # fmt: skip
        else:
            optimizer = torch.optim.SGD(self.parameter_groups(), lr=lr, momentum=self._setting("momentum"))
        names = ("lr", "lr_end", "ramp_steps", "warmup_steps", "shock_step", "shock_factor")
        factor = functools.partial(_lr_factor, **{name: self._setting(name) for name in names})
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
