"""SpectralAlignmentMonitor: sign-diversity collapse of layer inputs along the top singular vector."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from lightning_diag._checks import check_bool, check_int, check_number
from lightning_diag.alerts import Above, Action, Alert, NonFinite, Rule, Severity
from lightning_diag.callbacks._base import Cadence, DiagnosticCallback, Figures, HostFigures
from lightning_diag.callbacks._sharding import (
    DTensor, Sharding, deepspeed_limitation, deepspeed_zero_stage, is_row_sharded, sharding_of, sum_over_ranks,
    weight_rows,
)  # fmt: skip
from lightning_diag.callbacks._trainer import has_tensorboard, log_histogram
from lightning_diag.keys import Key, layer_in_key, split_key
from lightning_diag.layers import LinearMap, linear_maps, validate_patterns
from lightning_diag.metrics.spectral import (
    CollapseBaseline, alignment_moments, stable_rank, summary_from_moments, top_singular,
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

    **How it measures.** On check steps (every ``check_every_n_steps``, and every step while a
    rule's condition holds and it has not fired yet, so that an alert comes ``patience`` steps after
    its condition began, not ``patience`` rounded up to checks) forward pre-hooks keep at
    most ``max_rows`` random input rows per map (a private generator; the global RNG is never
    touched; the first micro-batch under accumulation; not the recomputed forward of activation
    checkpointing). In ``on_before_optimizer_step`` a power iteration warm-started from the last
    check's ``v_1`` (batched over maps of equal shape) gives ``v_1`` and ``s_1``, and one batched
    pass the SA statistics, as sums that add up across DDP ranks (one SUM all-reduce), so every
    rank sees the global figures. The per-map collapse and ``s_1`` reach the host each check
    without a sync; the rest is read on logging steps.

    **Which maps** (:func:`~lightning_diag.layers.linear_maps`, which lists what stays unwatched):
    ``nn.Linear`` layers; the q, k and v blocks of ``nn.MultiheadAttention`` in-projections;
    ``nn.Conv2d`` (``groups=1``, zero padding) on unfolded input patches; the first-layer input
    weights of ``nn.LSTM``/``nn.GRU``/``nn.RNN``; then ``include``/``exclude`` patterns; not the
    output head (the last ``nn.Linear`` registered; ``exclude_head=False`` keeps it). A map whose
    input never reached its hook at a check is left out of that check's figures (never NaN for
    "not called"), with one note.

    **Alerts.** Model level (critical): the mean collapse over maps at least
    ``mean_collapse_threshold`` for ``mean_collapse_patience`` steps; the message names the maps past
    their own baseline, earliest first. Per map (warning, with ``layer_rule="baseline"``; off by
    default): its collapse ``c = 1 - D`` at least ``collapse_threshold`` and ``baseline_rise`` above
    the map's own EMA baseline (:class:`~lightning_diag.metrics.spectral.CollapseBaseline`) for
    ``patience`` steps. Non-finite weights (critical): NaN figures, never stale ones. No rule fires
    before ``warmup_steps``. The defaults are what the early-warning suite chose,
    leave-one-family-out (``docs/early_warning.md``): the per-map rule cost more false alarms than it
    caught, and a warm-up of 100 steps (shorter than the suite's earliest explosion, ~120) keeps the
    one-sided inputs of a fresh network from alarming.

    Args:
        check_every_n_steps: measure on optimizer steps ``s`` with ``(s + 1) % n == 0`` (and every
            step while a rule's condition holds and it has not fired).
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
        patience: steps a map must stay flagged before its alert (each of them checked).
        warmup_steps: no rule fires, and no baseline learns, before this optimizer step.
        mean_collapse_threshold: model-level threshold on the mean collapse; ``None`` disables it.
        mean_collapse_patience: steps for the model-level alert.
        histogram_every_n_steps: TensorBoard SA histograms (``None``: none).
        seed: seed of the row sampling (rank ``r`` uses ``seed + r``).
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``callable(alert, trainer)``.
        rules: extra rules on the logged keys, e.g. ``Above("spectral_alignment/frac_flagged", 0.1)``.
        prefix: the first part of the keys in place of ``spectral_alignment`` (two of these monitors on one
            trainer need two prefixes).

    Example:
        >>> monitor = SpectralAlignmentMonitor(check_every_n_steps=10, exclude=["*.attn.*"], action="warn")
        >>> [rule.metric for rule in monitor.book.rules]
        ['spectral_alignment/sigma1/*', 'spectral_alignment/mean_collapse']
    """

    family = "spectral_alignment"
    KEYS = (
        Key("mean_collapse", "mean of the collapse c over the watched maps", _MODEL, rate="check", host=True),
        Key("frac_collapsed", "share of maps with c >= collapse_threshold", _MODEL, rate="check", host=True),
        Key("frac_flagged", "share of maps past their collapse baseline now", _MODEL, rate="check", host=True),
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
        layer_rule: Literal["baseline", "absolute", "none"] = "none",
        collapse_threshold: float = 0.9,
        baseline_rise: float = 0.4,
        baseline_alpha: float = 0.95,
        baseline_warmup: int = 5,
        patience: int = 21,
        warmup_steps: int = 100,
        mean_collapse_threshold: float | None = 0.8,
        mean_collapse_patience: int = 21,
        histogram_every_n_steps: int | None = 500,
        seed: int = 0,
        action: Action = "warn",
        rules: Sequence[Rule] = (),
        prefix: str | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules, prefix=prefix)
        for name, value, low in [("check_every_n_steps", check_every_n_steps, 1), ("max_rows", max_rows, 1),
                                 ("power_iterations", power_iterations, 1), ("patience", patience, 1),
                                 ("mean_collapse_patience", mean_collapse_patience, 1),
                                 ("baseline_warmup", baseline_warmup, 1), ("warmup_steps", warmup_steps, 0),
                                 ("seed", seed, 0)]:  # fmt: skip
            check_int(name, value, low)
        check_int("histogram_every_n_steps", histogram_every_n_steps, 1, optional=True)
        if layer_rule not in LAYER_RULES:
            raise ValueError(f"`layer_rule` must be one of {LAYER_RULES}, got {layer_rule!r}")
        check_number("collapse_threshold", collapse_threshold, 0.0, 1.0, high_open=False)
        check_number("baseline_rise", baseline_rise, 0.0, 1.0, low_open=False, high_open=False)
        check_number("baseline_alpha", baseline_alpha, 0.0, 1.0)
        check_number("mean_collapse_threshold", mean_collapse_threshold, 0.0, 1.0, high_open=False, optional=True)
        check_bool("exclude_head", exclude_head)
        check_bool("per_layer", per_layer)
        self.include, self.exclude = validate_patterns("include", include), validate_patterns("exclude", exclude)
        self.check_every_n_steps, self.exclude_head, self.max_rows = check_every_n_steps, exclude_head, max_rows
        self.power_iterations, self.per_layer, self.layer_rule = power_iterations, per_layer, layer_rule
        self.histogram_every_n_steps, self.seed, self.warmup_steps = histogram_every_n_steps, seed, warmup_steps
        self.collapse_baseline = CollapseBaseline(collapse_threshold,
                                                  None if layer_rule == "absolute" else baseline_rise,
                                                  alpha=baseline_alpha, warmup=baseline_warmup)  # fmt: skip
        self._flags: dict[str, bool] = {}
        self._layer_rule = _LayerCollapse(self._flags, collapse_threshold, patience, baseline_rise, layer_rule, self.family)
        self._nonfinite = NonFinite(f"{self.family}/sigma1/*", severity="critical")
        self._builtin_rules = [self._nonfinite]
        if layer_rule != "none":
            self._builtin_rules.append(self._layer_rule)
        if mean_collapse_threshold is not None:
            self._builtin_rules.append(_MeanCollapse(mean_collapse_threshold, mean_collapse_patience, self._layer_rule,
                                                      family=self.family))
        self._histograms = Cadence(histogram_every_n_steps)
        self.checks = Cadence(check_every_n_steps)
        self._maps: list[LinearMap] = []
        self._groups: list[_Group] = []
        self._solo: dict[int, _Group] = {}  # maps measured one by one (ragged row counts), by index
        self._sharding = Sharding("none")
        self._handles: list[Any] = []
        self._captured: dict[int, Tensor] = {}
        self._loaded_v: dict[str, Tensor] = {}  # warm starts from a checkpoint, by map name
        self._refine_loaded: set[str] = set()
        self._last_sigma: dict[str, float] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._head: tuple[str, nn.Module] | None = None
        self._call_order: list[str] | None = None
        self._armed, self._rank, self._histogram_now = False, 0, False

    histograms = property(lambda self: self.per_layer and self.histogram_every_n_steps is not None)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, exclude_head=self.exclude_head)

    # -- set-up: the maps, their groups and hooks ------------------------------------------------

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        maps, self._head = linear_maps(pl_module, self.include, self.exclude, self.exclude_head)
        sharded = [m for m in maps if isinstance(m.parameter(), DTensor)]
        if any(m.rows is not None or not is_row_sharded(m.parameter()) for m in sharded):
            skipped = [m.name for m in sharded if m.rows is not None or not is_row_sharded(m.parameter())]
            self.warn_once("sharded-blocks", f"not watched under this sharding (blocks of a sharded in-projection, or "
                                             f"weights not split by rows): {skipped[:10]}")  # fmt: skip
            maps = [m for m in maps if m.name not in skipped]
        if (deepspeed_zero_stage(trainer) or 0) == 3:  # the weights live in DeepSpeed's partitions
            self.warn_once("deepspeed", deepspeed_limitation(3, "spectral-alignment figures"))
            maps = []
        self._maps, self.layers, self._rank = maps, [m.name for m in maps], trainer.global_rank
        self._sharding = sharding_of(trainer, [m.parameter() for m in maps], self.layers) if maps else Sharding("none")
        if not maps:
            self.warn_once("no-layers", "the model has no nn.Linear, nn.MultiheadAttention, nn.Conv2d or recurrent "
                                        "input weight to watch; doing nothing")  # fmt: skip
            return
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, m in enumerate(maps):  # equal global shape and placement: one batched power iteration
            p = m.parameter()
            shape = tuple(p.shape) if m.rows is None else (m.rows[1] - m.rows[0], *p.shape[1:])
            groups.setdefault(
                (shape, p.dtype, str(p.device), m.kind, str(getattr(p, "placements", ""))), []
            ).append(index)
        self._groups = [_Group(indices, self._warm_start(indices),
                               any(maps[i].name in self._refine_loaded for i in indices))
                        for indices in groups.values()]  # fmt: skip
        self._solo = {}
        by_module: dict[int, list[int]] = {}
        for index, m in enumerate(maps):
            by_module.setdefault(id(m.module), []).append(index)
        for indices in by_module.values():
            hook = self._make_hook(indices)
            self._handles.append(maps[indices[0]].module.register_forward_pre_hook(hook, with_kwargs=True))
        if self._head is not None:  # to check, at the first check, that the head is the last one to run
            self._call_order = []
            self._handles.append(self._head[1].register_forward_pre_hook(self._note_head))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._call_order = [], None
        self._captured.clear()

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._histograms.start(trainer.global_step)

    def is_check_step(self, step: int) -> bool:
        # Adaptive cadence: while a rule's condition holds but has not yet fired, check every step, so
        # an alert comes `patience` steps after the condition began, not `patience` checks.
        return bool(self._handles) and (self.checks.at(step) or self._streak_pending())

    def arm(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._captured.clear()
        self._armed = True

    def disarm(self) -> None:
        self._armed = False  # also before the backward: a recomputed forward (checkpointing) is not sampled

    def _make_hook(self, indices: list[int]) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self._armed or indices[0] in self._captured:
                return
            rows: dict[int, Tensor] = {}  # id(input) -> sampled rows: q, k, v of self-attention share one sample
            with torch.no_grad():
                for i in indices:
                    m = self._maps[i]
                    x = args[m.input] if len(args) > m.input else kwargs.get(m.input_name)
                    x = getattr(x, "data", x) if type(x).__name__ == "PackedSequence" else x
                    if isinstance(x, Tensor) and x.ndim > 0:
                        self._captured[i] = rows[id(x)] = rows.get(id(x)) if id(x) in rows else self._sample(m, x)
                    if self._call_order is not None:
                        self._call_order.append(m.name)

        return hook

    def _note_head(self, module: nn.Module, args: Any) -> None:
        if self._armed and self._call_order is not None:
            self._call_order.append("")

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed + self._rank)
        return self._generators[device]

    def _sample(self, m: LinearMap, x: Tensor) -> Tensor:
        return m.sample_rows(x, self.max_rows, self._generator(x.device))

    # -- a check ----------------------------------------------------------------------------------

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, logging: bool
    ) -> Figures | None:
        captured, self._captured, self._armed = self._captured, {}, False
        self._check_calls(captured)
        if not captured:
            return None
        full = self.per_layer and self._full_figures(trainer.global_step)
        self._histogram_now = (
            full and self.histograms and self._histograms.due(trainer.global_step) and has_tensorboard(trainer)
        )
        parts = [self._measure_group(trainer, g, captured, full) for g in self._groups]
        parts = [p for p in parts if p is not None]
        names = [self._maps[i].name for indices, _ in parts for i in indices]
        figures = {k: torch.cat([p[k] for _, p in parts]) for k in parts[0][1]}
        counts = figures.pop("counts")  # (M, 2) or the (M, 6) moments: sums over the ranks' own rows
        if trainer.world_size > 1:
            counts = sum_over_ranks(counts)
        broken = ~torch.isfinite(figures["sigma1/{layer}"])  # non-finite weights: NaN figures, never stale ones
        if counts.shape[1] == 2:  # signed count and unsigned count of the rows' signs
            figures["collapse/{layer}"] = torch.where(broken, float("nan"), counts[:, 0].abs() / counts[:, 1])
        else:
            summary = summary_from_moments(counts)
            figures.update({f"{k}/{{layer}}": torch.where(broken, float("nan"), getattr(summary, k)) for k in _SUMMARY})
        return Figures(figures, names)

    def _full_figures(self, step: int) -> bool:
        """Whether this check's figures are the ones the next logging step logs (then they are all computed)."""
        log_every = self._log_cadence.every or 1
        next_log = step + (log_every - 1 - step % log_every)
        next_check = step + 1 + (self.check_every_n_steps - 1 - (step + 1) % self.check_every_n_steps)
        return next_log < next_check

    def _measure_group(
        self, trainer: pl.Trainer, group: _Group, captured: dict[int, Tensor], full: bool
    ) -> tuple[list[int], dict[str, Tensor]] | None:
        """One batched power iteration and one batched projection for the group's maps that were called."""
        called = [i for i in group.maps if i in captured]
        rows = {captured[i].shape for i in called}
        if not called or len(rows) > 1:  # a map not called, or maps fed different row counts: no batch
            if called:
                self.warn_once("ragged", "maps of one weight shape saw different numbers of input rows; they are "
                                         "measured one by one")  # fmt: skip
            return self._measure_one_by_one(trainer, group, called, captured, full) if called else None
        parent, positions = group, [group.maps.index(i) for i in called]
        if called != group.maps:  # some maps were not called: iterate on the others, then write their vectors back
            group = _Group(called, None if parent.v is None else parent.v[positions], parent.refine)
        weights = torch.stack([self._weight_rows(i) for i in called]).float()
        sharded = self._sharding.reduces
        sigma, group.v = top_singular(weights, group.v, iters=_REFINE_ITERS if group.refine else self.power_iterations,
                                      all_reduce_sum=self._sharding.all_reduce_sum if sharded else None)  # fmt: skip
        parent.refine = group.refine = False
        if group is not parent and parent.v is not None:
            parent.v[positions] = group.v
        inputs = torch.stack([captured[i] for i in called]).to(group.v.dtype)
        projection = torch.bmm(inputs, group.v).squeeze(-1)  # (B, N): the sign of SA_t, unnormalised
        out = {"sigma1/{layer}": sigma}
        if full:
            alignment = (projection / torch.linalg.vector_norm(inputs, dim=-1).clamp_min(1e-30)).clamp(-1.0, 1.0)
            out["counts"] = alignment_moments(alignment)
            out["stable_rank/{layer}"] = stable_rank(weights, sigma, all_reduce_sum=self._sharding.all_reduce_sum
                                                     if sharded else None)  # fmt: skip
            if self._histogram_now:
                for i, values in zip(called, alignment):
                    log_histogram(trainer, f"{self.family}/hist/{layer_in_key(self._maps[i].name)}", values, trainer.global_step)
        else:
            signs = torch.sign(projection)
            out["counts"] = torch.stack([signs.sum(-1), signs.abs().sum(-1)], dim=-1).double()
        return called, out

    def _measure_one_by_one(
        self, trainer: pl.Trainer, group: _Group, called: list[int], captured: dict[int, Tensor], full: bool
    ) -> tuple[list[int], dict[str, Tensor]]:
        solo = [self._solo.setdefault(i, _Group([i], self._warm_start([i]))) for i in called]
        parts = [self._measure_group(trainer, g, {i: captured[i]}, full) for g, i in zip(solo, called)]
        return called, {
            k: torch.cat([p[1][k] for p in parts if p is not None]) for k in parts[0][1]  # type: ignore[index]
        }

    def _weight_rows(self, index: int) -> Tensor:
        m = self._maps[index]
        if not self._sharding.reduces:
            return m.weight()
        return weight_rows(m.parameter(), self._sharding.owns(index)).flatten(1)  # this rank's rows, or none

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

    def _streak_pending(self) -> bool:
        return any(bool(((r.start >= 0) & ~r.fired).any()) for r in self.book.builtin if r is not self._nonfinite)

    # -- deciding, on the host --------------------------------------------------------------------

    def derive(self, host: HostFigures) -> dict[str, float | np.ndarray]:
        collapse, sigma = host.per_layer["collapse/{layer}"], host.per_layer["sigma1/{layer}"]
        armed = host.step >= self.warmup_steps
        flags = self.collapse_baseline.update(host.layers, collapse, absorb=armed) & armed
        self._flags.clear()
        self._flags.update(zip(host.layers, flags.tolist()))
        self._layer_rule.armed = self._mean_armed = armed
        jumped = set()
        for name, s in zip(host.layers, sigma.tolist()):
            old = self._last_sigma.get(name)
            if old is not None and abs(s - old) > _SIGMA_JUMP * max(abs(old), 1e-12):
                jumped.add(name)  # the top of the spectrum moved: iterate longer next check
            self._last_sigma[name] = s
        for group in [*self._groups, *self._solo.values()]:
            group.refine |= any(self._maps[i].name in jumped for i in group.maps)
        finite = np.isfinite(collapse)  # over the maps with a figure; none (NaN weights): NaN, never a healthy 0

        def share(values: np.ndarray) -> float:
            return float(np.mean(values[finite])) if finite.any() else float("nan")

        with np.errstate(invalid="ignore"):
            collapsed = collapse >= self.collapse_baseline.threshold
            return {"mean_collapse": share(collapse), "frac_collapsed": share(collapsed), "frac_flagged": share(flags)}

    # -- checkpoint state -------------------------------------------------------------------------

    def _warm_start(self, indices: list[int]) -> Tensor | None:
        vectors = [self._loaded_v.get(self._maps[i].name) for i in indices]
        if any(v is None for v in vectors):
            return None
        device = self._maps[indices[0]].parameter().device
        return torch.stack(vectors).to(device=device, dtype=torch.float32).unsqueeze(-1)  # type: ignore[arg-type]

    def extra_state(self) -> dict[str, Any]:
        v1, refine = dict(self._loaded_v), []
        for group in [*self._groups, *self._solo.values()]:
            names = [self._maps[i].name for i in group.maps]
            if group.v is not None:
                v1.update({name: v.squeeze(-1).cpu() for name, v in zip(names, group.v)})
            refine += names if group.refine else []
        return {"v1": v1, "baseline": self.collapse_baseline.state_dict(), "last_sigma": dict(self._last_sigma),
                "refine": sorted(refine),
                "generators": {str(d): g.get_state() for d, g in self._generators.items()}}  # fmt: skip

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._loaded_v = {k: v.clone() for k, v in state.get("v1", {}).items()}
        if "baseline" in state:
            self.collapse_baseline.load_state_dict(state["baseline"])
        self._last_sigma = dict(state.get("last_sigma", {}))
        self._refine_loaded = set(state.get("refine", []))  # s_1 jumped at the last check: iterate longer next
        for device, gen_state in state.get("generators", {}).items():
            self._generators[torch.device(device)] = torch.Generator(device=device)
            self._generators[torch.device(device)].set_state(gen_state)


@dataclass
class _Group:
    """Watched maps of equal weight shape (and dtype, device, placement): one batched power iteration.

    ``v`` holds their top right singular vectors ``(B, d_in, 1)`` from the last check (the warm
    start of the next one; ``None``: a cold start); ``refine`` asks for a longer iteration after
    ``s_1`` jumped.
    """

    maps: list[int]
    v: Tensor | None = None
    refine: bool = False


class _LayerCollapse(Rule):
    """Per-map rule: the map is flagged by the monitor's :class:`CollapseBaseline` this check."""

    relation = "collapse at or above"

    def __init__(self, flags: dict[str, bool], threshold: float, patience: int, rise: float, mode: str,
                 family: str = "spectral_alignment") -> None:
        super().__init__(f"{family}/collapse/*", threshold, patience=patience)
        self.flags, self.rise, self.armed = flags, (rise if mode == "baseline" else None), False

    def describe(self) -> str:
        rise = f" and {self.rise:g} above its baseline" if self.rise is not None else ""
        return f"{self.relation} {self.threshold:g}{rise}{self._for()}"

    def hits(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return np.array([self.flags.get(split_key(self.keys[s])[2], False) for s in slots], dtype=bool)


class _MeanCollapse(Above):
    """Model-level rule on the mean collapse; its alert names the maps past their own baseline, earliest first."""

    relation = "at or above"

    def __init__(
        self, threshold: float, patience: int, layer_rule: _LayerCollapse, severity: Severity = "critical",
        family: str = "spectral_alignment",
    ) -> None:
        super().__init__(f"{family}/mean_collapse", threshold, patience=patience, severity=severity)
        self.layer_rule = layer_rule

    def hits(self, values: np.ndarray, slots: np.ndarray) -> np.ndarray:
        return (values >= self.threshold) & self.layer_rule.armed  # NaN never hits: no data is not a collapse

    def alert(self, source: str, key: str, step: int, value: float) -> Alert:
        alert = super().alert(source, key, step, value)
        rule = self.layer_rule
        since = sorted((int(s), split_key(k)[2]) for k, s in zip(rule.keys, rule.start) if s >= 0)
        listed = ", ".join(f"{name} (since step {s})" for s, name in since[:_LISTED_LAYERS])
        more = f" and {len(since) - _LISTED_LAYERS} more" if len(since) > _LISTED_LAYERS else ""
        detail = (f"; maps past their baseline, in the order they collapsed: {listed}{more}" if since
                  else "; no single map past its own baseline")  # fmt: skip
        return Alert(**{**alert.as_dict(), "message": alert.message + detail})
