"""The pictures: a run's first page, its detail pages and a multi-run summary page (PNG, PDF, the HTML's images).

Every page is A4 (portrait; the multi-run table landscape), so a PDF prints. A run's first page,
top to bottom: the verdict (did the loss explode or turn non-finite, at which step, which monitor
warned first and how early); the training loss on a log scale with the explosion step (dashed)
and the first non-finite loss (dotted red); every warning and critical alert on one strip, colour
per monitor and shape per severity (info records only with ``show_info``), each monitor's first
one labelled; then the few figures that moved (the metrics the alerts named, then figures past
a built-in threshold), each with its threshold line. The detail pages hold every model-level
figure and the worst layers of every per-layer figure, with thresholds where a rule has one.

Thresholds come from the run's own alerts (each records the threshold it crossed), else from the
built-in rules of the monitors at their defaults (:func:`builtin_thresholds`). Non-finite values
are drawn as crosses on the top edge of their panel, so NaN or inf never blanks an axis; when the
loss stays non-finite to the end, the step axis stops shortly after it turned, so the healthy
part of the run is not squeezed into a corner.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_diag.keys import split_key
from lightning_diag.report.reading import AlertRecord, ReportError
from lightning_diag.report.summary import (
    SUMMARY_COLUMNS, SUMMARY_NOTE, Series, Summary, count_phrase, direction, format_summary, panel_groups,
    summary_table, verdict, worst_first,
)

__all__ = [
    "builtin_thresholds", "detail_figures", "first_page_figure", "import_pyplot", "moved_keys", "page_pngs",
    "require_pyplot", "run_figure", "text_figures", "threshold_for", "write_pdf", "write_png",
]

PLOT_LAYERS = 5  # layers drawn per per-layer figure
MOVED_PANELS = 4  # figures on the first page
DETAIL_ROWS = 4  # rows of two panels per detail page
A4, A4_LANDSCAPE = (8.27, 11.69), (11.69, 8.27)
_LOG_RANGE = 100.0  # positive data spanning more than this factor gets a log scale (the loss always does)
_LOSS_DECADES = 4.0  # the loss axis shows at most this many decades above the best loss; higher: marks at the top
_DPI = 120
_TEXT_LINES, _TEXT_WIDTH = 80, 104  # lines per text page, characters per line (monospace, 7 pt on A4)
# Shape per severity; info faded. Drawn least severe first, so the severe ones sit on top.
_SEVERITY_STYLE = {
    "info": {"marker": ".", "s": 30, "alpha": 0.35},
    "unknown": {"marker": "D", "s": 26, "alpha": 0.9},
    "warning": {"marker": "o", "s": 34, "alpha": 0.9},
    "critical": {"marker": "X", "s": 80, "alpha": 1.0},
}
_LEGEND = {"fontsize": 6.5, "frameon": False, "loc": "best"}


@dataclass
class Panel:
    """One plot: a title, named series (label, key, [(step, value)]), a y label and threshold lines."""

    title: str
    series: list[tuple[str, str, Series]]
    ylabel: str
    thresholds: list[tuple[str, float]] = field(default_factory=list)  # (label, value)
    alerts: list[AlertRecord] = field(default_factory=list)  # drawn on the panel at their value


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


# -------------------------------------------------------------------------------- thresholds


@functools.lru_cache(maxsize=1)
def builtin_thresholds() -> tuple[tuple[str, float, str], ...]:
    """``(metric pattern, threshold, relation)`` of every monitor's built-in above/below rules at its defaults.

    Read from the monitors themselves (each built with its default arguments), so a changed default
    moves the line; a monitor that cannot be built without arguments is left out.
    """
    try:
        from lightning_diag import callbacks
        from lightning_diag.alerts import Above, Below
    except Exception:  # noqa: BLE001 -- the report draws without thresholds rather than fail
        return ()
    found = []
    for name in getattr(callbacks, "__all__", ()):
        try:
            rules = getattr(callbacks, name)().book.rules
        except Exception:  # noqa: BLE001,S112 -- needs arguments, or is no monitor
            continue
        found += [(r.metric, r.threshold, r.relation) for r in rules
                  if isinstance(r, (Above, Below)) and math.isfinite(r.threshold)]  # fmt: skip
    return tuple(found)


def threshold_for(key: str, alerts: Sequence[AlertRecord] = ()) -> tuple[float, str] | None:
    """The threshold of ``key`` and where it comes from: the run's last alert on it, else a built-in rule."""
    for alert in reversed(alerts):
        if alert.metric == key and alert.threshold is not None and math.isfinite(alert.threshold):
            return alert.threshold, "alert"
    for pattern, value, relation in builtin_thresholds():
        if fnmatch.fnmatchcase(key, pattern):
            return value, f"default rule: {relation}"
    return None


def _threshold_lines(keys: Sequence[str], alerts: Sequence[AlertRecord]) -> list[tuple[str, float]]:
    lines: dict[float, str] = {}
    for key in keys:
        found = threshold_for(key, alerts)
        if found is not None and found[0] not in lines:
            figure = key.split("/")[1] if key.count("/") else key
            lines[found[0]] = f"threshold {found[0]:g}" + (f" ({figure})" if len(keys) > 1 else "")
    return [(label, value) for value, label in lines.items()]


# ------------------------------------------------------------------------------------ panels


def model_panels(summary: Summary) -> list[Panel]:
    """One panel per group of model-level figures of each monitor family."""
    scalars, panels = summary.run.scalars, []
    for family in summary.families:
        for figures in panel_groups(scalars, family):
            keys = [f"{family}/{f}" for f in figures if scalars.get(f"{family}/{f}")]
            if keys:
                names = [k.split("/", 1)[1] for k in keys]
                panels.append(Panel(f"{family}: {', '.join(names)}", [(n, k, scalars[k]) for n, k in zip(names, keys)],
                                    names[0] if len(names) == 1 else family, _threshold_lines(keys, summary.alerts)))
    return panels


def layer_panels(summary: Summary) -> list[Panel]:
    """One panel per per-layer figure: its worst layers (see :func:`~lightning_diag.report.summary.worst_first`)."""
    panels = []
    for figure, layers in summary.layer_figures.items():
        ranked = worst_first(figure, layers)[:PLOT_LAYERS]
        way = direction(figure)
        how = "the layers that moved most" if way == "moved" else f"worst {len(ranked)}, {way} is worse"
        keys = [f"{figure}/{row.layer}" for row in ranked]
        panels.append(Panel(f"{figure}: {how} ({len(layers)} layers)",
                            [(row.layer, key, layers[row.layer]) for row, key in zip(ranked, keys)],
                            figure.split("/", 1)[1], _threshold_lines(keys[:1], summary.alerts)))
    return panels


def _split(key: str) -> tuple[str, str, str | None] | None:
    try:
        return split_key(key)
    except ValueError:
        return None


def moved_keys(summary: Summary, limit: int = MOVED_PANELS) -> list[str]:
    """The figures of the first page: the metrics the warning and critical alerts named (each monitor's
    first, then the others), then the model-level figures past a built-in threshold; not the loss."""
    scalars = summary.run.scalars
    loss = summary.loss.key if summary.loss else None
    firsts = list(summary.first_serious().values())
    named = [a.metric for a in firsts] + [a.metric for a in summary.serious]
    crossed = []
    for key, series in scalars.items():
        parts = _split(key)
        found = threshold_for(key, summary.alerts) if parts and parts[2] is None and parts[1] != "alerts" else None
        if found is not None and any(math.isfinite(v) and v > found[0] for _, v in series):
            crossed.append(key)
    keys = [k for k in dict.fromkeys([*named, *sorted(crossed)]) if k and k != loss and scalars.get(k)]
    return keys[:limit]


def _moved_panel(summary: Summary, key: str) -> Panel:
    alerts = [a for a in summary.serious if a.metric == key]
    source = alerts[0].source if alerts else key.split("/")[0]
    parts = _split(key)
    name = parts[2] if parts and parts[2] else key.split("/")[-1]
    return Panel(f"{key} ({source})", [(name, key, summary.run.scalars[key])],
                 parts[1] if parts else key, _threshold_lines([key], summary.alerts), alerts)


# -------------------------------------------------------------------------------------- draw


def _finite(series: Series) -> list[float]:
    return [v for _, v in series if math.isfinite(v)]


def _tick(value: float, _: Any = None) -> str:
    return f"{value:g}"


def _readable_ticks(ax: Any) -> None:
    """Plain tick labels (``0.5``, ``2``, ``1e+04``), never ``2 x 10^0``; minor ones labelled only on a
    log axis of under two decades, where the major ticks alone would leave one label or none."""
    from matplotlib import ticker

    if ax.get_yscale() != "log":
        return
    low, high = ax.get_ylim()
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(_tick))
    few = low > 0 and math.log10(high / low) < 2
    ax.yaxis.set_minor_locator(ticker.LogLocator(subs=(2.0, 5.0) if few else (), numticks=12))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_tick) if few else ticker.NullFormatter())


def _draw_series(ax: Any, label: str, series: Series, **style: Any) -> None:
    """A line through the finite values, and a mark on the top edge at each non-finite one."""
    steps = [s for s, _ in series]
    values = [v if math.isfinite(v) else math.nan for _, v in series]
    (line,) = ax.plot(steps, values, label=label, lw=1.1, marker="." if len(series) < 40 else None, ms=3, **style)
    broken = [s for s, v in series if not math.isfinite(v)]
    if broken:  # a few: crosses; many: a rug of ticks, which reads as a bar where the series is broken
        ax.plot(broken, [1.0] * len(broken), transform=ax.get_xaxis_transform(), ls="none", clip_on=True, zorder=4,
                color=line.get_color(), **({"marker": "x", "ms": 5} if len(broken) <= 12 else {"marker": "|", "ms": 7}))


def _scale(ax: Any, series: Sequence[Series], force_log: bool = False) -> None:
    finite = [v for ser in series for v in _finite(ser)]
    if finite and min(finite) > 0 and (force_log or max(finite) > _LOG_RANGE * min(finite)):
        ax.set_yscale("log")


def _style(ax: Any, title: str, ylabel: str = "") -> None:
    ax.set_title(title, fontsize=8, loc="left")
    ax.set_ylabel(ylabel, fontsize=7)
    ax.tick_params(which="both", labelsize=6.5)
    ax.grid(alpha=0.3, lw=0.5)
    _readable_ticks(ax)


def x_range(summary: Summary) -> tuple[float, float] | None:
    """The step axis of every panel: the logged steps, cut shortly after the loss turned non-finite for
    good (the rest is NaN and would squeeze the run's healthy steps into a corner)."""
    if summary.steps is None:
        return None
    first, last = summary.steps
    loss = summary.loss
    if loss is not None and loss.ended_nonfinite and loss.nonfinite_step is not None:
        last = min(last, loss.nonfinite_step + max(2.0, 0.15 * (loss.nonfinite_step - first)))
    pad = max(1.0, 0.01 * (last - first))
    return first - pad, last + pad


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


def _draw_loss(ax: Any, summary: Summary) -> None:
    """The loss (log scale) and its EMA, the break marked; values far above the best loss (more than
    :data:`_LOSS_DECADES` decades) drawn as triangles on the top edge, so the healthy part keeps its height."""
    loss = summary.loss
    assert loss is not None
    scalars = summary.run.scalars
    drawn = [("loss", scalars[loss.key], {"color": "black"})]
    if loss.key == "loss_spike/loss" and scalars.get("loss_spike/ema"):
        drawn.append(("EMA of the loss", scalars["loss_spike/ema"], {"color": "tab:gray", "alpha": 0.8}))
    cap = loss.best * 10**_LOSS_DECADES if loss.best > 0 else math.inf
    drawn = [(label, _visible(summary, series), style) for label, series, style in drawn]
    for label, series, style in drawn:
        kept = [(s, v) for s, v in series if not (math.isfinite(v) and v > cap)]
        _draw_series(ax, label, kept, **style)
    _scale(ax, [s for _, s, _ in drawn], force_log=True)
    high = [s for s, v in scalars[loss.key] if math.isfinite(v) and v > cap]
    if high:
        ax.set_ylim(top=cap)
        ax.plot(high, [1.0] * len(high), transform=ax.get_xaxis_transform(), ls="none", marker="^", ms=5,
                color="black", clip_on=True, label=f"loss above {cap:.3g} (off scale)")
    _mark_break(ax, summary, label=True)
    _style(ax, f"Training loss ({loss.key}" + (", log scale)" if ax.get_yscale() == "log" else ")"), "loss")
    ax.legend(**{**_LEGEND, "loc": "upper left"})


def _draw_alerts(ax: Any, summary: Summary, colors: dict[str, Any], show_info: bool) -> None:
    """Every alert on one row per monitor, shape per severity; each monitor's first serious one labelled."""
    sources = sorted({a.source for a in summary.alerts if show_info or not a.is_info})
    for row, source in enumerate(sources):
        for severity, style in _SEVERITY_STYLE.items():
            if severity == "info" and not show_info:
                continue
            steps = [a.step for a in summary.alerts if a.source == source and a.severity == severity]
            if steps:
                ax.scatter(steps, [row] * len(steps), color=colors.get(source, "dimgray"), linewidths=0, **style)
        first = summary.first_serious().get(source)
        if first is not None:
            ax.annotate(f"{first.step}", (first.step, row), xytext=(0, 5), textcoords="offset points", fontsize=6,
                        ha="center", color=colors.get(source, "dimgray"))
    ax.set_yticks(range(len(sources)), sources, fontsize=6.5)
    ax.set_ylim(-0.7, max(len(sources), 1) - 0.1)
    _mark_break(ax, summary)
    hidden = summary.count("info") if not show_info else 0
    title = "Alerts by monitor (first of each labelled with its step)" + (
        f"; {hidden} info records hidden (--show-info draws them)" if hidden else "")
    if not sources:
        ax.text(0.5, 0.5, count_phrase(summary), ha="center", va="center", transform=ax.transAxes, fontsize=8)
    _style(ax, title)
    ax.grid(alpha=0.3, lw=0.5, axis="x")
    shown = [s for s in _SEVERITY_STYLE if summary.count(s) and (s != "info" or show_info)]
    handles = [ax.scatter([], [], color="dimgray", linewidths=0, label=s, **_SEVERITY_STYLE[s]) for s in reversed(shown)]
    if handles:
        ax.legend(handles=handles, **{**_LEGEND, "loc": "upper left", "ncol": len(handles)})


def _visible(summary: Summary, series: Series) -> Series:
    """The points on the step axis (:func:`x_range`): the y range follows what is drawn."""
    span = x_range(summary)
    return series if span is None else [(s, v) for s, v in series if s <= span[1]]


def _draw_panel(ax: Any, panel: Panel, summary: Summary, colors: dict[str, Any]) -> None:
    shown = [(label, _visible(summary, series)) for label, _, series in panel.series]
    for label, series in shown:
        _draw_series(ax, label, series)
    _scale(ax, [s for _, s in shown])
    for label, value in panel.thresholds:
        ax.axhline(value, color="tab:red", ls="-.", lw=1.0, alpha=0.8, label=label)
    for severity, style in _SEVERITY_STYLE.items():
        hits = [a for a in panel.alerts if a.severity == severity and a.value is not None and math.isfinite(a.value)]
        if hits:
            ax.scatter([a.step for a in hits], [a.value for a in hits], zorder=5, linewidths=0,
                       color=[colors.get(a.source, "dimgray") for a in hits], label=f"{severity} alert", **style)
    _mark_break(ax, summary)
    _style(ax, panel.title, panel.ylabel)
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
    return "   |   ".join(parts)


def first_page_figure(plt: Any, summary: Summary, colors: dict[str, Any], show_info: bool = False) -> Any:
    """The first page of a run (A4): the verdict, the loss with every serious alert, the figures that moved."""
    moved = [_moved_panel(summary, key) for key in moved_keys(summary)]
    rows = math.ceil(len(moved) / 2)
    strip = 0.5 + 0.22 * max(1, len({a.source for a in summary.alerts if show_info or not a.is_info}))
    heights = [1.25] + ([3.0] if summary.loss else []) + [strip] + [2.1] * rows
    figure = plt.figure(figsize=A4, layout="constrained")
    spec = figure.add_gridspec(len(heights), 2, height_ratios=heights)
    text_ax = figure.add_subplot(spec[0, :])
    text_ax.axis("off")
    lines = verdict(summary)
    wrapped = [textwrap.fill(lines[0], 72)] + [textwrap.fill(line, 95, subsequent_indent="  ") for line in lines[1:]]
    colour = "#cf222e" if summary.broke_at is not None else "#1a7f37"
    text_ax.text(0, 1, wrapped[0], fontsize=11, weight="bold", color=colour, va="top", transform=text_ax.transAxes)
    text_ax.text(0, 0.72 - 0.18 * wrapped[0].count("\n"), "\n".join(wrapped[1:]), fontsize=8.5, va="top", transform=text_ax.transAxes,
                 linespacing=1.5)
    row, step_axes = 1, []
    if summary.loss:
        step_axes.append(figure.add_subplot(spec[row, :]))
        _draw_loss(step_axes[-1], summary)
        row += 1
    step_axes.append(figure.add_subplot(spec[row, :], sharex=step_axes[0] if step_axes else None))
    _draw_alerts(step_axes[-1], summary, colors, show_info)
    for i, panel in enumerate(moved):
        ax = figure.add_subplot(spec[row + 1 + i // 2, i % 2], sharex=step_axes[0])
        _draw_panel(ax, panel, summary, colors)
        step_axes.append(ax)
    _share_steps_of(step_axes, summary)
    step_axes[-1].set_xlabel("step", fontsize=7)
    more = "the figures that moved: " if moved else "no figure crossed a threshold or was named by an alert"
    figure.suptitle(f"{summary.run.name}   ({_subtitle(summary)}; page 1: verdict, loss, alerts, {more.rstrip(': ')})",
                    fontsize=9, x=0.01, ha="left")
    return figure


def _share_steps_of(axes: Sequence[Any], summary: Summary) -> None:
    span = x_range(summary)
    if span is not None:
        for ax in axes:
            ax.set_xlim(*span)


def detail_figures(plt: Any, summary: Summary, colors: dict[str, Any]) -> list[Any]:
    """The detail pages of a run (A4, :data:`DETAIL_ROWS` rows of two panels): every model-level figure
    and the worst layers of every per-layer figure, on the first page's step axis."""
    panels = model_panels(summary) + layer_panels(summary)
    per_page = 2 * DETAIL_ROWS
    pages = [panels[i : i + per_page] for i in range(0, len(panels), per_page)]
    figures = []
    for number, page in enumerate(pages, start=2):
        figure = plt.figure(figsize=A4, layout="constrained")
        spec = figure.add_gridspec(DETAIL_ROWS, 2)
        axes = []
        for i, panel in enumerate(page):
            axes.append(figure.add_subplot(spec[i // 2, i % 2], sharex=axes[0] if axes else None))
            _draw_panel(axes[-1], panel, summary, colors)
        _share_steps_of(axes, summary)
        for ax in axes[-2:]:
            ax.set_xlabel("step", fontsize=7)
        figure.suptitle(f"{summary.run.name}: every figure, page {number} of {len(pages) + 1}", fontsize=9,
                        x=0.01, ha="left")
        figures.append(figure)
    return figures


def run_figure(plt: Any, summary: Summary, colors: dict[str, Any], show_info: bool = False) -> Any:
    """The first page of one run (kept under its old name; the caller closes it)."""
    return first_page_figure(plt, summary, colors, show_info)


def text_figures(plt: Any, summary: Summary, show_info: bool = False) -> list[Any]:
    """The run's text summary on A4 pages (monospace, wrapped): a PDF's first pages, real text."""
    lines = []
    for line in format_summary(summary, timeline=None, show_info=show_info).splitlines():
        lines += textwrap.wrap(line, _TEXT_WIDTH, subsequent_indent="      ", drop_whitespace=False) or [""]
    chunks = [lines[i : i + _TEXT_LINES] for i in range(0, len(lines), _TEXT_LINES)] or [[]]
    figures = []
    for number, chunk in enumerate(chunks, start=1):
        figure = plt.figure(figsize=A4)
        head = f"lightning-diag health report: {summary.run.name}" + (f" (text, {number}/{len(chunks)})"
                                                                     if len(chunks) > 1 else "")
        figure.text(0.06, 0.965, head, fontsize=11, weight="bold", va="top")
        figure.text(0.06, 0.935, "\n".join(chunk), fontsize=6.8, family="monospace", va="top", linespacing=1.35)
        figures.append(figure)
    return figures


def summary_figure(plt: Any, summaries: Sequence[Summary], pages: str = "one section each after this page") -> Any:
    """The summary page of a multi-run report (A4 landscape): one table row per run."""
    rows = summary_table(list(summaries))
    figure = plt.figure(figsize=A4_LANDSCAPE, layout="constrained")
    ax = figure.add_subplot()
    ax.axis("off")
    cells = [tuple(textwrap.fill(c, 34) for c in row) for row in rows]
    table = ax.table(cellText=cells, colLabels=SUMMARY_COLUMNS, loc="upper left", cellLoc="left", colLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.auto_set_column_width(list(range(len(SUMMARY_COLUMNS))))
    table.scale(1.0, 1.4)
    for (row, _), cell in table.get_celld().items():
        cell.set_edgecolor("#cccccc")
        cell.PAD = 0.05  # of the cell width: the default 0.1 indents wide columns more than narrow ones
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#f0f0f0")
    figure.suptitle(f"lightning-diag health report: {len(rows)} runs, {pages}", fontsize=12, x=0.01, ha="left")
    ax.set_title(textwrap.fill(SUMMARY_NOTE, 160), fontsize=7, loc="left", color="dimgray")
    return figure


# ------------------------------------------------------------------------------------ output


def _save(plt: Any, figure: Any, target: Any, **kwargs: Any) -> None:
    try:
        figure.savefig(target, dpi=_DPI, **kwargs)
    finally:
        plt.close(figure)


def _png(plt: Any, figure: Any) -> bytes:
    buffer = io.BytesIO()
    _save(plt, figure, buffer, format="png")
    return buffer.getvalue()


def page_pngs(summary: Summary, show_info: bool = False, colors: dict[str, Any] | None = None) -> list[bytes]:
    """The run's pages as PNG bytes (for the HTML report): the first page, then the detail pages."""
    plt = require_pyplot("PNG")
    colors = colors or monitor_colors([summary])
    return [_png(plt, first_page_figure(plt, summary, colors, show_info)),
            *(_png(plt, f) for f in detail_figures(plt, summary, colors))]


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
    """A run's first page (the detail is in the HTML and PDF reports). Several runs: the summary page in
    ``output`` and one ``<stem>-<run>.png`` first page per run beside it. Returns the files written."""
    plt = require_pyplot("PNG")
    colors = monitor_colors(summaries)
    if len(summaries) == 1:
        _save(plt, first_page_figure(plt, summaries[0], colors, show_info), output, format="png")
        return [output]
    paths = _png_names(output, summaries)
    _save(plt, summary_figure(plt, summaries, f"one PNG each: {output.stem}-<run>.png"), output, format="png")
    for summary, path in zip(summaries, paths):
        _save(plt, first_page_figure(plt, summary, colors, show_info), path, format="png")
    return [output, *paths]


def write_pdf(summaries: Sequence[Summary], output: Path, show_info: bool = False, title: str = "") -> list[Path]:
    """An A4 PDF: with several runs a summary page first; then per run its text summary (real text, so it
    can be searched and copied), its first page and its detail pages."""
    plt = require_pyplot("PDF")
    from matplotlib.backends.backend_pdf import PdfPages

    colors = monitor_colors(summaries)
    with plt.rc_context({"pdf.fonttype": 42}), PdfPages(output, metadata={
            "Title": title or "lightning-diag health report"}) as pdf:  # fonttype 42: TrueType, text extractable
        if len(summaries) > 1:
            _save(plt, summary_figure(plt, summaries), pdf, format="pdf")
        for summary in summaries:
            for figure in [*text_figures(plt, summary, show_info), first_page_figure(plt, summary, colors, show_info),
                           *detail_figures(plt, summary, colors)]:
                _save(plt, figure, pdf, format="pdf")
    return [output]
