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

__all__ = ["custom_scalars_layout", "layer_tags", "monitor_charts"]

Charts = dict[str, list[str]]  # chart title -> tag regexes drawn together


def layer_tags(family: str, totals: Iterable[str] = ()) -> str:
    """Regex of ``family/<layer>`` tags, leaving out the family's totals.

    Example:
        >>> bool(re.match(layer_tags("grad_norm", ["total"]), "grad_norm/blocks.0")), bool(
        ...     re.match(layer_tags("grad_norm", ["total"]), "grad_norm/total"))
        (True, False)
    """
    skip = "|".join(re.escape(t) for t in totals)
    return f"{re.escape(family)}/(?!(?:{skip})$)[^/]+$" if skip else f"{re.escape(family)}/[^/]+$"


def monitor_charts(callback: Any) -> Charts:
    """The charts of one monitor's category: its own (``dashboard_charts()``), then its alerts."""
    charts = dict(callback.dashboard_charts())
    charts[f"alerts ({callback.source})"] = [rf"alerts/{re.escape(callback.source)}$"]
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
