"""The early-warning suite (benchmarks/early_warning.py): its families, detectors and report, on synthetic
records (no training), one tiny real run, and the --quick suite end to end (slow)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

# benchmarks/ is not a package: import the script as a module (spawned workers inherit sys.path).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks"))
import early_warning  # noqa: E402

from lightning_diag.testbeds.recording import MONITORS, RunRecord  # noqa: E402


def test_the_suite_has_ten_predictable_families_each_with_exploding_runs_and_twins_on_three_seeds():
    predictable = [f for f in early_warning.FAMILIES if f.kind == "predictable"]
    assert len(predictable) >= 10
    runs = early_warning.specs(early_warning.FAMILIES, range(3))
    assert len({r.name for r in runs}) == len(runs)
    for family in early_warning.FAMILIES:
        mine = [r for r in runs if r.family == family.name]
        for role in ("exploding", "twin"):
            assert {r.seed for r in mine if r.role == role} == {0, 1, 2}, (family.name, role)
        twin = next(r for r in mine if r.role == "twin")
        boom = next(r for r in mine if r.role == "exploding")
        assert twin.model != boom.model  # a twin differs from its exploding run
        if family.kind == "unpredictable":
            assert boom.fault_step is not None and twin.fault_step is None
    assert runs == sorted(runs, key=lambda r: -r.max_steps)
    assert {"fp16"} <= {f.name for f in early_warning.FAMILIES}
    assert next(f for f in early_warning.FAMILIES if f.name == "fp16").precision == "16-mixed"


def test_quick_families_exist_and_can_be_calibrated_leave_one_out():
    kinds = {f.name: f.kind for f in early_warning.FAMILIES}
    assert set(early_warning.QUICK_FAMILIES) <= set(kinds)
    assert sum(kinds[n] == "predictable" for n in early_warning.QUICK_FAMILIES) >= 3
    assert any(kinds[n] == "unpredictable" for n in early_warning.QUICK_FAMILIES)


def test_detectors_hold_every_monitor_live_and_the_named_baselines():
    dets = early_warning.detectors()
    names = [d.name for d in dets]
    assert len(set(names)) == len(names)
    assert {f"{m} (live, defaults)" for m in MONITORS} <= set(names)
    replayed = {d.name for d in dets if d.kind == "monitor"}
    assert replayed == {"LossSpikeDetector", "SpectralAlignmentMonitor", "LogitMonitor", "SharpnessMonitor"}
    for baseline in ("SpikeDetection (Lightning defaults)", "grad norm > 1 (fixed)", "grad norm > 5 (fixed)",
                     "loss > 2x running min"):  # fmt: skip
        assert baseline in names
        assert len(next(d for d in dets if d.name == baseline).grid) == 1  # fixed: nothing to calibrate
    assert all(d.grid for d in dets)


def _synthetic(family: str, role: str, seed: int, grad_rise: float, fault: int | None = None) -> RunRecord:
    """A run whose loss goes non-finite at 150 (exploding role) and whose grad norm rises from 110."""
    n = 200
    loss, lr, grad = np.full(n, 2.0), np.full(n, 0.05), np.ones(n)
    alerts = {"GradNormWatcher": [], "LossSpikeDetector": []}
    if role == "exploding":
        lr[60:] = 0.5
        loss[150:] = np.nan
        grad[110:] = grad_rise
        alerts["LossSpikeDetector"] = [{"step": 151, "severity": "critical", "metric": "loss_spike/loss"}]
    rng = np.random.default_rng(seed)
    loss = loss * (1 + 0.01 * rng.standard_normal(n))
    return RunRecord(f"{family}-{role}-s{seed}", family, seed, role, {"testbed": "synthetic"}, loss, lr, grad,
                     series={"grad_norm/total": grad, "loss_spike/loss": loss},
                     alerts=alerts, fault_step=fault)  # fmt: skip


def _synthetic_suite() -> list[RunRecord]:
    runs = []
    for family, rise in (("gpt-ramp-fast", 8.0), ("lstm-sgd", 8.0), ("cnn-sgd", 80.0)):
        runs += [_synthetic(family, role, s, rise) for s in range(2) for role in ("exploding", "twin")]
    runs += [_synthetic("lr-shock", "exploding", 0, 30.0, fault=100), _synthetic("lr-shock", "twin", 0, 1.0)]
    return runs


def test_report_writes_tables_json_and_figure_from_records_alone(tmp_path):
    records = _synthetic_suite()
    text = early_warning.report(records, str(tmp_path), "python benchmarks/early_warning.py --test", seconds=12.0)
    assert text.startswith("# Early-warning suite") and "3 predictable" in text
    lines = text.splitlines()
    live = next(line for line in lines if line.startswith("| LossSpikeDetector (live, defaults) |"))
    assert "| 0/6 | 0/6 | -1 | -1 |" in live  # its recorded alerts: late by one step on every exploded run
    replayed = next(line for line in lines if line.startswith("| LossSpikeDetector | monitor |"))
    assert "| 0/6 | 0/6 | 0 | 0 |" in replayed  # its rules replayed on the loss: the non-finite step itself
    calibrated = next(line for line in lines if line.startswith("| grad norm > t (calibrated) |"))
    assert "| 6/6 | 6/6 | 40 | 40 |" in calibrated  # rises at 110, explosion at 150, out of sample too
    assert "| lr-shock | grad norm > t (calibrated) | 1/1 |" in text  # the reaction table
    with open(tmp_path / "early_warning.json") as handle:
        payload = json.load(handle)
    run = next(r for r in payload["runs"] if r["name"] == "lstm-sgd-exploding-s0")
    assert run["explosion"] == 150 and run["healthy_end"] == 60 and run["safe_lr"] == pytest.approx(0.05)
    assert run["out_of_sample"]["grad norm > t (calibrated)"]["lead"] == 40
    assert set(payload["folds"]) == {"gpt-ramp-fast", "lstm-sgd", "cnn-sgd"}
    assert (tmp_path / "early_warning.png").stat().st_size > 10_000


def test_rescore_reads_saved_records_without_training(tmp_path, capsys):
    os.makedirs(tmp_path / "runs")
    for record in _synthetic_suite():
        record.save(str(tmp_path / "runs" / f"{record.name}.json.gz"))
    names = "gpt-ramp-fast,lstm-sgd,cnn-sgd,lr-shock"
    assert early_warning.main(["--rescore", "--out", str(tmp_path), "--families", names, "--seeds", "2"]) == 0
    assert "| any monitor |" in capsys.readouterr().out
    assert (tmp_path / "early_warning.md").exists()


def test_one_tiny_real_run_in_fp16_is_recorded_with_every_monitor(tmp_path):
    spec = early_warning.RunSpec("tiny-fp16", "fp16", "twin", 0, "CharLM",
                                 {"n_layer": 1, "n_embd": 16, "block_size": 8, "batch_size": 2, "max_chars": 20_000,
                                  "lr": 1e-3}, max_steps=4, precision="16-mixed")  # fmt: skip
    summary = early_warning._run_quietly((spec, str(tmp_path)))
    assert summary["steps"] == 4
    record = RunRecord.load(str(tmp_path / "runs" / "tiny-fp16.json.gz"))
    assert record.series["amp/scale"][0] > 1.0  # the loss scaler ran
    assert {"GradNormWatcher", "LossSpikeDetector", "SpectralAlignmentMonitor"} <= set(record.alerts)
    assert np.isfinite(record.loss).all() and record.config["precision"] == "16-mixed"


@pytest.mark.slow
def test_quick_suite_end_to_end(tmp_path):
    assert early_warning.main(["--quick", "--out", str(tmp_path), "--workers", "2"]) == 0
    with open(tmp_path / "early_warning.json") as handle:
        runs = {run["name"]: run for run in json.load(handle)["runs"]}
    quick = [f for f in early_warning.FAMILIES if f.name in early_warning.QUICK_FAMILIES]
    assert set(runs) == {spec.name for spec in early_warning.specs(quick, range(1))}
    for name, run in runs.items():
        assert (run["explosion"] is not None) == ("-exploding-" in name), name
