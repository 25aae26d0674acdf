"""Labels, outcomes, the calibration objective and the leave-one-family-out split on synthetic runs."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from lightning_diag.testbeds.detectors import Detector, LiveAlerts, Threshold, product_grid
from lightning_diag.testbeds.recording import RunRecord
from lightning_diag.testbeds.scoring import (
    ANY_MONITOR,
    Outcome,
    Score,
    label_runs,
    leave_one_family_out,
    balanced_score,
    false_alarm_rate,
    objective,
    outcome,
    score,
)

N = 200
BOOM = 150  # explosion step of the synthetic exploding runs
RISE = 100  # their precursor starts here, after the healthy phase (LR above the twin's from step 80)


def run(family: str, role: str, *, quiet: float, loud: float | None = None, seed: int = 0, alerts=None) -> RunRecord:
    """A synthetic run: gradient norm ``quiet`` throughout, or ``loud`` from ``RISE`` in an exploding run,
    whose loss goes non-finite at ``BOOM`` and whose LR passes its twin's at step 80."""
    grad = np.full(N, quiet)
    loss = np.full(N, 2.0)
    lr = np.full(N, 0.1)
    if role == "exploding":
        lr[80:] = 0.5
        loss[BOOM:] = np.nan
        if loud is not None:
            grad[RISE:] = loud
    return RunRecord(f"{family}-{role}-{seed}", family, seed, role, {}, loss, lr, grad, alerts=alerts or {})


def family(name: str, quiet: float, loud: float, seeds: int = 2) -> list[RunRecord]:
    return [r for s in range(seeds) for r in (run(name, "exploding", quiet=quiet, loud=loud, seed=s),
                                              run(name, "twin", quiet=quiet, seed=s))]  # fmt: skip


GRAD = Threshold("grad norm > t", "grad_norm", product_grid(threshold=[3.0, 20.0, 100.0]))


# ------------------------------------------------------------------------------------------ labels


def test_label_runs_sets_explosions_safe_rates_and_healthy_phases():
    runs = family("a", 1.0, 5.0, seeds=1)
    mitigated = run("a", "mitigated", quiet=1.0)
    mitigated.lr[:] = 0.5  # a stabilised run at the exploding rate: stable, but not a learning-rate twin
    label_runs([*runs, mitigated])
    exploding, twin = runs
    assert (exploding.explosion, exploding.safe_lr, exploding.healthy_end) == (BOOM, pytest.approx(0.1), 80)
    assert (twin.explosion, twin.healthy_end) == (None, N)
    assert (mitigated.explosion, mitigated.healthy_end) == (None, N)


def test_an_exploded_twin_sets_no_safe_rate():
    twin = run("a", "twin", quiet=1.0)
    twin.loss[120:] = np.nan
    exploding = run("a", "exploding", quiet=1.0)
    label_runs([twin, exploding])
    assert twin.explosion == 120 and exploding.safe_lr is None
    assert exploding.healthy_end == BOOM  # no learning-rate limit known: healthy until the explosion


def test_a_fault_ends_the_healthy_phase():
    shocked = run("s", "exploding", quiet=1.0)
    shocked.lr[:] = 0.1
    shocked.fault_step = 60
    label_runs([shocked, run("s", "twin", quiet=1.0)])
    assert shocked.healthy_end == 60


# ----------------------------------------------------------------------------------------- outcome


def test_outcome_false_alarms_leads_and_misses():
    runs = family("a", 1.0, 5.0, seeds=1)
    label_runs(runs)
    exploding, twin = runs
    assert outcome(exploding, np.array([110, 120])) == Outcome(True, False, 110, BOOM - 110)
    assert outcome(exploding, np.array([20, 120])) == Outcome(True, True, 120, BOOM - 120)
    assert outcome(exploding, np.array([160])) == Outcome(True, False, 160, -10)  # late
    assert outcome(exploding, np.array([], dtype=int)) == Outcome(True, False)
    assert outcome(twin, np.array([199])) == Outcome(False, True)
    with pytest.raises(ValueError, match="label_runs"):
        outcome(run("b", "twin", quiet=1.0), np.array([1]))


def test_objective_maximises_recall_within_the_false_alarm_budget_else_picks_the_quietest():
    twins = [Outcome(False, False)] * 30
    quiet_late = score([Outcome(True, False, 140, 5), *twins])
    quiet_early = score([Outcome(True, False, 120, 30), *twins])
    one_alarm = score([Outcome(True, False, 60, 90), Outcome(False, True), *twins[1:]])  # 1/31: within 5%
    noisy = score([Outcome(True, False, 60, 90), *[Outcome(False, True)] * 3, *twins[3:]])  # 3/31: over it
    assert (quiet_early.recall(1), quiet_early.recall(10), quiet_late.recall(10)) == (1, 1, 0)
    assert false_alarm_rate(one_alarm) == pytest.approx(1 / 31) and false_alarm_rate(noisy) == pytest.approx(3 / 31)
    assert min([quiet_late, one_alarm], key=objective) is one_alarm  # more recall, within the budget
    assert min([quiet_late, noisy], key=objective) is quiet_late  # over the budget loses to any quiet setting
    assert min([quiet_late, quiet_early], key=objective) is quiet_early
    both_noisy = score([Outcome(True, False, 60, 90), *[Outcome(False, True)] * 2])  # 2/3 over: fewest alarms wins
    assert min([noisy, both_noisy], key=objective) is both_noisy
    assert balanced_score(quiet_early) == pytest.approx(1.0) and balanced_score(quiet_late) == pytest.approx(0.0)
    assert Score().median_lead is None and Score().min_lead is None


# ------------------------------------------------------------------------------ leave one family out


def test_a_threshold_that_works_on_one_family_only_gets_no_recall_out_of_sample():
    # Family "a" runs at a grad norm of 10 and rises to 50 before exploding; "b" runs at 1 and rises
    # to 5. A threshold of 3 catches "b" but fires all the time on "a"; 20 catches "a" and never "b".
    runs = family("a", 10.0, 50.0) + family("b", 1.0, 5.0) + family("c", 10.0, 50.0)
    label_runs(runs)
    cal = leave_one_family_out([GRAD], runs, ["a", "b", "c"])
    assert cal.folds["b"][GRAD.name] == {"threshold": 20.0}
    b_exploding = [r.name for r in runs if r.family == "b" and r.role == "exploding"]
    assert all(cal.out_of_sample[GRAD.name][name].lead is None for name in b_exploding)  # recall 0
    held_a = cal.folds["a"][GRAD.name]
    assert held_a == {"threshold": 20.0}  # chosen on b and c: 3 false-alarms on c
    leads_a = [cal.out_of_sample[GRAD.name][r.name].lead for r in runs if r.family == "a" and r.role == "exploding"]
    assert leads_a == [BOOM - RISE] * 2


def test_the_held_out_familys_runs_never_influence_its_own_setting():
    runs = family("a", 1.0, 5.0) + family("b", 1.0, 50.0) + family("c", 1.0, 50.0)
    label_runs(runs)
    before = leave_one_family_out([GRAD], runs, ["a", "b", "c"])
    changed = copy.deepcopy(runs)
    for record in changed:
        if record.family == "a":  # a different held-out family: quiet at 10, exploding runs rise to 50
            record.grad_norm = record.grad_norm * 10.0
    after = leave_one_family_out([GRAD], changed, ["a", "b", "c"])
    assert after.folds["a"] == before.folds["a"]
    assert after.folds["b"] != before.folds["b"] or after.in_sample != before.in_sample  # it does inform the others


def test_unpredictable_families_never_enter_calibration_and_are_scored_in_sample():
    runs = family("a", 1.0, 50.0) + family("b", 1.0, 50.0)
    label_runs(runs)
    base = leave_one_family_out([GRAD], runs, ["a", "b"])
    shock = family("shock", 30.0, 300.0, seeds=1)  # would make 3 a false alarm if it counted
    for record in shock:
        record.fault_step = 80 if record.role == "exploding" else None
    label_runs(runs + shock)
    cal = leave_one_family_out([GRAD], runs + shock, ["a", "b"])
    assert cal.in_sample == base.in_sample and cal.folds == base.folds
    assert set(cal.folds) == {"a", "b"}
    shocked = next(r for r in shock if r.role == "exploding")
    assert cal.out_of_sample[GRAD.name][shocked.name] == cal.in_sample_outcomes[GRAD.name][shocked.name]


def test_any_monitor_combines_each_monitors_own_out_of_sample_setting():
    class GradMonitor(Threshold):
        kind = "monitor"

    alerts = {"Live": [{"step": 120, "severity": "warning"}]}
    runs = []
    for name in ("a", "b"):
        runs += [run(name, "exploding", quiet=1.0, loud=50.0, alerts=alerts),
                 run(name, "twin", quiet=1.0, alerts={"Live": []})]
    label_runs(runs)
    monitors = [LiveAlerts("Live"), GradMonitor("grad monitor", "grad_norm", product_grid(threshold=[3.0, 100.0]))]
    cal = leave_one_family_out(monitors, runs, ["a", "b"])
    assert cal.folds["a"][ANY_MONITOR] == {"Live": {}, "grad monitor": {"threshold": 3.0}}
    assert cal.out_of_sample[ANY_MONITOR]["a-exploding-0"].warning == RISE  # the grad monitor's, earlier than 120
    assert set(cal.watched[ANY_MONITOR]) == {r.name for r in runs}


def test_a_detector_only_scores_the_runs_it_watched():
    class OnlyA(Detector):
        def watches(self, record):
            return record.family == "a"

        def warning_steps(self, record, params):
            return np.array([RISE])

    runs = family("a", 1.0, 5.0) + family("b", 1.0, 5.0)
    label_runs(runs)
    cal = leave_one_family_out([OnlyA("only a")], runs, ["a", "b"])
    assert {n.split("-")[0] for n in cal.out_of_sample["only a"]} == {"a"}


def test_leave_one_family_out_rejects_duplicate_names_and_unknown_families():
    runs = family("a", 1.0, 5.0)
    label_runs(runs)
    with pytest.raises(ValueError, match="unique"):
        leave_one_family_out([GRAD, GRAD], runs, ["a"])
    with pytest.raises(ValueError, match="without runs"):
        leave_one_family_out([GRAD], runs, ["a", "zzz"])
