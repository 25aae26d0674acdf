"""Post-hoc health report of a run (``lightning-diag report LOGDIR``): TensorBoard or CSVLogger logs.

A run is a folder holding TensorBoard event files or CSVLogger's ``metrics.csv`` (e.g.
``lightning_logs/version_3``); both give the same report for the same figures. ``LOGDIR`` is a
run, a folder of runs, or one file. The command prints a summary per run and writes a report
whose format follows the suffix of ``-o``:

- ``.html`` (default ``LOGDIR/health_report.html``): one self-contained page; with several runs a
  summary table at the top links one section per run; each section starts with the verdict as
  text, then the run's first page (a picture), its summary (wrapped text), the warning and
  critical alerts, the info records folded in a closed ``<details>``, and every figure.
- ``.pdf``: A4 pages; with several runs a summary table first; then per run its summary as text
  (searchable), its first page and its detail pages.
- ``.png``: one run, its first page; several runs, the summary page in the file named and one
  ``<stem>-<run>.png`` first page per run beside it (the detail pages are in the HTML and PDF).

Any other suffix, or a PNG or PDF without matplotlib, is refused with a one-line error (status 2).

What a run's page and summary hold:

- Alerts with their severity, from ``<run>/lightning_diag_alerts.jsonl`` when present, else from the
  TensorBoard texts under ``<family>/alerts`` (``"[<severity>] <Source>: ..."``), or ``alerts/<Source>``
  for runs older than severities (severity ``unknown``); a CSV run without the file has only the
  monitors' ``<family>/alerts`` counts, and says so. Counts say what they count: warning and
  critical alerts apart from info records (which the monitors record but never act on), e.g.
  ``"25 warning and critical alerts (20 warning, 5 critical), 33 info records"``. Info records are
  left out of the pictures and the printed timeline unless ``--show-info`` (then drawn faded); the
  printed timeline stops at 20 alerts and says how many it leaves out; the HTML lists every record.
- The verdict: whether the loss exploded (:func:`~lightning_diag.testbeds.explosion_step` of the
  logged values, the early-warning suite's definition) or turned non-finite (logged, or named by
  an alert on the loss), at which step, and which monitor warned first and how early. Only an
  alert strictly before the break, about a finite value, is an early warning.
- The training loss (``loss_spike/loss``, else the logger's ``train_loss``/``loss``) over its
  finite values (first, min, last finite; whether the run ended non-finite), on a log scale with
  the break marked and every warning and critical alert below it; one step axis for every panel.
- The figures that moved (first page) and every figure (detail pages), with the threshold of
  their rule. Per per-layer figure, the worst layers by their last finite value (higher or lower
  is worse, :func:`~lightning_diag.report.summary.direction`; a figure without a direction, such
  as a spread, by how far each layer moved). What is per layer comes from the key scheme
  (``<family>/<figure>/<layer>``, see :mod:`lightning_diag.keys`).
- A version resumed from a checkpoint (``version_<n+1>`` whose first step continues
  ``version_<n>``) is joined to the run it resumes (``--no-join``: apart).

Modules: :mod:`~lightning_diag.report.reading` (runs, event files, CSV, alerts),
:mod:`~lightning_diag.report.summary` (the summary and its text), :mod:`~lightning_diag.report.render`
(matplotlib pages, PNG, PDF), :mod:`~lightning_diag.report.html_page` (HTML).

Example:
    >>> from lightning_diag.report import main
    >>> main(["/no/such/dir"])
    2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_diag.report.reading import AlertRecord, ReportError, Run, find_runs, join_resumed, load_run
from lightning_diag.report.summary import Summary, count_phrase, format_summary, summarize

__all__ = [
    "AlertRecord", "ReportError", "Run", "Summary", "count_phrase", "format_summary", "load_run", "main", "report",
    "summarize",
]

DEFAULT_OUTPUT = "health_report.html"
FORMATS = {".html": "HTML", ".htm": "HTML", ".pdf": "PDF", ".png": "PNG"}
PROG = "lightning-diag report"


def _output_format(output: Path) -> str:
    """The format named by the suffix; checked before any log is read."""
    kind = FORMATS.get(output.suffix.lower())
    if kind is None:
        suffix = output.suffix or "(no suffix)"
        raise ReportError(f"{output}: unknown report format {suffix!r}; use .html, .pdf or .png")
    if not output.parent.is_dir():
        raise ReportError(f"{output}: cannot write the report (no such directory: {output.parent})")
    if kind != "HTML":
        from lightning_diag.report.render import require_pyplot

        require_pyplot(kind)
    return kind


def _write(summaries: list[Summary], output: Path, kind: str, title: str, show_info: bool) -> list[Path]:
    from lightning_diag.report.html_page import render_html
    from lightning_diag.report.render import write_pdf, write_png

    try:
        if kind == "PNG":
            return write_png(summaries, output, show_info)
        if kind == "PDF":
            return write_pdf(summaries, output, show_info, title)
        output.write_text(render_html(summaries, title, show_info), encoding="utf-8")
        return [output]
    except OSError as err:
        raise ReportError(f"{output}: cannot write the report ({err.strerror or err})") from None


def _run_name(path: Path, base: Path) -> str:
    """The run's folders below ``base``, at least two (lightning's ``<name>/version_<n>``)."""
    parts = path.relative_to(base).parts
    if len(parts) < 2:  # a bare "version_0" names nothing: add the folders above it
        parts = base.resolve().parts[len(parts) - 2 :] + parts
    return "/".join(parts)


def read_summaries(logdir: str | Path, top: int = 3, join: bool = True) -> list[Summary]:
    """The summary of every run under ``logdir``, named by their path relative to it; a version that
    resumes the one before it from a checkpoint is joined to it (:func:`~.reading.join_resumed`)."""
    logdir = Path(logdir)
    base = logdir if logdir.is_dir() else logdir.parent
    runs = [load_run(path, files, name=_run_name(path, base)) for path, files in find_runs(logdir).items()]
    return [summarize(run, top=top) for run in (join_resumed(runs) if join else runs)]


def report(
    logdir: str | Path, output: str | Path | None = None, top: int = 3, show_info: bool = False, join: bool = True
) -> tuple[str, list[Summary]]:
    """Read ``logdir``, write the report to ``output`` if given (format from its suffix); return the text.

    Raises:
        ReportError: no such path, no logs, a corrupted file, a bad suffix, no matplotlib for a
            PNG or PDF, or an unwritable output.
    """
    if not Path(logdir).exists():  # before the output's folder, which a mistyped LOGDIR also lacks
        raise ReportError(f"{logdir}: no such file or directory")
    kind = _output_format(Path(output)) if output is not None else None
    summaries = read_summaries(logdir, top, join)
    text = "\n\n".join(format_summary(s, show_info=show_info) for s in summaries)
    if output is not None and kind is not None:
        written = _write(summaries, Path(output), kind, f"lightning-diag health report: {logdir}", show_info)
        text += "\n\nReport written to " + ", ".join(map(str, written))
    return text, summaries


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logdir", help="a run folder (e.g. lightning_logs/version_0), a folder of runs, "
                                       "one event file or one metrics.csv")
    parser.add_argument("-o", "--output", default=None,
                        help=f"report file: .html (self-contained), .pdf or .png; default LOGDIR/{DEFAULT_OUTPUT}")
    parser.add_argument("--no-output", action="store_true", help="print the summary only, write no file")
    parser.add_argument("--top", type=int, default=3, help="worst layers listed per per-layer figure (default 3)")
    parser.add_argument("--show-info", action="store_true",
                        help="draw info records in the pictures and list them in the printed timeline")
    parser.add_argument("--no-join", action="store_true",
                        help="report a version resumed from a checkpoint apart from the version it resumes")
    parser.add_argument("--fail-on-alert", action="store_true",
                        help="exit with status 1 when any alert but an info record was logged")


def run_command(args: argparse.Namespace) -> int:
    """Run ``report`` from parsed arguments; one line on stderr and status 2 on bad input."""
    try:
        if args.top < 1:
            raise ReportError(f"--top must be >= 1, got {args.top}")
        logdir = Path(args.logdir)
        output = None
        if not args.no_output:
            output = args.output or (logdir if logdir.is_dir() else logdir.parent) / DEFAULT_OUTPUT
        text, summaries = report(logdir, output, top=args.top, show_info=args.show_info, join=not args.no_join)
    except ReportError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 1 if args.fail_on_alert and any(s.serious for s in summaries) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``lightning-diag report`` on its own: ``main(["lightning_logs/version_0"])``."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
