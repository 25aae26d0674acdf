"""The early-warning suite: does each monitor warn before a loss explosion, how early, and does it
stay quiet when nothing explodes?

Usage::

    python benchmarks/early_warning.py                 # the full grid: 34 runs, 5 min on 2 idle CPU cores
    python benchmarks/early_warning.py --quick         # 4 runs, 20-40 s (CI)
    python benchmarks/early_warning.py --out DIR --workers 2

Writes ``DIR/early_warning.md`` (the tables), ``DIR/early_warning.json`` (one record per run: the
per-step losses and gradient norms, the explosion step, every detector's first warning) and
``DIR/early_warning.png`` (the loss of a representative run with each detector's first warning).
The same command gives the same tables on the same machine: every run is seeded (model, data
order, monitors' sampling) and trains on one thread, whatever ``--workers``.

**The grid** (DESIGN.md section 7; the runs were chosen by measuring where these models explode):

- ``gpt`` / ``gpt-qk``: :class:`~lightning_diag.testbeds.CharLM` (3-layer pre-LN GPT on Python's
  standard-library source, AdamW, no clipping), without and with qk-layernorm, under a linear
  warm-up over 1,000 steps to a peak learning rate of 3e-3 (the stable control), 0.3 (high, the
  loss degrades but does not explode within 800 steps), 0.7 and 1.0 (the loss explodes once the
  rate passes ~0.45: near step 600 and 450), seeds 0-2, at most 800 steps.
- ``ramp``: the learning-rate range test, an exponential ramp from 1e-3 to 1.0 over 1,000 steps,
  which always diverges (near step 900, at a rate of ~0.5), seeds 0-2; the control ramps to 1e-2.
- ``digits``: :class:`~lightning_diag.testbeds.DigitsClassifier` (MLP, SGD with momentum 0.9,
  learning rate 0.05, weight decay 5e-3) whose step is made 10x too large at step 300 (the loss
  explodes within 1-3 steps: a sudden event no monitor can foresee, only detect), seeds 0-2; the
  control keeps its step. Weight decay keeps the training loss away from 0, where the relative
  explosion rule would mistake ordinary batch noise for an explosion.

**Labels.** One written definition, applied to every run's recorded per-step loss: the explosion
step is :func:`~lightning_diag.testbeds.divergence_step` (the first of 10 consecutive losses above
3x the running minimum, or the first non-finite loss, dated to the start of the climb). A run with
an explosion step is *exploding*; every other run is *stable*, whatever its learning rate. A run
stops 100 steps after its explosion (at the next multiple of 10 steps).

**Detectors.** Every monitor of the package at its default settings (``every_n_steps=10`` so that
alerts surface within 10 steps of firing; ``action="log"``); a monitor's *warning* is any alert of
severity ``"warning"`` or ``"critical"`` (``"info"`` alerts are records that no action acts on;
the per-rule table shows them too). ``NCTracker`` needs a classifier: it runs on ``digits`` only.
Baselines: Lightning's ``SpikeDetection`` at its defaults (loss at least 3x the mean of the last 10,
recording instead of raising), a fixed gradient-norm threshold (1, the customary clipping value,
and 5; from step 50 on, past the initial transient), and the plain rule ``loss > 2 x running min``.

**Scores** (per detector, over the runs it watched): *recall*, the share of exploding runs with a
warning at or before the explosion step; *lead time* = explosion step - first warning (median and
minimum over exploding runs with any warning; negative when the first warning came late);
*false alarms*, stable runs with any warning. A warning long before the explosion counts as a
warning: read the lead times together with the false alarms. ``all monitors (first of any)`` is
the first warning of any monitor: what a user running all of them sees first.
"""

from __future__ import annotations

import argparse
import contextlib
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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "BASELINES",
    "RunSpec",
    "explosion_step",
    "first_above",
    "first_loss_above_min",
    "full_grid",
    "lead_time",
    "main",
    "markdown_tables",
    "quick_grid",
    "run_one",
    "score_baselines",
    "summarize",
    "with_any_monitor",
]

CADENCE = 10  # every_n_steps of every monitor
STOP_AFTER = 100  # steps recorded past the explosion
GRAD_NORM_THRESHOLDS = (1.0, 5.0)
BASELINE_WARMUP = 50  # the fixed grad-norm threshold ignores the steps before this one
LOSS_FACTOR = 2.0  # the plain rule: loss > LOSS_FACTOR x running minimum
SPIKE_DETECTION = "SpikeDetection (Lightning)"
ANY_MONITOR = "all monitors (first of any)"
BASELINES = (SPIKE_DETECTION, *(f"grad norm > {t:g} (fixed)" for t in GRAD_NORM_THRESHOLDS),
             f"loss > {LOSS_FACTOR:g} x running min")  # fmt: skip


# ---------------------------------------------------------------------------- harness arithmetic


def explosion_step(losses: Sequence[float]) -> int | None:
    """The written definition of the explosion step, for every run: ``divergence_step(losses, 3, 10)``.

    Example:
        >>> explosion_step([2.0] * 20 + [7.0] * 10)
        20
    """
    from lightning_diag.demo import EXPLOSION_FACTOR, EXPLOSION_PATIENCE
    from lightning_diag.testbeds import divergence_step

    return divergence_step(list(losses), EXPLOSION_FACTOR, EXPLOSION_PATIENCE)


def first_above(values: Sequence[float], threshold: float, start: int = 0) -> int | None:
    """First index ``>= start`` whose value is above ``threshold`` or non-finite, or None.

    Example:
        >>> first_above([9.0, 0.5, 2.0, float("nan")], 1.0, start=1)
        2
    """
    for step in range(start, len(values)):
        if not values[step] <= threshold:  # NaN fails every comparison: it counts
            return step
    return None


def first_loss_above_min(losses: Sequence[float], factor: float) -> int | None:
    """First step whose loss is above ``factor`` x the minimum of the finite losses before it, or non-finite.

    Example:
        >>> first_loss_above_min([3.0, 1.0, 1.5, 2.5], 2.0)
        3
    """
    best = math.inf
    for step, loss in enumerate(losses):
        if not math.isfinite(loss) or loss > factor * best:
            return step
        best = min(best, loss)
    return None


def lead_time(explosion: int | None, warning: int | None) -> int | None:
    """Steps from the first warning to the explosion (negative: the warning came late); None if either is missing.

    Example:
        >>> lead_time(900, 750), lead_time(900, 905), lead_time(None, 10), lead_time(900, None)
        (150, -5, None, None)
    """
    if explosion is None or warning is None:
        return None
    return explosion - warning


def score_baselines(
    losses: Sequence[float], grad_norms: Sequence[float], spike_steps: Iterable[int]
) -> dict[str, int | None]:
    """First warning step of each baseline (``BASELINES``), from a run's records.

    Example:
        >>> score_baselines([3.0, 2.0, 2.0, 4.5], [9.0] + [0.5] * 60, [3])["loss > 2 x running min"]
        3
    """
    spike_steps = list(spike_steps)
    first = {SPIKE_DETECTION: min(spike_steps) if spike_steps else None}
    for threshold in GRAD_NORM_THRESHOLDS:
        first[f"grad norm > {threshold:g} (fixed)"] = first_above(grad_norms, threshold, start=BASELINE_WARMUP)
    first[f"loss > {LOSS_FACTOR:g} x running min"] = first_loss_above_min(losses, LOSS_FACTOR)
    return first


def summarize(
    runs: Sequence[dict[str, Any]], detectors: Sequence[str], key: str = "first_warning"
) -> list[dict[str, Any]]:
    """Recall, lead times and false alarms of each detector over the runs it watched.

    Each run is a dict with ``explosion_step`` (None for a stable run) and ``run[key]``, a dict
    ``{detector: first warning step or None}`` holding only the detectors that watched the run.

    Example:
        >>> runs = [{"explosion_step": 100, "first_warning": {"a": 80}},
        ...         {"explosion_step": 50, "first_warning": {"a": 60}},
        ...         {"explosion_step": None, "first_warning": {"a": None}}]
        >>> row = summarize(runs, ["a"])[0]
        >>> row["recall"], row["detected"], row["lead_median"], row["lead_min"], row["false_alarms"]
        ('1/2', '2/2', 5.0, -10, '0/1')
    """
    rows = []
    for detector in detectors:
        watched = [r for r in runs if detector in r[key]]
        exploding = [r for r in watched if r["explosion_step"] is not None]
        stable = [r for r in watched if r["explosion_step"] is None]
        leads = [lead_time(r["explosion_step"], r[key][detector]) for r in exploding]
        leads = [lead for lead in leads if lead is not None]
        alarms = sum(r[key][detector] is not None for r in stable)
        rows.append({
            "detector": detector,
            "runs": len(watched),
            "recall": f"{sum(lead >= 0 for lead in leads)}/{len(exploding)}",
            "detected": f"{len(leads)}/{len(exploding)}",
            "lead_median": statistics.median(leads) if leads else None,
            "lead_min": min(leads) if leads else None,
            "false_alarms": f"{alarms}/{len(stable)}",
        })  # fmt: skip
    return rows


def _markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def with_any_monitor(runs: Sequence[dict[str, Any]], monitors: Sequence[str]) -> list[dict[str, Any]]:
    """Copies of ``runs`` whose ``first_warning`` also holds ``ANY_MONITOR``: the first warning of any monitor.

    What a user running every monitor sees first. Example:
        >>> with_any_monitor([{"first_warning": {"a": 50, "b": None, "x": 10}}], ["a", "b"])[0]["first_warning"]
        {'a': 50, 'b': None, 'x': 10, 'all monitors (first of any)': 50}
    """
    out = []
    for run in runs:
        steps = [run["first_warning"][m] for m in monitors if run["first_warning"].get(m) is not None]
        watched = any(m in run["first_warning"] for m in monitors)
        first = {**run["first_warning"], **({ANY_MONITOR: min(steps, default=None)} if watched else {})}
        out.append({**run, "first_warning": first})
    return out


_HEADER = ("runs", "recall (warned <= explosion)", "detected (any time)", "lead median", "lead min",
           "false alarms (stable runs)")  # fmt: skip


def _score_cells(score: dict[str, Any]) -> tuple[Any, ...]:
    return (score["runs"], score["recall"], score["detected"], score["lead_median"], score["lead_min"],
            score["false_alarms"])  # fmt: skip


def _family_table(runs: Sequence[dict[str, Any]], detectors: Sequence[str]) -> str:
    """Recall, median lead and false alarms of each detector in each family of runs."""
    families = list(dict.fromkeys(r["family"] for r in runs))
    rows = []
    for detector in detectors:
        cells = []
        for family in families:
            score = summarize([r for r in runs if r["family"] == family], [detector])[0]
            lead = "-" if score["lead_median"] is None else f"{score['lead_median']:g}"
            cells.append(f"{score['recall']}, {lead}; {score['false_alarms']}" if score["runs"] else "n/a")
        rows.append((detector, *cells))
    return "By family (recall, median lead; false alarms):\n\n" + _markdown(("detector", *families), rows)


def _rule_table(runs: Sequence[dict[str, Any]]) -> str:
    """Each rule of each monitor scored alone, ``info`` alerts included: which rule fires first, how noisily."""
    rules_of = {}  # monitor -> every rule that fired in some run ("<rule family> (<severity>)")
    for run in runs:
        for monitor, rules in run.get("rules", {}).items():
            rules_of.setdefault(monitor, set()).update(rules)
    if not any(rules_of.values()):
        return ""
    per_rule = [{"explosion_step": run["explosion_step"], "first": {
        f"{monitor}: {rule}": run["rules"][monitor].get(rule, {}).get("step")
        for monitor in run.get("rules", {}) for rule in rules_of[monitor]}} for run in runs]  # fmt: skip
    names = sorted({name for run in per_rule for name in run["first"]})
    rows = [(score["detector"], *_score_cells(score)) for score in summarize(per_rule, names, key="first")]
    return ("Per rule (severity in brackets; `info` alerts are recorded but never acted on):\n\n"
            + _markdown(("monitor: rule", *_HEADER), rows))  # fmt: skip


def _run_table(runs: Sequence[dict[str, Any]], detectors: Sequence[str]) -> str:
    rows = [(r["name"], r["steps"], r["explosion_step"], *(r["first_warning"].get(d, "n/a") for d in detectors))
            for r in runs]  # fmt: skip
    return "Per run (first warning step; `-` none, `n/a` not run):\n\n" + _markdown(
        ("run", "steps", "explosion", *detectors), rows)


def markdown_tables(runs: Sequence[dict[str, Any]], monitors: Sequence[str], missing: dict[str, str]) -> str:
    """The report in markdown: detectors, detectors by family, rules, and runs.

    Example:
        >>> runs = [{"name": "r", "family": "f", "explosion_step": 9, "steps": 20,
        ...          "first_warning": {"M": 5, "SpikeDetection (Lightning)": None}, "rules": {"M": {}}}]
        >>> print(markdown_tables(runs, ["M"], {}).splitlines()[2])
        | M | monitor | 1 | 1/1 | 1/1 | 4 | 4 | 0/0 |
    """
    baselines = [b for b in BASELINES if any(b in r["first_warning"] for r in runs)]
    detectors = [*monitors, *baselines]
    kinds = {**{m: "monitor" for m in monitors}, **{b: "baseline" for b in baselines}, ANY_MONITOR: "all monitors"}
    rows = [(score["detector"], kinds[score["detector"]], *_score_cells(score))
            for score in summarize(with_any_monitor(runs, monitors), [*monitors, ANY_MONITOR, *baselines])]  # fmt: skip
    parts = [_markdown(("detector", "kind", *_HEADER), rows)]
    if missing:
        parts.append("Monitors not in the suite: " + "; ".join(f"{k} ({v})" for k, v in missing.items()))
    if len({r["family"] for r in runs}) > 1:
        parts.append(_family_table(with_any_monitor(runs, monitors), [*monitors, ANY_MONITOR, *baselines]))
    parts += [_rule_table(runs), _run_table(runs, detectors)]
    return "\n\n".join(part for part in parts if part)


# ------------------------------------------------------------------------------------------ grid


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: a family, the testbed's arguments and a step budget."""

    name: str
    family: str  # "gpt", "gpt-qk", "ramp" (CharLM) or "digits" (DigitsClassifier)
    max_steps: int
    seed: int
    model: dict[str, Any] = field(default_factory=dict)


def _gpt(peak: float, seed: int, qk: bool, max_steps: int = 800) -> RunSpec:
    family = "gpt-qk" if qk else "gpt"
    return RunSpec(f"{family}-peak{peak:g}-s{seed}", family, max_steps, seed,
                   {"lr": peak, "warmup_steps": 1000, "qk_layernorm": qk})  # fmt: skip


def _ramp(end: float, seed: int) -> RunSpec:
    return RunSpec(f"ramp-to{end:g}-s{seed}", "ramp", 1000, seed, {"lr": 1e-3, "lr_end": end, "ramp_steps": 1000})


def _digits(shock: float | None, seed: int, max_steps: int = 500) -> RunSpec:
    model = {"lr": 0.05, "weight_decay": 5e-3, "shock_step": 300 if shock else None, "shock_factor": shock or 1.0}
    name = f"digits-shock{shock:g}-s{seed}" if shock else f"digits-control-s{seed}"
    return RunSpec(name, "digits", max_steps, seed, model)


def full_grid() -> list[RunSpec]:
    """The 34 runs of the full suite (longest first, so two workers finish together)."""
    runs = [_ramp(1.0, s) for s in range(3)] + [_ramp(1e-2, 0)]
    runs += [_gpt(peak, s, qk) for qk in (False, True) for peak in (3e-3, 0.3, 0.7, 1.0) for s in range(3)]
    runs += [_digits(10.0, s) for s in range(3)] + [_digits(None, s) for s in range(3)]
    return runs


def quick_grid() -> list[RunSpec]:
    """Four short runs for CI: an exploding and a stable run of each testbed (20-40 s on 2 cores)."""
    return [_gpt(1.0, 0, False, max_steps=600), _gpt(3e-3, 0, False, max_steps=300),
            _digits(10.0, 0, max_steps=420), _digits(None, 0, max_steps=300)]  # fmt: skip


# ----------------------------------------------------------------------------------------- a run


def _digits_model(seed: int, lr: float, weight_decay: float, shock_step: int | None, shock_factor: float) -> Any:
    import torch

    from lightning_diag.testbeds import DigitsClassifier

    class ShockedDigits(DigitsClassifier):
        """DigitsClassifier whose learning rate is multiplied by ``shock_factor`` from ``shock_step`` on."""

        def configure_optimizers(self) -> Any:
            optimizer = super().configure_optimizers()
            factor = lambda step: shock_factor if shock_step is not None and step >= shock_step else 1.0  # noqa: E731
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return ShockedDigits(lr=lr, weight_decay=weight_decay, seed=seed)


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train one run of the grid with every applicable monitor and the live baseline; return its record."""
    import lightning.pytorch as pl
    import torch

    from lightning_diag.demo import ExplosionRecorder, RecordingSpikeDetection, default_monitors
    from lightning_diag.testbeds import CharLM, flush_denormals

    torch.set_num_threads(1)  # deterministic and fast for these sizes; workers run in parallel instead
    flush_denormals(True)
    pl.seed_everything(spec.seed, verbose=False)
    if spec.family == "digits":
        model, task = _digits_model(spec.seed, **spec.model), "classifier"
    else:
        model, task = CharLM(seed=spec.seed, **spec.model), "lm"
    monitors, left_out = default_monitors(task, every_n_steps=CADENCE, action="log")
    recorder, spikes = ExplosionRecorder(stop_after=STOP_AFTER, cadence=CADENCE), RecordingSpikeDetection()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=spec.max_steps, max_epochs=-1, logger=False,
        callbacks=[recorder, *monitors, spikes], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1.0 if task == "classifier" else 0,
        default_root_dir=os.path.join(os.environ.get("TMPDIR", "/tmp"), "early_warning"),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - start
    first, rules = {}, {}
    for monitor in monitors:
        name = type(monitor).__name__
        alerts = sorted(monitor.alerts, key=lambda a: a.step)
        warned = [a.step for a in alerts if a.severity != "info"]
        first[name] = warned[0] if warned else None
        rules[name] = {}
        for alert in alerts:  # first alert and count of each rule, info included
            rule = f"{'/'.join(alert.metric.split('/')[:2])} ({alert.severity})"
            entry = rules[name].setdefault(rule, {"step": alert.step, "metric": alert.metric, "value": alert.value,
                                                  "threshold": alert.threshold, "count": 0})  # fmt: skip
            entry["count"] += 1
    first.update(score_baselines(recorder.losses, recorder.grad_norms, spikes.spike_steps))
    boom = explosion_step(recorder.losses)
    return {
        "name": spec.name, "family": spec.family, "seed": spec.seed, "config": spec.model,
        "steps": len(recorder.losses), "explosion_step": boom, "label": "stable" if boom is None else "exploding",
        "first_warning": first, "rules": rules, "left_out": left_out, "seconds": round(seconds, 1),
        "losses": [round(v, 5) if math.isfinite(v) else str(v) for v in recorder.losses],
        "grad_norms": [round(v, 5) if math.isfinite(v) else str(v) for v in recorder.grad_norms],
    }  # fmt: skip


def _run_quietly(spec: RunSpec) -> dict[str, Any]:
    """``run_one`` with Lightning's banners and the usual CPU warnings silenced (worker entry point)."""
    import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import: import first, then quieten

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_one(spec)


# ---------------------------------------------------------------------------------------- figure


def plot_run(run: dict[str, Any], detectors: Sequence[str], path: str) -> None:
    """Loss curve of ``run`` (log scale) with the explosion and each detector's first warning marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.array([float(v) for v in run["losses"]])
    fig, ax = plt.subplots(figsize=(13, 5.5))
    ax.plot(np.arange(len(losses)), losses, color="0.35", lw=0.8, label="training loss")
    ax.set_yscale("log")
    if run["explosion_step"] is not None:
        ax.axvline(run["explosion_step"], color="black", ls="--", lw=1.2,
                   label=f"explosion (step {run['explosion_step']})")
    colors = plt.get_cmap("tab10")
    finite = losses[np.isfinite(losses)]
    top = float(finite.max()) if finite.size else 1.0
    for i, detector in enumerate(d for d in detectors if d in run["first_warning"]):
        step = run["first_warning"][detector]
        if step is None:
            ax.plot([], [], " ", label=f"{detector}: no warning")
            continue
        lead = lead_time(run["explosion_step"], step)
        ax.axvline(step, color=colors(i % 10), lw=1.5, alpha=0.85,
                   label=f"{detector}: step {step}" + ("" if lead is None else f" (lead {lead})"))  # fmt: skip
        ax.plot([step], [top], marker="v", color=colors(i % 10), ms=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_title(f"{run['name']}: first warning of each monitor and baseline")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 short runs (CI), 20-40 s")
    parser.add_argument("--out", default=os.path.join("runs", "early_warning"), help="output directory")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained in parallel, one thread each (default: 2 or the CPU count)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    from lightning_diag.demo import MONITORS, available_monitors

    specs = quick_grid() if args.quick else full_grid()
    classes, missing = available_monitors()
    monitors = [name for name in MONITORS if name in classes]
    given = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/early_warning.py", *(shlex.quote(a) for a in given)])
    print(f"{command}: {len(specs)} runs, {args.workers} worker(s); monitors: {', '.join(monitors)}"
          + (f"; missing: {', '.join(missing)}" if missing else ""), flush=True)  # fmt: skip
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        finished: Iterable[dict[str, Any]] = map(_run_quietly, specs)
        if args.workers > 1:  # spawn: a fresh interpreter per worker, nothing inherited from this one
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(args.workers))
            finished = pool.imap_unordered(_run_quietly, specs)
        for run in finished:
            results[run["name"]] = run
            _progress(run, len(results), len(specs))
    runs = [results[spec.name] for spec in specs]  # grid order, whatever order the workers finished in
    seconds = time.perf_counter() - start
    tables = markdown_tables(runs, monitors, missing)
    exploding = sum(r["explosion_step"] is not None for r in runs)
    header = (f"# Early-warning suite\n\n`{command}`: {len(runs)} runs ({exploding} exploding, "
              f"{len(runs) - exploding} stable); explosion = loss above 3x its running minimum for 10 steps, or "
              f"non-finite. A warning is an alert of severity warning or critical; lead = explosion step - first "
              f"warning (negative: late).\n")  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "early_warning.md"), "w") as handle:
        handle.write(header + "\n" + tables + "\n")
    with open(os.path.join(args.out, "early_warning.json"), "w") as handle:
        json.dump({"command": command, "monitors": monitors, "missing": missing, "baselines": list(BASELINES),
                   "runs": runs}, handle, indent=1)  # fmt: skip
    representative = next((r for r in runs if r["family"] == "ramp" and r["explosion_step"] is not None),
                          next((r for r in runs if r["explosion_step"] is not None), runs[0]))  # fmt: skip
    plot_run(representative, [*monitors, *BASELINES], os.path.join(args.out, "early_warning.png"))
    print("\n" + header + "\n" + tables)
    print(f"\nWrote {args.out}/early_warning.md, .json and .png (figure: {representative['name']}); "
          f"{seconds:.0f} s wall clock.")
    return 0


def _progress(run: dict[str, Any], done: int, total: int) -> None:
    boom = "stable" if run["explosion_step"] is None else f"explodes at {run['explosion_step']}"
    print(f"  [{done:>2}/{total}] {run['name']:<24} {run['steps']:>4} steps, {boom:<16} {run['seconds']:>5.1f} s",
          flush=True)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
