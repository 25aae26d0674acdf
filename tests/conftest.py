"""Shared fixtures: a tiny LightningModule, an in-memory logger and a CPU trainer factory."""

from __future__ import annotations

import datetime
import itertools
import multiprocessing
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_diag.testbeds.recording import MemoryLogger as _SeriesLogger


class MemoryLogger(_SeriesLogger):
    """Records every ``log_metrics`` call: ``logger.history[key] == [(step, value), ...]``.

    The testbeds' logger (name, version, no hyperparameters) keeping, per key, the list of every
    ``(step, value)`` as logged, repeats and ``None`` steps included; its ``series`` stays empty.
    """

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.history[key].append((step, float(value)))

    def values(self, key: str) -> dict[int, float]:
        """``{step: value}`` of ``key`` (the last value where a step was logged twice)."""
        return dict(self.history[key])


class TinyModule(pl.LightningModule):
    """An MLP regressor on fixed random data; ``depth`` hidden Linear layers of width ``width``."""

    def __init__(self, depth: int = 2, width: int = 8, lr: float = 0.1, n: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(4, width), nn.Tanh()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.lr, self.batch_size = lr, batch_size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 4, generator=g)
        self.data = TensorDataset(x, x.sum(1, keepdim=True).sin())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)


class LoggedSoFar(Callback):
    """After the monitor: the steps of ``key`` logged so far, at the end of each step (``seen[step]``)."""

    def __init__(self, key: str) -> None:
        self.key, self.seen = key, {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen[trainer.global_step - 1] = sorted(trainer.logger.values(self.key))


def make_trainer(**overrides: Any) -> pl.Trainer:
    """A quiet CPU trainer; any Trainer argument can be overridden."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=10, logger=MemoryLogger(), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def fit(module: pl.LightningModule, *callbacks: Callback, **overrides: Any) -> pl.Trainer:
    """Fit ``module`` with ``callbacks`` on :func:`make_trainer` (with ``overrides``); return the trainer."""
    trainer = make_trainer(callbacks=list(callbacks), **overrides)
    trainer.fit(module)
    return trainer


def wrap_hooks(callback: Callback, around: Callable[[int, Callable[[], None]], None]) -> None:
    """Route every per-step hook of a monitor through ``around(step, call)``, ``step`` being the
    optimizer step the call belongs to (``on_train_batch_end`` runs after the step was counted)."""
    for name, offset in (("on_train_batch_start", 0), ("on_before_backward", 0), ("on_before_optimizer_step", 0),
                         ("on_train_batch_end", 1)):  # fmt: skip
        hook = getattr(callback, name)

        def wrapped(trainer: pl.Trainer, *args: Any, _hook: Any = hook, _offset: int = offset) -> None:
            around(trainer.global_step - _offset, lambda: _hook(trainer, *args))

        setattr(callback, name, wrapped)  # Lightning looks hooks up on the instance


def forbid_host_sync(callback: Callback, steps: set[int]) -> set[int]:
    """Run every per-step hook of ``callback`` under ``torch.cuda.set_sync_debug_mode("error")`` on
    ``steps`` (a host sync there raises); return the set, filled during the fit, of the steps checked."""
    checked: set[int] = set()

    def around(step: int, call: Callable[[], None]) -> None:
        if step not in steps:
            return call()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        checked.add(step)

    wrap_hooks(callback, around)
    return checked


class _ForkserverDDP(DDPStrategy):
    """DDP whose ranks own their module's tensors: those sent to forkserver ranks arrive in shared
    memory, so both ranks would step the same weights (Lightning unshares them for "spawn" only)."""

    def setup(self, trainer: pl.Trainer) -> None:
        with torch.no_grad():
            for tensor in itertools.chain(self.lightning_module.parameters(), self.lightning_module.buffers()):
                tensor.data = tensor.data.clone()
        super().setup(trainer)


def ddp_on_cpu(timeout_s: float = 60.0) -> DDPStrategy:
    """DDP over gloo for ``Trainer(accelerator="cpu", devices=2, ...)``, each rank with its own weights.

    forkserver: the ranks fork from a server that imported torch and Lightning once (spawn imports
    them in both ranks at once, ~3x slower on 2 cores), never from this process, whose OpenMP and
    logger threads make a plain fork unsafe; and a forked rank leaves by ``os._exit``, skipping the
    interpreter teardown where a gloo rank occasionally aborts.
    """
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "lightning.pytorch", "lightning_diag"])
    return _ForkserverDDP(start_method="forkserver", process_group_backend="gloo",
                          timeout=datetime.timedelta(seconds=timeout_s))


@pytest.fixture
def tiny_module() -> TinyModule:
    torch.manual_seed(0)
    return TinyModule()


from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402 (appended section)


class DispatchCounter(TorchDispatchMode):
    """Counts top-level ATen ops dispatched while active (ops nested inside one op are not seen).

    ``torch.profiler`` is not the tool for fusion checks: on the CPU a ``_foreach_*`` kernel records
    one inner op per tensor, while here it counts once. ``counter.ops`` maps op name -> count.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = defaultdict(int)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def dispatch_counter() -> type[DispatchCounter]:
    """The :class:`DispatchCounter` class: ``with dispatch_counter() as c: ...; c.total``."""
    return DispatchCounter


class MixtureClassifier(pl.LightningModule):
    """An MLP classifier on a Gaussian mixture: the fast neural-collapse fixture of DESIGN.md section 6.

    ``num_classes`` centres drawn from N(0, sep^2 I_dim), points = centre + N(0, I_dim); a training
    set of ``n_per_class`` and a validation set of ``n_val_per_class`` points per class (balanced,
    labels interleaved ``0, 1, ..., K-1, 0, 1, ...`` so every batch holds every class). ``body``
    (``depth`` blocks of Linear, optional BatchNorm1d, ReLU, optional Dropout) computes the
    features, ``head = nn.Linear(width, num_classes)`` the logits.
    SGD with momentum 0.9 and weight decay 5e-4. The data come from a private generator, so
    building the module does not touch the global RNG.
    """

    def __init__(
        self, num_classes: int = 4, dim: int = 8, width: int = 32, depth: int = 2, n_per_class: int = 32,
        n_val_per_class: int = 16, batch_size: int = 32, val_batch_size: int = 16, lr: float = 0.05,
        sep: float = 1.0, batchnorm: bool = True, dropout: float = 0.0, shuffle: bool = False, seed: int = 0,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(depth):
            blocks.append(nn.Linear(dim if i == 0 else width, width))
            blocks += [nn.BatchNorm1d(width)] if batchnorm else []
            blocks.append(nn.ReLU())
            blocks += [nn.Dropout(dropout)] if dropout else []
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)
        self.lr, self.batch_size, self.val_batch_size, self.shuffle = lr, batch_size, val_batch_size, shuffle
        g = torch.Generator().manual_seed(seed)
        centres = sep * torch.randn(num_classes, dim, generator=g)

        def sample(n: int) -> TensorDataset:
            y = torch.arange(num_classes).repeat(n)  # interleaved: every batch holds every class
            return TensorDataset(centres[y] + torch.randn(len(y), dim, generator=g), y)

        self.train_set, self.val_set = sample(n_per_class), sample(n_val_per_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.val_batch_size)


@pytest.fixture
def mixture_classifier() -> MixtureClassifier:
    torch.manual_seed(0)
    return MixtureClassifier()


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops on a loaded 2-core machine are far faster on one OpenMP thread than on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ScriptedLoss(pl.LightningModule):
    """Returns a given loss sequence, one value per optimizer step: a loss stream whose explosion
    step is known by construction. ``lr=0``, so the one weight never moves."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.scripted = torch.tensor(losses, dtype=torch.float32)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.weight.sum() + self.scripted[self.global_step]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.arange(len(self.scripted))), batch_size=1)


@pytest.fixture
def scripted_loss() -> type[ScriptedLoss]:
    """The :class:`ScriptedLoss` class: ``scripted_loss([2.0] * 50 + [9.0] * 50)``."""
    return ScriptedLoss


def reachable_tensors(obj: Any) -> dict[int, torch.Tensor]:
    """The tensors an object holds: reachable through its attributes, dicts, lists, tuples, sets
    and plain objects, by id. Modules, trainers and optimizers are not entered (their parameters
    are the model's, not the object's); a callback that leaks captured activations grows here."""
    found: dict[int, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found[id(item)] = item
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack += list(item)
        elif not isinstance(item, (nn.Module, pl.Trainer, torch.optim.Optimizer, type)) and hasattr(item, "__dict__"):
            stack += list(vars(item).values())
    return found


# -- DDP on CPU processes -------------------------------------------------------------------------


class RowSplit:
    """Mixin for DDP tests of a LightningModule with a ``data`` set of ``n`` rows: rank r of w reads
    rows r, r + w, r + 2w, ... in order (Lightning's own sampler would shuffle).

    Put it first among the bases: ``class RowSplitMLP(RowSplit, FixedBatchMLP)``.
    """

    def rank_batch_size(self) -> int:
        """Each rank's batch size: by default ``n / world_size``, so the ranks' batches of a step make
        up the single-process batch of ``n`` rows."""
        return self.n // self.trainer.world_size

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(self.data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(self.data, batch_size=self.rank_batch_size(), sampler=sampler)


# -- checkpoint state -----------------------------------------------------------------------------


def assert_same_state(a: Any, b: Any, *, rel: float, abs: float, where: str = "state") -> None:
    """Nested state equal: dicts (same keys), lists and tuples (same lengths) entry by entry; tensors
    by ``torch.testing.assert_close(rtol=rel, atol=abs, equal_nan=True)``; floats within ``rel``
    relative or ``abs`` absolute (NaN equals NaN); everything else exactly (``==``)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], rel=rel, abs=abs, where=f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, rel=rel, abs=abs, where=f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=rel, atol=abs, equal_nan=True, msg=where)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rel, abs=abs, nan_ok=True), where
    else:
        assert a == b, where
