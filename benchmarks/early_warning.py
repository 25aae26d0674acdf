"""The early-warning suite: does each monitor warn before a loss explosion, how early, does it stay
quiet on healthy training, and do its settings carry over to runs they were not chosen on?

Usage::

    python benchmarks/early_warning.py --workers 2            # the full suite (FAMILIES x 3 seeds)
    python benchmarks/early_warning.py --quick --workers 2    # 6 families x 1 seed (CI, a few minutes)
    python benchmarks/early_warning.py --rescore --out DIR    # score the runs recorded in DIR again, no training
    python benchmarks/early_warning.py --families lstm-sgd,cnn-sgd --seeds 1

Writes into ``--out`` (default ``runs/early_warning``): ``runs/<run>.json.gz``, one record per run
(every step's loss, learning rate and gradient norm, every figure the monitors logged, each monitor's
live alerts: :class:`~lightning_diag.testbeds.recording.RunRecord`); ``early_warning.md`` (the
tables); ``early_warning.json`` (every run's labels, series and first warnings, and the chosen
settings); ``early_warning.png`` (leads per family and detector). Every run is seeded and trains on
one thread, so the same command gives the same records on the same machine, whatever ``--workers``.

**Families** (:data:`FAMILIES`; each has exploding runs and learning-rate twins: the same run with its
learning-rate schedule capped where it does not explode; one also has a mitigated twin, the exploding
run with a stabiliser; the unpredictable families' twins are the run without the fault).
The settings were chosen by measuring where each family explodes on seeds 0-2, so that it explodes
reliably but not at once; the table of the report gives the measured range.

**Labels** (:mod:`lightning_diag.testbeds.labels`, :func:`lightning_diag.testbeds.scoring.label_runs`):
the explosion step is :func:`~lightning_diag.testbeds.labels.explosion_step` of the run's loss (the
loss back at least half-way from its best to an uninformed model's and at least 1.5x its best, for
10 steps, or non-finite); a run stops 20 steps after it. The healthy phase of an exploded run ends
where its learning rate passes the highest learning rate its family's twins survived, at an
injected fault, or at the explosion; a run that did not explode is stable and healthy throughout.

**Detectors** (:func:`detectors`): each monitor of the package, live, at its defaults (every figure
logged and every rule evaluated every step: ``every_n_steps=1``, ``SpectralAlignmentMonitor``
``check_every_n_steps=1``; a warning is an alert of severity warning or critical, at its
``acted_step``); replays of rules on the recorded figures, with a parameter grid; and the baselines a
user has without the package: Lightning's ``SpikeDetection`` replayed at its defaults, a fixed
threshold of 1 or 5 on the total gradient norm (from step 50, past the initial transient), the loss
above 2x its running minimum, and calibrated versions of each.

**Scores** (:mod:`lightning_diag.testbeds.scoring`): a warning inside a healthy phase, or on a
stable run, is a false alarm; lead = explosion step - first warning after the healthy phase. Every
detector's setting is chosen leave-one-family-out (the objective: the most runs warned >= 10 steps
ahead at a false-alarm rate of at most 5%, else the quietest setting), so each family's figures
are out of sample; the in-sample table (settings chosen on every family) stands beside it.
Unpredictable families (a poisoned batch, a learning-rate shock: nothing can warn before the step
that breaks the run) are scored apart, by how fast each detector reacts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import logging
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # benchmark the checkout this script lives in, not another installed copy
    sys.path.insert(0, _ROOT)

from lightning_diag.testbeds.replays import MonitorReplay  # noqa: E402
from lightning_diag.testbeds.detectors import (  # noqa: E402
    Detector,
    LiveAlerts,
    RunningMinRatio,
    SpikeDetectionReplay,
    Threshold,
    product_grid,
)
from lightning_diag.testbeds.recording import MONITORS, RunRecord  # noqa: E402
from lightning_diag.testbeds.scoring import (  # noqa: E402
    ANY_MONITOR,
    LEADS,
    Calibration,
    Outcome,
    label_runs,
    leave_one_family_out,
    outcome,
    score,
)

__all__ = ["FAMILIES", "Family", "RunSpec", "detectors", "main", "run_one", "specs"]

STOP_AFTER = 20  # steps recorded past the explosion
BASELINE_WARMUP = 50  # the fixed grad-norm thresholds ignore the steps before this one


# ------------------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: a testbed, its arguments, a step budget, and what it was designed to be."""

    name: str
    family: str
    role: str  # "exploding", "twin" or "mitigated"
    seed: int
    testbed: str  # "CharLM", "DigitsClassifier" or "DigitsCNN"
    model: dict[str, Any]
    max_steps: int
    precision: str = "32-true"  # or "16-mixed": fp16 autocast with torch.amp.GradScaler("cpu")
    fault_step: int | None = None


@dataclasses.dataclass(frozen=True)
class Family:
    """An instability family: a testbed, the exploding setting, its twins, and why it explodes.

    ``twin`` and ``mitigated`` are overrides of ``exploding``; ``max_steps`` bounds the exploding
    runs (they stop 20 steps after their explosion), ``twin_steps`` and ``mitigated_steps`` the
    twins, which should cover the exploding runs' length. ``fault`` names the argument holding an injected fault's step.
    """

    name: str
    kind: str  # "predictable" or "unpredictable"
    what: str
    testbed: str
    exploding: dict[str, Any]
    twin: dict[str, Any]
    max_steps: int
    twin_steps: int
    mitigated: dict[str, Any] | None = None
    mitigated_steps: int | None = None
    precision: str = "32-true"
    fault: str | None = None

    def specs(self, seeds: Iterable[int]) -> list[RunSpec]:
        out = []
        variants = [("exploding", {}, self.max_steps), ("twin", self.twin, self.twin_steps)]
        if self.mitigated is not None:
            variants.append(("mitigated", self.mitigated, self.mitigated_steps or self.max_steps))
        for seed in seeds:
            for role, overrides, steps in variants:
                model = {**self.exploding, **overrides}
                fault = model.get(self.fault) if self.fault else None
                out.append(RunSpec(f"{self.name}-{role}-s{seed}", self.name, role, seed, self.testbed, model, steps,
                                   self.precision, fault))  # fmt: skip
        return out


_GPT = {"arch": "gpt", "n_layer": 2, "n_head": 4, "n_embd": 48, "block_size": 32, "batch_size": 16,
        "max_chars": 300_000}  # fmt: skip
_RNN = {"n_layer": 1, "n_embd": 64, "block_size": 64, "batch_size": 16, "optimizer": "sgd", "max_chars": 300_000}


def _ramp(lr: float, lr_end: float, steps: int) -> dict[str, Any]:
    return {"lr": lr, "lr_end": lr_end, "ramp_steps": steps}


def _capped(lr: float, lr_end: float, steps: int, cap: float) -> dict[str, Any]:
    """The twin of an exponential ramp: the same ramp, held at ``cap`` once it gets there.

    Example:
        >>> _capped(1e-3, 1.0, 300, 0.01)
        {'lr': 0.001, 'lr_end': 0.01, 'ramp_steps': 100}
    """
    return _ramp(lr, cap, round(steps * math.log(cap / lr) / math.log(lr_end / lr)))


FAMILIES: tuple[Family, ...] = (
    Family("gpt-ramp-fast", "predictable",
           "TinyGPT (SDPA, pre-LN) + AdamW, exponential LR ramp 1e-3 -> 3 over 300 steps (range test)",
           "CharLM", {**_GPT, **_ramp(1e-3, 3.0, 300)}, _capped(1e-3, 3.0, 300, 0.1), 400, 300),
    Family("gpt-ramp-slow", "predictable", "the same model, ramp 1e-3 -> 3 over 1,200 steps",
           "CharLM", {**_GPT, **_ramp(1e-3, 3.0, 1200)}, _capped(1e-3, 3.0, 1200, 0.1), 1300, 900),
    Family("gpt-postln", "predictable", "TinyGPT post-LN (SDPA) + AdamW, ramp 1e-3 -> 3 over 500 steps",
           "CharLM", {**_GPT, "norm_first": False, **_ramp(1e-3, 3.0, 500)}, _capped(1e-3, 3.0, 500, 0.05), 600,
           450),
    Family("mha-preln", "predictable",
           "nn.TransformerEncoderLayer (MHA, norm_first=True) LM + AdamW, ramp 1e-3 -> 3 over 500 steps",
           "CharLM", {**_GPT, "arch": "mha", **_ramp(1e-3, 3.0, 500)}, _capped(1e-3, 3.0, 500, 0.1), 600, 450),
    Family("mha-postln", "predictable", "nn.TransformerEncoderLayer post-LN LM + AdamW, ramp 1e-3 -> 3 / 500",
           "CharLM", {**_GPT, "arch": "mha", "norm_first": False, **_ramp(1e-3, 3.0, 500)},
           _capped(1e-3, 3.0, 500, 0.1),
           600, 450),
    Family("attn-logits", "predictable",
           "TinyGPT, 1 head of width 48, 64-char context, no qk-layernorm, linear warm-up to LR 1.0 over 300 steps",
           "CharLM", {**_GPT, "n_head": 1, "block_size": 64, "batch_size": 8, "lr": 1.0, "warmup_steps": 300},
           {"lr": 0.1, "warmup_steps": 30}, 400, 220),
    Family("output-logits", "predictable",
           "TinyGPT with qk-layernorm, no z-loss, no weight decay, warm-up 100 then LR 0.45 held (long run)",
           "CharLM", {**_GPT, "qk_layernorm": True, "lr": 0.45, "warmup_steps": 100},
           {"lr": 0.05, "warmup_steps": 11}, 1000, 600),
    Family("adam-beta2", "predictable",
           "TinyGPT + AdamW beta2 0.999 (not 0.95), warm-up 100 then LR 0.4; mitigated twin: beta2 0.95 (300 steps)",
           "CharLM", {**_GPT, "betas": (0.9, 0.999), "lr": 0.4, "warmup_steps": 100},
           {"lr": 0.05, "warmup_steps": 13}, 500, 250, mitigated={"betas": (0.9, 0.95)}, mitigated_steps=300),
    Family("lstm-sgd", "predictable", "nn.LSTM LM + plain SGD, no clipping, ramp 0.1 -> 100 over 500 steps",
           "CharLM", {**_RNN, "arch": "lstm", **_ramp(0.1, 100.0, 500)}, _capped(0.1, 100.0, 500, 3.0), 600, 480),
    Family("gru-sgd", "predictable", "nn.GRU LM + plain SGD, no clipping, ramp 0.1 -> 100 over 500 steps",
           "CharLM", {**_RNN, "arch": "gru", **_ramp(0.1, 100.0, 500)}, _capped(0.1, 100.0, 500, 3.0), 600, 420),
    Family("cnn-sgd", "predictable", "Conv2d + BatchNorm on 8x8 digits, SGD momentum 0.9, ramp 0.01 -> 10 / 500",
           "DigitsCNN", _ramp(0.01, 10.0, 500), _capped(0.01, 10.0, 500, 0.1), 600, 350),
    Family("mlp-nowarmup", "predictable", "MLP on digits, SGD momentum 0.9, constant LR 0.25 from step 0",
           "DigitsClassifier", {"lr": 0.25}, {"lr": 0.05}, 400, 300),
    Family("fp16", "predictable",
           "TinyGPT under fp16 autocast with a loss scaler (GradScaler('cpu')), ramp 1e-3 -> 3 over 400 steps",
           "CharLM", {**_GPT, **_ramp(1e-3, 3.0, 400)}, _capped(1e-3, 3.0, 400, 0.1), 500, 350, precision="16-mixed"),
    Family("poisoned-batch", "unpredictable",
           "MLP on digits (SGD, LR 0.05): the batch of step 150 unstandardised (x10) with labels off by one",
           "DigitsClassifier", {"lr": 0.05, "poison_step": 150, "poison_scale": 10.0}, {"poison_step": None},
           250, 200, fault="poison_step"),
    Family("lr-shock", "unpredictable", "MLP on digits (SGD, LR 0.05): LR x10 from step 150 on",
           "DigitsClassifier", {"lr": 0.05, "shock_step": 150, "shock_factor": 10.0}, {"shock_step": None},
           300, 230, fault="shock_step"),
)  # fmt: skip

QUICK_FAMILIES = ("gpt-ramp-fast", "adam-beta2", "lstm-sgd", "cnn-sgd", "mlp-nowarmup", "lr-shock")


def specs(families: Sequence[Family], seeds: Iterable[int]) -> list[RunSpec]:
    """Every run of ``families`` over ``seeds``, longest first (so parallel workers finish together)."""
    runs = [spec for family in families for spec in family.specs(list(seeds))]
    return sorted(runs, key=lambda s: -s.max_steps)


# ---------------------------------------------------------------------------------------- detectors


def detectors(monitors: Sequence[str] = tuple(MONITORS)) -> list[Detector]:
    """The suite's detectors: each monitor's own rules replayed over a grid of settings (calibrated,
    ``kind="monitor"``: they make "any monitor"), each monitor live at its defaults (``kind="live"``),
    and the baselines.

    The replays run the monitors' own decision code (:class:`~lightning_diag.testbeds.replays.MonitorReplay`).
    Their grids respect the overhead targets of ``benchmarks/overhead.py``: the logit monitor checks
    at most every 20 steps, the sharpness monitor every 250 (under 5% of a CPU step each).
    """
    from lightning_diag import LogitMonitor, LossSpikeDetector, SharpnessMonitor

    live: list[Detector] = [LiveAlerts(name, name=f"{name} (live, defaults)", kind="live") for name in monitors]
    replays: list[Detector] = [
        MonitorReplay("LossSpikeDetector", LossSpikeDetector, product_grid(
            z_threshold=[4.0, 6.0, None], factor=[1.5, 2.0, None], trend_threshold=[0.05, 0.1, 0.2])),
        MonitorReplay("SpectralAlignmentMonitor", _spectral, product_grid(
            warmup_steps=[0, 50, 100], patience=[5, 10, 21], mean_collapse_threshold=[0.7, 0.8, None],
            layer_rule=["baseline", "none"]), cadence="check_every_n_steps"),
        MonitorReplay("LogitMonitor", LogitMonitor, product_grid(
            check_every_n_steps=[20], attention_threshold=[50.0, 100.0, 300.0, None], growth_factor=[3.0, 10.0, None],
            log_z_threshold=[20.0, 50.0, None], collapse_threshold=[0.5, None], patience=[1, 20]),
            cadence="check_every_n_steps"),
        MonitorReplay("SharpnessMonitor", SharpnessMonitor, product_grid(
            check_every_n_steps=[250], stability_threshold=[1.0, 2.0, 5.0, 10.0, 30.0], patience=[1, 250]),
            cadence="check_every_n_steps", recorded_cadence=10),
        MonitorReplay("GradNormWatcher (z-score as a warning)", _grad_warning, product_grid(
            z_threshold=[3.0, 5.0, 8.0, 12.0, 20.0])),
    ]  # fmt: skip
    replays[-1].kind = "candidate"
    baselines: list[Detector] = [
        SpikeDetectionReplay(),
        Threshold("grad norm > 1 (fixed)", "grad_norm", [{"threshold": 1.0, "warmup": BASELINE_WARMUP}]),
        Threshold("grad norm > 5 (fixed)", "grad_norm", [{"threshold": 5.0, "warmup": BASELINE_WARMUP}]),
        RunningMinRatio("loss > 2x running min", [{"factor": 2.0}]),
        SpikeDetectionReplay("SpikeDetection (calibrated)", product_grid(rtol=[0.25, 0.5, 1.0, 2.0, 4.0],
                                                                         window=[10, 50])),
        Threshold("grad norm > t (calibrated)", "grad_norm",
                  product_grid(threshold=[0.5, 1, 2, 5, 10, 20, 50, 100], patience=[1, 3], warmup=[0, 50])),
        RunningMinRatio("loss > k x running min (calibrated)",
                        product_grid(factor=[1.25, 1.5, 2.0, 3.0, 5.0], patience=[1, 3, 5])),
    ]  # fmt: skip
    return replays + live + baselines


def _spectral(**setting: Any) -> Any:
    """The spectral monitor with its patience for both rules (they move together in the grid)."""
    from lightning_diag import SpectralAlignmentMonitor

    return SpectralAlignmentMonitor(**{"mean_collapse_patience": setting.get("patience", 21), **setting})


def _grad_warning(**setting: Any) -> Any:
    from lightning_diag import GradNormWatcher

    return GradNormWatcher(spike_severity="warning", **setting)


# ------------------------------------------------------------------------------------------ a run


def run_one(spec: RunSpec, out: str) -> dict[str, Any]:
    """Train one run with every applicable monitor watching every step; save its record; return a summary."""
    import lightning.pytorch as pl
    import torch

    from lightning_diag.testbeds import CharLM, DigitsClassifier, DigitsCNN, explosion_step, flush_denormals
    from lightning_diag.testbeds.recording import EVERY_STEP, ExplosionRecorder, MemoryLogger, default_monitors

    torch.set_num_threads(1)  # deterministic and fast at these sizes; workers run in parallel instead
    flush_denormals(True)
    pl.seed_everything(spec.seed, verbose=False)
    testbed = {"CharLM": CharLM, "DigitsClassifier": DigitsClassifier, "DigitsCNN": DigitsCNN}[spec.testbed]
    model = testbed(seed=spec.seed, **spec.model)
    task = "lm" if spec.testbed == "CharLM" else "classifier"
    monitors, left_out = default_monitors(task, every_n_steps=1, action="log", overrides=EVERY_STEP)
    recorder = ExplosionRecorder(stop_after=STOP_AFTER, cadence=1, definition=explosion_step, check_every=5)
    logger = MemoryLogger()
    plugins = []
    if spec.precision == "16-mixed":  # Lightning maps precision="16-mixed" to bf16 on a CPU; say fp16 explicitly
        from lightning.pytorch.plugins import MixedPrecision

        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=spec.max_steps, max_epochs=-1, logger=logger, log_every_n_steps=1,
        callbacks=[recorder, *monitors], plugins=plugins, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1.0 if task == "classifier" else 0,
        default_root_dir=os.path.join(out, "tmp"),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - start
    record = RunRecord.from_training(
        name=spec.name, family=spec.family, seed=spec.seed, role=spec.role,
        config={"testbed": spec.testbed, "precision": spec.precision, **spec.model}, recorder=recorder,
        logger=logger, monitors=monitors, left_out=left_out, fault_step=spec.fault_step, seconds=round(seconds, 1),
    )  # fmt: skip
    record.explosion = explosion_step(record.loss)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    record.save(os.path.join(out, "runs", f"{spec.name}.json.gz"))
    return {"name": spec.name, "steps": record.steps, "explosion": record.explosion, "seconds": record.seconds}


def _run_quietly(job: tuple[RunSpec, str]) -> dict[str, Any]:
    """``run_one`` with Lightning's banners and the usual CPU warnings silenced (worker entry point)."""
    import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import: import first, then quieten

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_one(*job)


def train(jobs: Sequence[RunSpec], out: str, workers: int) -> None:
    """Train every run, ``workers`` at a time (spawned processes, one thread each)."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    with contextlib.ExitStack() as stack:
        done: Iterable[dict[str, Any]] = map(_run_quietly, [(spec, out) for spec in jobs])
        if workers > 1:  # spawn: a fresh interpreter per worker, nothing inherited from this one
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=8))
            done = pool.imap_unordered(_run_quietly, [(spec, out) for spec in jobs])
        for count, summary in enumerate(done, 1):
            boom = "stable" if summary["explosion"] is None else f"explodes at {summary['explosion']}"
            print(f"  [{count:>3}/{len(jobs)}] {summary['name']:<32} {summary['steps']:>5} steps, {boom:<17} "
                  f"{summary['seconds']:>6.1f} s", flush=True)  # fmt: skip


# ------------------------------------------------------------------------------------------ report


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"
    return str(value)


def markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; None prints as ``-``.

    Example:
        >>> print(markdown(["a", "b"], [[1, None]]))
        | a | b |
        |---|---|
        | 1 | - |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _score_cells(outcomes: Sequence[Outcome]) -> list[Any]:
    total = score(outcomes)
    n = total.exploded
    return [*(f"{total.recall(k)}/{n}" for k in LEADS), total.median_lead, total.min_lead,
            f"{total.false_alarms_stable}/{total.stable}", f"{total.false_alarms_healthy}/{n}"]  # fmt: skip


def _families_of(records: Sequence[RunRecord], kind: str) -> list[str]:
    kinds = {f.name: f.kind for f in FAMILIES}
    return list(dict.fromkeys(r.family for r in records if kinds.get(r.family, "predictable") == kind))


def headline_table(cal: Calibration, records: Sequence[RunRecord], order: Sequence[str]) -> str:
    """Out-of-sample and in-sample figures of every detector over the predictable families."""
    predictable = set(_families_of(records, "predictable"))
    by_name = {r.name: r for r in records}
    rows = []
    for name in order:
        runs = [n for n in cal.watched[name] if by_name[n].family in predictable]
        oos = _score_cells([cal.out_of_sample[name][n] for n in runs])
        ins = score(cal.in_sample_outcomes[name][n] for n in runs)
        rows.append([name, cal.detectors[name].kind, *oos, f"{ins.recall(10)}/{ins.exploded}", ins.median_lead,
                     f"{ins.false_alarms_stable}/{ins.stable}, {ins.false_alarms_healthy}/{ins.exploded}"])
    lead_cols = [f"recall lead>={k}" for k in LEADS]
    return markdown(["detector", "kind", *lead_cols, "median lead", "min lead", "false alarms: stable runs",
                     "false alarms: healthy phases", "in sample: recall lead>=10", "in sample: median lead",
                     "in sample: false alarms (stable, healthy)"], rows)  # fmt: skip


def family_table(cal: Calibration, records: Sequence[RunRecord], order: Sequence[str]) -> str:
    """Per predictable family, out of sample: recall at lead >= 10 / exploded, median lead; false alarms."""
    families = _families_of(records, "predictable")
    by_name = {r.name: r for r in records}
    rows = []
    for name in order:
        cells = []
        for family in families:
            runs = [n for n in cal.watched[name] if by_name[n].family == family]
            if not runs:
                cells.append("n/a")
                continue
            total = score(cal.out_of_sample[name][n] for n in runs)
            lead = "-" if total.median_lead is None else f"{total.median_lead:g}"
            cells.append(f"{total.recall(10)}/{total.exploded}, {lead}; {total.false_alarms}")
        rows.append([name, *cells])
    return markdown(["detector", *families], rows)


def reaction_table(cal: Calibration, records: Sequence[RunRecord], order: Sequence[str]) -> str:
    """Unpredictable families: how fast each detector reacts after the fault (in-sample settings)."""
    families = _families_of(records, "unpredictable")
    rows = []
    for family in families:
        runs = [r for r in records if r.family == family]
        for name in order:
            watched = [r for r in runs if r.name in cal.out_of_sample[name]]
            if not watched:
                continue
            outcomes = [(r, cal.out_of_sample[name][r.name]) for r in watched]
            faulted = [(r, o) for r, o in outcomes if o.exploded and r.fault_step is not None]
            reacts = [o.warning - r.fault_step for r, o in faulted if o.warning is not None]
            leads = [o.lead for _, o in faulted if o.lead is not None]
            alarms = sum(o.false_alarm for _, o in outcomes)
            rows.append([family, name, f"{len(reacts)}/{len(faulted)}", statistics.median(reacts) if reacts else None,
                         max(reacts) if reacts else None, statistics.median(leads) if leads else None,
                         f"{alarms}/{len(outcomes)}"])  # fmt: skip
    return markdown(["family", "detector", "reacted", "median steps fault -> warning", "max steps",
                     "median lead vs explosion", "false alarms (before the fault, or stable runs)"], rows)


def rule_table(records: Sequence[RunRecord]) -> str:
    """Each rule of each live monitor alone, ``info`` included: which rule warns first, and how noisily.

    A rule is the first two parts of an alert's metric (the layer dropped) and its severity. No
    parameters, so out of sample equals in sample; predictable families only.
    """
    predictable = set(_families_of(records, "predictable"))
    runs = [r for r in records if r.family in predictable]
    rules = sorted({(monitor, "/".join(a["metric"].split("/")[:2]), a["severity"]) for r in runs
                    for monitor, alerts in r.alerts.items() for a in alerts})  # fmt: skip
    rows = []
    for monitor, rule, severity in rules:
        detector = LiveAlerts(monitor, (severity,), metric=f"{rule}*")
        watched = [r for r in runs if detector.watches(r)]
        rows.append([f"{monitor}: {rule} ({severity})",
                     *_score_cells([outcome(r, detector.warning_steps(r, {})) for r in watched])])  # fmt: skip
    return markdown(["rule (severity)", *(f"recall lead>={k}" for k in LEADS), "median lead", "min lead",
                     "false alarms: stable runs", "false alarms: healthy phases"], rows)  # fmt: skip


def family_summary(records: Sequence[RunRecord]) -> str:
    """What each family is, its runs, where it explodes, its safe learning rate, and its cost."""
    rows = []
    for family in FAMILIES:
        runs = [r for r in records if r.family == family.name]
        if not runs:
            continue
        booms = [r for r in runs if r.role == "exploding" and r.exploded]
        steps = [r.explosion for r in booms]
        lrs = [float(r.lr[r.explosion]) for r in booms]
        healthy = [r.healthy_end for r in booms]
        stable = [r for r in runs if r.role != "exploding"]
        rows.append([
            family.name, family.kind, family.what, f"{len(booms)}/{sum(r.role == 'exploding' for r in runs)}",
            f"{min(steps)}-{max(steps)}" if steps else "-", f"{min(lrs):.3g}-{max(lrs):.3g}" if lrs else "-",
            f"{min(healthy)}-{max(healthy)}" if healthy else "-", runs[0].safe_lr,
            f"{sum(not r.exploded for r in stable)}/{len(stable)}", round(sum(r.seconds for r in runs)),
        ])  # fmt: skip
    return markdown(["family", "kind", "what", "exploded", "explosion steps", "LR at explosion", "healthy phase ends",
                     "safe LR (twins)", "twins stable", "train s"], rows)  # fmt: skip


def settings_table(cal: Calibration, order: Sequence[str]) -> str:
    """The setting each calibrated detector got in sample and in each fold."""
    rows = []
    for name in order:
        detector = cal.detectors[name]
        if len(detector.grid) <= 1:
            continue
        per_fold = [json.dumps(cal.folds[f][name], sort_keys=True) for f in cal.folds]
        counts = {s: per_fold.count(s) for s in dict.fromkeys(per_fold)}
        rows.append([name, len(detector.grid), json.dumps(cal.in_sample[name], sort_keys=True),
                     "; ".join(f"{s} x{c}" for s, c in counts.items())])  # fmt: skip
    return markdown(["detector", "settings", "in sample", "leave-one-family-out folds (setting x folds)"], rows)


def run_table(records: Sequence[RunRecord]) -> str:
    rows = [[r.name, r.role, r.steps, r.explosion, r.healthy_end, r.safe_lr, r.fault_step, r.seconds,
             ", ".join(sorted(r.left_out)) or "-"] for r in records]  # fmt: skip
    return markdown(["run", "role", "steps", "explosion", "healthy until", "safe LR", "fault", "s", "not watched by"],
                    rows)  # fmt: skip


def plot_leads(cal: Calibration, records: Sequence[RunRecord], order: Sequence[str], path: str) -> None:
    """One panel per family: each detector's out-of-sample leads (dots), misses (x below zero)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [f for f in dict.fromkeys(r.family for r in records)]
    cols = 4
    rows = -(-len(families) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    x = np.arange(len(order))
    for ax, family in zip(axes.flat, families):
        runs = [r for r in records if r.family == family and r.exploded]
        for i, name in enumerate(order):
            outcomes = [cal.out_of_sample[name][r.name] for r in runs if r.name in cal.out_of_sample[name]]
            leads = [o.lead for o in outcomes if o.lead is not None]
            misses = sum(o.lead is None for o in outcomes)
            jitter = np.linspace(-0.15, 0.15, len(leads)) if len(leads) > 1 else np.zeros(len(leads))
            color = {"monitor": "C0", "combined": "C0", "candidate": "C2"}.get(cal.detectors[name].kind, "C1")
            ax.scatter(i + jitter, leads, s=14, color=color, zorder=3)
            if misses:
                ax.scatter([i], [-50], marker="x", color="C3", s=20 + 10 * misses, zorder=3)
        ax.axhline(10, color="0.6", lw=0.8, ls="--")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_yscale("symlog", linthresh=10)
        ax.set_title(family, fontsize=9)
        ax.set_xticks(x, order, rotation=90, fontsize=6)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    axes[0][0].set_ylabel("lead (steps, out of sample)")
    fig.suptitle("Out-of-sample leads per family (blue: monitors, green: candidate rules, orange: baselines; "
                 "x at -50: missed; dashed: lead 10)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(records: list[RunRecord], out: str, command: str, seconds: float | None) -> str:
    """Label, calibrate, score, and write the markdown, the JSON and the figure; returns the markdown."""
    label_runs(records)
    monitors = [name for name in MONITORS if any(name in r.alerts for r in records)]
    dets = [d for d in detectors(monitors) if any(d.watches(r) for r in records)]
    predictable = _families_of(records, "predictable")
    cal = leave_one_family_out(dets, records, predictable)
    order = [*(d.name for d in dets if d.kind == "monitor"), ANY_MONITOR,
             *(d.name for d in dets if d.kind != "monitor")]  # fmt: skip
    order = [name for name in order if name in cal.detectors]
    exploded = sum(r.exploded for r in records)
    timing = "" if seconds is None else f", {seconds / 60:.1f} min wall clock"
    text = "\n\n".join([
        f"# Early-warning suite\n\n`{command}`: {len(records)} runs in {len(set(r.family for r in records))} "
        f"families ({len(predictable)} predictable), {exploded} exploded{timing}. Monitors at their defaults, "
        f"every figure logged every step; settings of replayed and calibrated detectors chosen leave-one-family-out.",
        "## Out of sample (each family scored with settings chosen on the others) and in sample\n\n"
        "Recall: exploded runs warned at least k steps before the explosion, after the healthy phase. "
        "False alarms: stable runs with any warning; exploded runs with a warning in their healthy phase.\n\n"
        + headline_table(cal, records, order),
        "## Per family, out of sample\n\nrecall at lead >= 10 / exploded, median lead; false alarms\n\n"
        + family_table(cal, records, order),
        "## Unpredictable families: reaction after the fault (in-sample settings)\n\n"
        + reaction_table(cal, records, order),
        "## Each rule of each monitor alone (live, defaults, info alerts included; predictable families)\n\n"
        + rule_table(records),
        "## Families\n\n" + family_summary(records),
        "## Chosen settings\n\n" + settings_table(cal, order),
        "## Runs\n\n" + run_table(records),
    ])  # fmt: skip
    with open(os.path.join(out, "early_warning.md"), "w") as handle:
        handle.write(text + "\n")
    _write_json(cal, records, order, os.path.join(out, "early_warning.json"), command)
    plot_leads(cal, records, order, os.path.join(out, "early_warning.png"))
    return text


def _write_json(cal: Calibration, records: Sequence[RunRecord], order: Sequence[str], path: str, command: str) -> None:
    def first(table: dict[str, dict[str, Outcome]], run: str) -> dict[str, Any]:
        return {d: dataclasses.asdict(table[d][run]) for d in order if run in table[d]}

    runs = []
    for r in records:
        data = r.to_json()
        data.pop("series")
        data.pop("alerts")
        data["record"] = os.path.join("runs", f"{r.name}.json.gz")
        data["out_of_sample"] = first(cal.out_of_sample, r.name)
        data["in_sample"] = first(cal.in_sample_outcomes, r.name)
        runs.append(data)
    payload = {"command": command, "families": [dataclasses.asdict(f) for f in FAMILIES],
               "detectors": {d: {"kind": cal.detectors[d].kind, "grid": cal.detectors[d].grid} for d in order
                             if d != ANY_MONITOR},
               "in_sample": cal.in_sample, "folds": cal.folds, "runs": runs}  # fmt: skip
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=1, default=str)


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"families {', '.join(QUICK_FAMILIES)}, seed 0")
    parser.add_argument("--out", default=os.path.join("runs", "early_warning"), help="output directory")
    parser.add_argument("--workers", type=int, default=1, help="runs trained in parallel, one thread each")
    parser.add_argument("--families", default=None, help="comma-separated family names (default: all)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; 1 with --quick)")
    parser.add_argument("--rescore", action="store_true", help="score the records already in --out, no training")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    names = (args.families.split(",") if args.families
             else list(QUICK_FAMILIES if args.quick else [f.name for f in FAMILIES]))
    unknown = sorted(set(names) - {f.name for f in FAMILIES})
    if unknown:
        parser.error(f"unknown families {unknown}; known: {[f.name for f in FAMILIES]}")
    families = [f for f in FAMILIES if f.name in names]
    seeds = range(args.seeds if args.seeds is not None else (1 if args.quick else 3))
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/early_warning.py", *(shlex.quote(a) for a in given)])
    jobs = specs(families, seeds)
    start = time.perf_counter()
    if not args.rescore:
        print(f"{command}: {len(jobs)} runs of {len(families)} families, {args.workers} worker(s)", flush=True)
        train(jobs, args.out, args.workers)
        seconds: float | None = time.perf_counter() - start
    else:
        seconds = None
    wanted = {spec.name for spec in jobs}
    paths = sorted(glob.glob(os.path.join(args.out, "runs", "*.json.gz")))
    records = [RunRecord.load(p) for p in paths if os.path.basename(p)[: -len(".json.gz")] in wanted]
    if not records:
        parser.error(f"no recorded runs in {args.out}/runs")
    rank = {f.name: i for i, f in enumerate(FAMILIES)}
    roles = {"exploding": 0, "twin": 1, "mitigated": 2}
    order = {s.name: i for i, s in enumerate(sorted(jobs, key=lambda s: (rank[s.family], s.seed, roles[s.role])))}
    records.sort(key=lambda r: order[r.name])
    text = report(records, args.out, command, seconds)
    print("\n" + text)
    print(f"\nWrote {args.out}/early_warning.md, .json, .png and runs/ ({time.perf_counter() - start:.0f} s).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
