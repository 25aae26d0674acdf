"""SpectralAlignmentMonitor: sign-diversity collapse of layer inputs along the top singular vector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from lightning_diag._checks import check_int
from lightning_diag.alerts import Above, Action, Alert, NonFinite, Rule, Severity
from lightning_diag.callbacks._base import Cadence, DiagnosticCallback, Figures, HostFigures
from lightning_diag.callbacks._trainer import has_tensorboard, log_histogram
from lightning_diag.keys import Key
from lightning_diag.layers import LinearMap, linear_maps, validate_patterns
from lightning_diag.metrics.spectral import (
    CollapseBaseline, alignment_moments, power_iteration, spectral_alignment, stable_rank, summary_from_moments,
)  # fmt: skip

__all__ = ["SpectralAlignmentMonitor"]

LAYER_RULES = ("baseline", "absolute", "none")
_SUMMARY = ("sign_diversity", "collapse", "mean_abs", "abs_mean", "std")
_REFINE_ITERS = 10  # power iterations after sigma_1 jumped between two checks
_SIGMA_JUMP = 0.2  # relative change of sigma_1 that counts as a jump
_LISTED_LAYERS = 5  # layers named in the model-level alert message
_MODEL = "model level: mean collapse, share collapsed or flagged"


class SpectralAlignmentMonitor(DiagnosticCallback):
    """Early warning of loss explosions from the spectral alignment (SA) of layer inputs.

    After Qiu et al., "Spectral Alignment as Predictor of Loss Explosion in Neural Network
    Training" (2025, arXiv 2510.04202), as reconstructed in DESIGN.md section 5 and
    :mod:`lightning_diag.metrics.spectral`. For a watched map ``y = W x`` with top right singular
    vector ``v_1``, each sampled input row gets ``SA_t = cos(x_t, v_1)``. A step changes ``s_1`` by
    about ``-lr * sum_t (u_1^T delta_t) SA_t ||x_t||``: mixed signs cancel; when all inputs fall on
    one side of ``v_1`` (sign diversity ``D = 1 - |2 p+ - 1|`` collapses) ``s_1`` grows step after
    step and the loss explodes. Every figure is invariant under ``v_1 -> -v_1``.

    **How it measures.** On check steps (every ``check_every_n_steps``) forward pre-hooks keep at
    most ``max_rows`` random input rows per map (a private generator; the global RNG is never
    touched; the first micro-batch under accumulation; not the recomputed forward of activation
    checkpointing). In ``on_before_optimizer_step`` a power iteration warm-started from the last
    check's ``v_1`` (batched over maps of equal shape) gives ``v_1`` and ``s_1``, and one batched
    pass the SA statistics, as sums that add up across DDP ranks (one SUM all-reduce), so every
    rank sees the global figures. The per-map collapse and ``s_1`` reach the host each check
    without a sync; the rest is read on logging steps.

    **Which maps** (:func:`~lightning_diag.layers.linear_maps`): every ``nn.Linear`` with a
    trainable 2-D weight and the query, key and value blocks of each ``nn.MultiheadAttention``
    in-projection, but the output head (the last ``nn.Linear`` registered; ``exclude_head=False``
    keeps it) and ``MultiheadAttention.out_proj`` (used through its weight, its input internal);
    then ``include``/``exclude`` patterns. A map whose input never reached its hook at a check is
    left out of that check's figures (never NaN for "not called"), with one note.

    **Alerts.** Per map (warning): its collapse ``c = 1 - D`` at least ``collapse_threshold`` and
    ``baseline_rise`` above the map's own EMA baseline
    (:class:`~lightning_diag.metrics.spectral.CollapseBaseline`) for ``patience`` steps.
    Model level (critical): the mean collapse over maps at least ``mean_collapse_threshold`` for
    ``mean_collapse_patience`` steps; the message names the maps past their baseline, first first.
    Non-finite weights (critical): NaN figures, never stale ones. No rule fires before
    ``warmup_steps``. Calibration and why these defaults: ``docs/calibration.md``.

    Args:
        check_every_n_steps: measure on optimizer steps ``s`` with ``(s + 1) % n == 0``.
        every_n_steps: logging cadence (``None``: the trainer's ``log_every_n_steps``).
        include, exclude: glob patterns of map or module names.
        exclude_head: leave out the last ``nn.Linear`` registered (warned if it does not run last).
        max_rows: input rows sampled per map and check (all of them when fewer).
        power_iterations: power iterations per check from the previous ``v_1``.
        per_layer: log per-map figures (``False``: model-level figures only).
        layer_rule: ``"baseline"``, ``"absolute"`` (no baseline condition) or ``"none"``.
        collapse_threshold: per-map collapse that counts as collapsed, in ``(0, 1]``.
        baseline_rise: how far above its baseline a map's collapse must be (``"baseline"``).
        baseline_alpha, baseline_warmup: EMA decay and exact warm-up (checks) of the baselines.
        patience: steps a map must stay flagged before its alert (checks are ``check_every_n_steps`` apart).
        warmup_steps: no rule fires, and no baseline learns, before this optimizer step.
        mean_collapse_threshold: model-level threshold on the mean collapse; ``None`` disables it.
        mean_collapse_patience: steps for the model-level alert.
        histogram_every_n_steps: TensorBoard SA histograms (``None``: none).
        seed: seed of the row sampling (rank ``r`` uses ``seed + r``).
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``callable(alert, trainer)``.
        rules: extra rules on the logged keys, e.g. ``Above("spectral_alignment/frac_flagged", 0.1)``.

    Example:
        >>> monitor = SpectralAlignmentMonitor(check_every_n_steps=10, exclude=["*.attn.*"], action="warn")
        >>> [rule.severity for rule in monitor.book.rules]
        ['critical', 'warning', 'critical']
    """

    family = "spectral_alignment"
    KEYS = (
        Key("mean_collapse", "mean of the collapse c over the watched maps", _MODEL, rate="check"),
        Key("frac_collapsed", "share of maps with c >= collapse_threshold", _MODEL, rate="check"),
        Key("frac_flagged", "share of maps past their collapse baseline now", _MODEL, rate="check"),
        Key("collapse/{layer}", "c = 1 - D = |2 p+ - 1|, p+ the share of rows with SA > 0", "collapse c per layer",
            rate="check"),
        Key("sigma1/{layer}", "top singular value s_1 of the weight", "top singular value per layer", rate="check"),
        Key("sign_diversity/{layer}", "D = 1 - |2 p+ - 1| (1 balanced, 0 one-sided)", "sign diversity D per layer",
            requires="per_layer"),
        Key("mean_abs/{layer}", "mean of |SA_t|", requires="per_layer"),
        Key("abs_mean/{layer}", "|mean of SA_t|", requires="per_layer"),
        Key("std/{layer}", "standard deviation of SA_t", requires="per_layer"),
        Key("stable_rank/{layer}", "||W||_F^2 / s_1^2", "stable rank per layer", requires="per_layer"),
        Key("hist/{layer}", "histogram of SA_t", kind="histogram", requires="histograms"),
    )  # fmt: skip

    def __init__(
        self,
        *,
        check_every_n_steps: int = 10,
        every_n_steps: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        exclude_head: bool = True,
        max_rows: int = 512,
        power_iterations: int = 2,
        per_layer: bool = True,
        layer_rule: Literal["baseline", "absolute", "none"] = "baseline",
        collapse_threshold: float = 0.9,
        baseline_rise: float = 0.4,
        baseline_alpha: float = 0.95,
        baseline_warmup: int = 5,
        patience: int = 21,
        warmup_steps: int = 200,
        mean_collapse_threshold: float | None = 0.8,
        mean_collapse_patience: int = 21,
        histogram_every_n_steps: int | None = 500,
        seed: int = 0,
        action: Action = "warn",
        rules: Sequence[Rule] = (),
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules)
        for name, value, low in [("check_every_n_steps", check_every_n_steps, 1), ("max_rows", max_rows, 1),
                                 ("power_iterations", power_iterations, 1), ("patience", patience, 1),
                                 ("mean_collapse_patience", mean_collapse_patience, 1),
                                 ("baseline_warmup", baseline_warmup, 1), ("warmup_steps", warmup_steps, 0),
                                 ("seed", seed, 0)]:  # fmt: skip
            check_int(name, value, low)
        check_int("histogram_every_n_steps", histogram_every_n_steps, 1, optional=True)
        if layer_rule not in LAYER_RULES:
            raise ValueError(f"`layer_rule` must be one of {LAYER_RULES}, got {layer_rule!r}")
        for name, value, allowed, inside in [
            ("collapse_threshold", collapse_threshold, "(0, 1]", lambda v: 0 < v <= 1),
            ("baseline_rise", baseline_rise, "[0, 1]", lambda v: 0 <= v <= 1),
            ("baseline_alpha", baseline_alpha, "(0, 1)", lambda v: 0 < v < 1),
            ("mean_collapse_threshold", mean_collapse_threshold, "(0, 1]", lambda v: 0 < v <= 1),
        ]:  # fmt: skip
            optional = name == "mean_collapse_threshold"
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not inside(value):  # NaN is outside
                none = "None or " if optional else ""
                raise ValueError(f"`{name}` must be {none}a number in {allowed}, got {value!r}")
        self.include, self.exclude = validate_patterns("include", include), validate_patterns("exclude", exclude)
        self.check_every_n_steps, self.exclude_head, self.max_rows = check_every_n_steps, exclude_head, max_rows
        self.power_iterations, self.per_layer, self.layer_rule = power_iterations, per_layer, layer_rule
        self.histogram_every_n_steps, self.seed, self.warmup_steps = histogram_every_n_steps, seed, warmup_steps
        self.collapse_baseline = CollapseBaseline(collapse_threshold, None if layer_rule == "absolute" else baseline_rise,
                                                  alpha=baseline_alpha, warmup=baseline_warmup)  # fmt: skip
        self._flags: dict[str, bool] = {}
        self._layer_rule = _LayerCollapse(self._flags, collapse_threshold, patience, baseline_rise, layer_rule)
        self._builtin_rules = [NonFinite("spectral_alignment/sigma1/*", severity="critical")]
        if layer_rule != "none":
            self._builtin_rules.append(self._layer_rule)
        if mean_collapse_threshold is not None:
            self._builtin_rules.append(_MeanCollapse(mean_collapse_threshold, mean_collapse_patience, self._layer_rule))
        self._histograms = Cadence(histogram_every_n_steps)
        self._checks = Cadence(check_every_n_steps)
        self._maps: list[LinearMap] = []
        self._handles: list[Any] = []
        self._captured: dict[int, Tensor] = {}
        self._armed_step = -1
        self._v1: dict[str, Tensor] = {}  # warm starts by map name (checkpointed)
        self._last_sigma: dict[str, float] = {}
        self._refine: set[str] = set()
        self._generators: dict[torch.device, torch.Generator] = {}
        self._head: tuple[str, nn.Module] | None = None
        self._call_order: list[str] | None = None
        self._armed, self._rank = False, 0
        self._indices: dict[tuple[Any, ...], Tensor] = {}

    histograms = property(lambda self: self.per_layer and self.histogram_every_n_steps is not None)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, exclude_head=self.exclude_head)

    # -- set-up: the maps and their hooks ---------------------------------------------------------

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maps, self._head = linear_maps(pl_module, self.include, self.exclude, self.exclude_head)
        self.layers, self._rank = [m.name for m in self._maps], trainer.global_rank
        if not self._maps:
            self.warn_once("no-layers", "the model has no nn.Linear or nn.MultiheadAttention to watch; doing nothing")
            return
        by_module: dict[int, list[int]] = {}
        for index, m in enumerate(self._maps):
            by_module.setdefault(id(m.module), []).append(index)
        for indices in by_module.values():
            hook = self._make_hook(indices)
            self._handles.append(self._maps[indices[0]].module.register_forward_pre_hook(hook, with_kwargs=True))
        if self._head is not None:  # to check, at the first check, that the head is the last one to run
            self._call_order = []
            self._handles.append(self._head[1].register_forward_pre_hook(self._note_head))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._call_order, self._armed_step = [], None, -1
        self._captured.clear()

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._histograms.start(trainer.global_step)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        step = trainer.global_step
        if self._handles and self._checks.at(step) and self._armed_step != step:  # first micro-batch only
            self._captured.clear()
            self._armed_step, self._armed = step, True

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._armed = False  # a forward recomputed in backward (activation checkpointing) is not sampled

    def _make_hook(self, indices: list[int]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not getattr(self, "_armed", False) or indices[0] in self._captured:
                return
            rows: dict[int, Tensor] = {}  # id(input) -> sampled rows: q, k, v of self-attention share one sample
            for i in indices:
                m = self._maps[i]
                x = args[m.input] if len(args) > m.input else kwargs.get(m.input_name)
                if isinstance(x, Tensor) and x.ndim > 0:
                    self._captured[i] = rows[id(x)] = rows.get(id(x)) if id(x) in rows else self._sample(x)
                if self._call_order is not None:
                    self._call_order.append(m.name)

        return hook

    def _note_head(self, module: nn.Module, args: Any) -> None:
        if getattr(self, "_armed", False) and self._call_order is not None:
            self._call_order.append("")

    def _sample(self, x: Tensor) -> Tensor:
        x = x.detach()
        n = x.numel() // max(x.shape[-1], 1)
        if n <= self.max_rows:
            return x.reshape(n, x.shape[-1]).clone()
        if x.device not in self._generators:
            self._generators[x.device] = torch.Generator(device=x.device).manual_seed(self.seed + self._rank)
        idx = torch.randint(n, (self.max_rows,), device=x.device, generator=self._generators[x.device])
        if x.ndim == 2:
            return x.index_select(0, idx)
        # Gather the rows in place of flattening first: a non-contiguous input would be copied whole. Unravelled
        # with Python ints: torch.unravel_index puts its divisors on the device with a blocking copy (a sync).
        index = []
        for size in reversed(x.shape[1:-1]):
            index.append(idx % size)
            idx = idx // size
        return x[(idx, *reversed(index))]

    # -- a check ----------------------------------------------------------------------------------

    def measures(self, step: int) -> bool:
        return self._armed_step == step and bool(self._captured)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, logging: bool) -> Figures:
        captured, self._captured, self._armed = self._captured, {}, False
        self._check_calls(captured)
        called = sorted(captured)
        sigma, rank = self._measure_weights(called)
        # per_layer=False declares no hist/<layer> key, so it logs no histogram
        histograms = self.histograms and self._histograms.due(trainer.global_step) and has_tensorboard(trainer)
        moments = torch.cat([self._moments(trainer, captured, g, histograms) for g in _buckets(captured)])
        order = [i for group in _buckets(captured) for i in group]
        moments = moments[self._index(np.argsort(order).tolist(), moments.device)]
        if trainer.world_size > 1:  # the sums add up across ranks: every rank gets the global figures
            moments = trainer.strategy.reduce(moments, reduce_op="sum")
        summary = summary_from_moments(moments)
        broken = ~torch.isfinite(sigma)  # non-finite weights: NaN figures, never ones against a stale v_1
        values = {f"{name}/{{layer}}": torch.where(broken, float("nan"), getattr(summary, name)) for name in _SUMMARY}
        values.update({"sigma1/{layer}": sigma, "stable_rank/{layer}": rank})
        if not self.per_layer:
            values = {k: v for k, v in values.items() if k in ("collapse/{layer}", "sigma1/{layer}")}
        return Figures(values, [self._maps[i].name for i in called])

    def _measure_weights(self, called: list[int]) -> tuple[Tensor, Tensor]:
        """Warm-started power iteration per group of equal-shape weights: ``s_1`` and stable rank per map."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for position, i in enumerate(called):
            w = self._maps[i].weight()
            groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append(position)
        sigma = torch.empty(len(called), device=self._maps[called[0]].weight().device)
        rank = torch.empty_like(sigma)
        for positions in groups.values():
            maps = [self._maps[called[p]] for p in positions]
            weights = torch.stack([m.weight().detach() for m in maps])
            warm = [self._v1.get(m.name) for m in maps]
            v0 = torch.stack(warm).to(weights.device) if all(v is not None for v in warm) else None  # type: ignore[arg-type]
            refine = any(m.name in self._refine for m in maps)
            s, _, v = power_iteration(weights, v0, iters=_REFINE_ITERS if refine else self.power_iterations)
            self._v1.update({m.name: v[j] for j, m in enumerate(maps)})
            index = self._index(positions, sigma.device)
            sigma.index_copy_(0, index, s.to(sigma.dtype))
            rank.index_copy_(0, index, stable_rank(weights, s).to(sigma.dtype))
        self._refine.clear()
        return sigma, rank

    def _moments(self, trainer: pl.Trainer, captured: dict[int, Tensor], group: list[int], histograms: bool) -> Tensor:
        """SA sufficient statistics of maps whose sampled inputs have equal shape: one batched pass."""
        inputs = torch.stack([captured[i] for i in group])
        vectors = torch.stack([self._v1[self._maps[i].name] for i in group]).to(inputs.device)
        alignment = spectral_alignment(inputs, vectors)
        for i, values in zip(group, alignment) if histograms else ():
            log_histogram(trainer, f"{self.family}/hist/{self._maps[i].name}", values, trainer.global_step)
        return alignment_moments(alignment)

    def _check_calls(self, captured: dict[int, Tensor]) -> None:
        missing = [m.name for i, m in enumerate(self._maps) if i not in captured]
        if missing:
            self.warn_once("no-input", f"no input reached {missing[:10]} on a check step (not called through "
                                       "forward?); they are left out of the figures while that lasts")  # fmt: skip
        order, self._call_order = self._call_order, None
        if order is None or self._head is None:
            return
        after = order[order.index("") + 1 :] if "" in order else []
        if "" not in order or after:
            how = "was not called through forward()" if "" not in order else f"ran before {after[:5]}"
            self.warn_once("head", f"`exclude_head=True` left out {self._head[0]!r}, the last nn.Linear registered, "
                           f"but it {how}. If the output head is another layer, pass `exclude_head=False, "
                           f"exclude=[<head name>]`.")  # fmt: skip

    def _index(self, positions: Sequence[int], device: torch.device) -> Tensor:
        """A device index tensor, built once per positions and device: a host-to-device copy at every check
        would make the host wait for the device (``non_blocking=False`` copies synchronize the stream)."""
        key = (tuple(positions), device)
        if key not in self._indices:
            self._indices[key] = torch.as_tensor(key[0], dtype=torch.long, device=device)
        return self._indices[key]

    # -- deciding, on the host --------------------------------------------------------------------

    def derive(self, host: HostFigures) -> dict[str, float | np.ndarray]:
        collapse, sigma = host.per_layer["collapse/{layer}"], host.per_layer["sigma1/{layer}"]
        armed = host.step >= self.warmup_steps
        flags = self.collapse_baseline.update(host.layers, collapse, absorb=armed) & armed
        self._flags.clear()
        self._flags.update(zip(host.layers, flags.tolist()))
        self._layer_rule.armed = self._mean_armed = armed
        for name, s in zip(host.layers, sigma.tolist()):
            old = self._last_sigma.get(name)
            if old is not None and abs(s - old) > _SIGMA_JUMP * max(abs(old), 1e-12):
                self._refine.add(name)  # the top of the spectrum moved: iterate longer next check
            self._last_sigma[name] = s
        finite = np.isfinite(collapse)  # over the maps with a figure; none (NaN weights): NaN, never a healthy 0

        def share(values: np.ndarray) -> float:
            return float(np.mean(values[finite])) if finite.any() else float("nan")

        with np.errstate(invalid="ignore"):
            collapsed = collapse >= self.collapse_baseline.threshold
            return {"mean_collapse": share(collapse), "frac_collapsed": share(collapsed), "frac_flagged": share(flags)}

    # -- checkpoint state -------------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        return {"v1": {k: v.cpu() for k, v in self._v1.items()}, "baseline": self.collapse_baseline.state_dict(),
                "last_sigma": dict(self._last_sigma), "refine": sorted(self._refine),
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}  # fmt: skip

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._v1 = {k: v.clone() for k, v in state.get("v1", {}).items()}
        if "baseline" in state:
            self.collapse_baseline.load_state_dict(state["baseline"])
        self._last_sigma = dict(state.get("last_sigma", {}))
        self._refine = set(state.get("refine", []))  # s_1 jumped at the last check: the next one iterates longer
        for device, gen_state in state.get("generators", {}).items():
            self._generators[torch.device(device)] = torch.Generator(device=device)
            self._generators[torch.device(device)].set_state(gen_state)


def _buckets(captured: dict[int, Tensor]) -> list[list[int]]:
    """Maps whose sampled inputs have equal shape, dtype and device: one batched SA pass each."""
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i in sorted(captured):
        x = captured[i]
        by_shape.setdefault((tuple(x.shape), x.dtype, x.device), []).append(i)
    return list(by_shape.values())


class _LayerCollapse(Rule):
    """Per-map rule: the map is flagged by the monitor's :class:`CollapseBaseline` this check."""

    relation = "collapse at or above"

    def __init__(self, flags: dict[str, bool], threshold: float, patience: int, rise: float, mode: str) -> None:
        super().__init__("spectral_alignment/collapse/*", threshold, patience=patience)
        self.flags, self.rise, self.armed = flags, (rise if mode == "baseline" else None), False

    def describe(self) -> str:
        rise = f" and {self.rise:g} above its baseline" if self.rise is not None else ""
        return f"{self.relation} {self.threshold:g}{rise}{self._for()}"

    def hits(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return np.array([self.flags.get(self.keys[s].rpartition("/")[2], False) for s in slots], dtype=bool)


class _MeanCollapse(Above):
    """Model-level rule on the mean collapse; its alert names the maps past their own rule, first first."""

    relation = "at or above"

    def __init__(self, threshold: float, patience: int, layer_rule: _LayerCollapse, severity: Severity = "critical") -> None:
        super().__init__("spectral_alignment/mean_collapse", threshold, patience=patience, severity=severity)
        self.layer_rule = layer_rule

    def hits(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return (values >= self.threshold) & self.layer_rule.armed  # NaN never hits: no data is not a collapse

    def alert(self, source: str, key: str, step: int, value: float) -> Alert:
        alert = super().alert(source, key, step, value)
        rule = self.layer_rule
        since = sorted((int(s), k.rpartition("/")[2]) for k, s in zip(rule.keys, rule.start) if s >= 0)
        listed = ", ".join(f"{name} (since step {s})" for s, name in since[:_LISTED_LAYERS])
        more = f" and {len(since) - _LISTED_LAYERS} more" if len(since) > _LISTED_LAYERS else ""
        detail = f"; maps collapsing, first first: {listed}{more}" if since else "; no single map past its own baseline"
        return Alert(**{**alert.as_dict(), "message": alert.message + detail})
