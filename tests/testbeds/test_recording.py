"""Recording a run: the per-step recorder, the in-memory logger, the saved record, the monitor list."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest

from lightning_diag.testbeds import DigitsClassifier, explosion_step
from lightning_diag.testbeds.recording import (
    EVERY_STEP,
    ExplosionRecorder,
    MemoryLogger,
    RunRecord,
    default_monitors,
)


def quiet_trainer(max_steps: int, **overrides) -> pl.Trainer:
    kwargs = dict(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                  logger=False)  # fmt: skip
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def test_recorder_stops_soon_after_the_explosion_and_records_every_step(scripted_loss):
    losses = [2.0] * 40 + [9.0] * 60
    recorder = ExplosionRecorder(stop_after=12, cadence=1, definition=explosion_step, check_every=1)
    quiet_trainer(100, callbacks=[recorder]).fit(scripted_loss(losses))
    assert recorder.explosion_step == 40
    assert len(recorder.losses) == 40 + 12 + 1  # stops at the step 12 past the explosion
    assert len(recorder.lrs) == len(recorder.grad_norms) == len(recorder.losses)
    assert recorder.losses[:3] == [2.0, 2.0, 2.0] and recorder.lrs[0] == 0.0


def test_recorder_stops_at_a_non_finite_loss(scripted_loss):
    recorder = ExplosionRecorder(stop_after=50, cadence=1, definition=explosion_step)
    quiet_trainer(100, callbacks=[recorder]).fit(scripted_loss([2.0] * 20 + [math.nan] * 80))
    assert recorder.explosion_step == 20 and len(recorder.losses) == 21


def test_memory_logger_keeps_each_key_by_step():
    logger = MemoryLogger()
    logger.log_metrics({"a/b": 1.0, "c": 2.0}, step=0)
    logger.log_metrics({"a/b": 3.0}, step=5)
    assert dict(logger.series) == {"a/b": {0: 1.0, 5: 3.0}, "c": {0: 2.0}}


def test_run_record_round_trips_through_gzipped_json_with_non_finite_values(tmp_path):
    record = RunRecord(
        "r", "f", 1, "exploding", {"lr": 0.1, "betas": (0.9, 0.95)}, np.array([2.0, math.inf, math.nan]),
        np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, math.nan]), series={"k/x": np.array([math.nan, 0.5, 1.0])},
        alerts={"M": [{"source": "M", "metric": "k/x", "step": 1, "value": "inf", "threshold": 0.4,
                       "severity": "warning", "acted_step": 1}]},
        fault_step=1, explosion=1, seconds=3.5,
    )  # fmt: skip
    path = str(tmp_path / "r.json.gz")
    record.save(path)
    back = RunRecord.load(path)
    assert back.loss[0] == pytest.approx(2.0) and back.loss[1] == math.inf and math.isnan(back.loss[2])
    assert math.isnan(back.series["k/x"][0]) and back.series["k/x"][1] == pytest.approx(0.5)
    assert back.alerts == record.alerts and back.fault_step == 1 and back.explosion == 1
    assert back.config["betas"] == [0.9, 0.95]
    with open(path, "rb") as handle:
        assert handle.read(2) == b"\x1f\x8b"  # gzip magic


def test_default_monitors_pass_only_the_overrides_a_monitor_accepts():
    monitors, left_out = default_monitors("lm", every_n_steps=1,
                                          overrides={**EVERY_STEP, "GradNormWatcher": {"nope": 1}})
    names = [type(m).__name__ for m in monitors]
    assert "NCTracker" in left_out and "GradNormWatcher" in names
    spectral = monitors[names.index("SpectralAlignmentMonitor")]
    assert spectral.check_every_n_steps == 1
    with pytest.raises(ValueError, match="task"):
        default_monitors("gan")


def test_a_short_real_run_records_losses_figures_and_live_alerts():
    model = DigitsClassifier(lr=0.05, seed=0, hidden=(32,), batch_size=32)
    monitors, left_out = default_monitors("classifier", every_n_steps=1, overrides=EVERY_STEP)
    recorder, logger = ExplosionRecorder(stop_after=None, cadence=1, definition=explosion_step), MemoryLogger()
    trainer = quiet_trainer(12, callbacks=[recorder, *monitors], logger=logger, log_every_n_steps=1,
                            limit_val_batches=0)
    trainer.fit(model)
    record = RunRecord.from_training(name="tiny", family="digits", seed=0, role="twin", config={}, recorder=recorder,
                                     logger=logger, monitors=monitors, left_out=left_out)  # fmt: skip
    assert record.steps == 12 and np.isfinite(record.loss).all() and record.lr[0] == pytest.approx(0.05)
    assert np.isfinite(record.series["grad_norm/total"]).sum() == 12  # every figure, every step
    np.testing.assert_allclose(record.series["grad_norm/total"], record.grad_norm, rtol=1e-4)
    assert set(record.alerts) == {type(m).__name__ for m in monitors}
