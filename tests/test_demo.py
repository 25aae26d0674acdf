"""The one-command demo, and the recorder and baseline it shares with the early-warning suite."""

from __future__ import annotations

import glob
import os
from types import SimpleNamespace

import torch

from conftest import make_trainer
from lightning_diag.demo import ExplosionRecorder, RecordingSpikeDetection, default_monitors, main


def test_demo_returns_zero_writes_tensorboard_events_and_prints_table_and_command(tmp_path, capsys):
    out = str(tmp_path / "tb")
    assert main(["--steps", "60", "--seed", "1", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert glob.glob(os.path.join(out, "explode", "version_0", "events.out.tfevents.*"))
    for column in ("monitor", "first warning", "explosion", "lead (steps)"):
        assert column in printed
    for name in ("GradNormWatcher", "LossSpikeDetector", "SpectralAlignmentMonitor", "SpikeDetection (Lightning)"):
        assert name in printed
    assert "NCTracker: not applicable" in printed
    assert f"tensorboard --logdir {out}" in printed


def test_demo_stable_flag_trains_at_a_constant_rate_and_reports_no_divergence_alert(tmp_path, capsys):
    torch.set_num_threads(2)  # the demo runs on one thread and must give the caller's setting back
    assert main(["--stable", "--steps", "40", "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == 2
    printed = capsys.readouterr().out
    assert "constant learning rate 0.001" in printed
    assert "No explosion." in printed
    assert "Stable run: no divergence alert" in printed
    assert glob.glob(os.path.join(str(tmp_path), "stable", "version_0", "events.out.tfevents.*"))


def test_default_monitors_leave_out_nctracker_for_a_language_model_only():
    lm, left_out = default_monitors("lm")
    assert [type(m).__name__ for m in lm] == ["GradNormWatcher", "LossSpikeDetector", "SpectralAlignmentMonitor",
                                              "LogitMonitor", "SharpnessMonitor"]
    assert "NCTracker" in left_out
    classifier, left_out = default_monitors("classifier")
    assert "NCTracker" in [type(m).__name__ for m in classifier] and not left_out
    assert all(m.every_n_steps == 10 for m in lm)


def _fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(should_stop=False)


def test_recorder_dates_the_explosion_and_stops_at_the_logging_step_after_stop_after():
    seen = []
    recorder = ExplosionRecorder(stop_after=20, cadence=10, on_explosion=seen.append)
    trainer = _fake_trainer()
    losses = [2.0] * 100 + [9.0] * 100  # explosion at step 100 by construction
    for step, loss in enumerate(losses):
        recorder.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step)
        if trainer.should_stop:
            break
    assert recorder.explosion_step == 100 and seen == [100]
    assert step == 129  # 100 + 20 = 120 reached, then the next step t with (t + 1) % 10 == 0


def test_recorder_stops_soon_after_a_non_finite_loss():
    recorder, trainer = ExplosionRecorder(stop_after=100, cadence=10), _fake_trainer()
    for step, loss in enumerate([2.0] * 33 + [float("nan")] * 50):
        recorder.on_train_batch_end(trainer, None, torch.tensor(loss), None, step)
        if trainer.should_stop:
            break
    assert recorder.explosion_step == 33
    assert step == 39


def test_recorder_and_spike_baseline_number_steps_like_the_trainer(scripted_loss):
    losses = [2.0] * 30 + [20.0] * 30  # a 10x jump at step 30: Lightning's rule (3x the running mean) fires there
    recorder, spikes = ExplosionRecorder(stop_after=None), RecordingSpikeDetection()
    trainer = make_trainer(max_steps=60, logger=False, callbacks=[recorder, spikes])
    trainer.fit(scripted_loss(losses))  # records instead of raising TrainingSpikeException
    assert recorder.losses == losses and len(recorder.grad_norms) == 60
    assert recorder.grad_norms[0] == 1.0  # d(weight.sum())/d(weight) = 1
    assert recorder.explosion_step == 30
    assert spikes.spike_steps[0] == 30
