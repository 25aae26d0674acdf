"""LogitMonitor inside real Lightning runs, against logits materialised by hand.

References are taken *outside* the monitor: a reference callback placed after it in
``callbacks=[...]`` registers its own hooks (the inputs of the attention module, the output head's
logits) and, in ``on_before_optimizer_step`` (the weights have not moved yet), computes in float64
the attention logits ``q . k / sqrt(d_head)`` from the in-projection and the captured inputs
(masked positions set to ``-inf``), and ``log Z`` with ``torch.logsumexp``. Sequences are shorter
than ``max_queries``, so the monitor's maximum is exact.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LoggedSoFar, RowSplit, ddp_on_cpu, fit, forbid_host_sync, make_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_diag import LogitMonitor
from lightning_diag.alerts import DiagnosticWarning

E, HEADS, L, N, CLASSES = 8, 2, 6, 4, 3  # embedding, heads, sequence length, sequences per batch, classes

# -- models ---------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """``F.scaled_dot_product_attention`` on a fused in-projection, with ``is_causal`` or a boolean
    mask (True = may attend, SDPA's convention)."""

    def __init__(self, mask: str) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(E, 3 * E), nn.Linear(E, E)
        self.mask = mask
        g = torch.Generator().manual_seed(2)  # a fixed pattern; every query keeps at least itself
        self.register_buffer("allowed", (torch.rand(L, L, generator=g) < 0.5) | torch.eye(L, dtype=torch.bool))

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, HEADS, E // HEADS)).permute(2, 0, 3, 1, 4)  # 3 x (N, H, L, d)
        if self.mask == "causal":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed)
        return self.proj(y.transpose(1, 2).flatten(2))


class MHA(nn.Module):
    """``nn.MultiheadAttention`` called as the module expects for ``batch_first``, with a key padding
    mask (True = ignore, the module's convention)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        x = x if self.attn.batch_first else x.transpose(0, 1)
        y, _ = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
        return y if self.attn.batch_first else y.transpose(0, 1)


class AttentionClassifier(pl.LightningModule):
    """Embedding of ``n`` fixed sequences -> attention (``kind``) -> mean pool -> ``head``; SGD.

    ``kind``: ``"causal"``, ``"bool"`` (SDPA) or ``"mha"``, ``"mha_seq_first"``. The masks hide
    the largest logits (checked by the tests): for MHA the padded positions' inputs are scaled up;
    with the default seed the largest SDPA logit lies above the diagonal."""

    def __init__(self, kind: str = "causal", lr: float = 0.05, n: int = N, seed: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.attn = MHA(batch_first=kind == "mha") if kind.startswith("mha") else SelfAttention(kind)
        self.head = nn.Linear(E, CLASSES)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, L, E, generator=g)
        if kind.startswith("mha"):
            x[:, -2:] *= 3.0  # the padded positions: counting them would change the maximum
        padding = torch.zeros(n, L, dtype=torch.bool)
        padding[1::2, -2:] = True  # the last two positions of odd sequences (used by MHA only)
        self.data = TensorDataset(x, padding, torch.arange(n) % CLASSES)
        self.kind, self.lr, self.n = kind, lr, n

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        return self.head(self.attn(x, padding).mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, padding, y = batch
        return F.cross_entropy(self(x, padding), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.n, shuffle=False)


# -- the hand-made reference ----------------------------------------------------------------------


def attention_logits(model: AttentionClassifier, x: Tensor, padding: Tensor, *, masked: bool = True) -> Tensor:
    """``(N, H, L, S)`` float64 logits from the in-projection and the attention module's input,
    masked positions ``-inf`` (all positions kept with ``masked=False``)."""
    x = x.double()
    if model.kind.startswith("mha"):
        attn = model.attn.attn
        w, b = attn.in_proj_weight.double(), attn.in_proj_bias.double()
        allowed = ~padding.cpu()[:, None, None, :]  # (N, 1, 1, S)
    else:
        w, b = model.attn.qkv.weight.double(), model.attn.qkv.bias.double()
        allowed = torch.ones(L, L).tril().bool() if model.kind == "causal" else model.attn.allowed.cpu()
    q = (x @ w[:E].T + b[:E]).unflatten(-1, (HEADS, E // HEADS)).transpose(1, 2)
    k = (x @ w[E:2 * E].T + b[E:2 * E]).unflatten(-1, (HEADS, E // HEADS)).transpose(1, 2)
    z = q @ k.transpose(-2, -1) / math.sqrt(E // HEADS)
    return z.masked_fill(~allowed, -math.inf) if masked else z


class HandReference(Callback):
    """Captures the attention module's input and the head's logits with its own forward hooks, and
    computes the figures by hand in ``on_before_optimizer_step``: ``attention[step]``,
    ``entropy[step]``, ``unmasked[step]`` (the maximum if masks were ignored) and ``output[step]``."""

    def __init__(self) -> None:
        self.attention: dict[int, float] = {}
        self.entropy: dict[int, float] = {}
        self.unmasked: dict[int, float] = {}
        self.output: dict[int, dict[str, float]] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def keep_input(module: nn.Module, args: tuple) -> None:
            self.x, self.padding = args[0].detach().clone(), args[1].clone()

        def keep_output(module: nn.Module, args: tuple, out: Tensor) -> None:
            self.logits = out.detach().clone()

        self.handles = [pl_module.attn.register_forward_pre_hook(keep_input),
                        pl_module.head.register_forward_hook(keep_output)]  # fmt: skip

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        z = attention_logits(pl_module, self.x, self.padding)
        self.attention[step] = float(z.max())
        p = torch.softmax(z, dim=-1)  # every query row keeps at least one key
        rows = -(p * torch.log(torch.where(p > 0, p, 1.0))).sum(-1)  # (N, H, L) entropy in nats
        self.entropy[step] = float(rows.mean((0, 2)).min())  # mean over query rows per head, min over heads
        self.unmasked[step] = float(attention_logits(pl_module, self.x, self.padding, masked=False).max())
        log_z = torch.logsumexp(self.logits.double(), dim=-1)
        self.output[step] = {"log_z_mean": float(log_z.mean()), "log_z_max": float(log_z.max()),
                             "log_z_min": float(log_z.min()), "log_z_abs_max": float(log_z.abs().max()),
                             "output_max": float(self.logits.double().abs().max())}  # fmt: skip




# -- attention logits against the hand-made ones --------------------------------------------------


@pytest.mark.parametrize("kind", ["causal", "bool", "mha", "mha_seq_first"])
def test_attention_max_equals_the_largest_unmasked_logit_materialised_by_hand(kind: str) -> None:
    model, reference = AttentionClassifier(kind), HandReference()
    trainer = fit(model, LogitMonitor(check_every_n_steps=2, action="log"), reference, max_steps=6)
    layer = "attn.attn" if kind.startswith("mha") else "attn"  # the module running the call
    per_layer, overall = (trainer.logger.values(k) for k in (f"logits/attention_max/{layer}", "logits/attention_max"))
    assert sorted(per_layer) == sorted(overall) == [1, 3, 5]
    for step in per_layer:
        assert per_layer[step] == pytest.approx(reference.attention[step], rel=1e-5), step
        assert overall[step] == pytest.approx(reference.attention[step], rel=1e-5), step
        entropy = trainer.logger.values("logits/attention_entropy_min")[step]
        assert entropy == pytest.approx(reference.entropy[step], rel=1e-5), step
        assert reference.unmasked[step] > 1.05 * reference.attention[step]  # counting masked keys would show
    assert not [k for k in trainer.logger.history if k.startswith("logits/attention_max/") and layer not in k]


# -- output logits ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["causal", "mha"])
def test_output_figures_equal_float64_logsumexp_of_the_head_logits(kind: str) -> None:
    model, reference = AttentionClassifier(kind, lr=0.5), HandReference()
    trainer = fit(model, LogitMonitor(check_every_n_steps=2, action="log"), reference, max_steps=6)
    for figure in ("log_z_mean", "log_z_max", "log_z_min", "log_z_abs_max", "output_max"):
        logged = trainer.logger.values(f"logits/{figure}")
        assert sorted(logged) == [1, 3, 5], figure
        for step, value in logged.items():
            assert value == pytest.approx(reference.output[step][figure], rel=1e-5), (figure, step)
    assert reference.output[1]["log_z_max"] - reference.output[1]["log_z_min"] > 1e-3  # rows differ: max != min
    assert trainer.logger.values("logits/softmax_collapse")[5] == pytest.approx(0.0, abs=1e-12)


class HandBuiltHead(pl.LightningModule):
    """A bias-free 2 -> 2 head with weight ``[[200, 10], [0, 0]]`` on one-hot rows: logits ``(200, 0)``
    (gap 200: float32's top probability is exactly 1) for ``e0``, ``(10, 0)`` (gap 10: 1 - 4.5e-5) for
    ``e1``; three ``e0`` rows, one ``e1`` row. ``lr = 0``: the logits stay put."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[200.0, 10.0], [0.0, 0.0]]))
        x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
        self.data = TensorDataset(x, torch.zeros(4, dtype=torch.long))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.head(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)


def test_softmax_collapse_counts_the_rows_whose_top_probability_rounds_to_one() -> None:
    monitor = LogitMonitor(check_every_n_steps=1, action="log")
    trainer = fit(HandBuiltHead(), monitor, max_steps=2)
    collapse = trainer.logger.values("logits/softmax_collapse")
    assert sorted(collapse) == [0, 1]
    assert collapse[0] == pytest.approx(0.75, abs=1e-9)  # the gap-200 rows, not the gap-10 one
    logits = torch.tensor([[200.0, 0.0], [10.0, 0.0], [200.0, 0.0], [200.0, 0.0]], dtype=torch.float64)
    assert torch.softmax(logits.float(), -1)[1, 0] < 1 and torch.softmax(logits.float(), -1)[0, 0] == 1  # the premise
    log_z = torch.logsumexp(logits, -1)
    assert trainer.logger.values("logits/log_z_mean")[0] == pytest.approx(float(log_z.mean()), rel=1e-6)
    assert trainer.logger.values("logits/log_z_min")[0] == pytest.approx(float(log_z.min()), rel=1e-6)
    assert trainer.logger.values("logits/output_max")[0] == pytest.approx(200.0, rel=1e-6)
    # 0.75 > collapse_threshold 0.5, and log Z = 200 > log_z_threshold 50: one alert each, when it starts
    assert sorted((a.metric, a.step, a.severity) for a in monitor.alerts) == [
        ("logits/log_z_abs_max", 0, "warning"), ("logits/softmax_collapse", 0, "warning")]


# -- cadence: a check between logging steps -------------------------------------------------------


def test_a_check_between_logging_steps_is_logged_at_the_next_logging_step() -> None:
    # checks at 2, 5, 8, 11 (every 3), logging steps 4 and 9 (every 5) and the end: each logging step logs
    # the latest check since the one before, at the check's own step, with that check's figures
    model, reference, so_far = AttentionClassifier("causal"), HandReference(), LoggedSoFar("logits/attention_max")
    trainer = fit(model, LogitMonitor(check_every_n_steps=3, action="log"), reference, so_far, max_steps=12,
                  log_every_n_steps=5)
    assert so_far.seen[3] == [] and so_far.seen[4] == [2] and so_far.seen[8] == [2] and so_far.seen[9] == [2, 8]
    for figure in ("log_z_max", "output_max"):
        logged = trainer.logger.values(f"logits/{figure}")
        assert sorted(logged) == [2, 8, 11], figure  # 11: the last check, flushed at the end
        for step, value in logged.items():
            assert value == pytest.approx(reference.output[step][figure], rel=1e-5), (figure, step)
    attention = trainer.logger.values("logits/attention_max")
    assert {s: pytest.approx(reference.attention[s], rel=1e-5) for s in (2, 8, 11)} == attention


# -- NaN in, NaN out; heads a softmax does not fit -------------------------------------------------


class PoisonHead(Callback):
    """At the start of step ``at``, one NaN weight in every row of the head: every output logit is NaN."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.head.weight[:, 0] = math.nan


def test_nan_logits_give_nan_collapse_and_growth_never_a_healthy_zero() -> None:
    # the query and key weights and the head's turn NaN at step 1, inside the growth rule's warm-up (5
    # checks): every attention logit and every output logit is NaN from then on
    monitor = LogitMonitor(check_every_n_steps=1, baseline_checks=5, growth_factor=10.0, action="log")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)  # the non-finite alerts
        trainer = fit(AttentionClassifier("causal", lr=0.0), monitor, ScaleQK(at=1, factor=math.nan),
                      PoisonHead(at=1), max_steps=3)
    growth, collapse = (trainer.logger.values(f"logits/{k}") for k in ("attention_growth", "softmax_collapse"))
    assert growth[0] == pytest.approx(0.0, abs=1e-12) and collapse[0] == pytest.approx(0.0, abs=1e-12)  # healthy
    for step in (1, 2):
        assert math.isnan(trainer.logger.values("logits/attention_max")[step])  # the premise
        assert math.isnan(trainer.logger.values("logits/log_z_max")[step])
        assert math.isnan(growth[step]), step
        assert math.isnan(collapse[step]), step


class Regressor(pl.LightningModule):
    """A 3 -> 4 -> 1 tanh MLP regressor (one output: no softmax) whose outputs sit near 100."""

    def __init__(self, extra: str | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 1)
        with torch.no_grad():
            self.head.bias.fill_(100.0)  # log Z of one output is the output: 100 > log_z_threshold 50
        if extra == "unused":  # registered last, never called: the head by default
            self.unused = nn.Linear(1, 7)
        self.extra = extra
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
        self.data = TensorDataset(x, torch.full((8, 1), 99.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


def _fit_caught(model: pl.LightningModule, monitor: LogitMonitor, **kwargs: Any) -> tuple[pl.Trainer, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(model, monitor, **kwargs)
    return trainer, [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning)]


def test_a_one_output_head_logs_no_softmax_figures_raises_no_alert_and_says_so_once() -> None:
    model = Regressor()
    monitor = LogitMonitor(check_every_n_steps=1, attention=False)
    trainer, said = _fit_caught(model, monitor, max_steps=3)
    logged = {k for k in trainer.logger.history if k != "logits/alerts"}
    assert logged == {"logits/output_max"}  # no softmax_collapse of 1.0, no log Z of 100
    with torch.no_grad():
        reference = float(model(model.data.tensors[0]).double().abs().max())
    assert trainer.logger.values("logits/output_max")[0] == pytest.approx(reference, rel=1e-6)
    assert reference > 50  # the premise: log Z of the one output would be above log_z_threshold
    assert monitor.alerts == []
    assert len([m for m in said if "one output" in m]) == 1, said


def test_an_unused_last_linear_is_said_once_and_output_names_the_head() -> None:
    trainer, said = _fit_caught(Regressor("unused"), LogitMonitor(check_every_n_steps=1, attention=False), max_steps=3)
    assert not [k for k in trainer.logger.history if k != "logits/alerts"]  # nothing measured...
    unused = [m for m in said if "'unused'" in m and "was not called" in m and "output=" in m]
    assert len(unused) == 1, said  # ...and said once
    trainer, said = _fit_caught(Regressor("unused"), LogitMonitor(check_every_n_steps=1, attention=False,
                                                                  output="head"), max_steps=3)  # fmt: skip
    assert sorted(trainer.logger.values("logits/output_max")) == [0, 1, 2]
    assert not [m for m in said if "was not called" in m]


class SharedHead(AttentionClassifier):
    """The head is called twice per forward: first on an inner feature (its output then feeds the
    attention), last on the pooled features (the logits)."""

    def __init__(self) -> None:
        super().__init__("causal")
        self.lift = nn.Linear(CLASSES, E)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        self.inner = self.head(x)  # (N, L, CLASSES): not the model's output
        self.logits = self.head(self.attn(x + self.lift(self.inner), padding).mean(1))
        return self.logits


def test_a_head_called_twice_per_forward_is_said_once_and_its_last_call_is_measured() -> None:
    model = SharedHead()
    monitor = LogitMonitor(check_every_n_steps=1, output="head", action="log")
    trainer, said = _fit_caught(model, monitor, max_steps=1)
    log_z = torch.logsumexp(model.logits.detach().double(), -1)
    assert trainer.logger.values("logits/log_z_max")[0] == pytest.approx(float(log_z.max()), rel=1e-6)
    inner = float(torch.logsumexp(model.inner.detach().double(), -1).max())
    assert abs(inner - float(log_z.max())) > 1e-3  # the premise: the first call would give other figures
    assert len([m for m in said if "called 2 times" in m]) == 1, said


# -- arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "allowed"), [
    ({"collapse_threshold": 2.0}, "(0, 1)"), ({"collapse_threshold": 1.0}, "(0, 1)"),
    ({"growth_factor": 0.5}, "> 1"), ({"growth_factor": 1.0}, "> 1"), ({"log_z_threshold": math.nan}, "> 0"),
    ({"attention_threshold": "100"}, "> 0"), ({"attention": "no"}, "True or False"),
    ({"log_z_threshold": True}, "> 0"),
])  # fmt: skip
def test_bad_arguments_are_refused_naming_the_value_and_what_is_allowed(bad: dict[str, Any], allowed: str) -> None:
    [(name, value)] = bad.items()
    with pytest.raises(ValueError, match=f"`{name}`") as error:
        LogitMonitor(**bad)
    assert allowed in str(error.value) and repr(value) in str(error.value)


# -- torch.compile -----------------------------------------------------------------------------------


def _compile_or_skip(module: nn.Module) -> nn.Module:
    """``torch.compile(module, backend="aot_eager")`` (dynamo and AOTAutograd, no C compiler), or a skip."""
    try:
        compiled = torch.compile(module, backend="aot_eager")
        torch.compile(nn.Linear(2, 2), backend="aot_eager")(torch.ones(1, 2))
    except Exception as error:  # noqa: BLE001 - a torch build or platform without torch.compile
        pytest.skip(f"torch.compile is not available here: {error}")
    return compiled


def _graphs_compiled(*callbacks: Callback) -> tuple[pl.Trainer, HandReference, int]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, reference = AttentionClassifier("causal"), HandReference()
    model.attn = _compile_or_skip(model.attn)
    trainer = fit(model, *callbacks, reference, max_steps=4)
    return trainer, reference, torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_a_compiled_submodule_is_left_alone_and_the_head_outside_it_is_measured() -> None:
    _, _, graphs_alone = _graphs_compiled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, reference, graphs = _graphs_compiled(LogitMonitor(check_every_n_steps=2, action="log"))
    said = [str(w.message) for w in caught if issubclass(w.category, DiagnosticWarning)]
    assert graphs == graphs_alone  # no recompilation for the monitor's hooks or mode
    assert len([m for m in said if "torch.compile'd ['attn']" in m]) == 1, said
    assert not [k for k in trainer.logger.history if k.startswith("logits/attention")]  # not recorded inside
    for figure in ("log_z_max", "log_z_mean", "output_max"):
        logged = trainer.logger.values(f"logits/{figure}")
        assert sorted(logged) == [1, 3], figure
        for step, value in logged.items():
            assert value == pytest.approx(reference.output[step][figure], rel=1e-5), (figure, step)


# -- zero cost between checks -----------------------------------------------------------------------


def _active(model: nn.Module) -> tuple[int, int]:
    """(forward hooks of any kind on the model's modules and global ones, TorchFunctionModes active)."""
    hooks = sum(len(getattr(m, attr)) for m in model.modules() for attr in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))  # fmt: skip
    hooks += len(nn.modules.module._global_forward_hooks) + len(nn.modules.module._global_forward_pre_hooks)
    return hooks, len(torch.overrides._get_current_function_mode_stack())


class ProbedClassifier(AttentionClassifier):
    """Records what is active on the model during each forward: ``during[step]``."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.during: dict[int, tuple[int, int]] = {}

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        self.during[self.global_step] = _active(self)
        return super().forward(x, padding)


class ActiveProbe(Callback):
    """After the monitor: what is active at the start of each step (the monitor has armed, if it
    does), before the backward and at the end of the step (it has disarmed)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, int], tuple[int, int]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.seen["start", trainer.global_step] = _active(pl_module)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self.seen["backward", trainer.global_step] = _active(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.seen["end", trainer.global_step - 1] = _active(pl_module)


@pytest.mark.parametrize("kind", ["causal", "mha"])
def test_nothing_is_active_between_check_steps(kind: str) -> None:
    model, probe = ProbedClassifier(kind), ActiveProbe()
    fit(model, LogitMonitor(check_every_n_steps=3, action="log"), probe, max_steps=7)
    checks = [2, 5]
    for step in range(7):
        if step in checks:  # the probe does see the monitor's hooks and mode when they are there
            hooks, modes = model.during[step]
            assert hooks > 0 and modes == 1, step
            assert probe.seen["start", step] == model.during[step]
        else:
            assert model.during[step] == (0, 0), step
            assert probe.seen["start", step] == (0, 0), step
        assert probe.seen["backward", step] == (0, 0), step  # gone before the backward, check steps included
        assert probe.seen["end", step] == (0, 0), step


# -- processes and precision ------------------------------------------------------------------------


class RowSplitClassifier(RowSplit, AttentionClassifier):
    """Rank r of w reads sequences r, r + w, ...: the ranks' halves make the single-process batch."""


@pytest.mark.distributed
def test_ddp_on_two_cpu_processes_gives_the_single_process_figures(tmp_path: Path) -> None:
    single = fit(AttentionClassifier("mha", n=8), LogitMonitor(check_every_n_steps=2, action="log"),
                  max_steps=4).logger
    strategy = ddp_on_cpu()
    fit(RowSplitClassifier("mha", n=8), LogitMonitor(check_every_n_steps=2, action="log"), max_steps=4,
         devices=2, strategy=strategy, logger=CSVLogger(tmp_path, name="ddp", version=0), use_distributed_sampler=False)
    rows = np.genfromtxt(tmp_path / "ddp" / "version_0" / "metrics.csv", delimiter=",", names=True, deletechars="")
    rows = rows[~np.isnan(rows["logits/attention_max"])]
    assert list(rows["step"]) == [1, 3]
    keys = sorted(k for k in single.history if k != "logits/alerts")
    assert "logits/attention_max/attn.attn" in keys and "logits/attention_entropy_min" in keys
    for key in keys:  # maxima reduced with MAX, means as sums over rows
        np.testing.assert_allclose(rows[key], [v for _, v in single.history[key]], rtol=1e-5, err_msg=key)


@pytest.mark.parametrize(("kind", "rel"), [("causal", 0.01), ("mha", 1e-5)])
def test_bf16_mixed_gives_the_figures_of_the_bf16_run(kind: str, rel: float) -> None:
    # Under autocast SDPA receives bf16 q and k (8-bit mantissas: 0.6% off the float32 logits here), which the
    # monitor reads in float32; MultiheadAttention's logits are recomputed from its float32 input
    # and weights (exact). The head's logits are bf16 and log Z is taken of those very values.
    model, reference = AttentionClassifier(kind), HandReference()
    trainer = fit(model, LogitMonitor(check_every_n_steps=2, action="log"), reference, max_steps=4,
                   precision="bf16-mixed")
    assert reference.logits.dtype == torch.bfloat16  # the run did use bf16
    attention = trainer.logger.values("logits/attention_max")
    assert sorted(attention) == [1, 3]
    for step, value in attention.items():
        assert value == pytest.approx(reference.attention[step], rel=rel), step
        for figure in ("log_z_mean", "log_z_max", "output_max"):
            logged = trainer.logger.values(f"logits/{figure}")[step]
            assert logged == pytest.approx(reference.output[step][figure], rel=1e-5), (figure, step)


# -- the growth rule --------------------------------------------------------------------------------


class ScaleQK(Callback):
    """At the start of step ``at``, multiplies the query and key blocks of the in-projection by
    ``factor``: every attention logit grows by ``factor ** 2`` (the biases too, so exactly)."""

    def __init__(self, at: int, factor: float) -> None:
        self.at, self.factor = at, factor

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.attn.qkv.weight[: 2 * E] *= self.factor
                pl_module.attn.qkv.bias[: 2 * E] *= self.factor


@pytest.mark.parametrize("grows", [False, True])
def test_the_growth_rule_fires_when_attention_logits_grow_and_not_on_a_steady_model(grows: bool) -> None:
    monitor = LogitMonitor(check_every_n_steps=1, baseline_checks=3, growth_factor=10.0, action="log")
    callbacks = [monitor, *([ScaleQK(at=6, factor=4.0)] if grows else [])]  # logits x 16 > growth_factor 10
    trainer = fit(AttentionClassifier("causal", lr=0.0), *callbacks, max_steps=9)
    growth = trainer.logger.values("logits/attention_growth")
    assert sorted(growth) == list(range(9))
    for step in range(3, 6):  # the baseline (steps 0-2) is in; the logits are steady
        assert growth[step] == pytest.approx(1.0, rel=1e-5)
    growth_alerts = [(a.metric, a.step, a.severity) for a in monitor.alerts if a.metric == "logits/attention_growth"]
    if grows:
        assert growth[6] == pytest.approx(16.0, rel=1e-4)
        assert growth_alerts == [("logits/attention_growth", 6, "warning")]
    else:
        assert growth_alerts == []
    assert [a for a in monitor.alerts if a.metric != "logits/attention_growth"] == []


# -- CUDA -------------------------------------------------------------------------------------------



class SyncFreeForward(Callback):
    """Sync debug mode "error" around the forward and backward of the chosen steps: the monitor's
    recorder and head hook run inside the forward."""

    def __init__(self, steps: set[int]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step in self.steps:
            torch.cuda.set_sync_debug_mode("error")

    def on_before_backward(self, trainer: pl.Trainer, *args: Any) -> None:
        torch.cuda.set_sync_debug_mode(0)  # Lightning's own backward bookkeeping is not ours


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["causal", "mha"])
def test_no_host_sync_outside_logging_steps_on_cuda(kind: str) -> None:
    # every step but the logging steps 4 and 9; check steps 1, 3, 5, 7, 11 included: the figures
    # leave by a non-blocking copy
    quiet = {s for s in range(12) if (s + 1) % 5 != 0}
    monitor = LogitMonitor(check_every_n_steps=2, every_n_steps=5, action="log")
    checked = forbid_host_sync(monitor, quiet)
    # the model's own forward syncs nowhere (the padding mask comes with the batch)
    trainer = make_trainer(callbacks=[monitor, SyncFreeForward(quiet)], max_steps=12, accelerator="gpu")
    trainer.fit(AttentionClassifier(kind))
    assert checked == quiet
    # the latest check before each logging step (3 at 4, 9 at 9), and the last one at the end
    assert sorted(trainer.logger.values("logits/attention_max")) == [3, 9, 11]
