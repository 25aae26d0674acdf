"""Callbacks for the distributed harness: a minimal monitor built on ``_sharding`` alone.

:class:`ShardedProbe` is how the monitors are meant to call the helpers (and the proof that the
helpers give single-process figures under DDP, FSDP2 and HSDP):

- gradients: per-layer squared norms of the local shards, the weights' alongside, and the
  non-finite count, packed in one vector and summed with **one** all-reduce per step;
- a ZClip-like clip whose coefficient comes from the *global* norm, applied to the local shards
  (the same coefficient on every rank, or the runs drift apart within a step);
- spectral figures: row-sharded power iteration on the weights of equal global shape, inputs
  sampled in forward pre-hooks (rank-local rows), SA moments summed over ranks;
- the loss: the mean of the ranks' mean losses;
- a classifier-like head read whole between steps (``whole_tensor``, as NCTracker needs).

It logs from *every* rank (to check that all ranks agree), straight to the loggers. With
``naive=True`` it also logs ``naive/local_total`` (this rank's shards only) and
``naive/unmasked_total`` (summed over ranks without the replica mask): the two classic errors,
which the tests check that the harness does catch.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_diag.callbacks._sharding import (
    clean_name,
    is_row_sharded,
    local_grads,
    local_tensors,
    mean_over_ranks,
    resolve_parameters,
    sharding_of,
    sum_over_ranks,
    weight_rows,
    whole_tensor,
)
from lightning_diag.metrics.norms import grouped_squares, squared_norms
from lightning_diag.metrics.spectral import (
    alignment_moments,
    row_sharded_power_iteration,
    spectral_alignment,
    summary_from_moments,
)


class ShardedProbe(pl.Callback):
    """Logs ``probe/*`` figures every step from every rank (see the module docstring)."""

    def __init__(self, clip_to: float | None = None, spectral: bool = True, naive: bool = False) -> None:
        self.clip_to, self.spectral, self.naive = clip_to, spectral, naive
        self.inputs: dict[str, Tensor] = {}
        self.handles: list[Any] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Hooks may be registered before configure_model: FSDP2 keeps the module objects.
        for name, module in pl_module.named_modules():
            if isinstance(module, nn.Linear):
                self.handles.append(module.register_forward_pre_hook(self._hook(clean_name(name))))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            self.inputs[name] = args[0].detach()  # this rank's rows of the batch

        return hook

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model: the parameters the optimizer steps.
        self.groups = resolve_parameters(trainer, pl_module)
        self.sharding = sharding_of(trainer, self.groups.params, self.groups.names)
        self.layer_index = torch.tensor(self.groups.layer_of)
        self.linears = [(clean_name(n), m) for n, m in pl_module.named_modules() if isinstance(m, nn.Linear)]
        self.v1: dict[tuple[int, ...], Tensor] = {}

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.loss = mean_over_ranks(loss.detach().clone())

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        s, n = self.sharding, len(self.groups.layers)
        grads = local_grads(self.groups.params)
        grad_sq, weight_sq = squared_norms(grads), squared_norms(local_tensors(self.groups.params))
        packed = torch.cat([
            grouped_squares(s.keep_owned(grad_sq), self.layer_index, n),
            grouped_squares(s.keep_owned(weight_sq), self.layer_index, n),
            s.count_nonfinite(grad_sq).reshape(1),
        ])
        packed = s.all_reduce_sum(packed)  # the one collective for every gradient and weight figure
        layer_grad, layer_weight, nonfinite = packed[:n].sqrt(), packed[n : 2 * n].sqrt(), packed[-1]
        total = packed[:n].sum().sqrt()
        figures = {"probe/total": total, "probe/nonfinite": nonfinite, "probe/loss": self.loss}
        figures.update({f"probe/grad/{name}": v for name, v in zip(self.groups.layers, layer_grad)})
        figures.update({f"probe/weight/{name}": v for name, v in zip(self.groups.layers, layer_weight)})
        if self.naive:  # what goes wrong without the helpers: shard-local norms, replicas counted twice
            figures["naive/local_total"] = grad_sq.sum().sqrt()
            figures["naive/unmasked_total"] = s.all_reduce_sum(grad_sq.sum().reshape(1)).sqrt()[0]
        if self.clip_to is not None:
            coef = (self.clip_to / total.clamp_min(1e-12)).clamp(max=1.0)  # global norm: same on every rank
            torch._foreach_mul_([g for g in grads if g.numel()], coef)
            figures["probe/clip_coef"] = coef
        if self.spectral:
            figures.update(self._spectral())
            head = self.linears[-1][1].weight  # as NCTracker reads a classifier head between steps
            figures["probe/head_weight_sum"] = whole_tensor(head).sum()
        step = trainer.global_step
        host = {k: float(v) for k, v in figures.items()}
        for logger in trainer.loggers:
            logger.log_metrics(host, step=step)

    def _spectral(self) -> dict[str, Tensor]:
        figures: dict[str, Tensor] = {}
        params = {id(p): i for i, p in enumerate(self.groups.params)}
        by_shape: dict[tuple[int, ...], list[tuple[str, nn.Linear]]] = {}
        for name, module in self.linears:  # grouped by *global* shape: the same groups on every rank
            assert is_row_sharded(module.weight), name
            by_shape.setdefault(tuple(module.weight.shape), []).append((name, module))
        reduce = self.sharding.all_reduce_sum if self.sharding.reduces else None
        for shape, members in by_shape.items():
            rows = torch.stack([weight_rows(m.weight, self.sharding.owns(params[id(m.weight)])) for _, m in members])
            sigma, _, v = row_sharded_power_iteration(rows, self.v1.get(shape), iters=3, all_reduce_sum=reduce)
            self.v1[shape] = v
            sa = spectral_alignment(torch.stack([self.inputs[name] for name, _ in members]), v)
            summary = summary_from_moments(sum_over_ranks(alignment_moments(sa)))
            for j, (name, _) in enumerate(members):
                figures[f"probe/sigma1/{name}"] = sigma[j]
                figures[f"probe/collapse/{name}"] = summary.collapse[j]
                figures[f"probe/sa_std/{name}"] = summary.std[j]
        return figures


def sharded_probe(**kwargs: Any) -> list[pl.Callback]:
    return [ShardedProbe(**kwargs)]


# -- the package's monitors, for the single-process-equality tests -------------------------------


def grad_norm_watcher(**kwargs: Any) -> list[pl.Callback]:
    from lightning_diag import GradNormWatcher

    return [GradNormWatcher(**{"action": "log", "every_n_steps": 1, **kwargs})]


def loss_spike_detector(**kwargs: Any) -> list[pl.Callback]:
    from lightning_diag import LossSpikeDetector

    return [LossSpikeDetector(**{"action": "log", "every_n_steps": 1, **kwargs})]


def spectral_alignment_monitor(**kwargs: Any) -> list[pl.Callback]:
    from lightning_diag import SpectralAlignmentMonitor

    return [SpectralAlignmentMonitor(**{"action": "log", "every_n_steps": 1, "check_every_n_steps": 1, **kwargs})]


def logit_monitor(**kwargs: Any) -> list[pl.Callback]:
    """The output head's log Z and softmax figures (the harness has no attention)."""
    from lightning_diag import LogitMonitor

    return [LogitMonitor(**{"action": "log", "every_n_steps": 1, "check_every_n_steps": 1, **kwargs})]


def three_monitors(**kwargs: Any) -> list[pl.Callback]:
    """GradNormWatcher, LossSpikeDetector and SpectralAlignmentMonitor together: the run that crashed
    under FSDP2 before the sharding work (issue 13)."""
    return [*grad_norm_watcher(), *loss_spike_detector(), *spectral_alignment_monitor()]


def _classes(y: Tensor) -> Tensor:
    """Five classes from the harness's regression target ``sin(sum x)`` (so the features carry them)."""
    return torch.bucketize(y.reshape(-1), torch.tensor([-0.6, -0.2, 0.2, 0.6], device=y.device))


def nc_tracker(**kwargs: Any) -> list[pl.Callback]:
    """Three NCTrackers on the harness's ``net.6`` (``Linear(7, 5)``: 5 classes, rows 3 + 2 under
    FSDP2), one per way of taking features: a probe pass capturing the head's input (lagged NC4,
    every step), a probe through a ``feature_layer`` callable with exact NC4 (two passes), and the
    training forwards with the output of ``net.5`` (lagged NC4 from each forward's own weights).
    Run with ``limit_train_batches=2`` for two epochs, so that the training tracker has an NC4."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_diag import NCTracker

    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 4, generator=g)  # 6 batches of 4: 3 per rank under 2 processes
    probe = DataLoader(TensorDataset(x, _classes(x.sum(1).sin())), batch_size=4)
    common = {"classifier": "net.6", "action": "log", **kwargs}
    return [
        NCTracker(data=probe, probe_every_n_steps=1, **common),
        NCTracker(data=probe, feature_layer=lambda m, batch: m.net[:6](batch[0]), nc4="exact", prefix="exact",
                  **common),
        NCTracker(data="train", feature_layer="net.5", label_fn=lambda batch: _classes(batch[1]), prefix="train",
                  **common),
    ]
