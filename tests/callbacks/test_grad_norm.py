"""GradNormWatcher against independent float64 references, inside real Lightning runs.

References are computed from gradients captured *outside* the watcher: in the LightningModule's
own ``on_before_optimizer_step`` (Lightning calls callback hooks first, module hook second) or in a
callback placed before or after the watcher in ``callbacks=[...]`` (Lightning keeps that order).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import (
    DispatchCounter,
    MemoryLogger,
    RowSplit,
    TinyModule,
    assert_same_state,
    ddp_on_cpu,
    fit,
    forbid_host_sync,
    make_trainer,
    wrap_hooks,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import Above, Alert, DivergenceError, GradNormWatcher, ZScore
from lightning_diag.alerts import DiagnosticWarning

# -- models and helpers -----------------------------------------------------------------------------


class CaptureMixin:
    """Records, per optimizer step, float64 copies of every trainable parameter and its gradient
    as the module's own ``on_before_optimizer_step`` sees them (after every callback hook)."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self.trainer.global_step
        self.grads[step] = {n: _dense64(p.grad) for n, p in self.named_parameters() if p.grad is not None}
        self.weights[step] = {n: p.detach().double().clone() for n, p in self.named_parameters() if p.requires_grad}


class CapturingTiny(CaptureMixin, TinyModule):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}


class MixedModule(CaptureMixin, pl.LightningModule):
    """Embedding -> Conv1d -> LayerNorm -> Linear, plus a parameter owned by the root module.

    ``nan_step``: a NaN is written into ``conv.weight.grad`` in ``on_after_backward`` (before the
    watcher) at that step and removed again in ``on_before_optimizer_step`` (after it), so training
    stays finite. ``sparse=True`` makes the embedding gradient sparse (SGD handles it).
    """

    def __init__(self, nan_step: int | None = None, sparse: bool = False, unused: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6, sparse=sparse)
        self.conv = nn.Conv1d(6, 5, kernel_size=3, padding=1)
        self.norm = nn.LayerNorm(5)
        self.head = nn.Linear(5, 1)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.unused = nn.Linear(3, 3) if unused else None
        self.nan_step = nan_step
        self.grads, self.weights = {}, {}
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 12, (48, 7), generator=g)
        self.data = TensorDataset(tokens, torch.randn(48, 1, generator=g))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.emb(tokens).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(self.norm(h))).mean(1) * self.scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, y = batch
        return nn.functional.mse_loss(self(tokens), y)

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.nan_step:
            self.conv.weight.grad[0, 0, 0] = float("nan")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        self.conv.weight.grad.nan_to_num_(0.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


MIXED_LAYERS = {
    "emb": ["emb.weight"],
    "conv": ["conv.weight", "conv.bias"],
    "norm": ["norm.weight", "norm.bias"],
    "head": ["head.weight", "head.bias"],
    "scale": ["scale"],
}


class Deep(CapturingTiny):
    """TinyModule with nested blocks, for ``group_depth``: ``blocks.<i>.{a,b}``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.blocks = nn.ModuleList(nn.ModuleDict({"a": nn.Linear(6, 6), "b": nn.Linear(6, 6)}) for _ in range(2))
        self.out = nn.Linear(6, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.net(x)
        for block in self.blocks:
            h = torch.tanh(block["b"](torch.tanh(block["a"](h))))
        return nn.functional.mse_loss(self.out(h), y)


def _dense64(t: torch.Tensor) -> torch.Tensor:
    return (t.to_dense() if t.is_sparse else t).detach().double().clone()


def _norm64(tensors: list[torch.Tensor]) -> float:
    """Float64 L2 norm of several tensors: per-tensor ``vector_norm``, then sqrt of the sum of squares."""
    return math.sqrt(sum(torch.linalg.vector_norm(t.double()).item() ** 2 for t in tensors))




class ToggleRule(Above):
    """A rule whose condition holds on every other evaluation (rules see the total every step, so it
    fires at steps 0, 2, 4, ...)."""

    def __init__(self, metric: str) -> None:
        super().__init__(metric, 0.0)
        self.calls = 0

    def hits(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.full(values.shape, self.calls % 2 == 1)


class ScaleGrads(Callback):
    """Multiplies every gradient by ``factor`` at ``step`` (place it before the watcher) and keeps
    float64 copies of the gradients as the watcher will receive them."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor
        self.grads: dict[int, list[torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        params = [p for p in pl_module.parameters() if p.grad is not None]
        if trainer.global_step == self.step:
            for p in params:
                p.grad.mul_(self.factor)
        self.grads[trainer.global_step] = [p.grad.detach().double().clone() for p in params]



# -- norms against float64 references ---------------------------------------------------------------


def test_norms_match_float64_reference_on_mixed_layers() -> None:
    torch.manual_seed(0)
    module = MixedModule()
    trainer = fit(module, GradNormWatcher(action="log"), max_steps=4)
    log = trainer.logger
    assert sorted(log.values("grad_norm/total")) == [0, 1, 2, 3]
    for step, grads in module.grads.items():
        weights = module.weights[step]
        assert log.values("grad_norm/total")[step] == pytest.approx(_norm64(list(grads.values())), rel=1e-5)
        assert log.values("grad_norm/nonfinite")[step] == 0
        for layer, names in MIXED_LAYERS.items():
            g, w = _norm64([grads[n] for n in names]), _norm64([weights[n] for n in names])
            assert log.values(f"grad_norm/layer/{layer}")[step] == pytest.approx(g, rel=1e-5)
            assert log.values(f"grad_norm/weight_norm/{layer}")[step] == pytest.approx(w, rel=1e-5)
            assert log.values(f"grad_norm/grad_weight_ratio/{layer}")[step] == pytest.approx(g / w, rel=1e-5)
    per_layer = {k.split("/")[2] for k in log.history if k.startswith("grad_norm/weight_norm/")}
    assert per_layer == set(MIXED_LAYERS)


def test_nan_gradient_is_counted_and_fires_a_critical_alert_at_its_step() -> None:
    torch.manual_seed(0)
    module = MixedModule(nan_step=2)
    received: list[Alert] = []
    watcher = GradNormWatcher(action=lambda alert, trainer: received.append(alert))
    log = fit(module, watcher, max_steps=5).logger
    assert [v for _, v in log.history["grad_norm/nonfinite"]] == [0, 0, 1, 0, 0]
    assert math.isnan(log.values("grad_norm/total")[2]) and math.isnan(log.values("grad_norm/layer/conv")[2])
    # the other layers of the NaN step are still measured exactly
    head = _norm64([module.grads[2][n] for n in MIXED_LAYERS["head"]])
    assert log.values("grad_norm/layer/head")[2] == pytest.approx(head, rel=1e-5)
    assert math.isfinite(log.values("grad_norm/total")[3])
    assert [(a.metric, a.step, a.severity, a.acted_step) for a in received] == [("grad_norm/total", 2, "critical", 2)]
    assert math.isnan(received[0].value)
    assert watcher.alerts == received
    assert log.values("grad_norm/alerts") == {0: 0, 1: 0, 2: 1, 3: 1, 4: 1}
    assert np.isfinite(watcher.baseline.mean).all() and watcher.baseline.count.tolist() == [4]  # NaN not absorbed


# -- fusion: op count does not grow with depth ------------------------------------------------------


def _hook_ops(depth: int, every_n_steps: int, step: int, **kwargs: Any) -> DispatchCounter:
    """Top-level ATen ops dispatched inside the watcher's hooks at optimizer step ``step``."""
    counter = DispatchCounter()

    def around(s: int, call: Callable[[], None]) -> None:
        if s == step:
            with counter:
                call()
        else:
            call()

    torch.manual_seed(0)
    watcher = GradNormWatcher(every_n_steps=every_n_steps, action="log", **kwargs)
    wrap_hooks(watcher, around)
    fit(TinyModule(depth=depth), watcher, max_steps=step + 1)
    return counter


# Ops per step, measured (TinyModule, the same at any depth). Quiet step: one _foreach_norm, its
# stack and the float64 total, which leaves for the host as it is; zclip adds 18: the coefficient
# from the host's baseline floats (17 one-element ops) and one _foreach_mul_. Logging step: the non-finite
# count and the per-layer figures, grouped on the device (index_add_), and one cat for the host
# read (the index of the streams among them is built once, at the first logging step); update_ratio
# adds a copy of the weights and, after the step, the norms of the updates and the model-level ratio
# (4 one-element ops and the stack that packs it). Norms are float64 from the foreach kernel itself.
QUIET_OPS = {"default": 3, "zclip+update": 21}
LOGGING_OPS = {"default": 27, "zclip+update": 62}


@pytest.mark.parametrize("kwargs", [{}, {"clip": "zclip", "update_ratio": True, "warmup": 2}],
                         ids=["default", "zclip+update"])
def test_hook_op_count_does_not_grow_with_depth(kwargs: dict[str, Any], request: pytest.FixtureRequest) -> None:
    name = request.node.callspec.id
    # step 2: with warmup=2 the baseline is ready, so the zclip coefficient is computed for real
    logging_10, logging_100 = _hook_ops(10, 1, 2, **kwargs), _hook_ops(100, 1, 2, **kwargs)
    assert logging_10.ops == logging_100.ops, (dict(logging_10.ops), dict(logging_100.ops))
    assert logging_10.total == LOGGING_OPS[name], dict(logging_10.ops)
    assert logging_10.ops["aten._foreach_norm"] == 2 + ("update_ratio" in kwargs)  # grads, weights, updates
    quiet_10, quiet_100 = _hook_ops(10, 5, 2, **kwargs), _hook_ops(100, 5, 2, **kwargs)
    assert quiet_10.ops == quiet_100.ops, (dict(quiet_10.ops), dict(quiet_100.ops))
    assert quiet_10.total == QUIET_OPS[name], dict(quiet_10.ops)
    assert quiet_10.ops["aten._foreach_norm"] == 1
    # no host read at all (an .item() or bool(tensor) shows up as _local_scalar_dense): the total
    # leaves for the host as a tensor and is read there without an op
    assert quiet_100.ops.get("aten._local_scalar_dense", 0) == 0
    assert logging_100.ops.get("aten._local_scalar_dense", 0) == 0


def test_op_counter_sees_growth_of_lightnings_per_parameter_grad_norm() -> None:
    """The counter is able to fail: Lightning's ``grad_norm`` utility dispatches ops per parameter."""
    from lightning.pytorch.utilities import grad_norm

    counts = []
    for depth in (10, 100):
        module = TinyModule(depth=depth)
        module.net(torch.randn(2, 4)).sum().backward()
        with DispatchCounter() as counter:
            grad_norm(module, norm_type=2)
        counts.append(counter.total)
    assert counts[1] > 5 * counts[0]


# -- accumulation, precision, DDP -------------------------------------------------------------------


def test_gradient_accumulation_logs_one_record_per_optimizer_step() -> None:
    torch.manual_seed(0)
    module = CapturingTiny()
    log = fit(module, GradNormWatcher(action="log"), max_steps=3, accumulate_grad_batches=4).logger
    assert [s for s, _ in log.history["grad_norm/total"]] == [0, 1, 2]
    for step, grads in module.grads.items():  # the accumulated gradient of 4 micro-batches
        assert log.values("grad_norm/total")[step] == pytest.approx(_norm64(list(grads.values())), rel=1e-5)


def test_bf16_mixed_precision_on_cpu_logs_finite_norms() -> None:
    torch.manual_seed(0)
    module = CapturingTiny()
    log = fit(module, GradNormWatcher(action="log"), max_steps=3, precision="bf16-mixed").logger
    totals = log.values("grad_norm/total")
    assert sorted(totals) == [0, 1, 2]
    for key, records in log.history.items():
        assert all(math.isfinite(v) for _, v in records), key
    for step, grads in module.grads.items():
        assert totals[step] == pytest.approx(_norm64(list(grads.values())), rel=1e-5)


@pytest.mark.parametrize(("init_scale", "patience", "streak"),
                         [(2.0**19, None, 5), (2.0**19, 1, 1), (2.0**24, None, 5)])
def test_fp16_unscaled_norms_and_overflow_steps_alert_after_five_in_a_row(
    init_scale: float, patience: int | None, streak: int
) -> None:
    """The loss scaler overflows (and skips) its first steps while it calibrates: 2 in a row from
    2**19 on this model, 7 from 2**24. Under a scaler the non-finite alert waits for 5 in a row
    (``nonfinite_patience=None``); with ``nonfinite_patience=1`` every overflow streak alerts."""
    torch.manual_seed(0)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10**6)
    module = CapturingTiny()
    watcher = GradNormWatcher(action="log", nonfinite_patience=patience)
    log = fit(module, watcher, max_steps=8, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).logger
    totals = log.values("grad_norm/total")
    overflow = [s for s in range(8) if not math.isfinite(_norm64(list(module.grads[s].values())))]
    assert overflow[:2] == [0, 1] and len(overflow) < 8
    for step in range(8):  # the gradients the optimizer gets, unscaled by Lightning before the hook
        reference = _norm64(list(module.grads[step].values()))
        assert totals[step] == pytest.approx(reference, rel=1e-5, nan_ok=True), step
        assert (log.values("grad_norm/nonfinite")[step] > 0) == (step in overflow), step
    # an alert where a streak of overflow steps reaches `streak`, once per streak
    expected = [s for s in overflow
                if all(t in overflow for t in range(s - streak + 1, s + 1)) and s - streak not in overflow]
    assert [(a.metric, a.step) for a in watcher.alerts] == [("grad_norm/total", s) for s in expected]
    if patience is None:  # calibration alone: silent from 2**19, one alert at the 5th overflow from 2**24
        assert expected == ([4] if init_scale == 2.0**24 else [])
    else:
        assert expected[0] == 0


class RowSplitTiny(RowSplit, TinyModule):
    """Rank r of w reads rows r, r + w, r + 2w, ... in order (Lightning's own sampler would shuffle)."""

    def rank_batch_size(self) -> int:
        return self.batch_size


class SaveState(Callback):
    """Each rank saves its watcher's state at the end of fit to ``<dirpath>/rank<r>.pt``."""

    def __init__(self, dirpath: Any) -> None:
        self.dirpath = dirpath

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        [watcher] = [c for c in trainer.callbacks if isinstance(c, GradNormWatcher)]
        torch.save(watcher.state_dict(), self.dirpath / f"rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_ddp_on_two_cpu_processes_logs_the_single_process_figures_and_every_rank_decides_alike(tmp_path: Any) -> None:
    def watcher() -> GradNormWatcher:
        return GradNormWatcher(action="log", warmup=2, rules=[Above("grad_norm/total", 0.0)])

    torch.manual_seed(0)
    single = fit(TinyModule(batch_size=8), watcher(), max_steps=3).logger
    # Two ranks of 4 rows: rank 0 reads rows 0, 2, 4, 6, rank 1 rows 1, 3, 5, 7, so each global batch
    # holds the 8 rows of the single-process batch, and DDP averages the two halves' gradients.
    torch.manual_seed(0)
    strategy = ddp_on_cpu()
    csv = CSVLogger(tmp_path, name="ddp", version=0)
    fit(RowSplitTiny(batch_size=4), watcher(), SaveState(tmp_path), max_steps=3, devices=2, strategy=strategy,
         logger=csv, use_distributed_sampler=False)
    rows = np.genfromtxt(tmp_path / "ddp" / "version_0" / "metrics.csv", delimiter=",", names=True, deletechars="")
    rows = rows[~np.isnan(rows["grad_norm/total"])]  # the rows of the figures (the alert count has its own at step 0)
    assert list(rows["step"]) == [0, 1, 2]  # rank zero logged, once per step
    for key in ("grad_norm/total", "grad_norm/layer/net.0", "grad_norm/weight_norm/net.2", "grad_norm/zscore",
                "grad_norm/baseline"):
        expected = [v for _, v in single.history[key]]
        np.testing.assert_allclose(rows[key], expected, rtol=1e-5, err_msg=key)
    assert abs(rows["grad_norm/zscore"][2]) > 1e-3  # past the warm-up: a real z-score was compared
    # the figures are global, so both ranks hold the same baseline and the same alerts
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert [(a["metric"], a["step"]) for a in rank0["alerts"]] == [("grad_norm/total", 0)]
    assert_same_state(rank0, rank1, rel=1e-9, abs=1e-12)


# -- update ratio, clipping, no side effects --------------------------------------------------------


class AdamTiny(CapturingTiny):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.trainer.global_step - 1  # the step that just ran
        self.after = getattr(self, "after", {})
        self.after[step] = {n: p.detach().double().clone() for n, p in self.named_parameters()}


def test_update_ratio_matches_reference_on_logging_steps() -> None:
    torch.manual_seed(0)
    module = AdamTiny()
    log = fit(module, GradNormWatcher(every_n_steps=2, update_ratio=True, action="log"), max_steps=5).logger
    layers = {"net.0": ["net.0.weight", "net.0.bias"], "net.2": ["net.2.weight", "net.2.bias"],
              "net.4": ["net.4.weight", "net.4.bias"]}
    assert sorted(log.values("grad_norm/update_ratio/net.0")) == [1, 3]
    for step in (1, 3):
        before, after = module.weights[step], module.after[step]
        for layer, names in layers.items():
            expected = _norm64([after[n] - before[n] for n in names]) / _norm64([before[n] for n in names])
            assert log.values(f"grad_norm/update_ratio/{layer}")[step] == pytest.approx(expected, rel=1e-4)
            assert expected > 0


def _zclip_reference(totals: list[float], warmup: int, alpha: float, z_threshold: float) -> list[tuple[float, float]]:
    """ZClip in float64: (z, clipped norm) per step, baseline fed with the clipped norm."""
    out, history, mean, var = [], [], 0.0, 0.0
    for g in totals:
        ready = len(history) >= warmup
        z = (g - mean) / (math.sqrt(var) + 1e-6) if ready else 0.0
        clipped = mean + z_threshold**2 / z * math.sqrt(var) if z > z_threshold else g
        out.append((z, clipped))
        if not ready:
            history.append(clipped)
            mean, var = float(np.mean(history)), float(np.var(history))
        else:
            mean = alpha * mean + (1 - alpha) * clipped
            var = alpha * var + (1 - alpha) * (clipped - mean) ** 2
            history.append(clipped)
    return out


def test_zclip_rescales_a_spike_to_the_adaptive_target_and_leaves_normal_steps_alone() -> None:
    torch.manual_seed(0)
    module = CapturingTiny(lr=0.02)
    spike = ScaleGrads(step=9, factor=30.0)
    watcher = GradNormWatcher(clip="zclip", warmup=5, action="log")
    log = fit(module, spike, watcher, max_steps=11).logger
    totals = [_norm64(spike.grads[s]) for s in range(11)]
    reference = _zclip_reference(totals, warmup=5, alpha=0.97, z_threshold=2.5)
    assert reference[9][0] > 2.5  # the injected spike is a spike
    for step, (z, clipped) in enumerate(reference):
        after = [module.grads[step][n] for n, p in module.named_parameters()]
        before = spike.grads[step]
        assert log.values("grad_norm/total")[step] == pytest.approx(totals[step], rel=1e-5)
        assert log.values("grad_norm/zscore")[step] == pytest.approx(z, rel=1e-4, abs=1e-4)
        assert log.values("grad_norm/clip_coef")[step] == pytest.approx(clipped / totals[step], rel=1e-4)
        if z > 2.5:
            assert _norm64(after) == pytest.approx(clipped, rel=1e-4)
            logged_target = log.values("grad_norm/clip_coef")[step] * log.values("grad_norm/total")[step]
            assert _norm64(after) == pytest.approx(logged_target, rel=1e-5)
            assert _norm64(after) < totals[step] / 5
        else:
            assert all(torch.equal(a, b) for a, b in zip(after, before)), step
    assert log.values("grad_norm/clipped_steps")[10] == sum(z > 2.5 for z, _ in reference)
    assert ("grad_norm/zscore", 9) in [(a.metric, a.step) for a in watcher.alerts]


@pytest.mark.parametrize("severity, raises", [("info", False), ("warning", True)])
def test_spike_alerts_are_info_by_default_and_acted_on_only_when_escalated(severity: str, raises: bool) -> None:
    torch.manual_seed(0)
    spike = ScaleGrads(step=9, factor=30.0)
    watcher = GradNormWatcher(warmup=5, action="raise", spike_severity=severity)
    trainer = make_trainer(callbacks=[spike, watcher], max_steps=11)
    if raises:
        with pytest.raises(DivergenceError, match="grad_norm/zscore"):
            trainer.fit(CapturingTiny(lr=0.02))
    else:
        trainer.fit(CapturingTiny(lr=0.02))
        assert trainer.global_step == 11
    acted = 9 if raises else None  # an info alert is never acted on
    assert [(a.metric, a.step, a.severity, a.acted_step) for a in watcher.alerts] == [
        ("grad_norm/zscore", 9, severity, acted)]
    assert trainer.logger.history["grad_norm/alerts"][-1][1] == (0.0 if severity == "info" else 1.0)  # info: uncounted


def test_monitor_only_run_is_bit_identical_to_a_run_without_the_callback() -> None:
    finals = []
    for callbacks in ([], [GradNormWatcher(every_n_steps=2, update_ratio=True, action="log", warmup=2)]):
        torch.manual_seed(0)
        module = MixedModule()
        fit(module, *callbacks, max_steps=6)
        finals.append({n: p.detach().clone() for n, p in module.named_parameters()})
    assert all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])


# -- checkpoint resume ------------------------------------------------------------------------------


def _resume_run(tmp_path: Any, stop_epoch: int | None) -> tuple[GradNormWatcher, MemoryLogger]:
    """4 epochs of 4 steps, a gradient spike at step 12; optionally interrupted after ``stop_epoch``.

    The checkpoint is taken at an epoch end, so the resumed run sees the same batches (unshuffled)
    as the uninterrupted one and must produce the same figures.
    """

    def parts() -> tuple[TinyModule, list[Callback], GradNormWatcher]:
        watcher = GradNormWatcher(warmup=3, action="log", every_n_steps=3, rules=[Above("grad_norm/total", 0.0)])
        return TinyModule(n=32), [ScaleGrads(step=12, factor=20.0), watcher], watcher

    torch.manual_seed(0)
    module, callbacks, watcher = parts()
    ckpt = None
    if stop_epoch is not None:
        trainer = make_trainer(callbacks=callbacks, max_steps=-1, max_epochs=stop_epoch)
        trainer.fit(module)
        ckpt = tmp_path / "interrupted.ckpt"
        trainer.save_checkpoint(ckpt)
        module, callbacks, watcher = parts()  # a fresh process: new module, new callbacks
    trainer = make_trainer(callbacks=callbacks, max_steps=-1, max_epochs=4)
    trainer.fit(module, ckpt_path=ckpt)
    return watcher, trainer.logger


def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path: Any) -> None:
    (straight, straight_log), (resumed, resumed_log) = _resume_run(tmp_path, None), _resume_run(tmp_path, 2)
    # one Above alert at step 0 (its streak carries over the resume) and the spike at step 12,
    # which is only a spike against a baseline that continued
    assert [(a.metric, a.step) for a in straight.alerts] == [("grad_norm/total", 0), ("grad_norm/zscore", 12)]
    assert resumed.alerts == straight.alerts
    assert_same_state(resumed.state_dict(), straight.state_dict(), rel=1e-9, abs=1e-12)
    assert int(resumed.baseline.count[0]) == 16  # no second warm-up
    # after the resume (step 8 on) the logged figures are those of the uninterrupted run
    for key in ("grad_norm/total", "grad_norm/zscore", "grad_norm/baseline", "grad_norm/layer/net.0",
                "grad_norm/alerts"):
        # logging steps 8, 11, 14; the host's figures of the last step are flushed at the end of fit
        # (per-layer figures are measured on logging steps only); the alert count also where a warning or
        # critical fired (not at 12: the z-score alert there is info)
        steps = {"grad_norm/alerts": [8, 11, 14, 15], "grad_norm/layer/net.0": [8, 11, 14]}.get(
            key, [8, 11, 14, 15])
        assert [s for s, _ in resumed_log.history[key]] == steps, key
        expected = [(s, pytest.approx(v, rel=1e-6)) for s, v in straight_log.history[key] if s >= 8]
        assert resumed_log.history[key] == expected, key


# -- alert actions ----------------------------------------------------------------------------------


def test_stop_action_stops_the_trainer_and_checkpointing_still_saves(tmp_path: Any) -> None:
    watcher = GradNormWatcher(every_n_steps=2, action="stop", rules=[Above("grad_norm/total", 0.0)])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = fit(TinyModule(), watcher, checkpoint, max_steps=10, enable_checkpointing=True)
    # fired at step 0, before the first logging step (1): acted on at once, the run ended after step 0
    assert [(a.metric, a.step, a.acted_step) for a in watcher.alerts] == [("grad_norm/total", 0, 0)]
    assert trainer.global_step == 1
    assert trainer.should_stop
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 1
    assert trainer.logger.history["grad_norm/alerts"][-1] == (0, 1.0)  # logged, though step 0 is no logging step


def test_raise_action_raises_divergence_error() -> None:
    watcher = GradNormWatcher(action="raise", rules=[Above("grad_norm/total", 0.0)])
    trainer = make_trainer(callbacks=[watcher], max_steps=10)
    with pytest.raises(DivergenceError) as error:
        trainer.fit(TinyModule())
    assert [(a.metric, a.step, a.acted_step) for a in error.value.alerts] == [("grad_norm/total", 0, 0)]
    assert trainer.global_step == 1  # raised in the hook after step 0's optimizer step, before step 1
    assert watcher.alerts == error.value.alerts


def test_callable_action_receives_every_alert_with_the_trainer() -> None:
    seen: list[tuple[Alert, pl.Trainer]] = []
    watcher = GradNormWatcher(action=lambda alert, trainer: seen.append((alert, trainer)),
                              rules=[ToggleRule("grad_norm/total")])
    trainer = fit(TinyModule(), watcher, max_steps=6)
    assert [a.step for a, _ in seen] == [0, 2, 4]
    assert all(isinstance(a, Alert) and t is trainer for a, t in seen)
    assert seen[0][0].source == "GradNormWatcher" and "grad_norm/total" in seen[0][0].message


def test_warn_action_warns_at_most_five_times_per_metric() -> None:
    watcher = GradNormWatcher(action="warn", rules=[ToggleRule("grad_norm/total")])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(TinyModule(), watcher, max_steps=20)
    ours = [w for w in caught if "GradNormWatcher: grad_norm/total" in str(w.message)]
    assert len(watcher.alerts) == 10
    assert len(ours) == 5 and all(issubclass(w.category, DiagnosticWarning) for w in ours)
    assert all(str(w.message).startswith("lightning_diag: ") for w in ours)
    assert "further alerts on this metric are logged only" in str(ours[-1].message)


class NanGrads(Callback):
    """Writes a NaN into the first gradient from optimizer step ``start`` on (place it before the watcher)."""

    def __init__(self, start: int) -> None:
        self.start = start

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if trainer.global_step >= self.start:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


def test_alert_after_the_last_logging_step_is_kept_logged_and_written(tmp_path: Any) -> None:
    """Issue 10, fault 4. Before: alerts reached the host only at logging steps, so with
    ``log_every_n_steps=5`` the NaN gradients of steps 10 and 11 (after the last logging step, 9)
    were never seen: the 12-step run ended with an empty ``callback.alerts`` and nothing logged."""
    memory = MemoryLogger()
    csv, tensorboard = CSVLogger(tmp_path, name="csv", version=0), TensorBoardLogger(tmp_path, name="tb", version=0)
    watcher = GradNormWatcher(action="log")
    fit(TinyModule(), NanGrads(start=10), watcher, max_steps=12, log_every_n_steps=5,
         logger=[memory, csv, tensorboard])
    assert [(a.metric, a.step, a.severity, a.acted_step) for a in watcher.alerts] == [
        ("grad_norm/total", 10, "critical", 10)]
    assert memory.history["grad_norm/alerts"][-1] == (11, 1.0)  # the last step, flushed at the end of fit
    assert (10, 1.0) in memory.history["grad_norm/alerts"]
    assert math.isnan(memory.values("grad_norm/total")[11])
    rows = np.genfromtxt(tmp_path / "csv" / "version_0" / "metrics.csv", delimiter=",", names=True, deletechars="")
    alerts_column = {int(step): v for step, v in zip(rows["step"], rows["grad_norm/alerts"]) if not np.isnan(v)}
    assert alerts_column[4] == 0 and alerts_column[9] == 0 and alerts_column[10] == 1 and alerts_column[11] == 1
    for logger in (csv, tensorboard):
        lines = (Path(logger.log_dir) / "lightning_diag_alerts.jsonl").read_text().splitlines()
        assert [json.loads(line)["metric"] for line in lines] == ["grad_norm/total"]
        record = json.loads(lines[0])
        assert (record["step"], record["severity"], record["acted_step"], record["source"]) == (
            10, "critical", 10, "GradNormWatcher")
        assert record["value"] == "nan"  # strict JSON: a non-finite value is written as a string


def _callable_action(alert: Alert, trainer: pl.Trainer) -> None:
    trainer.should_stop = True


@pytest.mark.parametrize("action", ["stop", "raise", "callable"])
def test_action_takes_effect_within_one_step_at_the_default_logging_cadence(action: str) -> None:
    """Issue 10, action latency. Before: the alert reached the host at the next logging step only,
    so with Lightning's default ``log_every_n_steps=50`` NaN gradients at step 10 with
    ``action="stop"`` stopped the trainer at step 50, after 40 steps of NaN training."""
    watcher = GradNormWatcher(action=_callable_action if action == "callable" else action)
    trainer = make_trainer(callbacks=[NanGrads(start=10), watcher], max_steps=40, log_every_n_steps=50)
    if action == "raise":
        with pytest.raises(DivergenceError, match="grad_norm/total"):
            trainer.fit(TinyModule(n=400))
    else:
        trainer.fit(TinyModule(n=400))
    assert trainer.global_step <= 12  # stopped (or raised) at step 10 or 11, not at the logging step 49
    [alert] = watcher.alerts
    assert (alert.metric, alert.step, alert.severity) == ("grad_norm/total", 10, "critical")
    assert alert.acted_step is not None and 0 <= alert.acted_step - alert.step <= 1
    assert math.isnan(alert.value)


def test_one_rule_is_accepted_without_a_list_and_a_nonpositive_zscore_threshold_is_refused() -> None:
    """Issue 10, fault 7. Before: ``rules=Above(...)`` failed with ``'Above' object is not iterable``
    and ``ZScore(..., threshold=-1)`` was accepted and fired on every value."""
    watcher = GradNormWatcher(action="log", rules=Above("grad_norm/total", 0.0))
    fit(TinyModule(), watcher, max_steps=2)
    assert [(a.metric, a.step) for a in watcher.alerts] == [("grad_norm/total", 0)]
    with pytest.raises(ValueError, match=r"`threshold` of a z-score must be > 0.*got -1"):
        GradNormWatcher(rules=ZScore("grad_norm/total", threshold=-1))
    with pytest.raises(ValueError, match="`rules` must be a rule or a list of rules"):
        GradNormWatcher(rules="grad_norm/total")


# -- TensorBoard ------------------------------------------------------------------------------------


def test_metrics_and_alert_text_arrive_in_tensorboard_event_file(tmp_path: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    memory = MemoryLogger()
    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    watcher = GradNormWatcher(action="log", rules=[Above("grad_norm/total", 0.0)])
    fit(TinyModule(), watcher, max_steps=3, logger=[tensorboard, memory])
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for key in ("grad_norm/total", "grad_norm/layer/net.0", "grad_norm/weight_norm/net.4",
                "grad_norm/grad_weight_ratio/net.2", "grad_norm/alerts"):
        assert key in scalars
        assert [(e.step, e.value) for e in events.Scalars(key)] == [
            (s, pytest.approx(v, rel=1e-6)) for s, v in memory.history[key]]
    text_tag = "grad_norm/alerts/text_summary"
    assert text_tag in events.Tags()["tensors"]
    (event,) = events.Tensors(text_tag)
    assert event.step == 0
    assert event.tensor_proto.string_val[0].decode() == f"[warning] {watcher.alerts[0].message}"
    lines = (tmp_path / "tb" / "version_0" / "lightning_diag_alerts.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [a.as_dict() for a in watcher.alerts]


def test_per_layer_norm_histograms_arrive_at_their_cadence(tmp_path: Any) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tensorboard = TensorBoardLogger(tmp_path, name="tb", version=0)
    memory = MemoryLogger()
    watcher = GradNormWatcher(every_n_steps=2, histogram_every_n_steps=3, action="log")
    fit(TinyModule(), watcher, max_steps=8, logger=[tensorboard, memory])
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    events.Reload()
    # logging steps 1, 3, 5, 7; the first at or after each multiple of 3 steps: 3 (after 3) and 5 (after 6)
    grads = events.Histograms("grad_norm/layer_hist")
    assert [h.step for h in grads] == [3, 5]
    layers = [k for k in memory.history if k.startswith("grad_norm/layer/")]
    for histogram in grads:
        values = sorted(v for k in layers for s, v in memory.history[k] if s == histogram.step)
        assert histogram.histogram_value.num == len(layers)
        assert histogram.histogram_value.min == pytest.approx(values[0], rel=1e-6)
        assert histogram.histogram_value.max == pytest.approx(values[-1], rel=1e-6)
    assert [h.step for h in events.Histograms("grad_norm/weight_norm_hist")] == [3, 5]


# -- odd models and bad arguments -------------------------------------------------------------------


class FrozenModule(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + torch.zeros((), requires_grad=True)


def test_model_without_trainable_parameters_warns_once_and_runs() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(FrozenModule(), GradNormWatcher(), max_steps=3)
    assert trainer.global_step == 3
    assert len([w for w in caught if "no trainable parameter" in str(w.message)]) == 1
    assert not [k for k in trainer.logger.history if k.startswith("grad_norm/")]


def test_unused_layer_keys_are_absent_and_frozen_layers_are_excluded() -> None:
    torch.manual_seed(0)
    module = MixedModule(unused=True)
    module.norm.requires_grad_(False)
    log = fit(module, GradNormWatcher(action="log"), max_steps=2).logger
    layers = {k.split("/")[2] for k in log.history if k.startswith("grad_norm/weight_norm/")}
    assert layers == set(MIXED_LAYERS) - {"norm"}  # `unused` has None grads, `norm` is frozen
    for step, grads in module.grads.items():
        assert "unused.weight" not in grads
        assert log.values("grad_norm/total")[step] == pytest.approx(_norm64(list(grads.values())), rel=1e-5)


def test_sparse_embedding_gradient_is_measured() -> None:
    torch.manual_seed(0)
    module = MixedModule(sparse=True)
    log = fit(module, GradNormWatcher(action="log"), max_steps=3).logger
    assert module.emb.weight.grad.is_sparse
    for step, grads in module.grads.items():
        assert log.values("grad_norm/layer/emb")[step] == pytest.approx(_norm64([grads["emb.weight"]]), rel=1e-5)
        assert log.values("grad_norm/total")[step] == pytest.approx(_norm64(list(grads.values())), rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "layers"),
    [
        (dict(include=["net.0*"]), {"net.0": ["net.0.weight", "net.0.bias"]}),
        (dict(exclude=["*.bias", "out"]), {"net.0": ["net.0.weight"], "blocks.0.a": ["blocks.0.a.weight"],
                                          "blocks.0.b": ["blocks.0.b.weight"], "blocks.1.a": ["blocks.1.a.weight"],
                                          "blocks.1.b": ["blocks.1.b.weight"]}),
        (dict(group_depth=2, exclude=["net.*"]), {
            "blocks.0": [f"blocks.0.{m}.{p}" for m in "ab" for p in ("weight", "bias")],
            "blocks.1": [f"blocks.1.{m}.{p}" for m in "ab" for p in ("weight", "bias")],
            "out": ["out.weight", "out.bias"]}),
    ],
    ids=["include", "exclude", "group_depth"],
)
def test_layer_selection_and_grouping(kwargs: dict[str, Any], layers: dict[str, list[str]]) -> None:
    torch.manual_seed(0)
    module = Deep()
    log = fit(module, GradNormWatcher(action="log", **kwargs), max_steps=2).logger
    assert {k.split("/")[2] for k in log.history if k.startswith("grad_norm/weight_norm/")} == set(layers)
    for step, grads in module.grads.items():
        watched = [grads[n] for names in layers.values() for n in names]
        assert log.values("grad_norm/total")[step] == pytest.approx(_norm64(watched), rel=1e-5)
        for layer, names in layers.items():
            expected = _norm64([grads[n] for n in names])
            assert log.values(f"grad_norm/layer/{layer}")[step] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        (dict(every_n_steps=0), "0"),
        (dict(clip="foo"), "'foo'"),
        (dict(action="explode"), "'explode'"),
        (dict(z_threshold=-1), "-1"),
        (dict(group_depth=0), "0"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs: dict[str, Any], shown: str) -> None:
    with pytest.raises(ValueError, match=f"got {shown}"):
        GradNormWatcher(**kwargs)


def test_include_matching_nothing_raises_value_error_listing_parameters() -> None:
    trainer = make_trainer(callbacks=[GradNormWatcher(include=["decoder.*"])], max_steps=1)
    with pytest.raises(ValueError, match=r"decoder\.\*.*net\.0\.weight"):
        trainer.fit(TinyModule())


# -- CUDA -------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_between_logging_steps_on_cuda() -> None:
    # step 0 builds the layer index on the device once (a host-to-device copy); after that, a step
    # that does not log must not wait for the GPU (its total leaves by a non-blocking copy into
    # pinned memory, read at the next step)
    watcher = GradNormWatcher(every_n_steps=5, clip="zclip", warmup=2, action="log")
    checked = forbid_host_sync(watcher, {s for s in range(1, 12) if (s + 1) % 5 != 0})
    trainer = make_trainer(callbacks=[watcher], max_steps=12, accelerator="gpu")
    trainer.fit(TinyModule())
    assert checked == {1, 2, 3, 5, 6, 7, 8, 10, 11}
    # logging steps 4 and 9; the host's figures of the last step are flushed at the end of fit
    assert sorted(trainer.logger.values("grad_norm/total")) == [4, 9, 11]


# -- safety issue: overflow, several optimizers, unfreezing, model-level update ratio, arguments ---


def _numpy_norm(tensors: list[torch.Tensor]) -> float:
    """Float64 numpy L2 norm over several tensors (squares summed in float64: no overflow below 1e154)."""
    return float(np.sqrt(sum(np.sum(t.double().numpy() ** 2) for t in tensors)))


def test_zclip_clips_a_finite_gradient_whose_float32_squares_overflow() -> None:
    """Before: float32 per-tensor norms of a 1e20-scale gradient overflowed (1e40 > 3.4e38), the total
    read as inf, ZClip left it alone and SGD took the step (weights of order 1e18)."""
    torch.manual_seed(0)
    module = CapturingTiny(lr=0.02)
    spike = ScaleGrads(step=9, factor=1e20)
    watcher = GradNormWatcher(clip="zclip", warmup=5, action="log")
    log = fit(module, spike, watcher, max_steps=11).logger
    totals = [_numpy_norm(spike.grads[s]) for s in range(11)]
    assert 1e19 < totals[9] < 1e23 and all(math.isfinite(t) for t in totals)
    z, clipped = _zclip_reference(totals, warmup=5, alpha=0.97, z_threshold=2.5)[9]
    assert z > 2.5
    assert log.values("grad_norm/total")[9] == pytest.approx(totals[9], rel=1e-5)
    assert log.values("grad_norm/nonfinite")[9] == pytest.approx(0.0, abs=1e-12)
    assert log.values("grad_norm/clip_coef")[9] == pytest.approx(clipped / totals[9], rel=1e-4)
    assert _numpy_norm(list(module.grads[9].values())) == pytest.approx(clipped, rel=1e-4)  # what SGD received
    assert not watcher.alerts or all(a.metric != "grad_norm/total" for a in watcher.alerts)
    weights = [p.detach() for p in module.parameters()]
    assert max(float(w.abs().max()) for w in weights) < 10.0


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: ``first`` and ``second`` are two regressors with an optimizer each; every
    batch steps ``first`` (global steps 0, 2, 4, ...) then ``second`` (1, 3, 5, ...). Gradients are
    zeroed *before* each backward only, so at ``second``'s step ``first`` still holds its (applied)
    gradient. The module records, per global step, float64 copies of the stepping optimizer's gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.first, self.second = nn.Linear(4, 1), nn.Linear(4, 1)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(80, 4, generator=g)
        self.data = TensorDataset(x, x.sum(1, keepdim=True).sin())
        self.grads: dict[int, list[torch.Tensor]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for optimizer, net in zip(self.optimizers(), (self.first, self.second)):
            optimizer.zero_grad()
            self.manual_backward(nn.functional.mse_loss(net(x), y))
            optimizer.step()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads[self.trainer.global_step] = [p.grad.double().clone() for g in optimizer.param_groups
                                                for p in g["params"]]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.first.parameters(), lr=0.05), torch.optim.SGD(self.second.parameters(), lr=0.05)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


def test_manual_optimization_with_two_optimizers_logs_every_logging_step_and_each_optimizers_layers() -> None:
    """Before: with 2 optimizers global_step advances twice per batch; the figures of a logging step
    taken by the first optimizer (4, 14) were held and never published, so only 9 and 19 were logged
    and ``first`` never; and a step also measured the other optimizer's stale gradients."""
    module = TwoOptimizers()
    watcher = GradNormWatcher(every_n_steps=5, update_ratio=True, action="log")
    log = fit(module, watcher, max_steps=20).logger  # 10 batches
    assert module.trainer.global_step == 20
    # hand-built: the logging steps of global_step (s + 1) % 5 == 0; even steps are `first`'s, odd `second`'s
    assert sorted(log.values("grad_norm/layer/first")) == [4, 14]
    assert sorted(log.values("grad_norm/layer/second")) == [9, 19]
    assert sorted(log.values("grad_norm/nonfinite")) == [4, 9, 14, 19]
    for step in (4, 9, 14, 19):
        layer = "first" if step % 2 == 0 else "second"
        reference = _norm64(module.grads[step])  # the stepping optimizer's gradients only
        assert log.values("grad_norm/total")[step] == pytest.approx(reference, rel=1e-5), step
        assert log.values(f"grad_norm/layer/{layer}")[step] == pytest.approx(reference, rel=1e-5), step
        # SGD moves the layer by lr * g: its update ratio is lr * ||g|| / ||w||, measured once it has stepped
        ratio = 0.05 * reference / log.values(f"grad_norm/weight_norm/{layer}")[step]
        assert log.values(f"grad_norm/update_ratio/{layer}")[step] == pytest.approx(ratio, rel=1e-4), step


def test_one_baseline_for_two_optimizers_is_said_once() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(TwoOptimizers(), GradNormWatcher(clip="zclip", action="log"), max_steps=6)
    said = [str(w.message) for w in caught if "optimizers step in this run" in str(w.message)]
    assert len(said) == 1 and "clipping" in said[0]


class UnfreezeAt(Callback):
    """Sets ``requires_grad`` of ``module.net[0]`` to True at the start of global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step == self.step:
            pl_module.net[0].requires_grad_(True)


def test_parameters_unfrozen_mid_run_are_watched_from_then_on() -> None:
    """Before: the watched parameters were resolved once at fit start, so ``net.0`` (frozen then)
    was never measured: ``grad_norm/total`` missed it after the unfreeze."""
    torch.manual_seed(0)
    module = CapturingTiny()
    module.net[0].requires_grad_(False)  # the optimizer holds it (SGD over all parameters) and steps it once unfrozen
    log = fit(module, UnfreezeAt(3), GradNormWatcher(action="log"), max_steps=6).logger
    assert "net.0.weight" not in module.grads[2] and "net.0.weight" in module.grads[3]
    for step in range(6):
        reference = _norm64(list(module.grads[step].values()))  # every parameter holding a gradient
        assert log.values("grad_norm/total")[step] == pytest.approx(reference, rel=1e-5), step
    assert sorted(log.values("grad_norm/layer/net.0")) == [3, 4, 5]


def test_model_level_update_ratio_is_logged_without_per_layer_figures() -> None:
    """Before: ``update_ratio=True, per_layer=False`` declared ``update_ratio`` and never logged it."""
    torch.manual_seed(0)
    module = AdamTiny()
    watcher = GradNormWatcher(every_n_steps=2, update_ratio=True, per_layer=False, action="log")
    log = fit(module, watcher, max_steps=5).logger
    assert sorted(log.values("grad_norm/update_ratio")) == [1, 3]
    assert not [k for k in log.history if k.count("/") == 2]  # no per-layer key
    for step in (1, 3):
        before, after = module.weights[step], module.after[step]
        expected = _numpy_norm([after[n] - before[n] for n in before]) / _numpy_norm(list(before.values()))
        assert expected > 0
        assert log.values("grad_norm/update_ratio")[step] == pytest.approx(expected, rel=1e-4)
    assert {k.name for k in watcher.declared_keys()} >= {"update_ratio"}
    assert "update_ratio/{layer}" not in {k.name for k in watcher.declared_keys()}


def test_model_level_update_ratio_agrees_with_the_per_layer_ones() -> None:
    torch.manual_seed(0)
    module = AdamTiny()
    log = fit(module, GradNormWatcher(every_n_steps=2, update_ratio=True, action="log"), max_steps=3).logger
    before, after = module.weights[1], module.after[1]
    expected = _numpy_norm([after[n] - before[n] for n in before]) / _numpy_norm(list(before.values()))
    assert log.values("grad_norm/update_ratio")[1] == pytest.approx(expected, rel=1e-4)
    assert sorted(log.values("grad_norm/update_ratio/net.2")) == [1]


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [
        (dict(per_layer="no"), "'no'"),
        (dict(per_layer=1), "1"),
        (dict(update_ratio="yes"), "'yes'"),
        (dict(update_ratio=None), "None"),
        (dict(z_threshold="2.5"), "'2.5'"),
        (dict(z_threshold=True), "True"),
        (dict(z_threshold=0.0), "0.0"),
        (dict(z_threshold=float("nan")), "nan"),
        (dict(alpha=1.0), "1.0"),
        (dict(alpha=0), "0"),
        (dict(alpha="0.9"), "'0.9'"),
        (dict(alpha=True), "True"),
    ],
    ids=lambda v: repr(v) if not isinstance(v, dict) else ",".join(f"{k}={v!r}" for k, v in v.items()),
)
def test_bad_boolean_and_number_arguments_raise_value_error_naming_the_value(
    kwargs: dict[str, Any], shown: str
) -> None:
    (name,) = kwargs
    with pytest.raises(ValueError, match=rf"`{name}` must be .*got {shown}$"):
        GradNormWatcher(**kwargs)


class _NanFrom(TinyModule):
    """A regressor whose loss is NaN from optimizer step ``at`` on (every layer's gradient is NaN)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.at else loss


def test_a_nan_in_every_layer_is_one_critical_alert_and_one_warning_naming_the_layers() -> None:
    from lightning_diag.alerts import NonFinite

    watcher = GradNormWatcher(rules=[NonFinite("grad_norm/layer/{layer}")])  # action="warn"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(callbacks=[watcher], max_steps=6, log_every_n_steps=2).fit(_NanFrom(at=2))
    per_layer = [a for a in watcher.alerts if a.metric.startswith("grad_norm/layer/")]
    assert len(watcher.layers) == 3 and len(per_layer) == 1  # was: one per layer
    (alert,) = per_layer
    assert (alert.metric, alert.layers, alert.step, alert.severity) == (
        "grad_norm/layer/{layer}", tuple(watcher.layers), 3, "critical")  # the first logging step after the NaN
    assert "in 3 layers: net.0 (nan), net.2 (nan), net.4 (nan)" in alert.message
    said = [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning) and "grad_norm/layer" in
            str(w.message)]  # fmt: skip
    assert said == [f"lightning_diag: {alert}"]


def test_info_spikes_of_a_healthy_run_are_recorded_but_not_counted_as_alerts() -> None:
    watcher = GradNormWatcher(z_threshold=0.5, warmup=3, action="log")  # spikes are "info" by default
    trainer = make_trainer(callbacks=[watcher], max_steps=24, log_every_n_steps=4)
    trainer.fit(TinyModule())
    assert watcher.alerts and all(a.severity == "info" for a in watcher.alerts)  # recorded, every one
    assert watcher.serious_alerts == []
    assert {v for _, v in trainer.logger.history["grad_norm/alerts"]} == {0.0}  # was: the info count
