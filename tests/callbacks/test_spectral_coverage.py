"""SpectralAlignmentMonitor beyond nn.Linear, and its adaptive cadence, against float64 references.

``nn.Conv2d`` (``groups=1``, zero padding) is watched on its unfolded input patches and
``nn.LSTM``/``nn.GRU`` through the input-to-hidden weight of their first layer. Each reference is
computed by the test alone: input rows from its own forward pre-hooks (``F.unfold`` of the captured
convolution input) or from the batch itself (recurrent nets), and numpy's SVD of the weight in
float64. Checks alternate between the two ways the monitor measures: sign counts only (a check
whose figures are not logged: its collapse is read where the host receives it) and full moments (a
check the next logging step logs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DispatchCounter, make_trainer
from lightning.pytorch.callbacks import Callback
from test_spectral_alignment import Aligning
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag.callbacks.spectral_alignment import SpectralAlignmentMonitor

SA = "spectral_alignment"
FIGURES = ("sign_diversity", "collapse", "mean_abs", "abs_mean", "std", "sigma1", "stable_rank")
EXACT = {"check_every_n_steps": 1, "every_n_steps": 2, "power_iterations": 300, "action": "log"}  # quiet, full, ...


def _reference(weight: np.ndarray, rows: np.ndarray) -> dict[str, float]:
    """Every per-layer figure in float64: numpy's SVD of ``weight`` and the signs of ``rows`` projected on v1."""
    _, s, vt = np.linalg.svd(weight)
    norms = np.linalg.norm(rows, axis=1)
    sa = np.divide(rows @ vt[0], norms, out=np.zeros(len(rows)), where=norms > 0)  # zero rows: no sign
    # A float32 v1 must give the same signs: no row may lie within rounding of the plane v1^T x = 0.
    assert np.abs(sa[norms > 0]).min() > 1e-5, "test data: a row is orthogonal to v1 within rounding"
    pos, neg = (sa > 0).sum(), (sa < 0).sum()
    collapse = abs(pos - neg) / (pos + neg)
    return {"sign_diversity": 1 - collapse, "collapse": collapse, "mean_abs": np.abs(sa).mean(),
            "abs_mean": abs(sa.mean()), "std": sa.std(), "sigma1": s[0], "stable_rank": (weight**2).sum() / s[0] ** 2}


class Record(Callback):
    """Placed after the monitor: each map's 2-D weight (float64) at each optimizer step, and the
    collapse the host received at every check (``derive``), quiet checks included."""

    def __init__(self, monitor: SpectralAlignmentMonitor, weights: dict[str, Callable[[nn.Module], torch.Tensor]]):
        self.weights, self.seen, self.collapse = weights, {}, {}
        derive = monitor.derive

        def recording(host: Any) -> Any:
            self.collapse[host.step] = dict(zip(host.layers, host.per_layer["collapse/{layer}"].tolist()))
            return derive(host)

        monitor.derive = recording

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.seen[trainer.global_step] = {n: w(pl_module).detach().double().numpy().copy()
                                          for n, w in self.weights.items()}  # fmt: skip


def _fit(module: pl.LightningModule, *callbacks: Callback, **kwargs: Any) -> dict[str, list[tuple[int, float]]]:
    trainer = make_trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(module)
    return dict(trainer.logger.history)


def _layers(log: dict[str, Any]) -> list[str]:
    return sorted(k.rpartition("/")[2] for k in log if k.startswith(f"{SA}/sigma1/"))


def _assert_figures(log: dict[str, Any], record: Record, rows: dict[int, dict[str, np.ndarray]], steps: int) -> None:
    """Logged figures (full checks, odd steps) and the host's collapse (every check) equal the reference."""
    for name in record.weights:
        for figure in FIGURES:
            assert [s for s, _ in log[f"{SA}/{figure}/{name}"]] == list(range(1, steps, 2)), (figure, name)
        for step in range(steps):
            expected = _reference(record.seen[step][name], rows[step][name])
            assert record.collapse[step][name] == pytest.approx(expected["collapse"], abs=1e-12), (name, step)
            for figure, value in expected.items():
                if step % 2:
                    got = dict(log[f"{SA}/{figure}/{name}"])[step]
                    assert got == pytest.approx(value, rel=1e-4, abs=1e-5), (figure, name, step)


# -- convolutions ---------------------------------------------------------------------------------------


class ConvNet(pl.LightningModule):
    """``conv1`` (3 -> 4 channels, 3x3, stride 2, padding 1, dilation 2), ``conv2`` (4 -> 6, 2x3,
    stride (1, 2), padding (1, 0), dilation (2, 1)), then convolutions the monitor cannot watch:
    grouped, reflect-padded, ``padding="same"``, ``nn.Conv1d`` and ``nn.Conv3d``; a mean pool and the
    head ``out``. The test's own pre-hooks keep each watched convolution's input (first call of a step)."""

    def __init__(self, size: int, n: int = 32, batch_size: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2)
        self.conv2 = nn.Conv2d(4, 6, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1))
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.reflect = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(6, 6, 3, padding="same")
        self.conv1d, self.conv3d = nn.Conv1d(6, 6, 3, padding=1), nn.Conv3d(6, 6, (1, 3, 3), padding=(0, 1, 1))
        self.out = nn.Linear(6, 1)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 3, size, size, generator=g)
        self.data = TensorDataset(x, x.mean((1, 2, 3)).unsqueeze(1))
        self.batch_size = batch_size
        self.inputs: dict[int, dict[str, torch.Tensor]] = {}
        for name in ("conv1", "conv2"):
            getattr(self, name).register_forward_pre_hook(self._keep(name))

    def _keep(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self._trainer is not None:
                self.inputs.setdefault(self.global_step, {}).setdefault(name, args[0].detach().double().clone())

        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        h = torch.tanh(self.same(self.reflect(self.grouped(h))))
        h = self.conv1d(h.flatten(2)).reshape(h.shape)
        h = self.conv3d(h.unsqueeze(2)).squeeze(2)
        return self.out(h.mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


def _patches(conv: nn.Conv2d, x: torch.Tensor) -> np.ndarray:
    """Every input patch of ``x`` as a row ``(N * L, C * kh * kw)``, float64 (``F.unfold``)."""
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, C*kh*kw, L)
    # The rows are what the convolution multiplies by W reshaped to (out, C*kh*kw): check it, so the
    # reference pairs each patch with the weight the way the convolution does.
    w = conv.weight.detach().double()
    out = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(w.reshape(len(w), -1) @ cols, out.flatten(2), rtol=1e-12, atol=1e-12)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()


def _conv_weights() -> dict[str, Callable[[nn.Module], torch.Tensor]]:
    return {
        n: (lambda m, n=n: getattr(m, n).weight.reshape(getattr(m, n).weight.shape[0], -1)) for n in ("conv1", "conv2")
    }


def test_conv2d_figures_equal_the_float64_reference_on_every_unfolded_patch() -> None:
    """12x12 images, 4 a batch: conv1 sees 4 x 25 patches of 27 values, conv2 4 x 10 of 24, all kept."""
    torch.manual_seed(0)
    module = ConvNet(size=12)
    monitor = SpectralAlignmentMonitor(**EXACT)
    record = Record(monitor, _conv_weights())
    log = _fit(module, monitor, record, max_steps=4)
    assert _layers(log) == ["conv1", "conv2"]  # nothing of the grouped, padded, 1-D and 3-D ones, nor the head
    rows = {s: {n: _patches(getattr(module, n), x) for n, x in inputs.items()} for s, inputs in module.inputs.items()}
    assert [len(rows[0][n]) for n in ("conv1", "conv2")] == [100, 40]  # fewer than max_rows (512)
    _assert_figures(log, record, rows, steps=4)


def test_conv2d_on_large_inputs_samples_real_patches_and_measures_them() -> None:
    """24x24 images, 8 a batch: 968 and 440 patches, ``max_rows=64`` of them kept (from the ceil(64 / L)
    images picked at random). Every kept row is a patch of the input; the logged figures equal the
    reference on the kept rows, and sigma1 and the stable rank the SVD of the whole weight."""
    torch.manual_seed(0)
    module = ConvNet(size=24, batch_size=8)
    monitor = SpectralAlignmentMonitor(**{**EXACT, "max_rows": 64})
    kept: dict[int, dict[str, np.ndarray]] = {}
    sample, names = monitor._sample, {id(module.conv1): "conv1", id(module.conv2): "conv2"}

    def keeping(m: Any, x: torch.Tensor) -> torch.Tensor:  # the rows the monitor measures (a private method)
        rows = sample(m, x)
        kept.setdefault(module.global_step, {})[names[id(m.module)]] = rows.double().numpy().copy()
        return rows

    monitor._sample = keeping
    record = Record(monitor, _conv_weights())
    log = _fit(module, monitor, record, max_steps=4)
    for step, inputs in module.inputs.items():
        for name, x in inputs.items():
            patches, rows = _patches(getattr(module, name), x), kept[step][name]
            assert len(patches) == {"conv1": 968, "conv2": 440}[name] and rows.shape == (64, patches.shape[1])
            distance = np.abs(rows[:, None, :] - patches[None, :, :]).max(-1)
            assert distance.min(1).max() < 1e-6, (name, step)  # float32 copies of real patches
            assert len({tuple(r) for r in rows}) > 32  # drawn with replacement, mostly distinct
            per_image = len(patches) // len(x)
            images = {int(i) // per_image for i in distance.argmin(1)}
            assert len(images) <= math.ceil(64 / per_image), (name, step, images)  # 1 of 121, 2 of 55
    _assert_figures(log, record, kept, steps=4)
    for name in ("conv1", "conv2"):
        assert all(0 <= v <= 1 for _, v in log[f"{SA}/collapse/{name}"])


# -- recurrent nets -------------------------------------------------------------------------------------


class Recurrent(pl.LightningModule):
    """A 2-layer bidirectional LSTM or GRU (5 features, hidden 6) on sequences of 7 steps, the head on
    the last layer's final states. ``packed``: each sequence has its own length (4 to 7), packed."""

    def __init__(self, cell: type[nn.RNNBase], batch_first: bool, packed: bool) -> None:
        super().__init__()
        self.rnn = cell(5, 6, num_layers=2, bidirectional=True, batch_first=batch_first)
        self.head = nn.Linear(12, 1)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(32, 7, 5, generator=g)
        lengths = 7 - torch.arange(32) % 4 if packed else torch.full((32,), 7)
        self.data = TensorDataset(x, lengths, x.sum((1, 2)).sin().unsqueeze(1))
        self.batch_first, self.packed = batch_first, packed
        self.rows: dict[int, np.ndarray] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, lengths, y = batch  # x: (batch, time, features)
        # The reference: every real time step of every sequence, taken from the batch itself.
        self.rows[self.global_step] = torch.cat([s[:n] for s, n in zip(x, lengths.tolist())]).double().numpy()
        seq = x if self.batch_first else x.transpose(0, 1)
        if self.packed:
            seq = pack_padded_sequence(seq, lengths, batch_first=self.batch_first, enforce_sorted=False)
        _, state = self.rnn(seq)
        h = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c)
        return F.mse_loss(self.head(torch.cat([h[-2], h[-1]], dim=-1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


@pytest.mark.parametrize(
    ("cell", "batch_first", "packed"),
    [(nn.LSTM, True, False), (nn.LSTM, False, False), (nn.GRU, True, False), (nn.GRU, False, False),
     (nn.LSTM, False, True), (nn.GRU, True, True)],
    ids=["lstm-batch_first", "lstm-time_first", "gru-batch_first", "gru-time_first", "lstm-packed", "gru-packed"],
)
def test_recurrent_first_layer_input_weights_equal_the_float64_reference(cell: type[nn.RNNBase], batch_first: bool,
                                                                         packed: bool) -> None:  # fmt: skip
    """Only ``weight_ih_l0`` and ``weight_ih_l0_reverse`` are watched (both fed the module's input rows,
    padding excluded when packed); the second layer's and the hidden-to-hidden weights are not."""
    torch.manual_seed(0)
    module = Recurrent(cell, batch_first, packed)
    monitor = SpectralAlignmentMonitor(**EXACT)
    record = Record(monitor, {f"rnn.{w}": (lambda m, w=w: getattr(m.rnn, f"weight_{w}"))
                              for w in ("ih_l0", "ih_l0_reverse")})
    log = _fit(module, monitor, record, max_steps=4)
    assert _layers(log) == ["rnn.ih_l0", "rnn.ih_l0_reverse"]
    assert not [k for k in log if "hh" in k or "l1" in k]
    rows = {s: {name: r for name in record.weights} for s, r in module.rows.items()}
    assert len(rows[0]["rnn.ih_l0"]) == (8 * 7 - (0 + 1 + 2 + 3) * 2 if packed else 8 * 7)
    _assert_figures(log, record, rows, steps=4)


# -- non-finite weights -----------------------------------------------------------------------------------


def test_an_infinite_weight_gives_nan_figures_and_the_figures_recover_with_the_weights() -> None:
    """One weight of ``conv1`` set to inf at step 2 (it stays inf at step 3: the tanh after conv1 saturates,
    so the gradient stays finite), the weights of step 0 put back at step 4. Before ``top_singular`` kept its
    start vector for a non-finite sigma_1, inf / inf made conv1's v1 NaN for good: its figures stayed NaN
    after the weights were finite again."""

    class BreakAndRestore(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            if trainer.global_step == 0:
                self.saved = {k: v.clone() for k, v in pl_module.state_dict().items()}
            with torch.no_grad():
                if trainer.global_step == 2:
                    pl_module.conv1.weight[1, 2, 0, 1] = float("inf")
                if trainer.global_step == 4:
                    pl_module.load_state_dict(self.saved)

    torch.manual_seed(0)
    module = ConvNet(size=12)
    monitor = SpectralAlignmentMonitor(**{**EXACT, "every_n_steps": 1})
    record = Record(monitor, _conv_weights())
    log = _fit(module, BreakAndRestore(), monitor, record, max_steps=6)
    assert [(a.metric, a.step, a.severity) for a in monitor.alerts] == [(f"{SA}/sigma1/conv1", 2, "critical")]
    assert np.isinf(record.seen[3]["conv1"]).any() and np.isfinite(record.seen[3]["conv2"]).all()
    for name in ("conv1", "conv2"):
        for figure in FIGURES:
            series = dict(log[f"{SA}/{figure}/{name}"])
            for step in range(6):
                if name == "conv1" and step in (2, 3):
                    assert math.isnan(series[step]), (figure, name, step)
                    continue
                patches = _patches(getattr(module, name), module.inputs[step][name])
                expected = _reference(record.seen[step][name], patches)[figure]
                assert series[step] == pytest.approx(expected, rel=1e-4, abs=1e-5), (figure, name, step)


# -- adaptive cadence ---------------------------------------------------------------------------------------


class AligningWindow(Aligning):
    """:class:`Aligning` whose inputs are aligned only on steps ``[fault_step, fault_end)``."""

    def __init__(self, fault_step: int | None, fault_end: int | None = None) -> None:
        super().__init__(fault_step)
        self.fault_end = fault_end

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.fault_end is not None and self.global_step >= self.fault_end:
            self.fault_step = None  # the offset is gone from here on
        return super().training_step(batch, batch_idx)


REGULAR = list(range(9, 60, 10))  # checks every 10 steps: (step + 1) % 10 == 0


@pytest.mark.parametrize(
    ("window", "patience", "checks", "alert"),
    [
        ((None, None), 7, REGULAR + [69, 79, 89], None),  # healthy: only the regular checks
        # the condition holds from the first check after the fault (69): every step until the alert at
        # 69 + 7 - 1, then back to every 10 steps (the rule has fired; net.0 stays collapsed)
        ((60, None), 7, REGULAR + list(range(69, 76)) + [79, 89], 75),
        # the condition stops at step 72 (the inputs are no longer aligned), before patience 21: no alert,
        # and the checks go back to every 10 steps
        ((60, 72), 21, REGULAR + [69, 70, 71, 72, 79, 89], None),
    ],
    ids=["healthy", "fires", "recovers"],
)
@pytest.mark.parametrize("every_n_steps", [1, 50], ids=["full", "quiet"])
def test_checks_every_step_while_a_rule_condition_holds_and_has_not_fired(
    window: tuple[int | None, int | None], patience: int, checks: list[int], alert: int | None, every_n_steps: int
) -> None:
    """``check_every_n_steps=10``; the checks are the steps whose collapse reaches the host (and, logging every
    step, the logged steps). ``every_n_steps=50``: the adaptive checks are quiet ones (sign counts only)."""
    torch.manual_seed(0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=10, every_n_steps=every_n_steps, warmup_steps=0,
                                       patience=patience, include=["net.0"], mean_collapse_threshold=None,
                                       layer_rule="baseline", action="log")  # fmt: skip
    record = Record(monitor, {})
    log = _fit(AligningWindow(*window), monitor, record, max_steps=95)
    assert sorted(record.collapse) == checks
    if every_n_steps == 1:
        assert [s for s, _ in log[f"{SA}/collapse/net.0"]] == checks
    collapse = {s: c["net.0"] for s, c in record.collapse.items()}
    flagged = [s for s in checks if collapse[s] >= 0.9]  # the baseline is ~0.03: flagged = collapse >= 0.9
    assert all(collapse[s] < 0.1 for s in REGULAR)
    assert [(a.metric, a.step) for a in monitor.alerts] == ([] if alert is None else [(f"{SA}/collapse/net.0", alert)])
    if alert is not None:
        start = flagged[0]
        assert start == 69 and alert == start + patience - 1  # patience counted in steps, all of them checked
        assert all(s in flagged for s in range(start, alert + 1))
    if window == (60, 72):
        assert flagged == [69, 70, 71] and collapse[72] < 0.1


def test_the_model_level_rule_also_gets_a_check_every_step_until_it_fires() -> None:
    """The mean collapse (of net.0 alone here) holds from step 69: checks 69 to 73, the alert at 69 + 5 - 1."""
    torch.manual_seed(0)
    monitor = SpectralAlignmentMonitor(check_every_n_steps=10, every_n_steps=1, warmup_steps=0, layer_rule="none",
                                       include=["net.0"], mean_collapse_threshold=0.9, mean_collapse_patience=5,
                                       action="log")  # fmt: skip
    log = _fit(AligningWindow(60), monitor, max_steps=95)
    assert [s for s, _ in log[f"{SA}/mean_collapse"]] == REGULAR + list(range(69, 74)) + [79, 89]
    assert [(a.metric, a.step, a.severity) for a in monitor.alerts] == [(f"{SA}/mean_collapse", 73, "critical")]


# -- cost of a check ----------------------------------------------------------------------------------------


class Chain(pl.LightningModule):
    """``depth`` equal ``nn.Linear(16, 16)`` layers with tanh (one weight group), then the head."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.net = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 1))
        x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
        self.data = TensorDataset(x, x.sum(1, keepdim=True).sin())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


def _counted(hook: Callable[..., None], counter: DispatchCounter, step: int, offset: int) -> Callable[..., None]:
    """``hook`` counting its ops at optimizer step ``step`` (``on_train_batch_end`` runs after the step was counted)."""

    def counted(trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step - offset != step:
            return hook(trainer, *args)
        with counter:
            return hook(trainer, *args)

    return counted


def _check_ops(counter: type[DispatchCounter], depth: int, step: int, every_n_steps: int) -> dict[str, DispatchCounter]:
    """Top-level ATen ops dispatched at optimizer step ``step`` by the monitor: in its step hooks
    (``measure``: on_before_optimizer_step) and in its forward pre-hooks' row sampling."""
    counters = {name: counter() for name in ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end",
                                             "sampling")}  # fmt: skip
    monitor = SpectralAlignmentMonitor(check_every_n_steps=2, every_n_steps=every_n_steps, action="log")
    trainer = make_trainer(callbacks=[monitor], max_steps=step + 1)
    for name, offset in (("on_train_batch_start", 0), ("on_before_optimizer_step", 0), ("on_train_batch_end", 1)):
        setattr(monitor, name, _counted(getattr(monitor, name), counters[name], step, offset))
    sample = monitor._sample

    def sampling(m: Any, x: torch.Tensor) -> torch.Tensor:
        if trainer.global_step != step:
            return sample(m, x)
        with counters["sampling"]:
            return sample(m, x)

    monitor._sample = sampling
    torch.manual_seed(0)
    trainer.fit(Chain(depth))
    return counters


# Measured: a quiet check (step 5: warm start, figures not logged) dispatches 44 ops whatever the number of
# equal layers: stacks of weights and rows, 2 power iterations (6 kernels each), sigma_1 and the NaN guard of
# v1, the projections and their sign counts, the NaN figures of non-finite weights and the concatenation for
# the host. A check that the next logging step logs: 102 (full moments, stable rank), and 2 more in
# on_train_batch_end (the one host read). The sampling is a copy of the rows per map (the forward pre-hooks
# are per module): linear in the layers, by design.
CHECK_OPS = {"quiet": 44, "logged": 102}


@pytest.mark.parametrize("every_n_steps", [100, 2], ids=["quiet", "logged"])
def test_op_count_of_a_check_does_not_grow_with_the_number_of_equal_layers(dispatch_counter: type[DispatchCounter],
                                                                            every_n_steps: int,
                                                                            request: pytest.FixtureRequest
                                                                            ) -> None:  # fmt: skip
    kind = request.node.callspec.id
    shallow, deep = (_check_ops(dispatch_counter, 4, 5, every_n_steps),
                     _check_ops(dispatch_counter, 16, 5, every_n_steps))
    measure = "on_before_optimizer_step"
    assert shallow[measure].ops == deep[measure].ops, (dict(shallow[measure].ops), dict(deep[measure].ops))
    assert shallow[measure].total == CHECK_OPS[kind], dict(shallow[measure].ops)
    assert shallow[measure].ops["aten.bmm"] == 2 * 2 + 2  # 2 iterations, sigma_1, the projection: one batch
    for name in ("on_train_batch_start", "on_train_batch_end"):
        assert shallow[name].total == deep[name].total == (
            2 if kind == "logged" and name == "on_train_batch_end" else 0
        )
    assert deep["sampling"].total == 4 * shallow["sampling"].total > 0
    for counters in (shallow, deep):  # no host read: .item() or bool(tensor) would show up as _local_scalar_dense
        assert not any(c.ops.get("aten._local_scalar_dense", 0) for c in counters.values())
    quiet_step = _check_ops(dispatch_counter, 16, 4, every_n_steps)  # neither a check nor a logging step
    assert all(c.total == 0 for c in quiet_step.values()), {n: dict(c.ops) for n, c in quiet_step.items()}
