"""The self-contained HTML report: a summary table linking one section per run; each section has the
run's page as an inline PNG, its text summary and a table of every alert with its severity."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence

from lightning_diag.report.reading import AlertRecord
from lightning_diag.report import render
from lightning_diag.report.summary import SUMMARY_COLUMNS, Summary, count_phrase, format_summary, summary_table

__all__ = ["render_html"]

_CSS = """body{font-family:system-ui,sans-serif;max-width:1320px;margin:2em auto;color:#222;padding:0 1em}
pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
img{max-width:100%}.ok{color:#1a7f37}.bad{color:#cf222e}.sev-critical{color:#cf222e;font-weight:bold}
.sev-warning{color:#9a6700;font-weight:bold}tr.info{color:#888}"""


def _esc(value: object) -> str:
    return html.escape(str(value))


def _value(alert: AlertRecord) -> str:
    if alert.value is None:
        return ""
    return f"{alert.value:.4g}" if math.isfinite(alert.value) else str(alert.value)


def _alerts_table(alerts: Sequence[AlertRecord]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("step", "severity", "monitor", "metric", "value", "acted at", "alert"))
    rows = "".join(
        f"<tr class='{_esc(a.severity)}'><td>{a.step}</td><td class='sev-{_esc(a.severity)}'>{_esc(a.severity)}</td>"
        f"<td>{_esc(a.source)}</td><td>{_esc(a.metric or '')}</td><td>{_value(a)}</td>"
        f"<td>{'' if a.acted_step is None else a.acted_step}</td><td>{_esc(a.message)}</td></tr>"
        for a in alerts
    )
    return f"<table><tr>{head}</tr>{rows}</table>"


def _runs_table(summaries: Sequence[Summary]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in SUMMARY_COLUMNS)
    rows = []
    for i, row in enumerate(summary_table(list(summaries))):
        cells = [f"<a href='#run-{i}'>{_esc(row[0])}</a>", *map(_esc, row[1:])]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _section(i: int, summary: Summary, image: bytes | None) -> str:
    state = "bad" if summary.serious else "ok"
    counts = f"<small class='{state}'>{_esc(count_phrase(summary))}</small>"
    parts = [f"<h2 id='run-{i}'>{_esc(summary.run.name)} {counts}</h2>"]
    if image is not None:
        encoded = base64.b64encode(image).decode("ascii")
        parts.append(f"<img alt='{_esc(summary.run.name)}' src='data:image/png;base64,{encoded}'>")
    parts.append(f"<pre>{_esc(format_summary(summary, timeline=0))}</pre>")
    if summary.alerts:
        parts.append(f"<h3>Alerts: all {len(summary.alerts)} records, every severity</h3>")
        parts.append(_alerts_table(summary.alerts))
    return "\n".join(parts)


def render_html(summaries: Sequence[Summary], title: str, show_info: bool = False) -> str:
    """The HTML page of ``summaries`` (plots left out, and said so, without matplotlib)."""
    with_plots = render.import_pyplot() is not None  # looked up at call time: tests stand in for it
    colors = render.monitor_colors(summaries)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>"]
    if not with_plots:
        parts.append("<p><em>matplotlib is not installed: plots are left out (pip install matplotlib).</em></p>")
    if len(summaries) > 1:
        parts.append(f"<h2>{len(summaries)} runs</h2>{_runs_table(summaries)}")
    for i, summary in enumerate(summaries):
        image = render.page_png(summary, show_info, colors) if with_plots else None
        parts.append(_section(i, summary, image))
    parts.append("</body></html>")
    return "\n".join(parts)
