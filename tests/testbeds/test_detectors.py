"""Detectors replayed on tiny synthetic records: each warns where its rule says, at every cadence."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_diag.testbeds.detectors import (
    AnyOf,
    LiveAlerts,
    RunningMinRatio,
    SpikeDetectionReplay,
    Threshold,
    checks,
    product_grid,
    sustained,
)
from lightning_diag.testbeds.recording import RunRecord


def record(loss=None, grad=None, series=None, alerts=None, n=None) -> RunRecord:
    n = n or len(loss if loss is not None else grad)
    loss = np.ones(n) if loss is None else np.asarray(loss, dtype=float)
    grad = np.ones(n) if grad is None else np.asarray(grad, dtype=float)
    return RunRecord("r", "f", 0, "exploding", {}, loss, np.full(n, 0.1), grad, series=series or {},
                     alerts=alerts or {})  # fmt: skip


def test_sustained_counts_consecutive_hits_including_the_current_one():
    hits = np.array([0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=bool)
    assert sustained(hits, 1).tolist() == [1, 2, 4, 5, 6, 8]
    assert sustained(hits, 2).tolist() == [2, 5, 6]
    assert sustained(hits, 3).tolist() == [6]
    assert sustained(hits, 4).tolist() == []


def test_checks_follow_lightnings_logging_steps():
    assert checks(10, 1).tolist() == list(range(10))
    assert checks(10, 3).tolist() == [2, 5, 8]
    assert checks(10, 3, start=4).tolist() == [5, 8]


def test_threshold_with_warmup_patience_and_cadence():
    grad = np.r_[np.full(10, 5.0), np.ones(40), np.full(20, 3.0)]  # init transient, then a rise at 50
    rec = record(grad=grad)
    det = Threshold("g", "grad_norm", [{}])
    assert det.first_warning(rec, {"threshold": 2.0}) == 0  # the transient
    assert det.first_warning(rec, {"threshold": 2.0, "warmup": 10}) == 50
    assert det.first_warning(rec, {"threshold": 2.0, "warmup": 10, "patience": 3}) == 52
    # cadence 5 sees steps 4, 9, ...: the rise is seen at 54, and patience 3 in checks means 64
    assert det.first_warning(rec, {"threshold": 2.0, "warmup": 10, "cadence": 5}) == 54
    assert det.first_warning(rec, {"threshold": 2.0, "warmup": 10, "cadence": 5, "patience": 3}) == 64


def test_a_non_finite_gradient_norm_is_above_every_threshold_but_a_missing_figure_is_not():
    rec = record(grad=[1.0, math.nan, 1.0, math.inf], series={"x/a": np.array([np.nan, 0.5, np.nan, 2.0])})
    assert Threshold("g", "grad_norm", [{}]).warning_steps(rec, {"threshold": 100.0}).tolist() == [1, 3]
    assert Threshold("x", "x/a", [{}]).warning_steps(rec, {"threshold": 1.0}).tolist() == [3]


def test_threshold_on_a_layer_pattern_takes_the_maximum_over_layers():
    series = {"c/l1": np.array([0.1, 0.2, 0.9]), "c/l2": np.array([0.8, 0.1, np.nan]), "d/l1": np.ones(3)}
    rec = record(series=series, n=3)
    assert Threshold("c", "c/*", [{}]).warning_steps(rec, {"threshold": 0.5}).tolist() == [0, 2]


def test_running_min_ratio_uses_only_earlier_losses_and_counts_non_finite():
    rec = record(loss=[4.0, 3.0, 5.9, 6.1, 2.0, math.inf])
    det = RunningMinRatio("2x", [{"factor": 2.0}])
    assert det.warning_steps(rec, {"factor": 2.0}).tolist() == [3, 5]
    assert det.warning_steps(rec, {"factor": 2.0, "patience": 2}).tolist() == []


def test_spike_detection_replay_matches_lightnings_callback_on_the_same_losses():
    from lightning.fabric.utilities.spike import SpikeDetection, TrainingSpikeException

    rng = np.random.default_rng(0)
    losses = list(2.0 + 0.1 * rng.standard_normal(40))
    losses[25] = 9.0  # the first spike
    replay = SpikeDetectionReplay().first_warning(record(loss=losses), SpikeDetectionReplay.DEFAULTS)

    class Fabric:  # the three things SpikeDetection asks of Fabric
        global_rank = 0

        class strategy:  # noqa: N801
            root_device = torch.device("cpu")
            barrier = staticmethod(lambda: None)
            reduce_boolean_decision = staticmethod(lambda flag, all=True: flag)

    detector = SpikeDetection(exclude_batches_path="/dev/null/never.json")
    detector._handle_spike = lambda fabric, batch_idx: (_ for _ in ()).throw(TrainingSpikeException(batch_idx))
    live = None
    for step, loss in enumerate(losses):
        try:
            detector.on_train_batch_end(Fabric(), torch.tensor(loss), None, step)
        except TrainingSpikeException:
            live = step
            break
    assert replay == live == 25


def test_spike_detection_replay_counts_non_finite_and_ignores_improvements():
    rec = record(loss=[2.0, 2.0, 1.0, 0.5, 4.0, math.nan])  # 4.0 is 2.9x the mean 1.375 of the window: no spike
    assert SpikeDetectionReplay().warning_steps(rec, SpikeDetectionReplay.DEFAULTS).tolist() == [5]
    rec = record(loss=[2.0, 2.0, 1.0, 0.5, 4.2, 4.1])  # 4.2 is 3.05x: a spike; 4.1 < 4.2 is an improvement
    assert SpikeDetectionReplay().warning_steps(rec, SpikeDetectionReplay.DEFAULTS).tolist() == [4]


def test_live_alerts_use_the_acted_step_when_recorded_and_skip_info():
    alerts = {"M": [{"step": 3, "severity": "info"}, {"step": 5, "severity": "warning"},
                    {"step": 8, "severity": "critical", "acted_step": 9}]}  # fmt: skip
    rec = record(n=12, alerts=alerts)
    assert LiveAlerts("M").warning_steps(rec, {}).tolist() == [5, 9]
    assert LiveAlerts("M", severities=("critical",)).warning_steps(rec, {}).tolist() == [9]
    assert LiveAlerts("M").watches(rec) and not LiveAlerts("Other").watches(rec)


def test_any_of_is_the_union_of_its_members_with_their_own_settings():
    rec = record(grad=np.r_[np.ones(20), np.full(5, 4.0)], alerts={"M": [{"step": 3, "severity": "warning"}]})
    combined = AnyOf("any", [LiveAlerts("M"), Threshold("g", "grad_norm", product_grid(threshold=[2, 5]))])
    assert combined.warning_steps(rec, {"M": {}, "g": {"threshold": 2}}).tolist() == [3, 20, 21, 22, 23, 24]
    assert combined.warning_steps(rec, {"M": {}, "g": {"threshold": 5}}).tolist() == [3]


def test_a_detector_needs_at_least_one_setting():
    with pytest.raises(ValueError, match="grid"):
        Threshold("g", "grad_norm", [])
