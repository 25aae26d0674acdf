"""GradNormWatcher: fused per-layer gradient norms, ZClip z-score spikes, optional adaptive clip."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_diag._checks import check_bool, check_int, check_number
from lightning_diag.alerts import SEVERITIES, Above, Action, NonFinite, Rule
from lightning_diag.callbacks._base import Cadence, DiagnosticCallback, Figures, HostFigures
from lightning_diag.callbacks._sharding import (
    Sharding, count_flagged, deepspeed_limitation, deepspeed_zero_stage, local_grads, local_tensor, local_tensors,
    resolve_parameters, sharding_of,
)  # fmt: skip
from lightning_diag.callbacks._trainer import grad_scale, has_grad_scaler, log_histogram
from lightning_diag.keys import Key
from lightning_diag.layers import ParameterGroups, validate_patterns
from lightning_diag.metrics.norms import grouped_norms, grouped_squares, squared_norms, tensor_norms
from lightning_diag.metrics.stats import EmaBaseline, zclip_coefficient

__all__ = ["GradNormWatcher"]

_EPS = 1e-12
_FP16_NONFINITE_PATIENCE = 5  # the fp16 scaler overflows (and skips) a few steps in a row while calibrating
_TOTAL, _NORMS, _RATIO = "total gradient norm and baseline", "gradient norm per layer", "||g|| / ||w|| per layer"
_MAX_WATCH_SETS = 16  # trainable sets remembered (toggle_optimizer alternates a few); beyond, forget and rebuild


@dataclass
class _Watch:
    """The watched parameters for one set of trainable parameters, and what is built from them once."""

    groups: ParameterGroups
    sharding: Sharding
    layer_index: Tensor  # sharded path: the layer of every watched parameter, on their device
    present: dict[Any, tuple[list[int], Tensor, list[str]]] = field(default_factory=dict)
    stepped: dict[int, tuple[int, frozenset[int] | None]] = field(default_factory=dict)


class GradNormWatcher(DiagnosticCallback):
    """Per-layer and total gradient norms with ZClip spike detection, in a few fused kernels.

    Runs in ``on_before_optimizer_step``: once per optimizer step (after gradient accumulation),
    after Lightning has unscaled fp16 gradients (for optimizers that unscale inside ``step``, the
    norms are divided by the scaler's scale), and under DDP after the gradient all-reduce. It
    measures the watched parameters that the stepping optimizer holds (with several optimizers,
    each optimizer's layers at its own steps; a logging step is a ``trainer.global_step``, which
    under manual optimization counts every ``optimizer.step()``). Parameters frozen or unfrozen
    during the run are followed (a cheap check of ``requires_grad`` each step). Every step one
    ``torch._foreach_norm`` gives every parameter's norm (summed in float64, so any finite
    gradient has a finite norm) and one more kernel the total
    ``sqrt(sum ||g_p||^2)``, which leaves for the host without a sync; there its
    z-score against an EMA baseline is computed (ZClip, Kumar et al. 2025, arXiv 2504.02507:
    warm-up ``warmup`` steps, decay ``alpha``, spike when ``z > z_threshold``). Per-layer figures
    are grouped on the device on logging steps only.

    With ``clip="zclip"`` a spiking gradient is rescaled in place so its norm becomes
    ``mean + z_threshold**2 / z * std``, from the baseline of the steps before (host floats, so the
    clip costs no sync); the baseline absorbs the clipped norm in both modes, so detection is the
    same with or without clipping. The default, ``clip="none"``, never changes training.

    Alerts: ``grad_norm/total`` non-finite (critical; under an fp16 loss scaler only after 5
    overflow steps in a row, since the scaler skips isolated overflows by design) and
    ``grad_norm/zscore`` above ``z_threshold`` (``spike_severity``, default ``"info"``: recorded,
    never acted on, because healthy Adam runs spike as high as exploding ones; figures in
    ``docs/calibration.md``).

    Args:
        every_n_steps: logging cadence (``None``: the trainer's ``log_every_n_steps``).
        include: glob patterns of parameter or layer names to watch (default: all trainable).
        exclude: glob patterns to leave out.
        group_depth: group layers by their first ``group_depth`` name parts (``2``: ``blocks.0``).
        per_layer: log per-layer figures (``False``: totals only).
        update_ratio: also log ``grad_norm/update_ratio`` (all watched weights) and, with
            ``per_layer``, ``grad_norm/update_ratio/<layer>``; costs one copy of the watched weights on
            logging steps, from ``on_before_optimizer_step`` until the optimizer has stepped.
        z_threshold: ZClip spike threshold on the z-score (> 0).
        alpha: EMA decay of the baseline mean and variance, in (0, 1).
        warmup: steps that initialise the baseline before z-scores are reported.
        clip: ``"none"`` (monitor only) or ``"zclip"`` (adaptive clipping, changes training).
        nonfinite_patience: non-finite steps in a row before alerting (``None``: 1, or 5 under an
            fp16 loss scaler).
        spike_severity: severity of the z-score alert; ``"info"`` alerts are never acted on.
        histogram_every_n_steps: TensorBoard histograms of the per-layer norms, at the first
            logging step at or after each multiple (``None``: none).
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``callable(alert, trainer)``.
        rules: a rule or a list of extra rules on the logged keys, e.g.
            ``Above("grad_norm/total", 100.0, patience=10)``.
        prefix: the first part of the keys in place of ``grad_norm`` (two watchers on one trainer, e.g.
            one per optimizer's layers, need two: ``prefix="grad_norm_disc"`` logs ``grad_norm_disc/total``).

    Example:
        >>> watcher = GradNormWatcher(every_n_steps=10, exclude=["*.bias"], action="warn")
        >>> watcher.family, watcher.clipping
        ('grad_norm', False)
    """

    family = "grad_norm"
    KEYS = (
        Key("total", "L2 norm of all watched gradients, before any clip", _TOTAL, rate="step"),
        Key("baseline", "EMA mean of the total norm (ZClip's baseline)", _TOTAL, rate="step", host=True),
        Key("zscore", "z-score of the total norm against the baseline (0 in warm-up)", "z-score of the total norm",
            rate="step", host=True),
        Key("nonfinite", "parameters whose gradient holds inf or NaN", "non-finite gradients, clipping"),
        Key("clip_coef", "factor the gradients were multiplied by", "non-finite gradients, clipping", rate="step",
            requires="clipping", note="with clip='zclip'", host=True),
        Key("clipped_steps", "steps clipped so far", "non-finite gradients, clipping", rate="step",
            requires="clipping", note="with clip='zclip'", host=True),
        Key("layer/{layer}", "L2 norm of the layer's gradients (the module owning the parameters)", _NORMS,
            requires="per_layer"),
        Key("weight_norm/{layer}", "L2 norm of the layer's weights", "weight norm per layer", requires="per_layer"),
        Key("grad_weight_ratio/{layer}", "||g|| / ||w|| of the layer", _RATIO, requires="per_layer"),
        Key("update_ratio", "||w_t+1 - w_t|| / ||w_t|| of all watched weights", "update ratio",
            requires="update_ratio", note="with update_ratio=True"),
        Key("update_ratio/{layer}", "||w_t+1 - w_t|| / ||w_t|| of the layer", "update ratio per layer",
            requires="layer_update_ratio", note="with update_ratio=True"),
        Key("layer_hist", "histogram of the per-layer gradient norms", kind="histogram", requires="histograms"),
        Key("weight_norm_hist", "histogram of the per-layer weight norms", kind="histogram", requires="histograms"),
    )  # fmt: skip

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        group_depth: int | None = None,
        per_layer: bool = True,
        update_ratio: bool = False,
        z_threshold: float = 2.5,
        alpha: float = 0.97,
        warmup: int = 25,
        clip: Literal["none", "zclip"] = "none",
        nonfinite_patience: int | None = None,
        spike_severity: Literal["info", "warning", "critical"] = "info",
        histogram_every_n_steps: int | None = 500,
        action: Action = "warn",
        rules: Rule | Sequence[Rule] = (),
        prefix: str | None = None,
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules, prefix=prefix)
        if spike_severity not in SEVERITIES:
            raise ValueError(f"`spike_severity` must be one of {SEVERITIES}, got {spike_severity!r}")
        check_int("histogram_every_n_steps", histogram_every_n_steps, 1, optional=True)
        if clip not in ("none", "zclip"):
            raise ValueError(f"`clip` must be one of ('none', 'zclip'), got {clip!r}")
        check_number("z_threshold", z_threshold, 0.0)
        check_number("alpha", alpha, 0.0, 1.0)
        check_bool("per_layer", per_layer)
        check_bool("update_ratio", update_ratio)
        check_int("group_depth", group_depth, 1, optional=True)
        check_int("nonfinite_patience", nonfinite_patience, 1, optional=True)
        self.include, self.exclude = validate_patterns("include", include), validate_patterns("exclude", exclude)
        self.group_depth, self.per_layer, self.update_ratio = group_depth, per_layer, update_ratio
        self.z_threshold, self.clip, self.nonfinite_patience = float(z_threshold), clip, nonfinite_patience
        self.histogram_every_n_steps = histogram_every_n_steps
        self.baseline = EmaBaseline(1, alpha=alpha, warmup=warmup)
        self.clipped_steps = 0
        self._nonfinite_rule = NonFinite(f"{self.family}/total", severity="critical")
        spikes = Above(f"{self.family}/zscore", z_threshold, severity=spike_severity)
        self._builtin_rules = [self._nonfinite_rule, spikes]
        self._histograms = Cadence(histogram_every_n_steps)
        self._active = False  # measuring at all (not under DeepSpeed)
        self._module: pl.LightningModule | None = None
        self._all_params: list[Tensor] = []
        self._trainable: tuple[bool, ...] = ()
        self._watches: dict[tuple[bool, ...], _Watch | None] = {}
        self._watch: _Watch | None = None
        self._optimizers: set[int] = set()
        self._before_step: tuple[list[Tensor], list[Tensor], Tensor, Tensor, list[str]] | None = None

    @property
    def clipping(self) -> bool:
        return self.clip == "zclip"

    @property
    def histograms(self) -> bool:
        return self.per_layer and self.histogram_every_n_steps is not None

    @property
    def layer_update_ratio(self) -> bool:
        return self.per_layer and self.update_ratio

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, group_depth=self.group_depth)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module, self._all_params, self._watches = pl_module, list(pl_module.parameters()), {}
        self._trainable = tuple(p.requires_grad for p in self._all_params)
        watch = self._resolve(trainer, self._trainable)
        if watch is None and self.include:
            raise ValueError(
                f"`include={list(self.include)}` matches no trainable parameter; parameters are: "
                f"{[n for n, p in pl_module.named_parameters() if p.requires_grad][:50]}"
            )
        if watch is None:
            self.warn_once("no-params", "the model has no trainable parameter to watch; doing nothing")
        self._active = not (watch is not None and watch.sharding.kind == "deepspeed")
        if not self._active:
            self.warn_once("deepspeed", deepspeed_limitation(deepspeed_zero_stage(trainer) or 0, "gradient norms"))
        self._watch, self.layers = watch, list(watch.groups.layers) if watch is not None else []
        self._nonfinite_rule.patience = self.nonfinite_patience or (
            _FP16_NONFINITE_PATIENCE if has_grad_scaler(trainer) else 1)

    def _resolve(self, trainer: pl.Trainer, trainable: tuple[bool, ...]) -> _Watch | None:
        """The watched parameters for this set of trainable ones (None: none), built once per set."""
        if trainable in self._watches:
            return self._watches[trainable]
        if len(self._watches) >= _MAX_WATCH_SETS:
            self._watches.clear()
        assert self._module is not None
        groups = resolve_parameters(trainer, self._module, self.include, self.exclude, self.group_depth)
        watch = None
        if groups.params:
            sharding = sharding_of(trainer, groups.params, groups.names)
            index = torch.zeros(0, dtype=torch.long)
            if sharding.reduces and sharding.kind != "deepspeed":  # one layout on every rank: all watched parameters
                index = torch.tensor(groups.layer_of, dtype=torch.long, device=local_tensor(groups.params[0]).device)
            watch = _Watch(groups, sharding, index)
        self._watches[trainable] = watch
        return watch

    def _follow_trainable(self, trainer: pl.Trainer) -> _Watch | None:
        """The current watch: re-resolved when a parameter was frozen or unfrozen since the last step.

        One Python pass over ``requires_grad`` flags (host attributes, no device work, no sync);
        the work is done once per distinct set of trainable parameters.
        """
        trainable = tuple(p.requires_grad for p in self._all_params)
        if trainable != self._trainable:
            self._trainable = trainable
            self._watch = self._resolve(trainer, trainable)
            if self._watch is not None:
                self.layers = list(self._watch.groups.layers)
        return self._watch

    def detach(self) -> None:
        self._watches.clear()
        self._watch, self._module, self._all_params = None, None, []
        self._optimizers.clear()
        self._before_step = None

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._histograms.start(trainer.global_step)

    def measures(self, step: int) -> bool:
        return self._active

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self._publish_earlier_optimizer_step(trainer, pl_module)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _publish_earlier_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Publish a logging step taken by an earlier optimizer of this batch, now that it has stepped.

        Under manual optimization with several optimizers ``global_step`` advances at every
        ``optimizer.step()``, and the base publishes at batch end only the batch's last step: a
        logging step taken by the first optimizer would be held and never logged. What the base
        does at batch end (the update ratio, the host read, the logging) is done here instead, at
        the next optimizer step of the batch. Never the case with one optimizer per batch: the
        step was published at its batch end.
        """
        held = self._held
        if (held is None or held.step >= trainer.global_step or held.step <= self._logged_step
                or not self._is_logging_step(held.step)):  # fmt: skip
            return
        with torch.no_grad():
            after = self.measure_after_step(trainer, pl_module)
        if after is not None:
            held.extra.append(self._pack(after))
        self.drain(trainer, held.step, wait=True)
        self.publish(trainer, held.step)

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, logging: bool
    ) -> Figures | None:
        self._warn_if_several_optimizers(optimizer)
        watch = self._follow_trainable(trainer)
        if watch is None:
            return None
        if watch.sharding.reduces:
            return self._measure_sharded(watch, trainer, optimizer, logging)
        present, layer_index, layer_names = self._layout(watch, optimizer)
        if not present:
            self.warn_once("no-grads", "no watched parameter has a gradient (all None); nothing measured")
            return None
        grads = [watch.groups.params[i].grad for i in present]
        norms = tensor_norms(grads)  # float64: finite for any finite gradient
        scale = grad_scale(trainer, optimizer)
        if scale is not None:
            norms = norms / scale
        total = torch.linalg.vector_norm(norms, dtype=torch.float64)
        if self.clipping:
            self._clip(grads, total)
        values = {"total": total}
        if logging:
            values["nonfinite"] = (~torch.isfinite(norms)).sum().to(torch.float64)
            if self.per_layer or self.update_ratio:
                weights = [watch.groups.params[i] for i in present]
                layer_weight = grouped_norms(tensor_norms(weights), layer_index, len(layer_names))
                layer_grad = grouped_norms(norms, layer_index, len(layer_names)) if self.per_layer else None
                values.update(self._weight_figures(trainer, layer_grad, layer_weight, weights, layer_index, layer_names))
        return Figures(values, layer_names)

    def _warn_if_several_optimizers(self, optimizer: Any) -> None:
        """One baseline serves every optimizer: say so once when a second one steps (one set add per step)."""
        self._optimizers.add(id(optimizer))
        if len(self._optimizers) > 1:
            self.warn_once("optimizers", f"{len(self._optimizers)} optimizers step in this run; each step's norm is "
                           "that of the stepping optimizer's gradients, but one ZClip baseline follows all of them, "
                           "so z-scores" + (" and clipping" if self.clipping else "") + " compare their norms with "
                           "one another (watch each optimizer's layers with its own GradNormWatcher(include=..., "
                           "prefix=...) if their scales differ)")

    def _measure_sharded(self, watch: _Watch, trainer: pl.Trainer, optimizer: Any, logging: bool) -> Figures:
        """FSDP and other sharding: local squares, one SUM all-reduce of the per-layer sums, never a gather.

        On logging steps the vector also carries one non-finite flag per parameter: summed over the
        ranks and read as ``> 0``, a parameter counts once however many of its shards are bad.
        """
        groups, sharding, index = watch.groups, watch.sharding, watch.layer_index
        n, count, layers = len(groups.layers), len(groups.params), list(groups.layers)
        grads = local_grads(groups.params)
        squares = squared_norms(grads)  # float64: no overflow
        scale = grad_scale(trainer, optimizer)
        if scale is not None:
            squares = squares / scale.square()
        parts = [grouped_squares(sharding.keep_owned(squares), index, n)]
        weights = local_tensors(groups.params) if logging and (self.per_layer or self.update_ratio) else []
        if logging:
            parts.append(sharding.nonfinite_flags(squares))
        if weights:
            parts.append(grouped_squares(sharding.keep_owned(squared_norms(weights)), index, n))
        packed = sharding.all_reduce_sum(torch.cat(parts))
        total = packed[:n].sum(dtype=torch.float64).sqrt()
        if self.clipping:  # the coefficient comes from the global norm: the same on every rank
            self._clip(grads, total)
        values = {"total": total}
        if logging:
            values["nonfinite"] = count_flagged(packed[n : n + count]).to(torch.float64)
            if weights:
                layer_grad = packed[:n].sqrt() if self.per_layer else None
                layer_weight = packed[n + count :].sqrt()
                values.update(self._weight_figures(trainer, layer_grad, layer_weight, weights, index, layers))
        return Figures(values, layers)

    def _clip(self, grads: list[Tensor], total: Tensor) -> None:
        mean, std = float(self.baseline.mean[0]), float(self.baseline.std[0])
        coef = zclip_coefficient(
            total, mean, std, self.z_threshold, ready=bool(self.baseline.ready[0]), eps=self.baseline.eps
        )
        dense = [g for g in grads if not g.is_sparse]
        if dense:
            torch._foreach_mul_(dense, coef.to(dense[0].dtype))
        for g in grads:
            if g.is_sparse:
                g.mul_(coef.to(g.dtype))

    def _weight_figures(
        self, trainer: pl.Trainer, layer_grad: Tensor | None, layer_weight: Tensor, weights: list[Tensor],
        layer_index: Tensor, names: list[str],
    ) -> dict[str, Tensor]:
        """Per-layer figures (when ``layer_grad`` is given) and, with ``update_ratio``, the copy of the weights."""
        values: dict[str, Tensor] = {}
        if layer_grad is not None:
            values = {"layer/{layer}": layer_grad, "weight_norm/{layer}": layer_weight,
                      "grad_weight_ratio/{layer}": layer_grad / layer_weight.clamp_min(_EPS)}  # fmt: skip
            if self._histograms.due(trainer.global_step):
                log_histogram(trainer, f"{self.family}/layer_hist", layer_grad, trainer.global_step)
                log_histogram(trainer, f"{self.family}/weight_norm_hist", layer_weight, trainer.global_step)
        if self.update_ratio:  # the update is known after optimizer.step(): hold a copy of the weights until then
            self._before_step = (weights, torch._foreach_mul(weights, 1.0), layer_index, layer_weight, names)
        return values

    def measure_after_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Figures | None:
        if self._before_step is None:
            return None
        weights, before, layer_index, weight, names = self._before_step  # `weight`: the layer norms of `before`
        self._before_step = None
        change = torch._foreach_sub(weights, before)
        if self._watch is not None and self._watch.sharding.reduces:  # local pieces; a collective on every rank
            updates = self._watch.sharding.global_squares(squared_norms(change), layer_index, len(names)).sqrt()
        else:
            updates = grouped_norms(tensor_norms(change), layer_index, len(names))
        values = {"update_ratio": torch.linalg.vector_norm(updates) / torch.linalg.vector_norm(weight).clamp_min(_EPS)}
        if self.per_layer:
            values["update_ratio/{layer}"] = updates / weight.clamp_min(_EPS)
        return Figures(values, names)

    def derive(self, host: HostFigures) -> dict[str, float | np.ndarray]:
        total = host.scalars["total"]
        z = float(self.baseline.score([total])[0])
        clipped = float(self.baseline.winsorized([total], self.z_threshold)[0])
        self.baseline.update([clipped])
        derived: dict[str, float | np.ndarray] = {"zscore": z, "baseline": float(self.baseline.mean[0])}
        if self.clipping:
            coef = clipped / total if np.isfinite(total) and total > 0 else 1.0
            self.clipped_steps += int(coef < 1.0)
            derived.update(clip_coef=coef, clipped_steps=float(self.clipped_steps))
        return derived

    def _layout(self, watch: _Watch, optimizer: Any) -> tuple[list[int], Tensor, list[str]]:
        """Which watched parameters this optimizer steps and have a gradient now, their (compact)
        layer ids and layer names.

        Cached per pattern of present gradients and optimizer, so a steady model builds it once.
        """
        groups = watch.groups
        mask = tuple(p.grad is not None for p in groups.params)
        key = (mask, self._stepped_by(watch, optimizer))
        if key not in watch.present:
            stepped = key[1]
            present = [i for i, has in enumerate(mask) if has and (stepped is None or i in stepped)]
            layers = sorted({groups.layer_of[i] for i in present})
            compact = {layer: j for j, layer in enumerate(layers)}
            device = groups.params[present[0]].device if present else "cpu"
            index = torch.tensor([compact[groups.layer_of[i]] for i in present], dtype=torch.long, device=device)
            watch.present[key] = (present, index, [groups.layers[j] for j in layers])
        return watch.present[key]

    @staticmethod
    def _stepped_by(watch: _Watch, optimizer: Any) -> frozenset[int] | None:
        """Indices of the watched parameters that ``optimizer`` steps; ``None``: all of them.

        With several optimizers (manual optimization) a step's gradient norm is that of the
        gradients this optimizer applies, not another optimizer's left-over ones. An optimizer
        that holds none of the watched parameters (one stepping copies of them) gets all of them,
        as before. Rebuilt only when the optimizer's parameter count changes.
        """
        param_groups = getattr(optimizer, "param_groups", None)
        if not param_groups:
            return None
        size = sum(len(g["params"]) for g in param_groups)
        cached = watch.stepped.get(id(optimizer))
        if cached is None or cached[0] != size:
            members = {id(p) for g in param_groups for p in g["params"]}
            stepped = frozenset(i for i, p in enumerate(watch.groups.params) if id(p) in members)
            cached = (size, stepped if 0 < len(stepped) < len(watch.groups.params) else None)
            watch.stepped[id(optimizer)] = cached
        return cached[1]

    def extra_state(self) -> dict[str, Any]:
        return {"baseline": self.baseline.state_dict(), "clipped_steps": self.clipped_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "baseline" in state:
            self.baseline.load_state_dict(state["baseline"])
        self.clipped_steps = int(state.get("clipped_steps", 0))
