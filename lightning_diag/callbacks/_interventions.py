"""The actions that change training, each written once: gate an optimizer's step, snapshot and roll
back, scale the learning rates. Used by :class:`~lightning_diag.LossSpikeDetector`; nothing here
runs unless the user asked for such an action."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["OptimizerGate", "Snapshot", "cpu_copy", "scale_learning_rates"]


def cpu_copy(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor copied to the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class Snapshot:
    """A good state to roll back to: the model and optimizer states after ``step`` steps (CPU copies),
    and whatever state the caller adds (a detector's statistics)."""

    step: int
    model: dict[str, Any]
    optimizers: list[dict[Any, Any]]
    extra: Any

    @classmethod
    def take(cls, trainer: pl.Trainer, extra: Any) -> Snapshot:
        return cls(trainer.global_step, cpu_copy(trainer.lightning_module.state_dict()),
                   [cpu_copy(opt.state_dict()["state"]) for opt in trainer.optimizers],
                   copy.deepcopy(extra))  # fmt: skip

    def restore(self, trainer: pl.Trainer) -> Any:
        """Load the model and optimizer states back; hyperparameters (the LR schedule) keep going."""
        trainer.lightning_module.load_state_dict(self.model)
        for optimizer, state in zip(trainer.optimizers, self.optimizers):
            groups = optimizer.state_dict()["param_groups"]
            optimizer.load_state_dict({"state": copy.deepcopy(state), "param_groups": groups})
        return copy.deepcopy(self.extra)


def scale_learning_rates(trainer: pl.Trainer, factor: float) -> None:
    """Multiply every LR by ``factor``: each group's ``lr`` and ``initial_lr`` and each scheduler's
    ``base_lrs`` (schedulers computing the LR from them keep the reduction; ``OneCycleLR`` and
    ``CyclicLR``, which set absolute LRs from other fields, overwrite it)."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if isinstance(group.get(key), Tensor):
                    group[key].mul_(factor)  # keep the tensor (capturable / compiled optimizers hold it)
                elif isinstance(group.get(key), (int, float)):
                    group[key] = group[key] * factor
    for config in trainer.lr_scheduler_configs:
        base_lrs = getattr(config.scheduler, "base_lrs", None)
        if isinstance(base_lrs, list):
            config.scheduler.base_lrs = [b * factor for b in base_lrs]


class OptimizerGate:
    """Wraps every optimizer's ``step`` so that ``skip()`` decides, after the closure, whether it runs.

    The closure Lightning passes (forward, backward, ``on_before_optimizer_step``) runs first, then
    ``skip()`` is asked; a skipped step returns the closure's result without calling the optimizer,
    so parameters, moments and step counts are untouched. Installed only while training runs and
    removed on teardown or exception; a wrapper someone put on top of ours is left in place (ours
    then passes through).
    """

    def __init__(self, skip: Callable[[], bool]) -> None:
        self.skip = skip
        self._wrapped: list[tuple[torch.optim.Optimizer, Callable[..., Any], bool, Any]] = []

    def install(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.remove()
        for optimizer in optimizers:
            if isinstance(optimizer, torch.optim.LBFGS):
                raise ValueError("`action='skip'` cannot gate LBFGS, which re-evaluates the closure inside step(); "
                                 "use 'rollback', 'stop' or 'raise'")  # fmt: skip
            inner, had_own = optimizer.step, "step" in vars(optimizer)

            @functools.wraps(inner)  # keeps the LR scheduler's `_wrapped_by_lr_sched` marker
            def gated(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
                return self._step(_inner, *args, **kwargs)

            optimizer.step = gated  # type: ignore[method-assign]
            self._wrapped.append((optimizer, gated, had_own, inner))

    def remove(self) -> None:
        for optimizer, gated, had_own, inner in reversed(self._wrapped):
            if vars(optimizer).get("step") is gated:
                if had_own:
                    optimizer.step = inner  # type: ignore[method-assign]
                else:
                    del optimizer.step
        self._wrapped = []

    @property
    def installed(self) -> bool:
        return bool(self._wrapped)

    def _step(self, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._wrapped:  # removed, but still in someone else's wrapper chain
            return inner(*args, **kwargs)
        closure = kwargs.get("closure", args[0] if args else None)
        result = None
        if closure is not None:
            result = closure()

            def replay() -> Any:
                return result

            if "closure" in kwargs:
                kwargs["closure"] = replay
            else:
                args = (replay, *args[1:])
        return result if self.skip() else inner(*args, **kwargs)
