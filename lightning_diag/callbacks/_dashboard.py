"""The ready-made TensorBoard dashboard: a custom-scalars layout with one category per monitor.

TensorBoard's custom-scalars plugin reads the first layout of each run, so the layout is written
once per run (per ``SummaryWriter``), at the first logging step of the first monitor, and lists
every lightning_diag monitor of the trainer. The charts come from the monitors' key declarations
(``Key.chart``: keys with one title share a chart) and select tags by regular expression, so a
per-layer chart picks up every layer without knowing the names, and a figure that is not enabled
is not charted. Open TensorBoard's "Custom Scalars" tab.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["custom_scalars_layout", "monitor_charts"]

Charts = dict[str, list[str]]  # chart title -> tag regexes drawn together


def monitor_charts(callback: Any) -> Charts:
    """The charts of one monitor's category: its declared charts, then its alert count."""
    charts = dict(callback.dashboard_charts())
    charts[f"alerts ({callback.source})"] = [rf"{re.escape(callback.family)}/alerts$"]
    return charts


def custom_scalars_layout(callbacks: Iterable[Any]) -> dict[str, dict[str, list[Any]]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: a category per monitor plus an overview.

    Example:
        >>> from lightning_diag import GradNormWatcher
        >>> layout = custom_scalars_layout([GradNormWatcher()])
        >>> sorted(layout)
        ['lightning_diag: GradNormWatcher', 'lightning_diag: alerts']
    """
    callbacks = list(callbacks)
    layout: dict[str, dict[str, list[Any]]] = {}
    sources = []
    for callback in callbacks:
        sources.append(callback.source)
        layout[f"lightning_diag: {callback.source}"] = {
            title: ["Multiline", regexes] for title, regexes in monitor_charts(callback).items()}
    if sources:
        layout["lightning_diag: alerts"] = {"alert counts of every monitor": ["Multiline", [
            rf"{re.escape(cb.family)}/alerts$" for cb in callbacks]]}
    return layout
