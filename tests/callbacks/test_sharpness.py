"""SharpnessMonitor inside real Lightning runs, against dense float64 Hessians.

References are taken *outside* the monitor: in a callback placed after it in ``callbacks=[...]``
(Lightning keeps that order), in ``on_before_optimizer_step``, where the gradients are complete
and the weights have not moved yet. The reference Hessian is ``torch.autograd.functional.hessian``
of the loss as a function of one flat float64 parameter vector, its top eigenvalue from
``torch.linalg.eigvalsh``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LoggedSoFar, MemoryLogger, RowSplit, ddp_on_cpu, fit, forbid_host_sync, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import SharpnessMonitor
from lightning_diag.alerts import DiagnosticWarning

# -- models ---------------------------------------------------------------------------------------


class FixedBatchMLP(pl.LightningModule):
    """A 3 -> 5 -> 1 tanh MLP regressor on one fixed batch of ``n`` rows (one batch per epoch, no
    shuffling), so every step sees the same batch; 26 parameters, a dense Hessian is cheap."""

    def __init__(self, optimizer: str = "sgd", lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 n: int = 16, width: int = 5, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = self.build(width)
        with torch.no_grad():  # a private generator: the same weights whatever the global RNG did
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        x = torch.randn(n, 3, generator=g)
        self.data = TensorDataset(x, x.sum(1, keepdim=True).sin())
        self.optimizer, self.lr, self.momentum, self.dampening, self.n = optimizer, lr, momentum, dampening, n

    def build(self, width: int) -> nn.Module:
        return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, dampening=self.dampening)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.n, shuffle=False)


def _mse_of(module: nn.Module) -> Callable[[dict[str, Tensor], Any], Tensor]:
    def loss(params: dict[str, Tensor], batch: Any) -> Tensor:
        x, y = batch
        return F.mse_loss(functional_call(module, params, (x.double(),)), y.double())

    return loss


def dense_hessian(module: nn.Module, loss: Callable[[dict[str, Tensor], Any], Tensor], batch: Any) -> Tensor:
    """The float64 Hessian of ``loss(params, batch)`` in one flat vector over the trainable
    parameters of ``module`` (in ``named_parameters`` order)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().double().reshape(-1) for _, p in named])

    def of_flat(theta: Tensor) -> Tensor:
        parts = theta.split([p.numel() for _, p in named])
        return loss({n: part.view(p.shape) for (n, p), part in zip(named, parts)}, batch)

    with sdpa_kernel(SDPBackend.MATH):  # the one attention kernel with a double backward on the CPU
        return torch.autograd.functional.hessian(of_flat, flat)


def adam_inverse_preconditioner(optimizer: torch.optim.Adam, params: list[Tensor]) -> Tensor:
    """Flat float64 ``P^-1`` of the step Adam is about to take (PyTorch's Adam, written out):
    ``v = beta2 v + (1 - beta2) g^2``, ``t = t + 1``, step ``lr / (1 - beta1^t) * m / (sqrt(v / (1 -
    beta2^t)) + eps)``, so ``P^-1 = lr / ((1 - beta1^t) (sqrt(v / (1 - beta2^t)) + eps))``."""
    [group] = optimizer.param_groups
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    parts = []
    for p in params:
        state = optimizer.state.get(p, {})
        v = state["exp_avg_sq"].double() if "exp_avg_sq" in state else torch.zeros_like(p, dtype=torch.float64)
        t = float(state["step"]) + 1 if "step" in state else 1.0
        v = beta2 * v + (1 - beta2) * p.grad.double() ** 2
        parts.append((lr / ((1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + eps))).reshape(-1))
    return torch.cat(parts)


class DenseReference(Callback):
    """After the monitor, in ``on_before_optimizer_step``: the dense Hessian of the step's batch at
    the step's weights; its top eigenvalue in ``top[step]``, and for Adam the top eigenvalue of
    ``P^-1/2 H P^-1/2`` in ``preconditioned[step]``."""

    def __init__(self, loss: Callable[[nn.Module], Callable[[dict[str, Tensor], Any], Tensor]] = _mse_of,
                 scale: float = 1.0) -> None:
        self.loss, self.scale = loss, scale
        self.top: dict[int, float] = {}
        self.preconditioned: dict[int, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.batch = batch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        h = self.scale * dense_hessian(pl_module.net, self.loss(pl_module.net), self.batch)
        step = trainer.global_step
        self.top[step] = float(torch.linalg.eigvalsh(h)[-1])
        if isinstance(optimizer, torch.optim.Adam):
            d = adam_inverse_preconditioner(optimizer, list(pl_module.net.parameters())).sqrt()
            self.preconditioned[step] = float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])




# -- lambda_max and the stability ratio against the dense Hessian ---------------------------------


def test_lambda_max_equals_the_top_eigenvalue_of_the_dense_hessian_at_every_check() -> None:
    monitor, reference = SharpnessMonitor(check_every_n_steps=2, action="log"), DenseReference()
    trainer = fit(FixedBatchMLP(lr=1e-3), monitor, reference, max_steps=6)
    logged = trainer.logger.values("sharpness/lambda_max")
    assert sorted(logged) == [1, 3, 5]  # the check steps, each logged at its own step
    for step, value in logged.items():
        # a cold start (20 products) at step 1, then warm starts with the default 4 products; a
        # 26-parameter Hessian leaves Lanczos little to miss, hence 0.1% rather than a few percent
        assert value == pytest.approx(reference.top[step], rel=1e-3), step
    assert reference.top[1] > 0.05  # a real curvature, not a vanishing one compared to a tolerance


@pytest.mark.parametrize(("momentum", "dampening", "limit"), [(0.0, 0.0, 2.0), (0.9, 0.0, 3.8), (0.5, 0.5, 6.0)])
def test_stability_ratio_of_sgd_is_lr_times_lambda_max_over_the_heavy_ball_limit(momentum: float, dampening: float,
                                                                                 limit: float) -> None:
    lr = 1e-3
    monitor, reference = SharpnessMonitor(check_every_n_steps=2, action="log"), DenseReference()
    trainer = fit(FixedBatchMLP(lr=lr, momentum=momentum, dampening=dampening), monitor, reference, max_steps=4)
    ratio = trainer.logger.values("sharpness/stability_ratio")
    assert sorted(ratio) == [1, 3]
    for step, value in ratio.items():
        # limit: 2 (Gilmer et al. 2021), (2 + 2 beta) / (1 - dampening) with heavy-ball momentum
        assert value == pytest.approx(lr * reference.top[step] / limit, rel=1e-3), step
        assert trainer.logger.values("sharpness/preconditioned_lambda_max")[step] == pytest.approx(
            lr * reference.top[step], rel=1e-3)


def test_adam_preconditioned_sharpness_equals_the_dense_preconditioned_hessian() -> None:
    # Adam's P^-1 differs per coordinate, so the monitor iterates on P^-1/2 H P^-1/2 itself
    lr, beta1 = 1e-3, 0.9
    monitor = SharpnessMonitor(check_every_n_steps=2, action="log")
    reference = DenseReference()
    trainer = fit(FixedBatchMLP(optimizer="adam", lr=lr), monitor, reference, max_steps=6)
    pre = trainer.logger.values("sharpness/preconditioned_lambda_max")
    ratio = trainer.logger.values("sharpness/stability_ratio")
    assert sorted(pre) == sorted(ratio) == [1, 3, 5]
    limit = (2 + 2 * beta1) / (1 - beta1)  # 38: Cohen et al. 2022
    for step in pre:
        assert pre[step] == pytest.approx(reference.preconditioned[step], rel=1e-3), step
        assert ratio[step] == pytest.approx(reference.preconditioned[step] / limit, rel=1e-3), step
        assert trainer.logger.values("sharpness/lambda_max")[step] == pytest.approx(reference.top[step], rel=1e-3)
    # not the SGD figure in disguise: the preconditioner is far from lr * I
    assert abs(reference.preconditioned[5] / (lr * reference.top[5]) - 1) > 0.5


# -- cadence and resume ---------------------------------------------------------------------------


def test_a_check_between_logging_steps_is_logged_at_the_next_logging_step() -> None:
    # checks at 2, 5, 8, 11 (every 3), logging steps 4 and 9 (every 5) and the end: each logging step logs
    # the latest check since the one before, at the check's own step, with that check's figures
    monitor, reference = SharpnessMonitor(check_every_n_steps=3, action="log"), DenseReference()
    so_far = LoggedSoFar("sharpness/lambda_max")
    trainer = fit(FixedBatchMLP(lr=1e-3), monitor, reference, so_far, max_steps=12, log_every_n_steps=5)
    assert so_far.seen[3] == [] and so_far.seen[4] == [2] and so_far.seen[8] == [2] and so_far.seen[9] == [2, 8]
    logged = trainer.logger.values("sharpness/lambda_max")
    assert sorted(logged) == [2, 8, 11]  # 11: the last check, flushed at the end
    for step, value in logged.items():
        assert value == pytest.approx(reference.top[step], rel=1e-3), step
    assert sorted(trainer.logger.values("sharpness/stability_ratio")) == [2, 8, 11]


def test_a_resumed_run_measures_what_the_uninterrupted_run_measures(tmp_path: Path) -> None:
    # Two products per check: each check moves the vector closer to the top eigenvector, so a run that
    # restarted from a cold vector after the resume would log other (lower) figures than the whole run.
    arguments = {"check_every_n_steps": 2, "iters": 2, "cold_iters": 2, "action": "log"}
    whole = fit(FixedBatchMLP(lr=1e-2, width=8), SharpnessMonitor(**arguments), max_steps=8).logger
    first = fit(FixedBatchMLP(lr=1e-2, width=8), SharpnessMonitor(**arguments), max_steps=4)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed = make_trainer(callbacks=[SharpnessMonitor(**arguments)], max_steps=8)
    resumed.fit(FixedBatchMLP(lr=1e-2, width=8), ckpt_path=tmp_path / "half.ckpt")
    for key in ("sharpness/lambda_max", "sharpness/stability_ratio"):
        logged = resumed.logger.values(key)
        assert sorted(logged) == [5, 7], key
        for step, value in logged.items():
            assert value == pytest.approx(whole.values(key)[step], rel=1e-5), (key, step)


# -- what double backward cannot do ---------------------------------------------------------------


class EmbeddingClassifier(FixedBatchMLP):
    """Tokens -> ``nn.Embedding(6, 3, sparse=sparse)`` -> tanh -> ``nn.Linear(3, 2)``, cross-entropy on one fixed
    batch (token 5 never appears: its rows of the Hessian are 0); SGD, which takes sparse gradients."""

    def __init__(self, sparse: bool) -> None:
        super().__init__(lr=0.1)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Embedding(6, 3, sparse=sparse), nn.Tanh(), nn.Linear(3, 2))
        tokens = torch.tensor([0, 1, 2, 3, 4, 1, 2, 0])
        self.data, self.n = TensorDataset(tokens, tokens % 2), 8

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def _cross_entropy_of(module: nn.Module) -> Callable[[dict[str, Tensor], Any], Tensor]:
    """The loss of a dense twin of ``module`` (``sparse=False``: the reference needs no sparse gradient)."""
    dense = copy.deepcopy(module)
    dense[0].sparse = False

    def loss(params: dict[str, Tensor], batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(functional_call(dense, params, (x,)), y)

    return loss


def test_sparse_embedding_gradients_are_measured_against_the_dense_hessian() -> None:
    model, reference = EmbeddingClassifier(sparse=True), DenseReference(_cross_entropy_of)
    x, y = model.data.tensors
    F.cross_entropy(model.net(x), y).backward()
    assert model.net[0].weight.grad.is_sparse  # the premise: autograd gives a sparse gradient
    model.zero_grad(set_to_none=True)
    trainer = fit(model, SharpnessMonitor(check_every_n_steps=2, cold_iters=30, action="log"), reference, max_steps=4)
    logged = trainer.logger.values("sharpness/lambda_max")
    assert sorted(logged) == [1, 3]
    for step, value in logged.items():
        assert value == pytest.approx(reference.top[step], rel=1e-3), step


class CompiledMLP(FixedBatchMLP):
    """The MLP run through ``torch.compile(net, backend="aot_eager")``, whose backward donates its
    saved tensors: no double backward. ``net`` (the same parameters) stays for the dense reference."""

    def __init__(self) -> None:
        super().__init__(lr=1e-3)
        try:
            self.compiled = torch.compile(self.net, backend="aot_eager")
            torch.compile(nn.Linear(2, 2), backend="aot_eager")(torch.ones(1, 2))
        except Exception as error:  # noqa: BLE001 - a torch build or platform without torch.compile
            pytest.skip(f"torch.compile is not available here: {error}")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.compiled(x), y)


def test_a_compiled_submodule_falls_back_to_finite_differences_and_says_so_once() -> None:
    torch._dynamo.reset()
    model, reference = CompiledMLP(), DenseReference()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(model, SharpnessMonitor(check_every_n_steps=2, action="log"), reference, max_steps=6)
    said = [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning)]
    assert len(said) == 1, said  # once, not at every check
    assert "finite differences" in said[0] and "torch.compile'd module has no second derivative" in said[0]
    logged = trainer.logger.values("sharpness/lambda_max")
    assert sorted(logged) == [1, 3, 5]
    for step, value in logged.items():  # forward differences in float32: ~1e-3 relative error
        assert value == pytest.approx(reference.top[step], rel=0.01), step


# -- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "allowed"), [
    ({"seed": 2**70}, "<= 9223372036854775807"), ({"seed": -1}, ">= 0"), ({"per_group": "yes"}, "True or False"),
    ({"stability_threshold": math.nan}, "> 0"), ({"stability_threshold": -1.0}, "> 0"),
])  # fmt: skip
def test_bad_arguments_are_refused_naming_the_value_and_what_is_allowed(bad: dict[str, Any], allowed: str) -> None:
    [(name, value)] = bad.items()
    with pytest.raises(ValueError, match=f"`{name}`") as error:
        SharpnessMonitor(**bad)
    assert allowed in str(error.value) and repr(value) in str(error.value)


# -- no change to training, nothing logged twice --------------------------------------------------


class NoisyMLP(FixedBatchMLP):
    """BatchNorm (running statistics) and Dropout (global RNG) between the layers; SGD with momentum."""

    def build(self, width: int) -> nn.Module:
        return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 1))


def _train_state(monitor: SharpnessMonitor | None) -> tuple[dict[str, Tensor], Tensor, MemoryLogger]:
    torch.manual_seed(0)
    module = NoisyMLP(lr=0.05, momentum=0.9)
    trainer = fit(module, *([monitor] if monitor else []), max_steps=6)
    return {k: v.clone() for k, v in module.state_dict().items()}, torch.get_rng_state(), trainer.logger


def test_training_is_bit_identical_with_and_without_the_monitor() -> None:
    monitor = SharpnessMonitor(check_every_n_steps=2, action="log")
    with_monitor, rng_with, logger = _train_state(monitor)
    without, rng_without, _ = _train_state(None)
    assert sorted(logger.values("sharpness/lambda_max")) == [1, 3, 5]  # the monitor did run
    assert sorted(with_monitor) == sorted(without)
    assert "net.1.running_var" in without and "net.1.num_batches_tracked" in without
    for name, tensor in without.items():
        assert torch.equal(with_monitor[name], tensor), name  # weights, momentum-driven, and BN buffers
    assert torch.equal(rng_with, rng_without)  # the global RNG is where training left it


class LoggingMLP(FixedBatchMLP):
    """Logs from ``training_step`` with ``self.log`` and ``self.log_dict`` (which calls ``self.log``
    per item); ``logged`` records ``(hook, key)`` of every ``self.log`` call, ``calls`` counts
    ``training_step`` calls (in a list changed in place: a recomputation puts re-assigned
    attributes back, so ``self.calls += 1`` would not show it)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._calls, self.logged = [0], []

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        self.logged.append((self._current_fx_name, name))
        super().log(name, value, *args, **kwargs)

    @property
    def calls(self) -> int:
        return self._calls[0]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._calls[0] += 1
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        self.log("train/rows", float(len(batch[0])), on_step=False, on_epoch=True, reduce_fx="sum")
        self.log_dict({"train/twice": 2 * loss, "train/ones": 1.0}, on_step=True, on_epoch=True, reduce_fx="sum")
        return loss


def _logged_by_the_module(monitor: SharpnessMonitor | None) -> tuple[LoggingMLP, dict[str, list], dict[str, float]]:
    module = LoggingMLP(lr=0.05)
    trainer = fit(module, *([monitor] if monitor else []), max_steps=4)
    history = {k: v for k, v in trainer.logger.history.items() if k.startswith("train/")}
    return module, history, {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}


def test_the_default_loss_recomputation_logs_nothing() -> None:
    module, history, metrics = _logged_by_the_module(SharpnessMonitor(check_every_n_steps=2, action="log"))
    plain, history_without, metrics_without = _logged_by_the_module(None)
    assert plain.calls == 4 and module.calls > 4  # the monitor did call training_step (at steps 1 and 3)
    assert module.logged == plain.logged  # 4 self.log calls per step, all from the training step itself
    assert set(plain.logged) == {
        ("training_step", k) for k in ("train/loss", "train/rows", "train/twice", "train/ones")
    }
    assert sorted(history) == sorted(history_without)
    for key, pairs in history_without.items():
        assert [s for s, _ in history[key]] == [s for s, _ in pairs], key
        np.testing.assert_allclose([v for _, v in history[key]], [v for _, v in pairs], rtol=1e-6, err_msg=key)
    assert sorted(metrics) == sorted(metrics_without)
    for key, value in metrics_without.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6), key


def test_the_logging_test_sees_an_unmuted_recomputation() -> None:
    # the negative control of the test above: training_step called as is from the monitor's hook
    # does reach self.log (which Lightning then merges silently into the same keys)
    unmuted = SharpnessMonitor(check_every_n_steps=2, action="log", loss_fn=lambda m, b, i: m.training_step(b, i))
    module, _, _ = _logged_by_the_module(unmuted)
    assert ("on_before_optimizer_step", "train/loss") in module.logged


# -- where the loss comes from --------------------------------------------------------------------


class ManualMLP(FixedBatchMLP):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_without_loss_fn_raises_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"manual optimization needs `loss_fn\(pl_module, batch, batch_idx\)`"):
        fit(ManualMLP(), SharpnessMonitor(check_every_n_steps=2), max_steps=2)


def test_manual_optimization_with_a_loss_fn_is_measured() -> None:
    def loss_fn(module: pl.LightningModule, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(module.net(x), y)

    reference = DenseReference()
    trainer = fit(ManualMLP(), SharpnessMonitor(check_every_n_steps=2, loss_fn=loss_fn, action="log"), reference,
                   max_steps=4)
    logged = trainer.logger.values("sharpness/lambda_max")
    assert sorted(logged) == [1, 3]
    for step, value in logged.items():
        assert value == pytest.approx(reference.top[step], rel=1e-3)


def test_a_user_loss_fn_is_the_loss_measured() -> None:
    calls = []

    def tripled(module: LoggingMLP, batch: Any, batch_idx: int) -> Tensor:
        calls.append(batch_idx)
        x, y = batch
        return 3 * F.mse_loss(module.net(x), y)

    module, reference = LoggingMLP(lr=1e-3), DenseReference(scale=3.0)
    trainer = fit(module, SharpnessMonitor(check_every_n_steps=2, loss_fn=tripled, action="log"), reference,
                   max_steps=4)
    assert module.calls == 4  # training_step ran for training only
    assert len(calls) == 2  # once per check (autograd keeps the first-order graph for every product)
    logged = trainer.logger.values("sharpness/lambda_max")
    assert sorted(logged) == [1, 3]
    for step, value in logged.items():
        assert value == pytest.approx(reference.top[step], rel=1e-3)  # 3 x the training loss's curvature


class CausalAttention(nn.Module):
    """Two heads of causal self-attention through ``F.scaled_dot_product_attention`` (4-D inputs:
    the CPU flash kernel, which has no double backward), mean-pooled."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)  # 3 x (N, heads, L, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, heads, L, d)
        return self.out(y.transpose(1, 2).flatten(2).mean(1))


class AttentionRegressor(FixedBatchMLP):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(self.n, 5, 4, generator=g)
        self.data = TensorDataset(x, x.sum((1, 2))[:, None].sin())

    def build(self, width: int) -> nn.Module:
        return CausalAttention()


def test_flash_attention_on_the_cpu_falls_back_to_finite_differences_and_says_so_once() -> None:
    reference = DenseReference()
    monitor = SharpnessMonitor(check_every_n_steps=2, action="log")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(AttentionRegressor(), monitor, reference, max_steps=6)
    said = [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning)]
    assert len(said) == 1, said  # once, not at every check
    assert "finite differences" in said[0] and "flash attention (F.scaled_dot_product_attention) has no second" in said[0]
    logged = trainer.logger.values("sharpness/lambda_max")
    assert sorted(logged) == [1, 3, 5]
    for step, value in logged.items():  # forward differences in float32: ~1e-3 relative error
        assert value == pytest.approx(reference.top[step], rel=0.01), step


# -- precision, processes, devices ----------------------------------------------------------------


@pytest.mark.parametrize("model", [FixedBatchMLP, AttentionRegressor])
def test_bf16_mixed_runs_and_measures_the_float32_loss(model: type[FixedBatchMLP]) -> None:
    # Under bf16-mixed the recomputation runs in on_before_optimizer_step, outside Lightning's
    # autocast (the training step's context): its Hessian is that of the float32 loss at the step's
    # weights, hence the float64 dense reference of that loss, to 0.1% (1% for finite differences).
    reference = DenseReference()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)  # the attention model falls back to finite differences
        trainer = fit(model(), SharpnessMonitor(check_every_n_steps=2, action="log"), reference, max_steps=4,
                       precision="bf16-mixed")
    logged = trainer.logger.values("sharpness/lambda_max")
    assert sorted(logged) == [1, 3]
    for step, value in logged.items():
        assert value == pytest.approx(reference.top[step], rel=1e-3 if model is FixedBatchMLP else 0.01)
        assert math.isfinite(trainer.logger.values("sharpness/stability_ratio")[step])


class RowSplitMLP(RowSplit, FixedBatchMLP):
    """Rank r of w reads rows r, r + w, ... of the fixed batch: the two halves make the global batch."""


@pytest.mark.distributed
def test_ddp_on_two_cpu_processes_gives_the_single_process_sharpness(tmp_path: Path) -> None:
    keys = ("sharpness/lambda_max", "sharpness/stability_ratio", "sharpness/preconditioned_lambda_max")
    single = fit(FixedBatchMLP(lr=1e-2, momentum=0.9), SharpnessMonitor(check_every_n_steps=2, action="log"),
                  max_steps=4).logger
    strategy = ddp_on_cpu()
    fit(RowSplitMLP(lr=1e-2, momentum=0.9), SharpnessMonitor(check_every_n_steps=2, action="log"), max_steps=4,
         devices=2, strategy=strategy, logger=CSVLogger(tmp_path, name="ddp", version=0), use_distributed_sampler=False)
    rows = np.genfromtxt(tmp_path / "ddp" / "version_0" / "metrics.csv", delimiter=",", names=True, deletechars="")
    rows = rows[~np.isnan(rows["sharpness/lambda_max"])]
    assert list(rows["step"]) == [1, 3]
    for key in keys:
        # each product is averaged over the ranks: the Hessian of the global batch's mean loss
        np.testing.assert_allclose(rows[key], [v for _, v in single.history[key]], rtol=1e-5, err_msg=key)



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_no_host_sync_outside_logging_steps_on_cuda(optimizer: str) -> None:
    # every step that does not log, check steps (1, 3, 5, 7, 11; the cold start at 1) included,
    # must not wait for the GPU: the figures leave by a non-blocking copy, read a step later
    monitor = SharpnessMonitor(check_every_n_steps=2, every_n_steps=5, action="log")
    checked = forbid_host_sync(monitor, {s for s in range(12) if (s + 1) % 5 != 0})
    trainer = make_trainer(callbacks=[monitor], max_steps=12, accelerator="gpu")
    trainer.fit(FixedBatchMLP(optimizer=optimizer))
    assert checked == {0, 1, 2, 3, 5, 6, 7, 8, 10, 11}
    # the latest check before each logging step (3 at 4, 9 at 9); the last check is flushed at the end
    assert sorted(trainer.logger.values("sharpness/lambda_max")) == [3, 9, 11]
