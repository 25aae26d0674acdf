"""The one-command demo, and the recorder and baseline it shares with the early-warning suite."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import make_trainer
from lightning_diag.demo import ExplosionRecorder, RecordingSpikeDetection, default_monitors, main
from lightning_diag.report import read_summaries


MONITOR_NAMES = ("GradNormWatcher", "LossSpikeDetector", "SpectralAlignmentMonitor", "LogitMonitor",
                 "SharpnessMonitor")


def _table_rows(printed: str) -> dict[str, tuple[str, str, int, str, str]]:
    """The demo's table: monitor -> (first warning step or "-", metric, warnings, info records, lead)."""
    rows = {}
    for name in (*MONITOR_NAMES, "SpikeDetection (Lightning)"):
        found = re.search(rf"^{re.escape(name)}  +(\d+|-)  +(.*?) +(\d+)  +(\d+|-)  +(.+)$", printed, re.M)
        assert found, f"no table row for {name} in:\n{printed}"
        step, metric, warned, infos, lead = found.groups()
        rows[name] = (step, metric, int(warned), infos, lead.strip())
    return rows


@pytest.fixture(scope="module")
def exploding_demo(tmp_path_factory) -> tuple[str, str]:
    """One short demo run that explodes (near step 46): its log folder and what it printed."""
    out, printed = str(tmp_path_factory.mktemp("demo") / "tb"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--steps", "80", "--lr", "100", "--seed", "1", "--out", out]) == 0
    return out, printed.getvalue()


def test_demo_dates_the_explosion_and_leads_as_the_report_does_on_the_same_run(exploding_demo):
    """One definition on the same values: the demo's table says what `lightning-diag report` says."""
    out, printed = exploding_demo
    assert glob.glob(os.path.join(out, "explode", "version_0", "events.out.tfevents.*"))
    assert "NCTracker: not applicable" in printed
    assert f"tensorboard --logdir {out}" in printed
    assert "testbeds." not in printed and "explosion_step" not in printed  # user words, not internal names
    explosion = int(re.search(r"The loss exploded at step (\d+)", printed).group(1))
    assert f"lead over the explosion at step {explosion}" in printed

    (summary,) = read_summaries(os.path.join(out, "explode", "version_0"))
    assert summary.loss.key == "loss_spike/loss" and summary.loss.broke_at == explosion
    rows = _table_rows(printed)
    first = summary.first_serious()
    for name in MONITOR_NAMES:
        step, metric, warned, infos, lead = rows[name]
        mine = [a for a in summary.alerts if a.source == name]
        assert warned == sum(not a.is_info for a in mine) and int(infos) == sum(a.is_info for a in mine), name
        if name not in first:
            assert (step, lead) == ("-", "no warning"), name
            continue
        alert = first[name]
        assert (int(step), metric) == (alert.step, alert.metric), name
        said = f"{abs(explosion - alert.step)} steps {'before' if alert.step <= explosion else 'after'}"
        assert lead == said, name  # the report's words for the same lead
    assert any(rows[name][0] != "-" for name in MONITOR_NAMES), "no monitor warned: the run tests nothing"


def test_demo_prints_its_live_lines_in_step_order_with_the_explosion_at_the_step_it_is_known(exploding_demo):
    printed = exploding_demo[1]
    steps = [int(s) for s in re.findall(r"^  step +(\d+) ", printed, re.M)]
    assert steps == sorted(steps) and len(steps) >= 4
    known = re.search(r"^  step +(\d+) +the loss exploded at step (\d+):", printed, re.M)
    assert known and int(known.group(1)) >= int(known.group(2))
    assert re.search(r"^  step +\d+ +WARNING ", printed, re.M) and "ALERT" not in printed


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
