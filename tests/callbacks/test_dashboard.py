"""The TensorBoard dashboard (custom-scalars layout) and the progress bar's alert count.

The dashboard is generated from each monitor's key declarations (``Key.chart``): these tests read
the layout TensorBoard received and check it against the declarations and the tags logged.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from conftest import MemoryLogger, MixtureClassifier, TinyModule, make_trainer
from lightning_diag import Above, GradNormWatcher, LossSpikeDetector, NCTracker, SpectralAlignmentMonitor
from lightning_diag.callbacks._dashboard import custom_scalars_layout
from lightning_diag.keys import split_key

LAYOUT_TAG = "custom_scalars__config__"
Charts = dict[str, dict[str, list[str]]]


def _read_layouts(log_dir: str) -> list[layout_pb2.Layout]:
    accumulator = EventAccumulator(log_dir, size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    layouts = []
    for event in accumulator.Tensors(LAYOUT_TAG) if LAYOUT_TAG in accumulator.Tags()["tensors"] else []:
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        layouts.append(layout)
    return layouts


def _charts(layout: layout_pb2.Layout) -> Charts:
    return {c.title: {ch.title: list(ch.multiline.tag) for ch in c.chart} for c in layout.category}


def _layout_charts(callbacks: list[Any]) -> Charts:
    return {category: {title: regexes for title, (_, regexes) in charts.items()}
            for category, charts in custom_scalars_layout(callbacks).items()}  # fmt: skip


def _drawn(tags: set[str], regexes: list[str]) -> set[str]:
    return {t for t in tags if any(re.match(rx, t) for rx in regexes)}


def _scalar_tags(log_dir: str) -> set[str]:
    return set(EventAccumulator(log_dir).Reload().Tags()["scalars"])


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
    tags = _scalar_tags(logger.log_dir)
    per_layer = charts["lightning_diag: GradNormWatcher"]["gradient norm per layer"]
    assert _drawn(tags, per_layer) == {"grad_norm/layer/net.0", "grad_norm/layer/net.2", "grad_norm/layer/net.4"}
    totals = charts["lightning_diag: GradNormWatcher"]["total gradient norm and baseline"]
    assert _drawn(tags, totals) == {"grad_norm/total", "grad_norm/baseline"}
    alerts = charts["lightning_diag: alerts"]["alert counts of every monitor"]
    assert _drawn(tags, alerts) == {"grad_norm/alerts", "loss_spike/alerts"}
    assert "ratio to minimum, trend" in charts["lightning_diag: LossSpikeDetector"]  # factor is on, the trend off
    assert _drawn(tags, charts["lightning_diag: LossSpikeDetector"]["ratio to minimum, trend"]) == {
        "loss_spike/ratio_to_min"}
    # every logged figure whose key declares a chart is on the dashboard, and in the chart it declares
    for monitor in (watcher, detector):
        category = charts[f"lightning_diag: {monitor.source}"]
        for tag in (t for t in tags if t.startswith(f"{monitor.family}/")):
            if tag == f"{monitor.family}/alerts":
                title = f"alerts ({monitor.source})"
            else:
                (key,) = [k for k in monitor.declared_keys() if k.matches(tag, monitor.family)]  # declared, once
                title = key.chart
            assert title is None or _drawn({tag}, category[title]) == {tag}, (tag, title)


def test_the_charts_are_generated_from_the_declared_keys_of_each_monitor() -> None:
    monitors = [GradNormWatcher(clip="zclip", update_ratio=True), LossSpikeDetector(action="skip"),
                SpectralAlignmentMonitor(), NCTracker(prefix="probe")]  # fmt: skip
    charts = _layout_charts(monitors)
    for monitor in monitors:
        declared: dict[str, list[str]] = {}
        for key in monitor.declared_keys():
            if key.chart is not None and key.kind == "scalar":
                declared.setdefault(key.chart, []).append(key.regex(monitor.family))
        category = charts[f"lightning_diag: {monitor.source}"]
        assert category.pop(f"alerts ({monitor.source})") == [rf"{monitor.family}/alerts$"]
        assert category == declared, monitor.source
        for title, regexes in category.items():  # each regex draws exactly its own key, for any layer name
            for key in (k for k in monitor.declared_keys() if k.chart == title):
                tag = key.key(monitor.family, "blocks.0.mlp")
                assert _drawn({tag}, regexes) == {tag} and split_key(tag)[0] == monitor.family
                assert not _drawn({tag + "/x", "other/" + tag}, regexes)


def test_a_chart_is_drawn_only_for_figures_that_are_enabled() -> None:
    def titles(monitor: Any) -> set[str]:
        return set(_layout_charts([monitor])[f"lightning_diag: {monitor.source}"])

    assert "update ratio per layer" not in titles(GradNormWatcher())
    assert "update ratio per layer" in titles(GradNormWatcher(update_ratio=True))
    assert "gradient norm per layer" not in titles(GradNormWatcher(per_layer=False))
    clipping = _layout_charts([GradNormWatcher(clip="zclip")])["lightning_diag: GradNormWatcher"]
    assert clipping["non-finite gradients, clipping"] == ["grad_norm/nonfinite$", "grad_norm/clip_coef$",
                                                          "grad_norm/clipped_steps$"]  # fmt: skip
    assert _layout_charts([GradNormWatcher()])["lightning_diag: GradNormWatcher"][
        "non-finite gradients, clipping"] == ["grad_norm/nonfinite$"]
    assert "ratio to minimum, trend" not in titles(LossSpikeDetector(factor=None, trend_window=None))
    assert {"sign diversity D per layer", "stable rank per layer"} <= titles(SpectralAlignmentMonitor())
    assert not {"sign diversity D per layer", "stable rank per layer"} & titles(SpectralAlignmentMonitor(
        per_layer=False))


def test_update_ratio_chart_appears_in_the_written_dashboard_only_when_enabled(tmp_path: Path) -> None:
    for update_ratio in (False, True):
        logger = TensorBoardLogger(tmp_path, name=f"update_ratio_{update_ratio}")
        trainer = make_trainer(logger=logger, callbacks=[GradNormWatcher(update_ratio=update_ratio, action="log")],
                               max_steps=2)  # fmt: skip
        trainer.fit(TinyModule())
        (layout,) = _read_layouts(logger.log_dir)
        category = _charts(layout)["lightning_diag: GradNormWatcher"]
        assert ("update ratio per layer" in category) == update_ratio
        if update_ratio:
            drawn = _drawn(_scalar_tags(logger.log_dir), category["update ratio per layer"])
            assert drawn == {f"grad_norm/update_ratio/net.{i}" for i in (0, 2, 4)}


def test_dashboard_covers_nc_tracker_with_its_prefix() -> None:
    layout = custom_scalars_layout([NCTracker(prefix="probe", action="log")])
    (chart,) = layout["lightning_diag: NCTracker[probe]"]["NC1 (within-class variability)"][1]
    assert re.match(chart, "probe/nc1") and not re.match(chart, "nc/nc1")


def test_no_tensorboard_logger_means_no_dashboard_and_no_error(tmp_path: Path) -> None:
    memory, csv = MemoryLogger(), CSVLogger(tmp_path, name="csv", version=0)
    trainer = make_trainer(logger=[memory, csv], callbacks=[GradNormWatcher(action="log")], max_steps=2)
    trainer.fit(TinyModule())  # CSV has no custom-scalars channel: nothing is written for it, and nothing fails
    assert trainer.global_step == 2 and [s for s, _ in memory.history["grad_norm/total"]] == [0, 1]
    assert "grad_norm/total" in (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert not list(tmp_path.rglob("events.out.tfevents*"))


def test_progress_bar_shows_the_latest_alert_count(tmp_path: Path) -> None:
    watcher = GradNormWatcher(action="log", rules=[Above("grad_norm/layer/net.*", 0.0),  # 3 layers: 1 alert
                                                   Above("grad_norm/total", 0.0, severity="info")])  # not counted
    detector = LossSpikeDetector(action="log", rules=[Above("loss_spike/loss", 0.0)])
    trainer = make_trainer(callbacks=[watcher, detector], max_steps=3, enable_progress_bar=True,
                           default_root_dir=tmp_path)
    model = TinyModule()
    trainer.fit(model)
    assert [a.severity for a in watcher.alerts] == ["info", "warning"] and len(detector.alerts) == 1
    assert len(watcher.alerts[1].layers) == 3
    assert trainer.progress_bar_callback.get_metrics(trainer, model)["alerts"] == 2  # warnings and criticals


def test_progress_bar_keeps_a_user_metric_named_alerts(tmp_path: Path) -> None:
    class LogsAlerts(TinyModule):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.log("alerts", 42.0, prog_bar=True)
            return super().training_step(batch, batch_idx)

    watcher = GradNormWatcher(action="log", rules=[Above("grad_norm/total", 0.0)])
    trainer = make_trainer(callbacks=[watcher], max_steps=2, enable_progress_bar=True, default_root_dir=tmp_path)
    model = LogsAlerts()
    trainer.fit(model)
    assert len(watcher.alerts) == 1  # there is an alert count the user's metric takes precedence over
    assert trainer.progress_bar_callback.get_metrics(trainer, model)["alerts"] == 42.0


def test_mixture_classifier_dashboard_includes_nc(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="nc")
    trainer = make_trainer(logger=logger, callbacks=[NCTracker(action="log")], max_epochs=1, max_steps=-1,
                           num_sanity_val_steps=0)
    trainer.fit(MixtureClassifier())
    (layout,) = _read_layouts(logger.log_dir)
    category = _charts(layout)["lightning_diag: NCTracker"]
    tags = _scalar_tags(logger.log_dir)
    assert _drawn(tags, category["NC1 (within-class variability)"]) == {"nc/nc1"}
    assert _drawn(tags, category["CDNV, trace ratio"]) == {"nc/cdnv", "nc/trace_ratio"}
    assert "nc/num_samples" in tags and not _drawn({"nc/num_samples"}, [r for c in category.values() for r in c])
