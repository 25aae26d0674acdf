"""Post-hoc health report of a run from its TensorBoard event files (``lightning-diag report LOGDIR``).

Reads every ``events.out.tfevents.*`` file under ``LOGDIR`` (each folder holding event files is one
run, e.g. ``lightning_logs/version_3``), prints a health summary and writes a self-contained HTML
page (plots inlined as base64 PNG) or one PNG:

- the alerts timeline: every alert text the monitors wrote to TensorBoard (``alerts/<Source>``);
- the first warning of each monitor present in the run;
- the worst layers at the last logged step for each per-layer family (``grad_norm/<layer>``,
  ``grad_weight_ratio/<layer>``, ``spectral_alignment/collapse/<layer>``, ...), highest first
  unless lower is worse (sign diversity, stable rank);
- the neural-collapse trend (first -> last value of NC1, NC3, NC4, CDNV per ``NCTracker`` prefix)
  and the loss as :class:`~lightning_diag.LossSpikeDetector` saw it.

Event files are checked record by record first (lengths and CRCs; the data CRC on the first 16 MB
of a run, pure Python is slow), because TensorBoard's reader skips a corrupted file silently. A
truncated last record is what a run still being written looks like: it is reported as a note,
not an error. Matplotlib is imported only to draw plots; without it the HTML page has no plots.

Example:
    >>> from lightning_diag.report import main
    >>> main(["/no/such/dir"])  # doctest: +SKIP
    lightning-diag report: error: /no/such/dir: no such file or directory
    2
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import re
import struct
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "Run", "Summary", "load_run", "main", "report", "summarize"]

EVENT_FILE_PATTERN = "events.out.tfevents.*"
DEFAULT_OUTPUT = "health_report.html"
_DATA_CRC_BUDGET = 16 << 20  # bytes of record data whose CRC is checked per run (0.2 s per MB)
_PLOT_LAYERS = 5  # layers drawn per per-layer family

# Per-layer families: key prefix -> (title, True when higher is worse). Totals of a family are not layers.
LAYER_FAMILIES: dict[str, tuple[str, bool]] = {
    "grad_norm/": ("gradient norm", True),
    "weight_norm/": ("weight norm", True),
    "grad_weight_ratio/": ("||g|| / ||w||", True),
    "update_ratio/": ("||dw|| / ||w||", True),
    "spectral_alignment/collapse/": ("spectral-alignment collapse c", True),
    "spectral_alignment/sign_diversity/": ("sign diversity D", False),
    "sigma1/": ("top singular value", True),
    "stable_rank/": ("stable rank", False),
}
_NOT_LAYERS = {"grad_norm/" + k for k in ("total", "zscore", "baseline", "nonfinite", "clip_coef", "clipped_steps")}
_NC_KEYS = ("nc1", "nc3", "nc4", "cdnv")


class ReportError(Exception):
    """Bad input: the message is the one line the command prints (no traceback)."""


@dataclass(frozen=True)
class AlertText:
    """One alert as a monitor wrote it to TensorBoard."""

    step: int
    source: str
    message: str


@dataclass
class Run:
    """What the report reads from one run folder: scalar series, alert texts and reading notes."""

    path: Path
    name: str
    files: list[Path]
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    alerts: list[AlertText] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Summary:
    """The health summary of a run (see :func:`summarize`)."""

    run: Run
    alerts: list[AlertText]
    first_alert: dict[str, AlertText | None]
    worst_layers: dict[str, list[tuple[str, float, float]]]  # family -> [(layer, last, first)]
    nc_trend: dict[str, dict[str, tuple[float, float]]]  # prefix -> key -> (first, last)
    loss: tuple[float, float, float] | None  # first, min, last of loss_spike/loss
    last_step: int | None


# ------------------------------------------------------------------------------------ reading


def find_runs(logdir: Path) -> dict[Path, list[Path]]:
    """The event files under ``logdir``, grouped by folder (one folder = one run)."""
    if not logdir.exists():
        raise ReportError(f"{logdir}: no such file or directory")
    if logdir.is_file():
        if not logdir.name.startswith("events.out.tfevents."):
            raise ReportError(f"{logdir}: not a TensorBoard event file (expected {EVENT_FILE_PATTERN})")
        return {logdir.parent: [logdir]}
    runs: dict[Path, list[Path]] = defaultdict(list)
    try:
        for path in sorted(logdir.rglob(EVENT_FILE_PATTERN)):
            if path.is_file():
                runs[path.parent].append(path)
    except OSError as err:
        raise ReportError(f"{logdir}: cannot list the folder ({err.strerror or err})") from None
    if not runs:
        raise ReportError(f"{logdir}: no TensorBoard event files ({EVENT_FILE_PATTERN}) under this folder")
    return dict(runs)


def check_event_file(path: Path, crc_budget: int) -> tuple[int, str | None, int]:
    """Walk the TFRecord framing of an event file; returns (records, note, data bytes CRC-checked).

    Raises:
        ReportError: a length or data CRC does not match (not an event file, or corrupted).
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    try:
        data = path.read_bytes()
    except OSError as err:
        raise ReportError(f"{path}: cannot read ({err.strerror or err})") from None
    offset = records = checked = 0
    while offset < len(data):
        if len(data) - offset < 12:
            return records, f"{path.name}: last record truncated (run still being written?)", checked
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if masked_crc32c(header) != length_crc:
            what = "not a TensorBoard event file" if records == 0 else f"corrupted record #{records + 1}"
            raise ReportError(f"{path}: {what} (bad length checksum at byte {offset})")
        end = offset + 12 + length + 4
        if end > len(data):
            return records, f"{path.name}: last record truncated (run still being written?)", checked
        if checked + length <= crc_budget:
            (data_crc,) = struct.unpack("<I", data[end - 4 : end])
            if masked_crc32c(data[offset + 12 : end - 4]) != data_crc:
                raise ReportError(f"{path}: corrupted record #{records + 1} (bad data checksum at byte {offset})")
            checked += length
        records, offset = records + 1, end
    return records, None, checked


def load_run(path: Path, files: Sequence[Path], name: str | None = None) -> Run:
    """Read a run folder's scalars and alert texts with TensorBoard's ``EventAccumulator``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = Run(path=path, name=name or str(path), files=list(files))
    budget, records = _DATA_CRC_BUDGET, 0
    for file in run.files:
        count, note, checked = check_event_file(file, budget)
        budget -= checked
        records += count
        if note:
            run.notes.append(note)
    if records == 0:
        raise ReportError(f"{path}: the event files hold no records (empty files)")
    sizes = {"scalars": 0, "tensors": 0, "histograms": 1, "images": 1, "audio": 1, "compressedHistograms": 1}
    source = str(run.files[0]) if len(run.files) == 1 else str(path)  # one file given: only that one
    accumulator = EventAccumulator(source, size_guidance=sizes, purge_orphaned_data=False)
    try:
        accumulator.Reload()
        tags = accumulator.Tags()
        for tag in tags.get("scalars", []):
            run.scalars[tag] = [(int(e.step), float(e.value)) for e in accumulator.Scalars(tag)]
        for tag in tags.get("tensors", []):
            if not tag.startswith("alerts/") or accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "text":
                continue
            monitor = tag[len("alerts/"):].removesuffix("/text_summary")
            for event in accumulator.Tensors(tag):
                for text in event.tensor_proto.string_val:
                    run.alerts.append(AlertText(int(event.step), monitor, text.decode("utf-8", "replace")))
    except Exception as err:  # noqa: BLE001 -- anything TensorBoard raises on a bad file is bad input
        raise ReportError(f"{path}: cannot read the event files ({type(err).__name__}: {err})") from None
    run.alerts.sort(key=lambda a: (a.step, a.source))
    return run


# ----------------------------------------------------------------------------------- summary


def _family_layers(scalars: dict[str, list[tuple[int, float]]], prefix: str) -> dict[str, list[tuple[int, float]]]:
    return {
        key[len(prefix):]: series for key, series in scalars.items()
        if key.startswith(prefix) and key not in _NOT_LAYERS and series and "/" not in key[len(prefix):]
    }


def _finite(x: float) -> bool:
    return math.isfinite(x)


def summarize(run: Run, top: int = 3) -> Summary:
    """The health summary of ``run``: alerts, first alert per monitor, worst layers, NC trend, loss."""
    scalars = run.scalars
    monitors = sorted({key.split("/", 1)[1] for key in scalars if key.startswith("alerts/")} | {
        a.source for a in run.alerts})
    first_alert: dict[str, AlertText | None] = {m: None for m in monitors}
    for alert in run.alerts:
        if first_alert.get(alert.source) is None:
            first_alert[alert.source] = alert
    worst: dict[str, list[tuple[str, float, float]]] = {}
    for prefix, (_, higher_is_worse) in LAYER_FAMILIES.items():
        layers = _family_layers(scalars, prefix)
        if not layers:
            continue
        rows = [(layer, series[-1][1], series[0][1]) for layer, series in layers.items()]
        # Non-finite values are the worst of all, whichever direction is bad.
        rows.sort(key=lambda r: (_finite(r[1]), -r[1] if higher_is_worse else r[1]))
        worst[prefix.rstrip("/")] = rows[:top]
    nc: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    for key, series in scalars.items():
        prefix, _, name = key.rpartition("/")
        finite = [v for _, v in series if _finite(v)]  # lagged NC4 is NaN at the first evaluation
        if name in _NC_KEYS and prefix and "/" not in prefix and f"{prefix}/nc1" in scalars and finite:
            nc[prefix][name] = (finite[0], finite[-1])
    loss = scalars.get("loss_spike/loss")
    loss_figures = None
    if loss:
        values = [v for _, v in loss]
        finite = [v for v in values if _finite(v)]
        loss_figures = (values[0], min(finite) if finite else math.nan, values[-1])
    steps = [series[-1][0] for series in scalars.values() if series]
    return Summary(run, list(run.alerts), first_alert, worst, dict(nc), loss_figures, max(steps) if steps else None)


def _trend(first: float, last: float) -> str:
    if not (_finite(first) and _finite(last)):
        return "non-finite"
    if first == last:
        return "flat"
    ratio = last / first if first else math.inf
    word = "falling" if last < first else "rising"
    return f"{word} (x{ratio:.3g})" if first and ratio > 0 else word


def format_summary(summary: Summary, timeline: int = 20) -> str:
    """The summary as plain text, as the command prints it."""
    run = summary.run
    lines = [f"== {run.name}  ({len(run.files)} event file(s), last step {summary.last_step})"]
    lines += [f"   note: {n}" for n in run.notes]
    counts = defaultdict(int)
    for alert in summary.alerts:
        counts[alert.source] += 1
    if summary.alerts:
        by_source = ", ".join(f"{s}: {n}" for s, n in sorted(counts.items()))
        lines.append(f"Health: {len(summary.alerts)} alert(s) ({by_source})")
    elif summary.first_alert:
        lines.append("Health: no alerts")
    else:
        lines.append("Health: no lightning_diag monitor logged to this run")
    if summary.alerts:
        lines.append("Alerts timeline:")
        shown = summary.alerts[:timeline]
        lines += [f"  step {a.step:>7}  {a.message}" for a in shown]
        if len(summary.alerts) > len(shown):
            lines.append(f"  ... {len(summary.alerts) - len(shown)} more (see the HTML report)")
    if summary.first_alert:
        lines.append("First alert per monitor (any severity, info included):")
        width = max(len(m) for m in summary.first_alert)
        for monitor, alert in summary.first_alert.items():
            lines.append(f"  {monitor:<{width}}  " + (f"step {alert.step}: {alert.message}" if alert else "none"))
    if summary.worst_layers:
        lines.append(f"Worst layers at the last step (of {len(summary.worst_layers)} families):")
        width = max(len(f) for f in summary.worst_layers)
        for family, rows in summary.worst_layers.items():
            cells = ", ".join(f"{layer} {last:.3g}" + (f" (x{last / first:.3g})" if first and _finite(first) and
                                                        _finite(last) else "") for layer, last, first in rows)
            lines.append(f"  {family:<{width}}  {cells}")
    for prefix, figures in summary.nc_trend.items():
        cells = ", ".join(f"{k} {a:.3g} -> {b:.3g} {_trend(a, b)}" for k, (a, b) in sorted(figures.items()))
        lines.append(f"Neural collapse ({prefix}): {cells}")
    if summary.loss is not None:
        first, best, last = summary.loss
        lines.append(f"Loss (loss_spike/loss): first {first:.4g}, min {best:.4g}, last {last:.4g}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ plots


@dataclass
class Panel:
    """One plot: a title, named series and the steps of the alerts to mark."""

    title: str
    series: list[tuple[str, list[tuple[int, float]]]]
    log_y: bool = False
    alert_steps: list[int] = field(default_factory=list)


def panels(summary: Summary) -> list[Panel]:
    """The plots of a run: loss, total gradient norm, worst layers per family, NC, spectral, alerts."""
    s = summary.run.scalars
    alert_steps = sorted({a.step for a in summary.alerts})
    out: list[Panel] = []

    def add(title: str, keys: Sequence[str], log_y: bool = False, marks: bool = True) -> None:
        series = [(k, s[k]) for k in keys if s.get(k)]
        if series:
            out.append(Panel(title, series, log_y, alert_steps if marks else []))

    add("Loss (LossSpikeDetector)", ["loss_spike/loss", "loss_spike/ema"])
    add("Total gradient norm (GradNormWatcher)", ["grad_norm/total", "grad_norm/baseline"], log_y=True)
    for family, rows in summary.worst_layers.items():
        layers = _family_layers(s, family + "/")
        higher, = [h for p, (_, h) in LAYER_FAMILIES.items() if p == family + "/"]
        ranked = sorted(layers, key=lambda n: -layers[n][-1][1] if higher else layers[n][-1][1])[:_PLOT_LAYERS]
        title = LAYER_FAMILIES[family + "/"][0]
        add(f"{family}: {title}, worst {len(ranked)} of {len(layers)} layers", [f"{family}/{n}" for n in ranked],
            log_y=family in ("grad_norm", "grad_weight_ratio", "update_ratio"))
    for prefix in summary.nc_trend:
        add(f"Neural collapse ({prefix})", [f"{prefix}/{k}" for k in _NC_KEYS], log_y=True)
    add("Spectral alignment (model level)", [
        "spectral_alignment/mean_collapse", "spectral_alignment/frac_collapsed", "spectral_alignment/frac_flagged"])
    add("Alert counts", sorted(k for k in s if k.startswith("alerts/")), marks=False)
    return out


def _draw(ax: Any, panel: Panel) -> None:
    for label, series in panel.series:
        ax.plot([p[0] for p in series], [p[1] for p in series], label=label.rpartition("/")[2] or label, lw=1.2)
    for step in panel.alert_steps:
        ax.axvline(step, color="tab:red", alpha=0.35, lw=0.8)
    positive = all(v > 0 for _, ser in panel.series for _, v in ser if _finite(v))
    if panel.log_y and positive:
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _matplotlib() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(plt: Any, figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def render_png(summaries: Sequence[Summary]) -> bytes:
    """Every run's panels in one PNG grid (two columns)."""
    plt = _matplotlib()
    if plt is None:
        raise ReportError("a PNG report needs matplotlib (pip install matplotlib); write an .html report instead")
    all_panels = [(s.run.name, p) for s in summaries for p in panels(s)]
    if not all_panels:
        raise ReportError("nothing to plot: the run logged no lightning_diag figures")
    rows = (len(all_panels) + 1) // 2
    figure, axes = plt.subplots(rows, 2, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, (name, panel) in zip(axes.flat, all_panels):
        _draw(ax, Panel(f"{name}: {panel.title}" if len(summaries) > 1 else panel.title, panel.series,
                        panel.log_y, panel.alert_steps))
    for ax in list(axes.flat)[len(all_panels):]:
        ax.axis("off")
    figure.tight_layout()
    return _png(plt, figure)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:13px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:8px}.plots img{width:540px}.ok{color:#1a7f37}.bad{color:#cf222e}"""


def render_html(summaries: Sequence[Summary], title: str) -> str:
    """A self-contained HTML page: summary text, alerts table and inline PNG plots per run."""
    plt = _matplotlib()
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if plt is None:
        parts.append("<p><em>matplotlib is not installed: plots are left out (pip install matplotlib).</em></p>")
    for summary in summaries:
        state = ("bad", f"{len(summary.alerts)} alert(s)") if summary.alerts else ("ok", "no alerts")
        parts.append(f"<h2>{html.escape(summary.run.name)} <span class='{state[0]}'>{state[1]}</span></h2>")
        parts.append(f"<pre>{html.escape(format_summary(summary, timeline=0))}</pre>")
        if summary.alerts:
            rows = "".join(f"<tr><td>{a.step}</td><td>{html.escape(a.source)}</td><td>{html.escape(a.message)}</td></tr>"
                           for a in summary.alerts)
            parts.append(f"<h3>Alerts</h3><table><tr><th>step</th><th>monitor</th><th>alert</th></tr>{rows}</table>")
        if plt is not None:
            images = []
            for panel in panels(summary):
                figure, ax = plt.subplots(figsize=(6, 3.2))
                _draw(ax, panel)
                encoded = base64.b64encode(_png(plt, figure)).decode("ascii")
                images.append(f"<img alt='{html.escape(panel.title)}' src='data:image/png;base64,{encoded}'>")
            if images:
                parts.append("<h3>Plots</h3><p>Red lines: steps with an alert.</p>"
                             f"<div class='plots'>{''.join(images)}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -------------------------------------------------------------------------------------- entry


def report(logdir: str | Path, output: str | Path | None = None, top: int = 3) -> tuple[str, list[Summary]]:
    """Read ``logdir``, write the HTML (or ``.png``) report to ``output`` if given; return the text.

    Raises:
        ReportError: no such path, no event files, a corrupted file, or an unwritable output.
    """
    logdir = Path(logdir)
    runs = find_runs(logdir)
    if output is not None and not Path(output).parent.is_dir():
        raise ReportError(f"{output}: cannot write the report (no folder {Path(output).parent})")
    base = logdir if logdir.is_dir() else logdir.parent
    summaries = []
    for path, files in runs.items():
        name = str(path.relative_to(base)) if path != base else (path.name or str(path))
        summaries.append(summarize(load_run(path, files, name=name), top=top))
    text = "\n\n".join(format_summary(s) for s in summaries)
    if output is not None:
        output = Path(output)
        try:
            if output.suffix.lower() == ".png":
                output.write_bytes(render_png(summaries))
            else:
                output.write_text(render_html(summaries, f"lightning-diag health report: {logdir}"), encoding="utf-8")
        except OSError as err:
            raise ReportError(f"{output}: cannot write the report ({err.strerror or err})") from None
    return text, summaries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", help="a run folder (e.g. lightning_logs/version_0), a folder of runs, or one event file")
    parser.add_argument("-o", "--output", default=None,
                        help=f"report file: .html (self-contained) or .png; default LOGDIR/{DEFAULT_OUTPUT}")
    parser.add_argument("--no-output", action="store_true", help="print the summary only, write no file")
    parser.add_argument("--top", type=int, default=3, help="worst layers listed per family (default 3)")
    parser.add_argument("--fail-on-alert", action="store_true", help="exit with status 1 when any alert was logged")


def run_command(args: argparse.Namespace) -> int:
    """Run ``report`` from parsed arguments; one line on stderr and status 2 on bad input."""
    prog = "lightning-diag report"
    try:
        if args.top < 1:
            raise ReportError(f"--top must be >= 1, got {args.top}")
        logdir = Path(args.logdir)
        output = None
        if not args.no_output:
            output = args.output or (logdir if logdir.is_dir() else logdir.parent) / DEFAULT_OUTPUT
        text, summaries = report(logdir, output, top=args.top)
    except ReportError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    print(text)
    if output is not None:
        print(f"\nReport written to {output}")
    return 1 if args.fail_on_alert and any(s.alerts for s in summaries) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-diag report`` on its own: ``main(["lightning_logs/version_0"])``."""
    parser = argparse.ArgumentParser(prog="lightning-diag report", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
