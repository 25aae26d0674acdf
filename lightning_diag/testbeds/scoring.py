"""Scoring detectors on labelled runs, and calibrating them leave-one-family-out.

**Labels** (:func:`label_runs`): each run's explosion step is
:func:`~lightning_diag.testbeds.labels.explosion_step` of its loss; runs are labelled by outcome,
not by design. A family's *safe learning rate* is the highest learning rate its learning-rate twins
(runs of role ``"twin"``) trained at without exploding; an exploded run's healthy phase ends where
its learning rate first passes it, at an injected fault, or at its explosion
(:func:`~lightning_diag.testbeds.labels.healthy_end`). A run that did not explode is a stable run,
whatever it was designed to be, and healthy throughout.

**Outcome of a detector on a run** (:func:`outcome`): a *false alarm* is any warning inside the
healthy phase (on a stable run: any warning at all). On an exploded run, the *warning* is the first
warning at or after the end of the healthy phase and its *lead* is ``explosion - warning``
(negative: after the explosion). Recall at lead ``k`` counts exploded runs with a lead ``>= k``.

**Objective** (:func:`objective`): among a detector's settings, calibration picks the one with the
most exploded runs warned at least 10 steps ahead among those whose false-alarm rate (stable runs
with any warning plus exploded runs warned in their healthy phase, over stable plus exploded runs)
is at most :data:`FALSE_ALARM_BUDGET` (5%); if no setting is that quiet, the quietest one. Ties: recall
at lead >= 1, then the larger median lead, then the earlier setting in the grid. Two objectives
were tried first and are reported in ``docs/early_warning.md``: fewest false alarms first chose
settings that never warn (every monitor false-alarms at every setting that warns at all on this
suite), and the balanced score (recall rate minus false-alarm rate) chose settings that alarm on
half of the stable runs.

**Leave one family out** (:func:`leave_one_family_out`): for each predictable family, every
detector's setting is chosen on the other predictable families and scored on the held-out one;
rotating gives every run an out-of-sample outcome. The in-sample setting is chosen on all
predictable families; unpredictable families (a sudden learning-rate shock) never enter
calibration and are scored with the in-sample setting. "Any monitor" combines the monitors' own
out-of-sample settings (:class:`~lightning_diag.testbeds.detectors.AnyOf`).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lightning_diag.testbeds.detectors import AnyOf, Detector
from lightning_diag.testbeds.labels import explosion_step, healthy_end
from lightning_diag.testbeds.recording import RunRecord

__all__ = [
    "LEADS",
    "Calibration",
    "Outcome",
    "Score",
    "label_runs",
    "leave_one_family_out",
    "balanced_score",
    "false_alarm_rate",
    "objective",
    "outcome",
    "score",
]

LEADS = (1, 10)  # recall is reported at lead >= each of these
CALIBRATION_LEAD = 10  # the lead the objective maximises recall at
FALSE_ALARM_BUDGET = 0.05  # the false-alarm rate a chosen setting may have


def label_runs(records: Iterable[RunRecord], definition: Callable[[np.ndarray], int | None] = explosion_step) -> None:
    """Set ``explosion``, ``safe_lr`` and ``healthy_end`` of every record, in place.

    Example:
        >>> lr = np.full(30, 0.1)
        >>> twin = RunRecord("t", "f", 0, "twin", {}, np.full(30, 1.0), lr, np.ones(30))
        >>> boom = RunRecord("x", "f", 0, "exploding", {}, np.r_[np.full(20, 1.0), np.full(10, 9.0)],
        ...                  np.linspace(0.05, 0.2, 30), np.ones(30))
        >>> label_runs([twin, boom])
        >>> (twin.explosion, twin.healthy_end), (boom.explosion, boom.safe_lr, boom.healthy_end)
        ((None, 30), (20, 0.1, 10))
    """
    records = list(records)
    for record in records:
        record.explosion = definition(record.loss)
    safe: dict[str, float] = {}
    for record in records:
        if record.role == "twin" and not record.exploded and np.isfinite(record.lr).any():
            safe[record.family] = max(safe.get(record.family, -math.inf), float(np.nanmax(record.lr)))
    for record in records:
        record.safe_lr = safe.get(record.family)
        if record.exploded:
            record.healthy_end = healthy_end(record.lr, record.safe_lr, fault_step=record.fault_step,
                                             explosion=record.explosion)  # fmt: skip
        else:  # a stable run, whatever it was meant to be: every warning is a false alarm
            record.healthy_end = record.steps


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One detector, one setting, one run: see the module docstring."""

    exploded: bool
    false_alarm: bool
    warning: int | None = None
    lead: int | None = None


def outcome(record: RunRecord, warning_steps: np.ndarray) -> Outcome:
    """The outcome of warnings at ``warning_steps`` on a labelled ``record``.

    Example:
        >>> run = RunRecord("x", "f", 0, "exploding", {}, np.zeros(100), np.zeros(100), np.zeros(100),
        ...                 explosion=80, healthy_end=50)
        >>> outcome(run, np.array([60, 70])), outcome(run, np.array([10, 85])).false_alarm
        (Outcome(exploded=True, false_alarm=False, warning=60, lead=20), True)
    """
    if record.healthy_end is None:
        raise ValueError(f"run {record.name!r} is not labelled: call label_runs first")
    steps = np.asarray(warning_steps)
    false_alarm = bool(np.any(steps < record.healthy_end))
    if not record.exploded:
        return Outcome(False, false_alarm)
    after = steps[steps >= record.healthy_end]
    if not after.size:
        return Outcome(True, false_alarm)
    return Outcome(True, false_alarm, int(after[0]), int(record.explosion - after[0]))


@dataclasses.dataclass
class Score:
    """A detector's outcomes over a set of runs.

    ``exploded`` and ``stable`` count the runs; ``leads`` holds the lead of every exploded run with a
    warning after its healthy phase; ``false_alarms_stable`` counts stable runs with any warning and
    ``false_alarms_healthy`` exploded-role runs with a warning in their healthy phase.
    """

    exploded: int = 0
    stable: int = 0
    leads: list[int] = dataclasses.field(default_factory=list)
    false_alarms_stable: int = 0
    false_alarms_healthy: int = 0

    @property
    def false_alarms(self) -> int:
        return self.false_alarms_stable + self.false_alarms_healthy

    def recall(self, lead: int) -> int:
        """Exploded runs warned at least ``lead`` steps ahead."""
        return sum(x >= lead for x in self.leads)

    @property
    def median_lead(self) -> float | None:
        return statistics.median(self.leads) if self.leads else None

    @property
    def min_lead(self) -> int | None:
        return min(self.leads) if self.leads else None


def score(outcomes: Iterable[Outcome]) -> Score:
    """Add up outcomes.

    Example:
        >>> s = score([Outcome(True, False, 50, 30), Outcome(True, True, 95, 5), Outcome(True, False),
        ...            Outcome(False, True), Outcome(False, False)])
        >>> s.exploded, s.recall(1), s.recall(10), s.median_lead, s.false_alarms_stable, s.false_alarms_healthy
        (3, 2, 1, 17.5, 1, 1)
    """
    total = Score()
    for item in outcomes:
        if item.exploded:
            total.exploded += 1
            total.false_alarms_healthy += item.false_alarm
            if item.lead is not None:
                total.leads.append(item.lead)
        else:
            total.stable += 1
            total.false_alarms_stable += item.false_alarm
    return total


def balanced_score(total: Score) -> float:
    """Recall rate at lead >= 10 minus false-alarm rate (Youden's J): 1 is perfect, 0 is no better than silence.

    Example:
        >>> round(balanced_score(Score(2, 2, [40, 30], 1, 0)), 3)  # both runs warned, 1 false alarm in 4 chances
        0.75
    """
    recall = total.recall(CALIBRATION_LEAD) / total.exploded if total.exploded else 0.0
    chances = total.stable + total.exploded
    return recall - (total.false_alarms / chances if chances else 0.0)


def false_alarm_rate(total: Score) -> float:
    """False alarms over chances to false-alarm (stable runs and exploded runs' healthy phases)."""
    chances = total.stable + total.exploded
    return total.false_alarms / chances if chances else 0.0


def objective(total: Score) -> tuple[float, ...]:
    """Sort key of a setting (smaller is better): within the false-alarm budget, -recall at lead >=
    10; beyond it, the false alarms first; then -recall at lead >= 1, then -median lead.

    Example:
        >>> quiet, noisy = Score(2, 20, [12, 3], 0, 0), Score(2, 20, [40, 30], 3, 0)
        >>> min([noisy, quiet], key=objective) is quiet  # 3 of 22 chances (14%) is over the budget
        True
    """
    median = total.median_lead
    within = false_alarm_rate(total) <= FALSE_ALARM_BUDGET
    quiet = (0, 0) if within else (1, total.false_alarms)
    return (*quiet, -total.recall(CALIBRATION_LEAD), -total.recall(1), -(median if median is not None else -math.inf))


@dataclasses.dataclass
class Calibration:
    """What :func:`leave_one_family_out` returns.

    Attributes:
        detectors: the detectors, by name ("any monitor" included when there are monitors).
        in_sample: detector name -> setting chosen on all predictable families.
        folds: held-out family -> detector name -> setting chosen without it.
        out_of_sample: detector name -> run name -> outcome with the setting of the run's fold
            (unpredictable families: the in-sample setting).
        in_sample_outcomes: detector name -> run name -> outcome with the in-sample setting.
        watched: detector name -> names of the runs it watched.
    """

    detectors: dict[str, Detector]
    in_sample: dict[str, dict[str, Any]]
    folds: dict[str, dict[str, dict[str, Any]]]
    out_of_sample: dict[str, dict[str, Outcome]]
    in_sample_outcomes: dict[str, dict[str, Outcome]]
    watched: dict[str, list[str]]


ANY_MONITOR = "any monitor"


def leave_one_family_out(
    detectors: Sequence[Detector],
    records: Sequence[RunRecord],
    predictable: Sequence[str],
    any_monitor: str | None = ANY_MONITOR,
) -> Calibration:
    """Choose every detector's setting leave-one-family-out over the ``predictable`` families.

    ``records`` must be labelled (:func:`label_runs`). Each (detector, setting, run) is replayed
    once. Runs of families not in ``predictable`` are scored with the in-sample setting.

    Example:
        >>> from lightning_diag.testbeds.detectors import Threshold
        >>> def run(family, lead_signal):
        ...     grad = np.r_[np.ones(80), np.full(20, 50.0)] if lead_signal else np.ones(100)
        ...     return RunRecord(f"{family}-{lead_signal}", family, 0, "exploding" if lead_signal else "twin", {},
        ...                      np.r_[np.ones(95), np.full(5, np.nan)] if lead_signal else np.ones(100),
        ...                      np.r_[np.ones(50), np.full(50, 2.0 if lead_signal else 1.0)], grad)
        >>> runs = [run(f, s) for f in ("a", "b") for s in (True, False)]
        >>> label_runs(runs)
        >>> cal = leave_one_family_out([Threshold("g", "grad_norm", [{"threshold": 10}, {"threshold": 0.5}])],
        ...                            runs, ["a", "b"])
        >>> cal.folds["a"]["g"], cal.out_of_sample["g"]["a-True"].lead
        ({'threshold': 10}, 15)
    """
    names = [d.name for d in detectors]
    if len(set(names)) != len(names):
        raise ValueError(f"detector names must be unique, got {names}")
    by_name = {r.name: r for r in records}
    unknown = sorted(set(predictable) - {r.family for r in records})
    if unknown:
        raise ValueError(f"predictable families without runs: {unknown}")
    table: dict[str, list[dict[str, Outcome]]] = {}
    watched: dict[str, list[str]] = {}
    for detector in detectors:
        runs = [r for r in records if detector.watches(r)]
        watched[detector.name] = [r.name for r in runs]
        table[detector.name] = [{r.name: outcome(r, detector.warning_steps(r, params)) for r in runs}
                                for params in detector.grid]  # fmt: skip

    def choose(detector: Detector, families: set[str]) -> int:
        def key(index: int) -> tuple[float, ...]:
            outcomes = table[detector.name][index]
            return (*objective(score(o for n, o in outcomes.items() if by_name[n].family in families)), index)

        return min(range(len(detector.grid)), key=key)

    everything = set(predictable)
    in_sample_index = {d.name: choose(d, everything) for d in detectors}
    fold_index = {held: {d.name: choose(d, everything - {held}) for d in detectors} for held in predictable}

    def index_for(detector: str, run: RunRecord) -> int:
        return fold_index[run.family][detector] if run.family in fold_index else in_sample_index[detector]

    out_of_sample = {d: {n: table[d][index_for(d, by_name[n])][n] for n in watched[d]} for d in names}
    in_sample = {d: {n: table[d][in_sample_index[d]][n] for n in watched[d]} for d in names}
    by_detector = {d.name: d for d in detectors}
    setting = lambda d, i: by_detector[d].grid[i]  # noqa: E731
    chosen_in = {d: setting(d, i) for d, i in in_sample_index.items()}
    chosen_folds = {held: {d: setting(d, i) for d, i in per.items()} for held, per in fold_index.items()}

    monitors = [d for d in detectors if d.kind == "monitor"]
    if any_monitor and monitors:
        combined = AnyOf(any_monitor, monitors)
        by_detector[any_monitor] = combined
        runs = [r for r in records if combined.watches(r)]
        watched[any_monitor] = [r.name for r in runs]

        def members(per_detector: Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
            return {m.name: per_detector[m.name] for m in monitors}

        fold_params = lambda r: members(chosen_folds[r.family] if r.family in chosen_folds else chosen_in)  # noqa: E731
        out_of_sample[any_monitor] = {r.name: outcome(r, combined.warning_steps(r, fold_params(r))) for r in runs}
        in_sample[any_monitor] = {r.name: outcome(r, combined.warning_steps(r, members(chosen_in))) for r in runs}
        chosen_in[any_monitor] = members(chosen_in)
        for held in chosen_folds:
            chosen_folds[held][any_monitor] = members(chosen_folds[held])
    return Calibration(by_detector, chosen_in, chosen_folds, out_of_sample, in_sample, watched)
