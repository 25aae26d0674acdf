"""LossSpikeDetector: the rules on synthetic loss streams (exact firing steps against a float64
reference), and the actions on real Trainer runs with an injected bad batch."""

from __future__ import annotations

import functools
import math
import os
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import DispatchCounter, TinyModule, assert_same_state, ddp_on_cpu, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag.alerts import Above, DivergenceError, ZScore
from lightning_diag.callbacks.loss_spike import LossSpikeDetector

RULE_KEYS = {"nonfinite": "loss_spike/loss", "zscore": "loss_spike/zscore", "factor": "loss_spike/ratio_to_min",
             "trend": "loss_spike/trend"}

# -- a float64 reference of the four rules ------------------------------------------------------


def reference_firings(
    stream: list[float], *, mode: str = "min", z_threshold: float = 6.0, alpha: float = 0.98, warmup: int = 50,
    factor: float = 2.0, trend_window: int = 100, trend_threshold: float = 0.1,
    patience: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    """The steps where each rule fires, written out from the docstring in float64."""
    patience = {"nonfinite": 1, "zscore": 1, "factor": 5, "trend": 1, **(patience or {})}
    sign = 1.0 if mode == "min" else -1.0
    seen: list[float] = []
    mean = var = 0.0
    best = math.inf
    window: list[tuple[int, float]] = []
    hits: dict[str, list[bool]] = defaultdict(list)
    for t, raw in enumerate(stream):
        finite = math.isfinite(raw)
        x = sign * raw
        ready = len(seen) >= warmup
        z = (x - mean) / (math.sqrt(var) + 1e-6) if ready and finite else 0.0
        absorbed = mean + z_threshold**2 / z * math.sqrt(var) if z > z_threshold else x
        best_value = sign * best
        usable = ready and finite and math.isfinite(best_value) and best_value > 0
        ratio = (raw / best_value if mode == "min" else best_value / raw) if usable else 0.0
        if finite:
            if len(seen) < warmup:
                seen.append(absorbed)
                mean, var = float(np.mean(seen)), float(np.var(seen))
            else:
                mean = alpha * mean + (1 - alpha) * absorbed
                var = alpha * var + (1 - alpha) * (absorbed - mean) ** 2
            window = (window + [(t, absorbed)])[-trend_window:]
        if len(seen) >= warmup:
            best = min(best, mean)
        rise = 0.0
        if len(window) == trend_window:
            steps, values = np.array(window, dtype=np.float64).T
            slope, intercept = np.polyfit(steps, values, 1)
            sxx = float(np.sum((steps - steps.mean()) ** 2))
            stderr = math.sqrt(float(np.sum((values - slope * steps - intercept) ** 2)) / (trend_window - 2) / sxx)
            rise = (slope - 3.0 * stderr) * (steps.max() - steps.min()) / abs(values.mean())
        hits["nonfinite"].append(not finite)
        hits["zscore"].append(z > z_threshold)
        hits["factor"].append(ratio > factor)
        hits["trend"].append(rise > trend_threshold)
    firings = {}
    for rule, flags in hits.items():
        streak, fired = 0, []
        for t, hit in enumerate(flags):
            streak = streak + 1 if hit else 0
            if streak == patience[rule]:
                fired.append(t)
        firings[rule] = fired
    return firings


def detector_firings(detector: LossSpikeDetector, stream: list[float]) -> dict[str, list[int]]:
    """Feed ``stream`` through the detector's host decision path, as its hooks do each step: the
    statistics (``detector.stats``) derive the figures of the loss, then the rule book
    (``detector.book``) runs every rule on them. Returns the steps where each rule fires."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for step, value in enumerate(stream):
        figures = {"loss": value, **detector.stats.update(value, step)}
        keys = [f"loss_spike/{name}" for name in figures]
        for alert in detector.book.update(step, keys, np.array(list(figures.values()), dtype=np.float64)):
            by_key[alert.metric].append(alert.step)
    return {rule: by_key[key] for rule, key in RULE_KEYS.items()}


def noisy(n: int = 600, level: float = 1.0, noise: float = 0.02, seed: int = 0) -> np.ndarray:
    return level + noise * np.random.default_rng(seed).standard_normal(n)


@functools.cache
def streams() -> dict[str, tuple[list[float], dict[str, list[int]]]]:
    """name -> (stream, the firings it must produce)."""
    base = noisy()
    spike = base.copy()
    spike[300] = 5.0
    nan = base.copy()
    nan[200] = float("nan")
    ramp = base.copy()
    ramp[300:] += 0.004 * np.arange(300)
    drop = base.copy()
    drop[300:] = 0.3 + 0.006 * np.random.default_rng(1).standard_normal(300)
    return {
        "constant_noise": (base.tolist(), {"nonfinite": [], "zscore": [], "factor": [], "trend": []}),
        "spike": (spike.tolist(), {"nonfinite": [], "zscore": [300], "factor": [], "trend": []}),
        "nan": (nan.tolist(), {"nonfinite": [200], "zscore": [], "factor": [], "trend": []}),
        # the ramp starts at 300; the noise breaks the factor streak once near the threshold
        "slow_divergence": (ramp.tolist(), {"nonfinite": [], "zscore": [], "factor": [552, 562], "trend": [341]}),
        "sudden_drop": (drop.tolist(), {"nonfinite": [], "zscore": [], "factor": [], "trend": []}),
    }


@pytest.mark.parametrize("name", ["constant_noise", "spike", "nan", "slow_divergence", "sudden_drop"])
def test_each_rule_fires_exactly_where_it_must_on_synthetic_streams(name):
    stream, expected = streams()[name]
    # the thresholds these streams were built around (v0.1's); the defaults are calibrated elsewhere
    assert detector_firings(LossSpikeDetector(factor=2.0, trend_threshold=0.1), stream) == expected
    assert reference_firings(stream) == expected


def test_slow_divergence_is_caught_by_the_trend_rule_within_a_window_and_by_the_factor_rule_later():
    stream, expected = streams()["slow_divergence"]
    # 41 steps into a +0.004/step ramp (0.2 noise-sigmas per step): the z-score never fires on it
    assert expected["trend"] == [341]
    # loss > 2 x best (about 1.0) for 5 steps in a row, where the ramp crosses 2.0
    assert all(stream[s] > 2 * 0.98 for s in range(548, 553)) and stream[547] < 2.0


def test_patience_delays_each_rule_and_a_short_streak_does_not_fire():
    stream = noisy(300).tolist()
    stream[100:103] = [10.0] * 3  # a 3-step burst
    stream[200:205] = [float("nan")] * 5
    detector = LossSpikeDetector(zscore_patience=3, nonfinite_patience=6, factor_patience=3, trend_window=None)
    got = detector_firings(detector, stream)
    assert got["zscore"] == [102] and got["factor"] == [102] and got["nonfinite"] == []


def test_rules_are_silent_during_warmup_except_nonfinite():
    stream = noisy(80).tolist()
    stream[10], stream[20] = 50.0, float("inf")
    got = detector_firings(LossSpikeDetector(warmup=30, trend_window=None, factor_patience=1), stream)
    assert got == {"nonfinite": [20], "zscore": [], "factor": [], "trend": []}


def test_max_mode_watches_drops_of_an_accuracy():
    stream = noisy(200, level=0.9, noise=0.01).tolist()
    stream[150:] = [0.3] * 50  # the accuracy collapses and stays down
    got = detector_firings(LossSpikeDetector(mode="max", trend_window=None), stream)
    assert got == reference_firings(stream, mode="max", trend_window=10**9) == {
        "nonfinite": [], "zscore": [150], "factor": [154], "trend": []}


def test_disabled_rules_are_not_evaluated_or_logged():
    detector = LossSpikeDetector(z_threshold=None, factor=None, trend_window=None, action="log", every_n_steps=1)
    assert [r.metric for r in detector.book.rules] == ["loss_spike/loss", "loss_spike/nonfinite_grads"]
    assert [k.name for k in detector.declared_keys()] == ["loss", "ema", "zscore", "nonfinite_grads", "events"]
    trainer = make_trainer(max_steps=3, callbacks=[detector])
    trainer.fit(TinyModule())
    logged = sorted(k for k in trainer.logger.history if k.startswith("loss_spike/"))
    assert logged == [f"loss_spike/{name}" for name in ("alerts", "ema", "events", "loss", "nonfinite_grads", "zscore")]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_loss_gives_nan_statistics_and_leaves_no_trace_in_the_baseline(bad):
    """Safety issue, fault 3. Before: ``zscore`` and ``ratio_to_min`` were 0.0 at a NaN loss and ``trend`` kept
    its previous value. Reference by hand: warm-up 3, alpha 0.5, trend window 3 at confidence 0."""
    from lightning_diag.metrics.spikes import LossStatistics

    stats = LossStatistics(warmup=3, alpha=0.5, trend_window=3, trend_confidence=0.0)
    got = [stats.update(x, step) for step, x in enumerate([1.0, 2.0, 3.0, 1.5, bad, 4.0])]
    # steps 0-2 warm up: mean 2, variance 2/3, best 2; step 3 is the first EMA step
    mean3, var3 = 0.5 * 2 + 0.5 * 1.5, 0.5 * (2 / 3) + 0.5 * (1.5 - 1.75) ** 2
    assert got[3] == pytest.approx({"zscore": (1.5 - 2) / (math.sqrt(2 / 3) + 1e-6), "ema": mean3,
                                    "ratio_to_min": 1.5 / 2, "trend": -0.25 * 2 / (6.5 / 3)})
    assert got[4]["ema"] == pytest.approx(mean3)  # the baseline, unchanged
    assert all(math.isnan(got[4][key]) for key in ("zscore", "ratio_to_min", "trend")), got[4]
    # step 5 as if step 4 had not happened: the EMA moves from step 3's, the window holds steps 2, 3, 5
    slope = (-4 / 3 * (3 - 8.5 / 3) - 1 / 3 * (1.5 - 8.5 / 3) + 5 / 3 * (4 - 8.5 / 3)) / (42 / 9)
    assert got[5] == pytest.approx({"zscore": (4 - mean3) / (math.sqrt(var3) + 1e-6), "ema": 0.5 * mean3 + 0.5 * 4,
                                    "ratio_to_min": 4 / mean3, "trend": slope * 3 / (8.5 / 3)})
    clean = LossStatistics(warmup=3, alpha=0.5, trend_window=3, trend_confidence=0.0)
    without = [clean.update(x, step) for step, x in [(0, 1.0), (1, 2.0), (2, 3.0), (3, 1.5), (5, 4.0)]]
    assert got[5] == without[-1]  # exactly
    assert stats.state_dict() == clean.state_dict()  # baseline, best and window: plain lists and floats


def test_a_nan_loss_before_any_value_has_no_baseline_either():
    from lightning_diag.metrics.spikes import LossStatistics

    figures = LossStatistics(warmup=3, trend_window=None).update(float("nan"), 0)
    assert sorted(figures) == ["ema", "ratio_to_min", "zscore"] and all(math.isnan(v) for v in figures.values())


def test_a_nan_loss_is_one_alert_and_neither_fires_nor_breaks_the_statistics_rules():
    """The statistics are NaN at a NaN loss; their rules skip that step (the NonFinite rule owns it): a NaN
    inside a spike streak or a trend streak neither adds an alert nor restarts the streak."""
    ramp, _ = streams()["slow_divergence"]
    stream = list(ramp)
    stream[100:102] = [8.0, 8.0]  # a 3-step spike streak with a NaN inside: zscore_patience=3 fires at 103
    stream[102], stream[103] = float("nan"), 8.0
    stream[400] = float("nan")  # inside the trend streak that fired at 341
    got = detector_firings(LossSpikeDetector(factor=2.0, trend_threshold=0.1, zscore_patience=3), stream)
    assert got == {"nonfinite": [102, 400], "zscore": [103], "factor": [552, 562], "trend": [341]}


def test_without_the_zscore_rule_spikes_still_enter_the_statistics_winsorised():
    stream = noisy(400).tolist()
    stream[300] = 1e6
    detector = LossSpikeDetector(z_threshold=None, factor=None, trend_window=20)
    assert detector_firings(detector, stream)["trend"] == []
    assert abs(float(detector.stats.baseline.mean[0]) - 1.0) < 0.01 and float(detector.stats.window.values.max()) < 1.2


def _hook_ops(depth: int, every_n_steps: int, step: int, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    """Top-level ATen ops dispatched inside the detector's hooks at optimizer step ``step``, and the
    tensors they built from host data (``torch.tensor``/``as_tensor``: a host-to-device copy on CUDA)."""
    counter, built = DispatchCounter(), []
    detector = LossSpikeDetector(action="log", warmup=1, every_n_steps=every_n_steps)
    hooks = (("on_train_batch_start", 0), ("on_before_backward", 0), ("on_before_optimizer_step", 0),
             ("on_train_batch_end", 1))
    for name, offset in hooks:
        hook = getattr(detector, name)

        def wrapped(trainer: pl.Trainer, *args: Any, _hook: Any = hook, _offset: int = offset) -> None:
            if trainer.global_step - _offset != step:
                _hook(trainer, *args)
                return
            with monkeypatch.context() as patch, counter:
                for factory in ("tensor", "as_tensor"):
                    original = getattr(torch, factory)
                    patch.setattr(torch, factory,
                                  lambda *a, _f=factory, _o=original, **k: built.append(_f) or _o(*a, **k))
                _hook(trainer, *args)

        setattr(detector, name, wrapped)  # Lightning looks hooks up on the instance
    torch.manual_seed(0)
    make_trainer(max_steps=step + 1, callbacks=[detector]).fit(TinyModule(depth=depth))
    return counter, built


def test_hooks_dispatch_one_op_per_step_and_never_read_the_device(monkeypatch):
    """The loss and the gradient flag leave for the host in one small tensor: a fixed handful of ops
    per step, the same for 2 and 20 layers (one fused max-abs norm over the gradients), on quiet
    and logging steps alike (everything else, statistics, rules, logging, is host numpy)."""
    for every_n_steps in (5, 1):  # step 2 is a quiet step, then a logging step
        (shallow, built_shallow), (deep, built_deep) = (_hook_ops(d, every_n_steps, 2, monkeypatch) for d in (2, 20))
        assert dict(shallow.ops) == dict(deep.ops), (dict(shallow.ops), dict(deep.ops))
        assert shallow.ops["aten._foreach_norm"] == 1 and sum(shallow.ops.values()) <= 20, dict(shallow.ops)
        assert shallow.ops.get("aten._local_scalar_dense", 0) == 0  # no .item(), bool(), float() on a tensor
        assert built_shallow == built_deep == []
    with DispatchCounter() as counter:  # the key is right: a read-back is counted
        bool(torch.ones(()) > 0)
    assert counter.ops["aten._local_scalar_dense"] == 1


# -- real Trainer runs --------------------------------------------------------------------------


class ScriptedLoss(pl.LightningModule):
    """``training_step`` returns ``stream[i]`` for its i-th call (micro-batch), with a graph."""

    def __init__(self, stream: list[float], batches: int = 400) -> None:
        super().__init__()
        self.stream, self.calls = stream, 0
        self.w = nn.Parameter(torch.zeros(1))
        self.data = TensorDataset(torch.zeros(batches, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        value = self.stream[self.calls]
        self.calls += 1
        return (self.w * 0).sum() + value

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=1)


def test_trainer_run_fires_on_the_same_steps_as_the_stream_and_logs_every_key():
    stream, expected = streams()["spike"]
    stream = stream[:400]
    detector = LossSpikeDetector(action="log", factor_patience=1, every_n_steps=50)
    trainer = make_trainer(max_steps=400, callbacks=[detector])
    trainer.fit(ScriptedLoss(stream))
    assert [(a.metric, a.step) for a in detector.alerts] == [("loss_spike/zscore", 300),
                                                            ("loss_spike/ratio_to_min", 300)]
    history = trainer.logger.history
    assert [s for s, _ in history["loss_spike/zscore"]] == list(range(49, 400, 50))
    assert history["loss_spike/events"][-1] == (399, 1.0)
    assert history["loss_spike/alerts"][-1] == (399, 2.0)
    assert math.isclose(history["loss_spike/loss"][0][1], stream[49], rel_tol=1e-6)
    assert detector.bad_batches == [{"epoch": 0, "batch_idx": 300, "step": 300}]
    declared = {key.key(detector.family) for key in detector.declared_keys()}
    assert declared == {f"loss_spike/{name}" for name in ("loss", "ema", "zscore", "ratio_to_min", "trend",
                                                          "nonfinite_grads", "events")}
    assert {key for key in history if key.startswith("loss_spike/")} == declared | {"loss_spike/alerts"}


def test_gradient_accumulation_watches_the_mean_of_the_micro_batch_losses():
    stream = noisy(200).tolist()
    stream[121] = 9.0  # second micro-batch of optimizer step 60
    detector = LossSpikeDetector(action="log", warmup=10, trend_window=None)
    trainer = make_trainer(max_steps=100, callbacks=[detector], accumulate_grad_batches=2)
    trainer.fit(ScriptedLoss(stream))
    logged = dict(trainer.logger.history["loss_spike/loss"])
    assert all(math.isclose(logged[s], (stream[2 * s] + stream[2 * s + 1]) / 2, rel_tol=1e-6) for s in range(100))
    assert [(a.metric, a.step) for a in detector.alerts] == [("loss_spike/zscore", 60)]
    assert detector.bad_batches == [{"epoch": 0, "batch_idx": 120, "step": 60},
                                    {"epoch": 0, "batch_idx": 121, "step": 60}]


class SpikyModule(TinyModule):
    """TinyModule trained with AdamW (weight decay); targets x1000 at the steps in ``bad_steps``."""

    def __init__(self, bad_steps: tuple[int, ...] = (15,), bad_rank: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bad_steps, self.bad_rank = bad_steps, bad_rank

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step in self.bad_steps and self.bad_rank in (None, self.global_rank):
            y = y * 1000.0
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy(v) if isinstance(v, dict) else v.clone() if isinstance(v, torch.Tensor) else v
            for k, v in state.items()}


def _equal(a: dict[Any, Any], b: dict[Any, Any]) -> bool:
    return a.keys() == b.keys() and all(
        _equal(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a)


class StateProbe(pl.Callback):
    """Model and optimizer state before and after each optimizer step (put it after the detector)."""

    def __init__(self) -> None:
        self.before: dict[int, tuple[dict[str, Any], dict[Any, Any]]] = {}
        self.after: dict[int, tuple[dict[str, Any], dict[Any, Any]]] = {}

    def _state(self, trainer: pl.Trainer) -> tuple[dict[str, Any], dict[Any, Any]]:
        return _copy(trainer.lightning_module.state_dict()), _copy(trainer.optimizers[0].state_dict()["state"])

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.before[trainer.global_step] = self._state(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.after[trainer.global_step - 1] = self._state(trainer)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_skip_leaves_weights_and_adam_state_untouched_at_the_bad_step(precision):
    torch.manual_seed(0)
    detector, probe = LossSpikeDetector(action="skip", warmup=5, trend_window=None), StateProbe()
    trainer = make_trainer(max_steps=20, callbacks=[detector, probe], precision=precision)
    trainer.fit(SpikyModule(bad_steps=(15,)))
    model_before, adam_before = probe.before[15]
    model_after, adam_after = probe.after[15]
    assert _equal(model_before, model_after) and _equal(adam_before, adam_after)
    assert int(adam_after[0]["step"]) == 15  # the step count did not advance
    assert not _equal(probe.before[16][0], probe.after[16][0])  # training goes on
    assert detector.bad_batches == [{"epoch": 1, "batch_idx": 7, "step": 15}]
    assert trainer.logger.history["loss_spike/skipped"][-1] == (19, 1.0)
    assert not any(_equal(probe.before[s][0], probe.after[s][0]) for s in range(15))
    assert type(trainer.optimizers[0]).step is trainer.optimizers[0].step.__func__  # the gate was removed


class NanFrom(SpikyModule):
    """The loss is NaN from step ``start`` on."""

    def __init__(self, start: int) -> None:
        super().__init__(bad_steps=())
        self.start = start

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.start else loss


def test_skip_stops_the_run_after_max_consecutive_skips():
    detector = LossSpikeDetector(action="skip", warmup=5, trend_window=None, max_consecutive_skips=3)
    trainer = make_trainer(max_steps=40, callbacks=[detector])
    with pytest.warns(UserWarning, match="3 steps skipped in a row"):
        trainer.fit(NanFrom(10))
    assert trainer.global_step == 13 and detector.skipped == 3
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_two_detectors_on_one_loss_skip_spikes_and_watch_the_trend_separately(tmp_path):
    skip = LossSpikeDetector(action="skip", warmup=5, trend_window=None, every_n_steps=1)
    trend = LossSpikeDetector(action="stop", z_threshold=None, factor=None, trend_window=5, every_n_steps=1,
                              prefix="loss_trend")
    assert skip.state_key != trend.state_key
    trainer = make_trainer(max_steps=20, callbacks=[skip, trend, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                           enable_checkpointing=True)
    trainer.fit(SpikyModule(bad_steps=(15,)))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[skip.state_key]["skipped"] == 1 and saved[trend.state_key]["skipped"] == 0
    assert skip.bad_batches == [{"epoch": 1, "batch_idx": 7, "step": 15}] and trend.bad_batches == []
    logged = trainer.logger.history
    assert "loss_trend/trend" in logged and "loss_spike/skipped" in logged and "loss_trend/skipped" not in logged


def test_fp16_scaler_overflow_steps_are_not_spikes_and_a_real_spike_is_skipped():
    torch.manual_seed(0)
    # init scale 2**24 overflows the fp16 gradients for the first steps: the scaler skips them
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=10**6)
    detector, probe = LossSpikeDetector(action="skip", warmup=5, trend_window=None), StateProbe()
    trainer = make_trainer(max_steps=20, callbacks=[detector, probe],
                           plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    module = SpikyModule(bad_steps=(15,))
    losses: dict[int, float] = {}
    module.on_train_batch_end = lambda outputs, batch, i: losses.__setitem__(module.global_step - 1,
                                                                             float(outputs["loss"]))
    trainer.fit(module)
    assert scaler.get_scale() < 2.0**24  # overflow steps happened...
    assert _equal(probe.before[0][0], probe.after[0][0])  # ...and the scaler skipped them
    assert [(a.metric, a.step) for a in detector.alerts] == [("loss_spike/zscore", 15)]  # ...without alerts
    logged = dict(trainer.logger.history["loss_spike/loss"])
    assert all(math.isclose(logged[s], losses[s], rel_tol=1e-6) for s in range(20))  # the unscaled loss
    assert _equal(probe.before[15][0], probe.after[15][0]) and _equal(probe.before[15][1], probe.after[15][1])


def test_rollback_restores_the_newest_healthy_snapshot_keeps_the_statistics_then_stops_after_max_rollbacks():
    """Changed with issue "recover": a rollback no longer rewinds the detector's statistics (the baseline
    goes on: no second warm-up), lowers the learning rate (``lr_scale``), never returns twice to the same
    snapshot, and the stop past ``max_rollbacks`` is a critical alert."""
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="rollback", warmup=5, trend_window=None, every_n_steps=1,
                                 snapshot_every_n_steps=4, max_rollbacks=1)
    taken: list[int] = []
    add = detector.snapshots.add
    detector.snapshots.add = lambda trainer: taken.append(trainer.global_step) or add(trainer)
    probe = StateProbe()
    trainer = make_trainer(max_steps=40, callbacks=[detector, probe])
    with pytest.warns(UserWarning, match="rolled back"):
        trainer.fit(SpikyModule(bad_steps=(14, 22)))
    first = max(s for s in taken if s <= 14)  # the newest snapshot before the spike, at once
    assert first >= 8 and _equal(probe.after[14][0], probe.before[first][0])
    assert _equal(probe.after[14][1], probe.before[first][1])
    second = max(s for s in taken if s <= 22)
    assert second != first and _equal(probe.after[22][0], probe.before[second][0])
    assert trainer.global_step == 23  # the second spike exceeded max_rollbacks=1: restore, then stop
    assert int(detector.stats.baseline.count[0]) == 23  # the loss of every step went in: never rewound
    assert detector.lr_scale == pytest.approx(0.5)  # lowered by the first rollback (the last one stops instead)
    assert trainer.logger.history["loss_spike/rollbacks"][-2:] == [(21, 1.0), (22, 2.0)]
    assert [b["step"] for b in detector.bad_batches] == [14, 22]
    assert [(a.metric, a.step, a.severity) for a in detector.alerts if a.metric == "loss_spike/rollbacks"] == [
        ("loss_spike/rollbacks", 14, "warning"), ("loss_spike/rollbacks", 22, "critical")]
    assert [(a.metric, a.step, a.acted_step) for a in detector.alerts if a.metric == "loss_spike/zscore"] == [
        ("loss_spike/zscore", 14, 14), ("loss_spike/zscore", 22, 22)]


def test_stop_ends_the_run_and_model_checkpoint_saves_a_finite_model(tmp_path):
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="stop", warmup=5, trend_window=None, every_n_steps=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(max_steps=40, callbacks=[detector, checkpoint], enable_checkpointing=True)
    trainer.fit(SpikyModule(bad_steps=(15,)))
    assert trainer.global_step == 16
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 16
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values())
    [state] = [v for k, v in saved["callbacks"].items() if k.startswith("LossSpikeDetector")]
    assert state["bad_batches"] == [{"epoch": 1, "batch_idx": 7, "step": 15}]


def test_raise_throws_divergence_error_naming_the_rule():
    detector = LossSpikeDetector(action="raise", warmup=5, trend_window=None, every_n_steps=1)
    with pytest.raises(DivergenceError, match="loss_spike/zscore"):
        make_trainer(max_steps=40, callbacks=[detector]).fit(SpikyModule(bad_steps=(15,)))


class WithLambdaLR(SpikyModule):
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)}


class RateInUse(pl.Callback):
    """The learning rate each SGD step used, read from the update itself: ``-(w_after - w_before) / grad``."""

    def __init__(self) -> None:
        self.rates: dict[int, float] = {}
        self._before: tuple[torch.Tensor, torch.Tensor] | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        p = max(pl_module.parameters(), key=lambda q: float(q.grad.abs().max()))
        self._before = (p, p.detach().clone(), p.grad.detach().clone())

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        p, before, grad = self._before
        i = int(grad.abs().argmax())
        self.rates[trainer.global_step - 1] = float((before.flatten()[i] - p.detach().flatten()[i]) / grad.flatten()[i])


def test_reduce_lr_multiplies_the_rate_in_use_and_lambda_schedulers_keep_it():
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="reduce_lr", lr_factor=0.25, warmup=5, factor=None, trend_window=None,
                                 every_n_steps=1)
    rates = RateInUse()
    trainer = make_trainer(max_steps=25, callbacks=[detector, rates])
    with pytest.warns(UserWarning, match="multiplied by 0.25"):
        trainer.fit(WithLambdaLR(bad_steps=(15,)))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01)  # the schedule's own value...
    assert rates.rates[14] == pytest.approx(0.01, rel=1e-3)
    assert rates.rates[16] == pytest.approx(0.0025, rel=1e-3) and rates.rates[24] == pytest.approx(0.0025, rel=1e-3)
    history = trainer.logger.history["loss_spike/lr_scale"]
    assert history[14:17] == [(14, 1.0), (15, 0.25), (16, 0.25)] and history[-1] == (24, 0.25)  # logged after acting


class WithScheduler(SpikyModule):
    """SGD at 0.01 under ``SequentialLR`` (x1, then x0.5 from step 18) or ``ChainedScheduler`` (x0.5, then x1)."""

    def __init__(self, kind: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kind = kind

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler
        if self.kind == "sequential":
            parts = [sched.ConstantLR(optimizer, factor=1.0, total_iters=18), sched.ConstantLR(optimizer, factor=0.5,
                                                                                               total_iters=10**6)]
            scheduler = sched.SequentialLR(optimizer, parts, milestones=[18])
        else:
            scheduler = sched.ChainedScheduler([sched.ConstantLR(optimizer, factor=0.5, total_iters=18),
                                                sched.MultiplicativeLR(optimizer, lambda s: 1.0)])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@pytest.mark.parametrize("kind", ["sequential", "chained"])
def test_reduce_lr_survives_sequential_and_chained_schedulers(kind):
    """Issue 18, 2. Before: ``SequentialLR`` and ``ChainedScheduler`` put the learning rate back to
    1.0x of the schedule at their milestone, while ``loss_spike/lr_scale`` still said 0.25 (the
    reduction was written into ``param_groups``, which these schedulers overwrite)."""
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="reduce_lr", lr_factor=0.25, warmup=5, factor=None, trend_window=None)
    rates = RateInUse()
    with pytest.warns(UserWarning, match="multiplied by 0.25"):
        make_trainer(max_steps=25, callbacks=[detector, rates]).fit(WithScheduler(kind, bad_steps=(15,)))
    schedule = {s: 0.01 * (0.5 if (kind == "sequential") == (s >= 18) else 1.0) for s in range(25)}
    assert detector.lr_scale == pytest.approx(0.25)
    for step in (14, 16, 20, 24):  # before the reduction, after it, and past the milestone
        assert rates.rates[step] == pytest.approx(schedule[step] * (0.25 if step > 15 else 1.0), rel=1e-3), step


def test_warn_action_warns_once_per_alert():
    detector = LossSpikeDetector(warmup=5, trend_window=None, every_n_steps=5)
    with pytest.warns(UserWarning, match=r"loss_spike/zscore = .* at step 15"):
        make_trainer(max_steps=20, callbacks=[detector]).fit(SpikyModule(bad_steps=(15,)))


class ValidationLoss(TinyModule):
    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values, self.runs = values, 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.values[self.runs])

    def on_validation_epoch_end(self) -> None:
        self.runs += 0 if self.trainer.sanity_checking else 1

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=64)


def test_validation_metric_is_checked_once_per_validation_run():
    values = noisy(30, level=0.5, noise=0.01).tolist()
    values[20] = 3.0
    detector = LossSpikeDetector(monitor="val_loss", check_on="validation", warmup=5, trend_window=None,
                                 action="log")
    trainer = make_trainer(max_steps=24, callbacks=[detector], val_check_interval=1, check_val_every_n_epoch=None,
                           num_sanity_val_steps=0)
    trainer.fit(ValidationLoss(values))
    assert [(a.metric, a.step) for a in detector.alerts] == [("loss_spike/zscore", 21)]  # 21st run: step 21
    assert detector.bad_batches == [{"epoch": 2, "batch_idx": None, "step": 21}]
    assert len(trainer.logger.history["loss_spike/loss"]) == 24


def test_missing_monitored_metric_lists_the_available_ones():
    detector = LossSpikeDetector(monitor="train_acc")
    with pytest.raises(ValueError, match=r"found no such metric; logged metrics are: \[\]"):
        make_trainer(max_steps=2, callbacks=[detector]).fit(TinyModule())


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    def run(ckpt_path: str | None = None) -> tuple[pl.Trainer, LossSpikeDetector]:
        torch.manual_seed(0)
        detector = LossSpikeDetector(action="skip", warmup=5, trend_window=6, every_n_steps=5)
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=24, save_top_k=-1)
        trainer = make_trainer(max_steps=40, callbacks=[detector, checkpoint], enable_checkpointing=True)
        trainer.fit(SpikyModule(bad_steps=(10, 21, 29)), ckpt_path=ckpt_path)
        return trainer, detector

    straight_trainer, straight = run()
    # Saved after 24 steps, the end of the third epoch of 8 batches (so the resumed run reads the
    # same batches), between the logging steps 19 and 24: step 21 is bad and was never logged.
    saved = torch.load(tmp_path / "epoch=2-step=24.ckpt", weights_only=True)  # plain lists and tensors
    [state] = [v for k, v in saved["callbacks"].items() if k.startswith("LossSpikeDetector")]
    assert sorted(state["stats"]["window"]["steps"]) == [18.0, 19.0, 20.0, 21.0, 22.0, 23.0]  # the trend window
    assert state["bad_batches"] == straight.bad_batches[:2] and [a["step"] for a in state["alerts"]] == [10, 21]
    trainer, resumed = run(str(tmp_path / "epoch=2-step=24.ckpt"))
    assert [b["step"] for b in resumed.bad_batches] == [10, 21, 29]
    assert resumed.bad_batches == straight.bad_batches
    assert_same_state(resumed.state_dict(), straight.state_dict(), rel=1e-9, abs=1e-12)
    assert int(resumed.stats.baseline.count[0]) == 40  # the baseline went on; no second warm-up
    history = trainer.logger.history
    assert history["loss_spike/events"][0] == (24, 2.0) and history["loss_spike/skipped"][-1] == (39, 3.0)
    for key in ("loss_spike/loss", "loss_spike/zscore", "loss_spike/ema", "loss_spike/ratio_to_min",
                "loss_spike/trend", "loss_spike/events", "loss_spike/skipped", "loss_spike/alerts"):
        expected = [(step, pytest.approx(v, rel=1e-6))
                    for step, v in straight_trainer.logger.history[key] if step >= 24]
        assert history[key] == expected and len(expected) >= 4, key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "explode"}, r"`action` must be one of \('log', 'warn', 'stop', 'raise', 'skip', 'rollback'"),
        ({"mode": "up"}, r"`mode` must be one of \('min', 'max'\), got 'up'"),
        ({"check_on": "epoch"}, r"`check_on` must be one of \('step', 'validation'\)"),
        ({"check_on": "validation"}, "needs `monitor`"),
        ({"action": "skip", "monitor": "val_loss"}, "needs `monitor=None`"),
        ({"z_threshold": 0}, "`z_threshold` must be None or a number > 0, got 0"),
        ({"factor": 1.0}, r"`factor` must be None or a number > 1, got 1\.0"),
        ({"trend_window": 2}, "`trend_window` must be an int >= 3"),
        ({"trend_threshold": -1}, "`trend_threshold` must be a number > 0, got -1"),
        ({"zscore_patience": 0}, "`zscore_patience` must be an int >= 1"),
        ({"max_rollbacks": -1}, "`max_rollbacks` must be an int >= 0"),
        ({"lr_factor": 1.5}, r"`lr_factor` must be a number in \(0, 1\), got 1.5"),
        ({"action": "recover", "monitor": "val_loss"}, "needs `monitor=None`"),
        ({"keep_snapshots": 0}, "`keep_snapshots` must be an int >= 1"),
        ({"rollback_after": 0}, "`rollback_after` must be an int >= 1"),
        ({"rollback_skip_batches": -1}, "`rollback_skip_batches` must be an int >= 0"),
        ({"skip_batches": [3]}, r"a batch to skip must be \(epoch, batch_idx\)"),
        ({"alpha": 1.0}, r"`alpha` must be a number in \(0, 1\), got 1.0"),  # check_number in EmaBaseline
        ({"monitor": ""}, "`monitor` must be None"),
        ({"every_n_steps": 0}, "`every_n_steps` must be None or an int >= 1"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_allowed_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossSpikeDetector(**kwargs)


def test_skip_refuses_lbfgs():
    class WithLBFGS(TinyModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.LBFGS(self.parameters())

    with pytest.raises(ValueError, match="cannot skip or scale the steps of LBFGS"):
        make_trainer(max_steps=2, callbacks=[LossSpikeDetector(action="skip")]).fit(WithLBFGS())


def test_user_rules_run_on_the_logged_keys():
    # the counters too (they are computed after the built-in rules have seen the step)
    detector = LossSpikeDetector(action="log", warmup=5, trend_window=None, every_n_steps=5,
                                 rules=[Above("loss_spike/loss", 100.0), Above("loss_spike/events", 0.5)])
    make_trainer(max_steps=20, callbacks=[detector]).fit(SpikyModule(bad_steps=(15,)))
    fired = [(a.metric, a.step) for a in detector.alerts]
    assert ("loss_spike/loss", 15) in fired and ("loss_spike/events", 15) in fired


def test_one_rule_is_accepted_without_a_list_and_a_nonpositive_zscore_threshold_is_refused():
    """Issue 10, fault 7. Before: ``rules=Above(...)`` failed with ``'Above' object is not iterable``
    and ``ZScore(..., threshold=-1)`` was accepted and fired on every value."""
    detector = LossSpikeDetector(action="log", warmup=5, trend_window=None, rules=Above("loss_spike/loss", 100.0))
    make_trainer(max_steps=20, callbacks=[detector]).fit(SpikyModule(bad_steps=(15,)))
    assert [(a.metric, a.step) for a in detector.alerts if a.metric == "loss_spike/loss"] == [("loss_spike/loss", 15)]
    with pytest.raises(ValueError, match=r"`threshold` of a z-score must be > 0.*got -1"):
        LossSpikeDetector(rules=ZScore("loss_spike/loss", threshold=-1))
    with pytest.raises(ValueError, match=r"`threshold` of a z-score must be > 0.*got 0"):
        ZScore("loss_spike/loss", threshold=0)


# -- manual optimization ----------------------------------------------------------------------------


class TwoOptimizers(pl.LightningModule):
    """Manual optimization of two sub-networks, each with its own Adam; the inputs of batch
    ``nan_batch`` are NaN. ``backward="one"``: one loss, one ``manual_backward``, then both steps;
    ``"each"`` (GAN-like): a forward, backward and step per optimizer."""

    def __init__(self, nan_batch: int, backward: str) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.encoder, self.head = nn.Linear(4, 8), nn.Linear(8, 1)
        self.nan_batch, self.backwards = nan_batch, backward  # not `backward`: a LightningModule method
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, generator=g)
        self.data = TensorDataset(x, x.sum(1, keepdim=True).sin())

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.head(torch.tanh(self.encoder(x))), y)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        if batch_idx == self.nan_batch:
            x = x * float("nan")
        optimizers = self.optimizers()
        if self.backwards == "one":
            for optimizer in optimizers:
                optimizer.zero_grad()
            self.manual_backward(self._loss(x, y))
            for optimizer in optimizers:
                optimizer.step()
        else:
            for optimizer in optimizers:
                optimizer.zero_grad()
                self.manual_backward(self._loss(x, y))
                optimizer.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.Adam(self.encoder.parameters(), lr=1e-2), torch.optim.Adam(self.head.parameters(), lr=1e-2)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


class BatchProbe(pl.Callback):
    """Parameters and every optimizer's state before and after each batch."""

    def __init__(self) -> None:
        self.before: dict[int, Any] = {}
        self.after: dict[int, Any] = {}

    def _state(self, trainer: pl.Trainer) -> Any:
        optimizers = [_copy(o.state_dict()["state"]) for o in trainer.optimizers]
        return _copy(trainer.lightning_module.state_dict()), optimizers

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.before[batch_idx] = self._state(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.after[batch_idx] = self._state(trainer)


@pytest.mark.parametrize("backward", ["one", "each"])
def test_skip_under_manual_optimization_protects_every_optimizer(backward):
    """Issue 10, fault 3. Before: under manual optimization with two optimizers and one backward,
    ``action="skip"`` gated only the first optimizer's step: on a NaN batch the second optimizer
    stepped with NaN gradients and ``head`` became NaN (checked on v0.1). A backward per optimizer
    was protected already; it stays here as the second case."""
    torch.manual_seed(0)
    detector, probe = LossSpikeDetector(action="skip", warmup=3, trend_window=None), BatchProbe()
    trainer = make_trainer(max_steps=16, callbacks=[detector, probe])  # 2 optimizer steps per batch
    trainer.fit(TwoOptimizers(nan_batch=5, backward=backward))
    (model_before, adams_before), (model_after, adams_after) = probe.before[5], probe.after[5]
    assert _equal(model_before, model_after)  # both sub-networks untouched...
    assert all(_equal(a, b) for a, b in zip(adams_before, adams_after))  # ...and both optimizers' moments
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    for name in ("encoder.weight", "head.weight"):  # training goes on, with both optimizers
        assert not torch.equal(probe.before[6][0][name], probe.after[6][0][name])
    assert detector.skipped == 2  # the two optimizer steps of the NaN batch (global_step counts both)
    assert {(a.metric, a.acted_step - a.step) for a in detector.alerts} == {("loss_spike/loss", 0)}


# -- action latency ---------------------------------------------------------------------------------


def _stop(alert: Any, trainer: pl.Trainer) -> None:
    trainer.should_stop = True


@pytest.mark.parametrize("action", ["stop", "raise", "callable", "skip", "rollback", "reduce_lr"])
def test_every_action_takes_effect_within_one_step_at_the_default_logging_cadence(action):
    """Issue 10, action latency. Before: alerts reached the host only at logging steps, so with
    Lightning's default ``log_every_n_steps=50`` a NaN loss at step 10 with ``action="stop"``
    stopped the run at step 50, after 40 steps of NaN training, and every other action waited too."""
    torch.manual_seed(0)
    detector = LossSpikeDetector(action=_stop if action == "callable" else action, warmup=5, trend_window=None,
                                 snapshot_every_n_steps=4)
    probe = StateProbe()
    trainer = make_trainer(max_steps=20, callbacks=[detector, probe], log_every_n_steps=50)
    module = NanFrom(10)
    if action == "raise":
        with pytest.raises(DivergenceError, match="loss_spike/loss"):
            trainer.fit(module)
    else:
        trainer.fit(module)
    first = detector.alerts[0]
    assert (first.metric, first.step, first.severity) == ("loss_spike/loss", 10, "critical")
    assert all(a.acted_step is not None and 0 <= a.acted_step - a.step <= 1 for a in detector.alerts)
    if action in ("stop", "raise", "callable"):
        assert trainer.global_step <= 12  # stopped at step 10 or 11, not at the logging step 49
    if action == "skip":  # the NaN step itself was skipped
        assert _equal(probe.before[10][0], probe.after[10][0])
    if action in ("skip", "rollback"):
        assert all(torch.isfinite(p).all() for p in module.parameters())
    if action == "reduce_lr":
        assert detector.lr_scale == pytest.approx(0.5)  # reduced once, for the streak


# -- DDP on 2 CPU processes ---------------------------------------------------------------------


class RankReport(pl.Callback):
    """Writes what each rank saw to ``<dirpath>/rank<r>.pt``: its own (local) loss per step, whether
    the bad step changed its weights, and its detector's state."""

    def __init__(self, dirpath: str, bad_step: int) -> None:
        self.dirpath, self.bad_step, self.unchanged = dirpath, bad_step, None
        self.local_loss: dict[int, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.bad_step:
            self.before = _copy(trainer.lightning_module.state_dict())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.local_loss[trainer.global_step - 1] = float(outputs["loss"])
        if trainer.global_step - 1 == self.bad_step:
            self.unchanged = _equal(self.before, trainer.lightning_module.state_dict())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        [detector] = [c for c in trainer.callbacks if isinstance(c, LossSpikeDetector)]
        torch.save({"global_step": trainer.global_step, "bad_batches": detector.bad_batches,
                    "skipped": detector.skipped, "unchanged": self.unchanged, "local_loss": self.local_loss,
                    "state": detector.state_dict(), "weights": _copy(pl_module.state_dict())},
                   os.path.join(self.dirpath, f"rank{trainer.global_rank}.pt"))


def _ddp_run(tmp_path: Any, action: str) -> tuple[list[dict[str, Any]], np.ndarray]:
    """16 steps on 2 ranks, the loss x10^6 on rank 1 only at step 9; what each rank saw, and the
    rows of rank zero's CSV log (logging every 4 steps)."""
    torch.manual_seed(0)
    detector = LossSpikeDetector(action=action, warmup=5, trend_window=None, every_n_steps=4)
    strategy = ddp_on_cpu(timeout_s=30)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=16,
                         logger=CSVLogger(tmp_path, name="ddp", version=0), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[detector, RankReport(str(tmp_path), bad_step=9)])
    trainer.fit(SpikyModule(bad_steps=(9,), bad_rank=1, n=64, batch_size=8))
    rows = np.genfromtxt(tmp_path / "ddp" / "version_0" / "metrics.csv", delimiter=",", names=True, deletechars="")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)], rows


@pytest.mark.distributed
def test_ddp_spike_on_one_rank_skips_the_step_on_both_and_the_loss_is_the_mean_over_ranks(tmp_path):
    (rank0, rank1), rows = _ddp_run(tmp_path, "skip")
    assert rank0["skipped"] == rank1["skipped"] == 1
    assert rank0["unchanged"] and rank1["unchanged"]
    assert rank0["bad_batches"] == rank1["bad_batches"] == [{"epoch": 2, "batch_idx": 1, "step": 9}]
    assert _equal(rank0["weights"], rank1["weights"])
    # the figures are global: the logged loss is the mean of the two ranks' losses, and both ranks
    # hold the same statistics, rules and alerts, so they decide alike without a collective
    logged = {int(s): v for s, v in zip(rows["step"], rows["loss_spike/loss"]) if not np.isnan(v)}
    assert sorted(logged) == [3, 7, 11, 15]
    for step, value in logged.items():
        mean = (rank0["local_loss"][step] + rank1["local_loss"][step]) / 2
        assert value == pytest.approx(mean, rel=1e-6)
        assert abs(rank0["local_loss"][step] - rank1["local_loss"][step]) > 1e-4  # the ranks did see different losses
    assert rank1["local_loss"][9] > 1e3 * rank0["local_loss"][9]
    assert_same_state(rank0["state"], rank1["state"], rel=1e-9, abs=1e-12)
    assert [(a["metric"], a["step"]) for a in rank0["state"]["alerts"]] == [("loss_spike/zscore", 9)]


@pytest.mark.distributed
def test_ddp_spike_on_one_rank_stops_both_at_once(tmp_path):
    (rank0, rank1), _ = _ddp_run(tmp_path, "stop")
    assert rank0["global_step"] == rank1["global_step"] == 10  # stopped after step 9, not at the logging step 11
    assert rank0["bad_batches"] == rank1["bad_batches"] == [{"epoch": 2, "batch_idx": 1, "step": 9}]
    for rank in (rank0, rank1):
        alerts = [(a["metric"], a["step"], a["acted_step"]) for a in rank["state"]["alerts"]]
        assert alerts == [("loss_spike/zscore", 9, 9)]


# -- the guard: a non-finite gradient behind a finite loss --------------------------------------


class NanGradsFrom(SpikyModule):
    """From step ``start`` on (until ``stop``) the loss stays finite but every gradient is NaN:
    ``sqrt(0 * w)`` adds 0 to the loss and ``0 * inf = NaN`` to each weight's gradient."""

    def __init__(self, start: int, stop: int = 10**9) -> None:
        super().__init__(bad_steps=())
        self.start, self.stop = start, stop

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.start <= self.global_step < self.stop:
            loss = loss + sum((p * 0).abs().sqrt().sum() for p in self.parameters())
        return loss


def test_nan_gradients_behind_a_finite_loss_are_detected_and_skipped_and_adam_stays_finite():
    """Issue 18, 1. Before: the README's ``LossSpikeDetector(action="skip")`` let a step with a finite
    loss and NaN gradients through: the weights and Adam's moments became NaN, and the detector
    only fired one step later, on the NaN loss of a dead model."""
    torch.manual_seed(0)
    detector, probe = LossSpikeDetector(action="skip", warmup=5, trend_window=None), StateProbe()
    trainer = make_trainer(max_steps=20, callbacks=[detector, probe])
    trainer.fit(NanGradsFrom(12, stop=13))
    (model_before, adam_before), (model_after, adam_after) = probe.before[12], probe.after[12]
    assert _equal(model_before, model_after) and _equal(adam_before, adam_after)  # nothing reached the weights
    assert all(torch.isfinite(t).all() for state in adam_after.values() for t in state.values())
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    assert [(a.metric, a.step, a.severity) for a in detector.alerts] == [("loss_spike/nonfinite_grads", 12, "critical")]
    assert detector.skipped == 1 and detector.bad_batches == [{"epoch": 1, "batch_idx": 4, "step": 12}]
    assert not _equal(probe.before[13][0], probe.after[13][0])  # training goes on


def test_without_skip_nan_gradients_reach_the_weights_and_are_alerted():
    """The same run with ``action="log"``: the alert names the gradients (one alert for the event),
    and nothing stops the update: this is what ``skip`` prevents."""
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="log", warmup=5, trend_window=None)
    trainer = make_trainer(max_steps=14, callbacks=[detector])
    trainer.fit(NanGradsFrom(12, stop=13))
    assert not all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())
    assert [(a.metric, a.step) for a in detector.alerts][0] == ("loss_spike/nonfinite_grads", 12)


def test_the_skip_budget_stops_a_dead_model_with_a_critical_alert_naming_the_cause():
    """Issue 18, 1. Before: with NaN gradients from step 22 on, ``skip`` skipped 77 steps of a dead
    model without stopping (default budget 100). Now the default is 10 and the stop is a critical
    alert that names why the steps were bad."""
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="skip", warmup=5, trend_window=None)
    assert detector.max_consecutive_skips == 10
    trainer = make_trainer(max_steps=60, callbacks=[detector])
    with pytest.warns(UserWarning, match="10 steps skipped in a row"):
        trainer.fit(NanGradsFrom(12))
    assert trainer.global_step == 22 and detector.skipped == 10
    last = detector.alerts[-1]
    assert (last.metric, last.severity, last.step) == ("loss_spike/skipped", "critical", 21)
    assert "nonfinite_grads" in last.message and "no longer trains" in last.message
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


class TwoLosses(TwoOptimizers):
    """Manual optimization, one loss per optimizer: the encoder's loss is NaN at ``nan_batch``, the
    head's loss (on detached features) stays finite."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_encoder, opt_head = self.optimizers()
        features = self.encoder(x)
        encoder_loss = nn.functional.mse_loss(self.head(features), y)
        if batch_idx == self.nan_batch:
            encoder_loss = encoder_loss * float("nan")
        opt_encoder.zero_grad()
        self.manual_backward(encoder_loss)
        opt_encoder.step()
        opt_head.zero_grad()
        self.manual_backward(nn.functional.mse_loss(self.head(features.detach()), y))
        opt_head.step()


def test_manual_optimization_skips_every_optimizer_of_a_batch_whose_first_loss_was_nan():
    """Issue 18, 2. Before: with one loss per optimizer, the second optimizer stepped in the batch
    whose first loss was NaN (its own loss was finite): the batch was half-applied."""
    torch.manual_seed(0)
    detector, probe = LossSpikeDetector(action="skip", warmup=3, trend_window=None), BatchProbe()
    make_trainer(max_steps=16, callbacks=[detector, probe]).fit(TwoLosses(nan_batch=5, backward="each"))
    (model_before, adams_before), (model_after, adams_after) = probe.before[5], probe.after[5]
    assert _equal(model_before, model_after) and all(_equal(a, b) for a, b in zip(adams_before, adams_after))
    assert detector.skipped == 2
    assert not torch.equal(probe.before[6][0]["head.weight"], probe.after[6][0]["head.weight"])


@pytest.mark.parametrize("action", ["stop", "raise", "skip", "rollback", "reduce_lr", "warn"])
def test_every_action_acts_on_nan_gradients_behind_a_finite_loss(action):
    """The gradient rule is a batch rule like the non-finite loss: every action takes effect on it
    within one step, and skip and rollback keep the weights finite."""
    torch.manual_seed(0)
    detector = LossSpikeDetector(action=action, warmup=5, trend_window=None, snapshot_every_n_steps=4)
    trainer = make_trainer(max_steps=16, callbacks=[detector], log_every_n_steps=50)
    module = NanGradsFrom(10, stop=11)
    if action == "raise":
        with pytest.raises(DivergenceError, match="nonfinite_grads"):
            trainer.fit(module)
    elif action == "warn":
        with pytest.warns(UserWarning, match="nonfinite_grads"):
            trainer.fit(module)
    else:
        trainer.fit(module)
    first = detector.alerts[0]
    assert (first.metric, first.step, first.acted_step) == ("loss_spike/nonfinite_grads", 10, 10)
    if action == "stop":
        assert trainer.global_step == 11
    if action in ("skip", "rollback"):
        assert all(torch.isfinite(p).all() for p in module.parameters())
    if action == "reduce_lr":  # reduced at once (and again when the NaN weights give a NaN loss next)
        assert detector.lr_scale < 1.0
