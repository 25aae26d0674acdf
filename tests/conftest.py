"""Shared fixtures: a tiny LightningModule, an in-memory logger and a CPU trainer factory."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class MemoryLogger(Logger):
    """Records every ``log_metrics`` call: ``logger.history[key] == [(step, value), ...]``."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.history[key].append((step, float(value)))


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


def make_trainer(**overrides: Any) -> pl.Trainer:
    """A quiet CPU trainer; any Trainer argument can be overridden."""
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_steps=10, logger=MemoryLogger(), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


@pytest.fixture
def tiny_module() -> TinyModule:
    torch.manual_seed(0)
    return TinyModule()
