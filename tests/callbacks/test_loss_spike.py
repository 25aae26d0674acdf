"""LossSpikeDetector: the rules on synthetic loss streams (exact firing steps against a float64
reference), and the actions on real Trainer runs with an injected bad batch."""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
from collections import defaultdict
from datetime import timedelta
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import TinyModule, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag.alerts import Above, DivergenceError
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
    """Feed ``stream`` straight through the detector's device rules; the steps where each fires."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for step, value in enumerate(stream):
        detector._evaluate(torch.tensor(value), step)
        for rule in detector._builtin_rules:
            for alert in rule.take(rule.pending().tolist(), "test"):
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
    assert detector_firings(LossSpikeDetector(), stream) == expected
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
    detector = LossSpikeDetector(z_threshold=None, factor=None, trend_window=None)
    assert [r.metric for r in detector._builtin_rules] == ["loss_spike/loss"]
    assert detector._figure_keys == ["loss_spike/loss", "loss_spike/zscore", "loss_spike/ema"]


def test_without_the_zscore_rule_spikes_still_enter_the_statistics_winsorised():
    stream = noisy(400).tolist()
    stream[300] = 1e6
    detector = LossSpikeDetector(z_threshold=None, factor=None, trend_window=20)
    assert detector_firings(detector, stream)["trend"] == []
    assert abs(float(detector.baseline.mean) - 1.0) < 0.01 and float(detector.window.values.max()) < 1.2


def test_rules_run_without_any_host_sync(dispatch_counter, monkeypatch):
    detector = LossSpikeDetector(warmup=5, trend_window=10)
    detector._evaluate(torch.tensor(1.0), 0)  # the first step moves the state to the stream's device
    built: list[str] = []
    for name in ("tensor", "as_tensor"):  # from host data: on CUDA a host-to-device copy syncs the stream
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _n=name, _o=original, **k: built.append(_n) or _o(*a, **k))
    for step in range(1, 20):
        value = torch.full((), 1.0 + 0.01 * (step % 3))
        with dispatch_counter() as counter:
            detector._evaluate(value, step)
        assert counter.ops["aten._local_scalar_dense"] == 0  # .item(), bool(), float() on a tensor
        assert counter.total > 0
    with dispatch_counter() as counter:  # the key is right: a read-back is counted
        bool(detector._gate)
    assert counter.ops["aten._local_scalar_dense"] == 1
    assert built == []


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
    assert history["alerts/LossSpikeDetector"][-1] == (399, 2.0)
    assert math.isclose(history["loss_spike/loss"][0][1], stream[49], rel_tol=1e-6)
    assert detector.bad_batches == [{"epoch": 0, "batch_idx": 300, "step": 300}]


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
    assert trainer.global_step == 13 and detector._skipped_steps == 3
    assert all(torch.isfinite(p).all() for p in trainer.lightning_module.parameters())


def test_two_detectors_on_one_loss_skip_spikes_and_watch_the_trend_separately(tmp_path):
    skip = LossSpikeDetector(action="skip", warmup=5, trend_window=None, every_n_steps=1)
    trend = LossSpikeDetector(action="stop", z_threshold=None, factor=None, trend_window=5, every_n_steps=1)
    assert skip.state_key != trend.state_key
    trainer = make_trainer(max_steps=20, callbacks=[skip, trend, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                           enable_checkpointing=True)
    trainer.fit(SpikyModule(bad_steps=(15,)))
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert saved[skip.state_key]["skipped_steps"] == 1 and saved[trend.state_key]["skipped_steps"] == 0
    assert skip.bad_batches == [{"epoch": 1, "batch_idx": 7, "step": 15}] and trend.bad_batches == []


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


def test_rollback_restores_the_last_snapshot_then_stops_after_max_rollbacks():
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="rollback", warmup=5, trend_window=None, every_n_steps=1,
                                 snapshot_every_n_steps=4, max_rollbacks=1)
    probe = StateProbe()
    trainer = make_trainer(max_steps=40, callbacks=[detector, probe])
    with pytest.warns(UserWarning, match="rolled back"):
        trainer.fit(SpikyModule(bad_steps=(14, 22)))
    # snapshots after 0, 4, 8, 12 steps: the spike at step 14 returns to the state before step 12
    assert _equal(probe.after[14][0], probe.before[12][0]) and _equal(probe.after[14][1], probe.before[12][1])
    # after it: snapshots after 16 and 20 steps (not 15: the window of step 14 was bad)
    assert _equal(probe.after[22][0], probe.before[20][0])
    assert trainer.global_step == 23  # the second spike exceeded max_rollbacks=1: restore, then stop
    assert trainer.logger.history["loss_spike/rollbacks"][-1] == (22, 2.0)
    assert [b["step"] for b in detector.bad_batches] == [14, 22]


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


def test_reduce_lr_multiplies_learning_rates_and_lambda_schedulers_keep_it():
    torch.manual_seed(0)
    detector = LossSpikeDetector(action="reduce_lr", lr_factor=0.25, warmup=5, factor=None, trend_window=None,
                                 every_n_steps=1)
    trainer = make_trainer(max_steps=25, callbacks=[detector])
    with pytest.warns(UserWarning, match="multiplied by 0.25"):
        trainer.fit(WithLambdaLR(bad_steps=(15,)))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0025)  # LambdaLR stepped 9 more times
    history = trainer.logger.history["loss_spike/lr_scale"]
    assert history[14:17] == [(14, 1.0), (15, 1.0), (15, 0.25)] and history[-1] == (24, 0.25)  # logged after acting


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


def test_checkpoint_resume_continues_the_detector_state(tmp_path):
    def run(ckpt_path: str | None = None) -> tuple[pl.Trainer, LossSpikeDetector]:
        torch.manual_seed(0)
        detector = LossSpikeDetector(action="skip", warmup=5, trend_window=6, every_n_steps=5)
        checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=22, save_top_k=-1)
        trainer = make_trainer(max_steps=40, callbacks=[detector, checkpoint], enable_checkpointing=True)
        trainer.fit(SpikyModule(bad_steps=(10, 21, 29)), ckpt_path=ckpt_path)
        return trainer, detector

    _, straight = run()
    # Saved after 22 steps, between the logging steps 19 and 24: step 21 is bad and not yet published.
    saved = torch.load(tmp_path / "epoch=2-step=22.ckpt", weights_only=False)
    [state] = [v for k, v in saved["callbacks"].items() if k.startswith("LossSpikeDetector")]
    assert state["window_steps"] == [20, 21] and state["bad_batches"] == straight.bad_batches[:1]
    trainer, resumed = run(str(tmp_path / "epoch=2-step=22.ckpt"))
    assert [b["step"] for b in resumed.bad_batches] == [10, 21, 29]
    assert resumed.bad_batches[:2] == straight.bad_batches[:2]  # step 21 came from the saved window
    history = trainer.logger.history
    assert history["loss_spike/events"][0] == (24, 2.0) and history["loss_spike/skipped"][-1] == (39, 3.0)
    assert int(resumed.baseline.count) == 40  # the baseline went on; no second warm-up
    assert [a["step"] for a in resumed.state_dict()["alerts"]] == [10, 21, 29]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"action": "explode"}, r"`action` must be one of \('log', 'warn', 'stop', 'raise', 'skip', 'rollback'"),
        ({"mode": "up"}, r"`mode` must be one of \('min', 'max'\), got 'up'"),
        ({"check_on": "epoch"}, r"`check_on` must be one of \('step', 'validation'\)"),
        ({"check_on": "validation"}, "needs `monitor`"),
        ({"action": "skip", "monitor": "val_loss"}, "needs `monitor=None`"),
        ({"z_threshold": 0}, "`z_threshold` must be None or > 0"),
        ({"factor": 1.0}, "`factor` must be None or > 1"),
        ({"trend_window": 2}, "`trend_window` must be an int >= 3"),
        ({"trend_threshold": -1}, "`trend_threshold` must be > 0"),
        ({"zscore_patience": 0}, "`zscore_patience` must be an int >= 1"),
        ({"max_rollbacks": -1}, "`max_rollbacks` must be an int >= 0"),
        ({"lr_factor": 1.5}, r"`lr_factor` must be in \(0, 1\)"),
        ({"alpha": 1.0}, r"`alpha` must be in \(0, 1\)"),
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

    with pytest.raises(ValueError, match="cannot gate LBFGS"):
        make_trainer(max_steps=2, callbacks=[LossSpikeDetector(action="skip")]).fit(WithLBFGS())


def test_user_rules_run_on_the_logged_keys():
    detector = LossSpikeDetector(action="log", warmup=5, trend_window=None, every_n_steps=1,
                                 rules=[Above("loss_spike/loss", 100.0)])
    make_trainer(max_steps=20, callbacks=[detector]).fit(SpikyModule(bad_steps=(15,)))
    assert ("loss_spike/loss", 15) in [(a.metric, a.step) for a in detector.alerts]


# -- DDP on 2 CPU processes ---------------------------------------------------------------------


class RankReport(pl.Callback):
    """Writes what each rank saw to ``<dirpath>/rank<r>.pt``."""

    def __init__(self, dirpath: str, bad_step: int) -> None:
        self.dirpath, self.bad_step, self.unchanged = dirpath, bad_step, None

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.bad_step:
            self.before = _copy(trainer.lightning_module.state_dict())

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step - 1 == self.bad_step:
            self.unchanged = _equal(self.before, trainer.lightning_module.state_dict())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        [detector] = [c for c in trainer.callbacks if isinstance(c, LossSpikeDetector)]
        torch.save({"global_step": trainer.global_step, "bad_batches": detector.bad_batches,
                    "skipped": detector._skipped_steps, "unchanged": self.unchanged,
                    "weights": _copy(pl_module.state_dict())},
                   os.path.join(self.dirpath, f"rank{trainer.global_rank}.pt"))


class RankLocalSpiky(SpikyModule):
    def setup(self, stage: str) -> None:
        # forkserver hands both ranks the parameters in shared memory: give each rank its own copy
        with torch.no_grad():
            for p in self.parameters():
                p.data = p.data.clone()


def _ddp_run(tmp_path: Any, action: str) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    detector = LossSpikeDetector(action=action, warmup=5, trend_window=None, every_n_steps=4)
    # forkserver: ranks fork from a server that imported torch and Lightning once (spawn re-imports them,
    # ~25 s on 2 cores), never from this process, whose OpenMP and logger threads make a plain fork unsafe.
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "lightning.pytorch", "lightning_diag"])
    strategy = DDPStrategy(process_group_backend="gloo", start_method="forkserver", timeout=timedelta(seconds=30))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=16, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         callbacks=[detector, RankReport(str(tmp_path), bad_step=9)])
    trainer.fit(RankLocalSpiky(bad_steps=(9,), bad_rank=1, n=64, batch_size=8))
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.distributed
def test_ddp_spike_on_one_rank_skips_the_step_on_both(tmp_path):
    rank0, rank1 = _ddp_run(tmp_path, "skip")
    assert rank0["skipped"] == rank1["skipped"] == 1
    assert rank0["unchanged"] and rank1["unchanged"]
    assert rank0["bad_batches"] == rank1["bad_batches"] == [{"epoch": 2, "batch_idx": 1, "step": 9}]
    assert _equal(rank0["weights"], rank1["weights"])


@pytest.mark.distributed
def test_ddp_spike_on_one_rank_stops_both(tmp_path):
    rank0, rank1 = _ddp_run(tmp_path, "stop")
    assert rank0["global_step"] == rank1["global_step"] == 12  # the logging step after step 9
    assert rank0["bad_batches"] == rank1["bad_batches"] == [{"epoch": 2, "batch_idx": 1, "step": 9}]
