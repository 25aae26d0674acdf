"""What the base class owes every monitor: keys that survive any module name, a hook that never ends
the run by accident, alerts kept through an exception, rules on templates, and rule state that
survives a resume whatever the order of ``rules=``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from conftest import MixtureClassifier, assert_same_state, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import GradNormWatcher, LogitMonitor, SpectralAlignmentMonitor
from lightning_diag.alerts import Above, ZScore
from lightning_diag.callbacks._base import DiagnosticCallback, Figures, total_alerts
from lightning_diag.keys import Key, split_key

ODD = "blocks.enc/0"  # nn.ModuleDict accepts a "/" in a name; the key scheme splits keys on "/"


class OddNames(pl.LightningModule):
    """Linear encoder and attention under names holding "/", a linear head; 8 batches per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"enc/0": nn.Linear(8, 16),
                                     "att/0": nn.MultiheadAttention(16, 2, batch_first=True)})  # fmt: skip
        self.head = nn.Linear(16, 2)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 4, 8, generator=g)
        self.data = TensorDataset(x, (x.sum((1, 2)) > 0).long())

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.blocks["enc/0"](x))
        a, _ = self.blocks["att/0"](h, h, h)
        return self.head(a.mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


MONITORS = {
    "GradNormWatcher": (lambda: GradNormWatcher(action="log"), "layer", ODD),
    "SpectralAlignmentMonitor": (lambda: SpectralAlignmentMonitor(check_every_n_steps=2, warmup_steps=0,
                                                                  action="log"), "sigma1", ODD),
    "LogitMonitor": (lambda: LogitMonitor(check_every_n_steps=2, action="log"), "attention_max", "blocks.att/0"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(MONITORS))
def test_a_slash_in_a_module_name_keeps_every_step_and_its_per_layer_key(name: str) -> None:
    make, figure, layer = MONITORS[name]
    monitor = make()
    torch.manual_seed(0)
    trainer = make_trainer(callbacks=[monitor], max_epochs=3, max_steps=-1, log_every_n_steps=4)
    trainer.fit(OddNames())
    assert trainer.global_step == 24  # 3 epochs of 8 batches: none cut short
    keys = {k: v for k, v in trainer.logger.history.items() if k.startswith(f"{monitor.family}/{figure}/")}
    parts = {split_key(k): v for k, v in keys.items()}
    assert (monitor.family, figure, layer) in parts, sorted(keys)
    assert all(k.count("/") <= 2 for k in trainer.logger.history)  # the key scheme holds: a layer has no "/"
    assert all(torch.isfinite(torch.tensor(v)) for _, v in parts[(monitor.family, figure, layer)])


@pytest.mark.parametrize("layer", ["a/b", "a%2Fb", "%", "a/%2F/", "blocks.0.fc", "ünï cödé"])
def test_a_per_layer_key_names_any_layer_and_splits_back_to_it(layer: str) -> None:
    key = Key("layer/{layer}", "per layer").key("grad_norm", layer)
    assert key.count("/") == 2 and Key("layer/{layer}", "per layer").matches(key, "grad_norm")
    assert split_key(key) == ("grad_norm", "layer", layer)


class _Stepper(DiagnosticCallback):
    """A monitor whose ``measure`` raises StopIteration at step 2 (a ``next()`` on an empty iterator)."""

    family = "stepper"
    KEYS = (Key("value", "a constant", rate="step"),)

    def measures(self, step: int) -> bool:
        return True

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, logging: bool) -> Figures:
        if trainer.global_step == 2:
            next(iter(()))
        return Figures({"value": torch.tensor(1.0)})


def test_a_stop_iteration_in_a_hook_is_an_error_not_the_end_of_the_data() -> None:
    trainer = make_trainer(callbacks=[_Stepper(action="log")], max_epochs=1, max_steps=-1)
    with pytest.raises(RuntimeError, match="StopIteration") as error:
        trainer.fit(MixtureClassifier(n_per_class=16, batch_size=8))  # 8 batches: Lightning would stop at 2
    assert isinstance(error.value.__cause__, StopIteration)


class _FailsAfterMeasuring(MixtureClassifier):
    """Raises in ``optimizer_step`` at step ``fail_at``, after the monitors measured the step, before it ends."""

    def __init__(self, fail_at: int) -> None:
        super().__init__(n_per_class=16, batch_size=16)
        self.fail_at = fail_at

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        optimizer.step(closure=optimizer_closure)
        if self.trainer.global_step == self.fail_at:
            raise RuntimeError("boom after measuring")


def test_a_per_layer_alert_at_the_step_of_an_exception_is_kept() -> None:
    monitor = GradNormWatcher(action="log", rules=[Above("grad_norm/total", 0.0), Above("grad_norm/layer/*", 0.0)])
    trainer = make_trainer(callbacks=[monitor], max_steps=8, log_every_n_steps=4)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(_FailsAfterMeasuring(fail_at=3))  # step 3 is a logging step: its per-layer norms were held
    (per_layer,) = [a for a in monitor.alerts if a.metric.startswith("grad_norm/layer/")]  # one alert, every layer
    assert per_layer.metric == "grad_norm/layer/{layer}" and sorted(per_layer.layers) == sorted(monitor.layers)
    assert {a.step for a in monitor.alerts} == {0, 3}  # the total fired at step 0, the per-layer norms at step 3
    assert all(a.acted_step is None for a in monitor.alerts if a.step == 3)  # recorded, not acted on: the run ends


def test_a_rule_on_a_template_key_watches_every_layer() -> None:
    monitor = GradNormWatcher(action="log", rules=[Above("grad_norm/layer/{layer}", 0.0)])
    trainer = make_trainer(callbacks=[monitor], max_steps=4, log_every_n_steps=4)
    trainer.fit(MixtureClassifier(n_per_class=16, batch_size=16))
    (fired,) = monitor.alerts  # every layer crossed at one step: one alert naming them
    assert monitor.layers and fired.metric == "grad_norm/layer/{layer}" and fired.layers == tuple(monitor.layers)


def test_an_action_that_is_not_a_name_or_a_callable_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"`action` must be one of .*'stop'.*got \['stop'\]"):
        GradNormWatcher(action=["stop"])


def _rules() -> list[Any]:
    return [ZScore("grad_norm/total", 2.0, warmup=3), Above("grad_norm/total", 0.5, patience=2),
            Above("grad_norm/total", 0.5, patience=2, severity="critical"), Above("grad_norm/layer/*", 1.0)]


def test_a_resume_with_the_rules_in_another_order_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    whole = GradNormWatcher(action="log", rules=_rules())
    make_trainer(callbacks=[whole], max_epochs=4, max_steps=-1, log_every_n_steps=3).fit(
        MixtureClassifier(n_per_class=16, batch_size=16))
    torch.manual_seed(0)
    first = GradNormWatcher(action="log", rules=_rules())
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    make_trainer(callbacks=[first, checkpoint], max_epochs=2, log_every_n_steps=3, enable_checkpointing=True).fit(
        MixtureClassifier(n_per_class=16, batch_size=16))
    resumed = GradNormWatcher(action="log", rules=_rules()[::-1])
    make_trainer(callbacks=[resumed], max_epochs=4, max_steps=-1, log_every_n_steps=3).fit(
        MixtureClassifier(n_per_class=16, batch_size=16), ckpt_path=str(tmp_path / "last.ckpt"))
    assert whole.alerts, "the rules never fired: the test would prove nothing"
    assert_same_state(resumed.state_dict()["rules"], whole.state_dict()["rules"], rel=1e-6, abs=1e-9)
    order = {a.message: i for i, a in enumerate(whole.alerts)}
    assert_same_state(sorted([a.as_dict() for a in resumed.alerts], key=lambda a: (a["step"], order[a["message"]])),
                      [a.as_dict() for a in whole.alerts], rel=1e-5, abs=1e-7, where="alerts")



class _Nan(MixtureClassifier):
    """A classifier whose loss is NaN from optimizer step 2 on (its gradients, then its weights, follow)."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= 2 else loss


def test_a_nan_reaching_every_layer_is_one_critical_alert_naming_the_layers() -> None:
    monitor = SpectralAlignmentMonitor(check_every_n_steps=1, warmup_steps=0, action="warn")
    torch.manual_seed(0)
    with pytest.warns(UserWarning) as caught:
        make_trainer(callbacks=[monitor], max_steps=6, log_every_n_steps=2).fit(_Nan(n_per_class=16, batch_size=16))
    critical = [a for a in monitor.alerts if a.severity == "critical"]
    assert len(monitor.layers) > 1 and len(critical) == 1  # was: one per layer
    assert critical[0].metric == "spectral_alignment/sigma1/{layer}" and set(critical[0].layers) == set(monitor.layers)
    assert f"in {len(monitor.layers)} layers" in critical[0].message
    said = [w for w in caught if "non-finite" in str(w.message)]
    assert len(said) == 1  # one warning on the screen for the event


def test_the_alert_count_logged_and_shown_leaves_info_alerts_out() -> None:
    rules = [Above("grad_norm/total", 0.0, severity="info"), Above("grad_norm/layer/*", 0.0, severity="info"),
             Above("grad_norm/total", 0.0, severity="warning")]  # fmt: skip
    monitor = GradNormWatcher(action="log", rules=rules)
    trainer = make_trainer(callbacks=[monitor], max_steps=4, log_every_n_steps=2)
    trainer.fit(MixtureClassifier(n_per_class=16, batch_size=16))
    assert [a.severity for a in monitor.alerts] == ["info", "warning", "info"]  # .alerts keeps every record
    assert [a.severity for a in monitor.serious_alerts] == ["warning"]
    assert [v for _, v in trainer.logger.history["grad_norm/alerts"]] == [1.0, 1.0, 1.0]  # was: 2, 2, 3
    assert total_alerts(trainer) == 1  # the progress bar's item


def test_a_prefix_names_the_keys_the_rules_the_source_and_the_state_key() -> None:
    plain, own = GradNormWatcher(action="log"), GradNormWatcher(action="log", prefix="enc_grad", include=["body.*"])
    trainer = make_trainer(callbacks=[plain, own], max_steps=6, log_every_n_steps=2)
    torch.manual_seed(0)
    trainer.fit(_Nan(n_per_class=16, batch_size=16))
    logged = set(trainer.logger.history)
    assert {"grad_norm/total", "enc_grad/total", "grad_norm/alerts", "enc_grad/alerts"} <= logged
    assert all(split_key(k)[0] in ("grad_norm", "enc_grad") for k in logged if "/" in k)
    assert all(split_key(k)[2].startswith("body.") for k in logged if k.startswith("enc_grad/layer/"))
    assert [(a.source, a.metric) for a in own.alerts if a.severity == "critical"] == [
        ("GradNormWatcher[enc_grad]", "enc_grad/total")]  # its built-in rules watch its own keys
    assert own.state_key != plain.state_key and "enc_grad" in own.state_key
    assert plain.state_key == "GradNormWatcher{'include': None, 'exclude': None, 'group_depth': None}"  # unchanged
    with pytest.raises(ValueError, match=r"`prefix` must be None or a non-empty string without '/', got 'a/b'"):
        GradNormWatcher(prefix="a/b")


def test_a_monitor_whose_constructor_raised_is_no_twin_of_the_next_one() -> None:
    """A constructor that raises after the base's ``__init__`` leaves a half-built monitor behind
    (here kept alive by the traceback, as pytest keeps it); building the next monitor of that kind
    must not read its state key (before: ``AttributeError: ... no attribute 'loss_fn'`` when the
    next Trainer was built)."""
    from lightning_diag import SharpnessMonitor

    with pytest.raises(ValueError) as raised:
        SharpnessMonitor(check_every_n_steps=0)
    assert SharpnessMonitor().state_key.startswith("SharpnessMonitor")
    assert raised.traceback  # the half-built monitor was alive all along
