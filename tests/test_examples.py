"""The scripts in examples/ run as scripts, and what their docstrings say they show is what they show.

Each example fixes its thread count (one) and seeds, so the steps its docstring states are measured
values; the tests below rerun them and check each stated step against the run's alerts and against
the explosion step ``lightning-diag report`` gives (:func:`~lightning_diag.report.read_summaries`,
the report's own reading of the logs). Each run takes under 20 s on one CPU core (the language-model
ones 5-18 s depending on load, the digits ones a few seconds), so none is marked slow.
"""

from __future__ import annotations

import math
import runpy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_diag.report import read_summaries
from lightning_diag.testbeds import flush_denormals

pytest.importorskip("sklearn", reason="the digits examples need scikit-learn (the dev extra)")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SHORT = {
    "grad_norm.py": ["--max-steps", "40"],
    "logits.py": ["--max-steps", "40"],
    "loss_spike.py": ["--max-steps", "40"],
    "neural_collapse.py": ["--max-epochs", "2", "--limit-train-batches", "5"],
    "sharpness.py": ["--max-steps", "40"],
    "spectral_alignment.py": ["--max-steps", "60"],
    "stability.py": ["--max-steps", "40"],
}


@pytest.fixture(autouse=True)
def _restore_cpu_settings() -> Iterator[None]:
    """The examples set one thread and flush denormals, as a script may; the test session gets its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    flush_denormals(False)


def _main(name: str) -> Callable[[list[str]], Any]:
    return runpy.run_path(str(EXAMPLES / name))["main"]


def _run(name: str, tmp_path: Path, *args: str) -> tuple[Any, Any]:
    """The example's ``main`` with ``args``, and the report's summary of the run it logged."""
    result = _main(name)([*args, "--logdir", str(tmp_path)])
    (summary,) = read_summaries(tmp_path)
    return result, summary


def _first(callback: Any, severity: str | None = None, metric: str | None = None) -> Any:
    """The first alert of ``callback`` (optionally of one severity or metric prefix)."""
    return next(a for a in callback.alerts
                if (severity is None or a.severity == severity) and (metric is None or a.metric.startswith(metric)))


def test_every_example_is_exercised() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SHORT)


@pytest.mark.parametrize("name", sorted(SHORT))
def test_example_runs_as_a_script(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *SHORT[name], "--logdir", str(tmp_path)])
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    out = capsys.readouterr().out
    assert "Health: " in out  # the report's summary, alerts and info records counted apart
    assert list(tmp_path.rglob("events.out.tfevents.*")), "the example wrote no TensorBoard events"


def test_grad_norm_example_describes_the_divergence_and_does_not_foretell_it(tmp_path: Path) -> None:
    watcher, summary = _run("grad_norm.py", tmp_path)
    assert summary.loss.explosion_step == 11
    zscores = [a for a in watcher.alerts if a.metric == "grad_norm/zscore"]
    assert zscores and {a.severity for a in zscores} == {"info"}
    assert zscores[0].step == 11  # the explosion step itself: no lead
    critical = _first(watcher, "critical")
    assert (critical.metric, critical.step) == ("grad_norm/total", 30)  # 19 steps after the explosion
    assert min(a.step for a in watcher.alerts) >= summary.loss.explosion_step


def test_sharpness_example_warns_four_steps_before_the_explosion_and_stays_quiet_at_a_safe_rate(
    tmp_path: Path,
) -> None:
    (monitor, detector), summary = _run("sharpness.py", tmp_path / "high")
    ratio = dict(summary.run.scalars["sharpness/stability_ratio"])
    assert ratio[9] == pytest.approx(1.04, abs=0.005) and ratio[14] == pytest.approx(2.83, abs=0.005)
    assert _first(monitor).step == 14 and _first(monitor).metric == "sharpness/stability_ratio"
    assert summary.loss.explosion_step == 18
    assert _first(detector).step == 21
    (monitor, detector), summary = _run("sharpness.py", tmp_path / "safe", "--lr", "0.1")
    assert max(v for _, v in summary.run.scalars["sharpness/stability_ratio"]) < 0.25
    assert not monitor.alerts and not detector.alerts and summary.loss.explosion_step is None


@pytest.mark.parametrize(("action", "final", "exploded"),
                         [("log", 2.33, True), ("skip", 2.32, True), ("recover", 2.32, True), ("rollback", 1.41, False),
                          ("reduce_lr", 1.09, False)])
def test_loss_spike_example_leaves_what_its_docstring_says_for_each_action(
    action: str, final: float, exploded: bool, tmp_path: Path
) -> None:
    (detector, loss), summary = _run("loss_spike.py", tmp_path, "--action", action)
    assert summary.loss.explosion_step == (13 if exploded else None) and _first(detector).step == 15
    assert loss == pytest.approx(final, abs=0.005)
    assert summary.steps[1] == 79  # every action trains the 80 steps
    if action == "rollback":  # one rollback at the first alert, at half the learning rate from then on
        assert detector.rollbacks == 1 and detector.lr_scale == pytest.approx(0.5) and detector.alerts[1].step == 15
    if action == "recover":  # two skipped steps; no rollback (it needs 3 bad steps in a row), no LR cut
        assert (detector.skipped, detector.rollbacks) == (2, 0) and detector.lr_scale == pytest.approx(1.0)
    assert math.log(10) == pytest.approx(2.30, abs=0.005)  # "a model that knows nothing scores 2.30"


def test_neural_collapse_example_nc1_and_cdnv_fall(tmp_path: Path) -> None:
    tracker, summary = _run("neural_collapse.py", tmp_path)
    trend = summary.nc_trend["nc"]
    assert trend["nc1"] == pytest.approx((0.694, 0.273), abs=0.0005)
    assert trend["cdnv"] == pytest.approx((0.235, 0.141), abs=0.0005)
    assert not tracker.alerts


def test_spectral_alignment_example_alerts_after_the_explosion_and_after_the_loss(tmp_path: Path) -> None:
    (monitor, detector), summary = _run("spectral_alignment.py", tmp_path)
    assert summary.loss.explosion_step == 285
    loss_first, spectral_first = _first(detector), _first(monitor)
    assert (loss_first.step, loss_first.metric) == (285, "loss_spike/trend")
    assert (spectral_first.step, spectral_first.metric) == (319, "spectral_alignment/mean_collapse")


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_logits_example_attention_growth_leads_without_qk_layernorm_and_trails_with_it(
    qk_layernorm: bool, tmp_path: Path
) -> None:
    (monitor, detector), summary = _run("logits.py", tmp_path, *(["--qk-layernorm"] if qk_layernorm else []))
    attention = _first(monitor, metric="logits/attention")
    if not qk_layernorm:
        assert summary.loss.explosion_step == 285 and _first(detector).step == 285
        assert (attention.metric, attention.step) == ("logits/attention_growth", 84)
        over_100 = next(step for step, value in summary.run.scalars["logits/attention_max"] if value > 100)
        assert over_100 == 234
    else:
        assert summary.loss.explosion_step == 287 and _first(detector).step == 282
        assert attention.step == 294 and _first(monitor).step == 294  # after the loss's alert and the explosion


def test_stability_example_governed_trains_where_the_measured_run_explodes(tmp_path: Path) -> None:
    ((governor, _), final), summary = _run("stability.py", tmp_path / "governed")
    scale = dict(summary.run.scalars["stability/scale"])
    assert summary.loss.explosion_step is None and final == pytest.approx(0.344, abs=0.005)
    assert min(scale.values()) == pytest.approx(0.025, abs=0.0005) and min(scale, key=scale.get) == 46
    assert governor.controller.scale == pytest.approx(0.269, abs=0.0005)
    assert _first(governor).step == 46 and _first(governor).metric == "stability/scale"
    ((watcher, _), final), summary = _run("stability.py", tmp_path / "measured", "--govern", "false")
    assert summary.loss.explosion_step == 13 and final == pytest.approx(2.33, abs=0.005)
    assert min(v for _, v in summary.run.scalars["stability/scale"]) == pytest.approx(0.112, abs=0.0005)
