"""Synthetic runs for the report tests: figures of the new key scheme written by Lightning's own
TensorBoardLogger or CSVLogger, and the alerts file the monitors append to (no training)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

LAYERS = ("blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "head")
# The families' count figures: <family>/alerts, the number of alerts so far.
SOURCES = {"GradNormWatcher": "grad_norm", "LossSpikeDetector": "loss_spike",
           "SpectralAlignmentMonitor": "spectral_alignment"}

Figures = dict[int, dict[str, float]]  # step -> {key: value}


def alert(step: int, source: str, metric: str, value: float, severity: str, rule: str = "above 1") -> dict[str, Any]:
    """One alert record as the monitors write it (the fields of lightning_diag.Alert)."""
    message = f"{source}: {metric} = {value:.4g} ({rule}) at step {step}"
    return {"source": source, "metric": metric, "step": step, "value": value, "threshold": 1.0,
            "severity": severity, "message": message, "acted_step": step + 1}


def exploding_run(steps: int = 60, explode_at: int = 40, nonfinite_at: int | None = None,
                  every: int = 1) -> tuple[Figures, list[dict[str, Any]]]:
    """Figures and alerts of a run whose loss falls, then explodes at ``explode_at``
    (and turns NaN from ``nonfinite_at``); per-layer figures of grad_norm and spectral_alignment."""
    figures: Figures = defaultdict(dict)
    for step in range(0, steps, every):
        t = step / steps
        loss = 3.0 * math.exp(-2 * t) + 0.5 if step < explode_at else 2.0 * 1.5 ** (step - explode_at + 4)
        if nonfinite_at is not None and step >= nonfinite_at:
            loss = math.nan
        grow = 1.0 if step < explode_at else 1.3 ** (step - explode_at)
        row = figures[step]
        row.update({"loss_spike/loss": loss, "loss_spike/ema": min(loss, 3.0), "loss_spike/zscore": 0.1 * step,
                    "grad_norm/total": 1.0 + 0.01 * step * grow, "grad_norm/baseline": 1.0,
                    "grad_norm/zscore": 0.5, "spectral_alignment/mean_collapse": min(1.0, t * 1.2),
                    "spectral_alignment/frac_collapsed": min(1.0, t)})
        for i, layer in enumerate(LAYERS):
            row[f"grad_norm/layer/{layer}"] = (i + 1) * 0.1 * grow
            row[f"grad_norm/weight_norm/{layer}"] = 10.0 + i + 0.1 * step
            row[f"spectral_alignment/sign_diversity/{layer}"] = max(0.0, 1.0 - t * (i + 1) / 3)
            row[f"spectral_alignment/stable_rank/{layer}"] = max(1.0, 10.0 - i - 0.05 * step)
    alerts = [
        alert(5, "GradNormWatcher", "grad_norm/zscore", 2.7, "info"),
        alert(12, "GradNormWatcher", "grad_norm/zscore", 2.9, "info"),
        alert(30, "SpectralAlignmentMonitor", "spectral_alignment/collapse/blocks.1.mlp", 0.95, "warning"),
        alert(36, "GradNormWatcher", "grad_norm/total", 3.5, "warning"),
        alert(explode_at + 2, "LossSpikeDetector", "loss_spike/loss", 9.0, "critical"),
    ]
    counts: dict[str, int] = defaultdict(int)
    for step in sorted(figures):
        for a in alerts:
            counts[a["source"]] += a["step"] == step
        for source, family in SOURCES.items():
            figures[step][f"{family}/alerts"] = float(counts[source])
    return dict(figures), alerts


def small_run(steps: int = 30) -> Figures:
    """A run with few figures (a page with few panels: quick to draw)."""
    return {step: {"loss_spike/loss": 2.0 - step / steps, "grad_norm/total": 1.0 + step, "grad_norm/alerts": 0.0}
            for step in range(steps)}


def write_alerts(log_dir: str | Path, alerts: list[dict[str, Any]]) -> None:
    with open(Path(log_dir) / "lightning_diag_alerts.jsonl", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(a) + "\n" for a in alerts)


def _text(a: dict[str, Any], with_severity: bool) -> str:
    return f"[{a['severity']}] {a['message']}" if with_severity else a["message"]


def write_tensorboard(root: Path, name: str, figures: Figures, alerts: list[dict[str, Any]], *,
                      jsonl: bool = True, texts: str | None = "new") -> Path:
    """A TensorBoardLogger run; alert texts under ``<family>/alerts`` (new), ``alerts/<Source>`` (old) or none."""
    logger = TensorBoardLogger(root, name=name, default_hp_metric=False)
    for step, row in sorted(figures.items()):
        logger.log_metrics(row, step=step)
    for a in alerts if texts else []:
        tag = f"{SOURCES[a['source']]}/alerts" if texts == "new" else f"alerts/{a['source']}"
        logger.experiment.add_text(tag, _text(a, texts == "new"), global_step=a["step"])
    logger.finalize("success")
    if jsonl:
        write_alerts(logger.log_dir, alerts)
    return Path(logger.log_dir)


def write_csv(root: Path, name: str, figures: Figures, alerts: list[dict[str, Any]], *, jsonl: bool = True) -> Path:
    """A CSVLogger run; each step logged in two calls, as two callbacks would (two rows per step)."""
    logger = CSVLogger(root, name=name)
    for step, row in sorted(figures.items()):
        keys = sorted(row)
        logger.log_metrics({k: row[k] for k in keys[::2]}, step=step)
        logger.log_metrics({k: row[k] for k in keys[1::2]}, step=step)
    logger.finalize("success")
    if jsonl:
        write_alerts(logger.log_dir, alerts)
    return Path(logger.log_dir)
