"""Detectors replayed on recorded runs: what the early-warning suite scores.

A :class:`Detector` has a ``name``, a ``kind`` (``"monitor"``: a product monitor, live or replayed;
``"baseline"``: what a user has without this package), a parameter ``grid`` (a list of settings,
``[{}]`` when it has none) and :meth:`Detector.warning_steps`, every step at which it warns on a
:class:`~lightning_diag.testbeds.recording.RunRecord` under one setting. A step is the one at which
the warning's action takes effect: for a live alert its ``acted_step`` (the step it fired where the
record predates that field), for a replayed rule the step whose figure made it fire (on a CPU the
monitors act within that step). Calibration picks a setting from the grid on some runs and scores
it on others, without training anything again.

Adding a replay detector for a monitor's own rule takes a few lines: subclass :class:`Detector`, give
it a grid, and turn the recorded figures (``record.figure(key)``, or :func:`layer_max` over a
per-layer key pattern) into the steps where the rule holds, e.g. with :func:`sustained`::

    class MeanCollapse(Detector):
        kind = "monitor"
        def __init__(self):
            super().__init__("mean collapse > t", grid=product_grid(threshold=[0.7, 0.8, 0.9], patience=[1, 3]))
        def warning_steps(self, record, params):
            figure = record.figure("spectral_alignment/mean_collapse")
            return sustained(figure >= params["threshold"], params["patience"])

The baselines: Lightning's ``SpikeDetection`` (:class:`SpikeDetectionReplay`), a fixed threshold on
the total gradient norm (:class:`Threshold`), the loss above a factor times its running minimum
(:class:`RunningMinRatio`). :class:`LiveAlerts` reads the alerts a monitor raised live; a
monitor's own rules are replayed by :class:`~lightning_diag.testbeds.replays.MonitorReplay`.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lightning_diag.testbeds.recording import RunRecord

__all__ = [
    "AnyOf",
    "Detector",
    "LiveAlerts",
    "RunningMinRatio",
    "SpikeDetectionReplay",
    "Threshold",
    "checks",
    "figure_values",
    "layer_max",
    "product_grid",
    "sustained",
]

Params = Mapping[str, Any]


def product_grid(**axes: Iterable[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes' values, in order (the first axis varies slowest).

    Example:
        >>> product_grid(threshold=[1, 5], patience=[1, 3])  # doctest: +NORMALIZE_WHITESPACE
        [{'threshold': 1, 'patience': 1}, {'threshold': 1, 'patience': 3},
         {'threshold': 5, 'patience': 1}, {'threshold': 5, 'patience': 3}]
    """
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(list(axes[n]) for n in names))]


def sustained(hits: np.ndarray, patience: int) -> np.ndarray:
    """Indices where ``hits`` has held for ``patience`` consecutive entries (that one included).

    Example:
        >>> sustained(np.array([1, 1, 0, 1, 1, 1, 1], dtype=bool), 3).tolist()
        [5, 6]
    """
    hits = np.asarray(hits, dtype=bool)
    if patience <= 1:
        return np.flatnonzero(hits)
    # run length of consecutive hits ending at each index
    idx = np.arange(len(hits))
    last_miss = np.maximum.accumulate(np.where(~hits, idx, -1))
    return np.flatnonzero(hits & (idx - last_miss >= patience))


def checks(steps: int, cadence: int, start: int = 0) -> np.ndarray:
    """The steps a rule checked at cadence ``cadence`` sees: ``(t + 1) % cadence == 0`` (Lightning's
    logging steps), from step ``start`` on.

    Example:
        >>> checks(12, 5).tolist(), checks(12, 1, start=9).tolist()
        ([4, 9], [9, 10, 11])
    """
    every = np.arange(cadence - 1, steps, cadence)
    return every[every >= start]


def layer_max(record: RunRecord, pattern: str) -> np.ndarray:
    """Per step, the maximum over the recorded keys matching ``pattern`` (``fnmatch``), ignoring NaN.

    NaN where no matching key has a value. Example:
        >>> record = RunRecord("r", "f", 0, "twin", {}, np.zeros(2), np.zeros(2), np.zeros(2),
        ...                    series={"c/a": np.array([0.1, np.nan]), "c/b": np.array([0.3, np.nan])})
        >>> layer_max(record, "c/*").tolist()[0], bool(np.isnan(layer_max(record, "c/*")[1]))
        (0.3, True)
    """
    keys = [k for k in record.series if fnmatch.fnmatchcase(k, pattern)]
    if not keys:
        return np.full(record.steps, np.nan)
    stacked = np.vstack([record.series[k] for k in keys])
    out = np.full(record.steps, np.nan)
    seen = ~np.all(np.isnan(stacked), axis=0)
    out[seen] = np.nanmax(stacked[:, seen], axis=0)
    return out


def figure_values(record: RunRecord, figure: str) -> np.ndarray:
    """The per-step values of ``figure``: :func:`layer_max` for a pattern with ``*``, else the record's
    series. A NaN in the recorder's own ``loss`` and ``grad_norm`` is a non-finite value and reads
    as ``inf``; in a logged figure it means "not logged at this step" and stays NaN.

    Example:
        >>> record = RunRecord("r", "f", 0, "twin", {}, np.array([1.0, np.nan]), np.zeros(2), np.zeros(2))
        >>> figure_values(record, "loss").tolist(), bool(np.isnan(figure_values(record, "x/y")).all())
        ([1.0, inf], True)
    """
    if "*" in figure:
        return layer_max(record, figure)
    values = record.figure(figure)
    return np.where(np.isnan(values), np.inf, values) if figure in ("loss", "grad_norm") else values


class Detector:
    """Something that warns, replayed on recorded runs. Subclasses implement :meth:`warning_steps`.

    Args:
        name: the row name in the suite's tables.
        grid: the parameter settings calibration chooses from; ``[{}]`` for a detector without any.
        kind: ``"monitor"`` (a product monitor, counted in "any monitor") or ``"baseline"``.
    """

    kind = "baseline"

    def __init__(self, name: str, grid: Sequence[Params] = ({},), kind: str | None = None) -> None:
        if not grid:
            raise ValueError(f"{name}: `grid` must hold at least one setting (use [{{}}] for none)")
        self.name = name
        self.grid: list[dict[str, Any]] = [dict(p) for p in grid]
        if kind is not None:
            self.kind = kind

    def watches(self, record: RunRecord) -> bool:
        """Whether the detector watched this run (a monitor that was left out did not)."""
        return True

    def warning_steps(self, record: RunRecord, params: Params) -> np.ndarray:
        """Sorted steps at which the detector warns on ``record`` with setting ``params``."""
        raise NotImplementedError

    def first_warning(self, record: RunRecord, params: Params, start: int = 0) -> int | None:
        """The first step ``>= start`` at which it warns, or None."""
        steps = self.warning_steps(record, params)
        steps = steps[steps >= start]
        return int(steps[0]) if steps.size else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self.grid)} settings)"


class LiveAlerts(Detector):
    """The alerts a monitor raised live, at its defaults; warnings are severities in ``severities``
    (and, with ``metric``, alerts whose metric matches that ``fnmatch`` pattern: one rule).

    Example:
        >>> record = RunRecord("r", "f", 0, "twin", {}, np.zeros(9), np.zeros(9), np.zeros(9), alerts={"M": [
        ...     {"step": 4, "severity": "info"}, {"step": 6, "severity": "warning", "acted_step": 7}]})
        >>> LiveAlerts("M").warning_steps(record, {}).tolist()
        [7]
    """

    kind = "monitor"

    def __init__(
        self, monitor: str, severities: Sequence[str] = ("warning", "critical"), name: str | None = None,
        metric: str = "*", kind: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(name or monitor, kind=kind)
        self.monitor, self.severities, self.metric = monitor, tuple(severities), metric

    def watches(self, record: RunRecord) -> bool:
        return self.monitor in record.alerts

    def warning_steps(self, record: RunRecord, params: Params) -> np.ndarray:
        steps = {int(a["step"] if a.get("acted_step") is None else a["acted_step"])
                 for a in record.alerts.get(self.monitor, [])
                 if a["severity"] in self.severities and fnmatch.fnmatchcase(a.get("metric", ""), self.metric)}
        return np.array(sorted(steps), dtype=np.int64)


class Threshold(Detector):
    """A figure above ``threshold`` (or non-finite) for ``patience`` consecutive checks.

    Params: ``threshold``; optional ``patience`` (checks, default 1), ``cadence`` (steps between
    checks, default 1), ``warmup`` (steps ignored at the start, default 0). ``figure`` is a record
    key (``"grad_norm"``, ``"loss"``, a logged key) or, with ``*``, a per-layer pattern reduced by
    :func:`layer_max`. With ``monitor``, it watches the runs that monitor watched (a replay of the
    monitor's own figure); otherwise every run.

    Example:
        >>> record = RunRecord("r", "f", 0, "twin", {}, np.zeros(6), np.zeros(6), np.array([9, 0.5, 2, 2, 0.1, 2.0]))
        >>> Threshold("g", "grad_norm", [{}]).warning_steps(
        ...     record, {"threshold": 1, "warmup": 1, "patience": 2}).tolist()
        [3]
    """

    def __init__(
        self, name: str, figure: str, grid: Sequence[Params], kind: str | None = None, monitor: str | None = None
    ) -> None:
        super().__init__(name, grid, kind)
        self.figure, self.monitor = figure, monitor

    def watches(self, record: RunRecord) -> bool:
        return self.monitor is None or self.monitor in record.alerts

    def warning_steps(self, record: RunRecord, params: Params) -> np.ndarray:
        at = checks(record.steps, params.get("cadence", 1), params.get("warmup", 0))
        with np.errstate(invalid="ignore"):
            hits = figure_values(record, self.figure)[at] > params["threshold"]  # NaN (not logged): no hit
        return at[sustained(hits, params.get("patience", 1))]


class RunningMinRatio(Detector):
    """The loss above ``factor`` times the minimum of the finite losses before it, or non-finite,
    for ``patience`` consecutive steps (params ``factor``, optional ``patience``).

    Example:
        >>> record = RunRecord("r", "f", 0, "twin", {}, np.array([3.0, 1.0, 1.5, 2.5, np.nan]),
        ...                    np.zeros(5), np.zeros(5))
        >>> RunningMinRatio("2x", [{"factor": 2.0}]).warning_steps(record, {"factor": 2.0}).tolist()
        [3, 4]
    """

    def warning_steps(self, record: RunRecord, params: Params) -> np.ndarray:
        loss = record.loss
        finite = np.isfinite(loss)
        best_before = np.full(len(loss), np.inf)
        if len(loss) > 1:
            best_before[1:] = np.minimum.accumulate(np.where(finite, loss, np.inf))[:-1]
        with np.errstate(invalid="ignore"):
            hits = ~finite | (loss > params["factor"] * best_before)
        return sustained(hits, params.get("patience", 1))


class SpikeDetectionReplay(Detector):
    """Lightning's ``SpikeDetection`` replayed on the recorded loss (``mode="min"``).

    Step ``t >= warmup`` is a spike when its loss is non-finite, or when it is not below the last
    non-spike loss and exceeds the mean of the last ``window`` non-spike finite losses by ``rtol``
    times that mean (and by ``atol`` if set); spikes do not enter the mean. Lightning's defaults:
    ``window=10, warmup=1, rtol=2.0, atol=None`` (a loss 3x its running mean). The stock callback
    raises at the first spike; every spike is a warning here. One difference: Lightning counts
    ``warmup`` in batches of the current epoch, the replay in optimizer steps.

    Example:
        >>> record = RunRecord("r", "f", 0, "twin", {}, np.array([2.0, 2.0, 1.9, 6.5, 2.0, np.nan]), np.zeros(6),
        ...                    np.zeros(6))
        >>> SpikeDetectionReplay().warning_steps(record, SpikeDetectionReplay.DEFAULTS).tolist()
        [3, 5]
    """

    DEFAULTS: dict[str, Any] = {"window": 10, "warmup": 1, "rtol": 2.0, "atol": None}

    def __init__(self, name: str = "SpikeDetection (Lightning defaults)", grid: Sequence[Params] | None = None):
        super().__init__(name, grid or [dict(self.DEFAULTS)])

    def warning_steps(self, record: RunRecord, params: Params) -> np.ndarray:
        p = {**self.DEFAULTS, **params}
        window: list[float] = []
        last = 0.0
        spikes = []
        for step, loss in enumerate(record.loss.tolist()):
            if step >= p["warmup"] and self._is_spike(loss, last, window, p):
                spikes.append(step)
                continue
            if math.isfinite(loss):
                window = (window + [loss])[-p["window"] :]
                last = loss
        return np.array(spikes, dtype=np.int64)

    @staticmethod
    def _is_spike(loss: float, last: float, window: list[float], p: Params) -> bool:
        if not math.isfinite(loss):
            return True
        if loss - last <= 0.0 or not window:
            return False
        mean = sum(window) / len(window)
        atol_ok = p["atol"] is None or abs(loss - mean) >= abs(p["atol"])
        return atol_ok and abs(loss - mean) >= abs(p["rtol"] * mean)


class AnyOf(Detector):
    """The first warning of any of several detectors, each with its own setting.

    Params: ``{member name: member setting}``; the grid is not enumerated (the suite calibrates each
    member on its own and combines the chosen settings).

    Example:
        >>> record = RunRecord("r", "f", 0, "twin", {}, np.zeros(9), np.zeros(9), np.zeros(9), alerts={
        ...     "A": [{"step": 6, "severity": "warning"}], "B": [{"step": 3, "severity": "critical"}]})
        >>> AnyOf("any", [LiveAlerts("A"), LiveAlerts("B")]).warning_steps(record, {"A": {}, "B": {}}).tolist()
        [3, 6]
    """

    kind = "combined"

    def __init__(self, name: str, members: Sequence[Detector]) -> None:
        super().__init__(name)
        self.members = list(members)

    def watches(self, record: RunRecord) -> bool:
        return any(m.watches(record) for m in self.members)

    def warning_steps(self, record: RunRecord, params: Params) -> np.ndarray:
        parts = [m.warning_steps(record, params.get(m.name, m.grid[0])) for m in self.members if m.watches(record)]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
