"""`lightning-diag report`: TensorBoard and CSV runs, severities, PDF/PNG/HTML output and refusals.

The runs are synthetic (tests/report_runs.py): figures of the key scheme written by Lightning's own
TensorBoardLogger and CSVLogger, and the alerts file the monitors append to; no training.
"""

from __future__ import annotations

import json
import math
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from report_runs import alert, exploding_run, small_run, write_csv, write_tensorboard

from lightning_diag.cli import main as cli_main
from lightning_diag.report import count_phrase, format_summary, main, render, report
from lightning_diag.report.reading import parse_alert_text
from lightning_diag.testbeds import divergence_step

ERROR = "lightning-diag report: error: "


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same exploding run (NaN loss from step 50) as TensorBoard and CSV logs, plus variants."""
    root = tmp_path_factory.mktemp("logs")
    figures, alerts = exploding_run(steps=60, explode_at=40, nonfinite_at=50)
    return {
        "root": root,
        "tb": write_tensorboard(root / "both", "tb", figures, alerts),
        "csv": write_csv(root / "both", "csv", figures, alerts),
        "tb_texts": write_tensorboard(root, "texts", figures, alerts, jsonl=False, texts="new"),
        "tb_old": write_tensorboard(root, "old", figures, alerts, jsonl=False, texts="old"),
        "csv_bare": write_csv(root, "bare", figures, alerts, jsonl=False),
    }


def _summary(path: Path):  # noqa: ANN202
    _, (summary,) = report(path)
    return summary


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # the IHDR chunk: width, height


# ------------------------------------------------------------------------------------ reading


def test_csv_and_tensorboard_logs_of_the_same_figures_give_the_same_report(runs: dict[str, Path]) -> None:
    tb, csv = _summary(runs["tb"]), _summary(runs["csv"])
    assert csv.run.format == "CSV" and tb.run.format == "TensorBoard"
    assert (tb.run.name, csv.run.name) == ("tb/version_0", "csv/version_0")  # a run given alone: two folders
    assert set(csv.run.scalars) - {"epoch"} == set(tb.run.scalars) - {"epoch"}
    for key, series in tb.run.scalars.items():
        if key == "epoch":
            continue
        other = csv.run.scalars[key]  # two CSV rows per step (two log_metrics calls): still one value each
        assert [s for s, _ in other] == [s for s, _ in series], key
        for (_, a), (_, b) in zip(series, other):
            assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-6), key
    assert format_summary(tb).splitlines()[1:] == format_summary(csv).splitlines()[1:]  # all but the header
    for loss in (tb.loss, csv.loss):
        assert (loss.explosion_step, loss.nonfinite_step) == (40, 50) and math.isnan(loss.last)
    assert tb.loss.best == pytest.approx(csv.loss.best, rel=1e-6)
    for figure, rows in tb.worst_layers.items():
        assert [r.layer for r in rows] == [r.layer for r in csv.worst_layers[figure]]
        assert [r.last for r in rows] == pytest.approx([r.last for r in csv.worst_layers[figure]], rel=1e-6, abs=1e-9)


def test_layer_and_model_level_figures_come_from_the_key_depth(runs: dict[str, Path]) -> None:
    summary = _summary(runs["tb"])
    assert list(summary.layer_figures) == [
        "grad_norm/layer", "grad_norm/weight_norm", "spectral_alignment/sign_diversity",
        "spectral_alignment/stable_rank"]
    assert summary.families == ["loss_spike", "grad_norm", "spectral_alignment"]
    assert len(summary.layer_figures["grad_norm/layer"]) == 5
    # higher is worse: the head's gradient is the largest; sign diversity: lower is worse
    assert summary.worst_layers["grad_norm/layer"][0].layer == "head"
    diversity = summary.worst_layers["spectral_alignment/sign_diversity"]
    assert diversity[0].last == pytest.approx(0.0, abs=1e-6) and diversity[-1].last >= diversity[0].last
    assert summary.worst_layers["spectral_alignment/stable_rank"][0].layer == "head"  # the lowest


def test_a_non_finite_last_value_is_the_worst_layer() -> None:
    from lightning_diag.report.summary import worst_first

    layers = {"a": [(0, 1.0), (1, 5.0)], "b": [(0, 1.0), (1, math.nan)], "c": [(0, 1.0), (1, 0.5)]}
    assert [r.layer for r in worst_first("grad_norm/layer", layers)] == ["b", "a", "c"]
    assert [r.layer for r in worst_first("spectral_alignment/stable_rank", layers)] == ["b", "c", "a"]


def test_model_level_panels_of_a_family_the_report_does_not_know() -> None:
    from lightning_diag.report.summary import monitor_families, panel_groups

    series = [(0, 0.5), (1, 0.7)]
    scalars = {"my_monitor/score": series, "my_monitor/margin": series, "my_monitor/events": [(0, 0.0), (1, 2.0)],
               "my_monitor/alerts": [(0, 0.0)], "my_monitor/score/fc1": series, "train/acc": series,
               "grad_norm/total": series, "nc7/nc1": series}
    assert monitor_families(scalars) == ["grad_norm", "my_monitor", "nc7"]  # train/ logs no alerts count
    assert panel_groups(scalars, "my_monitor") == (("margin", "score"),)  # counts and per-layer keys left out
    assert panel_groups(scalars, "nc7") == (("nc1", "nc3", "nc4", "cdnv"),)  # NCTracker under any prefix
    assert panel_groups(scalars, "grad_norm") == (("total", "baseline"),)


# ------------------------------------------------------------------------------------- alerts


def test_alerts_file_gives_severities_and_counts_say_what_they_count(runs: dict[str, Path]) -> None:
    summary = _summary(runs["tb"])
    assert summary.run.alerts_from == "lightning_diag_alerts.jsonl"
    assert [a.severity for a in summary.alerts] == ["info", "info", "warning", "warning", "critical"]
    assert summary.alerts[-1].acted_step == summary.alerts[-1].step + 1
    assert count_phrase(summary) == "3 warning and critical alerts (2 warning, 1 critical), 2 info records"
    text = format_summary(summary)
    assert "GradNormWatcher           1 warning, 2 info" in text
    assert "grad_norm/zscore = 2.7" not in text  # info records are left out of the printed timeline...
    assert "grad_norm/zscore = 2.7" in format_summary(summary, show_info=True)  # ...unless asked for


def test_tensorboard_texts_give_the_same_alerts_when_the_file_is_missing(runs: dict[str, Path]) -> None:
    from_file, from_texts = _summary(runs["tb"]), _summary(runs["tb_texts"])
    assert from_texts.run.alerts_from == "TensorBoard texts"
    key = lambda a: (a.step, a.source, a.severity, a.metric, a.message)  # noqa: E731
    assert [key(a) for a in from_texts.alerts] == [key(a) for a in from_file.alerts]
    for a, b in zip(from_texts.alerts, from_file.alerts):
        assert a.value == pytest.approx(b.value, rel=1e-3)


def test_old_runs_alert_texts_have_unknown_severity(runs: dict[str, Path]) -> None:
    summary = _summary(runs["tb_old"])
    assert {a.severity for a in summary.alerts} == {"unknown"} and len(summary.alerts) == 5
    assert count_phrase(summary) == "5 alerts of unknown severity (texts of a run older than severities)"
    assert len(summary.serious) == 5  # not info: listed, drawn and counted by --fail-on-alert


def test_a_csv_run_without_the_alerts_file_says_its_alerts_were_only_counted(runs: dict[str, Path]) -> None:
    summary = _summary(runs["csv_bare"])
    assert summary.run.alerts_from is None and summary.alerts == []
    assert count_phrase(summary).startswith("5 alerts counted by the monitors' alerts figures")


@pytest.mark.parametrize(
    ("text", "tag", "expected"),
    [
        ("[warning] GradNormWatcher: grad_norm/zscore = 3.1 (above 2.5) at step 12", "grad_norm/alerts",
         ("warning", "GradNormWatcher", "grad_norm/zscore", 3.1)),
        ("[info] NCTracker: nc/nc1 = 0.5 (below 1) at step 3", "nc/alerts", ("info", "NCTracker", "nc/nc1", 0.5)),
        ("[critical] LossSpikeDetector: loss_spike/loss = inf (non-finite) at step 7", "loss_spike/alerts",
         ("critical", "LossSpikeDetector", "loss_spike/loss", math.inf)),
        ("GradNormWatcher: grad_norm/total = 9 (above 1) at step 3", "alerts/GradNormWatcher",
         ("unknown", "GradNormWatcher", "grad_norm/total", 9.0)),
        ("[loud] something odd", "alerts/Custom", ("unknown", "Custom", None, None)),
    ],
)
def test_alert_texts_are_parsed_with_their_severity(text: str, tag: str, expected: tuple) -> None:
    parsed = parse_alert_text(text, tag, 3)
    assert (parsed.severity, parsed.source, parsed.metric) == expected[:3]
    if expected[3] is None:
        assert parsed.value is None
    else:
        assert parsed.value == pytest.approx(expected[3])


def test_a_truncated_last_line_of_the_alerts_file_is_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures, alerts = exploding_run(steps=20, explode_at=30)
    run = write_csv(tmp_path, "live", figures, alerts[:2])
    with open(run / "lightning_diag_alerts.jsonl", "a") as handle:
        handle.write('{"source": "GradNormWatcher", "ste')
    assert main([str(run), "--no-output"]) == 0
    out = capsys.readouterr().out
    assert "last line incomplete" in out and "2 info records" in out


# ----------------------------------------------------------------------------------- the loss


def test_non_finite_loss_run_is_marked_where_it_broke(runs: dict[str, Path]) -> None:
    summary = _summary(runs["csv"])
    losses = [v for _, v in summary.run.scalars["loss_spike/loss"]]
    assert summary.loss.nonfinite_step == 50
    assert summary.loss.explosion_step == divergence_step(losses, 3.0, 10) == 40  # one value per step here
    text = format_summary(summary)
    assert "explosion at step 40" in text and "first non-finite loss at step 50" in text
    plt = render.require_pyplot("PNG")
    figure = render.run_figure(plt, summary, render.monitor_colors([summary]))
    try:
        loss_ax = next(ax for ax in figure.axes if ax.get_title(loc="left").startswith("Training loss"))
        marks = {line.get_xdata()[0] for line in loss_ax.get_lines() if list(line.get_xdata()) in ([40, 40], [50, 50])}
        assert marks == {40, 50}
        assert loss_ax.get_yscale() == "log"
        for ax in figure.axes[1:]:  # NaN never blanks an axis, and every panel shares the step range
            assert all(math.isfinite(v) for v in (*ax.get_ylim(), *ax.get_xlim()))
            assert ax.get_xlim() == pytest.approx(loss_ax.get_xlim())
        assert loss_ax.get_xlim()[0] <= 0 and 50 < loss_ax.get_xlim()[1] < 59  # NaN to the end: cut after it
    finally:
        plt.close(figure)


def test_the_loggers_own_loss_key_is_used_and_sparse_steps_map_back(tmp_path: Path) -> None:
    values = [2.0, 1.5, 1.0, 1.0, 1.1, 1.0, *[9.0] * 12]
    figures = {5 * i: {"train_loss": v, "grad_norm/total": 1.0, "grad_norm/alerts": 0.0} for i, v in enumerate(values)}
    summary = _summary(write_csv(tmp_path, "sparse", figures, []))
    assert summary.loss.key == "train_loss" and summary.loss.nonfinite_step is None
    assert summary.loss.explosion_step == 5 * divergence_step(values, 3.0, 10) == 30
    assert count_phrase(summary) == "no alerts"


def test_info_records_are_hidden_from_the_picture_unless_shown(tmp_path: Path) -> None:
    alerts = [alert(3, "GradNormWatcher", "grad_norm/zscore", 2.7, "info"),
              alert(9, "GradNormWatcher", "grad_norm/total", 5.0, "warning"),
              alert(20, "LossSpikeDetector", "loss_spike/loss", 9.0, "critical")]
    summary = _summary(write_csv(tmp_path, "a", small_run(), alerts))
    plt = render.require_pyplot("PNG")
    drawn = {}
    for show_info in (False, True):
        figure = render.run_figure(plt, summary, render.monitor_colors([summary]), show_info=show_info)
        strip = next(ax for ax in figure.axes if ax.get_title(loc="left").startswith("Alerts by monitor"))
        drawn[show_info] = sorted(round(x) for c in strip.collections for x, _ in c.get_offsets())
        assert ("1 info records hidden" in strip.get_title(loc="left")) is not show_info
        plt.close(figure)
    assert drawn == {False: [9, 20], True: [3, 9, 20]}


def test_a_run_without_a_loss_starts_with_its_alerts_not_an_empty_panel(tmp_path: Path) -> None:
    figures = {s: {"nc/nc1": 1.0 / (s + 1), "nc/cdnv": 0.5, "nc/alerts": 0.0} for s in range(5)}
    summary = _summary(write_csv(tmp_path, "nc_only", figures, []))
    assert summary.loss is None and summary.families == ["nc"] and count_phrase(summary) == "no alerts"
    plt = render.require_pyplot("PNG")
    figure = render.run_figure(plt, summary, {})
    (details,) = render.detail_figures(plt, summary, {})
    try:
        titles = [ax.get_title(loc="left") for ax in figure.axes[1:]]  # after the verdict's text
        assert titles == ["Alerts by monitor (first of each labelled with its step)"]
        assert [ax.get_title(loc="left") for ax in details.axes] == ["nc: nc1, cdnv"]
    finally:
        plt.close(figure)
        plt.close(details)


# ------------------------------------------------------------------------------------- output


def _pdf_pages(data: bytes) -> tuple[list[tuple[float, float]], list[str]]:
    """Each page's size in points, and the text of each content stream in file order (matplotlib writes
    the pages in order; with TrueType fonts each glyph is a 2-byte string of its character code)."""
    sizes = [(float(w), float(h)) for w, h in re.findall(rb"/MediaBox\s*\[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", data)]
    texts = []
    for stream in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", data, re.S):
        try:
            content = zlib.decompress(stream)
        except zlib.error:
            continue
        if b"BT" in content:
            texts.append(b"".join(re.findall(rb"\(((?:[^()\\]|\\.)*)\)", content)).replace(b"\x00", b"").decode("latin-1"))
    return sizes, texts


def test_pdf_is_a4_starts_with_the_summary_text_then_each_runs_pages(tmp_path: Path) -> None:
    pages = re.compile(rb"/Type\s*/Page\b")
    figures, alerts = exploding_run(steps=60, explode_at=40, nonfinite_at=50)
    one_run = write_csv(tmp_path / "logs", "a", figures, alerts)
    two_runs = tmp_path / "logs"
    write_tensorboard(two_runs, "b", small_run(), [])
    assert main([str(one_run), "-o", str(tmp_path / "one.pdf")]) == 0
    assert main([str(two_runs), "-o", str(tmp_path / "two.pdf")]) == 0
    one, two = (tmp_path / "one.pdf").read_bytes(), (tmp_path / "two.pdf").read_bytes()
    assert one[:5] == b"%PDF-" and two[:5] == b"%PDF-"
    plt = render.require_pyplot("PDF")
    run_pages = {}
    for name in ("a", "b"):
        summary = _summary(tmp_path / "logs" / name / "version_0")
        run_pages[name] = len(render.text_figures(plt, summary)) + 1 + len(render.detail_figures(plt, summary, {}))
        plt.close("all")
    assert run_pages["a"] >= 3  # text, first page, detail pages
    assert len(pages.findall(one)) == run_pages["a"]
    assert len(pages.findall(two)) == 1 + run_pages["a"] + run_pages["b"]  # summary table first
    sizes, texts = _pdf_pages(one)
    assert sizes and all(size == pytest.approx((595.44, 841.68), abs=1.0) for size in sizes)  # A4 portrait
    assert "health report" in texts[0] and "The loss exploded at step 40" in texts[0]  # page 1: real text
    assert "First warning: SpectralAlignmentMonitor" in texts[0]
    sizes, texts = _pdf_pages(two)
    assert sizes[0] == pytest.approx((841.68, 595.44), abs=1.0) and "2 runs" in texts[0]  # the table, landscape


def test_png_of_several_runs_is_a_summary_and_one_png_per_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_csv(tmp_path / "logs", "csv", small_run(), [])
    write_tensorboard(tmp_path / "logs", "tb", small_run(), [])
    output = tmp_path / "out" / "r.png"
    output.parent.mkdir()
    assert main([str(tmp_path / "logs"), "-o", str(output)]) == 0
    written = sorted(p.name for p in output.parent.iterdir())
    assert written == ["r-csv_version_0.png", "r-tb_version_0.png", "r.png"]
    assert "r-tb_version_0.png" in capsys.readouterr().out
    for path in output.parent.iterdir():
        width, height = _png_size(path.read_bytes())
        assert width < 2000 and height < 4000, (path.name, width, height)  # never one giant image


def test_html_lists_every_alert_and_links_one_section_per_run(tmp_path: Path) -> None:
    figures = small_run(60)
    many = [alert(s, "GradNormWatcher", "grad_norm/zscore", 2.0 + s / 100, "info" if s % 3 else "warning")
            for s in range(60)]
    write_csv(tmp_path / "logs", "a", figures, many)
    write_tensorboard(tmp_path / "logs", "b", figures, many[:3])
    text, _ = report(tmp_path / "logs", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    for a in many:
        assert json.dumps(a["message"])[1:-1] in page
    assert page.count("<tr class='info'>") == 40 + 2 and "more not listed" not in page
    # info rows folded away (closed <details>, with their count); the verdict text before any picture
    assert "<details open" not in page and "40 info records (recorded, never acted on)</summary>" in page
    for section in page.split("<h2 id='run-")[1:]:
        folded = section.split("<details>", 1)
        assert "<tr class='info'>" not in folded[0] and "<tr class='info'>" in folded[1]
        assert section.index("class='verdict'") < section.index("data:image/png") < section.index("<pre>")
    assert "white-space:pre-wrap" in page
    assert "href='#run-0'" in page and "id='run-1'" in page and page.count(": first page' src='data:image/png;base64,") == 2
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert text.count("  warning   GradNormWatcher") == 20 + 1 and "more not listed" not in text  # a: 20, b: 1


def test_terminal_timeline_truncates_and_says_how_many_are_left_out(tmp_path: Path) -> None:
    many = [alert(s, "GradNormWatcher", "grad_norm/total", 5.0, "warning") for s in range(25)]
    run = write_csv(tmp_path, "a", {0: {"grad_norm/total": 1.0, "grad_norm/alerts": 25.0}}, many)
    text = format_summary(_summary(run))
    assert "... 5 more not listed here (the HTML report lists every alert)" in text
    assert format_summary(_summary(run), timeline=None).count("  warning  ") == 25


def test_default_output_is_html_in_the_log_folder(tmp_path: Path) -> None:
    run = write_csv(tmp_path, "copy", small_run(), [])
    assert main([str(run)]) == 0
    assert (run / "health_report.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.parametrize("name", ["r.txt", "r.pdff", "report"])
def test_an_unknown_suffix_is_refused_in_one_line(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    assert main([str(runs["tb"]), "-o", str(tmp_path / name)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert captured.err.startswith(ERROR) and "use .html, .pdf or .png" in captured.err
    assert list(tmp_path.iterdir()) == []


def test_png_and_pdf_without_matplotlib_are_refused_html_has_no_plots(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(render, "import_pyplot", lambda: None)
    for suffix in ("pdf", "png"):
        assert main([str(runs["tb"]), "-o", str(tmp_path / f"r.{suffix}")]) == 2
        err = capsys.readouterr().err.strip()
        needs = f"a {suffix.upper()} report needs matplotlib (pip install matplotlib); write an .html report instead"
        assert err == ERROR + needs
    assert list(tmp_path.iterdir()) == []
    assert main([str(runs["tb"]), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "matplotlib is not installed" in page and "data:image/png" not in page and "grad_norm/total = 3.5" in page


def test_fail_on_alert_ignores_info_records_and_the_console_entry_dispatches(tmp_path: Path) -> None:
    figures, alerts = exploding_run(steps=10, explode_at=20)
    info_only = write_csv(tmp_path, "info", figures, [a for a in alerts if a["severity"] == "info"])
    warned = write_csv(tmp_path, "warned", figures, alerts)
    assert cli_main(["report", str(info_only), "--no-output", "--fail-on-alert"]) == 0
    assert cli_main(["report", str(warned), "--no-output", "--fail-on-alert"]) == 1
    assert cli_main(["report", str(warned), "--no-output"]) == 0


# --------------------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path: Path, good_event_file: Path) -> dict[str, tuple[Path, str]]:
    data = good_event_file.read_bytes()
    cases = {
        "missing": (tmp_path / "nope", "no such file or directory"),
        "no logs": (tmp_path / "empty", "no TensorBoard event files"),
        "garbage": (tmp_path / "garbage", "not a TensorBoard event file"),
        "flipped byte": (tmp_path / "flipped", "corrupted record"),
        "empty file": (tmp_path / "zero", "hold no records"),
        "csv without step": (tmp_path / "csv", "no 'step' column"),
        "other file": (tmp_path / "empty" / "notes.txt", "not a TensorBoard event file"),
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    blobs = {"garbage": b"not an event file" * 20, "flipped": data[:300] + bytes([data[300] ^ 0xFF]) + data[301:],
             "zero": b""}
    for folder, blob in blobs.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "events.out.tfevents.0.host.0.0").write_bytes(blob)
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("epoch,loss\n0,1.0\n")
    return cases


def test_bad_input_gets_one_line_error_and_exit_2(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (event_file,) = runs["tb"].glob("events.out.tfevents.*")
    for case, (path, expected) in _bad_inputs(tmp_path, event_file).items():
        assert main([str(path), "--no-output"]) == 2, case
        captured = capsys.readouterr()
        assert captured.out == "", case
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in captured.err, (case, captured.err)
        assert lines[0].startswith(ERROR)


def test_unwritable_output_is_bad_input(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(runs["tb"]), "-o", str(tmp_path / "no" / "such" / "dir" / "r.html")]) == 2
    assert "cannot write the report" in capsys.readouterr().err


def test_truncated_last_record_is_a_note_not_an_error(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (event_file,) = runs["tb"].glob("events.out.tfevents.*")
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "events.out.tfevents.0.host.0.0").write_bytes(event_file.read_bytes()[:-7])
    assert main([str(tmp_path / "live"), "--no-output"]) == 0
    assert "last record truncated" in capsys.readouterr().out


# ------------------------------------------------------------------ one true story (the issue)


def _loss_text(scalars: dict, alerts: list | None = None):  # noqa: ANN202
    from lightning_diag.report.reading import Run
    from lightning_diag.report.summary import summarize

    run = Run(Path("r"), "r", [], "CSV", scalars=scalars, alerts=alerts or [], alerts_from="test")
    summary = summarize(run)
    return summary, format_summary(summary)


def test_loss_summary_of_a_short_run_that_rose_does_not_just_say_no_explosion() -> None:
    summary, text = _loss_text({"loss_spike/loss": [(0, 147.9), (1, 3.0e3), (2, 5.858e6)]})
    assert summary.loss.broke_at is None  # too few logged values for explosion_step...
    assert summary.loss.rise == pytest.approx(5.858e6 / 147.9, rel=1e-9)
    assert "but the last loss is 3.96e+04x the minimum" in text  # ...and the summary says what happened


def test_loss_summary_is_over_finite_values_and_says_when_the_run_ended_non_finite() -> None:
    series = [(100, math.nan), (101, 2.0), (102, 1.5), (103, math.nan)]  # a resumed run: NaN at both ends
    summary, text = _loss_text({"loss_spike/loss": series})
    loss = summary.loss
    assert (loss.first, loss.best, loss.last_finite) == pytest.approx((2.0, 1.5, 1.5))
    assert math.isnan(loss.last) and loss.ended_nonfinite and loss.nonfinite_step == 100
    assert "first 2, min 1.5, last nan (last finite 1.5): the run ended non-finite" in text
    _, text = _loss_text({"loss_spike/loss": [(5, math.nan), (6, math.inf)]})
    assert "no finite value in 2 logged values" in text and "min nan" not in text


def test_an_alert_at_the_nan_step_is_the_break_not_an_early_warning() -> None:
    from lightning_diag.report.reading import AlertRecord

    scalars = {"loss_spike/loss": [(s, 2.0 if s < 90 else math.nan) for s in range(0, 100, 10)]}  # logged every 10
    alerts = [AlertRecord(60, "GradNormWatcher", "warning", "GradNormWatcher: grad_norm/total = 9", "grad_norm/total", 9.0),
              AlertRecord(83, "LossSpikeDetector", "critical", "LossSpikeDetector: loss_spike/loss = nan",
                          "loss_spike/loss", math.nan)]
    summary, text = _loss_text(scalars, alerts)
    assert summary.loss.nonfinite_step == 83 == summary.broke_at  # the alert saw the NaN before the logger did
    assert summary.first_early() is alerts[0]
    assert "LossSpikeDetector  step 83 critical (at the break, not an early warning)" in text
    assert "GradNormWatcher    step 60 warning (23 steps before)" in text
    assert "steps before the break at step 83" in text and "7 steps before" not in text


def test_a_mistyped_log_path_says_no_such_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "lightning_logz" / "version_0")]) == 2  # default output: inside LOGDIR
    err = capsys.readouterr().err
    assert err == f"{ERROR}{tmp_path / 'lightning_logz' / 'version_0'}: no such file or directory\n"


def test_worst_layers_rank_finite_values_when_every_layer_ends_nan() -> None:
    from lightning_diag.report.summary import worst_first

    nan = math.nan
    layers = {"a": [(0, 1.0), (1, 5.0), (2, nan)], "b": [(0, 1.0), (1, 9.0), (2, nan)], "c": [(0, 1.0), (1, 2.0), (2, nan)],
              "d": [(0, 1.0), (1, nan), (2, nan)]}  # d broke first: the worst
    assert [r.layer for r in worst_first("grad_norm/layer", layers)] == ["d", "b", "a", "c"]
    assert [r.layer for r in worst_first("spectral_alignment/stable_rank", layers)] == ["d", "c", "a", "b"]
    assert [r.last for r in worst_first("grad_norm/layer", dict(layers))][1:] == [9.0, 5.0, 2.0]


def test_a_figure_without_a_direction_is_ranked_by_how_far_it_moved(runs: dict[str, Path]) -> None:
    from lightning_diag.report.summary import direction, worst_first

    assert direction("spectral_alignment/std") == "moved" and direction("grad_norm/layer") == "higher"
    layers = {"flat": [(0, 0.3), (9, 0.3)], "fell": [(0, 0.3), (9, 0.01)], "rose": [(0, 0.3), (9, 0.6)]}
    assert [r.layer for r in worst_first("spectral_alignment/std", layers)] == ["fell", "rose", "flat"]
    summary = _summary(runs["tb"])
    summary.layer_figures["spectral_alignment/std"] = layers
    titles = [p.title for p in render.layer_panels(summary)]
    assert "spectral_alignment/std: the layers that moved most (3 layers)" in titles
    assert not any("std" in t and "higher is worse" in t for t in titles)
    assert "(x" not in format_summary(summary)  # the worst layers say "from <first value>"


def test_first_page_draws_thresholds_from_the_monitors_rules_with_labels_and_plain_ticks(tmp_path: Path) -> None:
    from lightning_diag.callbacks import SharpnessMonitor, SpectralAlignmentMonitor

    ratio = {rule.metric: rule.threshold for rule in SharpnessMonitor().book.rules}["sharpness/stability_ratio"]
    collapse = {r.metric: r.threshold for r in SpectralAlignmentMonitor().book.rules}["spectral_alignment/mean_collapse"]
    figures = {s: {"loss_spike/loss": 2.0 + 0.01 * s, "loss_spike/alerts": 0.0, "sharpness/stability_ratio": 2.0 * s,
                   "sharpness/alerts": 0.0, "spectral_alignment/mean_collapse": 0.02 * s,
                   "spectral_alignment/alerts": 0.0} for s in range(0, 50)}
    summary = _summary(write_csv(tmp_path, "th", figures, []))
    assert render.moved_keys(summary) == ["sharpness/stability_ratio", "spectral_alignment/mean_collapse"]
    plt = render.require_pyplot("PNG")
    figure = render.first_page_figure(plt, summary, {})
    try:
        figure.canvas.draw()
        panels = {ax.get_title(loc="left").split(" ")[0]: ax for ax in figure.axes[1:]}
        for key, value in (("sharpness/stability_ratio", ratio), ("spectral_alignment/mean_collapse", collapse)):
            lines = [ln for ln in panels[key].get_lines() if ln.get_label().startswith("threshold")]
            assert [ln.get_ydata()[0] for ln in lines] == pytest.approx([value]), key
        assert (ratio, collapse) == pytest.approx((30.0, 0.8))
        loss_ax = panels["Training"]
        assert loss_ax.get_yscale() == "log"
        for ax in figure.axes[1:]:
            strip = ax.get_title(loc="left").startswith("Alerts by monitor")  # its y labels: the monitors
            assert ax.get_ylabel() or strip, ax.get_title(loc="left")
            labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True)]
            assert not any("times" in t or "^" in t for t in labels), labels  # never "2 x 10^0"
        assert any(t.get_text() == "2" for t in loss_ax.get_yticklabels(minor=True) + loss_ax.get_yticklabels())
    finally:
        plt.close(figure)


def test_the_step_axis_of_a_run_that_stays_nan_stops_shortly_after_it_turned(tmp_path: Path) -> None:
    figures = {s: {"loss_spike/loss": 2.0 if s < 50 else math.nan, "grad_norm/total": 1.0, "grad_norm/alerts": 0.0}
               for s in range(0, 500)}
    summary = _summary(write_csv(tmp_path, "nan", figures, []))
    low, high = render.x_range(summary)
    assert low <= 0 and 50 < high < 70  # not 500: the healthy steps keep the width of the page


def test_a_resumed_version_is_joined_to_the_run_it_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    figures, alerts = exploding_run(steps=80, explode_at=60, nonfinite_at=70)
    before = {s: row for s, row in figures.items() if s < 55}
    after = {s: row for s, row in figures.items() if s >= 45}  # the checkpoint was at step 45
    write_csv(tmp_path / "logs", "gpt", before, [a for a in alerts if a["step"] < 55])
    write_csv(tmp_path / "logs", "gpt", after, [a for a in alerts if a["step"] >= 45])  # version_1
    write_csv(tmp_path / "logs", "other", small_run(), [])  # a fresh run beside it: not joined
    text, summaries = report(tmp_path / "logs")
    assert [s.run.name for s in summaries] == ["gpt/version_0+version_1", "other/version_0"]
    joined = summaries[0]
    assert [a.step for a in joined.alerts] == [a["step"] for a in alerts]
    assert [s for s, _ in joined.run.scalars["loss_spike/loss"]] == list(range(80))
    assert joined.first_early().step == 30 and "version_1 resumes version_0 from a checkpoint at step 45" in text
    _, apart = report(tmp_path / "logs", join=False)
    assert len(apart) == 3


def test_alerts_file_is_strict_json_and_reads_back_non_finite_values(tmp_path: Path) -> None:
    from lightning_diag.alerts import Alert
    from lightning_diag.callbacks._trainer import write_alert_lines
    from lightning_diag.report.reading import find_runs, load_run

    trainer = SimpleNamespace(is_global_zero=True, loggers=[SimpleNamespace(log_dir=str(tmp_path))])
    alerts = [Alert("LossSpikeDetector", "loss_spike/loss", 7, math.nan, math.inf, "critical", "nan loss", 8),
              Alert("GradNormWatcher", "grad_norm/total", 9, -math.inf, 5.0, "warning", "-inf norm", 9)]
    write_alert_lines(trainer, alerts)  # type: ignore[arg-type]
    (tmp_path / "metrics.csv").write_text("step,loss\n0,1.0\n")

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    lines = (tmp_path / "lightning_diag_alerts.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=refuse) for line in lines]
    assert [(r["value"], r["threshold"]) for r in records] == [("nan", "inf"), ("-inf", 5.0)]
    read = load_run(tmp_path, find_runs(tmp_path)[tmp_path]).alerts
    assert math.isnan(read[0].value) and read[0].threshold == math.inf and read[1].value == -math.inf
    assert read[0].acted_step == 8


def test_help_and_argument_errors_import_no_training_stack() -> None:
    probe = ("import sys\nfrom lightning_diag.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'lightning', 'matplotlib', 'tensorboard') if m in sys.modules))")
    root = str(Path(__file__).resolve().parents[1])
    for args in (["--help"], ["report", "--help"], ["report"], ["report", "x", "--top", "x"]):
        done = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True,
                              env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"}, cwd=root)
        assert done.stdout.strip().splitlines()[-1] == "[]", (args, done.stdout, done.stderr)
