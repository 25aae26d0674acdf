"""GradNormWatcher: fused per-layer gradient norms, ZClip z-score spikes, optional adaptive clip."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_diag._checks import check_int
from lightning_diag.alerts import SEVERITIES, Above, Action, Rule
from lightning_diag.callbacks._base import DiagnosticCallback
from lightning_diag.callbacks._dashboard import layer_tags
from lightning_diag.callbacks._trainer import grad_scale, has_grad_scaler, log_histogram
from lightning_diag.layers import ParameterGroups, group_parameters, validate_patterns
from lightning_diag.metrics.norms import grouped_norms, tensor_norms, total_norm
from lightning_diag.metrics.stats import EmaZScore, zclip

__all__ = ["GradNormWatcher"]

_EPS = 1e-12
_SUMMARY_KEYS = ("total", "zscore", "baseline", "nonfinite", "clip_coef", "clipped_steps")  # grad_norm/<key>
_FP16_NONFINITE_PATIENCE = 5  # the fp16 scaler overflows (and skips) a few steps in a row while calibrating


class GradNormWatcher(DiagnosticCallback):
    """Per-layer and total gradient norms with ZClip spike detection, in a few fused kernels.

    Runs in ``on_before_optimizer_step``: once per optimizer step (after gradient accumulation),
    after Lightning has unscaled fp16 gradients (for optimizers that unscale inside ``step``, the
    norms are divided by the scaler's scale), and under DDP after the gradient all-reduce, so
    every rank sees the same figures. Every step it computes all parameter norms with one
    ``torch._foreach_norm``, the total norm ``sqrt(sum ||g_p||^2)``, and its z-score against an
    EMA baseline (ZClip, Kumar et al. 2025, arXiv 2504.02507: warm-up ``warmup`` steps, decay
    ``alpha``, spike when ``z > z_threshold``). Nothing reaches the host except on logging steps,
    where per-layer figures are grouped on the device and read back in one transfer.

    With ``clip="zclip"`` a spiking gradient is rescaled in place so its norm becomes
    ``mean + z_threshold**2 / z * std`` (the bigger the outlier, the tighter the clip); the
    baseline absorbs the clipped norm in both modes, so detection is the same with or without
    clipping. The default, ``clip="none"``, never changes training.

    Logged keys (``<layer>`` is the module that owns the parameters, e.g. ``blocks.0.attn.qkv``):

    ============================  ========================================================
    ``grad_norm/total``            L2 norm of all watched gradients (before any clip)
    ``grad_norm/zscore``           ZClip z-score of the total norm (0 during warm-up)
    ``grad_norm/baseline``         EMA mean of the total norm
    ``grad_norm/nonfinite``        number of parameters whose gradient holds inf/NaN
    ``grad_norm/clip_coef``        factor applied to the gradients (``clip="zclip"`` only)
    ``grad_norm/<layer>``          L2 norm of the layer's gradients
    ``weight_norm/<layer>``        L2 norm of the layer's weights
    ``grad_weight_ratio/<layer>``  ``||g|| / ||w||`` of the layer
    ``update_ratio/<layer>``       ``||w_t+1 - w_t|| / ||w_t||`` (``update_ratio=True`` only)
    ``alerts/GradNormWatcher``     number of alerts so far
    ============================  ========================================================

    Alerts: ``grad_norm/nonfinite`` above 0 (critical; under fp16 with a loss scaler only after
    5 overflow steps in a row, since the scaler skips isolated overflows by design) and
    ``grad_norm/zscore`` above ``z_threshold`` (``spike_severity``, default ``"info"``: recorded
    and logged but not acted on). Gradient-norm spikes are routine in healthy Adam training, which
    is why ZClip clips them instead of stopping: on our tiny char-level GPT (``testbeds.CharLM``,
    1,200 steps) stable runs at constant learning rates 1e-3, 3e-3 and 1e-2 reached z-scores of
    6.6, 10.4 and 16.6, as high as runs heading for a loss explosion. Raise ``spike_severity`` to
    act on spikes, or add a rule such as ``Above("grad_norm/total", 50.0, patience=10)``.

    Args:
        every_n_steps: logging cadence (``None``: the trainer's ``log_every_n_steps``).
        include: glob patterns of parameter or layer names to watch (default: all trainable).
        exclude: glob patterns to leave out.
        group_depth: group layers by their first ``group_depth`` name parts (``2``: ``blocks.0``).
        per_layer: log per-layer figures (``False``: totals only).
        update_ratio: also log ``update_ratio/<layer>``. Costs one copy of the watched weights,
            held only from ``on_before_optimizer_step`` to ``on_train_batch_end`` of logging steps.
        z_threshold: ZClip spike threshold on the z-score.
        alpha: EMA decay of the baseline mean and variance.
        warmup: steps that initialise the baseline before z-scores are reported.
        clip: ``"none"`` (monitor only) or ``"zclip"`` (adaptive clipping, changes training).
        nonfinite_patience: consecutive non-finite steps before alerting (``None``: 1, or 5 under
            an fp16 loss scaler).
        spike_severity: severity of the z-score spike alert; ``"info"`` alerts are never acted on.
        histogram_every_n_steps: TensorBoard histograms of the per-layer gradient and weight norms
            (``grad_norm_hist/layers``, ``weight_norm_hist/layers``) at the first logging step at or
            after each multiple; one extra host transfer then, and only with a TensorBoard logger.
            ``None`` disables them.
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``callable(alert, trainer)``.
        rules: extra alert rules on the logged keys, e.g. ``Above("grad_norm/total", 100.0)``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> watcher = GradNormWatcher(every_n_steps=10, exclude=["*.bias"], action="warn")
        >>> trainer = Trainer(callbacks=[watcher], logger=False)  # doctest: +SKIP
    """

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
        rules: Sequence[Rule] = (),
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules)
        if spike_severity not in SEVERITIES:
            raise ValueError(f"`spike_severity` must be one of {SEVERITIES}, got {spike_severity!r}")
        check_int("histogram_every_n_steps", histogram_every_n_steps, 1, optional=True)
        if clip not in ("none", "zclip"):
            raise ValueError(f"`clip` must be one of ('none', 'zclip'), got {clip!r}")
        if not z_threshold > 0:
            raise ValueError(f"`z_threshold` must be > 0, got {z_threshold!r}")
        check_int("group_depth", group_depth, 1, optional=True)
        check_int("nonfinite_patience", nonfinite_patience, 1, optional=True)
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        self.group_depth, self.per_layer, self.update_ratio = group_depth, per_layer, update_ratio
        self.z_threshold, self.clip, self.nonfinite_patience = z_threshold, clip, nonfinite_patience
        self.histogram_every_n_steps = histogram_every_n_steps
        self._histograms_logged = 0  # multiples of histogram_every_n_steps covered so far
        self.baseline = EmaZScore(alpha=alpha, warmup=warmup)
        self._nonfinite_rule = Above("grad_norm/nonfinite", 0.0, severity="critical")
        self._spike_rule = Above("grad_norm/zscore", z_threshold, severity=spike_severity)
        self._builtin_rules = [self._nonfinite_rule, self._spike_rule]
        self._groups: ParameterGroups | None = None
        self._present: dict[tuple[bool, ...], tuple[list[int], Tensor, list[str]]] = {}
        self._clipped_steps = torch.zeros(())
        self._pending: tuple[int, list[str], Tensor, list[Tensor], list[Tensor], Tensor, Tensor] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, group_depth=self.group_depth)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        groups = group_parameters(pl_module, self.include, self.exclude, self.group_depth)
        if not groups.params:
            if self.include:
                raise ValueError(
                    f"`include={list(self.include)}` matches no trainable parameter; parameters are: "
                    f"{[n for n, p in pl_module.named_parameters() if p.requires_grad][:50]}"
                )
            self.warn_once("no-params", "the model has no trainable parameter to watch; doing nothing")
        self._groups = groups if groups.params else None
        self._present.clear()
        patience = self.nonfinite_patience or (_FP16_NONFINITE_PATIENCE if has_grad_scaler(trainer) else 1)
        self._nonfinite_rule.patience = patience

    @torch.no_grad()
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._groups is None:
            return
        step = trainer.global_step
        present, layer_index, layer_names = self._layout()
        if not present:
            self.warn_once("no-grads", "no watched parameter has a gradient (all None); nothing measured")
            return
        grads = [self._groups.params[i].grad for i in present]
        norms = tensor_norms(grads)
        scale = grad_scale(trainer, optimizer)
        if scale is not None:
            norms = norms / scale
        total = total_norm(norms)
        zscore, clipped = zclip(total, self.baseline, self.z_threshold)
        self.baseline.update(clipped)
        coef = torch.where(torch.isfinite(total) & (total > 0), clipped / total.clamp_min(_EPS), 1.0)
        if self.clip == "zclip":
            self._scale_grads(grads, coef)
            self._clipped_steps = self._clipped_steps.to(coef.device) + (coef < 1)
        nonfinite = (~torch.isfinite(norms)).sum()
        self._nonfinite_rule.update(nonfinite, step)
        self._spike_rule.update(zscore, step)
        if not self.is_logging_step(trainer, step):
            return
        keys, values = ["grad_norm/total", "grad_norm/zscore", "grad_norm/baseline", "grad_norm/nonfinite"], [
            total, zscore, self.baseline.mean, nonfinite.float()]
        if self.clip == "zclip":
            keys += ["grad_norm/clip_coef", "grad_norm/clipped_steps"]
            values += [coef, self._clipped_steps]
        figures = torch.stack([v.float().to(total.device) for v in values])
        if not self.per_layer:
            self.publish(trainer, step, keys, figures)
            return
        # No per-parameter .detach(): the hooks run under no_grad, so the op count stays flat in depth.
        weights = [self._groups.params[i] for i in present]
        layer_grad = grouped_norms(norms, layer_index, len(layer_names))
        layer_weight = grouped_norms(tensor_norms(weights), layer_index, len(layer_names))
        keys += [f"{family}/{name}" for family in ("grad_norm", "weight_norm", "grad_weight_ratio")
                 for name in layer_names]
        figures = torch.cat([figures, layer_grad, layer_weight, layer_grad / layer_weight.clamp_min(_EPS)])
        self._maybe_log_histograms(trainer, step, layer_grad, layer_weight)
        if not self.update_ratio:
            self.publish(trainer, step, keys, figures)
            return
        # The update is known only after optimizer.step(): hold a copy of the weights until then.
        self._pending = (step, keys, figures, weights, torch._foreach_mul(weights, 1.0), layer_index, layer_weight)

    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is None:
            return
        step, keys, figures, weights, before, layer_index, layer_weight = self._pending
        self._pending = None
        updates = grouped_norms(tensor_norms(torch._foreach_sub(weights, before)), layer_index, len(layer_weight))
        names = keys[len(keys) - len(layer_weight):]
        keys = keys + [f"update_ratio/{name.partition('/')[2]}" for name in names]
        self.publish(trainer, step, keys, torch.cat([figures, updates / layer_weight.clamp_min(_EPS)]))

    def _maybe_log_histograms(self, trainer: pl.Trainer, step: int, layer_grad: Tensor, layer_weight: Tensor) -> None:
        every = self.histogram_every_n_steps
        if every is None or (step + 1) // every <= self._histograms_logged:
            return
        self._histograms_logged = (step + 1) // every
        log_histogram(trainer, "grad_norm_hist/layers", layer_grad, step)
        log_histogram(trainer, "weight_norm_hist/layers", layer_weight, step)

    def dashboard_charts(self) -> dict[str, list[str]]:
        return {
            "total gradient norm and baseline": [r"grad_norm/(total|baseline)$"],
            "z-score of the total norm": [r"grad_norm/zscore$"],
            "non-finite gradients, clipping": [r"grad_norm/(nonfinite|clip_coef|clipped_steps)$"],
            "gradient norm per layer": [layer_tags("grad_norm", _SUMMARY_KEYS)],
            "||g|| / ||w|| per layer": [layer_tags("grad_weight_ratio")],
            "update ratio ||dw|| / ||w|| per layer": [layer_tags("update_ratio")],
            "weight norm per layer": [layer_tags("weight_norm")],
        }

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._pending = None
        self._present.clear()

    def _layout(self) -> tuple[list[int], Tensor, list[str]]:
        """Which watched parameters have a gradient now, their (compact) layer ids and layer names.

        Cached per pattern of present gradients, so a steady model builds it once.
        """
        assert self._groups is not None
        mask = tuple(p.grad is not None for p in self._groups.params)
        if mask not in self._present:
            present = [i for i, has in enumerate(mask) if has]
            layers = sorted({self._groups.layer_of[i] for i in present})
            compact = {layer: j for j, layer in enumerate(layers)}
            device = self._groups.params[present[0]].device if present else "cpu"
            index = torch.tensor([compact[self._groups.layer_of[i]] for i in present], dtype=torch.long, device=device)
            self._present[mask] = (present, index, [self._groups.layers[j] for j in layers])
        return self._present[mask]

    @staticmethod
    def _scale_grads(grads: list[Tensor], coef: Tensor) -> None:
        dense = [g for g in grads if not g.is_sparse]
        if dense:
            torch._foreach_mul_(dense, coef.to(dense[0].dtype))
        for g in grads:
            if g.is_sparse:
                g.mul_(coef.to(g.dtype))

    def extra_state(self) -> dict[str, Any]:
        return {"baseline": self.baseline.state_dict(), "clipped_steps": self._clipped_steps.cpu()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "baseline" in state:
            self.baseline.load_state_dict(state["baseline"])
        self._clipped_steps = torch.as_tensor(state.get("clipped_steps", 0.0)).float()
