"""SpectralAlignmentMonitor inside real Lightning runs, against independent float64 references.

References are computed from inputs captured by the test's own forward pre-hooks and weights
captured in a callback placed after the monitor (Lightning calls callbacks in list order), with
numpy's SVD in float64.
"""

from __future__ import annotations

import datetime
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import MemoryLogger, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import DivergenceError
from lightning_diag.callbacks.spectral_alignment import SpectralAlignmentMonitor, _LayerCollapse

FIGURES = ("sign_diversity", "collapse", "mean_abs", "abs_mean", "std")


# -- models and helpers -----------------------------------------------------------------------------


class SeqModule(pl.LightningModule):
    """Sequence regressor on (B, 3, 6) inputs: ``a`` (6 -> 8), ``b``, ``c`` (8 -> 8, batched together),
    tanh after each, then the head ``out`` (8 -> 1). Optional dropout draws from the global RNG."""

    def __init__(self, dropout: float = 0.0, n: int = 48, batch_size: int = 8, shuffle: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a, self.b, self.c, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.drop = nn.Dropout(dropout)
        x = torch.randn(n, 3, 6, generator=g)
        self.data = TensorDataset(x, x.sum((1, 2)).sin().unsqueeze(1))
        self.batch_size, self.shuffle = batch_size, shuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(self.drop(h)))
        h = torch.tanh(self.c(h))
        return self.out(h).mean(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=self.shuffle)


class Aligning(pl.LightningModule):
    """A bias-free linear chain 8 -> 16 -> 16 -> 1 (head ``net.2``) regressing Gaussian inputs.

    From ``fault_step`` on (on rank ``fault_rank`` only, if set), the inputs get a mean offset along
    the top right singular vector v1 of ``net.0`` at that step, ``3 * 1.05**k`` after k steps: every
    row of ``net.0``'s input falls on one side of v1 at once, and SGD diverges some 40 steps later
    (the curvature grows with the offset) until the loss is non-finite.
    """

    def __init__(self, fault_step: int | None = None, fault_rank: int | None = None, n: int = 640) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16, bias=False), nn.Linear(16, 16, bias=False),
                                 nn.Linear(16, 1, bias=False))  # fmt: skip
        x = torch.randn(n, 8, generator=g)
        self.data = TensorDataset(x, x @ torch.randn(8, 1, generator=g))
        self.fault_step, self.fault_rank = fault_step, fault_rank
        self.direction: torch.Tensor | None = None
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        k = self.global_step - self.fault_step if self.fault_step is not None else -1
        if k >= 0 and self.fault_rank in (None, self.global_rank):
            if self.direction is None:
                self.direction = torch.linalg.svd(self.net[0].weight.detach())[2][0]
            x = x + 3.0 * 1.05**k * self.direction
        loss = nn.functional.mse_loss(self.net(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=64)


class InputCapture(Callback):
    """The test's own record of layer inputs (forward pre-hooks) and weights (after the monitor)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
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
        self.weights[trainer.global_step] = {n: modules[n].weight.detach().double().clone() for n in self.names}

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


def _fit(module: pl.LightningModule, *callbacks: Callback, **kwargs: Any) -> pl.Trainer:
    trainer = make_trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(module)
    return trainer


def _history(trainer: pl.Trainer) -> dict[str, list[tuple[int, float]]]:
    return dict(trainer.logger.history)


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in module.modules())


# -- figures against float64 references -------------------------------------------------------------


def test_per_layer_figures_match_float64_svd_of_the_weight_and_the_captured_inputs() -> None:
    torch.manual_seed(0)
    module = SeqModule()
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=2, max_rows=64, power_iterations=100,
                                       action="log")  # fmt: skip
    capture = InputCapture(["a", "b", "c"])
    log = _history(_fit(module, monitor, capture, max_steps=8))
    assert sorted(s for s, _ in log["sigma1/a"]) == [1, 3, 5, 7]
    assert "sigma1/out" not in log  # the head is excluded by default
    for step in (1, 3, 5, 7):
        for name in ("a", "b", "c"):
            expected = _reference(capture.weights[step][name], capture.inputs[step][name])
            for figure, value in expected.items():
                key = f"spectral_alignment/{figure}/{name}" if figure in FIGURES else f"{figure}/{name}"
                assert dict(log[key])[step] == pytest.approx(value, rel=1e-4, abs=1e-5), (key, step)
    mean = dict(log["spectral_alignment/mean_collapse"])
    for step in (1, 3):
        layers = [_reference(capture.weights[step][n], capture.inputs[step][n])["collapse"] for n in "abc"]
        assert mean[step] == pytest.approx(np.mean(layers), abs=1e-6)


def test_a_sign_flip_of_the_singular_vector_changes_no_logged_figure() -> None:
    class FlipWarmStart(Callback):  # placed before the monitor: negates v1 before every check
        def __init__(self, monitor: SpectralAlignmentMonitor) -> None:
            self.monitor = monitor

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            for group in self.monitor._groups or []:
                group.v1 = -group.v1

    logs = []
    for flip in (False, True):
        torch.manual_seed(0)
        monitor = SpectralAlignmentMonitor(check_every_n_steps=1, max_rows=5, action="log")
        callbacks = [FlipWarmStart(monitor), monitor] if flip else [monitor]
        logs.append(_history(_fit(SeqModule(), *callbacks, max_steps=6)))
    assert logs[0].keys() == logs[1].keys()
    for key in logs[0]:
        # Equal up to float32 rounding: D = 1 - |2 p+ - 1| rounds p+ and 1 - p+ differently.
        assert [s for s, _ in logs[0][key]] == [s for s, _ in logs[1][key]]
        np.testing.assert_allclose([v for _, v in logs[1][key]], [v for _, v in logs[0][key]], rtol=1e-6, atol=1e-7,
                                   err_msg=key)  # fmt: skip


# -- sampling hooks ---------------------------------------------------------------------------------


def test_hooks_sample_only_on_check_steps_and_are_all_removed_after_fit() -> None:
    torch.manual_seed(0)
    module = SeqModule()
    monitor = SpectralAlignmentMonitor(check_every_n_steps=3, action="log")
    sampled: list[tuple[int, int]] = []
    capture = monitor._capture
    monitor._capture = lambda index, x: (sampled.append((trainer.global_step, index)), capture(index, x))

    class CountHooks(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            self.during = _hooks(pl_module)

    counter = CountHooks()
    trainer = make_trainer(callbacks=[monitor, counter], max_steps=9)
    trainer.fit(module)
    assert sorted(sampled) == [(s, i) for s in (2, 5, 8) for i in range(3)]  # 3 layers, once per check
    assert counter.during == 3
    assert _hooks(module) == 0 and not monitor._captured


def test_hooks_are_removed_when_the_run_raises() -> None:
    torch.manual_seed(0)
    module = Aligning(fault_step=20)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, warmup_steps=0, action="raise")
    with pytest.raises(DivergenceError):
        _fit(module, monitor, max_steps=60)
    assert _hooks(module) == 0


def test_gradient_accumulation_samples_one_micro_batch_per_optimizer_step() -> None:
    torch.manual_seed(0)
    module = SeqModule()
    monitor = SpectralAlignmentMonitor(check_every_n_steps=1, max_rows=64, power_iterations=100, action="log")
    capture = InputCapture(["a"])
    log = _history(_fit(module, monitor, capture, max_steps=3, accumulate_grad_batches=2))
    assert [s for s, _ in log["sigma1/a"]] == [0, 1, 2]
    # The sampled rows are the first micro-batch's: the test hook keeps that one (setdefault).
    for step, value in log["spectral_alignment/mean_abs/a"]:
        assert value == pytest.approx(_reference(capture.weights[step]["a"], capture.inputs[step]["a"])["mean_abs"],
                                      rel=1e-4)  # fmt: skip


def test_bf16_autocast_gives_finite_figures() -> None:
    torch.manual_seed(0)
    log = _history(_fit(SeqModule(), SpectralAlignmentMonitor(check_every_n_steps=1, action="log"), max_steps=3,
                        precision="bf16-mixed"))  # fmt: skip
    assert [s for s, _ in log["sigma1/b"]] == [0, 1, 2]
    for key, records in log.items():
        assert all(math.isfinite(v) for _, v in records), key


def test_monitor_leaves_training_bit_identical_and_the_global_rng_untouched() -> None:
    finals = []
    for callbacks in ([], [SpectralAlignmentMonitor(check_every_n_steps=1, max_rows=4, action="log")]):
        torch.manual_seed(0)
        module = SeqModule(dropout=0.3, shuffle=True)  # dropout and shuffling draw from the global RNG
        _fit(module, *callbacks, max_steps=8)
        finals.append({n: p.detach().clone() for n, p in module.named_parameters()} | {"rng": torch.rand(3)})
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


def test_logging_steps_publish_the_latest_check_once_at_its_own_step() -> None:
    torch.manual_seed(0)
    log = _history(_fit(SeqModule(), SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=5,
                                                              action="log"), max_steps=20))  # fmt: skip
    # checks at 1, 3, 5, ..., logging steps 4, 9, 14, 19 publish the checks of steps 3, 9, 13, 19
    assert [s for s, _ in log["spectral_alignment/mean_collapse"]] == [3, 9, 13, 19]


# -- alerts -----------------------------------------------------------------------------------------


def test_inputs_driven_to_align_alert_before_the_loss_is_nonfinite_and_a_stable_run_stays_silent() -> None:
    runs = {}
    for fault_step in (None, 40):
        torch.manual_seed(0)
        module = Aligning(fault_step)
        monitor = SpectralAlignmentMonitor(check_every_n_steps=2, warmup_steps=20, mean_collapse_threshold=0.5,
                                           action="log")  # fmt: skip
        _fit(module, monitor, max_steps=90)
        runs[fault_step] = (module, monitor)
    stable, stable_monitor = runs[None]
    assert all(math.isfinite(v) for v in stable.losses) and stable_monitor.alerts == []
    faulty, monitor = runs[40]
    nonfinite = next(i for i, v in enumerate(faulty.losses) if not math.isfinite(v))
    first = monitor.alerts[0]
    assert first.metric == "spectral_alignment/collapse/net.0" and first.severity == "warning"
    assert 40 < first.step < nonfinite - 20  # patience 3 checks of 2 steps; the loss survives ~40 steps
    model_alert = next(a for a in monitor.alerts if a.metric == "spectral_alignment/mean_collapse")
    assert model_alert.severity == "critical" and model_alert.step < nonfinite
    assert "first first: net.0 (since step 41)" in model_alert.message


def test_a_layer_one_sided_by_construction_does_not_fire_but_a_rise_over_its_baseline_does() -> None:
    rule = _LayerCollapse(0.9, 0.4, alpha=0.9, warmup=3, patience=2)
    rule.bind(["spectral_alignment/collapse/ln_fed", "spectral_alignment/collapse/centred"])
    series = [(1.0, 0.2)] * 10 + [(1.0, 0.95)] * 3  # the first layer sits at 1 all along
    for step, values in enumerate(series):
        rule.update(torch.tensor(values), step)
    alerts = rule.take(rule.pending().tolist(), "test")
    assert [(a.metric, a.step) for a in alerts] == [("spectral_alignment/collapse/centred", 11)]
    assert rule.baseline[1].item() == pytest.approx(0.2)  # hits are not absorbed
    absolute = _LayerCollapse(0.9, None, alpha=0.9, warmup=3, patience=2)
    absolute.bind(rule.keys)
    for step, values in enumerate(series):
        absolute.update(torch.tensor(values), step)
    assert [a.step for a in absolute.take(absolute.pending().tolist(), "test")] == [1, 11]


def test_warmup_steps_mute_the_rules_but_not_the_figures() -> None:
    torch.manual_seed(0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, warmup_steps=1000, mean_collapse_threshold=0.5,
                                       action="log")  # fmt: skip
    log = _history(_fit(Aligning(fault_step=10), monitor, max_steps=30))
    assert monitor.alerts == []
    assert max(v for _, v in log["spectral_alignment/collapse/net.0"]) == 1.0


def test_stop_action_ends_the_run_after_the_alerting_step() -> None:
    torch.manual_seed(0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=2, warmup_steps=0, action="stop")
    trainer = _fit(Aligning(fault_step=20), monitor, max_steps=60)
    assert trainer.global_step == monitor.alerts[0].step + 1


# -- checkpoints ------------------------------------------------------------------------------------


def _resume_run(tmp_path: Any, stop_epoch: int | None) -> tuple[SpectralAlignmentMonitor, MemoryLogger]:
    """6 epochs of 10 steps, inputs aligned from step 30; optionally interrupted after ``stop_epoch``."""

    def parts() -> tuple[Aligning, SpectralAlignmentMonitor]:
        return Aligning(fault_step=30), SpectralAlignmentMonitor(check_every_n_steps=2, max_rows=32, warmup_steps=0,
                                                                 mean_collapse_threshold=0.5, action="log")  # fmt: skip

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
    (straight, straight_log), (resumed, resumed_log) = _resume_run(tmp_path, None), _resume_run(tmp_path, 3)
    assert straight.alerts and resumed.alerts == straight.alerts
    for key in ("spectral_alignment/collapse/net.1", "sigma1/net.0", "spectral_alignment/std/net.1"):
        assert resumed_log.history[key] == straight_log.history[key], key
    torch.testing.assert_close(resumed._layer_rule.baseline, straight._layer_rule.baseline)
    for a, b in zip(resumed._groups, straight._groups):
        torch.testing.assert_close(a.v1, b.v1)


# -- TensorBoard ------------------------------------------------------------------------------------


def test_histograms_reach_tensorboard_at_their_own_cadence(tmp_path: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, histogram_every_n_steps=5, action="log")
    _fit(SeqModule(), monitor, max_steps=12, logger=tensorboard)
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    events.Reload()
    assert set(events.Tags()["histograms"]) == {f"spectral_alignment/hist/{n}" for n in "abc"}
    # the first check at or after steps 4 and 9 (0-based: 5th and 10th step)
    assert [e.step for e in events.Histograms("spectral_alignment/hist/a")] == [5, 9]
    assert "spectral_alignment/mean_collapse" in events.Tags()["scalars"]


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(ConvOnly(), SpectralAlignmentMonitor(check_every_n_steps=1), max_steps=4)
    assert trainer.global_step == 4
    assert len([w for w in caught if "no nn.Linear layer" in str(w.message)]) == 1
    assert not [k for k in _history(trainer) if "spectral" in k or "sigma1" in k]


class WithAttention(SeqModule):
    """``nn.MultiheadAttention`` uses ``out_proj.weight`` without calling ``out_proj``.

    ``head_last``: register ``out`` again after ``attn``, so that it is the last ``nn.Linear``."""

    def __init__(self, head_last: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        if head_last:
            self.out = self._modules.pop("out")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(torch.tanh(self.c(torch.tanh(self.b(h))))).mean(1)


def test_layer_never_called_through_forward_gets_nan_figures_and_one_warning() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = _history(_fit(WithAttention(), SpectralAlignmentMonitor(check_every_n_steps=1, action="log"),
                            max_steps=3))  # fmt: skip
    assert len([w for w in caught if "no input reached ['attn.out_proj']" in str(w.message)]) == 1
    assert all(math.isnan(v) for _, v in log["spectral_alignment/collapse/attn.out_proj"])
    assert all(math.isfinite(v) for _, v in log["sigma1/attn.out_proj"])
    assert all(math.isfinite(v) for _, v in log["spectral_alignment/mean_collapse"])


def test_a_registered_last_linear_that_is_not_the_output_head_is_reported_once() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = _history(_fit(WithAttention(head_last=False), SpectralAlignmentMonitor(check_every_n_steps=1,
                            action="log"), max_steps=3))  # fmt: skip
    shown = [str(w.message) for w in caught if "`exclude_head=True` left out 'attn.out_proj'" in str(w.message)]
    assert len(shown) == 1 and "was not called through forward()" in shown[0]
    assert "sigma1/out" in log


@pytest.mark.parametrize(
    ("kwargs", "layers"),
    [
        ({}, ["a", "b", "c"]),
        ({"exclude_head": False}, ["a", "b", "c", "out"]),
        ({"include": ["b", "c"]}, ["b", "c"]),
        ({"exclude": ["a"]}, ["b", "c"]),
    ],
)
def test_layer_selection(kwargs: dict[str, Any], layers: list[str]) -> None:
    log = _history(_fit(SeqModule(), SpectralAlignmentMonitor(check_every_n_steps=1, action="log", **kwargs),
                        max_steps=1))  # fmt: skip
    assert sorted(k.rpartition("/")[2] for k in log if k.startswith("sigma1/")) == layers


def test_frozen_layers_are_not_watched() -> None:
    module = SeqModule()
    module.b.requires_grad_(False)
    log = _history(_fit(module, SpectralAlignmentMonitor(check_every_n_steps=1, action="log"), max_steps=1))
    assert sorted(k.rpartition("/")[2] for k in log if k.startswith("sigma1/")) == ["a", "c"]


def test_include_matching_nothing_raises_value_error_listing_the_candidates() -> None:
    with pytest.raises(ValueError, match=r"matches no watched nn.Linear layer; the candidates are \['a', 'b', 'c'\]"):
        _fit(SeqModule(), SpectralAlignmentMonitor(include=["blocks.*"]), max_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        ({"layer_rule": "relative"}, "one of ('baseline', 'absolute', 'none'), got 'relative'"),
        ({"check_every_n_steps": 0}, "`check_every_n_steps` must be an int >= 1, got 0"),
        ({"max_rows": 1.5}, "`max_rows` must be an int >= 1, got 1.5"),
        ({"collapse_threshold": 1.5}, "`collapse_threshold` must be in (0, 1], got 1.5"),
        ({"mean_collapse_threshold": 0.0}, "`mean_collapse_threshold` must be None or in (0, 1], got 0.0"),
        ({"baseline_alpha": 1.0}, "`baseline_alpha` must be in (0, 1), got 1.0"),
        ({"histogram_every_n_steps": 0}, "`histogram_every_n_steps` must be None or an int >= 1, got 0"),
        ({"warmup_steps": -1}, "`warmup_steps` must be an int >= 0, got -1"),
        ({"include": [""]}, "`include` must be None or glob patterns"),
        ({"action": "email"}, "`action` must be one of ('log', 'warn', 'stop', 'raise')"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_allowed_values(kwargs: dict[str, Any], shown: str) -> None:
    with pytest.raises(ValueError) as error:
        SpectralAlignmentMonitor(**kwargs)
    assert shown in str(error.value)


# -- distributed ------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_stop_decision_is_shared_when_only_one_rank_sees_the_collapse(tmp_path: Any) -> None:
    torch.manual_seed(0)
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", timeout=datetime.timedelta(seconds=60))
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=2, warmup_steps=0, action="stop")
    csv = CSVLogger(tmp_path, name="ddp", version=0)
    # Only rank 1's inputs are aligned: rank 0 logs nothing alarming but must stop with rank 1.
    _fit(Aligning(fault_step=10, fault_rank=1), monitor, max_steps=60, devices=2, strategy=strategy, logger=csv)
    rows = np.genfromtxt(tmp_path / "ddp" / "version_0" / "metrics.csv", delimiter=",", names=True, deletechars="")
    steps = rows["step"][np.isfinite(rows["spectral_alignment/mean_collapse"])]
    assert steps.max() < 30  # stopped within a few checks of the fault, on both ranks (or it would hang)
    assert np.nanmax(rows["alerts/SpectralAlignmentMonitor"]) == 0  # rank 0's own figures raised nothing


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
        results = {}
        for name, schedule in {"stable": dict(lr=1e-3, warmup_steps=100),
                               "ramp": dict(lr=1e-4, lr_end=3.0, ramp_steps=1000)}.items():  # fmt: skip
            recorder, monitor = LossRecorder(), SpectralAlignmentMonitor(action="log")
            _fit(CharLM(**small, **schedule), recorder, monitor, max_steps=1000, log_every_n_steps=50)
            results[name] = (divergence_step(recorder.losses), monitor.alerts)
    finally:
        flush_denormals(False)
    assert results["stable"] == (None, [])
    explosion, alerts = results["ramp"]
    assert explosion is not None and alerts and alerts[0].step < explosion
    assert any(a.metric == "spectral_alignment/mean_collapse" and a.step < explosion for a in alerts)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_steps_that_do_not_log_on_cuda() -> None:
    checked: list[int] = []
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=6, max_rows=8, action="log")
    hook, capture = monitor.on_before_optimizer_step, monitor._capture

    def strict(call: Any) -> Any:
        torch.cuda.set_sync_debug_mode("error")
        try:
            return call()
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def on_before_optimizer_step(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step  # the first check moves rule state to the device once
        if step > 1 and not monitor.is_logging_step(trainer, step):
            checked.append(step)
            return strict(lambda: hook(trainer, pl_module, optimizer))
        return hook(trainer, pl_module, optimizer)

    monitor.on_before_optimizer_step = on_before_optimizer_step  # Lightning looks hooks up on the instance
    monitor._capture = lambda index, x: strict(lambda: capture(index, x))
    trainer = make_trainer(callbacks=[monitor], max_steps=12, accelerator="gpu")
    trainer.fit(SeqModule())
    assert checked == [2, 3, 4, 6, 7, 8, 9, 10]
    assert [s for s, _ in trainer.logger.history["sigma1/a"]] == [5, 11]
