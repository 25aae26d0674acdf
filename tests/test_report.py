"""`lightning-diag report`: health summary and HTML/PNG report from real TensorBoard event files."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from conftest import MixtureClassifier, TinyModule, make_trainer
from lightning_diag import Above, GradNormWatcher, LossSpikeDetector, NCTracker
from lightning_diag.cli import main as cli_main
from lightning_diag.report import main, report


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two runs: a regressor with a forced grad-norm alert, and a classifier under NCTracker."""
    root = tmp_path_factory.mktemp("logs")
    watcher = GradNormWatcher(action="log", rules=[Above("grad_norm/total", 0.0)])
    detector = LossSpikeDetector(action="log", warmup=3, trend_window=None)
    make_trainer(logger=TensorBoardLogger(root, name="regressor"), callbacks=[watcher, detector],
                 max_steps=8, log_every_n_steps=2).fit(TinyModule())
    make_trainer(logger=TensorBoardLogger(root, name="classifier"), callbacks=[NCTracker(action="log")],
                 max_epochs=3, max_steps=-1, num_sanity_val_steps=0).fit(MixtureClassifier())
    return root


def _event_file(run: Path) -> Path:
    (path,) = run.glob("events.out.tfevents.*")
    return path


def test_summary_lists_alerts_first_warnings_worst_layers_and_nc_trend(
    logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(logdir), "-o", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "== regressor/version_0" in out and "== classifier/version_0" in out
    assert "GradNormWatcher: grad_norm/total = " in out and "(above 0) at step 1" in out  # the alert text
    classifier, regressor = out.split("== regressor/version_0")  # runs in path order
    assert "Health: no alerts" in classifier and "NCTracker  none" in classifier
    first = regressor.split("First alert per monitor (any severity, info included):")[1]
    assert "GradNormWatcher    step 1:" in first and "LossSpikeDetector  none" in first
    worst = regressor.split("Worst layers at the last step")[1]
    for family in ("grad_norm ", "weight_norm ", "grad_weight_ratio "):
        assert family in worst
    assert "net.0" in worst and "grad_norm/total" not in worst
    assert "Neural collapse (nc): " in classifier and "nc1 " in classifier and "cdnv " in classifier
    assert "Loss (loss_spike/loss): first" in regressor


def test_html_report_is_self_contained_with_inline_plots(logdir: Path, tmp_path: Path) -> None:
    output = tmp_path / "report.html"
    assert main([str(logdir / "regressor"), "-o", str(output), "--no-output"]) == 0
    assert not output.exists()  # --no-output wins
    assert main([str(logdir / "regressor"), "-o", str(output)]) == 0
    page = output.read_text()
    assert page.count("src='data:image/png;base64,") >= 4  # loss, total norm, per-layer, alert counts
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "grad_norm/total = " in page  # the alerts table


def test_default_output_is_in_the_log_folder_and_png_works(logdir: Path, tmp_path: Path) -> None:
    run = logdir / "classifier" / "version_0"
    assert main([str(run)]) == 0
    assert (run / "health_report.html").exists()
    assert main([str(run), "-o", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_without_matplotlib_has_no_plots(
    logdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    output = tmp_path / "r.html"
    assert main([str(logdir / "regressor"), "-o", str(output)]) == 0
    page = output.read_text()
    assert "matplotlib is not installed" in page and "data:image/png" not in page


def test_fail_on_alert_exits_1_and_console_entry_dispatches(logdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(logdir / "regressor"), "--no-output", "--fail-on-alert"]) == 1
    assert cli_main(["report", str(logdir / "classifier"), "--no-output", "--fail-on-alert"]) == 0
    assert "Health: no alerts" in capsys.readouterr().out


def _bad_inputs(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    data = _event_file(good).read_bytes()
    cases = {
        "missing": (tmp_path / "nope", "no such file or directory"),
        "no event files": (tmp_path / "empty", "no TensorBoard event files"),
        "garbage": (tmp_path / "garbage", "not a TensorBoard event file"),
        "flipped byte": (tmp_path / "flipped", "corrupted record"),
        "empty file": (tmp_path / "zero", "hold no records"),
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    blobs = {"garbage": b"not an event file" * 20, "flipped": data[:300] + bytes([data[300] ^ 0xFF]) + data[301:],
             "zero": b""}
    for folder, blob in blobs.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "events.out.tfevents.0.host.0.0").write_bytes(blob)
    return cases


def test_bad_input_gets_one_line_error_and_exit_2(
    logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for case, (path, expected) in _bad_inputs(tmp_path, logdir / "regressor" / "version_0").items():
        assert main([str(path), "--no-output"]) == 2, case
        captured = capsys.readouterr()
        assert captured.out == "", case
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in captured.err, (case, captured.err)
        assert lines[0].startswith("lightning-diag report: error: ")


def test_unwritable_output_is_bad_input(logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(logdir / "regressor"), "-o", str(tmp_path / "no" / "such" / "dir" / "r.html")]) == 2
    assert "cannot write the report" in capsys.readouterr().err


def test_truncated_last_record_is_a_note_not_an_error(
    logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _event_file(logdir / "regressor" / "version_0").read_bytes()
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "events.out.tfevents.0.host.0.0").write_bytes(data[:-7])  # a run still being written
    assert main([str(tmp_path / "live"), "--no-output"]) == 0
    assert "last record truncated" in capsys.readouterr().out


def test_csv_and_tensorboard_at_once_get_the_same_scalars(tmp_path: Path) -> None:
    """Multiple loggers: every scalar reaches both; CSV has no text channel and silently skips the texts."""
    tensorboard, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    watcher = GradNormWatcher(action="log", rules=[Above("grad_norm/total", 0.0)])
    make_trainer(logger=[tensorboard, csv_logger], callbacks=[watcher], max_steps=4).fit(TinyModule())
    with open(Path(csv_logger.log_dir) / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    csv_keys = {k for row in rows for k, v in row.items() if v not in ("", None)} - {"step", "epoch"}
    _, (summary,) = report(tensorboard.log_dir)
    assert csv_keys == set(summary.run.scalars)
    assert float(rows[-1]["alerts/GradNormWatcher"]) == 1.0
    assert len(summary.alerts) == 1 and "grad_norm/total" in summary.alerts[0].message  # text in TensorBoard only
