"""The ready-made TensorBoard dashboard: a custom-scalars layout with one category per monitor.

TensorBoard's custom-scalars plugin reads the first layout of each run, so the layout is written
once per run (per ``SummaryWriter``), at the first logging step of the first monitor, and lists
every lightning_diag monitor of the trainer. Charts select tags by regular expression, so per-layer
charts pick up every layer without knowing the names. Open TensorBoard's "Custom Scalars" tab.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["custom_scalars_layout", "monitor_charts"]

Charts = dict[str, list[str]]  # chart title -> tag regexes drawn together


def _layers(family: str, totals: Iterable[str] = ()) -> str:
    """Regex of ``family/<layer>`` tags, leaving out the family's totals."""
    skip = "|".join(re.escape(t) for t in totals)
    return f"{re.escape(family)}/(?!(?:{skip})$)[^/]+$" if skip else f"{re.escape(family)}/[^/]+$"


_GRAD_TOTALS = ("total", "zscore", "baseline", "nonfinite", "clip_coef", "clipped_steps")


def monitor_charts(callback: Any) -> Charts:
    """The charts of one monitor's category: totals first, then per-layer families, then its alerts."""
    kind, source = type(callback).__name__, callback.source
    charts: Charts
    if kind == "GradNormWatcher":
        charts = {
            "total gradient norm and baseline": [r"grad_norm/(total|baseline)$"],
            "z-score of the total norm": [r"grad_norm/zscore$"],
            "non-finite gradients, clipping": [r"grad_norm/(nonfinite|clip_coef|clipped_steps)$"],
            "gradient norm per layer": [_layers("grad_norm", _GRAD_TOTALS)],
            "||g|| / ||w|| per layer": [_layers("grad_weight_ratio")],
            "update ratio ||dw|| / ||w|| per layer": [_layers("update_ratio")],
            "weight norm per layer": [_layers("weight_norm")],
        }
    elif kind == "LossSpikeDetector":
        charts = {
            "loss and EMA baseline": [r"loss_spike/(loss|ema)$"],
            "z-score": [r"loss_spike/zscore$"],
            "ratio to minimum, trend": [r"loss_spike/(ratio_to_min|trend)$"],
            "events, skips, rollbacks, LR scale": [r"loss_spike/(events|skipped|rollbacks|lr_scale)$"],
        }
    elif kind == "NCTracker":
        p = re.escape(callback.prefix)
        charts = {
            "NC1 (within-class variability)": [rf"{p}/nc1$"],
            "NC2 (equinorm, equiangularity)": [rf"{p}/nc2_.*"],
            "NC3 (self-duality), NC4 (nearest class centre)": [rf"{p}/nc[34]$"],
            "CDNV, trace ratio": [rf"{p}/(cdnv|trace_ratio)$"],
        }
    elif kind == "SpectralAlignmentMonitor":
        charts = {
            "model level: mean collapse, share collapsed or flagged": [
                r"spectral_alignment/(mean_collapse|frac_collapsed|frac_flagged)$"],
            "collapse c per layer": [_layers("spectral_alignment/collapse")],
            "sign diversity D per layer": [_layers("spectral_alignment/sign_diversity")],
            "top singular value per layer": [_layers("sigma1")],
            "stable rank per layer": [_layers("stable_rank")],
        }
    else:  # a monitor this table does not know: its alerts only
        charts = {}
    charts[f"alerts ({source})"] = [rf"alerts/{re.escape(source)}$"]
    return charts


def custom_scalars_layout(callbacks: Iterable[Any]) -> dict[str, dict[str, list[Any]]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: a category per monitor plus an overview.

    Example:
        >>> from lightning_diag import GradNormWatcher
        >>> layout = custom_scalars_layout([GradNormWatcher()])
        >>> sorted(layout)
        ['lightning_diag: GradNormWatcher', 'lightning_diag: alerts']
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    sources = []
    for callback in callbacks:
        sources.append(callback.source)
        layout[f"lightning_diag: {callback.source}"] = {
            title: ["Multiline", regexes] for title, regexes in monitor_charts(callback).items()}
    if sources:
        layout["lightning_diag: alerts"] = {"alert counts of every monitor": ["Multiline", [r"alerts/.*"]]}
    return layout
