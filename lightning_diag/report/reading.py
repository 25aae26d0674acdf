"""Reading a run: scalar series from TensorBoard event files or CSVLogger's ``metrics.csv``, and alerts.

A run is one folder holding event files (``events.out.tfevents.*``) or a ``metrics.csv``; both
give the same :class:`Run`: ``scalars[key] == [(step, value), ...]`` in the order logged (a
step may repeat). Alerts come from ``<run>/lightning_diag_alerts.jsonl`` when it exists (one
:class:`~lightning_diag.Alert` per line, with its severity), otherwise from the TensorBoard texts
of ``<family>/alerts`` (``"[<severity>] <Source>: ..."``) or, in runs older than the key scheme,
of ``alerts/<Source>`` (no severity: ``"unknown"``). A CSV log has no text channel.

Event files are checked record by record first (lengths and CRCs; the data CRC on the first 16 MB
of a run, pure Python is slow), because TensorBoard's reader skips a corrupted file silently. A
truncated last record (or CSV row, or JSON line) is what a run still being written looks like: it
is a note, not an error.
"""

from __future__ import annotations

import csv
import json
import math
import re
import struct
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ALERTS_FILE", "CSV_FILE", "EVENT_FILE_PATTERN", "SEVERITIES", "AlertRecord", "ReportError", "Run",
    "find_runs", "join_resumed", "load_run", "parse_alert_text", "resume_step",
]

EVENT_FILE_PATTERN = "events.out.tfevents.*"
CSV_FILE = "metrics.csv"
ALERTS_FILE = "lightning_diag_alerts.jsonl"
# Most severe first. "unknown": a text of a run older than severities in TensorBoard texts.
SEVERITIES = ("critical", "warning", "unknown", "info")
_DATA_CRC_BUDGET = 16 << 20  # bytes of record data whose CRC is checked per run (0.2 s per MB)
_TEXT = re.compile(r"^\[(?P<severity>[a-z]+)\]\s*(?P<message>.*)$", re.DOTALL)
_MESSAGE = re.compile(r"^(?P<source>\w+):\s*(?P<metric>\S+) = (?P<value>\S+)")
_THRESHOLD = re.compile(r"\((?:at or )?(?:above|below) (?P<threshold>[^\s)]+)")
_VERSION = re.compile(r"^version_(?P<n>\d+)$")


class ReportError(Exception):
    """Bad input: the message is the one line the command prints (no traceback)."""


@dataclass(frozen=True)
class AlertRecord:
    """One alert of a run: what :class:`~lightning_diag.Alert` holds, as far as the log tells."""

    step: int
    source: str
    severity: str  # one of SEVERITIES
    message: str
    metric: str | None = None
    value: float | None = None
    acted_step: int | None = None
    threshold: float | None = None

    @property
    def is_info(self) -> bool:
        return self.severity == "info"


@dataclass
class Run:
    """What the report reads from one run folder."""

    path: Path
    name: str
    files: list[Path]
    format: str  # "TensorBoard" or "CSV"
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    alerts: list[AlertRecord] = field(default_factory=list)
    alerts_from: str | None = None  # where the alert records came from; None: nowhere
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ finding


def _run_files(folder_files: list[Path]) -> list[Path]:
    events = [p for p in folder_files if p.name != CSV_FILE]
    return events or folder_files


def find_runs(logdir: Path) -> dict[Path, list[Path]]:
    """The runs under ``logdir``: folder -> its event files, or ``[metrics.csv]`` when it has none."""
    if not logdir.exists():
        raise ReportError(f"{logdir}: no such file or directory")
    if logdir.is_file():
        if logdir.name != CSV_FILE and not logdir.match(EVENT_FILE_PATTERN):
            raise ReportError(f"{logdir}: not a TensorBoard event file ({EVENT_FILE_PATTERN}) nor a {CSV_FILE}")
        return {logdir.parent: [logdir]}
    found: dict[Path, list[Path]] = defaultdict(list)
    try:
        for pattern in (EVENT_FILE_PATTERN, CSV_FILE):
            for path in logdir.rglob(pattern):
                if path.is_file():
                    found[path.parent].append(path)
    except OSError as err:
        raise ReportError(f"{logdir}: cannot list the folder ({err.strerror or err})") from None
    if not found:
        raise ReportError(f"{logdir}: no TensorBoard event files ({EVENT_FILE_PATTERN}) nor {CSV_FILE} under it")
    return {folder: sorted(_run_files(files)) for folder, files in sorted(found.items())}


# ------------------------------------------------------------------------------ event files


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
    truncated = f"{path.name}: last record truncated (run still being written?)"
    while offset < len(data):
        if len(data) - offset < 12:
            return records, truncated, checked
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if masked_crc32c(header) != length_crc:
            what = "not a TensorBoard event file" if records == 0 else f"corrupted record #{records + 1}"
            raise ReportError(f"{path}: {what} (bad length checksum at byte {offset})")
        end = offset + 12 + length + 4
        if end > len(data):
            return records, truncated, checked
        if checked + length <= crc_budget:
            (data_crc,) = struct.unpack("<I", data[end - 4 : end])
            if masked_crc32c(data[offset + 12 : end - 4]) != data_crc:
                raise ReportError(f"{path}: corrupted record #{records + 1} (bad data checksum at byte {offset})")
            checked += length
        records, offset = records + 1, end
    return records, None, checked


def _check_event_files(run: Run) -> None:
    budget, records = _DATA_CRC_BUDGET, 0
    for file in run.files:
        count, note, checked = check_event_file(file, budget)
        budget, records = budget - checked, records + count
        if note:
            run.notes.append(note)
    if records == 0:
        raise ReportError(f"{run.path}: the event files hold no records (empty files)")


def _read_tensorboard(run: Run) -> list[tuple[int, str, str]]:
    """Fill ``run.scalars``; return the alert texts ``(step, tag, text)``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _check_event_files(run)
    sizes = {"scalars": 0, "tensors": 0, "histograms": 1, "images": 1, "audio": 1, "compressedHistograms": 1}
    source = str(run.files[0]) if len(run.files) == 1 else str(run.path)  # one file given: only that one
    accumulator = EventAccumulator(source, size_guidance=sizes, purge_orphaned_data=False)
    texts = []
    try:
        accumulator.Reload()
        tags = accumulator.Tags()
        for tag in tags.get("scalars", []):
            run.scalars[tag] = [(int(e.step), float(e.value)) for e in accumulator.Scalars(tag)]
        for tag in tags.get("tensors", []):
            name = tag.removesuffix("/text_summary")
            is_alerts = name.endswith("/alerts") or name.startswith("alerts/")
            if not is_alerts or accumulator.SummaryMetadata(tag).plugin_data.plugin_name != "text":
                continue
            for event in accumulator.Tensors(tag):
                texts += [(int(event.step), name, t.decode("utf-8", "replace")) for t in event.tensor_proto.string_val]
    except Exception as err:  # noqa: BLE001 -- anything TensorBoard raises on a bad file is bad input
        raise ReportError(f"{run.path}: cannot read the event files ({type(err).__name__}: {err})") from None
    return texts


# ---------------------------------------------------------------------------------------- CSV


def _read_csv(run: Run) -> None:
    """Fill ``run.scalars`` from CSVLogger's ``metrics.csv``: a ``step`` column, one per key, sparse cells."""
    (path,) = run.files
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ReportError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    if not rows or "step" not in rows[0]:
        raise ReportError(f"{path}: not a CSVLogger metrics file (no 'step' column in the header)")
    header, skipped = rows[0], 0
    scalars: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for number, row in enumerate(rows[1:], start=2):
        cells = dict(zip(header, row))
        try:
            step = int(float(cells.get("step", "")))
        except ValueError:
            skipped += 1
            continue
        for key, text in cells.items():
            if key != "step" and text != "":
                try:
                    scalars[key].append((step, float(text)))
                except ValueError:
                    skipped += 1
        if len(row) < len(header) and number == len(rows):
            run.notes.append(f"{path.name}: last row truncated (run still being written?)")
    if skipped:
        run.notes.append(f"{path.name}: {skipped} cell(s) or row(s) that are not numbers were skipped")
    run.scalars = dict(scalars)


# ------------------------------------------------------------------------------------- alerts


def parse_alert_text(text: str, tag: str, step: int) -> AlertRecord:
    """An alert from its TensorBoard text.

    ``"[warning] GradNormWatcher: grad_norm/zscore = 3.1 (above 2.5) at step 12"`` under
    ``grad_norm/alerts``; an old run's ``alerts/<Source>`` text has no ``[<severity>]``.

    Example:
        >>> a = parse_alert_text("[critical] LossSpikeDetector: loss_spike/loss = nan (non-finite) at step 7",
        ...                      "loss_spike/alerts", 7)
        >>> a.severity, a.source, a.metric, a.value
        ('critical', 'LossSpikeDetector', 'loss_spike/loss', nan)
        >>> old = parse_alert_text("GradNormWatcher: grad_norm/total = 9 (above 1) at step 3", "alerts/GradNormWatcher",
        ...                        3)
        >>> old.severity, old.source
        ('unknown', 'GradNormWatcher')
    """
    text = text.strip()
    severity, message = "unknown", text
    match = _TEXT.match(text)
    if match and match["severity"] in SEVERITIES:
        severity, message = match["severity"], match["message"].strip()
    fields = _MESSAGE.match(message)
    source = fields["source"] if fields else (tag.split("/", 1)[1] if tag.startswith("alerts/") else tag.split("/")[0])
    value = _number(_float_text(fields["value"])) if fields else None
    rule = _THRESHOLD.search(message)
    threshold = _number(_float_text(rule["threshold"])) if rule else None
    return AlertRecord(step, source, severity, message, fields["metric"] if fields else None, value,
                       threshold=threshold)


def _float_text(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _number(value: Any) -> float | None:
    """A JSON number, or a non-finite one written as a string (``"nan"``, ``"inf"``, ``"-inf"``); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(value)
    return None


def _alert_from_json(line: str) -> AlertRecord:
    """One line of the alerts file: strict JSON (non-finite numbers as strings) or, from older versions,
    Python's ``NaN``/``Infinity`` tokens, which ``json.loads`` accepts."""
    record: dict[str, Any] = json.loads(line)
    severity = record.get("severity")
    acted = _number(record.get("acted_step"))
    return AlertRecord(
        step=int(record["step"]),
        source=str(record["source"]),
        severity=severity if severity in SEVERITIES else "unknown",
        message=str(record.get("message") or f"{record['source']}: {record.get('metric')}"),
        metric=record.get("metric"),
        value=_number(record.get("value")),
        acted_step=int(acted) if acted is not None and math.isfinite(acted) else None,
        threshold=_number(record.get("threshold")),
    )


def _read_alerts_file(run: Run, path: Path) -> None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    bad = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            run.alerts.append(_alert_from_json(line))
        except (ValueError, KeyError, TypeError, AttributeError):
            bad.append(number)
    if bad == [len(lines)]:
        run.notes.append(f"{path.name}: last line incomplete (run still being written?)")
    elif bad:
        run.notes.append(f"{path.name}: {len(bad)} line(s) are not alert records (lines {', '.join(map(str, bad[:5]))}"
                         + (", ...)" if len(bad) > 5 else ")"))
    run.alerts_from = path.name


def _read_alerts(run: Run, texts: Sequence[tuple[int, str, str]]) -> None:
    path = run.path / ALERTS_FILE
    if path.is_file():
        _read_alerts_file(run, path)
    elif texts:
        run.alerts = [parse_alert_text(text, tag, step) for step, tag, text in texts]
        run.alerts_from = "TensorBoard texts"
    run.alerts.sort(key=lambda a: (a.step, a.source))


# -------------------------------------------------------------------------- resumed runs


def _first_last(run: Run) -> tuple[int, int] | None:
    steps = [s for series in run.scalars.values() for s, _ in series[:1] + series[-1:]]
    return (min(steps), max(steps)) if steps else None


def _logging_interval(run: Run) -> int:
    """The largest usual gap between logged steps: the median gap of the run's longest series."""
    longest = max(run.scalars.values(), key=len, default=[])
    gaps = sorted(b - a for (a, _), (b, _) in zip(longest, longest[1:]) if b > a)
    return gaps[len(gaps) // 2] if gaps else 1


def resume_step(earlier: Run, later: Run) -> int | None:
    """The step at which ``later`` resumes ``earlier`` from a checkpoint, or None.

    Lightning gives a resumed fit a new version folder whose steps go on from the checkpoint: the
    later run's first logged step lies inside the earlier run (or within two logging intervals of
    its end) and is far from 0, where a fresh run starts.
    """
    span, first = _first_last(earlier), _first_last(later)
    if span is None or first is None:
        return None
    gap = 2 * _logging_interval(earlier) + 1
    return first[0] if span[0] < first[0] <= span[1] + gap and first[0] > gap else None


def _version(run: Run) -> int | None:
    match = _VERSION.match(run.path.name)
    return int(match["n"]) if match else None


def _joined(earlier: Run, later: Run, step: int) -> Run:
    """One run: ``earlier`` up to ``step``, then ``later`` (which redid the steps from its checkpoint on)."""
    scalars = {k: [p for p in v if p[0] < step] for k, v in earlier.scalars.items()}
    for key, series in later.scalars.items():
        scalars[key] = scalars.get(key, []) + series
    seen = {(a.step, a.source, a.metric, a.message) for a in later.alerts}
    alerts = [a for a in earlier.alerts if a.step < step and (a.step, a.source, a.metric, a.message) not in seen]
    sources = [s for s in (earlier.alerts_from, later.alerts_from) if s]
    note = (f"{later.path.name} resumes {earlier.path.name} from a checkpoint at step {step}: read as one run "
            f"({earlier.path.name} up to step {step - 1}, then {later.path.name}; --no-join reads them apart)")
    return Run(path=later.path, name=f"{earlier.name}+{later.path.name}", files=earlier.files + later.files,
               format=earlier.format if earlier.format == later.format else f"{earlier.format}+{later.format}",
               scalars={k: v for k, v in scalars.items() if v}, alerts=sorted(alerts + later.alerts,
                                                                              key=lambda a: (a.step, a.source)),
               alerts_from=" and ".join(dict.fromkeys(sources)) or None,
               notes=[*earlier.notes, *later.notes, note])


def join_resumed(runs: Sequence[Run]) -> list[Run]:
    """Join each ``version_<n+1>`` that resumes ``version_<n>`` of the same folder (:func:`resume_step`).

    The alerts file of a resumed version holds only the alerts raised after the resume (the
    earlier ones are in the earlier version's file), so a report of the versions apart would show
    one run as two, the second without the warnings that came before its explosion.
    """
    out: list[Run] = []
    for run in sorted(runs, key=lambda r: (str(r.path.parent), _version(r) is None, _version(r) or 0, r.path.name)):
        previous = out[-1] if out else None
        if previous is not None and previous.path.parent == run.path.parent:
            numbers = _version(previous), _version(run)
            step = None
            if numbers[0] is not None and numbers[1] == numbers[0] + 1:
                step = resume_step(previous, run)
            if step is not None:
                out[-1] = _joined(previous, run, step)
                continue
        out.append(run)
    return out


def load_run(path: Path, files: Sequence[Path], name: str | None = None) -> Run:
    """Read one run folder: its scalars (event files or ``metrics.csv``) and its alerts."""
    files = list(files)
    is_csv = [f.name for f in files] == [CSV_FILE]
    run = Run(path=path, name=name or str(path), files=files, format="CSV" if is_csv else "TensorBoard")
    texts: list[tuple[int, str, str]] = []
    if is_csv:
        _read_csv(run)
    else:
        texts = _read_tensorboard(run)
        if (path / CSV_FILE).is_file():
            run.notes.append(f"{CSV_FILE} here too: the event files were read")
    _read_alerts(run, texts)
    return run
