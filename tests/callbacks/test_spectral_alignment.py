"""SpectralAlignmentMonitor inside real Lightning runs, against independent float64 references.

References are computed from inputs captured by the test's own forward pre-hooks and weights
captured in a callback placed after the monitor (Lightning calls callbacks in list order), with
numpy's SVD in float64.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import MemoryLogger, assert_same_state, ddp_on_cpu, fit, make_trainer, reachable_tensors
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_diag import Above, DivergenceError
from lightning_diag.callbacks._base import HostFigures
from lightning_diag.callbacks.spectral_alignment import SpectralAlignmentMonitor

SA = "spectral_alignment"
FIGURES = ("sign_diversity", "collapse", "mean_abs", "abs_mean", "std", "sigma1", "stable_rank")

# -- models and helpers -----------------------------------------------------------------------------


class SeqModule(pl.LightningModule):
    """Sequence regressor on (B, 3, 6) inputs: ``a`` (6 -> 8), ``b``, ``c`` (8 -> 8, batched together),
    tanh after each, then the head ``out`` (8 -> 1). Optional dropout draws from the global RNG.
    ``nan_step``: the loss of that step is NaN, so SGD makes every weight NaN from the next step on."""

    def __init__(self, dropout: float = 0.0, n: int = 48, batch_size: int = 8, shuffle: bool = False,
                 nan_step: int | None = None) -> None:  # fmt: skip
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a, self.b, self.c, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.drop = nn.Dropout(dropout)
        x = torch.randn(n, 3, 6, generator=g)
        self.data = TensorDataset(x, x.sum((1, 2)).sin().unsqueeze(1))
        self.batch_size, self.shuffle, self.nan_step = batch_size, shuffle, nan_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(self.drop(h)))
        h = torch.tanh(self.c(h))
        return self.out(h).mean(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        return loss * float("nan") if self.global_step == self.nan_step else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=self.shuffle)


class Aligning(pl.LightningModule):
    """A bias-free linear chain 8 -> 16 -> 16 -> 1 (head ``net.2``) regressing Gaussian inputs.

    From ``fault_step`` on (on rank ``fault_rank`` only, if set), the inputs get a mean offset along
    the top right singular vector v1 of ``net.0`` at that step, ``3 * 1.05**k`` after k steps: every
    row of ``net.0``'s input falls on one side of v1 at once, and SGD diverges some 40 steps later
    (the curvature grows with the offset) until the loss is non-finite. ``kick_step``: before that
    step's forward a rank-one term turns ``net.1``'s top singular vector (its s_1 jumps).
    """

    def __init__(self, fault_step: int | None = None, fault_rank: int | None = None, n: int = 640,
                 batch_size: int = 64, kick_step: int | None = None) -> None:  # fmt: skip
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Linear(16, 16, bias=False),
                                 nn.Linear(16, 1, bias=False))  # fmt: skip
        x = torch.randn(n, 8, generator=g)
        self.data = TensorDataset(x, x @ torch.randn(8, 1, generator=g))
        self.fault_step, self.fault_rank, self.kick_step = fault_step, fault_rank, kick_step
        self.batch_size = batch_size
        self.register_buffer("direction", torch.zeros(8))  # a buffer: a resumed run keeps the fault's direction
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.kick_step:
            with torch.no_grad():
                w = self.net[1].weight
                u, v = torch.ones(16) / 4, torch.linspace(-1, 1, 16) / torch.linspace(-1, 1, 16).norm()
                w += 2 * torch.linalg.matrix_norm(w, 2) * torch.outer(u, v)
        k = self.global_step - self.fault_step if self.fault_step is not None else -1
        if k == 0:  # on every rank (the weights are equal): DDP broadcasts rank 0's buffers at each forward
            self.direction.copy_(torch.linalg.svd(self.net[0].weight.detach())[2][0])
        if k >= 0 and self.fault_rank in (None, self.global_rank):
            x = x + 3.0 * 1.05**k * self.direction
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        if self.trainer.world_size == 1:
            return DataLoader(self.data, batch_size=self.batch_size)
        # Rank r of w reads rows r, r + w, ... in order (Lightning's own sampler would shuffle): with half the
        # batch size, the two ranks' batches of a step make up the single-process batch of that step.
        sampler = DistributedSampler(self.data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(self.data, batch_size=self.batch_size, sampler=sampler)


class InputCapture(Callback):
    """The test's own record of module inputs (forward pre-hooks, first call of a step) and
    weights (``weight(module)``, taken after the monitor's measurement)."""

    def __init__(self, names: list[str], weight: Callable[[nn.Module], torch.Tensor] = lambda m: m.weight) -> None:
        self.names, self.weight = names, weight
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.handles: list[Any] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        modules = dict(pl_module.named_modules())
        for name in self.names:
            self.handles.append(modules[name].register_forward_pre_hook(self._hook(name, trainer)))

    def _hook(self, name: str, trainer: pl.Trainer) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self.inputs.setdefault(trainer.global_step, {}).setdefault(name, args[0].detach().double().clone())

        return hook

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        modules = dict(pl_module.named_modules())
        self.weights[trainer.global_step] = {n: self.weight(modules[n]).detach().double().clone() for n in self.names}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()


def _reference(weight: torch.Tensor, inputs: torch.Tensor) -> dict[str, float]:
    """Every per-layer figure in float64 from numpy's SVD, written independently of the package."""
    w = weight.numpy()
    x = inputs.reshape(-1, w.shape[1]).numpy()
    _, s, vt = np.linalg.svd(w)
    sa = x @ vt[0] / np.linalg.norm(x, axis=1)
    p = (sa > 0).sum() / ((sa > 0).sum() + (sa < 0).sum())
    return {"sign_diversity": 1 - abs(2 * p - 1), "collapse": abs(2 * p - 1), "mean_abs": np.abs(sa).mean(),
            "abs_mean": abs(sa.mean()), "std": sa.std(), "sigma1": s[0], "stable_rank": (w**2).sum() / s[0] ** 2}



def _history(trainer: pl.Trainer) -> dict[str, list[tuple[int, float]]]:
    return dict(trainer.logger.history)


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


def _layers(log: dict[str, Any], figure: str = "sigma1") -> list[str]:
    return sorted(k.rpartition("/")[2] for k in log if k.startswith(f"{SA}/{figure}/"))


def _caught(run: Callable[[], Any]) -> tuple[Any, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    return result, [str(w.message) for w in caught]


# -- figures against float64 references -------------------------------------------------------------


def test_per_layer_figures_match_float64_svd_of_the_weight_and_the_captured_inputs() -> None:
    torch.manual_seed(0)
    module = SeqModule()
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=2, max_rows=64, power_iterations=100,
                                       action="log")  # fmt: skip
    capture = InputCapture(["a", "b", "c"])
    log = _history(fit(module, monitor, capture, max_steps=8))
    assert [s for s, _ in log[f"{SA}/sigma1/a"]] == [1, 3, 5, 7]
    assert _layers(log) == ["a", "b", "c"]  # the head is excluded by default
    for key in log:  # every logged key is declared, once
        assert key == f"{SA}/alerts" or len([k for k in monitor.declared_keys() if k.matches(key, SA)]) == 1, key
    for step in (1, 3, 5, 7):
        for name in ("a", "b", "c"):
            expected = _reference(capture.weights[step][name], capture.inputs[step][name])
            for figure, value in expected.items():
                key = f"{SA}/{figure}/{name}"
                assert dict(log[key])[step] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, step)
        layers = [_reference(capture.weights[step][n], capture.inputs[step][n])["collapse"] for n in "abc"]
        assert dict(log[f"{SA}/mean_collapse"])[step] == pytest.approx(np.mean(layers), abs=1e-6)
        frac = np.mean([c >= monitor.collapse_baseline.threshold for c in layers])
        assert dict(log[f"{SA}/frac_collapsed"])[step] == pytest.approx(frac, abs=1e-12)


def test_a_sign_flip_of_the_singular_vector_changes_no_logged_figure() -> None:
    class FlipWarmStart(Callback):  # placed before the monitor: negates the saved v1 before every check
        def __init__(self, monitor: SpectralAlignmentMonitor) -> None:
            self.monitor = monitor

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            state = self.monitor.state_dict()
            state["v1"] = {name: -v for name, v in state["v1"].items()}
            self.monitor.load_state_dict(state)

    logs = []
    for flip in (False, True):
        torch.manual_seed(0)
        monitor = SpectralAlignmentMonitor(check_every_n_steps=1, max_rows=5, action="log")
        callbacks = [FlipWarmStart(monitor), monitor] if flip else [monitor]
        logs.append(_history(fit(SeqModule(), *callbacks, max_steps=6)))
    assert logs[0].keys() == logs[1].keys() and f"{SA}/sigma1/a" in logs[0]
    for key in logs[0]:
        # Equal up to float32 rounding: D = 1 - |2 p+ - 1| rounds p+ and 1 - p+ differently.
        assert [s for s, _ in logs[0][key]] == [s for s, _ in logs[1][key]]
        np.testing.assert_allclose([v for _, v in logs[1][key]], [v for _, v in logs[0][key]], rtol=1e-6, atol=1e-7,
                                   err_msg=key)  # fmt: skip


# -- sampling hooks ---------------------------------------------------------------------------------


class HeldTensors(Callback):
    """After each backward (inputs sampled, not yet measured): how many tensors the monitor holds."""

    def __init__(self, monitor: SpectralAlignmentMonitor) -> None:
        self.monitor, self.held, self.hooks = monitor, {}, {}

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.held[trainer.global_step] = len(reachable_tensors(self.monitor))
        self.hooks[trainer.global_step] = _hooks(pl_module)


def test_hooks_sample_only_on_check_steps_and_are_all_removed_after_fit() -> None:
    """One sample per layer on check steps only (the monitor holds 3 more tensors there, none
    on the other steps), four hooks during the run (a, b, c, the head), none and no sampled rows after it."""
    torch.manual_seed(0)
    module = SeqModule()
    monitor = SpectralAlignmentMonitor(check_every_n_steps=3, action="log")
    held = HeldTensors(monitor)
    log = _history(fit(module, monitor, held, max_steps=9))
    assert [s for s, _ in log[f"{SA}/collapse/a"]] == [2, 5, 8]
    assert set(held.hooks.values()) == {4}  # a, b, c, and the head's (is it the last to run?)
    assert [held.held[s] - held.held[s - 1] for s in (5, 8)] == [3, 3]  # the sampled rows of a, b and c
    assert held.held[3] == held.held[4] == held.held[6] == held.held[7]  # nothing sampled off the checks
    assert _hooks(module) == 0
    assert len(reachable_tensors(monitor)) == held.held[4]  # rows dropped; the v1 warm starts remain


def test_hooks_are_removed_and_nothing_is_held_when_the_run_raises() -> None:
    torch.manual_seed(0)
    module = Aligning(fault_step=20)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, warmup_steps=0, layer_rule="baseline", action="raise")
    with pytest.raises(DivergenceError):
        fit(module, monitor, max_steps=60)
    assert _hooks(module) == 0
    # No sampled rows are held; what remains is the v1 warm start of net.0 (8 inputs) and net.1 (16),
    # each kept as its weight group's (maps, d_in, 1) stack.
    held = [t for t in reachable_tensors(monitor).values() if t.is_floating_point()]
    assert sorted(tuple(t.shape) for t in held) == [(1, 8, 1), (1, 16, 1)]


def test_gradient_accumulation_samples_one_micro_batch_per_optimizer_step() -> None:
    torch.manual_seed(0)
    module = SeqModule()
    monitor = SpectralAlignmentMonitor(check_every_n_steps=1, max_rows=64, power_iterations=100, action="log")
    capture = InputCapture(["a"])
    log = _history(fit(module, monitor, capture, max_steps=3, accumulate_grad_batches=2))
    assert [s for s, _ in log[f"{SA}/sigma1/a"]] == [0, 1, 2]
    # The sampled rows are the first micro-batch's: the test hook keeps that one (setdefault).
    for step, value in log[f"{SA}/mean_abs/a"]:
        assert value == pytest.approx(_reference(capture.weights[step]["a"], capture.inputs[step]["a"])["mean_abs"],
                                      rel=1e-4)  # fmt: skip


def test_bf16_autocast_gives_finite_figures() -> None:
    torch.manual_seed(0)
    log = _history(fit(SeqModule(), SpectralAlignmentMonitor(check_every_n_steps=1, action="log"), max_steps=3,
                        precision="bf16-mixed"))  # fmt: skip
    assert [s for s, _ in log[f"{SA}/sigma1/b"]] == [0, 1, 2]
    for key, records in log.items():
        assert all(math.isfinite(v) for _, v in records), key


def test_monitor_leaves_training_bit_identical_and_the_global_rng_untouched() -> None:
    finals = []
    for callbacks in ([], [SpectralAlignmentMonitor(check_every_n_steps=1, max_rows=4, action="log")]):
        torch.manual_seed(0)
        module = SeqModule(dropout=0.3, shuffle=True)  # dropout and shuffling draw from the global RNG
        fit(module, *callbacks, max_steps=8)
        finals.append({n: p.detach().clone() for n, p in module.named_parameters()} | {"rng": torch.rand(3)})
    assert finals[0].keys() == finals[1].keys()
    for name in finals[0]:
        assert torch.equal(finals[0][name], finals[1][name]), name


def test_logging_steps_publish_the_latest_check_once_at_its_own_step() -> None:
    torch.manual_seed(0)
    log = _history(fit(SeqModule(), SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=5,
                                                              action="log"), max_steps=20))  # fmt: skip
    # checks at 1, 3, 5, ..., logging steps 4, 9, 14, 19 publish the checks of steps 3, 9, 13, 19
    for key in (f"{SA}/mean_collapse", f"{SA}/collapse/a", f"{SA}/std/a", f"{SA}/alerts"):
        assert [s for s, _ in log[key]] == [3, 9, 13, 19], key


# -- alerts -----------------------------------------------------------------------------------------


def test_inputs_driven_to_align_alert_before_the_loss_is_nonfinite_and_a_stable_run_stays_silent() -> None:
    runs = {}
    for fault_step in (None, 40):
        torch.manual_seed(0)
        module = Aligning(fault_step)
        # patience 7 steps: once a rule's condition holds, the monitor checks every step (adaptive cadence)
        monitor = SpectralAlignmentMonitor(check_every_n_steps=2, warmup_steps=20, mean_collapse_threshold=0.5,
                                           patience=7, mean_collapse_patience=7, layer_rule="baseline",
                                           action="log")  # fmt: skip
        fit(module, monitor, max_steps=90)
        runs[fault_step] = (module, monitor)
    stable, stable_monitor = runs[None]
    assert all(math.isfinite(v) for v in stable.losses) and stable_monitor.alerts == []
    faulty, monitor = runs[40]
    nonfinite = next(i for i, v in enumerate(faulty.losses) if not math.isfinite(v))
    first = monitor.alerts[0]
    assert first.metric == f"{SA}/collapse/net.0" and first.severity == "warning"
    assert 40 < first.step < nonfinite - 20  # the loss survives ~40 steps
    assert first.step == 47  # the collapse begins at step 41; then a check every step until patience (7) is met
    assert first.acted_step == first.step  # on the CPU the action is taken at the step the rule fired
    model_alert = next(a for a in monitor.alerts if a.metric == f"{SA}/mean_collapse")
    assert model_alert.severity == "critical" and model_alert.step < nonfinite
    assert "in the order they collapsed: net.0 (since step 41)" in model_alert.message


def _host(step: int, layers: list[str], collapse: tuple[float, ...]) -> HostFigures:
    return HostFigures(step, {}, tuple(layers), {"collapse/{layer}": np.array(collapse),
                                                 "sigma1/{layer}": np.ones(len(layers))})  # fmt: skip


def _run_rules(monitor: SpectralAlignmentMonitor, series: list[tuple[float, ...]]) -> list[tuple[str, int]]:
    """Feed a collapse series through the monitor's host side (derive, then its rule book), one check per step."""
    layers = ["ln_fed", "centred"]
    alerts = []
    for step, collapse in enumerate(series):
        derived = monitor.derive(_host(step, layers, collapse))
        keys = [f"{SA}/collapse/{n}" for n in layers] + [f"{SA}/{k}" for k in derived]
        alerts += monitor.book.update(step, keys, np.array([*collapse, *derived.values()]))
    return [(a.metric, a.step) for a in alerts]


def test_a_layer_one_sided_by_construction_does_not_fire_but_a_rise_over_its_baseline_does() -> None:
    series = [(1.0, 0.2)] * 10 + [(1.0, 0.95)] * 3  # the first layer sits at 1 all along
    kwargs = dict(baseline_alpha=0.9, baseline_warmup=3, patience=2, warmup_steps=0, mean_collapse_threshold=None)
    monitor = SpectralAlignmentMonitor(layer_rule="baseline", **kwargs)
    assert _run_rules(monitor, series) == [(f"{SA}/collapse/centred", 11)]
    baseline = monitor.collapse_baseline.baseline
    assert baseline.mean[1] == pytest.approx(0.2, abs=1e-12)  # hits are not absorbed
    assert baseline.mean[0] == pytest.approx(1.0, abs=1e-12)
    absolute = SpectralAlignmentMonitor(layer_rule="absolute", **kwargs)
    assert _run_rules(absolute, series) == [(f"{SA}/collapse/ln_fed", 1), (f"{SA}/collapse/centred", 11)]


def test_warmup_steps_mute_the_rules_and_the_baselines_but_not_the_figures() -> None:
    torch.manual_seed(0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, warmup_steps=1000, mean_collapse_threshold=0.5,
                                       action="log")  # fmt: skip
    log = _history(fit(Aligning(fault_step=10), monitor, max_steps=30))
    assert monitor.alerts == []
    assert max(v for _, v in log[f"{SA}/collapse/net.0"]) == pytest.approx(1.0, abs=1e-12)
    assert not monitor.collapse_baseline.baseline.ready.any()  # nothing learnt before warmup_steps
    assert all(v == pytest.approx(0.0, abs=1e-12) for _, v in log[f"{SA}/frac_flagged"])


def test_stop_action_ends_the_run_at_the_alerting_step() -> None:
    torch.manual_seed(0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=2, warmup_steps=0, layer_rule="baseline",
                                       action="stop")
    trainer = fit(Aligning(fault_step=20), monitor, max_steps=60)
    alert = monitor.alerts[0]
    assert trainer.global_step == alert.step + 1 and alert.acted_step == alert.step


def test_a_user_rule_on_a_logging_rate_figure_fires_when_the_figure_is_logged() -> None:
    """``std/<layer>`` reaches the host only on logging steps: the rule sees the check published there."""
    torch.manual_seed(0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=5, action="log",
                                       rules=[Above(f"{SA}/std/b", 0.0, severity="info")])  # fmt: skip
    log = _history(fit(SeqModule(), monitor, max_steps=10))
    (alert,) = monitor.alerts  # one streak, one alert
    assert (alert.metric, alert.step, alert.severity) == (f"{SA}/std/b", 3, "info")  # the check logged at step 4
    assert alert.value == pytest.approx(dict(log[f"{SA}/std/b"])[3], rel=1e-12)


def test_nonfinite_weights_give_nan_figures_and_a_critical_alert() -> None:
    """Issue 10, fault 5. Before: on a model whose weights had become NaN, the monitor kept logging
    finite, healthy-looking collapse and sign-diversity figures (computed against the stale
    singular vectors of the last finite weights), ``stable_rank`` 0.0, and raised nothing."""
    torch.manual_seed(0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=1, action="log")  # default warm-up: NaN is never muted
    log = _history(fit(SeqModule(nan_step=2), monitor, max_steps=6))  # weights NaN from step 3 on
    for name in "abc":
        for figure in FIGURES:
            series = dict(log[f"{SA}/{figure}/{name}"])
            assert sorted(series) == list(range(6)), (figure, name)
            assert all(math.isfinite(series[s]) for s in (0, 1, 2)), (figure, name)
            assert all(math.isnan(series[s]) for s in (3, 4, 5)), (figure, name, series)
        assert dict(log[f"{SA}/stable_rank/{name}"])[2] >= 1 - 1e-6
    for figure in ("mean_collapse", "frac_collapsed", "frac_flagged"):
        assert all(math.isnan(v) for s, v in log[f"{SA}/{figure}"] if s >= 3), figure
    assert [(a.metric, a.step, a.severity, a.acted_step, a.layers) for a in monitor.alerts] == [
        (f"{SA}/sigma1/{{layer}}", 3, "critical", 3, ("a", "b", "c"))]  # one event, one alert naming the layers


def test_weights_that_recover_from_nan_get_finite_figures_again() -> None:
    """A NaN weight must not poison the warm start for good: once the weights are finite again
    (a rollback restores them), so are the figures."""

    class Restore(Callback):  # keeps the weights of step 0 and puts them back at step 5
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 0:
                self.saved = {k: v.clone() for k, v in pl_module.state_dict().items()}
            if trainer.global_step == 5:
                pl_module.load_state_dict(self.saved)

    torch.manual_seed(0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=1, max_rows=64, power_iterations=100, action="log")
    capture = InputCapture(["a"])
    log = _history(fit(SeqModule(nan_step=2), Restore(), monitor, capture, max_steps=8))
    assert all(math.isnan(v) for s, v in log[f"{SA}/sigma1/a"] if 3 <= s <= 4)
    for step in (5, 6, 7):
        expected = _reference(capture.weights[step]["a"], capture.inputs[step]["a"])
        for figure in FIGURES:
            assert dict(log[f"{SA}/{figure}/a"])[step] == pytest.approx(expected[figure], rel=1e-4, abs=1e-5), figure


def test_alerts_after_the_last_logging_step_are_kept_and_logged_at_the_end_of_fit(tmp_path: Any) -> None:
    """Issue 10, fault 4. Before: figures reached the host only at logging steps, so a 12-step run
    with ``log_every_n_steps=5`` whose weights turned NaN at step 10 ended with an empty
    ``callback.alerts`` and nothing logged after step 9."""
    torch.manual_seed(0)
    memory, csv = MemoryLogger(), CSVLogger(tmp_path, name="csv", version=0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=1, every_n_steps=5, action="log")
    fit(SeqModule(nan_step=9), monitor, max_steps=12, logger=[memory, csv])
    assert [(a.metric, a.step, a.acted_step, a.layers) for a in monitor.alerts] == [
        (f"{SA}/sigma1/{{layer}}", 10, 10, ("a", "b", "c"))]
    counts = memory.history[f"{SA}/alerts"]  # logged when the alerts fire, and with the last step's figures
    assert [s for s, _ in counts] == [4, 9, 10, 11] and [v for _, v in counts] == pytest.approx([0, 0, 1, 1], abs=1e-12)
    assert [s for s, _ in memory.history[f"{SA}/sigma1/a"]] == [4, 9, 11]  # the last step's figures, at the end
    assert math.isnan(memory.history[f"{SA}/sigma1/a"][-1][1])
    lines = (tmp_path / "csv" / "version_0" / "lightning_diag_alerts.jsonl").read_text().splitlines()
    assert [(r["metric"], r["step"], r["severity"]) for r in map(json.loads, lines)] == [
        (f"{SA}/sigma1/{{layer}}", 10, "critical")]


# -- checkpoints ------------------------------------------------------------------------------------


def _resume_run(tmp_path: Any, stop_epoch: int | None) -> tuple[SpectralAlignmentMonitor, MemoryLogger]:
    """6 epochs of 10 steps, inputs aligned from step 30, ``net.1`` turned at step 39 (its s_1 jumps,
    so the first check after the checkpoint refines v1); optionally interrupted after ``stop_epoch``."""

    def parts() -> tuple[Aligning, SpectralAlignmentMonitor]:
        return Aligning(fault_step=30, kick_step=39), SpectralAlignmentMonitor(
            check_every_n_steps=2, max_rows=32, warmup_steps=0, mean_collapse_threshold=0.5, action="log")

    torch.manual_seed(0)
    module, monitor = parts()
    ckpt, logger = None, MemoryLogger()
    if stop_epoch is not None:
        trainer = make_trainer(callbacks=[monitor], max_steps=-1, max_epochs=stop_epoch, logger=logger)
        trainer.fit(module)
        ckpt = tmp_path / "interrupted.ckpt"
        trainer.save_checkpoint(ckpt)
        module, monitor = parts()  # a fresh process: new module, new callback
    make_trainer(callbacks=[monitor], max_steps=-1, max_epochs=6, logger=logger).fit(module, ckpt_path=ckpt)
    return monitor, logger


def test_checkpoint_resume_continues_warm_start_sampling_baselines_and_alerts(tmp_path: Any) -> None:
    (straight, straight_log), (resumed, resumed_log) = _resume_run(tmp_path, None), _resume_run(tmp_path, 4)
    assert straight.alerts and [a.as_dict() for a in resumed.alerts] == [a.as_dict() for a in straight.alerts]
    keys = [k for k in straight_log.history if k.startswith(f"{SA}/")]
    assert f"{SA}/sigma1/net.1" in keys and resumed_log.history.keys() == straight_log.history.keys()
    for key in keys:
        straight_series, resumed_series = straight_log.history[key], resumed_log.history[key]
        assert [s for s, _ in resumed_series] == [s for s, _ in straight_series], key
        np.testing.assert_allclose([v for _, v in resumed_series], [v for _, v in straight_series], rtol=1e-6,
                                   atol=1e-9, err_msg=key)  # fmt: skip
    assert_same_state(resumed.state_dict(), straight.state_dict(), rel=1e-6, abs=1e-9)
    assert torch.load(tmp_path / "interrupted.ckpt", weights_only=True)["callbacks"]  # plain lists and tensors


# -- TensorBoard ------------------------------------------------------------------------------------


def test_histograms_reach_tensorboard_at_their_own_cadence(tmp_path: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, histogram_every_n_steps=5, action="log")
    fit(SeqModule(), monitor, max_steps=12, logger=tensorboard)
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    events.Reload()
    # a (6 inputs) and b, c (8 inputs) are measured in two batches: each gets its histogram
    assert set(events.Tags()["histograms"]) == {f"{SA}/hist/{n}" for n in "abc"}
    for name in "abc":  # the first check at or after steps 4 and 9 (0-based: 5th and 10th step)
        assert [e.step for e in events.Histograms(f"{SA}/hist/{name}")] == [5, 9]
    assert f"{SA}/mean_collapse" in events.Tags()["scalars"]
    quiet = TensorBoardLogger(tmp_path, name="per_layer_off", version=0)  # declares no hist/<layer>: logs none
    fit(SeqModule(), SpectralAlignmentMonitor(check_every_n_steps=2, histogram_every_n_steps=5, per_layer=False,
                                               action="log"), max_steps=12, logger=quiet)  # fmt: skip
    events = EventAccumulator(str(tmp_path / "per_layer_off" / "version_0"), size_guidance={"histograms": 0})
    events.Reload()
    assert events.Tags()["histograms"] == [] and f"{SA}/collapse/a" in events.Tags()["scalars"]


# -- odd models, layer selection and bad arguments --------------------------------------------------


class ConvOnly(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 1, 3)
        self.data = TensorDataset(torch.randn(16, 2, 5), torch.randn(16, 1, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.mse_loss(self.conv(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)


def test_model_without_linear_layer_warns_once_and_does_nothing() -> None:
    trainer, shown = _caught(lambda: fit(ConvOnly(), SpectralAlignmentMonitor(check_every_n_steps=1), max_steps=4))
    assert trainer.global_step == 4
    assert len([m for m in shown if "no nn.Linear, nn.MultiheadAttention, nn.Conv2d" in m]) == 1
    assert not [k for k in _history(trainer) if k.startswith(f"{SA}/")]


class WithAttention(SeqModule):
    """``a``, then self-attention ``attn`` (``nn.MultiheadAttention``, which multiplies by
    ``out_proj.weight`` without calling ``out_proj``), then ``b``, ``c`` and the head ``out``
    (registered last). ``unused`` is an ``nn.Linear`` that ``forward`` never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = self._modules.pop("out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(torch.tanh(self.c(torch.tanh(self.b(h))))).mean(1)


def test_multihead_attention_is_watched_through_the_q_k_v_blocks_of_its_in_projection() -> None:
    """Issue 10, fault 6. Before: ``attn.out_proj`` was selected though never called (MHA uses its
    weight inside ``F.multi_head_attention_forward``), so its figures were NaN for the whole run,
    and the in-projection, where the attention's inputs meet a weight, was not watched at all."""
    torch.manual_seed(0)
    # s_2 / s_1 = 0.96 for W_q at initialisation: 500 iterations converge v1 to float32 precision
    monitor = SpectralAlignmentMonitor(check_every_n_steps=1, max_rows=64, power_iterations=500, action="log")
    capture = InputCapture(["attn"], weight=lambda m: m.in_proj_weight)
    log, shown = _caught(lambda: _history(fit(WithAttention(), monitor, capture, max_steps=3)))
    assert _layers(log) == ["a", "attn.k", "attn.q", "attn.v", "b", "c"]  # no out_proj, no head, no unused
    assert not [k for k in log if "out_proj" in k or "unused" in k]
    for step in range(3):
        for i, part in enumerate("qkv"):
            rows = capture.weights[step]["attn"][8 * i : 8 * (i + 1)]  # W_q, W_k, W_v: blocks of in_proj_weight
            expected = _reference(rows, capture.inputs[step]["attn"])  # self-attention: query = key = value
            for figure, value in expected.items():
                key = f"{SA}/{figure}/attn.{part}"
                assert dict(log[key])[step] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, step)
    for key, records in log.items():
        assert all(math.isfinite(v) for _, v in records), key
    assert len([m for m in shown if "no input reached ['unused']" in m]) == 1  # one warning, not one per check
    assert not [m for m in shown if "exclude_head" in m]  # out_proj is not taken for the output head


class AttentionOnly(pl.LightningModule):
    """Self-attention and nothing else (its only ``nn.Linear`` is ``out_proj``). From ``fault_step``
    on, every input token gets a large common offset, so all rows fall on one side of each v1."""

    def __init__(self, fault_step: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        x = torch.randn(64, 4, 8, generator=g)
        self.data = TensorDataset(x, x.sum(-1))
        self.offset = 30 * nn.functional.normalize(torch.randn(8, generator=g), dim=0)
        self.fault_step = fault_step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = x + self.offset if self.global_step >= self.fault_step else x
        return nn.functional.mse_loss(self.attn(x, x, x, need_weights=False)[0].sum(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)


def test_attention_only_model_has_a_finite_mean_collapse_and_its_model_level_rule_fires() -> None:
    """Issue 10, fault 6. Before: in an attention-only model the one watched map was the never-called
    ``out_proj``, so ``mean_collapse`` was NaN at every check and the model-level rule could never fire."""
    torch.manual_seed(0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=1, warmup_steps=0, layer_rule="none",
                                       mean_collapse_patience=3, action="log")  # fmt: skip
    log, shown = _caught(lambda: _history(fit(AttentionOnly(fault_step=4), monitor, max_steps=8)))
    assert _layers(log) == ["attn.k", "attn.q", "attn.v"]
    mean = dict(log[f"{SA}/mean_collapse"])
    assert sorted(mean) == list(range(8)) and all(math.isfinite(v) for v in mean.values())
    assert max(mean[s] for s in range(4)) < 0.8 <= min(mean[s] for s in range(4, 8))
    assert [(a.metric, a.step, a.severity) for a in monitor.alerts] == [(f"{SA}/mean_collapse", 6, "critical")]
    assert not [m for m in shown if "lightning_diag" in m]  # nothing to warn about: every map is called


def test_a_registered_last_linear_that_is_not_the_output_head_is_reported_once() -> None:
    class AuxLast(SeqModule):  # `aux` is registered after the head but runs first
        def __init__(self) -> None:
            super().__init__()
            self.aux = nn.Linear(6, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.aux(x))

    log, shown = _caught(lambda: _history(fit(AuxLast(), SpectralAlignmentMonitor(check_every_n_steps=1,
                                                                                   action="log"), max_steps=3)))
    reported = [m for m in shown if "`exclude_head=True` left out 'aux'" in m]
    assert len(reported) == 1 and "ran before ['a', 'b', 'c', 'out']" in reported[0]
    assert _layers(log) == ["a", "b", "c", "out"]


@pytest.mark.parametrize(
    ("kwargs", "layers"),
    [
        ({}, ["a", "b", "c"]),
        ({"exclude_head": False}, ["a", "b", "c", "out"]),
        ({"include": ["b", "c"]}, ["b", "c"]),
        ({"exclude": ["a"]}, ["b", "c"]),
        ({"per_layer": False}, ["a", "b", "c"]),
    ],
)
def test_layer_selection(kwargs: dict[str, Any], layers: list[str]) -> None:
    log = _history(fit(SeqModule(), SpectralAlignmentMonitor(check_every_n_steps=1, action="log", **kwargs),
                        max_steps=1))  # fmt: skip
    assert _layers(log) == _layers(log, "collapse") == layers
    assert bool(_layers(log, "std")) == kwargs.get("per_layer", True)  # per_layer=False: collapse and s_1 only


def test_selection_by_pattern_reaches_attention_blocks() -> None:
    for kwargs, layers in [({"include": ["attn"]}, ["attn.k", "attn.q", "attn.v"]),
                           ({"include": ["attn.q"]}, ["attn.q"]),
                           ({"exclude": ["attn.*", "unused"]}, ["a", "b", "c"])]:  # fmt: skip
        log = _history(fit(WithAttention(), SpectralAlignmentMonitor(check_every_n_steps=1, action="log", **kwargs),
                            max_steps=1))  # fmt: skip
        assert _layers(log) == layers, kwargs


def test_frozen_layers_are_not_watched() -> None:
    module = SeqModule()
    module.b.requires_grad_(False)
    log = _history(fit(module, SpectralAlignmentMonitor(check_every_n_steps=1, action="log"), max_steps=1))
    assert _layers(log) == ["a", "c"]


def test_include_matching_nothing_raises_value_error_listing_the_candidates() -> None:
    with pytest.raises(ValueError, match=r"matches no watchable layer; the candidates are \['a', 'b', 'c'\]"):
        fit(SeqModule(), SpectralAlignmentMonitor(include=["blocks.*"]), max_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"layer_rule": "relative"}, "`layer_rule` must be one of ('baseline', 'absolute', 'none'), got 'relative'"),
        ({"check_every_n_steps": 0}, "`check_every_n_steps` must be an int >= 1, got 0"),
        ({"max_rows": 1.5}, "`max_rows` must be an int >= 1, got 1.5"),
        ({"patience": 0}, "`patience` must be an int >= 1, got 0"),
        ({"collapse_threshold": 1.5}, "`collapse_threshold` must be a number in (0, 1], got 1.5"),
        ({"collapse_threshold": float("nan")}, "`collapse_threshold` must be a number in (0, 1], got nan"),
        ({"baseline_rise": -0.1}, "`baseline_rise` must be a number in [0, 1], got -0.1"),
        ({"mean_collapse_threshold": 0.0}, "`mean_collapse_threshold` must be None or a number in (0, 1], got 0.0"),
        ({"baseline_alpha": 1.0}, "`baseline_alpha` must be a number in (0, 1), got 1.0"),
        ({"histogram_every_n_steps": 0}, "`histogram_every_n_steps` must be None or an int >= 1, got 0"),
        ({"warmup_steps": -1}, "`warmup_steps` must be an int >= 0, got -1"),
        ({"seed": "x"}, "`seed` must be an int >= 0, got 'x'"),  # issue 10, fault 7: accepted before
        ({"include": [""]}, "`include` must be None or glob patterns"),
        ({"action": "email"}, "`action` must be one of ('log', 'warn', 'stop', 'raise')"),
        ({"rules": "spectral_alignment/mean_collapse"}, "`rules` must be a rule or a list of rules"),
        # safety issue, fault 4: strings are not booleans ('false' is truthy), and check_number everywhere
        ({"per_layer": "false"}, "`per_layer` must be True or False, got 'false'"),
        ({"exclude_head": "no"}, "`exclude_head` must be True or False, got 'no'"),
        ({"exclude_head": 0}, "`exclude_head` must be True or False, got 0"),
        ({"baseline_alpha": "0.9"}, "`baseline_alpha` must be a number in (0, 1), got '0.9'"),
        ({"mean_collapse_threshold": float("nan")}, "`mean_collapse_threshold` must be None or a number in (0, 1], "
                                                    "got nan"),
        ({"baseline_rise": True}, "`baseline_rise` must be a number in [0, 1], got True"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value_and_the_allowed_values(kwargs: dict[str, Any],
                                                                                 shown: str) -> None:
    with pytest.raises(ValueError) as error:
        SpectralAlignmentMonitor(**kwargs)
    assert shown in str(error.value)


@pytest.mark.parametrize("kwargs", [{"baseline_rise": 0.0}, {"baseline_rise": 1.0}, {"baseline_alpha": 0.5},
                                    {"mean_collapse_threshold": None}, {"mean_collapse_threshold": 1.0},
                                    {"collapse_threshold": 1.0}, {"collapse_threshold": 1}, {"seed": 7},
                                    {"per_layer": False}, {"exclude_head": False}])  # fmt: skip
def test_the_edges_of_the_allowed_ranges_are_accepted(kwargs: dict[str, Any]) -> None:
    SpectralAlignmentMonitor(**kwargs)


# -- distributed ------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_ddp_figures_equal_the_single_process_on_the_same_global_batch(tmp_path: Any) -> None:
    """The SA statistics are sums over ranks: two ranks of 32 rows log the figures of one process
    with the 64 rows (the DistributedSampler interleaves, so each step sees the same global batch).
    Before, each rank measured its own rows and rank 0 logged rank-local figures."""

    def monitor() -> SpectralAlignmentMonitor:
        return SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=2, power_iterations=100, action="log")

    torch.manual_seed(0)
    single = _history(fit(Aligning(n=256, batch_size=64), monitor(), max_steps=8))
    torch.manual_seed(0)
    csv = CSVLogger(tmp_path, name="ddp", version=0)
    fit(Aligning(n=256, batch_size=32), monitor(), max_steps=8, devices=2, strategy=ddp_on_cpu(), logger=csv,
         use_distributed_sampler=False)
    rows = np.genfromtxt(tmp_path / "ddp" / "version_0" / "metrics.csv", delimiter=",", names=True, deletechars="")
    keys = [k for k in single if k.startswith(f"{SA}/") and k != f"{SA}/alerts"]
    assert f"{SA}/std/net.1" in keys and set(keys) <= set(rows.dtype.names)
    for key in keys:
        logged = [(int(s), v) for s, v in zip(rows["step"], rows[key]) if not math.isnan(v)]
        assert [s for s, _ in logged] == [s for s, _ in single[key]] == [1, 3, 5, 7], key
        np.testing.assert_allclose([v for _, v in logged], [v for _, v in single[key]], rtol=1e-4, atol=1e-6,
                                   err_msg=key)  # fmt: skip


@pytest.mark.distributed
def test_ddp_stop_decision_is_shared_when_only_one_rank_sees_the_collapse(tmp_path: Any) -> None:
    torch.manual_seed(0)
    # Only rank 1's inputs are aligned: the global collapse is about 0.5 (half the rows one-sided), so the
    # thresholds are set below it; both ranks see the same global figures and stop at the same step.
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=2, warmup_steps=0, collapse_threshold=0.4,
                                       baseline_rise=0.25, patience=5, mean_collapse_threshold=None,
                                       layer_rule="baseline", action="stop")  # fmt: skip
    csv = CSVLogger(tmp_path, name="ddp", version=0)
    fit(Aligning(fault_step=10, fault_rank=1), monitor, max_steps=60, devices=2, strategy=ddp_on_cpu(), logger=csv,
         use_distributed_sampler=False)
    rows = np.genfromtxt(tmp_path / "ddp" / "version_0" / "metrics.csv", delimiter=",", names=True, deletechars="")
    steps = rows["step"][np.isfinite(rows[f"{SA}/mean_collapse"])]
    assert steps.max() < 30  # stopped within a few checks of the fault, on both ranks (or it would hang)
    assert np.nanmax(rows[f"{SA}/alerts"]) >= 1  # rank 0 logs the global figures, rank 1's collapse included
    assert np.nanmax(rows[f"{SA}/collapse/net.0"]) < 0.9  # diluted by rank 0's rows: no rank-local figure


# -- a real divergence, and CUDA --------------------------------------------------------------------


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
def test_tiny_transformer_lr_ramp_alerts_before_the_explosion_and_a_small_constant_lr_stays_silent() -> None:
    from lightning_diag.testbeds import CharLM, divergence_step, flush_denormals

    small = dict(n_layer=2, n_embd=32, block_size=32, batch_size=8, max_chars=200_000)
    flush_denormals(True)
    try:
        stable, ramp = dict(lr=1e-3, warmup_steps=100), dict(lr=1e-4, lr_end=3.0, ramp_steps=1000)
        per_map = dict(layer_rule="baseline", warmup_steps=200)  # the opt-in per-map rule, v0.1's warm-up
        results = {}
        for name, schedule, settings in (("stable", stable, {}), ("ramp", ramp, {}), ("ramp per map", ramp, per_map)):
            recorder, monitor = LossRecorder(), SpectralAlignmentMonitor(action="log", **settings)
            fit(CharLM(**small, **schedule), recorder, monitor, max_steps=1000, log_every_n_steps=50)
            results[name] = (divergence_step(recorder.losses), monitor.alerts)
    finally:
        flush_denormals(False)
    assert results["stable"] == (None, [])
    explosion, alerts = results["ramp"]
    per_map_explosion, per_map_alerts = results["ramp per map"]
    assert explosion is not None and per_map_explosion == explosion  # the monitors leave training alone
    assert per_map_alerts and per_map_alerts[0].step < explosion - 100  # 689 vs 861 here
    # The model-level alert comes about at the explosion: 869 vs 861 on one thread (as this suite runs), in v0.1
    # too; 829 vs 855 on two threads. Asserted to within one check of it, not before it: a calibration question.
    model_level = [a.step for a in alerts if a.metric == f"{SA}/mean_collapse"]
    assert model_level and model_level[0] <= explosion + 10


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_steps_that_do_not_log_on_cuda() -> None:
    """Every hook of the monitor runs under ``set_sync_debug_mode("error")`` on steps that do not log
    (checks included: their figures leave for the host by a non-blocking copy)."""
    checked: list[int] = []
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=6, max_rows=8, action="log")

    def strict(hook: Callable[..., Any]) -> Callable[..., Any]:
        def run(trainer: pl.Trainer, *args: Any) -> Any:
            step = trainer.global_step
            logging = any(s % 6 == 5 for s in (step - 1, step))  # a logging step's hooks, or the next step's start
            if step <= 1 or logging:  # the first check allocates and builds the device index tensors once
                return hook(trainer, *args)
            checked.append(step)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return hook(trainer, *args)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        return run

    for name in ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "on_train_batch_end"):
        setattr(monitor, name, strict(getattr(monitor, name)))  # Lightning looks hooks up on the instance
    sample, samples = monitor._sample, []  # the forward pre-hooks' row sampling (24 rows, 8 kept: a random gather)

    def strict_sample(x: torch.Tensor) -> torch.Tensor:
        samples.append(len(samples))
        if len(samples) <= 3:  # the first check creates the device generator
            return sample(x)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return sample(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monitor._sample = strict_sample
    trainer = make_trainer(callbacks=[monitor], max_steps=12, accelerator="gpu")
    trainer.fit(SeqModule())
    assert {2, 3, 4, 8, 9, 10} <= set(checked) and len(samples) == 6 * 3  # 6 checks, inputs of a, b, c
    assert [s for s, _ in trainer.logger.history[f"{SA}/sigma1/a"]] == [5, 11]


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_compiled_model_gives_the_figures_of_the_eager_one(backend: str) -> None:
    """The forward pre-hooks see the inputs of a ``torch.compile``-d model (dynamo traces the hooks)."""
    logs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        module = SeqModule()
        monitor = SpectralAlignmentMonitor(check_every_n_steps=2, max_rows=64, action="log")
        logs.append(_history(fit(torch.compile(module, backend=backend) if compiled else module, monitor,
                                  max_steps=6)))  # fmt: skip
        assert _hooks(module) == 0
    eager, compiled_log = logs
    assert eager.keys() == compiled_log.keys() and f"{SA}/std/c" in eager
    for key in eager:
        assert [s for s, _ in compiled_log[key]] == [s for s, _ in eager[key]], key
        np.testing.assert_allclose([v for _, v in compiled_log[key]], [v for _, v in eager[key]], rtol=1e-5,
                                   atol=1e-6, err_msg=key)  # fmt: skip


def test_the_per_map_collapse_rule_reads_a_map_whose_name_holds_a_slash():
    """A ``/`` in a module name is escaped in its key (``enc%2F0``); the per-map rule must read the
    map's flag by its real name, or a collapsing ``enc/0`` never fires."""
    from lightning_diag.callbacks.spectral_alignment import _LayerCollapse

    rule = _LayerCollapse({"enc/0": True, "dec": False}, 0.5, 1, 0.2, "baseline")
    keys = ["spectral_alignment/collapse/enc%2F0", "spectral_alignment/collapse/dec"]
    assert rule.update(3, keys, np.array([0.9, 0.9])) == [("spectral_alignment/collapse/enc%2F0", 0.9)]
