"""The TensorBoard dashboard (custom-scalars layout) and the progress bar's alert count."""

from __future__ import annotations

import re
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from conftest import MemoryLogger, MixtureClassifier, TinyModule, make_trainer
from lightning_diag import Above, GradNormWatcher, LossSpikeDetector, NCTracker
from lightning_diag.callbacks._dashboard import custom_scalars_layout

LAYOUT_TAG = "custom_scalars__config__"


def _read_layouts(log_dir: str) -> list[layout_pb2.Layout]:
    accumulator = EventAccumulator(log_dir, size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    layouts = []
    for event in accumulator.Tensors(LAYOUT_TAG) if LAYOUT_TAG in accumulator.Tags()["tensors"] else []:
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        layouts.append(layout)
    return layouts


def _charts(layout: layout_pb2.Layout) -> dict[str, dict[str, list[str]]]:
    return {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}


def test_dashboard_layout_is_written_once_and_matches_the_logged_tags(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="run")
    watcher = GradNormWatcher(action="log")
    detector = LossSpikeDetector(action="log", warmup=3, trend_window=None)
    trainer = make_trainer(logger=logger, callbacks=[watcher, detector], max_steps=6)
    trainer.fit(TinyModule())
    layouts = _read_layouts(logger.log_dir)
    assert len(layouts) == 1  # once per run, though both monitors published 6 times
    charts = _charts(layouts[0])
    assert set(charts) == {"lightning_diag: GradNormWatcher", "lightning_diag: LossSpikeDetector",
                           "lightning_diag: alerts"}
    tags = set(EventAccumulator(logger.log_dir).Reload().Tags()["scalars"])
    per_layer = charts["lightning_diag: GradNormWatcher"]["gradient norm per layer"]
    matched = {t for t in tags if any(re.match(rx, t) for rx in per_layer)}
    assert matched == {"grad_norm/net.0", "grad_norm/net.2", "grad_norm/net.4"}  # totals left out
    totals = charts["lightning_diag: GradNormWatcher"]["total gradient norm and baseline"]
    assert {t for t in tags if any(re.match(rx, t) for rx in totals)} == {"grad_norm/total", "grad_norm/baseline"}
    alerts = charts["lightning_diag: alerts"]["alert counts of every monitor"]
    assert {t for t in tags if any(re.match(rx, t) for rx in alerts)} == {
        "alerts/GradNormWatcher", "alerts/LossSpikeDetector"}
    every_chart = [rx for category in charts.values() for chart in category.values() for rx in chart]
    assert all(any(re.match(rx, t) for rx in every_chart) for t in tags)  # every figure is on the dashboard


def test_dashboard_covers_nc_tracker_with_its_prefix() -> None:
    layout = custom_scalars_layout([NCTracker(prefix="probe", action="log")])
    (chart,) = layout["lightning_diag: NCTracker[probe]"]["NC1 (within-class variability)"][1]
    assert re.match(chart, "probe/nc1") and not re.match(chart, "nc/nc1")


def test_no_tensorboard_logger_means_no_dashboard_and_no_error(tmp_path: Path) -> None:
    trainer = make_trainer(logger=[MemoryLogger(), CSVLogger(tmp_path)], callbacks=[GradNormWatcher(action="log")],
                           max_steps=2)
    trainer.fit(TinyModule())  # nothing to assert beyond "runs": CSV has no custom-scalars channel


def test_progress_bar_shows_the_latest_alert_count(tmp_path: Path) -> None:
    watcher = GradNormWatcher(action="log", rules=[Above("grad_norm/net.*", 0.0)])  # 3 layers: 3 alerts
    detector = LossSpikeDetector(action="log", rules=[Above("loss_spike/loss", 0.0)])
    trainer = make_trainer(callbacks=[watcher, detector], max_steps=3, enable_progress_bar=True,
                           default_root_dir=tmp_path)
    model = TinyModule()
    trainer.fit(model)
    assert len(watcher.alerts) == 3 and len(detector.alerts) == 1
    assert trainer.progress_bar_callback.get_metrics(trainer, model)["alerts"] == 4


def test_progress_bar_keeps_a_user_metric_named_alerts(tmp_path: Path) -> None:
    class LogsAlerts(TinyModule):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.log("alerts", 42.0, prog_bar=True)
            return super().training_step(batch, batch_idx)

    trainer = make_trainer(callbacks=[GradNormWatcher(action="log", rules=[Above("grad_norm/total", 0.0)])],
                           max_steps=2, enable_progress_bar=True, default_root_dir=tmp_path)
    model = LogsAlerts()
    trainer.fit(model)
    assert trainer.progress_bar_callback.get_metrics(trainer, model)["alerts"] == 42.0


def test_mixture_classifier_dashboard_includes_nc(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="nc")
    trainer = make_trainer(logger=logger, callbacks=[NCTracker(action="log")], max_epochs=1, max_steps=-1,
                           num_sanity_val_steps=0)
    trainer.fit(MixtureClassifier())
    (layout,) = _read_layouts(logger.log_dir)
    assert "lightning_diag: NCTracker" in _charts(layout)
