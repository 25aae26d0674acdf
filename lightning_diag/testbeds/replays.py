"""A monitor's own decision code replayed on a recorded run, for calibration without retraining.

The suite records every figure of every monitor at every step (``check_every_n_steps=1``, logging
every step; the sharpness monitor every 10 steps). :class:`MonitorReplay` builds the monitor with a
candidate setting and feeds it, check after check, the figures it *measures* (its declared stream
keys that are not computed on the host) exactly as its host side receives them live: the base's
``_process`` (``derive``, the :class:`~lightning_diag.alerts.RuleBook`, ``after_rules``) runs
unchanged, so a replayed alert is the alert the monitor would have raised with that setting. What
a replay cannot change is the measurement itself (row sampling, power iteration), which does not
depend on the rules' settings. Steps whose loss is non-finite are fed too (a broken model's figures
are NaN, which the record cannot tell from "not logged"). The check cadence is replayed by visiting
only the check steps, Lightning's ``(step + 1) % cadence == 0``, plus, for the spectral monitor,
the steps its adaptive cadence asks for (every step while a rule's condition holds and has not
fired).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lightning_diag.testbeds.detectors import Detector, Params
from lightning_diag.testbeds.recording import RunRecord

__all__ = ["MonitorReplay", "measured_keys"]


def measured_keys(monitor: Any, keys: Sequence[str]) -> tuple[str, ...]:
    """The keys among ``keys`` that ``monitor`` measures as streams (declared, rate step/check/eval,
    not computed on the host): what its host side is fed.

    Example:
        >>> from lightning_diag import LossSpikeDetector
        >>> measured_keys(LossSpikeDetector(), ["loss_spike/loss", "loss_spike/zscore", "loss_spike/alerts"])
        ('loss_spike/loss',)
    """
    streams = [k for k in monitor.KEYS if k.rate in ("step", "check", "eval") and k.kind == "scalar" and not k.host]
    return tuple(sorted(k for k in keys if any(d.matches(k, monitor.family) for d in streams)))


class MonitorReplay(Detector):
    """The warnings (severity warning or critical) of ``make(**setting, action="log")`` replayed on a record.

    Args:
        name: the row name.
        make: builds the monitor from a setting (its class, or a function of the setting's keys).
        grid: the settings calibration chooses from.
        cadence: the setting that is the check cadence (a multiple of ``recorded_cadence``), or
            ``None`` for a monitor measured every step.
        recorded_cadence: steps between the recorded values of the monitor's figures.
    """

    kind = "monitor"

    def __init__(
        self, name: str, make: Callable[..., Any], grid: Sequence[Params], *, cadence: str | None = None,
        recorded_cadence: int = 1,
    ) -> None:  # fmt: skip
        super().__init__(name, grid)
        self.make, self.cadence, self.recorded_cadence = make, cadence, recorded_cadence
        self.family = make(**self.grid[0], action="log").family

    def watches(self, record: RunRecord) -> bool:
        return any(k.startswith(self.family + "/") for k in record.series)

    def warning_steps(self, record: RunRecord, params: Params) -> np.ndarray:
        monitor = self.make(**params, action="log")
        every = int(params.get(self.cadence, 1)) if self.cadence else 1
        if every % self.recorded_cadence:
            raise ValueError(f"{self.name}: cadence {every} is not a multiple of the recorded {self.recorded_cadence}")
        keys = measured_keys(monitor, list(record.series))
        if not keys:
            return np.zeros(0, dtype=np.int64)
        values = np.vstack([record.series[k] for k in keys])  # (keys, steps)
        recorded = ~np.isnan(values).all(0)
        # a broken model's figures are NaN, indistinguishable from "not logged": a step whose loss is
        # non-finite was measured too (at the recorded cadence), and the monitor must see its NaN
        on_cadence = (np.arange(values.shape[1]) + 1) % self.recorded_cadence == 0
        recorded |= ~np.isfinite(record.loss[: values.shape[1]]) & on_cadence
        adaptive = getattr(monitor, "_streak_pending", None)
        warned: set[int] = set()
        for step in np.flatnonzero(recorded):
            if (step + 1) % every and not (adaptive is not None and adaptive()):
                continue  # not a check step of this cadence
            monitor._process(int(step), keys, values[:, step].copy())
            fired, monitor._unacted = monitor._unacted, []
            warned.update(a.step for a in fired if a.severity != "info")
        return np.array(sorted(warned), dtype=np.int64)
