"""LogitMonitor: the largest attention logit per layer and the output logits' normaliser, on check steps."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from lightning_diag._checks import check_bool, check_int, check_number
from lightning_diag.alerts import Above, Action, NonFinite, Rule
from lightning_diag.callbacks._base import Cadence, DiagnosticCallback, Figures, HostFigures
from lightning_diag.callbacks._sharding import max_over_ranks, mean_over_ranks, sum_over_ranks
from lightning_diag.keys import Key
from lightning_diag.layers import find_module, last_linear
from lightning_diag.metrics.logits import (
    AttentionLogitRecorder, OutputLogitStats, compiled_regions, output_logit_stats, traced_modules,
)  # fmt: skip
from lightning_diag.metrics.stats import EmaBaseline

__all__ = ["LogitMonitor"]

_ATTENTION, _OUTPUT = "attention logits: max over layers, min entropy", "output logits: log Z, max |logit|"


class LogitMonitor(DiagnosticCallback):
    """Attention-logit growth and output-logit divergence, measured on check steps only.

    Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training
    instabilities", arXiv 2309.14322): attention logits ``q . k / sqrt(d_head)`` that keep growing
    (cured by qk-layernorm) and output logits whose ``log Z`` drifts far from 0 (cured by z-loss)
    come before divergence. Dehghani et al. 2023 (ViT-22B): huge logits make attention one-hot;
    Kimi K2's QK-clip caps the maximum logit at 100; Prieto et al. 2025: *softmax collapse*, when
    rounding makes the top probability exactly 1 and the gradient vanishes.

    **How it measures.** On the first micro-batch of a check step (every ``check_every_n_steps``)
    an :class:`~lightning_diag.metrics.logits.AttentionLogitRecorder` is active during the forward:
    every ``nn.MultiheadAttention`` call (from its in-projection and inputs) and every
    ``F.scaled_dot_product_attention`` call (intercepted by a ``TorchFunctionMode``) gives its exact
    maximum pre-softmax logit over ``max_queries`` sampled queries, masks, ``is_causal`` and a
    user-supplied scale honoured, and the minimum attention entropy over heads. The output head
    (the last ``nn.Linear`` registered, or ``output=<module name>``) gives ``log Z`` per row,
    ``max |logit|`` and the share of rows in softmax collapse, from its last call in the forward
    (one warning if it was not called, or called more than once: a shared or tied layer; then
    name the head with ``output=``). A one-output head (regression, binary cross-entropy) has no
    softmax: only ``output_max`` is logged, with one warning. ``torch.compile``'d submodules are
    not hooked (dynamo would trace the hooks and recompile): their attention calls are not
    recorded, and a head inside one is read at the compiled module's output (both said once).
    Nothing is active between checks;
    the recorder and hook are gone before the backward. Under DDP the maxima are reduced with MAX,
    the means with SUM, so every rank sees the global figures.

    **Alerts.** ``logits/log_z_abs_max`` (``max |log Z|``) above ``log_z_threshold`` (warning);
    ``logits/softmax_collapse`` above ``collapse_threshold`` (warning); non-finite ``log_z_max`` or
    ``attention_max`` (critical: the logits themselves are broken); and, off by default, the maximum
    attention logit above ``attention_threshold`` (QK-clip caps it at 100) or ``growth_factor``
    times its baseline (``logits/attention_growth``, the mean of the first ``baseline_checks``
    checks), for ``patience`` steps. The early-warning suite chose these defaults leave-one-family-out
    (``docs/early_warning.md``): on its small models the attention maximum grows on stable runs as
    much as on exploding ones, so an attention rule cost far more false alarms than it caught.

    Args:
        check_every_n_steps: measure on optimizer steps ``s`` with ``(s + 1) % n == 0``.
        every_n_steps: logging cadence (``None``: the trainer's ``log_every_n_steps``).
        attention: record attention calls.
        output: the output head's module name (as in ``model.named_modules()``, e.g. ``"lm_head"``;
            the module whose output is the model's logits), ``None`` for the last ``nn.Linear``
            registered, ``False`` for no output figures. Name it when the last ``nn.Linear``
            registered is not the head (an unused or auxiliary layer, a head shared with an inner use).
        max_queries: query rows sampled per attention call.
        attention_threshold, growth_factor, log_z_threshold, collapse_threshold: alert thresholds
            (``None`` disables a rule): ``> 0``; ``growth_factor > 1``; ``collapse_threshold`` (a
            share) in ``(0, 1)``.
        baseline_checks: checks averaged into the attention baseline before the growth rule fires.
        patience: steps a condition must hold (checks are ``check_every_n_steps`` apart).
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``callable(alert, trainer)``.
        rules: extra rules on the logged keys, e.g. ``Above("logits/attention_max/*", 50.0)``.
        prefix: the first part of the keys in place of ``logits`` (two of these monitors on one
            trainer need two prefixes).

    Example:
        >>> monitor = LogitMonitor(check_every_n_steps=20, attention_threshold=100.0, growth_factor=10.0)
        >>> [rule.metric for rule in monitor.book.rules][2:]
        ['logits/attention_max', 'logits/attention_growth', 'logits/log_z_abs_max', 'logits/softmax_collapse']
    """

    family = "logits"
    KEYS = (
        Key("attention_max", "largest pre-softmax attention logit q.k*scale over layers", _ATTENTION, rate="check",
            requires="attention"),
        Key("attention_max/{layer}", "largest attention logit of the layer (module running the call)",
            "attention max per layer", rate="check", requires="attention"),
        Key("attention_growth", "attention_max / its baseline (mean of the first checks)", _ATTENTION, rate="check",
            requires="attention", host=True),
        Key("attention_entropy_min", "lowest attention entropy over layers and heads (nats)", _ATTENTION,
            rate="check", requires="attention"),
        Key("log_z_mean", "mean over rows of log Z = logsumexp(logits)", _OUTPUT, rate="check", requires="output"),
        Key("log_z_max", "largest log Z", _OUTPUT, rate="check", requires="output"),
        Key("log_z_min", "smallest log Z", _OUTPUT, rate="check", requires="output"),
        Key("log_z_abs_max", "largest |log Z| (z-loss keeps it near 0)", _OUTPUT, rate="check", requires="output"),
        Key("output_max", "largest |logit| of the output head", _OUTPUT, rate="check", requires="output"),
        Key("softmax_collapse", "share of rows whose float32 top softmax probability is exactly 1", _OUTPUT,
            rate="check", requires="output"),
    )  # fmt: skip

    def __init__(
        self,
        *,
        check_every_n_steps: int = 20,
        every_n_steps: int | None = None,
        attention: bool = True,
        output: str | bool | None = None,
        max_queries: int = 128,
        attention_threshold: float | None = None,
        growth_factor: float | None = None,
        log_z_threshold: float | None = 50.0,
        collapse_threshold: float | None = 0.5,
        baseline_checks: int = 5,
        patience: int = 1,
        action: Action = "warn",
        rules: Rule | Sequence[Rule] = (),
        prefix: str | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules, prefix=prefix)
        for name, value, low in (("check_every_n_steps", check_every_n_steps, 1), ("max_queries", max_queries, 1),
                                 ("baseline_checks", baseline_checks, 1), ("patience", patience, 1)):  # fmt: skip
            check_int(name, value, low)
        if output is not None and not isinstance(output, (str, bool)) or output is True:
            raise ValueError(f"`output` must be None (the last nn.Linear), a module name or False, got {output!r}")
        check_bool("attention", attention)
        check_number("attention_threshold", attention_threshold, 0.0, optional=True)
        check_number("growth_factor", growth_factor, 1.0, optional=True)  # a ratio to the baseline: 1 is no growth
        check_number("log_z_threshold", log_z_threshold, 0.0, optional=True)
        check_number("collapse_threshold", collapse_threshold, 0.0, 1.0, optional=True)  # a share never exceeds 1
        thresholds = {"attention_threshold": attention_threshold, "growth_factor": growth_factor,
                      "log_z_threshold": log_z_threshold, "collapse_threshold": collapse_threshold}  # fmt: skip
        self.check_every_n_steps, self.attention, self.output_name = check_every_n_steps, attention, output
        self.max_queries, self.checks = max_queries, Cadence(check_every_n_steps)
        self.baseline = EmaBaseline(1, alpha=0.999, warmup=baseline_checks)  # the mean of the first checks
        keys = {"attention_threshold": "attention_max", "growth_factor": "attention_growth",
                "log_z_threshold": "log_z_abs_max", "collapse_threshold": "softmax_collapse"}  # fmt: skip
        self._builtin_rules: list[Rule] = [NonFinite(f"{self.family}/log_z_max"), NonFinite(f"{self.family}/attention_max")]
        self._builtin_rules += [Above(f"{self.family}/{keys[n]}", v, patience=patience) for n, v in thresholds.items()
                                if v is not None]  # fmt: skip
        self._head: nn.Module | None = None
        self._head_name = ""
        self._head_calls = 0
        self._outputs = 0  # the head's output size (its last dimension) at the last call
        self._hook: Any = None
        self._recorder: AttentionLogitRecorder | None = None
        self._logits: OutputLogitStats | None = None

    @property
    def output(self) -> bool:
        return self.output_name is not False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(output=self.output_name, attention=self.attention)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._head, self._head_name = None, ""
        compiled = compiled_regions(pl_module)
        if self.output:
            if isinstance(self.output_name, str):
                self._head_name, self._head = self.output_name, find_module(pl_module, self.output_name, "output")
            else:
                self._head_name, self._head = last_linear(pl_module) or ("", None)
            if self._head is None:
                self.warn_once("no-head", "the model has no nn.Linear output head; output logits are not measured")
            elif compiled:
                self._head = self._eager_head(compiled)
        if self.attention and compiled:
            self.warn_once("compiled", f"attention calls inside the torch.compile'd {list(compiled)[:5]} are not "
                                       "recorded: a hook or mode there would be traced by dynamo and recompile it")
        self.layers = [n or "model" for n, m in pl_module.named_modules()] if self.attention else []

    def _eager_head(self, compiled: dict[str, nn.Module]) -> nn.Module | None:
        """The head, or the compiled module around it whose hooks run eagerly (a hook inside would be traced)."""
        for name, region in compiled.items():
            if self._head not in traced_modules(region):
                continue
            if getattr(region, "_compiled_call_impl", None) is not None:  # compiled in place: no eager boundary
                self.warn_once("compiled-head", f"the output head {self._head_name!r} is compiled in place "
                               f"(`{name}.compile()`), where a hook would be traced by dynamo: output logits are not "
                               "measured; pass `output=` with a module outside it, or use `torch.compile(module)`")
                return None
            self.warn_once("compiled-head", f"the output head {self._head_name!r} runs inside the torch.compile'd "
                           f"{name!r}, where a hook would be traced by dynamo: the output figures are of {name!r}'s "
                           "output; pass `output=` to choose another module")
            self._head_name = name
            return region
        return self._head

    def arm(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._logits, self._head_calls = None, 0
        if self.attention:
            self._recorder = AttentionLogitRecorder(pl_module, max_queries=self.max_queries).__enter__()
        if self._head is not None:
            self._hook = self._head.register_forward_hook(self._on_output)

    def _on_output(self, module: nn.Module, args: Any, output: Any) -> None:
        self._head_calls += 1
        if isinstance(output, Tensor) and output.ndim >= 1 and output.shape[-1] > 0:
            # the last call's: a layer reused inside the model (tied, shared) gives the logits last
            self._logits, self._outputs = output_logit_stats(output), output.shape[-1]

    def disarm(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)  # a no-op when it is not active

    def detach(self) -> None:
        self._recorder, self._logits, self._head = None, None, None

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, logging: bool
    ) -> Figures | None:
        stats = self._recorder.stats() if self._recorder is not None else {}
        if self._recorder is not None and self._recorder.errors:
            self.warn_once("attention-errors", f"attention logits not measured for: {self._recorder.errors}")
        logits, self._recorder, self._logits = self._logits, None, None
        self._check_head_calls()
        values: dict[str, Tensor] = {}
        layers = list(stats)
        if layers:  # global figures: maxima with a MAX all-reduce; the entropy is a mean over query
            # rows per head, so the ranks' per-head means are averaged (exact for equally many rows
            # per rank, as DistributedSampler gives) before the minimum over heads and layers
            per_layer = max_over_ranks(torch.stack([s.max_logit.float() for s in stats.values()]))
            entropy = mean_over_ranks(torch.cat([s.entropy_per_head.float().reshape(-1) for s in stats.values()]))
            values.update({"attention_max/{layer}": per_layer, "attention_max": per_layer.max(),
                           "attention_entropy_min": entropy.min()})  # fmt: skip
        if logits is not None:
            values.update(self._output_figures(logits))
        return Figures(values, layers) if values else None

    def _check_head_calls(self) -> None:
        if self._head is None or self._head_calls == 1:
            return
        chosen = f"`output={self._head_name!r}`" if isinstance(self.output_name, str) else (
            f"{self._head_name!r}, the last nn.Linear registered")  # fmt: skip
        if self._head_calls == 0:
            self.warn_once("head-unused", f"the output head {chosen} was not called in the forward of a check step, "
                                          "so no output figure is measured; pass `output=<module name>` to name the "
                                          "module that gives the logits")  # fmt: skip
        else:
            self.warn_once("head-reused", f"the output head {chosen} was called {self._head_calls} times in one "
                                          "forward (a shared or tied layer?): the output figures are of its last call; "
                                          "pass `output=<module name>` if another module gives the logits")  # fmt: skip

    def _output_figures(self, s: OutputLogitStats) -> dict[str, Tensor]:
        if self._outputs < 2:  # regression, binary cross-entropy: no softmax to speak of
            self.warn_once("one-output", f"the output head {self._head_name!r} has one output: the softmax figures "
                                         "(log Z, softmax_collapse) need >= 2 outputs and are not logged, nor alerted "
                                         "on; output_max is")  # fmt: skip
            return {"output_max": max_over_ranks(s.output_max.reshape(1))[0]}
        sums = sum_over_ranks(torch.stack([s.log_z_mean * s.num_rows, s.softmax_collapse * s.num_rows, s.num_rows]))
        extremes = max_over_ranks(torch.stack([s.log_z_max, -s.log_z_min, s.output_max]))
        return {"log_z_mean": sums[0] / sums[2], "softmax_collapse": sums[1] / sums[2], "log_z_max": extremes[0],
                "log_z_min": -extremes[1], "log_z_abs_max": extremes[:2].abs().max(), "output_max": extremes[2]}

    def derive(self, host: HostFigures) -> dict[str, float | np.ndarray]:
        peak = host.scalars.get("attention_max")
        if peak is None:
            return {}
        ready = bool(self.baseline.ready[0])
        mean = float(self.baseline.mean[0])
        if not ready:
            self.baseline.update([peak])  # the baseline is the first checks' mean: later growth is measured against it
        if ready and mean > 0:
            return {"attention_growth": peak / mean}  # NaN logits give NaN growth
        return {"attention_growth": 0.0 if math.isfinite(peak) else math.nan}  # no baseline yet; NaN is never 0

    def extra_state(self) -> dict[str, Any]:
        return {"baseline": self.baseline.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "baseline" in state:
            self.baseline.load_state_dict(state["baseline"])
