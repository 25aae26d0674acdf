"""The early-warning harness: labels, lead-time arithmetic and scoring on loss streams whose
explosion step is known by construction, and the ``--quick`` suite end to end."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

# benchmarks/ is not a package: import the script as a module (spawned workers inherit sys.path).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "benchmarks"))
import early_warning  # noqa: E402


def noisy_then(onset: int, after: float, n: int = 400, level: float = 2.0, seed: int = 0) -> list[float]:
    """``level`` with +-5% noise until ``onset``, then ``after`` (a number, or NaN) for the rest."""
    rng = np.random.default_rng(seed)
    losses = list(level * (1 + 0.05 * rng.uniform(-1, 1, n)))
    return losses[:onset] + [after] * (n - onset)


def test_explosion_step_is_the_onset_of_a_sustained_jump_or_of_a_non_finite_loss():
    assert early_warning.explosion_step(noisy_then(250, 9.0)) == 250
    assert early_warning.explosion_step(noisy_then(123, float("nan"))) == 123
    assert early_warning.explosion_step(noisy_then(400, 0.0)) is None  # no onset: stable


def test_a_short_bump_and_a_drop_are_not_explosions():
    bump = noisy_then(400, 0.0)
    bump[200:209] = [9.0] * 9  # 9 steps above 3x the minimum: one short of the patience of 10
    assert early_warning.explosion_step(bump) is None
    assert early_warning.explosion_step(noisy_then(200, 0.1)) is None  # a sudden fall is benign


def test_explosion_step_of_a_gradual_climb_is_where_it_passes_three_times_the_minimum():
    losses = [2.0] * 100 + [2.0 * 1.05**k for k in range(200)]
    crossing = next(t for t, v in enumerate(losses) if v > 6.0)
    assert early_warning.explosion_step(losses) == crossing


def test_lead_time_is_explosion_minus_first_warning_and_negative_when_late():
    assert early_warning.lead_time(300, 180) == 120
    assert early_warning.lead_time(300, 300) == 0
    assert early_warning.lead_time(300, 307) == -7
    assert early_warning.lead_time(None, 50) is None and early_warning.lead_time(300, None) is None


def test_baseline_rules_on_a_stream_with_a_known_explosion():
    losses = noisy_then(250, 9.0)
    grad_norms = [8.0] * 10 + [0.5] * 230 + [3.0] * 10 + [20.0] * 150  # init transient, then a climb at 240
    first = early_warning.score_baselines(losses, grad_norms, spike_steps=[250, 251])
    assert first["SpikeDetection (Lightning)"] == 250
    assert first["grad norm > 1 (fixed)"] == 240  # the transient before step 50 is ignored
    assert first["grad norm > 5 (fixed)"] == 250
    assert first["loss > 2 x running min"] == 250
    quiet = early_warning.score_baselines(noisy_then(400, 0.0), [0.5] * 400, spike_steps=[])
    assert set(quiet.values()) == {None}


def test_first_loss_above_min_counts_non_finite_and_uses_only_earlier_losses():
    assert early_warning.first_loss_above_min([4.0, 3.0, 5.9, 6.1], 2.0) == 3
    assert early_warning.first_loss_above_min([4.0, float("inf")], 2.0) == 1
    assert early_warning.first_loss_above_min([4.0, 3.0, 2.0], 2.0) is None


def test_summarize_counts_recall_detections_leads_and_false_alarms():
    runs = [
        {"explosion_step": 300, "first_warning": {"m": 250, "b": 300}},  # lead 50 / 0
        {"explosion_step": 200, "first_warning": {"m": 205, "b": None}},  # late by 5 / missed
        {"explosion_step": 500, "first_warning": {"m": None, "b": 490}},  # missed / lead 10
        {"explosion_step": None, "first_warning": {"m": None, "b": 40}},  # stable: b false alarm
        {"explosion_step": None, "first_warning": {"m": None, "b": None}},
        {"explosion_step": 100, "first_warning": {"b": 100}},  # m did not watch this run
    ]
    m, b = early_warning.summarize(runs, ["m", "b"])
    assert (m["runs"], m["recall"], m["detected"], m["lead_median"], m["lead_min"], m["false_alarms"]) == (
        5, "1/3", "2/3", 22.5, -5, "0/2")
    assert (b["runs"], b["recall"], b["detected"], b["lead_median"], b["lead_min"], b["false_alarms"]) == (
        6, "3/4", "3/4", 0, 0, "1/2")


def test_markdown_tables_name_missing_monitors_and_mark_runs_a_monitor_did_not_watch():
    runs = [{"name": "lm-run", "family": "gpt", "explosion_step": 90, "steps": 200,
             "first_warning": {"A": 40, "SpikeDetection (Lightning)": 95}, "rules": {"A": {
                 "a/rule (warning)": {"step": 40, "metric": "a/rule", "value": 1.0, "threshold": 0.5, "count": 3}}}},
            {"name": "stable-run", "family": "gpt", "explosion_step": None, "steps": 200,
             "first_warning": {"A": None, "B": None, "SpikeDetection (Lightning)": None}, "rules": {"A": {}, "B": {}}}]
    text = early_warning.markdown_tables(runs, ["A", "B"], {"C": "ImportError: broken"})
    assert "| A | monitor | 2 | 1/1 | 1/1 | 50 | 50 | 0/1 |" in text
    assert "| B | monitor | 1 | 0/0 | 0/0 | - | - | 0/1 |" in text
    assert "| all monitors (first of any) | all monitors | 2 | 1/1 | 1/1 | 50 | 50 | 0/1 |" in text
    assert "| SpikeDetection (Lightning) | baseline | 2 | 0/1 | 1/1 | -5 | -5 | 0/1 |" in text
    assert "C (ImportError: broken)" in text
    assert "| A: a/rule (warning) | 2 | 1/1 | 1/1 | 50 | 50 | 0/1 |" in text
    assert "| lm-run | 200 | 90 | 40 | n/a | 95 |" in text


def test_grid_covers_every_family_with_a_stable_control_and_unique_names():
    grid = early_warning.full_grid()
    assert len({spec.name for spec in grid}) == len(grid)
    families = {spec.family for spec in grid}
    assert families == {"gpt", "gpt-qk", "ramp", "digits"}
    controls = {"gpt": 3e-3, "gpt-qk": 3e-3, "ramp": 1e-2}
    for family, lr in controls.items():
        assert any(s.family == family and lr in (s.model.get("lr"), s.model.get("lr_end")) for s in grid)
    assert any(s.family == "digits" and s.model["shock_step"] is None for s in grid)


def test_a_run_is_deterministic():
    spec = early_warning.RunSpec("digits-tiny", "digits", 40, 3, {"lr": 0.05, "weight_decay": 5e-3,
                                                                 "shock_step": 20, "shock_factor": 10.0})
    first, second = early_warning._run_quietly(spec), early_warning._run_quietly(spec)
    assert first["losses"] == second["losses"] and first["first_warning"] == second["first_warning"]
    assert set(first["first_warning"]) >= {"GradNormWatcher", "NCTracker", "SpikeDetection (Lightning)"}


def test_quick_suite_labels_its_runs_and_writes_table_json_and_figure(tmp_path, capsys):
    assert early_warning.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| detector | kind |" in printed and "python benchmarks/early_warning.py --quick" in printed
    with open(tmp_path / "early_warning.json") as handle:
        runs = {run["name"]: run for run in json.load(handle)["runs"]}
    assert runs["gpt-peak1-s0"]["label"] == "exploding" and runs["gpt-peak0.003-s0"]["label"] == "stable"
    assert runs["digits-shock10-s0"]["explosion_step"] in range(300, 306)  # the shock is at step 300
    assert runs["digits-control-s0"]["label"] == "stable"
    assert (tmp_path / "early_warning.md").read_text().startswith("# Early-warning suite")
    assert (tmp_path / "early_warning.png").stat().st_size > 10_000
