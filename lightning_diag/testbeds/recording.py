"""Recording a run for the early-warning suite and the demo: what happened at every optimizer step.

- :class:`ExplosionRecorder`: the loss, learning rate, total gradient norm (and AMP loss scale) of
  every step; stops the run soon after its explosion.
- :class:`MemoryLogger`: a logger keeping every figure the monitors log, by key and step.
- :class:`RecordingSpikeDetection`: Lightning's ``SpikeDetection``, recording instead of raising.
- :func:`default_monitors`: every monitor of the package that imports, at its defaults.
- :class:`RunRecord`: one run as the suite saves it (gzipped JSON) and replays detectors on.

Step numbering everywhere: index ``t`` is optimizer step ``t`` (0-based), ``Alert.step`` numbering.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib
import inspect
import json
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, SpikeDetection
from lightning.pytorch.loggers import Logger

from lightning_diag.alerts import Action
from lightning_diag.testbeds.labels import divergence_step

__all__ = [
    "EVERY_STEP",
    "EXPLOSION_FACTOR",
    "EXPLOSION_PATIENCE",
    "MONITORS",
    "ExplosionRecorder",
    "MemoryLogger",
    "RecordingSpikeDetection",
    "RunRecord",
    "available_monitors",
    "default_monitors",
]

# The demo's explosion rule (labels.divergence_step with these arguments); the suite uses labels.explosion_step.
EXPLOSION_FACTOR = 3.0
EXPLOSION_PATIENCE = 10

# Every monitor of the package: name -> (module, what it needs). Imported lazily, so that one
# broken or missing monitor leaves the others usable (the demo and the suite say which).
MONITORS: dict[str, tuple[str, str]] = {
    "GradNormWatcher": ("lightning_diag.callbacks.grad_norm", "any"),
    "LossSpikeDetector": ("lightning_diag.callbacks.loss_spike", "any"),
    "SpectralAlignmentMonitor": ("lightning_diag.callbacks.spectral_alignment", "any"),
    "LogitMonitor": ("lightning_diag.callbacks.logits", "any"),
    "SharpnessMonitor": ("lightning_diag.callbacks.sharpness", "any"),
    "NCTracker": ("lightning_diag.callbacks.neural_collapse", "classifier"),
}

# Settings that make a monitor measure at every step (the suite replays any cadence from them);
# each is passed only if the monitor's constructor takes it. Sharpness costs ~10 forward+backward
# passes a check: every 10 steps, which its replays can subsample but not refine.
EVERY_STEP: dict[str, dict[str, Any]] = {
    "SpectralAlignmentMonitor": {"check_every_n_steps": 1},
    "LogitMonitor": {"check_every_n_steps": 1},
    "SharpnessMonitor": {"check_every_n_steps": 10},
}


def available_monitors() -> tuple[dict[str, type], dict[str, str]]:
    """The monitor classes that import, and ``{name: error}`` for those that do not.

    Example:
        >>> classes, missing = available_monitors()
        >>> "GradNormWatcher" in classes
        True
    """
    classes, missing = {}, {}
    for name, (module, _) in MONITORS.items():
        try:
            classes[name] = getattr(importlib.import_module(module), name)
        except Exception as error:  # noqa: BLE001 - any import failure means "not available"
            missing[name] = f"{type(error).__name__}: {error}"
    return classes, missing


def default_monitors(
    task: str = "lm",
    *,
    every_n_steps: int = 10,
    action: Action = "log",
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[Callback], dict[str, str]]:
    """Every available monitor applicable to ``task`` (``"lm"`` or ``"classifier"``), at defaults.

    Only ``every_n_steps``, ``action`` and, per monitor, the ``overrides`` its constructor accepts
    (e.g. :data:`EVERY_STEP`) are set. Returns the monitors and ``{name: reason}`` for each monitor
    left out (not applicable, or failing to import).

    Example:
        >>> monitors, left_out = default_monitors("lm")
        >>> sorted(left_out)
        ['NCTracker']
    """
    if task not in ("lm", "classifier"):
        raise ValueError(f"`task` must be 'lm' or 'classifier', got {task!r}")
    classes, left_out = available_monitors()
    left_out = {name: f"not available ({error})" for name, error in left_out.items()}
    monitors: list[Callback] = []
    for name, cls in classes.items():
        if MONITORS[name][1] == "classifier" and task != "classifier":
            left_out[name] = "not applicable: needs a classifier (class labels and a linear head)"
            continue
        accepted = inspect.signature(cls).parameters  # NCTracker has no every_n_steps: it logs every evaluation
        kwargs: dict[str, Any] = {
            "action": action, **({"every_n_steps": every_n_steps} if "every_n_steps" in accepted else {})
        }
        kwargs.update({k: v for k, v in (overrides or {}).get(name, {}).items() if k in accepted})
        monitors.append(cls(**kwargs))
    return monitors, left_out


class ExplosionRecorder(Callback):
    """Records every step's loss, learning rate and total gradient norm; ends the run soon after an explosion.

    The loss is the module's ``task_loss`` when it has one (the testbeds set it: the loss without
    regularisers such as a z-loss), otherwise the loss ``training_step`` returned. The gradient norm
    is read in ``on_before_optimizer_step``, after an AMP scaler has unscaled the gradients; with a
    scaler, :attr:`scales` holds its scale at each step. The explosion step is ``definition`` of the
    recorded losses (default: :func:`~lightning_diag.testbeds.labels.divergence_step` with
    ``EXPLOSION_FACTOR`` and ``EXPLOSION_PATIENCE``). Once the loss is non-finite, or ``stop_after``
    steps have passed since the explosion, the run stops at the next multiple of ``cadence`` steps,
    so monitors logging every ``cadence`` steps publish what fired before the end.
    ``losses[t]``, ``lrs[t]`` and ``grad_norms[t]`` belong to optimizer step ``t`` (``Alert.step`` numbering).

    Args:
        stop_after: steps to keep training past the explosion (``None``: never stop early).
        cadence: the monitors' logging cadence.
        on_explosion: called once with the explosion step when it becomes known.
        definition: the explosion step of a list of losses, or None.
        check_every: how often (in steps) the explosion is looked for while it is unknown.
    """

    def __init__(
        self,
        stop_after: int | None = 100,
        cadence: int = 10,
        on_explosion: Callable[[int], None] | None = None,
        definition: Callable[[Sequence[float]], int | None] | None = None,
        check_every: int | None = None,
    ) -> None:
        self.stop_after, self.cadence, self.on_explosion = stop_after, cadence, on_explosion
        self.definition = definition or functools.partial(
            divergence_step, factor=EXPLOSION_FACTOR, patience=EXPLOSION_PATIENCE
        )
        self.check_every = check_every or cadence
        self.losses: list[float] = []
        self.lrs: list[float] = []
        self.grad_norms: list[float] = []
        self.scales: list[float] = []
        self.explosion_step: int | None = None
        self._stop_at: int | None = None

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
        self.grad_norms.append(float(norm))
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))  # the rate this step uses
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.scales.append(float(scaler.get_scale()))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = getattr(pl_module, "task_loss", None)
        if loss is None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))
        step = len(self.losses) - 1
        if self.explosion_step is None and (not math.isfinite(self.losses[-1]) or step % self.check_every == 0):
            self.explosion_step = self.definition(self.losses)
            if self.explosion_step is not None and self.on_explosion is not None:
                self.on_explosion(self.explosion_step)
        if self._stop_at is None and self.stop_after is not None and self.explosion_step is not None and (
            not math.isfinite(self.losses[-1]) or step >= self.explosion_step + self.stop_after
        ):
            self._stop_at = -(-(step + 1) // self.cadence) * self.cadence - 1  # next logging step
        if self._stop_at is not None and step >= self._stop_at:
            trainer.should_stop = True


class RecordingSpikeDetection(SpikeDetection):
    """Lightning's ``SpikeDetection`` with its defaults, recording each spike's step instead of raising.

    The stock callback writes the bad batch indices to a file and raises ``TrainingSpikeException``
    at the first spike (a loss at least ``1 + rtol`` = 3 times the running mean of the last 10
    losses, or non-finite). Here :attr:`spike_steps` collects the optimizer step of every spike and
    training goes on, so it can be scored like the other monitors.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spike_steps: list[int] = []

    def _handle_spike(self, fabric: Any, batch_idx: int) -> None:
        # Called from on_train_batch_end, after the optimizer step: that step is global_step - 1.
        self.spike_steps.append(int(fabric.global_step) - 1)


class MemoryLogger(Logger):
    """Keeps every logged figure in memory: ``logger.series[key][step] == value``.

    Example:
        >>> logger = MemoryLogger()
        >>> logger.log_metrics({"grad_norm/total": 2.5}, step=3)
        >>> logger.series["grad_norm/total"]
        {3: 2.5}
    """

    def __init__(self) -> None:
        super().__init__()
        self.series: dict[str, dict[int, float]] = defaultdict(dict)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.series[key][-1 if step is None else int(step)] = float(value)


# ------------------------------------------------------------------------------------ the record


def _encode(values: Sequence[float] | np.ndarray) -> list[float | str | None]:
    """JSON-safe floats at 6 significant digits: NaN -> null, +-inf -> "inf"/"-inf"."""
    out: list[float | str | None] = []
    for value in np.asarray(values, dtype=np.float64).tolist():
        if math.isnan(value):
            out.append(None)
        elif math.isinf(value):
            out.append("inf" if value > 0 else "-inf")
        else:
            out.append(float(f"{value:.6g}"))
    return out


def _decode(values: Sequence[float | str | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


@dataclasses.dataclass
class RunRecord:
    """One recorded run: per-step series, the monitors' live alerts, and its labels.

    Attributes:
        name, family, seed: identity; ``role`` is what the run was designed to be: ``"exploding"``,
            ``"twin"`` (the same run at a learning rate that does not explode: it sets the safe
            learning rate of the family's healthy phases) or ``"mitigated"`` (the exploding run with
            a stabiliser, such as qk-layernorm or z-loss: a stable run, but not a learning-rate twin).
        config: the testbed's arguments and the trainer's precision.
        loss, lr, grad_norm: one value per optimizer step.
        series: every figure the monitors logged, one array per key (NaN where not logged).
        alerts: each monitor's live alerts (dicts with ``Alert``'s fields) at its defaults.
        left_out: monitors that did not watch the run, and why.
        fault_step: step of an injected fault (poisoned batch, learning-rate shock), or None.
        explosion, healthy_end, safe_lr: labels (see :mod:`lightning_diag.testbeds.labels`); set by
            the suite's labelling, which needs the family's twins for ``safe_lr``.
        seconds: training time.
    """

    name: str
    family: str
    seed: int
    role: str
    config: dict[str, Any]
    loss: np.ndarray
    lr: np.ndarray
    grad_norm: np.ndarray
    series: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    alerts: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    left_out: dict[str, str] = dataclasses.field(default_factory=dict)
    fault_step: int | None = None
    explosion: int | None = None
    healthy_end: int | None = None
    safe_lr: float | None = None
    seconds: float = 0.0

    @property
    def steps(self) -> int:
        return len(self.loss)

    @property
    def exploded(self) -> bool:
        return self.explosion is not None

    def figure(self, key: str) -> np.ndarray:
        """One per-step series: ``"loss"``, ``"lr"``, ``"grad_norm"`` or a logged key (all NaN if never logged)."""
        if key in ("loss", "lr", "grad_norm"):
            return getattr(self, key)
        return self.series.get(key, np.full(self.steps, np.nan))

    @classmethod
    def from_training(
        cls, *, name: str, family: str, seed: int, role: str, config: dict[str, Any], recorder: ExplosionRecorder,
        logger: MemoryLogger, monitors: Sequence[Callback], left_out: Mapping[str, str] | None = None,
        fault_step: int | None = None, seconds: float = 0.0,
    ) -> RunRecord:  # fmt: skip
        """Assemble the record of a finished run from its recorder, logger and monitors."""
        steps = len(recorder.losses)
        series = {}
        for key, values in logger.series.items():
            array = np.full(steps, np.nan)
            for step, value in values.items():
                if 0 <= step < steps:
                    array[step] = value
            series[key] = array
        if recorder.scales:
            series["amp/scale"] = np.asarray(recorder.scales[:steps], dtype=np.float64)
        alerts = {type(m).__name__: [_alert_dict(a) for a in getattr(m, "alerts", [])] for m in monitors}
        return cls(name=name, family=family, seed=seed, role=role, config=dict(config),
                   loss=np.asarray(recorder.losses, dtype=np.float64), lr=np.asarray(recorder.lrs[:steps]),
                   grad_norm=np.asarray(recorder.grad_norms[:steps], dtype=np.float64), series=series, alerts=alerts,
                   left_out=dict(left_out or {}), fault_step=fault_step, seconds=seconds)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (floats at 6 significant digits; NaN as null, infinities as strings)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("loss", "lr", "grad_norm"):
            out[key] = _encode(out[key])
        out["series"] = {key: _encode(values) for key, values in self.series.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """The inverse of :meth:`to_json`.

        Example:
            >>> record = RunRecord("r", "f", 0, "twin", {}, np.array([2.0, np.inf]), np.array([0.1, 0.1]),
            ...                    np.array([1.0, np.nan]), series={"k": np.array([np.nan, 3.0])})
            >>> back = RunRecord.from_json(json.loads(json.dumps(record.to_json())))
            >>> back.loss.tolist(), back.series["k"].tolist()[1], bool(np.isnan(back.grad_norm[1]))
            ([2.0, inf], 3.0, True)
        """
        data = dict(data)
        for key in ("loss", "lr", "grad_norm"):
            data[key] = _decode(data[key])
        data["series"] = {key: _decode(values) for key, values in data.get("series", {}).items()}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: str) -> None:
        """Write the record as JSON, gzipped when ``path`` ends in ``.gz``."""
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, separators=(",", ":"))

    @classmethod
    def load(cls, path: str) -> RunRecord:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as handle:
            return cls.from_json(json.load(handle))


def _alert_dict(alert: Any) -> dict[str, Any]:
    fields = ("source", "metric", "step", "value", "threshold", "severity")
    out = {name: getattr(alert, name, None) for name in fields}
    out["acted_step"] = getattr(alert, "acted_step", alert.step)
    for name in ("value", "threshold"):
        if isinstance(out[name], float) and not math.isfinite(out[name]):
            out[name] = str(out[name])  # "nan", "inf": valid JSON
    return out
