"""The pictures: one matplotlib page per run (PNG, PDF pages, the HTML's image) and a multi-run summary page.

A run's page, top to bottom, all panels on one step axis: the training loss on a log scale with
the explosion step (dashed) and the first non-finite loss (dotted red) marked, and a triangle at
each monitor's first warning; the alerts by monitor (colour per monitor, shape per severity, info
records hidden unless ``show_info``); then each monitor's model-level figures and the worst layers
of each per-layer figure. Non-finite values are drawn as crosses on the top edge of their panel,
so NaN or inf never blanks an axis. Legends sit outside the data, to the right.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_diag.report.reading import ReportError
from lightning_diag.report.summary import (
    LOWER_IS_WORSE, SUMMARY_COLUMNS, SUMMARY_NOTE, LossSummary, Series, Summary, count_phrase, panel_groups,
    summary_table, worst_first,
)

__all__ = ["import_pyplot", "page_png", "require_pyplot", "write_pdf", "write_png"]

PLOT_LAYERS = 5  # layers drawn per per-layer figure
_LOG_RANGE = 100.0  # positive data spanning more than this factor gets a log scale (the loss always does)
_WIDTH, _DPI = 13.0, 100
# Shape per severity; info faded. Drawn least severe first, so the severe ones sit on top.
_SEVERITY_STYLE = {
    "info": {"marker": ".", "s": 30, "alpha": 0.35},
    "unknown": {"marker": "D", "s": 26, "alpha": 0.9},
    "warning": {"marker": "o", "s": 34, "alpha": 0.9},
    "critical": {"marker": "X", "s": 80, "alpha": 1.0},
}
_LEGEND = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 7, "frameon": False, "borderaxespad": 0.0}


@dataclass
class Panel:
    """One plot of the grid: a title and named series (label, [(step, value)])."""

    title: str
    series: list[tuple[str, Series]]


def import_pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend, or None without matplotlib (the one import of it)."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def require_pyplot(what: str) -> Any:
    plt = import_pyplot()
    if plt is None:
        raise ReportError(f"a {what} report needs matplotlib (pip install matplotlib); write an .html report instead")
    return plt


# ------------------------------------------------------------------------------------ panels


def model_panels(summary: Summary) -> list[Panel]:
    """One panel per group of model-level figures of each monitor family."""
    scalars, panels = summary.run.scalars, []
    for family in summary.families:
        for figures in panel_groups(scalars, family):
            series = [(f, scalars[f"{family}/{f}"]) for f in figures if scalars.get(f"{family}/{f}")]
            if series:
                panels.append(Panel(f"{family}: {', '.join(f for f, _ in series)}", series))
    return panels


def layer_panels(summary: Summary) -> list[Panel]:
    """One panel per per-layer figure: its worst layers at the last step."""
    panels = []
    for figure, layers in summary.layer_figures.items():
        ranked = worst_first(figure, layers)[:PLOT_LAYERS]
        worse = "lower" if figure.rsplit("/", 1)[-1] in LOWER_IS_WORSE else "higher"
        title = f"{figure}: worst {len(ranked)} of {len(layers)} layers ({worse} is worse)"
        panels.append(Panel(title, [(row.layer, layers[row.layer]) for row in ranked]))
    return panels


# -------------------------------------------------------------------------------------- draw


def _finite(series: Series) -> list[float]:
    return [v for _, v in series if math.isfinite(v)]


def _draw_series(ax: Any, label: str, series: Series, **style: Any) -> None:
    """A line through the finite values, and a mark on the top edge at each non-finite one."""
    steps = [s for s, _ in series]
    values = [v if math.isfinite(v) else math.nan for _, v in series]
    (line,) = ax.plot(steps, values, label=label, lw=1.1, marker="." if len(series) < 40 else None, ms=3, **style)
    broken = [s for s, v in series if not math.isfinite(v)]
    if broken:  # a few: crosses; many: a rug of ticks, which reads as a bar where the series is broken
        ax.plot(broken, [1.0] * len(broken), transform=ax.get_xaxis_transform(), ls="none", clip_on=False, zorder=4,
                color=line.get_color(), **({"marker": "x", "ms": 5} if len(broken) <= 12 else {"marker": "|", "ms": 7}))


def _scale(ax: Any, series: Sequence[Series], force_log: bool = False) -> None:
    finite = [v for ser in series for v in _finite(ser)]
    if finite and min(finite) > 0 and (force_log or max(finite) > _LOG_RANGE * min(finite)):
        ax.set_yscale("log")


def _style(ax: Any, title: str) -> None:
    ax.set_title(title, fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3, lw=0.5)


def _mark_break(ax: Any, summary: Summary, label: bool = False) -> None:
    """The explosion step (dashed), and the first non-finite loss (dotted red, shaded to the end)."""
    loss = summary.loss
    if loss is None:
        return
    if loss.explosion_step is not None:
        ax.axvline(loss.explosion_step, color="black", ls="--", lw=1.0,
                   label=f"explosion, step {loss.explosion_step}" if label else None)
    if loss.nonfinite_step is not None:
        ax.axvline(loss.nonfinite_step, color="tab:red", ls=":", lw=1.6,
                   label=f"first non-finite loss, step {loss.nonfinite_step}" if label else None)
        end = summary.steps[1] if summary.steps else loss.nonfinite_step
        ax.axvspan(loss.nonfinite_step, max(end, loss.nonfinite_step), color="tab:red", alpha=0.06, lw=0)


def _draw_loss(ax: Any, summary: Summary, loss: LossSummary, colors: dict[str, Any]) -> None:
    scalars = summary.run.scalars
    key = loss.key
    drawn = [scalars[key]]
    _draw_series(ax, key, scalars[key], color="black")
    if key == "loss_spike/loss" and scalars.get("loss_spike/ema"):
        _draw_series(ax, "loss_spike/ema", scalars["loss_spike/ema"], color="tab:gray", ls="-", alpha=0.8)
        drawn.append(scalars["loss_spike/ema"])
    _scale(ax, drawn, force_log=True)
    _mark_break(ax, summary, label=True)
    for source, alert in sorted(summary.first_serious().items(), key=lambda kv: kv[1].step):
        ax.scatter([alert.step], [0.03], transform=ax.get_xaxis_transform(), marker="^", s=70, clip_on=False,
                   color=colors[source], zorder=5, label=f"first {source} {alert.severity}, step {alert.step}")
    scale = ", log scale" if ax.get_yscale() == "log" else ""
    _style(ax, f"Training loss ({key}{scale})")
    ax.legend(**_LEGEND)


def _draw_alerts(ax: Any, summary: Summary, colors: dict[str, Any], show_info: bool) -> None:
    sources = sorted({a.source for a in summary.alerts})
    for row, source in enumerate(sources):
        for severity, style in _SEVERITY_STYLE.items():
            if severity == "info" and not show_info:
                continue
            steps = [a.step for a in summary.alerts if a.source == source and a.severity == severity]
            if steps:
                ax.scatter(steps, [row] * len(steps), color=colors[source], linewidths=0, **style)
    ax.set_yticks(range(len(sources)), sources, fontsize=8)
    ax.set_ylim(-0.7, max(len(sources), 1) - 0.3)
    _mark_break(ax, summary)
    hidden = summary.count("info") if not show_info else 0
    title = f"Alerts by monitor: {count_phrase(summary)}" + (" (info hidden; --show-info draws them)" if hidden else "")
    if not sources:
        ax.text(0.5, 0.5, count_phrase(summary), ha="center", va="center", transform=ax.transAxes, fontsize=9)
    _style(ax, title)
    ax.grid(alpha=0.3, lw=0.5, axis="x")
    shown = [s for s in _SEVERITY_STYLE if summary.count(s) and (s != "info" or show_info)]
    handles = [ax.scatter([], [], color="dimgray", linewidths=0, label=s, **_SEVERITY_STYLE[s])
               for s in reversed(shown)]
    if handles:
        ax.legend(handles=handles, **_LEGEND)


def _draw_panel(ax: Any, panel: Panel, summary: Summary) -> None:
    for label, series in panel.series:
        _draw_series(ax, label, series)
    _scale(ax, [s for _, s in panel.series])
    _mark_break(ax, summary)
    _style(ax, panel.title)
    ax.legend(**_LEGEND)


def monitor_colors(summaries: Sequence[Summary]) -> dict[str, Any]:
    """One colour per monitor, the same on every page."""
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"]
    sources = sorted({a.source for s in summaries for a in s.alerts})
    return {source: palette[i % len(palette)] for i, source in enumerate(sources)}


def _subtitle(summary: Summary) -> str:
    parts = [summary.run.format + " log"]
    if summary.steps:
        parts.append(f"steps {summary.steps[0]}-{summary.steps[1]}")
    loss = summary.loss
    if loss is None:
        parts.append("no training loss logged")
    if loss and loss.explosion_step is not None:
        parts.append(f"loss exploded at step {loss.explosion_step}")
    if loss and loss.nonfinite_step is not None:
        parts.append(f"first non-finite loss at step {loss.nonfinite_step}")
    return "   |   ".join(parts)


def run_figure(plt: Any, summary: Summary, colors: dict[str, Any], show_info: bool = False) -> Any:
    """The page of one run (a matplotlib figure; the caller closes it)."""
    grid = model_panels(summary) + layer_panels(summary)
    rows = math.ceil(len(grid) / 2)
    strip = 0.7 + 0.3 * max(1, len({a.source for a in summary.alerts}))
    heights = ([3.4] if summary.loss else []) + [strip] + [2.4] * rows  # no loss: no empty loss panel
    figure = plt.figure(figsize=(_WIDTH, sum(heights) + 1.0), layout="constrained")
    spec = figure.add_gridspec(len(heights), 2, height_ratios=heights)
    top = len(heights) - rows  # the full-width rows: loss (if any) and alerts

    def axes(cell: Any) -> Any:  # every panel on the first one's step axis
        return figure.add_subplot(cell, sharex=figure.axes[0] if figure.axes else None)

    if summary.loss:
        _draw_loss(axes(spec[0, :]), summary, summary.loss, colors)
    _draw_alerts(axes(spec[top - 1, :]), summary, colors, show_info)
    for i, panel in enumerate(grid):
        _draw_panel(axes(spec[top + i // 2, i % 2]), panel, summary)
    if summary.steps:
        first, last = summary.steps
        pad = max(1.0, 0.01 * (last - first))
        figure.axes[0].set_xlim(first - pad, last + pad)
    for ax in figure.axes[-(2 - len(grid) % 2):] if len(grid) > 1 else figure.axes[-1:]:  # the bottom row
        ax.set_xlabel("step", fontsize=8)
    figure.suptitle(f"{summary.run.name}\n{_subtitle(summary)}", fontsize=13, x=0.01, ha="left", linespacing=1.5)
    return figure


def summary_figure(plt: Any, summaries: Sequence[Summary], pages: str = "one page each after this one") -> Any:
    """The summary page of a multi-run report: one table row per run."""
    rows = summary_table(list(summaries))
    figure = plt.figure(figsize=(_WIDTH, 0.8 + 0.3 * (len(rows) + 1)), layout="constrained")
    ax = figure.add_subplot()
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=SUMMARY_COLUMNS, loc="upper left", cellLoc="left", colLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(SUMMARY_COLUMNS))))
    table.scale(1.0, 1.4)
    for (row, _), cell in table.get_celld().items():
        cell.set_edgecolor("#cccccc")
        cell.PAD = 0.05  # of the cell width: the default 0.1 indents wide columns more than narrow ones
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#f0f0f0")
    figure.suptitle(f"lightning-diag health report: {len(rows)} runs, {pages}", fontsize=13,
                    x=0.01, ha="left")
    ax.set_title(SUMMARY_NOTE, fontsize=8, loc="left", color="dimgray")
    return figure


# ------------------------------------------------------------------------------------ output


def _save(plt: Any, figure: Any, target: Any, **kwargs: Any) -> None:
    try:
        figure.savefig(target, dpi=_DPI, **kwargs)
    finally:
        plt.close(figure)


def page_png(summary: Summary, show_info: bool = False, colors: dict[str, Any] | None = None) -> bytes:
    """The run's page as PNG bytes (for the HTML report)."""
    plt = require_pyplot("PNG")
    buffer = io.BytesIO()
    _save(plt, run_figure(plt, summary, colors or monitor_colors([summary]), show_info), buffer, format="png")
    return buffer.getvalue()


def _png_names(output: Path, summaries: Sequence[Summary]) -> list[Path]:
    names, taken = [], set()
    for summary in summaries:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", summary.run.name).strip("_") or "run"
        name, n = safe, 1
        while name in taken:
            n, name = n + 1, f"{safe}_{n + 1}"
        taken.add(name)
        names.append(output.with_name(f"{output.stem}-{name}{output.suffix}"))
    return names


def write_png(summaries: Sequence[Summary], output: Path, show_info: bool = False) -> list[Path]:
    """One run: its page in ``output``. Several: the summary page in ``output`` and one
    ``<stem>-<run>.png`` per run beside it (never one giant image). Returns the files written."""
    plt = require_pyplot("PNG")
    colors = monitor_colors(summaries)
    if len(summaries) == 1:
        _save(plt, run_figure(plt, summaries[0], colors, show_info), output, format="png")
        return [output]
    paths = _png_names(output, summaries)
    _save(plt, summary_figure(plt, summaries, f"one PNG each: {output.stem}-<run>.png"), output, format="png")
    for summary, path in zip(summaries, paths):
        _save(plt, run_figure(plt, summary, colors, show_info), path, format="png")
    return [output, *paths]


def write_pdf(summaries: Sequence[Summary], output: Path, show_info: bool = False, title: str = "") -> list[Path]:
    """A PDF: the summary page first when there are several runs, then one page per run."""
    plt = require_pyplot("PDF")
    from matplotlib.backends.backend_pdf import PdfPages

    colors = monitor_colors(summaries)
    with PdfPages(output, metadata={"Title": title or "lightning-diag health report"}) as pdf:
        if len(summaries) > 1:
            _save(plt, summary_figure(plt, summaries), pdf, format="pdf")
        for summary in summaries:
            _save(plt, run_figure(plt, summary, colors, show_info), pdf, format="pdf")
    return [output]
