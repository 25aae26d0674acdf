"""The one-command demo: watch a tiny transformer blow up, and see which monitor warned first.

Usage::

    python -m lightning_diag.demo              # a minute or a few on a CPU (4 min on a busy 2-core machine)
    python -m lightning_diag.demo --stable     # a safe learning rate: no explosion, no divergence alert
    lightning-diag-demo --steps 1500 --lr 3.0 --seed 1 --out runs/demo

The run trains :class:`~lightning_diag.testbeds.CharLM` (a 3-layer pre-LN GPT, about 150k
parameters, on the characters of Python's own standard library, no download) under an exponential
learning-rate ramp from ``1e-3`` to ``--lr`` over ``--steps`` steps: the learning-rate range test,
whose loss explodes once the rate passes about 0.35 (measured, seed 0, one CPU thread: step 857 of
the default 1,000, learning rate 0.37). Every monitor that exists runs at its default settings
(logging every 10 steps, for smoother TensorBoard curves, and LossSpikeDetector every step; alerts
are acted on, here printed, within the step they fire at, whatever the logging cadence).
Lightning's own ``SpikeDetection`` runs beside them for comparison, recording instead of raising.

The explosion is dated exactly as ``lightning-diag report`` dates it on the same run:
:func:`~lightning_diag.testbeds.explosion_step` of the losses (the first of 10 losses in a row that
gave back half the progress made since the start and are 1.5x the lowest loss before them, or a
non-finite loss). The report reads the losses ``LossSpikeDetector`` logged; here it logs every step
(its figures are known every step anyway), so the report reads the very losses the demo dates the
explosion on, and its "first warning" lines give the same step and the same leads as the table.
The run stops 100 steps after the explosion (or soon after a non-finite loss) and prints each
monitor's first warning or critical alert, how far before or after the explosion it came, and its
info records apart (those are kept, never acted on). Every line printed during the run starts with
its step, in step order. TensorBoard logs go under ``--out``.

The helpers (:class:`ExplosionRecorder`, :class:`RecordingSpikeDetection`, :func:`default_monitors`)
live in :mod:`lightning_diag.testbeds.recording`, shared with ``benchmarks/early_warning.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import shlex
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_diag.alerts import Alert
from lightning_diag.testbeds import CharLM, explosion_step, flush_denormals, lr_at_step
from lightning_diag.testbeds.recording import (  # the benchmark helpers live next to the testbeds
    EXPLOSION_FACTOR,
    EXPLOSION_PATIENCE,
    MONITORS,
    ExplosionRecorder,
    RecordingSpikeDetection,
    available_monitors,
    default_monitors,
)

__all__ = [
    "EXPLOSION_FACTOR",
    "EXPLOSION_PATIENCE",
    "MONITORS",
    "ExplosionRecorder",
    "RecordingSpikeDetection",
    "available_monitors",
    "default_monitors",
    "main",
]

_START_LR = 1e-3  # start of the demo's ramp, and its stable learning rate
_DEFAULT_PEAK_LR = 1.0
_CADENCE = 10  # every_n_steps of the monitors in the demo and the suite
_STOP_AFTER = 100  # steps recorded past the explosion before the run stops
_PRINTED_PER_RULE = 3  # live alerts printed per (monitor, rule); the table counts them all
EXPLAINED = ("10 losses in a row gave back half the progress made since the start and were 1.5x the "
             "lowest loss before them, or the loss was not finite")


# ------------------------------------------------------------------------------------------ demo


class _Progress(Callback):
    """Prints the loss and learning rate every ``every`` steps (the demo has no progress bar)."""

    def __init__(self, recorder: ExplosionRecorder, every: int = 100) -> None:
        self.recorder, self.every, self.lr = recorder, every, math.nan

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]  # the rate this step uses (the scheduler steps after)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        step = len(self.recorder.losses) - 1
        if step >= 0 and step % self.every == 0:
            print(f"  step {step:>5}   loss {self.recorder.losses[-1]:8.3f}   lr {self.lr:.3g}", flush=True)


class _LivePrinter:
    """The monitors' ``action``: prints an alert as it surfaces, a few per (monitor, rule)."""

    def __init__(self, limit: int = _PRINTED_PER_RULE) -> None:
        self.limit = limit
        self.counts: dict[tuple[str, str], int] = {}

    def __call__(self, alert: Alert, trainer: pl.Trainer) -> None:
        rule = (alert.source, _rule_of(alert.metric))
        self.counts[rule] = self.counts.get(rule, 0) + 1
        if self.counts[rule] <= self.limit:
            print(f"  step {alert.step:>5}   {alert.severity.upper():<8} {alert.source:<24} {alert.metric} = "
                  f"{alert.value:.4g}  (threshold {alert.threshold:g})", flush=True)  # fmt: skip
        if self.counts[rule] == self.limit:
            print(f"  step {alert.step:>5}   (further {alert.source} {rule[1]} alerts are counted, not printed)",
                  flush=True)


def _rule_of(metric: str) -> str:
    """The rule family of an alert's metric: its first two ``/`` parts (drops a layer name)."""
    return "/".join(metric.split("/")[:2])


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_diag.demo",
        description="Train a tiny character-level GPT until its loss explodes, with every lightning_diag "
        "monitor watching; print which one warned first and how many steps ahead.",
    )
    parser.add_argument("--steps", type=int, default=1000,
                        help="training steps; the learning-rate ramp spans them (default 1000)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"end of the exponential ramp from {_START_LR:g} (default {_DEFAULT_PEAK_LR:g}; "
                        f"the loss explodes near 0.5), or with --stable the constant rate (default {_START_LR:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data order (default 0)")
    parser.add_argument("--out", default=os.path.join("runs", "demo"),
                        help="TensorBoard log directory (default runs/demo)")
    parser.add_argument("--stable", action="store_true",
                        help=f"constant learning rate ({_START_LR:g} unless --lr): the run must not explode")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    return args


@contextlib.contextmanager
def _quiet_cpu_session() -> Iterator[None]:
    """Fast, quiet CPU settings for the run, restored afterwards (``main`` may run inside pytest)."""
    threads = torch.get_num_threads()
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    # A model this small runs as fast on one thread, and OpenMP threads spin badly on a busy
    # machine (measured: 23 ms/step on one thread, 16 ms idle but up to 180 ms loaded on two).
    torch.set_num_threads(1)
    flush_denormals(True)  # high-LR CPU runs are ~10x slower with denormals (DESIGN.md section 7)
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*(LeafSpec|TreeSpec).*")
            yield
    finally:
        torch.set_num_threads(threads)
        flush_denormals(False)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _table(rows: list[tuple[str, ...]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _warnings_of(monitor: Callback) -> list[tuple[int, str]]:
    """(step, metric) of a monitor's warning and critical alerts; ``"info"`` alerts are records, not warnings."""
    return [(a.step, a.metric) for a in getattr(monitor, "alerts", []) if a.severity != "info"]


def _infos_of(monitor: Callback) -> int:
    """How many info records a monitor kept (logged, never acted on)."""
    return sum(a.severity == "info" for a in getattr(monitor, "alerts", []))


def _lead(step: int, explosion: int | None) -> str:
    """``"70 steps before"`` / ``"20 steps after"`` the explosion, as the report says it."""
    if explosion is None:
        return "-"
    return f"{abs(explosion - step)} steps {'before' if step <= explosion else 'after'}"


def _summary(
    monitors: list[Callback], left_out: dict[str, str], spikes: RecordingSpikeDetection, explosion: int | None
) -> str:
    def cells(name: str, alerts: list[tuple[int, str]], infos: int | str) -> tuple[str, ...]:
        if not alerts:
            return (name, "-", "", "0", str(infos), "-" if explosion is None else "no warning")
        step, metric = min(alerts)
        return (name, str(step), metric, str(len(alerts)), str(infos), _lead(step, explosion))

    when = "no explosion" if explosion is None else f"the explosion at step {explosion}"
    rows = [("monitor", "first warning", "metric", "warnings", "info records", f"lead over {when}")]
    for monitor in monitors:
        rows.append(cells(type(monitor).__name__, _warnings_of(monitor), _infos_of(monitor)))
    rows.append(cells("SpikeDetection (Lightning)", [(s, "loss spike") for s in spikes.spike_steps], "-"))
    text = _table(rows)
    text += ("\nwarnings: warning and critical alerts, the ones acted on; info records are kept and logged, "
             "never acted on")
    for name, reason in left_out.items():
        text += f"\n{name}: {reason}"
    return text


def _model(args: argparse.Namespace) -> tuple[CharLM, str]:
    """The demo's model and a description of its learning-rate schedule."""
    if args.stable:
        lr = args.lr if args.lr is not None else _START_LR
        return CharLM(lr=lr, seed=args.seed), f"constant learning rate {lr:g}"
    lr = args.lr if args.lr is not None else _DEFAULT_PEAK_LR
    model = CharLM(lr=_START_LR, lr_end=lr, ramp_steps=args.steps, seed=args.seed)
    return model, f"learning rate ramped exponentially from {_START_LR:g} to {lr:g} over {args.steps} steps"


def _outcome(model: CharLM, recorder: ExplosionRecorder, seconds: float) -> str:
    """Steps trained, time, last learning rate, and the explosion if any (of the logged losses)."""
    hp, steps, explosion = model.hparams, len(recorder.losses), recorder.explosion_step
    line = f"Trained {steps} steps in {seconds:.0f} s (last learning rate "
    line += f"{lr_at_step(steps - 1, hp.lr, hp.lr_end, hp.ramp_steps):.3g}). "
    if explosion is None:
        return line + "No explosion."
    floor = min(recorder.losses[:explosion] or [math.nan])
    return line + (f"The loss exploded at step {explosion} (learning rate {recorder.lrs[explosion]:.3g}): "
                   f"loss {recorder.losses[explosion]:.3g} there, lowest loss before it {floor:.3g}.")


def _explosion_line(recorder: ExplosionRecorder) -> Callable[[int], None]:
    """What to print when the explosion becomes known (at the current step, later than the explosion)."""

    def say(explosion: int) -> None:
        now = len(recorder.losses) - 1
        print(f"  step {now:>5}   the loss exploded at step {explosion}: from there on {EXPLAINED}; "
              f"training goes on for {_STOP_AFTER} steps after it at most", flush=True)

    return say


def _stable_verdict(monitors: list[Callback], spikes: RecordingSpikeDetection) -> str:
    """Whether a stable run raised any warning or critical alert (a false alarm), and its info records."""
    warned = sum(len(_warnings_of(m)) for m in monitors) + len(spikes.spike_steps)
    info = sum(len(m.alerts) for m in monitors) - sum(len(_warnings_of(m)) for m in monitors)
    verdict = "no divergence alert (warning or critical), as it should be" if warned == 0 else (
        f"{warned} warning/critical alert(s): false alarms, see the table")
    return f"Stable run: {verdict}" + (f"; {info} info-level record(s) (never acted on)." if info else ".")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0. ``argv`` defaults to the command line."""
    args = _parse(argv)
    with _quiet_cpu_session():
        pl.seed_everything(args.seed, verbose=False)
        model, schedule = _model(args)
        monitors, left_out = default_monitors("lm", every_n_steps=_CADENCE, action=_LivePrinter(),
                                              overrides={"LossSpikeDetector": {"every_n_steps": 1}})
        recorder = ExplosionRecorder(stop_after=_STOP_AFTER, cadence=_CADENCE, definition=explosion_step,
                                     check_every=1)  # known at the step the 10th loss above comes in
        recorder.on_explosion = _explosion_line(recorder)
        spikes = RecordingSpikeDetection()
        logger = TensorBoardLogger(args.out, name="stable" if args.stable else "explode", default_hp_metric=False)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=args.steps, logger=logger, log_every_n_steps=_CADENCE,
            callbacks=[recorder, *monitors, spikes, _Progress(recorder)], enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.out,
        )
        print(f"lightning_diag demo: a {sum(p.numel() for p in model.parameters()):,}-parameter GPT on "
              f"{len(model.dataset.data):,} characters of the Python standard library, {schedule}, seed {args.seed}.")
        names = ", ".join(type(m).__name__ for m in monitors)
        print(f"Monitors (default settings, every_n_steps={_CADENCE}; LossSpikeDetector logs every step): {names}; "
              "Lightning's SpikeDetection for comparison.")
        print("Each line starts with its step. Alerts (WARNING, CRITICAL) are printed as they are acted on, "
              "within the step their rule fired at; info records are counted in the table.\n")
        start = time.perf_counter()
        trainer.fit(model)
        summary = _summary(monitors, left_out, spikes, recorder.explosion_step)
        print("\n" + _outcome(model, recorder, time.perf_counter() - start))
        print(summary)
        if args.stable:
            print("\n" + _stable_verdict(monitors, spikes))
        logger.experiment.add_text("demo/summary", "```\n" + summary + "\n```", global_step=len(recorder.losses))
        logger.finalize("success")
        print(f"\nTensorBoard logs: {logger.log_dir}\nView them with:")
        print(f"    tensorboard --logdir {shlex.quote(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
