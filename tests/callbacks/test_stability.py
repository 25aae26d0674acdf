"""StabilityGovernor: the logged ratio against closed forms in a real fit (SGD with a dense float64
Hessian, Adam on a quadratic, accumulation, clipping), no trace when it never acts, an exploding
run held, manual optimization, state and arguments."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MixtureClassifier, TinyModule, make_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import StabilityGovernor
from lightning_diag.alerts import DiagnosticWarning


class Weights(Callback):
    """The flat weights and the batch at the start of each optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, torch.Tensor] = {}
        self.batches: dict[int, list[Any]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        step = trainer.global_step
        self.before.setdefault(step, torch.cat([p.detach().reshape(-1).clone() for p in pl_module.parameters()]))
        self.batches.setdefault(step, []).append(batch)


def _logged(trainer: pl.Trainer, key: str) -> dict[int, float]:
    return trainer.logger.values(f"stability/{key}")


# -- the ratio in a real fit against closed forms ---------------------------------------------------------------


class DoubleMLP(TinyModule):
    def __init__(self, lr: float) -> None:
        super().__init__(depth=1, width=4, lr=lr, n=32, batch_size=8)
        self.double()
        self.data = TensorDataset(*(t.double() for t in self.data.tensors))


def test_logged_sgd_ratio_equals_lr_gHg_over_twice_g2_from_a_dense_float64_hessian() -> None:
    torch.manual_seed(0)
    model, weights, lr = DoubleMLP(lr=1e-3), Weights(), 1e-3
    trainer = make_trainer(callbacks=[StabilityGovernor(check_every_n_steps=1, action="log"), weights], max_steps=4)
    trainer.fit(model)
    names, shapes = [n for n, _ in model.net.named_parameters()], [p.shape for p in model.net.parameters()]
    ratios = _logged(trainer, "ratio")
    assert sorted(ratios) == [0, 1, 2, 3]
    for step, r in ratios.items():
        (x, y), = weights.batches[step]

        def loss_of(v: torch.Tensor, x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            params, i = {}, 0
            for name, shape in zip(names, shapes):
                params[name] = v[i:i + shape.numel()].reshape(shape)
                i += shape.numel()
            return nn.functional.mse_loss(functional_call(model.net, params, (x,)), y)

        theta = weights.before[step]
        g = torch.autograd.functional.jacobian(loss_of, theta)
        hessian = torch.autograd.functional.hessian(loss_of, theta)
        assert r == pytest.approx(lr * float(g @ hessian @ g) / (2 * float(g @ g)), rel=1e-3)
        assert _logged(trainer, "critical_lr")[step] == pytest.approx(lr / r)
        assert _logged(trainer, "lr")[step] == pytest.approx(lr)


class Quadratic(pl.LightningModule):
    """``f_b(theta) = 1/2 theta^T A theta - b^T theta`` with ``b`` the batch: every loss has Hessian ``A``."""

    def __init__(self, optimizer: str, lr: float, manual: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q = torch.randn(5, 5, generator=g, dtype=torch.float64)
        self.register_buffer("a", q @ q.T / 5 + 0.1 * torch.eye(5, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64))
        self.bs = torch.randn(16, 5, generator=g, dtype=torch.float64)
        self.optimizer, self.lr, self.automatic_optimization = optimizer, lr, not manual

    def loss(self, b: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.theta @ self.a @ self.theta - b.mean(0) @ self.theta

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch[0])
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = torch.optim.Adam if self.optimizer == "adam" else torch.optim.SGD
        return cls(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.bs), batch_size=2)


@pytest.mark.parametrize(("optimizer", "accumulate", "clip"), [("adam", 1, None), ("adam", 2, None),
                                                             ("sgd", 1, 0.05)])  # fmt: skip
def test_logged_ratio_on_a_quadratic_equals_dhd_over_twice_the_unclipped_first_order_decrease(
    optimizer: str, accumulate: int, clip: float | None
) -> None:
    """Adam: D is preconditioned, not along -g. Accumulation: f0, f1 are means over the micro-batches and
    g the accumulated gradient. Norm clipping: gD is that of the unclipped gradient, which f follows."""
    model, weights = Quadratic(optimizer, lr=0.3), Weights()
    governor = StabilityGovernor(check_every_n_steps=1, govern=False, action="log")
    trainer = make_trainer(callbacks=[governor, weights], max_steps=5, accumulate_grad_batches=accumulate,
                           gradient_clip_val=clip)  # fmt: skip
    trainer.fit(model)
    weights.before[trainer.global_step] = model.theta.detach().clone()
    ratios = _logged(trainer, "ratio")
    assert sorted(ratios) == list(range(5))
    clipped = 0
    for step, r in ratios.items():
        theta, b = weights.before[step], torch.cat([batch[0] for batch in weights.batches[step]]).mean(0)
        g, d = model.a @ theta - b, weights.before[step + 1] - theta
        assert r == pytest.approx(float(d @ model.a @ d) / (2 * abs(float(g @ d))), rel=1e-6)
        assert _logged(trainer, "predicted_change")[step] == pytest.approx(float(g @ d), rel=1e-6)
        clipped += clip is not None and float(g.norm()) > clip
    assert clipped >= 3 or clip is None  # the clipping did act


class DropoutMixture(MixtureClassifier):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(dropout=0.3, batchnorm=True, shuffle=True, **kwargs)


def _final_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("govern", "accumulate"), [(True, 1), (True, 2), (False, 1)])
def test_a_governor_that_never_acts_leaves_the_run_bit_identical(govern: bool, accumulate: int) -> None:
    """Dropout and BatchNorm, a check every step, a target it never reaches: the extra forwards leave
    no trace (RNG, running statistics, num_batches_tracked, modes) and the scale stays exactly 1."""
    runs = []
    for callbacks in ([], [StabilityGovernor(target=1e9, check_every_n_steps=1, govern=govern, action="log")]):
        torch.manual_seed(0)
        model = DropoutMixture()
        trainer = make_trainer(callbacks=callbacks, max_steps=8, accumulate_grad_batches=accumulate)
        trainer.fit(model)
        runs.append((_final_state(model), trainer))
    (plain, _), (governed, trainer) = runs
    assert plain.keys() == governed.keys()
    assert all(torch.equal(plain[k], governed[k]) for k in plain), [k for k in plain
                                                                   if not torch.equal(plain[k], governed[k])]
    ratios = _logged(trainer, "ratio")
    assert len(ratios) == 8 and all(math.isfinite(r) for r in ratios.values())  # it did measure every step
    assert set(_logged(trainer, "scale").values()) == {1.0}


def test_the_extra_forward_draws_the_dropout_masks_of_the_step() -> None:
    """At a tiny learning rate f1 - f0 is the first-order change, so |r| stays small; with other
    dropout masks than the step's, f1 - f0 would be the masks' noise, orders of magnitude larger."""
    torch.manual_seed(0)
    model = DropoutMixture(lr=1e-4)
    trainer = make_trainer(callbacks=[StabilityGovernor(check_every_n_steps=1, action="log")], max_steps=6)
    trainer.fit(model)
    ratios = _logged(trainer, "ratio")
    assert len(ratios) == 6 and all(abs(r) < 0.1 for r in ratios.values())


# -- governing --------------------------------------------------------------------------------------------------


def _explode(callbacks: list[Callback], lr: float = 1.0) -> tuple[TinyModule, pl.Trainer]:
    torch.manual_seed(0)
    model = TinyModule(lr=lr, width=16)
    trainer = make_trainer(callbacks=callbacks, max_steps=60, log_every_n_steps=5)
    trainer.fit(model)
    return model, trainer


def _full_loss(model: TinyModule) -> float:
    x, y = model.data.tensors
    with torch.no_grad():
        return float(nn.functional.mse_loss(model.net(x), y))


def test_the_governor_holds_a_run_that_explodes_without_it() -> None:
    plain, _ = _explode([])  # SGD at lr 1.0: past 2 / sharpness, the weights go non-finite
    assert not all(p.isfinite().all() for p in plain.parameters())
    governor = StabilityGovernor(check_every_n_steps=1, action="log")
    governed, trainer = _explode([governor])
    assert all(p.isfinite().all() for p in governed.parameters())
    torch.manual_seed(0)
    assert _full_loss(governed) < 0.5 * _full_loss(TinyModule(lr=1.0, width=16))  # and it trains
    scales = _logged(trainer, "scale")
    assert min(scales.values()) < 0.5 and all(0 < s <= 1 for s in scales.values())
    lr = _logged(trainer, "lr")
    assert min(lr.values()) < 0.5  # the rate in use fell with the scale


def test_govern_false_changes_nothing_even_when_it_would_cut() -> None:
    torch.manual_seed(0)
    plain, _ = _explode([], lr=0.5)
    governor = StabilityGovernor(check_every_n_steps=1, govern=False, action="log")
    watched, trainer = _explode([governor], lr=0.5)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), watched.state_dict().values()))
    assert min(_logged(trainer, "scale").values()) < 1.0  # the scale it would have applied
    assert set(_logged(trainer, "lr").values()) == {0.5}  # the rate in use: the schedule's


def test_the_scale_falling_below_warn_scale_warns_and_a_pinned_floor_is_critical() -> None:
    governor = StabilityGovernor(target=0.8, check_every_n_steps=1, min_scale=0.2, warn_scale=0.3, pin_patience=2,
                                 action="log")  # fmt: skip
    _explode([governor], lr=8.0)
    metrics = {(a.metric, a.severity) for a in governor.alerts}
    assert ("stability/scale", "warning") in metrics
    assert ("stability/pinned_checks", "critical") in metrics


# -- manual optimization, state, arguments ----------------------------------------------------------------------


def test_manual_optimization_without_loss_fn_measures_nothing_and_says_so_once() -> None:
    governor = StabilityGovernor(check_every_n_steps=1, action="log")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(callbacks=[governor], max_steps=4)
        trainer.fit(Quadratic("sgd", lr=0.1, manual=True))
    said = [w for w in caught if issubclass(w.category, DiagnosticWarning) and "loss_fn" in str(w.message)]
    assert len(said) == 1 and not _logged(trainer, "ratio")


def test_manual_optimization_with_loss_fn_gives_the_closed_form() -> None:
    model, weights = Quadratic("adam", lr=0.3, manual=True), Weights()
    governor = StabilityGovernor(check_every_n_steps=1, action="log", loss_fn=lambda m, batch, i: m.loss(batch[0]))
    trainer = make_trainer(callbacks=[governor, weights], max_steps=4)
    trainer.fit(model)
    weights.before[trainer.global_step] = model.theta.detach().clone()
    ratios = _logged(trainer, "ratio")
    assert sorted(ratios) == [0, 1, 2, 3]
    for step, r in ratios.items():
        theta, (b,) = weights.before[step], weights.batches[step][0]
        g, d = model.a @ theta - b.mean(0), weights.before[step + 1] - theta
        assert r == pytest.approx(float(d @ model.a @ d) / (2 * abs(float(g @ d))), rel=1e-6)


def test_state_round_trip_restores_scale_smoothing_and_rules() -> None:
    governor = StabilityGovernor(check_every_n_steps=1, action="log")
    _explode([governor])
    state = governor.state_dict()
    assert state["controller"]["scale"] < 1.0
    fresh = StabilityGovernor(check_every_n_steps=1, action="log")
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    assert fresh._lr_scale(None) == governor._lr_scale(None)
    assert fresh.is_check_step(1) is False  # not attached: nothing to check


@pytest.mark.parametrize(("bad", "error", "message"), [
    ({"check_every_n_steps": 0}, ValueError, "`check_every_n_steps` must be an int >= 1, got 0"),
    ({"target": -1}, ValueError, "`target` must be a number > 0, got -1"),
    ({"min_scale": 2.0}, ValueError, "`min_scale` must be a number in (0, 1], got 2.0"),
    ({"recovery": 0.9}, ValueError, "`recovery` must be a number > 1, got 0.9"),
    ({"smoothing": -0.1}, ValueError, "`smoothing` must be a number in [0, 1), got -0.1"),
    ({"margin": 1.0}, ValueError, "`margin` must be a number in [0, 1), got 1.0"),
    ({"min_relative_decrease": -1e-3}, ValueError, "`min_relative_decrease` must be a number >= 0, got -0.001"),
    ({"govern": "no"}, ValueError, "`govern` must be True or False, got 'no'"),
    ({"warn_scale": 1.5}, ValueError, "`warn_scale` must be None or a number in (0, 1), got 1.5"),
    ({"pin_patience": 0}, ValueError, "`pin_patience` must be an int >= 1, got 0"),
    ({"loss_fn": "mse"}, TypeError, "`loss_fn` must be None or a callable, got 'mse'"),
])  # fmt: skip
def test_bad_arguments_name_the_value_and_what_is_allowed(bad: dict, error: type, message: str) -> None:
    with pytest.raises(error) as raised:
        StabilityGovernor(**bad)
    assert str(raised.value) == message


# -- DDP --------------------------------------------------------------------------------------------------------


class RankFigures(Weights):
    """Writes to ``<dirpath>/rank<r>.pt`` what each rank saw: weights and batches per step, the governor's
    host figures per check, and its state."""

    def __init__(self, dirpath: str) -> None:
        super().__init__()
        self.dirpath = dirpath

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        [governor] = [c for c in trainer.callbacks if isinstance(c, StabilityGovernor)]
        self.figures: dict[int, dict[str, float]] = {}
        derive = governor.derive
        governor.derive = lambda host: self.figures.setdefault(host.step, dict(host.scalars)) and derive(host)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        [governor] = [c for c in trainer.callbacks if isinstance(c, StabilityGovernor)]
        self.before[trainer.global_step] = pl_module.theta.detach().clone()
        torch.save({"figures": self.figures, "before": self.before, "batches": self.batches,
                    "state": governor.state_dict(), "a": pl_module.a},
                   f"{self.dirpath}/rank{trainer.global_rank}.pt")  # fmt: skip


@pytest.mark.distributed
def test_ddp_figures_are_global_and_every_rank_decides_alike(tmp_path: Any) -> None:
    from conftest import assert_same_state, ddp_on_cpu

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=ddp_on_cpu(timeout_s=30), max_steps=4, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[StabilityGovernor(check_every_n_steps=1, action="log"),
                                    RankFigures(str(tmp_path))])  # fmt: skip
    trainer.fit(Quadratic("adam", lr=0.3))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert_same_state(rank0["state"], rank1["state"], rel=1e-12, abs=1e-15)
    assert sorted(rank0["figures"]) == [0, 1, 2, 3]
    a = rank0["a"]
    for step, figures in rank0["figures"].items():
        assert figures == rank1["figures"][step]
        theta, d = rank0["before"][step], rank0["before"][step + 1] - rank0["before"][step]
        local = [0.5 * theta @ a @ theta - rank["batches"][step][0][0].mean(0) @ theta for rank in (rank0, rank1)]
        assert abs(float(local[0] - local[1])) > 1e-6  # the ranks saw different batches
        b = (rank0["batches"][step][0][0].mean(0) + rank1["batches"][step][0][0].mean(0)) / 2
        assert figures["batch_loss"] == pytest.approx(float(sum(local)) / 2, rel=1e-9)
        assert figures["predicted_change"] == pytest.approx(float((a @ theta - b) @ d), rel=1e-9)
