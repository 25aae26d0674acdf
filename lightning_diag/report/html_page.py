"""The self-contained HTML report: a summary table linking one section per run. Each section starts with
the verdict (text), then the run's first page (inline PNG), its text summary (wrapped), the warning and
critical alerts, the info records folded in a closed ``<details>``, and the detail pages."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence

from lightning_diag.report.reading import AlertRecord
from lightning_diag.report import render
from lightning_diag.report.summary import (
    SUMMARY_COLUMNS, Summary, count_phrase, format_summary, summary_table, verdict,
)

__all__ = ["render_html"]

_CSS = """body{font-family:system-ui,sans-serif;max-width:1320px;margin:2em auto;color:#222;padding:0 1em}
pre{background:#f6f8fa;padding:1em;font-size:13px;white-space:pre-wrap;overflow-wrap:anywhere}
.verdict{font-size:16px;line-height:1.5}.verdict b{font-size:19px}details{margin:.5em 0}summary{cursor:pointer}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
img{max-width:100%;display:block;margin:1em 0}.ok{color:#1a7f37}.bad{color:#cf222e}.sev-critical{color:#cf222e;font-weight:bold}
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


def _section(i: int, summary: Summary, images: Sequence[bytes]) -> str:
    state = "bad" if summary.serious or summary.broke_at is not None else "ok"
    counts = f"<small class='{state}'>{_esc(count_phrase(summary))}</small>"
    lines = verdict(summary)
    parts = [f"<h2 id='run-{i}'>{_esc(summary.run.name)} {counts}</h2>",
             f"<div class='verdict'><b class='{state}'>{_esc(lines[0])}</b><br>"
             + "<br>".join(map(_esc, lines[1:])) + "</div>"]
    encoded = [base64.b64encode(image).decode("ascii") for image in images]
    if encoded:
        parts.append(f"<img alt='{_esc(summary.run.name)}: first page' src='data:image/png;base64,{encoded[0]}'>")
    parts.append(f"<pre>{_esc(format_summary(summary, timeline=0))}</pre>")
    serious, info = summary.serious, [a for a in summary.alerts if a.is_info]
    if serious:
        parts.append(f"<h3>Warning and critical alerts: {len(serious)}</h3>")
        parts.append(_alerts_table(serious))
    if info:
        parts.append(f"<details><summary>{len(info)} info records (recorded, never acted on)</summary>"
                     f"{_alerts_table(info)}</details>")
    if len(encoded) > 1:
        parts.append("<h3>Every figure</h3>")
        parts += [f"<img alt='{_esc(summary.run.name)}: page {n}' src='data:image/png;base64,{e}'>"
                  for n, e in enumerate(encoded[1:], start=2)]
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
        images = render.page_pngs(summary, show_info, colors) if with_plots else []
        parts.append(_section(i, summary, images))
    parts.append("</body></html>")
    return "\n".join(parts)
