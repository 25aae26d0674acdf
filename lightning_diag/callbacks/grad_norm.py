"""GradNormWatcher: fused per-layer gradient norms, ZClip z-score spikes, optional adaptive clip."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from lightning_diag._checks import check_int
from lightning_diag.alerts import SEVERITIES, Above, Action, NonFinite, Rule
from lightning_diag.callbacks._base import Cadence, DiagnosticCallback, Figures, HostFigures
from lightning_diag.callbacks._sharding import (
    Sharding, deepspeed_limitation, deepspeed_zero_stage, local_grads, local_tensor, local_tensors,
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


class GradNormWatcher(DiagnosticCallback):
    """Per-layer and total gradient norms with ZClip spike detection, in a few fused kernels.

    Runs in ``on_before_optimizer_step``: once per optimizer step (after gradient accumulation),
    after Lightning has unscaled fp16 gradients (for optimizers that unscale inside ``step``, the
    norms are divided by the scaler's scale), and under DDP after the gradient all-reduce. Every
    step one ``torch._foreach_norm`` gives every parameter's norm and one more kernel the total
    ``sqrt(sum ||g_p||^2)`` (in float64), which leaves for the host without a sync; there its
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
        update_ratio: also log ``grad_norm/update_ratio/<layer>``; costs one copy of the watched
            weights on logging steps, from ``on_before_optimizer_step`` to ``on_train_batch_end``.
        z_threshold: ZClip spike threshold on the z-score (> 0).
        alpha: EMA decay of the baseline mean and variance.
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
        Key("update_ratio/{layer}", "||w_t+1 - w_t|| / ||w_t|| of the layer", "update ratio per layer",
            requires="update_ratio", note="with update_ratio=True"),
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
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules)
        if spike_severity not in SEVERITIES:
            raise ValueError(f"`spike_severity` must be one of {SEVERITIES}, got {spike_severity!r}")
        check_int("histogram_every_n_steps", histogram_every_n_steps, 1, optional=True)
        if clip not in ("none", "zclip"):
            raise ValueError(f"`clip` must be one of ('none', 'zclip'), got {clip!r}")
        if isinstance(z_threshold, bool) or not isinstance(z_threshold, (int, float)) or not z_threshold > 0:
            raise ValueError(f"`z_threshold` must be a number > 0, got {z_threshold!r}")
        check_int("group_depth", group_depth, 1, optional=True)
        check_int("nonfinite_patience", nonfinite_patience, 1, optional=True)
        self.include, self.exclude = validate_patterns("include", include), validate_patterns("exclude", exclude)
        self.group_depth, self.per_layer, self.update_ratio = group_depth, per_layer, update_ratio
        self.z_threshold, self.clip, self.nonfinite_patience = float(z_threshold), clip, nonfinite_patience
        self.histogram_every_n_steps = histogram_every_n_steps
        self.baseline = EmaBaseline(1, alpha=alpha, warmup=warmup)
        self.clipped_steps = 0
        self._nonfinite_rule = NonFinite("grad_norm/total", severity="critical")
        self._builtin_rules = [self._nonfinite_rule, Above("grad_norm/zscore", z_threshold, severity=spike_severity)]
        self._histograms = Cadence(histogram_every_n_steps)
        self._groups: ParameterGroups | None = None
        self._present: dict[tuple[bool, ...], tuple[list[int], Tensor, list[str]]] = {}
        self._before_step: tuple[list[Tensor], list[Tensor], Tensor, Tensor, list[str]] | None = None
        self._sharding, self._layer_index = Sharding("none"), torch.zeros(0, dtype=torch.long)

    @property
    def clipping(self) -> bool:
        return self.clip == "zclip"

    @property
    def histograms(self) -> bool:
        return self.per_layer and self.histogram_every_n_steps is not None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, group_depth=self.group_depth)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        groups = resolve_parameters(trainer, pl_module, self.include, self.exclude, self.group_depth)
        if not groups.params and self.include:
            raise ValueError(
                f"`include={list(self.include)}` matches no trainable parameter; parameters are: "
                f"{[n for n, p in pl_module.named_parameters() if p.requires_grad][:50]}"
            )
        if not groups.params:
            self.warn_once("no-params", "the model has no trainable parameter to watch; doing nothing")
        self._groups, self.layers = (groups, list(groups.layers)) if groups.params else (None, [])
        self._sharding = sharding_of(trainer, groups.params, groups.names)
        if self._sharding.kind == "deepspeed":
            self.warn_once("deepspeed", deepspeed_limitation(deepspeed_zero_stage(trainer) or 0, "gradient norms"))
            self._groups = None
        elif self._groups is not None and self._sharding.reduces:  # one layout on every rank: all watched parameters
            device = local_tensor(groups.params[0]).device
            self._layer_index = torch.tensor(groups.layer_of, dtype=torch.long, device=device)
        self._nonfinite_rule.patience = self.nonfinite_patience or (
            _FP16_NONFINITE_PATIENCE if has_grad_scaler(trainer) else 1)

    def detach(self) -> None:
        self._present.clear()
        self._before_step = None

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._histograms.start(trainer.global_step)

    def measures(self, step: int) -> bool:
        return self._groups is not None

    def measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any, logging: bool
    ) -> Figures | None:
        if self._sharding.reduces:
            return self._measure_sharded(trainer, optimizer, logging)
        present, layer_index, layer_names = self._layout()
        if not present:
            self.warn_once("no-grads", "no watched parameter has a gradient (all None); nothing measured")
            return None
        grads = [self._groups.params[i].grad for i in present]  # type: ignore[union-attr]
        norms = tensor_norms(grads)
        scale = grad_scale(trainer, optimizer)
        if scale is not None:
            norms = norms / scale
        total = torch.linalg.vector_norm(norms, dtype=torch.float64)  # float64: the squares cannot overflow
        if self.clipping:
            self._clip(grads, total)
        values = {"total": total}
        if logging:
            values["nonfinite"] = (~torch.isfinite(norms)).sum().to(torch.float64)
            if self.per_layer:
                weights = [self._groups.params[i] for i in present]  # type: ignore[union-attr]
                layer_grad = grouped_norms(norms, layer_index, len(layer_names))
                layer_weight = grouped_norms(tensor_norms(weights), layer_index, len(layer_names))
                values.update(self._per_layer(trainer, layer_grad, layer_weight, weights, layer_index, layer_names))
        return Figures(values, layer_names)

    def _measure_sharded(self, trainer: pl.Trainer, optimizer: Any, logging: bool) -> Figures:
        """FSDP and other sharding: local squares, one SUM all-reduce of the per-layer sums, never a gather."""
        groups, sharding, index, n = self._groups, self._sharding, self._layer_index, len(self.layers)
        grads = local_grads(groups.params)  # type: ignore[union-attr]
        squares = squared_norms(grads)
        scale = grad_scale(trainer, optimizer)
        if scale is not None:
            squares = squares / scale.square()
        parts = [grouped_squares(sharding.keep_owned(squares), index, n), sharding.count_nonfinite(squares).view(1)]
        weights = local_tensors(groups.params) if logging and self.per_layer else []  # type: ignore[union-attr]
        if weights:
            parts.append(grouped_squares(sharding.keep_owned(squared_norms(weights)), index, n))
        packed = sharding.all_reduce_sum(torch.cat(parts))
        total = packed[:n].sum(dtype=torch.float64).sqrt()
        if self.clipping:  # the coefficient comes from the global norm: the same on every rank
            self._clip(grads, total)
        values = {"total": total}
        if logging:
            values["nonfinite"] = packed[n].to(torch.float64)
            if weights:
                layer_grad, layer_weight = packed[:n].sqrt(), packed[n + 1 :].sqrt()
                values.update(self._per_layer(trainer, layer_grad, layer_weight, weights, index, self.layers))
        return Figures(values, self.layers)

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

    def _per_layer(
        self, trainer: pl.Trainer, layer_grad: Tensor, layer_weight: Tensor, weights: list[Tensor], layer_index: Tensor,
        names: list[str],
    ) -> dict[str, Tensor]:
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
        weights, before, layer_index, weight, names = self._before_step  # `weight`: the norms of `before`
        self._before_step = None
        change = torch._foreach_sub(weights, before)
        if self._sharding.reduces:  # local pieces of the update; a collective on every rank, as measure's
            updates = self._sharding.global_squares(squared_norms(change), layer_index, len(names)).sqrt()
        else:
            updates = grouped_norms(tensor_norms(change), layer_index, len(names))
        return Figures({"update_ratio/{layer}": updates / weight.clamp_min(_EPS)}, names)

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

    def _layout(self) -> tuple[list[int], Tensor, list[str]]:
        """Which watched parameters have a gradient now, their (compact) layer ids and layer names.

        Cached per pattern of present gradients, so a steady model builds it once.
        """
        groups = self._groups
        assert groups is not None
        mask = tuple(p.grad is not None for p in groups.params)
        if mask not in self._present:
            present = [i for i, has in enumerate(mask) if has]
            layers = sorted({groups.layer_of[i] for i in present})
            compact = {layer: j for j, layer in enumerate(layers)}
            device = groups.params[present[0]].device if present else "cpu"
            index = torch.tensor([compact[groups.layer_of[i]] for i in present], dtype=torch.long, device=device)
            self._present[mask] = (present, index, [groups.layers[j] for j in layers])
        return self._present[mask]

    def extra_state(self) -> dict[str, Any]:
        return {"baseline": self.baseline.state_dict(), "clipped_steps": self.clipped_steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "baseline" in state:
            self.baseline.load_state_dict(state["baseline"])
        self.clipped_steps = int(state.get("clipped_steps", 0))
