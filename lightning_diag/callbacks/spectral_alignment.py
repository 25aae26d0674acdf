"""SpectralAlignmentMonitor: sign-diversity collapse of layer inputs along the top singular vector."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_diag._checks import check_int
from lightning_diag.alerts import Action, Alert, Rule, Severity
from lightning_diag.callbacks._base import DiagnosticCallback
from lightning_diag.callbacks._dashboard import layer_tags
from lightning_diag.callbacks._trainer import log_histogram
from lightning_diag.layers import matches, validate_patterns
from lightning_diag.metrics.spectral import alignment_summary, power_iteration, spectral_alignment, stable_rank

__all__ = ["SpectralAlignmentMonitor"]

LAYER_RULES = ("baseline", "absolute", "none")
LayerRule = Literal["baseline", "absolute", "none"]

# Per-layer figures, in the order of the rows of the figure table (see the class docstring).
_SA_FIGURES = ("sign_diversity", "collapse", "mean_abs", "abs_mean", "std")
_FIGURE_KEYS = tuple(f"spectral_alignment/{f}" for f in _SA_FIGURES) + ("sigma1", "stable_rank")
_REFINE_ITERS = 10  # power iterations after sigma_1 jumped between two logged checks
_SIGMA_JUMP = 0.2  # relative change of sigma_1 that counts as a jump
_LISTED_LAYERS = 5  # layers named in the model-level alert message


class SpectralAlignmentMonitor(DiagnosticCallback):
    """Early warning of loss explosions from the spectral alignment (SA) of layer inputs.

    After Qiu, Wu, Tan, Wang and Yao, "Spectral Alignment as Predictor of Loss Explosion in Neural
    Network Training" (2025, arXiv 2510.04202); the definition is our reconstruction (DESIGN.md
    section 5, :mod:`lightning_diag.metrics.spectral`). For a watched ``nn.Linear`` with weight
    ``W = sum_i s_i u_i v_i^T`` (shape ``(d_out, d_in)``), each sampled input row ``x_t`` gets
    ``SA_t = cos(x_t, v_1)``. A step changes ``s_1`` by about ``-lr * sum_t (u_1^T delta_t) SA_t
    ||x_t||``: while the signs of ``SA_t`` are mixed the terms cancel; when all inputs fall on one
    side of ``v_1`` (sign diversity collapses) ``s_1`` grows step after step and the loss explodes.
    Every reported figure is invariant under the sign flip ``v_1 -> -v_1``.

    **How it measures.** Every ``check_every_n_steps`` optimizer steps, forward pre-hooks on the
    watched layers keep a random subset of at most ``max_rows`` input rows (tokens or samples),
    drawn on the device with a private generator (the global RNG is never touched). The hooks
    return at once on other steps and nothing is kept from one check to the next. With gradient
    accumulation the rows come from the first micro-batch of the step. In
    ``on_before_optimizer_step`` (the weights are still the ones the inputs were multiplied with)
    ``v_1`` and ``s_1`` come from a power iteration warm-started from the previous check's
    ``v_1`` (``power_iterations`` iterations; 20 on a cold start and 10 after ``s_1`` moved by
    more than 20% between two logged checks), batched over layers of equal weight shape, and the
    SA summaries from one batched pass over layers of equal input width. Rules are evaluated on
    the device at every check; on logging steps the latest check is read back in one host
    transfer (:meth:`DiagnosticCallback.publish`). SA histograms go to TensorBoard every
    ``histogram_every_n_steps`` (one more transfer on those steps only, and only with a
    TensorBoard logger).

    **Which layers.** Every ``nn.Linear`` with a trainable 2-D weight, except the output head (the
    last ``nn.Linear`` registered in the model, e.g. ``lm_head``; ``exclude_head=False`` keeps it:
    its inputs lose sign diversity transiently early in healthy training), selected further by
    ``include``/``exclude`` glob patterns on module names. Embeddings are not ``nn.Linear`` and
    are never watched. Convolutions are not watched (yet). A layer that is not called through its
    ``forward`` (``nn.MultiheadAttention.out_proj`` is used through its weight) gets NaN SA
    figures, with a warning, and its ``sigma1``/``stable_rank`` only. A layer called several times
    per forward pass is sampled at its first call.

    **Alerts** (DESIGN.md section 5; defaults calibrated on :class:`~lightning_diag.testbeds.CharLM`,
    see below):

    - per layer (``layer_rule="baseline"``, warning): the layer's collapse ``c = 1 - D`` is at
      least ``collapse_threshold`` *and* at least ``baseline_rise`` above the layer's own EMA
      baseline for ``patience`` consecutive checks. The baseline (decay ``baseline_alpha`` per
      check, exact mean over the first ``baseline_warmup`` checks) does not absorb checks that hit,
      so a collapse does not become the norm. Layers whose inputs are one-sided by construction
      (after a LayerNorm or a ReLU, ``c ~ 1`` all along in healthy runs) therefore never fire;
      ``"absolute"`` drops the baseline condition (the paper-style rule, noisy on transformers),
      ``"none"`` disables per-layer alerts. Alerts are ordered by the step at which they fired,
      so the first layer to collapse comes first.
    - model level (critical): ``spectral_alignment/mean_collapse``, the mean of ``c`` over the
      watched layers, at least ``mean_collapse_threshold`` for ``mean_collapse_patience`` checks.
      Its message names the layers past their baseline, the first one first.

    NaN figures (no input, all-zero inputs, non-finite weights) never count as a hit: this monitor
    warns ahead of an explosion, it does not detect one (pair it with a ``NonFinite`` rule).

    **Defaults and why.** ``check_every_n_steps=10``: the warnings below come 100-900 steps
    ahead, so checking every 10 steps costs little lead time; a check costs a few hundred small
    kernels (about 5 ms on one CPU thread for a 16-layer model). ``max_rows=512``: the standard
    error of a sign fraction is at most ``0.5 / sqrt(512) = 0.022``. ``collapse_threshold=0.9``
    (95% of the rows on one side) and ``baseline_rise=0.4`` are DESIGN.md's proposal;
    ``mean_collapse_threshold=0.8`` comes from our pilot (healthy runs sat at a mean collapse of
    0.2-0.6); ``warmup_steps=200`` because at initialisation most inputs are one-sided (the mean
    collapse of a fresh pre-LN GPT passes 0.8 around step 30): with 0, two of the five stable
    runs below alerted, with 100 one. Calibration on :class:`~lightning_diag.testbeds.CharLM` (3 layers, d=64,
    batch 16x64, AdamW, 2,000 steps, CPU; every default as above), explosion = first of 10 steps
    at 3x the running minimum of the loss (:func:`~lightning_diag.testbeds.divergence_step`):

    ======================================  =========  ===================  ====================
    run                                     explosion  first layer alert    first mean alert
    ======================================  =========  ===================  ====================
    LR ramp 1e-4 -> 3, seeds 0-4            1627-1649  769-849 (778-880     1429-1519 (125-216
                                                       steps ahead)         steps ahead)
    constant LR 1e-3, 3e-3 (x2), 1e-2 (x2)  none       none                 none
    constant LR 3e-2 (loss degrades to      none       step 309             step 1789
    2.6 against 1.55 at 3e-3)
    ======================================  =========  ===================  ====================

    The per-layer alert is early: it fires when the ramp passes a learning rate of 0.005-0.008,
    60-90x below the one that explodes (about 0.46), and with ``baseline_rise=0.3`` it also fired
    on a constant 1e-2 run that trains well. Treat it as "this layer's inputs just lost their sign
    diversity", and the model-level (critical) alert as the explosion warning. The losses stayed
    finite in these runs: the warning precedes the explosion itself, not only a NaN.

    **Distributed, precision, compilation.** Under DDP each rank samples its own inputs and
    evaluates its own rules (the figures logged are rank zero's); with ``action="stop"`` or
    ``"raise"`` the decision is combined across ranks by the base class. FSDP-sharded weights are
    not supported (the power iteration needs the whole matrix). Inputs and weights in bf16/fp16
    are upcast to float32; under ``autocast`` the hook sees the input before autocast casts it.
    Under activation checkpointing, the forward pass recomputed during backward is not sampled
    (sampling ends at ``on_before_backward``). Under ``torch.compile`` the pre-hooks are traced
    into the graph: dynamo compiles an idle and a sampling variant of the forward (plus one or
    two around the first check), within its default recompile limit, and the figures equal the
    eager ones; nothing is done between checks beyond the guard.

    Logged keys (``<layer>`` is the module name, e.g. ``model.blocks.0.mlp.fc``):

    ==========================================  ==================================================
    ``spectral_alignment/mean_collapse``         mean of the collapse ``c`` over watched layers
    ``spectral_alignment/frac_collapsed``        share of layers with ``c >= collapse_threshold``
    ``spectral_alignment/frac_flagged``          share of layers past the per-layer rule now
    ``spectral_alignment/sign_diversity/<l>``    ``D = 1 - |2 p+ - 1|``, ``p+`` share of rows with
                                                 ``SA > 0`` (1 balanced, 0 one-sided)
    ``spectral_alignment/collapse/<l>``          ``c = 1 - D``
    ``spectral_alignment/mean_abs/<l>``          mean of ``|SA_t|``
    ``spectral_alignment/abs_mean/<l>``          ``|mean SA_t|``
    ``spectral_alignment/std/<l>``               standard deviation of ``SA_t``
    ``sigma1/<l>``                               top singular value ``s_1`` of the weight
    ``stable_rank/<l>``                          ``||W||_F^2 / s_1^2``
    ``alerts/SpectralAlignmentMonitor``          number of alerts so far
    ==========================================  ==================================================

    Per-layer keys are logged with ``per_layer=True`` only. Figures are logged at the step of the
    check they come from. TensorBoard also gets ``spectral_alignment/hist/<layer>``.

    Args:
        check_every_n_steps: measure on optimizer steps ``s`` with ``(s + 1) % n == 0``.
        every_n_steps: logging cadence (``None``: the trainer's ``log_every_n_steps``); each
            logging step publishes the latest check not yet published.
        include: glob patterns of module names to watch (default: every ``nn.Linear``).
        exclude: glob patterns of module names to leave out.
        exclude_head: leave out the last ``nn.Linear`` registered in the model (the output head;
            a warning says so when another ``nn.Linear`` runs after it).
        max_rows: input rows sampled per layer and check (with replacement when there are more;
            all of them otherwise).
        power_iterations: power iterations per check from the previous ``v_1``.
        per_layer: log per-layer figures (``False``: model-level figures only).
        layer_rule: ``"baseline"``, ``"absolute"`` or ``"none"`` (see Alerts).
        collapse_threshold: per-layer collapse ``c`` that counts as collapsed, in ``(0, 1]``.
        baseline_rise: how far above its EMA baseline a layer's ``c`` must be (``"baseline"``).
        baseline_alpha: EMA decay of the per-layer baseline, per check.
        baseline_warmup: checks averaged exactly before the per-layer rule can fire.
        patience: consecutive checks a layer must stay collapsed before an alert.
        warmup_steps: no rule is evaluated before this optimizer step (figures are logged).
        mean_collapse_threshold: model-level threshold on the mean collapse; ``None`` disables it.
        mean_collapse_patience: consecutive checks for the model-level alert.
        histogram_every_n_steps: TensorBoard histogram cadence in steps (at the first check at or
            after each multiple); ``None`` disables histograms.
        seed: seed of the row sampling (rank ``r`` uses ``seed + r``).
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``callable(alert, trainer)``.
        rules: extra alert rules on the logged keys, e.g.
            ``Above("spectral_alignment/frac_flagged", 0.1, severity="critical")``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = SpectralAlignmentMonitor(check_every_n_steps=10, exclude=["*.attn.*"], action="warn")
        >>> trainer = Trainer(callbacks=[monitor], logger=False)  # doctest: +SKIP
    """

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
        layer_rule: LayerRule = "baseline",
        collapse_threshold: float = 0.9,
        baseline_rise: float = 0.4,
        baseline_alpha: float = 0.95,
        baseline_warmup: int = 5,
        patience: int = 3,
        warmup_steps: int = 200,
        mean_collapse_threshold: float | None = 0.8,
        mean_collapse_patience: int = 3,
        histogram_every_n_steps: int | None = 500,
        seed: int = 0,
        action: Action = "warn",
        rules: Sequence[Rule] = (),
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules)
        for name, value, low in [("check_every_n_steps", check_every_n_steps, 1), ("max_rows", max_rows, 1),
                                 ("power_iterations", power_iterations, 1), ("patience", patience, 1),
                                 ("mean_collapse_patience", mean_collapse_patience, 1),
                                 ("baseline_warmup", baseline_warmup, 1), ("warmup_steps", warmup_steps, 0)]:  # fmt: skip
            check_int(name, value, low)
        check_int("histogram_every_n_steps", histogram_every_n_steps, 1, optional=True)
        if layer_rule not in LAYER_RULES:
            raise ValueError(f"`layer_rule` must be one of {LAYER_RULES}, got {layer_rule!r}")
        if not 0.0 < collapse_threshold <= 1.0:
            raise ValueError(f"`collapse_threshold` must be in (0, 1], got {collapse_threshold!r}")
        if mean_collapse_threshold is not None and not 0.0 < mean_collapse_threshold <= 1.0:
            raise ValueError(f"`mean_collapse_threshold` must be None or in (0, 1], got {mean_collapse_threshold!r}")
        if not 0.0 <= baseline_rise <= 1.0:
            raise ValueError(f"`baseline_rise` must be in [0, 1], got {baseline_rise!r}")
        if not 0.0 < baseline_alpha < 1.0:
            raise ValueError(f"`baseline_alpha` must be in (0, 1), got {baseline_alpha!r}")
        self.include = validate_patterns("include", include)
        self.exclude = validate_patterns("exclude", exclude)
        self.check_every_n_steps, self.exclude_head, self.max_rows = check_every_n_steps, exclude_head, max_rows
        self.power_iterations, self.per_layer, self.layer_rule = power_iterations, per_layer, layer_rule
        self.histogram_every_n_steps, self.seed, self.warmup_steps = histogram_every_n_steps, seed, warmup_steps
        self._layer_rule = _LayerCollapse(
            collapse_threshold, None if layer_rule == "absolute" else baseline_rise,
            alpha=baseline_alpha, warmup=baseline_warmup, patience=patience,
        )
        self._mean_rule = (
            _MeanCollapse(mean_collapse_threshold, patience=mean_collapse_patience)
            if mean_collapse_threshold is not None else None
        )
        self._builtin_rules = [r for r in (self._layer_rule if layer_rule != "none" else None, self._mean_rule) if r]
        # Set at setup: the watched layers (names and modules) and their hooks.
        self._names: list[str] = []
        self._modules: list[nn.Linear] = []
        self._handles: list[Any] = []
        self._rank = 0
        # Set at the first check (the device is known then): groups of equal weight shape.
        self._groups: list[_Group] | None = None
        self._loaded_v1: dict[str, Tensor] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._loaded_generators: dict[str, Tensor] = {}
        # Per check step: sampling switch and the sampled rows, by layer index.
        self._armed = False
        self._armed_step = -1
        self._checked_step = -1
        self._captured: dict[int, Tensor] = {}
        self._since: Tensor | None = None  # step at which each layer's current rule streak began
        self._unpublished: tuple[int, list[str], Tensor] | None = None
        self._last_sigma: dict[str, float] = {}  # host copy from the last publish (jump detection)
        self._head: tuple[str, nn.Module] | None = None  # the excluded output head
        self._call_order: list[int] | None = None  # first check only: order of calls, head = -1
        self._head_handle: Any = None
        self._histogram_mark = 0  # histograms logged so far: at the first check at or after each multiple
        self._indices: dict[tuple[int, ...], Tensor] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, exclude_head=self.exclude_head)

    # -- set-up and tear-down -------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._remove_hooks()
        self._names, self._modules = self._select_layers(pl_module)
        self._rank = trainer.global_rank
        self._groups, self._since, self._unpublished = None, None, None
        if not self._modules:
            self.warn_once("no-layers", "the model has no nn.Linear layer to watch; doing nothing")
            return
        self._layer_rule.bind([f"spectral_alignment/collapse/{n}" for n in self._names])
        if self._mean_rule is not None:
            self._mean_rule.layer_names = self._names
        for index, module in enumerate(self._modules):
            self._handles.append(module.register_forward_pre_hook(self._make_hook(index), with_kwargs=True))
        if self._head is not None:  # only to check, at the first check, that it is the last one to run
            self._call_order = []
            self._head_handle = self._head[1].register_forward_pre_hook(self._head_hook)

    def _select_layers(self, pl_module: pl.LightningModule) -> tuple[list[str], list[nn.Linear]]:
        linears = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, nn.Linear) and n]
        self._head = linears[-1] if self.exclude_head and linears else None
        if self._head is not None:
            linears = linears[:-1]
        chosen = [
            (n, m) for n, m in linears
            if m.weight.ndim == 2 and m.weight.requires_grad
            and (self.include is None or matches(n, self.include))
            and not (self.exclude and matches(n, self.exclude))
        ]
        if self.include and not chosen:
            raise ValueError(
                f"`include={list(self.include)}` matches no watched nn.Linear layer; the candidates are "
                f"{[n for n, _ in linears][:50]}"
            )
        return [n for n, _ in chosen], [m for _, m in chosen]

    def dashboard_charts(self) -> dict[str, list[str]]:
        return {
            "model level: mean collapse, share collapsed or flagged": [
                r"spectral_alignment/(mean_collapse|frac_collapsed|frac_flagged)$"],
            "collapse c per layer": [layer_tags("spectral_alignment/collapse")],
            "sign diversity D per layer": [layer_tags("spectral_alignment/sign_diversity")],
            "top singular value per layer": [layer_tags("sigma1")],
            "stable rank per layer": [layer_tags("stable_rank")],
        }

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._head_handle is not None:
            self._head_handle.remove()
            self._head_handle = None
        self._armed = False
        self._captured.clear()

    # -- sampling: forward pre-hooks, armed on check steps only ---------------------------------

    def is_check_step(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is one this monitor measures."""
        return (step + 1) % self.check_every_n_steps == 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # First micro-batch of a check step only (gradient accumulation runs several per step).
        if self._handles and self.is_check_step(step) and self._armed_step != step:
            self._captured.clear()
            self._armed, self._armed_step = True, step

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._armed = False  # a forward recomputed in backward (activation checkpointing) is not sampled

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._armed = False
        if trainer.global_step > self._armed_step:  # the check step is over: keep nothing
            self._captured.clear()

    def _make_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self._armed and index not in self._captured:
                self._capture(index, args[0] if args else kwargs.get("input"))
                if self._call_order is not None:
                    self._call_order.append(index)

        return hook

    def _head_hook(self, module: nn.Module, args: Any) -> None:
        if self._armed and self._call_order is not None and -1 not in self._call_order:
            self._call_order.append(-1)

    def _check_head(self) -> None:
        """Warn once if the excluded "head" (last registered) is not the last nn.Linear to run."""
        order, self._call_order = self._call_order, None
        if self._head_handle is not None:
            self._head_handle.remove()
            self._head_handle = None
        if order is None or self._head is None:
            return
        after = [self._names[i] for i in order[order.index(-1) + 1 :]] if -1 in order else []
        if -1 not in order or after:
            how = "was not called through forward()" if -1 not in order else f"ran before {after[:5]}"
            self.warn_once("head", f"`exclude_head=True` left out {self._head[0]!r}, the last nn.Linear registered "
                           f"in the model, but it {how} in this step. If the output head is another layer, pass "
                           f"`exclude_head=False, exclude=[<head name>]`.")

    def _capture(self, index: int, x: Any) -> None:
        if not isinstance(x, Tensor) or x.ndim == 0:
            return
        x = x.detach()
        n = x.numel() // max(x.shape[-1], 1)
        if n <= self.max_rows:
            rows = x.reshape(n, x.shape[-1]).clone()
        else:
            idx = torch.randint(n, (self.max_rows,), device=x.device, generator=self._generator(x.device))
            # Gather the rows in place of flattening first: a non-contiguous input would be copied whole.
            rows = x[torch.unravel_index(idx, x.shape[:-1])] if x.ndim > 2 else x.index_select(0, idx)
        self._captured[index] = rows

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            gen = torch.Generator(device=device).manual_seed(self.seed + self._rank)
            state = self._loaded_generators.pop(str(device), None)
            if state is not None:
                gen.set_state(state)
            self._generators[device] = gen
        return self._generators[device]

    # -- measuring and publishing ---------------------------------------------------------------

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        # Once per step: several optimizers (manual optimization) call this hook more than once.
        if self._handles and self._armed_step == step and self._checked_step != step:
            self._checked_step = step
            self._check(trainer, step)
        if self._unpublished is not None and self.is_logging_step(trainer, step):
            check_step, keys, values = self._unpublished
            self._unpublished = None
            metrics = self.publish(trainer, check_step, keys, values)
            self._note_sigma_jumps(metrics)

    @torch.no_grad()
    def _check(self, trainer: pl.Trainer, step: int) -> None:
        captured, self._captured = self._captured, {}
        self._armed = False
        self._check_head()
        table = torch.full((len(_FIGURE_KEYS), len(self._modules)), float("nan"), device=self._modules[0].weight.device)
        top_vectors = self._measure_weights(table)
        alignments = self._measure_inputs(captured, top_vectors, table)
        missing = [name for i, name in enumerate(self._names) if i not in captured]
        if missing:
            self.warn_once("no-input", f"no input reached {missing[:10]} on check step {step} (not called "
                           "through forward?); their spectral-alignment figures are NaN")
        keys, values = self._update_rules(step, table[1])
        if self.per_layer:
            keys += [f"{family}/{name}" for family in _FIGURE_KEYS for name in self._names]
            values = torch.cat([values, table.reshape(-1)])
        self._unpublished = (step, keys, values)
        self._maybe_log_histograms(trainer, step, alignments)

    def _measure_weights(self, table: Tensor) -> dict[int, tuple[Tensor, dict[int, int]]]:
        """Warm-started power iteration per group of equal-shape weights; fills rows 5-6 of ``table``.

        Returns, per input width, the top right singular vectors of those layers stacked
        ``(n, d_in)`` and the row of each layer in that stack.
        """
        if self._groups is None:
            self._groups = self._build_groups()
        by_width: dict[int, tuple[list[Tensor], dict[int, int]]] = {}
        for group in self._groups:
            weights = _stack([self._modules[i].weight for i in group.layers])  # under no_grad: no graph
            iters = _REFINE_ITERS if group.refine else self.power_iterations
            sigma, _, v = power_iteration(weights, group.v1, iters=iters)
            group.v1, group.refine = v, False
            figures = torch.stack([sigma, stable_rank(weights, sigma)]).to(table.dtype)
            table[5:].index_copy_(1, group.index, figures)
            vectors, rows = by_width.setdefault(v.shape[-1], ([], {}))
            rows.update({layer: len(rows) + j for j, layer in enumerate(group.layers)})
            vectors.append(v)
        return {width: (vectors[0] if len(vectors) == 1 else torch.cat(vectors), rows)
                for width, (vectors, rows) in by_width.items()}  # fmt: skip

    def _measure_inputs(
        self, captured: dict[int, Tensor], top_vectors: dict[int, tuple[Tensor, dict[int, int]]], table: Tensor
    ) -> list[tuple[list[int], Tensor]]:
        """SA summaries, one batched pass per bucket of equal-shape inputs; fills rows 0-4 of ``table``."""
        alignments = []
        for layers in _buckets(captured):
            vectors, rows = top_vectors[captured[layers[0]].shape[-1]]
            positions = [rows[i] for i in layers]
            if positions != list(range(len(vectors))):
                vectors = vectors.index_select(0, self._index(positions, vectors.device))
            sa = spectral_alignment(_stack([captured[i] for i in layers]), vectors)
            summary = alignment_summary(sa)
            figures = torch.stack([getattr(summary, name) for name in _SA_FIGURES]).to(table.device, table.dtype)
            table[: len(_SA_FIGURES)].index_copy_(1, self._index(layers, table.device), figures)
            alignments.append((layers, sa))
        return alignments

    def _update_rules(self, step: int, collapse: Tensor) -> tuple[list[str], Tensor]:
        """Update the device-side rules with this check's per-layer collapse; model-level figures."""
        rule = self._layer_rule
        finite = torch.isfinite(collapse)
        mean_collapse = torch.where(finite, collapse, 0.0).sum() / finite.sum().clamp_min(1)
        mean_collapse = torch.where(finite.any(), mean_collapse, float("nan"))
        frac_collapsed = (collapse >= rule.threshold).float().mean()
        figures = [mean_collapse, frac_collapsed]
        if step < self.warmup_steps:  # early training: figures are logged, the rules see "no data"
            collapse, mean_collapse = torch.full_like(collapse, float("nan")), torch.full_like(mean_collapse, float("nan"))
        rule.update(collapse, step)
        streak = rule.streak
        if self._since is None or self._since.device != streak.device:
            self._since = torch.full(streak.shape, -1.0, dtype=torch.float64, device=streak.device)
        # A layer's streak began at the first check of its current run of hits.
        self._since = torch.where(streak > 0, torch.where(streak == 1, float(step), self._since), -1.0)
        frac_flagged = (streak >= rule.patience).float().mean()
        if self._mean_rule is not None:
            self._mean_rule.update_with_layers(mean_collapse, step, self._since)
        keys = ["spectral_alignment/mean_collapse", "spectral_alignment/frac_collapsed",
                "spectral_alignment/frac_flagged"]  # fmt: skip
        values = torch.stack([*figures, frac_flagged.to(frac_collapsed.device)]).float()
        return keys, values

    def _index(self, layers: list[int], device: torch.device) -> Tensor:
        """Device tensor of layer indices, built once per layer set (no copy to the device per check)."""
        key = tuple(layers)
        if key not in self._indices or self._indices[key].device != device:
            self._indices[key] = torch.tensor(layers, device=device)
        return self._indices[key]

    def _build_groups(self) -> list[_Group]:
        by_shape: dict[tuple[Any, ...], list[int]] = {}
        for i, module in enumerate(self._modules):
            w = module.weight
            by_shape.setdefault((tuple(w.shape), w.dtype, w.device), []).append(i)
        groups = []
        for (_, _, device), layers in by_shape.items():
            loaded = [self._loaded_v1.get(self._names[i]) for i in layers]
            d_in = self._modules[layers[0]].weight.shape[1]
            v0 = None
            if all(v is not None and tuple(v.shape) == (d_in,) for v in loaded):
                v0 = torch.stack(loaded).to(device=device, dtype=torch.float32)  # type: ignore[arg-type]
            groups.append(_Group(layers, self._index(layers, device), v0))
        self._loaded_v1 = {}
        return groups

    def _note_sigma_jumps(self, metrics: dict[str, float]) -> None:
        """Mark groups whose ``s_1`` jumped since the last publish for a longer power iteration."""
        if self._groups is None or not self.per_layer:
            return
        for group in self._groups:
            for i in group.layers:
                name = self._names[i]
                new, old = metrics.get(f"sigma1/{name}"), self._last_sigma.get(name)
                if new is not None and old is not None and abs(new - old) > _SIGMA_JUMP * max(abs(old), 1e-12):
                    group.refine = True
                if new is not None:
                    self._last_sigma[name] = new

    def _maybe_log_histograms(self, trainer: pl.Trainer, step: int, alignments: list[tuple[list[int], Tensor]]) -> None:
        every = self.histogram_every_n_steps
        if every is None or not alignments or (step + 1) // every <= self._histogram_mark:
            return
        self._histogram_mark = (step + 1) // every
        if not trainer.is_global_zero or not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
            return
        host = torch.cat([sa.reshape(-1) for _, sa in alignments]).float().cpu()  # one transfer for all layers
        chunks = iter(host.split([sa.numel() for _, sa in alignments]))
        for layers, sa in alignments:
            for i, values in zip(layers, next(chunks).split(sa.shape[-1])):
                log_histogram(trainer, f"spectral_alignment/hist/{self._names[i]}", values[torch.isfinite(values)], step)

    # -- checkpoint state -----------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        v1 = dict(self._loaded_v1)
        for group in self._groups or []:
            if group.v1 is not None:
                v1.update({self._names[i]: group.v1[j].cpu() for j, i in enumerate(group.layers)})
        generators = dict(self._loaded_generators)
        generators.update({str(d): g.get_state() for d, g in self._generators.items()})
        return {
            "v1": v1,
            "generators": generators,
            "since": None if self._since is None else self._since.cpu(),
            "layers": list(self._names),
            "last_sigma": dict(self._last_sigma),
            "histogram_mark": self._histogram_mark,
            # Saved here when it is not a built-in (published) rule: frac_flagged still uses it.
            "layer_rule": self._layer_rule.state_dict() if self.layer_rule == "none" else None,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._loaded_v1 = dict(state.get("v1", {}))
        self._groups = None  # rebuilt at the next check, warm-started from the loaded vectors
        self._loaded_generators = dict(state.get("generators", {}))
        self._generators = {}
        since = state.get("since")
        same_layers = state.get("layers") == self._names or not self._names
        self._since = since.clone() if since is not None and same_layers else None
        self._last_sigma = dict(state.get("last_sigma", {}))
        self._histogram_mark = int(state.get("histogram_mark", 0))
        if self.layer_rule == "none" and state.get("layer_rule") is not None:
            self._layer_rule.load_state_dict(state["layer_rule"])


@dataclass
class _Group:
    """Watched layers with equal weight shape, dtype and device: one batched power iteration."""

    layers: list[int]
    index: Tensor
    v1: Tensor | None  # (B, d_in) float32 warm start; None: cold start
    refine: bool = False


def _stack(tensors: list[Tensor]) -> Tensor:
    """``torch.stack`` that does not copy a single tensor."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _buckets(captured: dict[int, Tensor]) -> list[list[int]]:
    """Layers whose sampled inputs have equal shape, dtype and device: one batched SA pass each."""
    by_shape: dict[tuple[Any, ...], list[int]] = {}
    for i in sorted(captured):
        x = captured[i]
        by_shape.setdefault((tuple(x.shape), x.dtype, x.device), []).append(i)
    return list(by_shape.values())


class _LayerCollapse(Rule):
    """Per-layer collapse rule: ``c >= threshold`` and, with ``rise``, ``c >= baseline + rise``.

    The baseline is an EMA of the layer's own collapse (exact mean over the first ``warmup``
    checks, then decay ``alpha``), fed only with finite checks that do not hit. With ``rise=None``
    the rule is the absolute threshold alone. NaN never hits.
    """

    relation = "collapse at or above"

    def __init__(self, threshold: float, rise: float | None, *, alpha: float, warmup: int, patience: int,
                 severity: Severity = "warning") -> None:  # fmt: skip
        self.rise, self.alpha, self.warmup = rise, alpha, warmup
        super().__init__("spectral_alignment/collapse/*", threshold, patience=patience, severity=severity)

    def describe(self) -> str:
        rise = f" and {self.rise:g} above its baseline" if self.rise is not None else ""
        return f"{self.relation} {self.threshold:g}{rise} for {self.patience} checks"

    def reset(self) -> None:
        super().reset()
        n = len(self.keys)
        self.baseline = torch.zeros(n, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.float64)

    def hits(self, value: Tensor) -> Tensor:
        self.baseline, self.count = self.baseline.to(value.device), self.count.to(value.device)
        hit = value >= self.threshold  # False for NaN
        if self.rise is not None:
            hit = hit & (self.count >= self.warmup) & (value >= self.baseline + self.rise)
        absorb = torch.isfinite(value) & ~hit
        n = self.count + 1
        new = torch.where(self.count < self.warmup, self.baseline + (value - self.baseline) / n,
                          self.alpha * self.baseline + (1 - self.alpha) * value)  # fmt: skip
        self.baseline = torch.where(absorb, new, self.baseline)
        self.count = torch.where(absorb, n, self.count)
        return hit

    def take(self, host: Sequence[float], source: str) -> list[Alert]:
        alerts = super().take(host, source)
        return sorted(alerts, key=lambda a: (a.step, -a.value))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "baseline": self.baseline.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if list(state.get("keys", [])) == self.keys and "baseline" in state:
            self.baseline, self.count = state["baseline"].clone(), state["count"].clone()


class _MeanCollapse(Rule):
    """Model-level rule on the mean collapse; its alert names the layers past their own rule.

    When it fires it snapshots, per layer, the step at which the layer's current per-layer streak
    began (-1: none), and its message lists those layers in that order, the first one first. The
    snapshot travels with the firing in the base's one host transfer (``pending()`` is longer
    than ``2 * len(keys)``).
    """

    relation = "at or above"

    def __init__(self, threshold: float, *, patience: int, severity: Severity = "critical") -> None:
        self.layer_names: list[str] = []
        super().__init__("spectral_alignment/mean_collapse", threshold, patience=patience, severity=severity)

    def hits(self, value: Tensor) -> Tensor:
        return value >= self.threshold  # False for NaN

    def reset(self) -> None:
        super().reset()
        self.pending_since = torch.full((len(self.layer_names),), -1.0, dtype=torch.float64)

    def update_with_layers(self, value: Tensor, step: int, since: Tensor) -> None:
        self.update(value, step)
        if self.pending_since.shape != since.shape or self.pending_since.device != since.device:
            self.pending_since = torch.full_like(since, -1.0)
        fired_now = (self.pending_step == float(step)) & (self.streak == self.patience)
        self.pending_since = torch.where(fired_now, since, self.pending_since)

    def pending(self) -> Tensor:
        return torch.cat([super().pending(), self.pending_since.to(self.pending_step.device)])

    def take(self, host: Sequence[float], source: str) -> list[Alert]:
        since = host[2:]
        alerts = super().take(host[:2], source)
        if not alerts:
            return alerts
        layers = sorted((s, name) for s, name in zip(since, self.layer_names) if s >= 0)
        listed = ", ".join(f"{name} (since step {int(s)})" for s, name in layers[:_LISTED_LAYERS])
        more = f" and {len(layers) - _LISTED_LAYERS} more" if len(layers) > _LISTED_LAYERS else ""
        detail = f"; layers collapsing, first first: {listed}{more}" if layers else "; no single layer past its own rule"
        return [dataclasses.replace(a, message=a.message + detail) for a in alerts]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pending_since": self.pending_since.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "pending_since" in state:
            self.pending_since = state["pending_since"].clone()
