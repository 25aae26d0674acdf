"""Runs saved: does an action (a callback that changes training) finish the early-warning suite's
exploding runs, how much of their stable twin's progress do they keep, and what does it cost the twins?

Usage::

    python benchmarks/runs_saved.py --arms none,reduce_lr,zclip,skip --workers 2          # full suite
    python benchmarks/runs_saved.py --arms none,zclip --seeds 1 --families lstm-sgd,cnn-sgd
    python benchmarks/runs_saved.py --quick --arms none,skip --workers 2                  # 6 families, seed 0
    python benchmarks/runs_saved.py --arms none,governor --governor target=0.5,target=0.8 --workers 2
    python benchmarks/runs_saved.py --rescore --arms none,reduce_lr,zclip,skip            # no training

**Runs.** The suite's families (:data:`benchmarks.early_warning.FAMILIES`: models, data, schedules,
injected faults), their exploding runs and learning-rate twins (the mitigated twin is not used),
seeds ``0..N-1``. Every run trains for the family's ``max_steps``, the twins included (the suite
trains its twins ``twin_steps``, fewer): the twin's progress is then measured over the same number
of steps as the run it is compared with. Each arm is a callback list: ``none`` (no callback, the
reference), ``reduce_lr`` (``LossSpikeDetector(action="reduce_lr")``), ``zclip``
(``GradNormWatcher(clip="zclip")``), ``skip``, ``rollback`` and ``recover``
(``LossSpikeDetector(action=...)``), ``governor`` (``StabilityGovernor(**setting)``, one run per
setting of ``--governor``'s grid) and ``governor+recover`` (the governor at each setting with
``LossSpikeDetector(action="recover")``, the combination the README recommends). Monitors at their
defaults, ``Trainer`` at its defaults (``log_every_n_steps=50``, no logger), one thread, seeded: the
same command gives the same records on the same machine.

**Explosion**: :func:`lightning_diag.testbeds.labels.explosion_step` of the run's loss, as in the
suite. A run stops ``--stop-after`` (20) steps after its explosion is known, or at a non-finite loss:
``explosion_step`` of a prefix of a curve is ``explosion_step`` of the whole curve whenever the prefix
has one (it scans forward and only looks back), so stopping there never changes a verdict; a run
that does not explode trains its full budget.

**Scores** (:func:`judge`), per exploding run and arm, against the same family and seed's plain twin
(arm ``none``): ``L0`` = the loss of step 0 (the same initial model and batch in every run of a
seed), ``final`` = mean of the last ``FINAL_WINDOW`` (20) losses of a run that finished its budget.

- *survived*: the run finished its budget and ``explosion_step`` of its loss is None;
- *progress*: ``(L0 - final) / (L0 - final of the plain twin)``;
- *saved*: survived with progress >= 0.9. Counted among the runs whose plain run exploded.
- *twin cost* of an arm: ``1 - (L0 - final of the twin with the arm) / (L0 - final of the plain twin)``,
  the share of the twin's loss reduction lost (negative: it did better); target <= 0.02 on every
  twin. *acted*: the arm's own count of its interventions on the twin (clipped steps, skipped
  steps, LR reductions, rollbacks; for a governor, the steps run at a scale below 1); an arm that
  never acted must leave the run bit-identical: the SHA-256 of the final weights equals the plain twin's.

Targets: >= 90% of the exploded runs saved; no twin loses more than 2%.

**Calibration** (an arm with several settings, e.g. the governor's grid): for each held-out family, the
setting with the best objective on the other families (most runs saved; then least total twin cost;
a setting costing any twin more than 2% ranks below every setting that does not); the held-out
family is reported at that setting. The in-sample table (setting chosen on every family) stands apart.

Writes into ``--out`` (default ``runs/runs_saved``): ``records/<run>--<arm>.json.gz`` (a
:class:`~lightning_diag.testbeds.recording.RunRecord` with every step's loss, learning rate and gradient
norm, plus the arm, its setting, acted count, weight hash, budget); records already there are reused
(``--retrain`` trains them again); ``runs_saved.md`` and ``runs_saved.json`` (every run's outcome).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import gzip
import hashlib
import itertools
import json
import logging
import math
import multiprocessing
import os
import re
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # benchmark the checkout this script lives in, not another installed copy
    sys.path.insert(0, _ROOT)

from benchmarks.early_warning import FAMILIES, QUICK_FAMILIES, STOP_AFTER, Family, RunSpec, markdown  # noqa: E402
from lightning_diag.testbeds.labels import explosion_step  # noqa: E402
from lightning_diag.testbeds.recording import RunRecord  # noqa: E402

__all__ = ["ARMS", "Arm", "Outcome", "choose", "final_loss", "judge", "leave_one_family_out", "main",
           "parse_grid", "progress_share"]  # fmt: skip

FINAL_WINDOW = 20  # losses averaged into a run's final loss
SAVED_PROGRESS = 0.9  # a survivor reaching this share of its twin's progress is saved
TWIN_COST_LIMIT = 0.02  # share of a twin's loss reduction an arm may cost it
ARMS = ("none", "reduce_lr", "zclip", "skip", "rollback", "recover", "governor", "governor+recover")
_KINDS = {f.name: f.kind for f in FAMILIES}


# ----------------------------------------------------------------------------------------- arms


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm: a name from :data:`ARMS` and the keyword arguments of its callback (the governor's grid point)."""

    name: str
    setting: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        """File-safe id: ``governor_target=0.5_min_scale=0.1``."""
        text = self.name + "".join(f"_{k}={v}" for k, v in self.setting)
        return re.sub(r"[^A-Za-z0-9.=_-]", "-", text)

    @property
    def label(self) -> str:
        return self.name + (f"({', '.join(f'{k}={v}' for k, v in self.setting)})" if self.setting else "")

    def callbacks(self) -> list[Any]:
        """Fresh callbacks of this arm (built in the worker: one set per run)."""
        from lightning_diag import GradNormWatcher, LossSpikeDetector, StabilityGovernor

        if self.name == "none":
            return []
        if self.name == "zclip":
            return [GradNormWatcher(clip="zclip")]
        if self.name in ("reduce_lr", "skip", "rollback", "recover"):
            return [LossSpikeDetector(action=self.name)]
        governor = [StabilityGovernor(**dict(self.setting))]
        return governor + ([LossSpikeDetector(action="recover")] if self.name == "governor+recover" else [])


def parse_grid(texts: Iterable[str]) -> list[tuple[tuple[str, Any], ...]]:
    """Settings of ``--governor`` arguments: each is ``k=v,k=v,...``, a repeated key gives several
    values, and the grid is their product; several arguments concatenate their grids.

    Example:
        >>> parse_grid(["target=0.5,target=0.8,recovery=linear"])
        [(('recovery', 'linear'), ('target', 0.5)), (('recovery', 'linear'), ('target', 0.8))]
        >>> parse_grid(["target=0.5,min_scale=None"])
        [(('min_scale', None), ('target', 0.5))]
    """
    out: list[tuple[tuple[str, Any], ...]] = []
    for text in texts:
        values: dict[str, list[Any]] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, sep, raw = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"a governor setting must be `name=value`, got {item!r} in {text!r}")
            try:
                value = ast.literal_eval(raw.strip())
            except (ValueError, SyntaxError):
                value = raw.strip()  # a bare word: a string such as recovery=linear
            values.setdefault(name.strip(), []).append(value)
        names = sorted(values)
        out += [tuple(zip(names, combo)) for combo in itertools.product(*(values[n] for n in names))]
    return list(dict.fromkeys(out))


def acted_count(callbacks: Sequence[Any]) -> int | None:
    """How many times the arm's callbacks intervened, from their own counters; None if none is known."""
    total, known = 0, not callbacks  # no callback: never acted
    for callback in callbacks:
        for name in ("clipped_steps", "skipped", "rollbacks", "acted_steps", "interventions"):
            value = getattr(callback, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total, known = total + int(value), True
            elif isinstance(value, (list, tuple)):
                total, known = total + len(value), True
        scale, factor = getattr(callback, "lr_scale", None), getattr(callback, "lr_factor", None)
        if isinstance(scale, float) and isinstance(factor, float) and 0 < factor < 1 and scale > 0:
            total, known = total + round(math.log(scale) / math.log(factor)), True  # reductions so far
    return total if known else None


class ScaleTrace:
    """Counts the steps a governor ran at a learning-rate scale below 1 (read-only: a host float per step).

    Its ``controller.scale`` is the factor the step about to run uses (applied inside ``optimizer.step``).
    """

    def __init__(self, governor: Any) -> None:
        self.governor, self.acted_steps, self.min_scale = governor, 0, 1.0

    def callback(self) -> Any:
        from lightning.pytorch.callbacks import Callback

        trace = self

        class _Trace(Callback):
            def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
                scale = float(trace.governor.controller.scale)
                trace.acted_steps += scale < 1.0
                trace.min_scale = min(trace.min_scale, scale)

        return _Trace()


def _recorder(stop_after: int | None) -> Any:
    """The suite's :class:`ExplosionRecorder`, reading each step's ``task_loss`` before the optimizer step.

    An arm that re-runs ``training_step`` inside ``optimizer.step`` (the governor's extra forward on
    the updated weights) overwrites the module's ``task_loss`` before ``on_train_batch_end``, where
    the recorder reads it: the record would hold the loss after the update on those steps.
    """
    from lightning_diag.testbeds.recording import ExplosionRecorder

    class _Recorder(ExplosionRecorder):
        _loss: Any = None

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self._loss = None

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self._loss = getattr(pl_module, "task_loss", None)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            after = getattr(pl_module, "task_loss", None)
            if self._loss is not None:
                pl_module.task_loss = self._loss
            try:
                super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            finally:
                pl_module.task_loss = after

    return _Recorder(stop_after=stop_after, cadence=1, definition=explosion_step, check_every=5)


def weights_hash(module: Any) -> str:
    """SHA-256 of every parameter and buffer, in ``state_dict`` order: equal iff bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ runs


def run_specs(families: Sequence[Family], seeds: Iterable[int], budget_cap: int | None = None) -> list[RunSpec]:
    """Each family's exploding runs and learning-rate twins, every one with the family's ``max_steps``."""
    out = []
    for family in families:
        for spec in family.specs(list(seeds)):
            if spec.role in ("exploding", "twin"):
                steps = family.max_steps if budget_cap is None else min(family.max_steps, budget_cap)
                out.append(dataclasses.replace(spec, max_steps=steps))
    return out


def record_path(out: str, spec_name: str, arm: Arm) -> str:
    return os.path.join(out, "records", f"{spec_name}--{arm.key}.json.gz")


def run_one(spec: RunSpec, arm: Arm, out: str, stop_after: int | None) -> dict[str, Any]:
    """Train one run with one arm (stopping ``stop_after`` steps past an explosion); save its record."""
    import lightning.pytorch as pl
    import torch

    from lightning_diag.testbeds import CharLM, DigitsClassifier, DigitsCNN, flush_denormals

    torch.set_num_threads(1)
    flush_denormals(True)
    pl.seed_everything(spec.seed, verbose=False)
    testbed = {"CharLM": CharLM, "DigitsClassifier": DigitsClassifier, "DigitsCNN": DigitsCNN}[spec.testbed]
    model = testbed(seed=spec.seed, **spec.model)
    callbacks = arm.callbacks()
    traces = [ScaleTrace(c) for c in callbacks if hasattr(getattr(c, "controller", None), "scale")]
    recorder = _recorder(stop_after)
    plugins = []
    if spec.precision == "16-mixed":  # as the suite: fp16 autocast with a CPU GradScaler
        from lightning.pytorch.plugins import MixedPrecision

        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=spec.max_steps, max_epochs=-1, logger=False,
        callbacks=[recorder, *callbacks, *(t.callback() for t in traces)], plugins=plugins, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=os.path.join(out, "tmp"),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model)
    seconds = round(time.perf_counter() - start, 2)
    steps = len(recorder.losses)
    record = RunRecord(name=spec.name, family=spec.family, seed=spec.seed, role=spec.role,
                       config={"testbed": spec.testbed, "precision": spec.precision, **spec.model},
                       loss=np.asarray(recorder.losses, dtype=np.float64), lr=np.asarray(recorder.lrs[:steps]),
                       grad_norm=np.asarray(recorder.grad_norms[:steps], dtype=np.float64),
                       fault_step=spec.fault_step, seconds=seconds)  # fmt: skip
    record.explosion = explosion_step(record.loss)
    data = {**record.to_json(), "arm": arm.name, "setting": dict(arm.setting), "arm_key": arm.key,
            "budget": spec.max_steps, "acted": acted_count([*callbacks, *traces]), "weights_sha256": weights_hash(model),
            "min_scale": min((t.min_scale for t in traces), default=None)}
    path = record_path(out, spec.name, arm)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path + ".tmp", "wt", encoding="utf-8") as handle:
        json.dump(data, handle, separators=(",", ":"))
    os.replace(path + ".tmp", path)  # a killed worker leaves no half record behind
    return {"name": f"{spec.name}--{arm.key}", "steps": steps, "budget": spec.max_steps,
            "explosion": record.explosion, "acted": data["acted"], "seconds": seconds}  # fmt: skip


def _run_quietly(job: tuple[RunSpec, Arm, str, int | None]) -> dict[str, Any]:
    import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import: import first, then quieten

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_one(*job)


def train(jobs: Sequence[tuple[RunSpec, Arm]], out: str, workers: int, stop_after: int | None) -> None:
    """Train every (run, arm), ``workers`` at a time (spawned processes, one thread each), longest first."""
    jobs = sorted(jobs, key=lambda job: -job[0].max_steps)
    args = [(spec, arm, out, stop_after) for spec, arm in jobs]
    with contextlib.ExitStack() as stack:
        done: Iterable[dict[str, Any]] = map(_run_quietly, args)
        if workers > 1:
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=8))
            done = pool.imap_unordered(_run_quietly, args)
        for count, s in enumerate(done, 1):
            boom = "stable" if s["explosion"] is None else f"explodes at {s['explosion']}"
            print(f"  [{count:>3}/{len(jobs)}] {s['name']:<48} {s['steps']:>5}/{s['budget']:<5} {boom:<17} "
                  f"acted {s['acted']!s:<5} {s['seconds']:>6.1f} s", flush=True)  # fmt: skip


@dataclasses.dataclass
class Result:
    """A recorded (run, arm): what scoring needs."""

    name: str
    family: str
    seed: int
    role: str
    arm_key: str
    loss: np.ndarray
    budget: int
    acted: int | None
    weights_sha256: str
    seconds: float

    @property
    def explosion(self) -> int | None:
        return explosion_step(self.loss)

    @property
    def survived(self) -> bool:
        return len(self.loss) >= self.budget and self.explosion is None

    @classmethod
    def load(cls, path: str) -> Result:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            data = json.load(handle)
        record = RunRecord.from_json(data)
        return cls(record.name, record.family, record.seed, record.role, data["arm_key"], record.loss, data["budget"],
                   data["acted"], data["weights_sha256"], record.seconds)  # fmt: skip


# --------------------------------------------------------------------------------------- scoring


def final_loss(loss: Sequence[float] | np.ndarray, window: int = FINAL_WINDOW) -> float:
    """Mean of the last ``window`` losses; inf if one of them is not finite (or there are none).

    Example:
        >>> final_loss([5.0, 4.0, 3.0, 1.0, 2.0], window=2), final_loss([1.0, float("nan")], window=2)
        (1.5, inf)
    """
    tail = np.asarray(loss, dtype=np.float64)[-window:]
    return float(tail.mean()) if tail.size and np.isfinite(tail).all() else math.inf


def progress_share(first: float, final: float, twin_final: float) -> float:
    """Share of the twin's loss reduction reached: ``(first - final) / (first - twin_final)``.

    NaN when the twin made no progress (nothing to compare with); -inf for a non-finite ``final``.

    Example:
        >>> progress_share(4.0, 2.5, 2.0), progress_share(4.0, math.inf, 2.0)
        (0.75, -inf)
    """
    if not math.isfinite(twin_final) or not first > twin_final:
        return math.nan
    return (first - final) / (first - twin_final) if math.isfinite(final) else -math.inf


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One family, seed and arm: the exploding run's fate and the twin's cost."""

    family: str
    seed: int
    arm_key: str
    exploded_plain: bool  # the exploding run without any arm exploded within its budget
    survived: bool
    progress: float
    twin_cost: float  # share of the plain twin's loss reduction lost with the arm (<= 0: none lost)
    twin_acted: int | None
    twin_identical: bool  # final weights bit-identical to the plain twin's
    twin_plain_stable: bool

    @property
    def saved(self) -> bool:
        return self.survived and self.progress >= SAVED_PROGRESS - 1e-12

    @property
    def kind(self) -> str:
        return _KINDS.get(self.family, "predictable")


def judge(exploding: Result, twin: Result, plain_exploding: Result, plain_twin: Result) -> Outcome:
    """Score one family and seed under one arm against its plain twin (the module docstring's definitions)."""
    first, reference = float(plain_twin.loss[0]), final_loss(plain_twin.loss)
    survived = exploding.survived
    progress = progress_share(first, final_loss(exploding.loss), reference) if survived else math.nan
    twin_final = final_loss(twin.loss) if twin.survived else math.inf
    cost = 1.0 - progress_share(first, twin_final, reference)
    return Outcome(exploding.family, exploding.seed, exploding.arm_key, not plain_exploding.survived, survived,
                   progress, cost, twin.acted, twin.weights_sha256 == plain_twin.weights_sha256,
                   plain_twin.survived)  # fmt: skip


def objective(outcomes: Sequence[Outcome]) -> tuple[int, int, float]:
    """Larger is better: (no twin costs > 2%, exploded runs saved, minus the total twin cost).

    Example:
        >>> o = lambda saved, cost: Outcome("f", 0, "a", True, saved, 1.0, cost, 0, True, True)
        >>> objective([o(True, 0.05)]) < objective([o(False, 0.0)]) < objective([o(True, 0.0)])
        True
    """
    costs = [o.twin_cost if not math.isnan(o.twin_cost) else math.inf for o in outcomes]
    cheap = all(c <= TWIN_COST_LIMIT for c in costs)
    total = sum(costs)
    return int(cheap), sum(o.saved for o in outcomes if o.exploded_plain), -total if math.isfinite(total) else -1e300


def choose(by_setting: Mapping[str, Sequence[Outcome]], families: Iterable[str]) -> str:
    """The setting (key) with the best :func:`objective` over ``families``; ties go to the first listed."""
    wanted = set(families)
    return max(by_setting, key=lambda k: objective([o for o in by_setting[k] if o.family in wanted]))


def leave_one_family_out(by_setting: Mapping[str, Sequence[Outcome]]) -> tuple[str, dict[str, str]]:
    """The in-sample setting and, per held-out family, the setting chosen on the other families.

    Example:
        >>> o = lambda f, key, saved, cost: Outcome(f, 0, key, True, saved, 1.0, cost, 0, True, True)
        >>> grid = {"a": [o("x", "a", True, 0.0), o("y", "a", False, 0.0)],
        ...         "b": [o("x", "b", False, 0.0), o("y", "b", True, 0.0)]}
        >>> leave_one_family_out(grid)
        ('a', {'x': 'b', 'y': 'a'})
    """
    families = list(dict.fromkeys(o.family for outcomes in by_setting.values() for o in outcomes))
    folds = {f: choose(by_setting, [g for g in families if g != f]) for f in families}
    return choose(by_setting, families), folds


# ---------------------------------------------------------------------------------------- report


def outcomes_of(results: Mapping[tuple[str, str], Result], specs: Sequence[RunSpec], arm: Arm) -> list[Outcome]:
    """Every family and seed of ``specs`` with ``arm``, where all four runs are recorded."""
    out = []
    for spec in specs:
        if spec.role != "exploding":
            continue
        twin = spec.name.replace("-exploding-", "-twin-")
        runs = [results.get((spec.name, arm.key)), results.get((twin, arm.key)), results.get((spec.name, "none")),
                results.get((twin, "none"))]  # fmt: skip
        if all(r is not None for r in runs):
            out.append(judge(*runs))  # type: ignore[arg-type]
    return out


def _pct(value: float) -> str:
    if math.isnan(value) or math.isinf(value):
        return {True: "-", False: "inf" if value > 0 else "-inf"}[math.isnan(value)]
    return f"{100 * value + 0.0:.1f}%".replace("-0.0%", "0.0%")


def _summary_cells(outcomes: Sequence[Outcome]) -> list[Any]:
    exploded = [o for o in outcomes if o.exploded_plain]
    survivors = [o.progress for o in exploded if o.survived]
    saved = sum(o.saved for o in exploded)
    costs = [o.twin_cost for o in outcomes]
    acted = [o for o in outcomes if o.twin_acted]
    silent = [o for o in outcomes if o.twin_acted == 0]
    worst = max(costs) if costs else math.nan
    met = exploded and saved >= 0.9 * len(exploded) and all(c <= TWIN_COST_LIMIT for c in costs)
    return [f"{sum(o.survived for o in exploded)}/{len(exploded)}", f"{saved}/{len(exploded)}",
            _pct(statistics.median(survivors)) if survivors else "-", _pct(min(survivors)) if survivors else "-",
            _pct(worst), f"{sum(c > TWIN_COST_LIMIT for c in costs)}/{len(costs)}",
            f"{len(acted)}/{len(outcomes)}", f"{sum(o.twin_identical for o in silent)}/{len(silent)}",
            "yes" if met else "no"]  # fmt: skip


_SUMMARY_HEADER = ["survived", "saved (>= 90% of twin progress)", "median progress (survivors)",
                   "min progress", "worst twin cost", "twins costing > 2%", "twins acted on",
                   "silent twins bit-identical", "targets met"]  # fmt: skip


def summary_table(rows: Sequence[tuple[str, Sequence[Outcome]]]) -> str:
    """One row per (arm, kind): runs saved and twin cost."""
    table = []
    for label, outcomes in rows:
        for kind in ("predictable", "unpredictable", "all"):
            some = [o for o in outcomes if kind == "all" or o.kind == kind]
            if some:
                table.append([label, kind, *_summary_cells(some)])
    return markdown(["arm", "families", *_SUMMARY_HEADER], table)


def family_table(rows: Sequence[tuple[str, Sequence[Outcome]]]) -> str:
    """One row per (family, arm): saved/exploded, each seed's progress, twin cost, twins acted on."""
    table = []
    families = list(dict.fromkeys(o.family for _, outcomes in rows for o in outcomes))
    for family in families:
        for label, outcomes in rows:
            some = [o for o in outcomes if o.family == family]
            if not some:
                continue
            exploded = [o for o in some if o.exploded_plain]
            seeds = ", ".join(("x" if not o.survived else _pct(o.progress)) + ("" if o.exploded_plain else " (plain stable)")
                              for o in some)  # fmt: skip
            costs = ", ".join(_pct(o.twin_cost) for o in some)
            acted = ", ".join("?" if o.twin_acted is None else str(o.twin_acted) for o in some)
            table.append([family, _KINDS.get(family, "?"), label, f"{sum(o.saved for o in exploded)}/{len(exploded)}",
                          seeds, costs, acted, "" if all(o.twin_plain_stable for o in some) else "plain twin exploded"])
    return markdown(["family", "kind", "arm", "saved", "progress per seed (x: exploded or stopped)",
                     "twin cost per seed", "twin interventions per seed", "note"], table)  # fmt: skip


def calibration_tables(name: str, by_setting: Mapping[str, Sequence[Outcome]], labels: Mapping[str, str]) -> str:
    """Leave-one-family-out (held-out family at the setting chosen on the others) and in-sample tables."""
    in_sample, folds = leave_one_family_out(by_setting)
    held_out = [o for family, key in folds.items() for o in by_setting[key] if o.family == family]
    rows = []
    for family, key in folds.items():
        some = [o for o in by_setting[key] if o.family == family]
        rows.append([family, labels[key], *_summary_cells(some)])
    grid_rows = [[labels[key], *_summary_cells(outcomes), "in sample" if key == in_sample else ""]
                 for key, outcomes in by_setting.items()]  # fmt: skip
    return "\n\n".join([
        f"### {name}: out of sample (leave one family out)\n\n"
        + summary_table([(f"{name} (LOFO)", held_out)]) + "\n\n"
        + markdown(["held-out family", "setting chosen on the others", *_SUMMARY_HEADER], rows),
        f"### {name}: in sample (one setting chosen on every family: {labels[in_sample]})\n\n"
        + summary_table([(labels[in_sample], by_setting[in_sample])]),
        f"### {name}: every setting of the grid, all families\n\n"
        + markdown(["setting", *_SUMMARY_HEADER, ""], grid_rows),
    ])  # fmt: skip


def timing_table(results: Iterable[Result], arms: Sequence[Arm]) -> str:
    """Median and total training seconds per family, role and arm."""
    labels = {a.key: a.label for a in arms}
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        if r.arm_key in labels:
            groups.setdefault((r.family, r.role, r.arm_key), []).append(r)
    rows = [[family, role, labels[key], statistics.median(len(r.loss) for r in rs), f"{statistics.median(r.seconds for r in rs):.1f}",
             f"{1000 * sum(r.seconds for r in rs) / max(sum(len(r.loss) for r in rs), 1):.1f}"]
            for (family, role, key), rs in sorted(groups.items())]  # fmt: skip
    return markdown(["family", "role", "arm", "median steps", "median s per run", "ms per step"], rows)


def report(results: Mapping[tuple[str, str], Result], specs: Sequence[RunSpec], arms: Sequence[Arm], out: str,
           command: str, seconds: float | None) -> str:  # fmt: skip
    """Score every arm; write ``runs_saved.md`` and ``runs_saved.json`` into ``out``; return the markdown."""
    rows = [(arm.label, outcomes_of(results, specs, arm)) for arm in arms]
    names = list(dict.fromkeys(a.name for a in arms))
    grids = {n: [a for a in arms if a.name == n] for n in names}
    timing = "" if seconds is None else f"; {seconds / 60:.1f} min wall clock"
    families = list(dict.fromkeys(s.family for s in specs))
    seeds = sorted({s.seed for s in specs})
    parts = [
        f"# Runs saved\n\n`{command}`: {len(families)} families x seeds {seeds}, arms {', '.join(a.label for a in arms)}"
        f"{timing}. Definitions: `benchmarks/runs_saved.py` (module docstring) and `docs/runs_saved.md`.",
        "## Summary (every setting as run; an arm with a grid is calibrated below)\n\n" + summary_table(rows),
        "## Per family\n\n" + family_table(rows),
    ]
    for name, grid in grids.items():
        if len(grid) > 1:
            by_setting = {a.key: outcomes_of(results, specs, a) for a in grid}
            parts.append(calibration_tables(name, by_setting, {a.key: a.label for a in grid}))
    parts.append("## Training time\n\n" + timing_table(results.values(), arms))
    text = "\n\n".join(parts)
    with open(os.path.join(out, "runs_saved.md"), "w") as handle:
        handle.write(text + "\n")
    payload = {"command": command, "arms": [a.label for a in arms],
               "outcomes": [{**dataclasses.asdict(o), "saved": o.saved, "kind": o.kind} for _, outs in rows for o in outs]}
    with open(os.path.join(out, "runs_saved.json"), "w") as handle:
        json.dump(payload, handle, indent=1, default=str)
    return text


# ------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", default="none,reduce_lr,zclip,skip", help=f"comma-separated, of {ARMS}")
    parser.add_argument("--governor", action="append", default=[], metavar="K=V,K=V",
                        help="StabilityGovernor settings; a repeated key gives a grid (product); repeatable")
    parser.add_argument("--quick", action="store_true", help=f"families {', '.join(QUICK_FAMILIES)}, seed 0")
    parser.add_argument("--families", default=None, help="comma-separated family names (default: all)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; 1 with --quick)")
    parser.add_argument("--out", default=os.path.join("runs", "runs_saved"), help="output directory")
    parser.add_argument("--workers", type=int, default=1, help="runs trained in parallel, one thread each")
    parser.add_argument("--stop-after", type=int, default=STOP_AFTER,
                        help="steps trained past a known explosion (-1: always the full budget)")
    parser.add_argument("--max-steps", type=int, default=None, help="cap every budget (smoke tests only)")
    parser.add_argument("--retrain", action="store_true", help="train runs whose record already exists")
    parser.add_argument("--rescore", action="store_true", help="score the records in --out, no training")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    if set(names) - set(ARMS):
        parser.error(f"unknown arms {sorted(set(names) - set(ARMS))}; known: {list(ARMS)}")
    try:
        grid = parse_grid(args.governor) or [()]
    except ValueError as error:
        parser.error(str(error))
    arms = [Arm("none")] + [Arm(n, s) for n in names if n != "none" for s in (grid if n.startswith("governor") else [()])]
    chosen = (args.families.split(",") if args.families
              else list(QUICK_FAMILIES if args.quick else [f.name for f in FAMILIES]))  # fmt: skip
    unknown = sorted(set(chosen) - {f.name for f in FAMILIES})
    if unknown:
        parser.error(f"unknown families {unknown}; known: {[f.name for f in FAMILIES]}")
    families = [f for f in FAMILIES if f.name in chosen]
    seeds = range(args.seeds if args.seeds is not None else (1 if args.quick else 3))
    specs = run_specs(families, seeds, args.max_steps)
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/runs_saved.py", *(shlex.quote(a) for a in given)])
    start = time.perf_counter()
    seconds: float | None = None
    if not args.rescore:
        jobs = [(spec, arm) for arm in arms for spec in specs
                if args.retrain or not os.path.exists(record_path(args.out, spec.name, arm))]  # fmt: skip
        print(f"{command}: {len(jobs)} runs to train ({len(specs) * len(arms) - len(jobs)} recorded already), "
              f"{args.workers} worker(s)", flush=True)  # fmt: skip
        train(jobs, args.out, args.workers, None if args.stop_after < 0 else args.stop_after)
        seconds = time.perf_counter() - start
    results = {}
    for spec in specs:
        for arm in arms:
            path = record_path(args.out, spec.name, arm)
            if os.path.exists(path):
                results[(spec.name, arm.key)] = Result.load(path)
    if not results:
        parser.error(f"no recorded runs in {args.out}/records")
    text = report(results, specs, arms, args.out, command, seconds)
    print("\n" + text)
    print(f"\nWrote {args.out}/runs_saved.md, runs_saved.json and records/ ({time.perf_counter() - start:.0f} s).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
