"""The actions that change training, each written once: control an optimizer's step (skip it, or run
it at a scaled learning rate), snapshot and roll back. Used by :class:`~lightning_diag.LossSpikeDetector`;
nothing here runs unless the user asked for such an action."""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["Snapshot", "StepControl", "cpu_copy", "nonfinite_count", "scaled_learning_rates"]


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


def nonfinite_count(tensors: list[Tensor]) -> Tensor:
    """How many of ``tensors`` hold a NaN or inf entry, as a 0-d float device tensor (no host read).

    The 2-norm of each tensor, summed in float64 (one fused ``_foreach_norm``), is finite exactly when
    every entry is: float64 holds the square of any float32 value, so a huge finite gradient is not
    mistaken for an infinite one (a max-abs norm would do too, but has no fused kernel on the CPU and
    costs 5x more there). Sparse tensors are read through their stored values; empty tensors (a
    rank's empty shard) count as finite.

    Example:
        >>> nonfinite_count([torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])])
        tensor(2.)
    """
    dense = [t for t in tensors if t.layout == torch.strided and t.numel()]
    values = [t.coalesce().values() for t in tensors if t.layout != torch.strided]
    norms = list(torch._foreach_norm(dense, dtype=torch.float64)) if dense else []
    norms += [v.abs().amax().double() if v.numel() else v.new_zeros((), dtype=torch.float64) for v in values]
    if not norms:
        return torch.zeros((), device=tensors[0].device if tensors else None)
    return (~torch.stack(norms).isfinite()).sum(dtype=torch.float32)


@contextlib.contextmanager
def scaled_learning_rates(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Run the block with every learning rate of ``optimizer`` multiplied by ``factor``, then put the
    schedule's values back exactly.

    This is the one place a learning-rate scale is applied: around the optimizer's own ``step``.
    Schedulers (``LambdaLR``, ``SequentialLR``, ``ChainedScheduler``, ``OneCycleLR``,
    ``ReduceLROnPlateau``, ...) only ever see and set their own values, so none can undo the scale
    and the scale never compounds into them. A ``factor`` of exactly 1 touches nothing (the run
    stays bit-identical). An ``lr`` held as a tensor (capturable or compiled optimizers) is scaled
    in place and copied back.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        >>> with scaled_learning_rates(opt, 0.5):
        ...     inside = opt.param_groups[0]["lr"]
        >>> inside, opt.param_groups[0]["lr"]
        (0.05, 0.1)
    """
    if factor == 1.0:
        yield
        return
    saved = []
    for group in optimizer.param_groups:
        lr = group["lr"]
        saved.append(lr.clone() if isinstance(lr, Tensor) else lr)
        if isinstance(lr, Tensor):
            lr.mul_(factor)  # keep the tensor object: compiled and capturable optimizers hold it
        else:
            group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            if isinstance(lr, Tensor):
                group["lr"].copy_(lr)
            else:
                group["lr"] = lr


class StepControl:
    """Wraps every optimizer's ``step`` while training runs, for the actions that change a step.

    Lightning calls ``optimizer.step(closure)``; the closure (forward, backward, the monitors'
    ``on_before_optimizer_step``, gradient clipping) runs first, so every decision below is taken
    on the step's final gradients and before the update:

    - ``skip(optimizer)``: return True to skip the update: parameters, moments and step counts
      stay untouched (``global_step`` and schedulers advance, as for an fp16 overflow step);
    - ``lr_scale(optimizer)``: the step runs at the learning rates times this factor
      (:func:`scaled_learning_rates`; 1.0 changes nothing);
    - ``before(optimizer)`` and ``after(optimizer)``: called around an update that runs (a
      measurement of the update itself).

    Under fp16 a ``GradScaler`` calls ``step`` only for steps whose gradients are finite, so its
    own overflow skips never reach (or are counted by) this wrapper. Installed by :meth:`install`
    at train start and removed on teardown or exception; a wrapper someone put on top of ours is
    left in place (ours then passes through). Several controls chain: their scales multiply.
    """

    def __init__(
        self,
        *,
        skip: Callable[[torch.optim.Optimizer], bool] | None = None,
        lr_scale: Callable[[torch.optim.Optimizer], float] | None = None,
        before: Callable[[torch.optim.Optimizer], None] | None = None,
        after: Callable[[torch.optim.Optimizer], None] | None = None,
    ) -> None:
        self.skip, self.lr_scale, self.before, self.after = skip, lr_scale, before, after
        self._wrapped: list[tuple[torch.optim.Optimizer, Callable[..., Any], bool, Any]] = []

    def install(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.remove()
        for optimizer in optimizers:
            if isinstance(optimizer, torch.optim.LBFGS):
                raise ValueError("lightning_diag cannot skip or scale the steps of LBFGS, which re-evaluates the "
                                 "closure inside step(); use action 'stop' or 'raise' with it")  # fmt: skip
            inner, had_own = optimizer.step, "step" in vars(optimizer)

            @functools.wraps(inner)  # keeps the LR scheduler's `_wrapped_by_lr_sched` marker
            def controlled(*args: Any, _inner: Callable[..., Any] = inner, _opt: Any = optimizer, **kwargs: Any) -> Any:
                return self._step(_opt, _inner, *args, **kwargs)

            optimizer.step = controlled  # type: ignore[method-assign]
            self._wrapped.append((optimizer, controlled, had_own, inner))

    def remove(self) -> None:
        for optimizer, controlled, had_own, inner in reversed(self._wrapped):
            if vars(optimizer).get("step") is controlled:
                if had_own:
                    optimizer.step = inner  # type: ignore[method-assign]
                else:
                    del optimizer.step
        self._wrapped = []

    @property
    def installed(self) -> bool:
        return bool(self._wrapped)

    def _step(self, optimizer: torch.optim.Optimizer, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._wrapped:  # removed, but still in someone else's wrapper chain
            return inner(*args, **kwargs)
        closure = kwargs.get("closure", args[0] if args else None)
        result = None
        if closure is not None:  # run it now, so the decisions see this step's gradients
            result = closure()

            def replay() -> Any:
                return result

            if "closure" in kwargs:
                kwargs["closure"] = replay
            else:
                args = (replay, *args[1:])
        if self.skip is not None and self.skip(optimizer):
            return result
        if self.before is not None:
            self.before(optimizer)
        with scaled_learning_rates(optimizer, 1.0 if self.lr_scale is None else self.lr_scale(optimizer)):
            output = inner(*args, **kwargs)
        if self.after is not None:
            self.after(optimizer)
        return output
