"""The contract every exported monitor keeps, checked on each of them (a new monitor inherits it).

``CASES`` says, per exported callback, the arguments of a small fast run and a table of bad
arguments; a monitor exported without an entry fails ``test_every_exported_monitor_has_a_case``.
The runs use ``Poisoned``: a classifier whose loss turns NaN from a given step (so its gradients,
weights and features follow), which every monitor must report.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MemoryLogger, MixtureClassifier, assert_same_state, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import lightning_diag.callbacks
from lightning_diag import DivergenceError
from lightning_diag.alerts import Above, DiagnosticWarning
from lightning_diag.callbacks._base import DiagnosticCallback
from lightning_diag.callbacks._dashboard import custom_scalars_layout

# name -> (fast arguments, [(bad arguments, the value's repr in the message, a word of what is allowed)])
COMMON_BAD = [({"every_n_steps": 0}, "0", ">= 1"), ({"action": "explode"}, "'explode'", "'stop'"),
              ({"rules": "grad"}, "'grad'", "Above")]  # fmt: skip
CASES: dict[str, tuple[dict[str, Any], list[tuple[dict[str, Any], str, str]]]] = {
    "GradNormWatcher": ({}, [({"z_threshold": -1.0}, "-1.0", "> 0"), ({"clip": "norm"}, "'norm'", "'zclip'"),
                             ({"spike_severity": "fatal"}, "'fatal'", "'info'"), ({"group_depth": 0}, "0", ">= 1")]),
    "LossSpikeDetector": ({"warmup": 5}, [({"factor": 0.5}, "0.5", "> 1"), ({"mode": "up"}, "'up'", "'min'"),
                                          ({"lr_factor": 2.0}, "2.0", "(0, 1)"), ({"trend_window": 2}, "2", ">= 3")]),
    "SpectralAlignmentMonitor": ({"check_every_n_steps": 2, "warmup_steps": 0},
                                 [({"seed": "x"}, "'x'", ">= 0"), ({"layer_rule": "max"}, "'max'", "'baseline'"),
                                  ({"collapse_threshold": 1.5}, "1.5", "(0, 1]"), ({"max_rows": 0}, "0", ">= 1")]),
    "NCTracker": ({}, [({"data": [1, 2, 3]}, "1", "DataLoader"), ({"nc4": "soon"}, "'soon'", "'lagged'"),
                       ({"prefix": "a/b"}, "'a/b'", "without '/'"), ({"probe_every_n_steps": 5}, "'val'", "probe")]),
    "LogitMonitor": ({"check_every_n_steps": 2}, [({"max_queries": 0}, "0", ">= 1"), ({"output": 3}, "3", "None"),
                                                  ({"attention_threshold": -5.0}, "-5.0", "> 0")]),
    "SharpnessMonitor": ({"check_every_n_steps": 3, "iters": 2, "cold_iters": 4},
                         [({"iters": 0}, "0", ">= 1"), ({"method": "exact"}, "'exact'", "'autograd'"),
                          ({"stability_threshold": 0.0}, "0.0", "> 0"), ({"loss_fn": 3}, "3", "callable")]),
    "StabilityGovernor": ({"check_every_n_steps": 2},
                          [({"target": 0.0}, "0.0", "> 0"), ({"min_scale": 1.5}, "1.5", "(0, 1]"),
                           ({"recovery": 1.0}, "1.0", "> 1"), ({"smoothing": 1.0}, "1.0", "[0, 1)"),
                           ({"govern": "yes"}, "'yes'", "True or False"), ({"pin_patience": 0}, "0", ">= 1")]),
}  # fmt: skip
EXPORTED = list(lightning_diag.callbacks.__all__)
ACTIONS = ["stop", "raise", "callable"]


class Poisoned(MixtureClassifier):
    """A classifier whose loss is multiplied by NaN from optimizer step ``poison_at`` on (then its
    gradients, weights after the SGD step, and features are NaN too); ``fail`` raises in a step."""

    def __init__(self, poison_at: int | None = None, fail: str | None = None, fail_at: int = 3) -> None:
        super().__init__(n_per_class=16, batch_size=16)  # 4 batches per epoch
        self.poison_at, self.fail, self.fail_at = poison_at, fail, fail_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail == "train" and self.global_step == self.fail_at:
            raise RuntimeError("boom in training_step")
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.poison_at is not None and self.global_step >= self.poison_at else loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fail == "val":
            raise RuntimeError("boom in validation_step")
        return super().validation_step(batch, batch_idx)


def make(name: str, **overrides: Any) -> DiagnosticCallback:
    return getattr(lightning_diag.callbacks, name)(**{**CASES[name][0], **overrides})


def fit(callback: DiagnosticCallback, model: pl.LightningModule, **trainer_kwargs: Any) -> pl.Trainer:
    trainer = make_trainer(**{"callbacks": [callback], "max_steps": 12, "log_every_n_steps": 50, **trainer_kwargs})
    trainer.fit(model)
    return trainer


def test_every_exported_monitor_has_a_case() -> None:
    assert sorted(EXPORTED) == sorted(CASES), "add the new monitor to CASES: the contract covers every monitor"
    for name in EXPORTED:
        assert issubclass(getattr(lightning_diag.callbacks, name), DiagnosticCallback)


# -- keys: every logged key is declared, and the docs are generated from the declarations ---------------------


@pytest.mark.parametrize("name", EXPORTED)
def test_every_logged_key_matches_a_declared_key(name: str, tmp_path: Path) -> None:
    callback = make(name, action="log")
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = make_trainer(callbacks=[callback], logger=[MemoryLogger(), logger], max_steps=12, log_every_n_steps=4)
    torch.manual_seed(0)
    trainer.fit(Poisoned(poison_at=9))
    events = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0,
                                                             "tensors": 0}).Reload()  # fmt: skip
    tags = {t for kind in ("scalars", "histograms", "images") for t in events.Tags()[kind]}
    tags |= {t for t in events.Tags()["tensors"] if not t.startswith("custom_scalars")}  # alert texts
    logged = set(trainer.loggers[0].history) | {t.removesuffix("/text_summary") for t in tags}
    assert logged, "nothing was logged"
    allowed = [*callback.declared_keys(), *[k for k in callback.KEYS if k.kind != "scalar"]]
    undeclared = sorted(k for k in logged if k != f"{callback.family}/alerts"
                        and not any(d.matches(k, callback.family) for d in allowed))  # fmt: skip
    assert not undeclared
    assert f"{callback.family}/alerts" in logged
    assert ("Logged keys" in type(callback).__doc__
            and "``" + callback.KEYS[0].key(callback.family) in type(callback).__doc__)


@pytest.mark.parametrize("name", EXPORTED)
def test_every_dashboard_pattern_draws_a_key_the_monitor_logs_with_its_settings(name: str) -> None:
    callback = make(name, action="log", **({"attention": False} if name == "LogitMonitor" else {}))  # no attention
    trainer = fit(callback, Poisoned(poison_at=9), max_steps=12, log_every_n_steps=4)
    logged = set(trainer.logger.history)
    (category,) = [c for title, c in custom_scalars_layout([callback]).items() if title.endswith(callback.source)]
    empty = [(title, regex) for title, (_, regexes) in category.items() for regex in regexes
             if not any(re.match(regex, key) for key in logged)]  # fmt: skip
    assert not empty, f"dashboard patterns that draw nothing: {empty}"


# -- nothing is left behind -----------------------------------------------------------------------------------


def _hooks(model: nn.Module) -> int:
    return sum(len(getattr(m, attr)) for m in model.modules() for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _tensors(obj: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` through containers and lightning_diag objects' attributes."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value, seen)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _tensors(value, seen)
    elif type(obj).__module__.startswith("lightning_diag") and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            yield from _tensors(value, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), seen)


@pytest.mark.parametrize("name", EXPORTED)
@pytest.mark.parametrize("fail", [None, "train", "val"])
def test_nothing_is_left_behind_after_fit_or_an_exception(name: str, fail: str | None) -> None:
    callback = make(name, action="skip" if name == "LossSpikeDetector" else "log")  # "skip" wraps optimizer.step
    model = Poisoned(fail=fail)
    trainer = make_trainer(callbacks=[callback], max_steps=8, log_every_n_steps=2)
    if fail is None:
        trainer.fit(model)
    else:
        with pytest.raises(RuntimeError, match="boom"):
            trainer.fit(model)
    assert _hooks(model) == 0
    assert all("step" not in vars(opt) for opt in trainer.optimizers)  # no wrapped optimizer.step
    assert not torch.overrides._get_current_function_mode_stack()
    held = len(list(_tensors(callback)))
    x = torch.randn(16, 8)
    for _ in range(100):
        model(x)
    assert len(list(_tensors(callback))) == held  # forwards after the run capture nothing


# -- alerts: none lost at the end, acted on within one step ---------------------------------------------------


@pytest.mark.parametrize("name", EXPORTED)
def test_alerts_after_the_last_logging_step_are_flushed_and_logged(name: str) -> None:
    callback = make(name, action="log")
    trainer = fit(callback, Poisoned(poison_at=9), max_steps=12, log_every_n_steps=50)  # no logging step at all
    critical = [a for a in callback.alerts if a.severity == "critical"]
    assert critical, f"{name} raised no critical alert on a NaN run"
    assert trainer.logger.history[f"{callback.family}/alerts"][-1][1] == pytest.approx(len(callback.serious_alerts))


@pytest.mark.parametrize("name", EXPORTED)
@pytest.mark.parametrize("action", ACTIONS)
def test_every_action_takes_effect_within_one_step_at_the_default_cadence(name: str, action: str) -> None:
    calls: list[tuple[int, int]] = []
    chosen = (
        (lambda alert, trainer: calls.append((alert.step, trainer.global_step))) if action == "callable" else action
    )
    callback = make(name, action=chosen)
    model = Poisoned(poison_at=5)
    trainer = make_trainer(callbacks=[callback], max_steps=40)  # Lightning's default log_every_n_steps=50
    if action == "raise":
        with pytest.raises(DivergenceError):
            trainer.fit(model)
    else:
        trainer.fit(model)
    acted = [a for a in callback.alerts if a.severity != "info"]
    assert acted, f"{name} raised no alert"
    first = acted[0]
    assert first.acted_step is not None and 0 <= first.acted_step - first.step <= 1
    if action == "stop":
        assert trainer.global_step <= first.step + 2  # stopped after the step it acted at
    if action == "callable":
        assert calls and calls[0][0] == first.step and calls[0][1] - first.step <= 2


# -- state: a resumed run equals an uninterrupted one ---------------------------------------------------------


@pytest.mark.parametrize("name", EXPORTED)
def test_checkpoint_resume_equals_an_uninterrupted_run(name: str, tmp_path: Path) -> None:
    kwargs = {"max_epochs": 4, "max_steps": -1, "log_every_n_steps": 3}
    torch.manual_seed(0)
    whole = make(name, action="log")
    fit(whole, Poisoned(poison_at=13), **kwargs)
    torch.manual_seed(0)
    first = make(name, action="log")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = make_trainer(callbacks=[first, checkpoint], max_epochs=2, log_every_n_steps=3, enable_checkpointing=True)
    trainer.fit(Poisoned(poison_at=13))  # 2 epochs of 4 steps: the checkpoint is at an epoch boundary
    resumed = make(name, action="log")
    trainer = make_trainer(callbacks=[resumed], **kwargs)
    trainer.fit(Poisoned(poison_at=13), ckpt_path=str(tmp_path / "last.ckpt"))
    assert_same_state([a.as_dict() for a in resumed.alerts], [a.as_dict() for a in whole.alerts], rel=1e-5, abs=1e-7,
                      where="alerts")
    assert_same_state(resumed.state_dict(), whole.state_dict(), rel=1e-5, abs=1e-7)


# -- arguments ------------------------------------------------------------------------------------------------


def _accepts(name: str, bad: dict[str, Any]) -> bool:
    return all(k in inspect.signature(getattr(lightning_diag.callbacks, name)).parameters for k in bad)


@pytest.mark.parametrize(("name", "bad", "value", "allowed"), [
    (name, bad, value, allowed) for name in EXPORTED for bad, value, allowed in [*COMMON_BAD, *CASES[name][1]]
    if _accepts(name, bad)])
def test_bad_arguments_give_a_value_error_naming_the_value_and_what_is_allowed(
    name: str, bad: dict[str, Any], value: str, allowed: str
) -> None:
    with pytest.raises(ValueError) as error:
        make(name, **bad)
    message = str(error.value)
    assert value in message and allowed in message and any(f"`{k}`" in message or k in message for k in bad)


def test_a_rule_on_a_key_the_monitor_does_not_log_is_refused_listing_the_keys() -> None:
    callback = make("GradNormWatcher", rules=[Above("grad_norm/totl", 1.0)])
    with pytest.raises(ValueError, match=r"grad_norm/total.*did you mean") as error:
        fit(callback, Poisoned(), max_steps=2)
    listed = str(error.value).split("keys: ")[1].split("; did you mean")[0]
    keys = [k.strip(" '") for k in listed.strip("[]").split(",")]
    assert keys == sorted(set(keys)) and "grad_norm/layer/{layer}" in keys  # each once (was: twice), sorted
    assert "did you mean 'grad_norm/total'" in str(error.value)


def _cadence_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning) and "every 50" in str(w.message)]


@pytest.mark.parametrize("name", EXPORTED)
def test_a_logging_cadence_longer_than_the_run_is_said_once_and_truly(name: str) -> None:
    callback = make(name, action="log")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(callback, Poisoned(), max_steps=12)  # Lightning's default log_every_n_steps=50 > 12 steps
    said = _cadence_warnings(caught)
    assert all(w.filename == __file__ for w in caught if str(w.message) in said)  # points at the user's code
    if name == "NCTracker":  # its figures are logged at every evaluation, whatever the logging cadence
        assert not said
        return
    assert len(said) == 1 and f"{callback.source} logs every 50 steps" in said[0]
    assert "logged once, at the end of the run" in said[0]  # was: "no figure will be logged before the end"
    figures = {k: v for k, v in trainer.logger.history.items() if k.startswith(f"{callback.family}/")
               and k != f"{callback.family}/alerts"}  # fmt: skip
    assert figures and all(len(rows) == 1 for rows in figures.values())  # as it says: one row, at the end
    assert len({rows[0][0] for rows in figures.values()}) == 1


def test_a_cadence_longer_than_the_run_is_said_once_per_trainer_for_all_its_monitors() -> None:
    monitors = [make(name, action="log") for name in EXPORTED]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(monitors[0], Poisoned(), max_steps=12, callbacks=monitors)
    (said,) = _cadence_warnings(caught)  # was: one per monitor, NCTracker included
    named = [m.source for m in monitors if m.source in said]
    assert named == [m.source for m in monitors if m.source != "NCTracker"] and "NCTracker" not in said


def test_figures_reach_the_keys_they_were_measured_for_whatever_their_order() -> None:
    """A monitor may hand per-layer figures before model-level ones; each value must keep its key."""
    from lightning_diag.callbacks._base import Figures
    from lightning_diag.keys import Key

    class Ordered(DiagnosticCallback):
        family = "ordered"
        KEYS = (Key("a/{layer}", "per layer", rate="step"), Key("b", "model level", rate="step"))

    monitor = Ordered()
    keys, values = monitor._pack(Figures({"a/{layer}": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}, ["x", "y"]))
    assert keys == ("ordered/b", "ordered/a/x", "ordered/a/y")
    assert values.tolist() == pytest.approx([3.0, 1.0, 2.0])



@pytest.mark.parametrize("second", [{}, {"include": ["*"]}], ids=["same state key", "same family"])
def test_two_monitors_of_one_kind_without_prefixes_are_refused_at_fit_start_saying_prefix(
    second: dict[str, Any]
) -> None:
    twins = [make("GradNormWatcher", action="log"), make("GradNormWatcher", action="log", **second)]
    trainer = make_trainer(callbacks=twins, max_steps=2)  # was: Lightning's RuntimeError here (one state key)
    with pytest.raises(ValueError, match=r"2 monitors .* log under 'grad_norm/'.*`prefix=`.*GradNormWatcher\(prefix="):
        trainer.fit(Poisoned())


@pytest.mark.parametrize("name", [n for n in EXPORTED if "prefix" in inspect.signature(
    getattr(lightning_diag.callbacks, n)).parameters])  # fmt: skip
def test_two_monitors_of_one_kind_with_their_own_prefixes_log_apart_and_resume_apart(name: str, tmp_path: Path) -> None:
    def pair() -> list[DiagnosticCallback]:
        return [make(name, action="log"), make(name, action="log", prefix="second")]

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first = pair()
    trainer = make_trainer(callbacks=[*first, checkpoint], max_epochs=1, log_every_n_steps=2, enable_checkpointing=True)
    trainer.fit(Poisoned(poison_at=2))
    families = {k.split("/")[0] for k in trainer.logger.history}
    assert {first[0].family, "second"} <= families
    assert first[1].alerts and all(a.source == f"{name}[second]" for a in first[1].alerts)
    resumed = pair()
    make_trainer(callbacks=resumed, max_epochs=1).fit(Poisoned(poison_at=2), ckpt_path=str(tmp_path / "last.ckpt"))
    assert [a.message for a in resumed[1].alerts] == [a.message for a in first[1].alerts]  # its own state
    assert [a.message for a in resumed[0].alerts] == [a.message for a in first[0].alerts]
