"""The health summary of a run, and the little the report knows about figures, kept in one place.

What is per layer and what is model level comes from the key scheme (:func:`~lightning_diag.keys.split_key`:
3-part keys are per-layer figures, 2-part keys model-level ones); a family is a monitor's when the
run has its ``<family>/alerts`` count (every monitor logs one). The tables below only say how to
rank and what to draw first.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from lightning_diag.keys import split_key
from lightning_diag.report.reading import SEVERITIES, AlertRecord, Run

__all__ = [
    "HIGHER_IS_WORSE", "LOWER_IS_WORSE", "direction", "LayerRow", "LossSummary", "Summary", "count_phrase", "format_summary", "summarize",
    "summary_table",
]

# Per-layer figures with a direction: a lower value is worse, or a higher one. Any other per-layer
# figure (a spread such as spectral_alignment/std) has none: its layers are ranked by how far they moved.
LOWER_IS_WORSE = frozenset({"sign_diversity", "stable_rank"})
HIGHER_IS_WORSE = frozenset({"layer", "weight_norm", "grad_weight_ratio", "update_ratio", "collapse", "mean_abs",
                             "abs_mean", "sigma1", "attention_max", "lambda_max", "preconditioned_lambda_max",
                             "stability_ratio"})
# The training loss: LossSpikeDetector's, else the logger's own key (the first present wins).
LOSS_KEYS = ("loss_spike/loss", "train_loss", "train_loss_step", "train/loss", "loss", "training_loss")
EXPLOSION_PATIENCE = 10  # testbeds.explosion_step's default patience: logged values above the bar in a row
# Model-level figures drawn together, per family (each tuple one panel). A family not listed gets one
# panel of its model-level figures that are not counts. NCTracker's family is its prefix: found by `nc1`.
MODEL_PANELS: dict[str, tuple[tuple[str, ...], ...]] = {
    "loss_spike": (),  # its loss and EMA are the loss panel
    "grad_norm": (("total", "baseline"),),
    "spectral_alignment": (("mean_collapse", "frac_collapsed", "frac_flagged"),),
    "sharpness": (("lambda_max", "preconditioned_lambda_max"), ("stability_ratio",)),
    "logits": (("attention_max", "output_max", "log_z_max", "log_z_mean"),),
}
NC_FIGURES = ("nc1", "nc3", "nc4", "cdnv")
FALLBACK_FIGURES = 6  # model-level figures drawn, at most, for a family not listed above
OLD_ALERTS_FAMILY = "alerts"  # runs older than the key scheme: alerts/<Source> counts

Series = list[tuple[int, float]]


class LayerRow(NamedTuple):
    """A layer of a per-layer figure: its last and first finite values, and where it first went non-finite."""

    layer: str
    last: float  # the last finite value (NaN: none)
    first: float  # the first finite value (NaN: none)
    nonfinite_step: int | None = None


@dataclass(frozen=True)
class LossSummary:
    """The training loss of a run: figures over its finite values, the explosion and the first non-finite step.

    ``first`` and ``best`` are the first and the lowest *finite* losses (NaN when there is none),
    ``last`` the last value logged, finite or not, and ``last_finite`` the last finite one.
    """

    key: str
    first: float
    best: float
    last: float
    explosion_step: int | None  # explosion_step of the logged values, as a step
    nonfinite_step: int | None  # the first non-finite loss, logged or named by an alert
    last_finite: float = math.nan
    logged: int = 0  # values logged
    finite: int = 0  # of which finite

    @property
    def broke_at(self) -> int | None:
        """The step the run broke: the explosion, or the first non-finite loss, whichever is first."""
        steps = [s for s in (self.explosion_step, self.nonfinite_step) if s is not None]
        return min(steps) if steps else None

    @property
    def ended_nonfinite(self) -> bool:
        return not math.isfinite(self.last)

    @property
    def rise(self) -> float:
        """The last finite loss over the lowest (NaN without two finite values)."""
        return self.last_finite / self.best if self.finite > 1 and self.best > 0 else math.nan


@dataclass
class Summary:
    """The health summary of a run (see :func:`summarize`)."""

    run: Run
    alerts: list[AlertRecord]  # every record, every severity, by step
    families: list[str]  # monitor families present, in display order
    layer_figures: dict[str, dict[str, Series]]  # "family/figure" -> layer -> series
    worst_layers: dict[str, list[LayerRow]]  # "family/figure" -> worst first
    nc_trend: dict[str, dict[str, tuple[float, float]]]  # family -> figure -> (first, last) finite values
    loss: LossSummary | None
    steps: tuple[int, int] | None  # first and last step logged
    alert_counters: dict[str, float] = field(default_factory=dict)  # "<family>/alerts" -> last value

    def count(self, *severities: str) -> int:
        return sum(a.severity in severities for a in self.alerts)

    @property
    def serious(self) -> list[AlertRecord]:
        """Warning, critical and unknown-severity alerts: all but info records."""
        return [a for a in self.alerts if not a.is_info]

    def first_serious(self) -> dict[str, AlertRecord]:
        """The first non-info alert of each monitor, by monitor name."""
        first: dict[str, AlertRecord] = {}
        for alert in self.serious:
            first.setdefault(alert.source, alert)
        return first

    @property
    def broke_at(self) -> int | None:
        return self.loss.broke_at if self.loss else None

    def is_early(self, alert: AlertRecord) -> bool:
        """A warning before the run broke: strictly before the break, about a finite value (an alert
        on a NaN or inf reports the break itself, even when the log shows the NaN only later)."""
        broke = self.broke_at
        finite = alert.value is None or math.isfinite(alert.value)
        return broke is not None and alert.step < broke and finite and not alert.is_info

    def first_early(self) -> AlertRecord | None:
        """The first warning or critical alert that came before the break (None: no break, or none before)."""
        return next((a for a in self.serious if self.is_early(a)), None)


# ----------------------------------------------------------------------------------- figures


def _split(key: str) -> tuple[str, str, str | None] | None:
    try:
        return split_key(key)
    except ValueError:
        return None


def is_nc_family(scalars: dict[str, Series], family: str) -> bool:
    return f"{family}/nc1" in scalars


def monitor_families(scalars: dict[str, Series]) -> list[str]:
    """Families of lightning_diag monitors: with a ``<family>/alerts`` count, or known to the report."""
    present = {parts[0] for parts in map(_split, scalars) if parts}
    families = {f for f in present if f"{f}/alerts" in scalars or f in MODEL_PANELS or is_nc_family(scalars, f)}
    families.discard(OLD_ALERTS_FAMILY)
    order = list(MODEL_PANELS)
    return sorted(families, key=lambda f: (order.index(f) if f in order else len(order), f))


def _is_count(series: Series) -> bool:
    values = [v for _, v in series if math.isfinite(v)]
    return bool(values) and all(v >= 0 and v == int(v) for v in values)


def panel_groups(scalars: dict[str, Series], family: str) -> tuple[tuple[str, ...], ...]:
    """The model-level figures of ``family`` to draw, one tuple per panel (see :data:`MODEL_PANELS`)."""
    if is_nc_family(scalars, family):
        return (NC_FIGURES,)
    if family in MODEL_PANELS:
        return MODEL_PANELS[family]
    figures = []
    for key, series in scalars.items():
        parts = _split(key)
        if parts and parts[0] == family and parts[2] is None and parts[1] != "alerts" and not _is_count(series):
            figures.append(parts[1])
    return (tuple(sorted(figures)[:FALLBACK_FIGURES]),) if figures else ()


def layer_figures(scalars: dict[str, Series], families: list[str]) -> dict[str, dict[str, Series]]:
    """``"family/figure" -> {layer: series}`` for every 3-part key of a monitor family."""
    figures: dict[str, dict[str, Series]] = defaultdict(dict)
    for key, series in scalars.items():
        parts = _split(key)
        if parts and parts[2] is not None and parts[0] in families and series:
            figures[f"{parts[0]}/{parts[1]}"][parts[2]] = series
    rank = {f: i for i, f in enumerate(families)}
    return {k: dict(sorted(figures[k].items())) for k in sorted(figures, key=lambda k: (rank[k.split("/")[0]], k))}


def direction(figure: str) -> str:
    """``"higher"`` or ``"lower"`` (which is worse) for a per-layer figure, or ``"moved"`` when neither is."""
    name = figure.rsplit("/", 1)[-1]
    return "lower" if name in LOWER_IS_WORSE else "higher" if name in HIGHER_IS_WORSE else "moved"


def layer_row(layer: str, series: Series) -> LayerRow:
    finite = [v for _, v in series if math.isfinite(v)]
    broken = next((s for s, v in series if not math.isfinite(v)), None)
    return LayerRow(layer, finite[-1] if finite else math.nan, finite[0] if finite else math.nan, broken)


def _moved(row: LayerRow) -> float:
    """How far a layer moved from its first finite value: |log ratio| when both are positive, else the gap."""
    if row.first > 0 and row.last > 0:
        return abs(math.log(row.last / row.first))
    return abs(row.last - row.first) if math.isfinite(row.last - row.first) else -math.inf


def worst_first(figure: str, layers: dict[str, Series]) -> list[LayerRow]:
    """Layers ranked worst first: the earliest to go non-finite, then by their last finite value (lowest or
    highest first, see :func:`direction`; figures without a direction by how far they moved), ties by name.

    Ranking on finite values keeps the order meaningful when every layer ends NaN together.
    """
    way = direction(figure)

    def badness(row: LayerRow) -> float:
        if not math.isfinite(row.last):
            return -math.inf
        return -row.last if way == "lower" else row.last if way == "higher" else _moved(row)

    rows = [layer_row(layer, series) for layer, series in layers.items()]
    never = math.inf
    return sorted(rows, key=lambda r: (never if r.nonfinite_step is None else r.nonfinite_step, -badness(r), r.layer))


def loss_key(scalars: dict[str, Series]) -> str | None:
    return next((k for k in LOSS_KEYS if scalars.get(k)), None)


def summarize_loss(scalars: dict[str, Series], alerts: Sequence[AlertRecord] = ()) -> LossSummary | None:
    """The loss figures over its finite values, with the explosion step
    (:func:`~lightning_diag.testbeds.explosion_step`, the suite's definition, on the logged values: its 10
    steps are 10 logged values) and the first non-finite loss: logged, or named by an alert on the loss
    (LossSpikeDetector checks every step; the logger may see the NaN only at its next logging step)."""
    from lightning_diag.testbeds.labels import explosion_step  # torch: only when a run is read

    key = loss_key(scalars)
    if key is None:
        return None
    series = scalars[key]
    values = [v for _, v in series]
    finite = [v for v in values if math.isfinite(v)]
    index = explosion_step(values) if finite else None
    steps = [s for s, v in series if not math.isfinite(v)]
    steps += [a.step for a in alerts if a.metric in (key, LOSS_KEYS[0]) and a.value is not None
              and not math.isfinite(a.value)]  # fmt: skip
    explosion = series[index][0] if index is not None else None
    nan = math.nan
    return LossSummary(key, finite[0] if finite else nan, min(finite) if finite else nan, values[-1], explosion,
                       min(steps) if steps else None, finite[-1] if finite else nan, len(values), len(finite))


def _nc_trend(scalars: dict[str, Series], families: list[str]) -> dict[str, dict[str, tuple[float, float]]]:
    trend: dict[str, dict[str, tuple[float, float]]] = {}
    for family in families:
        if not is_nc_family(scalars, family):
            continue
        figures = {}
        for name in NC_FIGURES:
            finite = [v for _, v in scalars.get(f"{family}/{name}", []) if math.isfinite(v)]  # lagged NC4: NaN first
            if finite:
                figures[name] = (finite[0], finite[-1])
        trend[family] = figures
    return trend


def _alert_counters(scalars: dict[str, Series]) -> dict[str, float]:
    counters = {}
    for key, series in scalars.items():
        parts = _split(key)
        if series and parts and parts[2] is None and (parts[1] == "alerts" or parts[0] == OLD_ALERTS_FAMILY):
            counters[key] = series[-1][1]
    return dict(sorted(counters.items()))


def summarize(run: Run, top: int = 3) -> Summary:
    """The health summary of ``run``: alerts by severity, loss, worst layers, NC trend."""
    scalars = run.scalars
    families = monitor_families(scalars)
    layers = layer_figures(scalars, families)
    steps = [s for series in scalars.values() for s, _ in series[:1] + series[-1:]] + [a.step for a in run.alerts]
    return Summary(
        run=run,
        alerts=list(run.alerts),
        families=families,
        layer_figures=layers,
        worst_layers={figure: worst_first(figure, by_layer)[:top] for figure, by_layer in layers.items()},
        nc_trend=_nc_trend(scalars, families),
        loss=summarize_loss(scalars, run.alerts),
        steps=(min(steps), max(steps)) if steps else None,
        alert_counters=_alert_counters(scalars),
    )


# -------------------------------------------------------------------------------------- text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def count_phrase(summary: Summary) -> str:
    """What the alert counts count, in one line: ``"25 warning and critical alerts (...), 33 info records"``."""
    if summary.run.alerts_from is None:
        counted = int(sum(summary.alert_counters.values()))
        if counted:
            return (f"{_plural(counted, 'alert')} counted by the monitors' alerts figures; their texts and "
                    f"severities are not in this log (no lightning_diag_alerts.jsonl)")
        return "no alerts" if summary.families else "no lightning_diag monitor logged to this run"
    if not summary.alerts:
        return "no alerts"
    critical, warning, info, unknown = (summary.count(s) for s in ("critical", "warning", "info", "unknown"))
    parts = []
    if critical + warning or not unknown:  # an old run's texts are all of unknown severity: say only that
        parts.append(f"{critical + warning} warning and critical alert{'' if critical + warning == 1 else 's'}"
                     f" ({warning} warning, {critical} critical)")
    if unknown:
        parts.append(f"{_plural(unknown, 'alert')} of unknown severity (texts of a run older than severities)")
    if info or not unknown:
        parts.append(_plural(info, "info record"))
    return ", ".join(parts)


def _by_monitor(alerts: list[AlertRecord]) -> list[str]:
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for alert in alerts:
        counts[alert.source][alert.severity] += 1
    width = max(map(len, counts), default=0)
    return [f"  {source:<{width}}  " + ", ".join(f"{c[s]} {s}" for s in SEVERITIES if c[s])
            for source, c in sorted(counts.items())]


def _g(value: float) -> str:
    return f"{value:.4g}"


def _loss_line(loss: LossSummary) -> str:
    """The loss in one line, over its finite values, saying how the run ended."""
    line = f"Loss ({loss.key}): "
    if loss.finite == 0:
        line += f"no finite value in {_plural(loss.logged, 'logged value')}"
    else:
        line += f"first {_g(loss.first)}, min {_g(loss.best)}, last "
        line += (f"{_g(loss.last)}" if not loss.ended_nonfinite
                 else f"{loss.last} (last finite {_g(loss.last_finite)}): the run ended non-finite")
    if loss.explosion_step is not None:
        line += (f"; explosion at step {loss.explosion_step} (from there {EXPLOSION_PATIENCE} logged losses in a row "
                 "gave back at least half the progress and stood 1.5x above the best, or were non-finite)")
    if loss.nonfinite_step is not None:
        line += f"; first non-finite loss at step {loss.nonfinite_step}"
    if loss.broke_at is None:
        line += "; no explosion"
        if loss.rise > 1.5:  # the definition needs 10 logged values above the bar: a short run may not have them
            line += (f", but the last loss is {loss.rise:.3g}x the minimum (an explosion needs {EXPLOSION_PATIENCE} "
                     "logged losses in a row half-way back to the first and 1.5x above the best; this run logged "
                     f"{_plural(loss.logged, 'value')})")
    return line


def verdict(summary: Summary, counts: bool = True) -> list[str]:
    """The first lines of a report: did the run break, where, and which monitor warned first, how early."""
    loss, broke = summary.loss, summary.broke_at
    if loss is None:
        lines = ["No training loss logged: no verdict on an explosion."]
    elif broke is None:
        lines = ["No explosion" + (f" (but the loss ended {loss.rise:.3g}x its minimum)." if loss.rise > 1.5 else ".")]
    else:
        how = []
        if loss.explosion_step is not None:
            how.append(f"exploded at step {loss.explosion_step}")
        if loss.nonfinite_step is not None:
            how.append(f"turned non-finite at step {loss.nonfinite_step}")
        lines = ["The loss " + " and ".join(how) + ("; the run ended non-finite." if loss.ended_nonfinite else ".")]
    early = summary.first_early()
    if broke is not None:
        if early is not None:
            lines.append(f"First warning: {early.source} ({early.severity}, {early.metric or 'alert'}) at step "
                         f"{early.step}, {broke - early.step} steps before the break at step {broke}.")
        else:
            late = summary.serious[0] if summary.serious else None
            after = (f" (first: {late.source} at step {late.step}, {late.step - broke} steps after)"
                     if late is not None and late.step >= broke else "")
            lines.append(f"No monitor warned before the break at step {broke}{after}.")
    elif summary.serious:
        first = summary.serious[0]
        lines.append(f"First warning: {first.source} ({first.severity}, {first.metric or 'alert'}) at step {first.step}.")
    if counts:
        lines.append(count_phrase(summary)[:1].upper() + count_phrase(summary)[1:] + ".")
    return lines


def _timeline(summary: Summary, limit: int | None, show_info: bool) -> list[str]:
    shown = summary.alerts if show_info else summary.serious
    if not shown:
        return []
    what = "every alert" if show_info else "all but info records"
    hidden = "" if show_info or not summary.count("info") else ", which --show-info lists"
    lines = [f"Alerts timeline ({what}{hidden}):"]
    listed = shown if limit is None else shown[:limit]
    lines += [f"  step {a.step:>7}  {a.severity:<8}  {a.message}" for a in listed]
    if len(shown) > len(listed):
        lines.append(f"  ... {len(shown) - len(listed)} more not listed here (the HTML report lists every alert)")
    return lines


def _first_alerts(summary: Summary) -> list[str]:
    first = summary.first_serious()
    if not first:
        return []
    broke = summary.broke_at
    head = "First warning or critical alert per monitor"
    lines = [head + (f" (lead over the break at step {broke}):" if broke is not None else ":")]
    width = max(map(len, first))
    for source, alert in sorted(first.items(), key=lambda kv: kv[1].step):
        lead = ""
        if broke is not None:
            lead = (f" ({broke - alert.step} steps before)" if summary.is_early(alert) else
                    " (at the break, not an early warning)" if alert.step <= broke else
                    f" ({alert.step - broke} steps after)")
        message = alert.message.removeprefix(f"{source}: ")
        lines.append(f"  {source:<{width}}  step {alert.step} {alert.severity}{lead}: {message}")
    return lines


def _layer_cell(row: LayerRow) -> str:
    """``"blocks.0.fc 4.2 (from 1.4)"``: the last finite value and the first; when it broke."""
    if not math.isfinite(row.last):
        return f"{row.layer} never finite"
    cell = f"{row.layer} {row.last:.3g} (from {row.first:.3g}"
    return cell + (f", non-finite from step {row.nonfinite_step})" if row.nonfinite_step is not None else ")")


def _worst_lines(summary: Summary) -> list[str]:
    if not summary.worst_layers:
        return []
    lines = ["Worst layers (last finite value, from the first; higher is worse, except lower for "
             f"{', '.join(sorted(LOWER_IS_WORSE))}; figures without a direction: the layers that moved most):"]
    width = max(map(len, summary.worst_layers))
    for figure, rows in summary.worst_layers.items():
        way = {"higher": "", "lower": " [lower is worse]", "moved": " [moved most]"}[direction(figure)]
        lines.append(f"  {figure:<{width}}  {', '.join(map(_layer_cell, rows))}{way}")
    return lines


def _trend(first: float, last: float) -> str:
    if not (math.isfinite(first) and math.isfinite(last)):
        return "non-finite"
    if math.isclose(first, last, rel_tol=1e-9, abs_tol=1e-12):
        return "flat"
    word = "falling" if last < first else "rising"
    return f"{word} (x{last / first:.3g})" if first and last / first > 0 else word


def format_summary(summary: Summary, timeline: int | None = 20, show_info: bool = False) -> str:
    """The summary as plain text, as the command prints it.

    Args:
        summary: what :func:`summarize` returned.
        timeline: alerts listed at most (``None``: all; 0: no timeline).
        show_info: list info records in the timeline too.
    """
    run = summary.run
    steps = f"steps {summary.steps[0]}-{summary.steps[1]}" if summary.steps else "no steps"
    files = _plural(len(run.files), "event file") if run.format == "TensorBoard" else "metrics.csv"
    lines = [f"== {run.name}  ({run.format}, {files}; {steps})"]
    lines += [f"   {line}" for line in verdict(summary, counts=False)]
    lines += [f"   note: {n}" for n in run.notes]
    source = f", from {run.alerts_from}" if run.alerts_from else ""
    lines.append(f"Health: {count_phrase(summary)}{source}")
    lines += _by_monitor(summary.alerts)
    counted = int(sum(summary.alert_counters.values()))
    if run.alerts_from and counted != len(summary.alerts):
        lines.append(f"   note: the monitors' alerts figures last logged {counted} in all, "
                     f"{len(summary.alerts)} alert records were read")
    if summary.loss is not None:
        lines.append(_loss_line(summary.loss))
    if timeline != 0:
        lines += _timeline(summary, timeline, show_info)
    lines += _first_alerts(summary)
    lines += _worst_lines(summary)
    for family, figures in summary.nc_trend.items():
        cells = ", ".join(f"{k} {a:.3g} -> {b:.3g} {_trend(a, b)}" for k, (a, b) in figures.items())
        lines.append(f"Neural collapse ({family}): {cells or 'no finite values'}")
    return "\n".join(lines)


SUMMARY_COLUMNS = ("run", "log", "steps", "loss first \u2192 last", "broke at", "warning + critical", "info",
                   "first warning or critical")
SUMMARY_NOTE = ("warning + critical: the alerts the monitors act on; info: records they keep but never act on; "
                "broke at: the loss explosion or first non-finite loss, whichever came first")


def _serious_cell(s: Summary) -> str:
    unknown = s.count("unknown")
    return f"{s.count('warning', 'critical')}" + (f" (+{unknown} unknown)" if unknown else "")


def summary_table(summaries: list[Summary]) -> list[tuple[str, ...]]:
    """One row per run (columns :data:`SUMMARY_COLUMNS`): the multi-run summary of the HTML and PDF."""
    rows = []
    for s in summaries:
        loss = f"{s.loss.first:.3g} \u2192 {s.loss.last_finite:.3g}" if s.loss and s.loss.finite else "-"
        if s.loss and s.loss.ended_nonfinite:
            loss += f" \u2192 {s.loss.last}"
        broke = "-"
        if s.loss and s.loss.broke_at is not None:
            broke = f"step {s.loss.broke_at}" + (" (non-finite)" if s.loss.broke_at == s.loss.nonfinite_step else "")
        first = s.first_early() or min(s.first_serious().values(), key=lambda a: a.step, default=None)
        known = s.run.alerts_from is not None
        rows.append((
            s.run.name, s.run.format, f"{s.steps[0]}-{s.steps[1]}" if s.steps else "-", loss, broke,
            _serious_cell(s) if known else "?", str(s.count("info")) if known else "?",
            (f"step {first.step}, {first.source}" + (f" ({s.broke_at - first.step} before)" if s.is_early(first)
                                                     else "")) if first else "none",
        ))
    return rows
