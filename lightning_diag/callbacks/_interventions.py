"""The actions that change training, each written once: control an optimizer's step (skip it, or run
it at a scaled learning rate), snapshot healthy states and roll back to them, and tell whether the run
is healthy now (for snapshots and :class:`~lightning_diag.HealthyCheckpoint`). Used by
:class:`~lightning_diag.LossSpikeDetector`; nothing here runs unless the user asked for such an action."""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lightning_diag.alerts import Alert
from lightning_diag.callbacks._sharding import local_tensor
from lightning_diag.metrics.norms import tensor_norms

__all__ = ["Snapshot", "Snapshots", "StepControl", "cpu_copy", "nonfinite_count", "nonfinite_weights",
           "scaled_learning_rates", "serious_alert"]


def _host_copy(t: Tensor) -> Tensor:
    """A host copy of this rank's part of ``t`` (its local shard under FSDP2): from a GPU into pinned
    memory with ``non_blocking`` (the copy is ordered before any later in-place change of ``t`` on the
    same stream; :meth:`Snapshot.wait` waits for it before the host reads it)."""
    t = local_tensor(t).detach()
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)
    return t.to("cpu", copy=True)


def cpu_copy(obj: Any) -> Any:
    """A deep copy of a (nested) state dict with every tensor copied to the host (this rank's shard of a
    ``DTensor``; pinned and non-blocking from a GPU)."""
    if isinstance(obj, Tensor):
        return _host_copy(obj)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _put_back(live: Any, saved: Any, like: Tensor, on_device: bool) -> Any:
    """``saved`` restored into ``live``: in place where ``live`` is a tensor of its (local) shape, which
    keeps the tensor objects that compiled and capturable optimizers hold; else a new tensor beside
    ``like`` (the parameter; a ``DTensor`` of its placements for a sharded one). A 0-d state (Adam's
    ``step``) stays on the host unless ``on_device`` (fused or capturable optimizers)."""
    if not isinstance(saved, Tensor):
        return copy.deepcopy(saved)
    if isinstance(live, Tensor) and local_tensor(live).shape == saved.shape:
        local_tensor(live).copy_(saved, non_blocking=True)
        return live
    if saved.dim() == 0 and not on_device:
        return saved.clone()
    value = saved.to(local_tensor(like).device, copy=True)
    if isinstance(like, DTensor):
        return DTensor.from_local(value, like.device_mesh, like.placements, run_check=False)
    return value


@dataclass
class Snapshot:
    """A healthy state to roll back to, taken after ``step`` optimizer steps: the model (parameters and
    buffers), every optimizer's state and hyperparameters, and every LR scheduler's state, as host
    copies of this rank's tensors (its shards under FSDP2), or in a file at ``path``.

    ``nbytes`` is its size in host memory (or on disk): about the model's size plus the optimizer
    state's (AdamW in float32: 12 bytes per parameter).
    """

    step: int
    state: dict[str, Any] | None
    nbytes: int
    path: str | None = None
    _event: Any = None

    @classmethod
    def take(cls, trainer: pl.Trainer, path: str | None = None) -> Snapshot:
        state = {
            "model": cpu_copy({k: v for k, v in trainer.lightning_module.state_dict().items() if isinstance(v, Tensor)}),
            "optimizers": [cpu_copy(opt.state_dict()) for opt in trainer.optimizers],
            "schedulers": [copy.deepcopy(config.scheduler.state_dict()) for config in trainer.lr_scheduler_configs],
        }
        event = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            event = torch.cuda.Event()
            event.record()
        snapshot = cls(trainer.global_step, state, _nbytes(state), path, event)
        if path is not None:  # the file holds it; the host keeps nothing
            snapshot.wait()
            torch.save(state, path)
            snapshot.state = None
        return snapshot

    def wait(self) -> None:
        """Wait for the non-blocking device-to-host copies (a GPU only)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None

    def restore(self, trainer: pl.Trainer) -> None:
        """Put the model, optimizer and scheduler states back, exactly (bit for bit)."""
        self.wait()
        state = self.state if self.state is not None else torch.load(self.path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            live = trainer.lightning_module.state_dict(keep_vars=True)
            for name, saved in state["model"].items():
                local_tensor(live[name]).detach().copy_(saved, non_blocking=True)
            for optimizer, saved in zip(trainer.optimizers, state["optimizers"]):
                params = [p for group in optimizer.param_groups for p in group["params"]]
                owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
                for index, p in enumerate(params):
                    if index not in saved["state"]:
                        optimizer.state.pop(p, None)  # no state yet at the snapshot (before its first step)
                        continue
                    on_device = bool(owner[id(p)].get("fused") or owner[id(p)].get("capturable"))
                    entry = optimizer.state[p]
                    for key, value in saved["state"][index].items():
                        entry[key] = _put_back(entry.get(key), value, p, on_device)
                for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
                    for key, value in saved_group.items():
                        if key != "params":
                            group[key] = _put_back(group.get(key), value, torch.empty(0), True)
        for config, saved in zip(trainer.lr_scheduler_configs, state["schedulers"]):
            config.scheduler.load_state_dict(copy.deepcopy(saved))

    def discard(self) -> None:
        """Free the copies (delete the file)."""
        self.state = None
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)


class Snapshots:
    """The last few healthy snapshots, at growing distances (the Tower of Hanoi rotation of backups).

    Snapshot ``n`` (0 at train start) fills slot ``min(trailing zeros of n, keep - 1)`` (slot
    ``keep - 1`` for ``n = 0``), replacing what was there: with snapshots every ``E`` steps the held
    ones are ``0``, ``E``, ``2-3 E``, ``4-7 E``, ... steps old, so a slow rise that spoils the newest
    still leaves older healthy ones, at a memory cost of ``keep`` snapshots (:attr:`nbytes`).
    A snapshot rolled back to is used once (:meth:`pop_newest`): a second rollback before the next
    snapshot goes further back.

    Example:
        >>> held = Snapshots(keep=3)
        >>> held.slot(0), [held.slot(n) for n in range(1, 9)]
        (2, [0, 1, 0, 2, 0, 1, 0, 2])
    """

    def __init__(self, keep: int = 3, directory: str | None = None) -> None:
        self.keep, self.directory = keep, directory
        self.held: dict[int, tuple[int, Snapshot]] = {}  # slot -> (number, snapshot)
        self.taken = 0

    def slot(self, n: int) -> int:
        return self.keep - 1 if n == 0 else min((n & -n).bit_length() - 1, self.keep - 1)

    def add(self, trainer: pl.Trainer) -> Snapshot:
        n, self.taken = self.taken, self.taken + 1
        path = None
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"loss_spike-rank{trainer.global_rank}-{n}.pt")
        slot = self.slot(n)
        if slot in self.held:
            self.held.pop(slot)[1].discard()
        snapshot = Snapshot.take(trainer, path)
        self.held[slot] = (n, snapshot)
        return snapshot

    def newest(self) -> Snapshot | None:
        return max(self.held.values(), key=lambda item: item[0])[1] if self.held else None

    def pop_newest(self) -> None:
        """Drop the newest snapshot once it was rolled back to (the oldest one is always kept)."""
        if len(self.held) > 1:
            slot = max(self.held, key=lambda s: self.held[s][0])
            self.held.pop(slot)[1].discard()

    @property
    def steps(self) -> list[int]:
        """The steps of the held snapshots, oldest first."""
        return sorted(snapshot.step for _, snapshot in self.held.values())

    @property
    def nbytes(self) -> int:
        """Host memory (or disk) the held snapshots take."""
        return sum(snapshot.nbytes for _, snapshot in self.held.values())

    def clear(self) -> None:
        for _, snapshot in self.held.values():
            snapshot.discard()
        self.held = {}


SERIOUS = ("warning", "critical")


def nonfinite_weights(trainer: pl.Trainer) -> bool:
    """Whether any parameter holds a NaN or inf, on any rank: one fused max-abs norm over this rank's
    (local) parameters, one all-reduce under several ranks, one host read."""
    params = [local_tensor(p.detach()) for p in trainer.lightning_module.parameters()]
    bad = nonfinite_count(params)
    if trainer.world_size > 1:
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
    return bool(bad > 0)


def serious_alert(trainer: pl.Trainer, quiet_steps: int) -> Alert | str | None:
    """What makes the run unhealthy right now by its monitors' account, or None: a ``warning`` or
    ``critical`` alert of a lightning_diag monitor in the last ``quiet_steps`` optimizer steps, or a
    rule of such severity in firing state. Alerts and rules are global, so every rank answers alike."""
    from lightning_diag.callbacks._base import diagnostic_callbacks  # _base imports nothing from here

    now = trainer.global_step - 1  # the last step that ran
    for monitor in diagnostic_callbacks(trainer):
        for alert in reversed(monitor.alerts):
            if alert.severity in SERIOUS and now - alert.step < quiet_steps:
                return alert
        for rule in monitor.book.rules:
            if rule.severity in SERIOUS and rule.active.any():
                return f"{monitor.source}: the rule on {rule.metric} is in firing state"
    return None


def nonfinite_count(tensors: list[Tensor]) -> Tensor:
    """How many of ``tensors`` hold a NaN or inf entry, as a 0-d float device tensor (no host read).

    A tensor's 2-norm summed in float64 (:func:`~lightning_diag.metrics.norms.tensor_norms`, one
    fused ``_foreach_norm``) is finite exactly when every entry is: float64 holds the square of any
    float32 value, so a huge finite gradient is not taken for an infinite one. An empty tensor (a
    rank's empty shard) counts as finite.

    Example:
        >>> nonfinite_count([torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf")])])
        tensor(2.)
    """
    if not tensors:
        return torch.zeros(())
    return (~tensor_norms(tensors).isfinite()).sum(dtype=torch.float32)


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

            controlled._step_control = (self, inner, had_own)  # type: ignore[attr-defined]
            optimizer.step = controlled  # type: ignore[method-assign]
            self._wrapped.append((optimizer, controlled, had_own, inner))

    def remove(self) -> None:
        wrapped, self._wrapped = self._wrapped, []
        for optimizer, controlled, had_own, inner in reversed(wrapped):
            if vars(optimizer).get("step") is not controlled:
                continue  # someone wrapped ours: it passes through now, and goes when the one on top does
            while hasattr(inner, "_step_control") and not inner._step_control[0].installed:
                _, inner, had_own = inner._step_control  # a control removed earlier, under ours: drop it too
            if had_own:
                optimizer.step = inner  # type: ignore[method-assign]
            else:
                del optimizer.step

    @property
    def installed(self) -> bool:
        return bool(self._wrapped)

    def _step(self, optimizer: torch.optim.Optimizer, inner: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._wrapped:  # removed, but still in someone else's wrapper chain
            return inner(*args, **kwargs)
        closure = kwargs.get("closure", args[0] if args else None)
        result = None
        if closure is not None:  # run it now, so the decisions see this step's gradients
            result, calls = closure(), [0]

            def replay() -> Any:  # the first call is the one already run; an optimizer that evaluates
                calls[0] += 1  # its closure again (SAM, line searches) gets fresh evaluations
                return result if calls[0] == 1 else closure()

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
