"""NCTracker: neural collapse (NC1-NC4, CDNV) of a classifier's features, streamed in one pass."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DistributedSampler
from torch.utils.hooks import RemovableHandle

from lightning_diag._checks import check_int
from lightning_diag.alerts import Above, Action, Rule
from lightning_diag.callbacks._base import DiagnosticCallback
from lightning_diag.callbacks._trainer import has_tensorboard, log_image
from lightning_diag.metrics.collapse import METRIC_KEYS, CollapseAccumulator, nearest_class_center

__all__ = ["NCTracker"]

DATA_SOURCES = ("val", "train")
NC4_MODES = ("lagged", "exact")
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")
_IMAGE_SIZE = 256  # the cosine image is upscaled to about this many pixels a side

FeatureFn = Callable[[pl.LightningModule, Any], Tensor]


class NCTracker(DiagnosticCallback):
    """Neural collapse of the classifier's features, in one streaming pass per evaluation.

    Neural collapse (Papyan, Han & Donoho 2020, PNAS) is the geometry a classifier's last layer
    settles into late in training: within-class variability of the features vanishes (NC1), the
    centred class means form a simplex equiangular tight frame (NC2), the classifier rows align
    with them (NC3) and the network decides like a nearest-class-centre rule (NC4). CDNV (Galanti
    et al. 2022) is the class-distance-normalised variance that predicts transfer. Definitions,
    tolerances and the NaN behaviour are those of :mod:`lightning_diag.metrics.collapse`; the
    numbers equal :func:`~lightning_diag.metrics.neural_collapse_metrics` on the same features.

    **Features.** By default the input of the classifier, which is the last ``nn.Linear`` in
    ``named_modules()`` order (registration order; name it with ``classifier=`` when the head is
    registered earlier). ``feature_layer="body.pool"`` takes the output of that module instead
    (flattened to ``(N, d)``), and a callable ``feature_layer(pl_module, batch) -> (N, d)`` computes
    them itself (one extra forward per batch). Either way ``d`` must be the classifier's
    ``in_features``. The classifier's weight and bias (read at evaluation time) give NC2-NC4.

    **Data.** Each evaluation accumulates per-class counts, means and scatter in ``dtype`` on the
    model's device (one ``B x d x d`` GEMM per batch, no host sync), merges ranks with two SUM
    all-reduces under DDP, computes the metrics once and logs them in one host transfer.

    - ``data="val"`` (default): the batches of the (first) validation loader, at the end of
      every ``every_n_epochs``-th epoch's validation and in ``trainer.validate``; no extra forward.
      Features are whatever the model computes there (eval mode; bf16 under ``bf16-mixed``, which
      puts a floor under NC1). Under DDP, Lightning's ``DistributedSampler`` pads the set to a
      multiple of the world size, so up to ``world_size - 1`` samples count twice.
    - ``data="train"``: the training batches of the epoch, captured during the training forwards
      at no extra cost. They come from train-mode layers (BatchNorm batch statistics, dropout) and
      from weights that move during the epoch: a cheap trend, not Papyan's protocol. NC4 compares
      each forward's own decision (the weights before that step) with the previous epoch's means.
    - ``data=<DataLoader>``: a dedicated probe pass at the end of every ``every_n_epochs``-th
      training epoch and, with ``every_n_steps``, every that many optimizer steps. The pass runs
      the model in ``eval()`` under ``no_grad`` without autocast, restores every module's
      train/eval mode afterwards, and forks the RNG, so training is bit-identical with and
      without it (BatchNorm running statistics untouched). Batches are moved to the model's
      device and fed as ``pl_module(input_fn(batch))``. Under DDP rank ``r`` of ``w`` takes the
      batches ``r, r + w, ...`` (no padded duplicates), unless the loader already has a
      ``DistributedSampler``. A probe on the training set is Papyan's protocol.

    **NC4.** The nearest-class-centre rule needs the final class means, which a single pass does
    not have. ``nc4="lagged"`` (default) compares against the class means of the *previous*
    evaluation (NaN at the first one; kept in checkpoints, so a resumed run continues the series);
    ``nc4="exact"`` (probe loaders only) runs a second pass over the probe with the final means.

    Logged keys (at ``trainer.global_step``; ``nc`` is ``prefix``):

    ===============================  ==========================================================
    ``nc/nc1``                        Tr(Sigma_W Sigma_B^+) / K (trace approximation when the
                                      ``d x d`` scatter is not kept, see ``full_covariance``)
    ``nc/nc2_equinorm_means``         std/mean of the centred class-mean norms
    ``nc/nc2_equinorm_weights``       std/mean of the classifier-row norms
    ``nc/nc2_equiangular``            std of the pairwise cosines of the centred class means
    ``nc/nc2_maxangle``               mean ``|cos + 1/(K-1)|`` of the centred class means
    ``nc/nc2_equiangular_weights``    the same two for the classifier rows
    ``nc/nc2_maxangle_weights``
    ``nc/nc3``                        ``||W/||W||_F - M/||M||_F||_F^2`` (self-duality)
    ``nc/nc4``                        fraction where ``argmax(W h + b)`` != nearest class mean
    ``nc/cdnv``                       class-distance-normalised variance, mean over pairs
    ``nc/trace_ratio``                Tr Sigma_W / Tr Sigma_B
    ``nc/bias_collapse``              ``||W mu_G + b||``
    ``nc/num_classes_present``        K: classes that occurred (absent ones are left out)
    ``nc/num_samples``                samples in the evaluation (all ranks)
    ``nc/nonfinite_classes``          classes whose features held inf/NaN
    ``alerts/NCTracker``              number of alerts so far (``alerts/NCTracker[<prefix>]``
                                      with another ``prefix``)
    ===============================  ==========================================================

    With a TensorBoard logger, ``nc/class_mean_cosine`` is an image of the ``K x K`` cosines of
    the centred class means (blue -1, white 0, red +1; a simplex ETF is a red diagonal on an
    even light blue). Alerts: ``nc/nonfinite_classes`` above 0 (critical), plus ``rules``.

    Args:
        data: ``"val"``, ``"train"`` or a probe ``DataLoader`` (any re-iterable of batches).
        feature_layer: ``None`` (input of the classifier), a module name whose output are the
            features, or ``callable(pl_module, batch) -> (N, d) tensor`` (not with ``"train"``).
        classifier: name of the linear head (a module with a ``(K, d)`` ``weight``); default the
            last ``nn.Linear``.
        num_classes: ``K``, checked against the classifier's ``out_features`` (inferred if None).
        label_fn: ``callable(batch) -> (N,)`` integer labels; default ``batch[1]`` or, for a
            mapping, its ``"labels"``/``"label"``/``"targets"``/``"target"``/``"y"`` entry.
        input_fn: ``callable(batch) -> model input`` for probe passes; default ``batch[0]``.
        every_n_epochs: evaluate at the end of every this many epochs (``None``: never, only
            with a probe loader and ``every_n_steps``).
        every_n_steps: probe loaders only: also evaluate every this many optimizer steps.
        nc4: ``"lagged"`` or ``"exact"`` (probe loaders only); see above.
        global_mean: ``"class"`` (mean of the class means, Papyan) or ``"sample"``.
        full_covariance: keep the ``d x d`` within-class scatter for exact NC1 (``None``: when
            ``d <= 4096``); otherwise NC1 is the documented trace approximation.
        dtype: accumulator dtype; float64 unless the device is slow at it.
        cosine_image: log the class-mean cosine image to TensorBoard.
        prefix: namespace of the logged keys (two trackers need two prefixes).
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``callable(alert, trainer)``.
        rules: extra alert rules on the logged keys, e.g. ``Above("nc/nc1", 1.0, patience=3)``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> tracker = NCTracker(data="val", rules=[Above("nc/nc4", 0.05)], action="log")
        >>> trainer = Trainer(callbacks=[tracker], max_epochs=20)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        data: Union[Literal["val", "train"], Iterable[Any]] = "val",
        feature_layer: Union[str, FeatureFn, None] = None,
        classifier: str | None = None,
        num_classes: int | None = None,
        label_fn: Callable[[Any], Tensor] | None = None,
        input_fn: Callable[[Any], Any] | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        nc4: Literal["lagged", "exact"] = "lagged",
        global_mean: Literal["class", "sample"] = "class",
        full_covariance: bool | None = None,
        dtype: torch.dtype = torch.float64,
        cosine_image: bool = True,
        prefix: str = "nc",
        action: Action = "warn",
        rules: Sequence[Rule] = (),
    ) -> None:
        super().__init__(every_n_steps=every_n_steps, action=action, rules=rules)
        probe = not isinstance(data, str)
        if isinstance(data, str) and data not in DATA_SOURCES:
            raise ValueError(f"`data` must be one of {DATA_SOURCES} or a DataLoader, got {data!r}")
        if probe and (not isinstance(data, Iterable) or isinstance(data, Iterator)):  # iter() would draw RNG
            raise ValueError(f"`data` must be one of {DATA_SOURCES} or a re-iterable DataLoader, got {data!r}")
        if nc4 not in NC4_MODES:
            raise ValueError(f"`nc4` must be one of {NC4_MODES}, got {nc4!r}")
        if nc4 == "exact" and not probe:
            raise ValueError(f"`nc4='exact'` needs a second pass, so a probe DataLoader as `data`, got data={data!r}")
        if global_mean not in ("class", "sample"):
            raise ValueError(f"`global_mean` must be one of ('class', 'sample'), got {global_mean!r}")
        check_int("every_n_epochs", every_n_epochs, 1, optional=True)
        if every_n_steps is not None and not probe:
            raise ValueError(f"`every_n_steps` needs a probe DataLoader as `data`, got data={data!r}")
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError("`every_n_epochs` and `every_n_steps` are both None: the tracker would never run")
        if feature_layer is not None and not (isinstance(feature_layer, str) or callable(feature_layer)):
            raise ValueError(f"`feature_layer` must be None, a module name or a callable, got {feature_layer!r}")
        if callable(feature_layer) and data == "train":
            raise ValueError("a callable `feature_layer` needs a forward pass of its own: use data='val' or a probe")
        check_int("num_classes", num_classes, 2, optional=True)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"`dtype` must be a floating point torch.dtype, got {dtype!r}")
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise ValueError(f"`prefix` must be a non-empty string without '/', got {prefix!r}")
        self.data, self.feature_layer, self.classifier, self.num_classes = data, feature_layer, classifier, num_classes
        self.label_fn, self.input_fn, self.every_n_epochs = label_fn, input_fn, every_n_epochs
        self.nc4, self.global_mean, self.full_covariance, self.dtype = nc4, global_mean, full_covariance, dtype
        self.cosine_image, self.prefix = cosine_image, prefix
        self.keys = [f"{prefix}/{k}" for k in (*METRIC_KEYS, "num_samples", "nonfinite_classes")]
        self._builtin_rules = [Above(f"{prefix}/nonfinite_classes", 0.0, severity="critical")]
        self._builtin_index = self.keys.index(f"{prefix}/nonfinite_classes")
        self._head: nn.Module | None = None
        self._handles: list[RemovableHandle] = []
        self._acc: CollapseAccumulator | None = None
        self._reference: tuple[Tensor, Tensor] | None = None  # class means and present mask for lagged NC4
        self._armed = self._capturing = False
        self._captured: list[Tensor] = []
        self._decision: tuple[Tensor, Tensor | None] | None = None  # (W, b) of the forward being captured
        self._measured = False
        self._last_probe_step = -1

    @property
    def source(self) -> str:
        return type(self).__name__ if self.prefix == "nc" else f"{type(self).__name__}[{self.prefix}]"

    @property
    def state_key(self) -> str:
        data = self.data if isinstance(self.data, str) else "probe"
        layer = getattr(self.feature_layer, "__qualname__", self.feature_layer)
        return self._generate_state_key(data=data, prefix=self.prefix, feature_layer=layer, classifier=self.classifier)

    # -- wiring: resolve the modules once, hook the features -----------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._head, self._measured = None, False
        if stage != "fit" and not (stage == "validate" and self.data == "val"):
            return
        head = self._find_classifier(pl_module)
        if head is None:
            self.warn_once("no-classifier", "the model has no nn.Linear to take as the classifier; doing nothing "
                                            "(name the head with `classifier=`)")
            return
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise ValueError(f"`classifier={self.classifier!r}` must have a 2-D (K, d) `weight`, got "
                             f"{type(head).__name__} with weight {getattr(weight, 'shape', weight)!r}")
        if self.num_classes is not None and self.num_classes != weight.shape[0]:
            raise ValueError(f"`num_classes={self.num_classes}` but the classifier has {weight.shape[0]} outputs")
        self._head = head
        if isinstance(self.feature_layer, str):
            modules = dict(pl_module.named_modules())
            if self.feature_layer not in modules:
                raise ValueError(f"`feature_layer={self.feature_layer!r}` is not a module of the model; modules are: "
                                 f"{[n for n in modules if n][:50]}")
            self._handles.append(modules[self.feature_layer].register_forward_hook(self._capture_output))
        elif self.feature_layer is None:
            self._handles.append(head.register_forward_pre_hook(self._capture_input))

    def dashboard_charts(self) -> dict[str, list[str]]:
        p = re.escape(self.prefix)
        return {
            "NC1 (within-class variability)": [rf"{p}/nc1$"],
            "NC2 (equinorm, equiangularity)": [rf"{p}/nc2_.*"],
            "NC3 (self-duality), NC4 (nearest class centre)": [rf"{p}/nc[34]$"],
            "CDNV, trace ratio": [rf"{p}/(cdnv|trace_ratio)$"],
        }

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._armed = self._capturing = False
        self._captured.clear()
        self._decision = self._acc = None  # the reference means for lagged NC4 live on in self._reference

    def _find_classifier(self, pl_module: pl.LightningModule) -> nn.Module | None:
        if self.classifier is None:
            linears = [m for m in pl_module.modules() if isinstance(m, nn.Linear)]
            return linears[-1] if linears else None
        modules = dict(pl_module.named_modules())
        if self.classifier not in modules:
            heads = [n for n, m in modules.items() if isinstance(getattr(m, "weight", None), Tensor)
                     and m.weight.ndim == 2]
            raise ValueError(f"`classifier={self.classifier!r}` is not a module of the model; modules with a 2-D "
                             f"weight are: {heads[:50]}")
        return modules[self.classifier]

    def _capture_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._capturing and args:
            self._captured.append(args[0].detach())

    def _capture_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._capturing:
            self._captured.append((output[0] if isinstance(output, (tuple, list)) else output).detach())

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- data="val" ----------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        validating = trainer.state.fn == "validate"
        if self.data == "val" and not trainer.sanity_checking and (validating or self._epoch_due(trainer)):
            self._begin()

    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._start_batch(self.data == "val" and dataloader_idx == 0)

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.data == "val" and dataloader_idx == 0:
            self._end_batch(pl_module, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.data == "val" and self._armed:
            self._finish(trainer)

    # -- data="train" --------------------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.data == "train" and self._epoch_due(trainer):
            self._begin()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start_batch(self.data == "train")
        if self._capturing and self._acc is not None and self._acc.reference_means is not None:
            # NC4 compares with the decision of *this* forward, made before the optimizer step moves W.
            weight, bias = self._head.weight, getattr(self._head, "bias", None)  # type: ignore[union-attr]
            self._decision = (weight.detach().clone(), None if bias is None else bias.detach().clone())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.data == "train":
            self._end_batch(pl_module, batch)
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_probe_step:
            self._probe(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.data == "train" and self._armed:
            self._finish(trainer)
        elif not isinstance(self.data, str) and self._epoch_due(trainer):
            if trainer.global_step != self._last_probe_step:  # not twice at one step (every_n_steps)
                self._probe(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._head is not None and not self._measured and self.data == "val":
            self.warn_once("no-val", "data='val' but no validation epoch was measured (no validation loop, or "
                                     "fewer epochs than `every_n_epochs`); pass data='train' or a probe DataLoader")

    # -- data=<DataLoader> ---------------------------------------------------------------------

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One evaluation on the probe loader (two passes with ``nc4="exact"``); training unchanged."""
        if self._head is None:
            return
        self._last_probe_step = trainer.global_step
        self._begin()
        with _probe_mode(pl_module):
            for batch in self._probe_batches(trainer, pl_module):
                self._absorb(self._probe_features(pl_module, batch), self._labels(batch))
            exact_nc4 = None
            if self.nc4 == "exact":  # the second pass needs the final means of all ranks
                self._sync(trainer)
                exact_nc4 = self._exact_nc4(trainer, pl_module)
        self._finish(trainer, exact_nc4)

    def _probe_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[Any]:
        loader = self.data
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", getattr(loader, "sampler", None))
        world = 1 if isinstance(sampler, DistributedSampler) else trainer.world_size
        for i, batch in enumerate(loader):  # type: ignore[arg-type]
            if i % world == trainer.global_rank % world:
                yield move_data_to_device(batch, pl_module.device)

    def _probe_features(self, pl_module: pl.LightningModule, batch: Any) -> Tensor:
        if callable(self.feature_layer):
            return self.feature_layer(pl_module, batch)
        self._start_batch(True)
        pl_module(self.input_fn(batch) if self.input_fn is not None else batch[0])
        self._capturing = False
        return self._take_captured()

    def _exact_nc4(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Tensor:
        """Second probe pass: NCC against the final (synced) class means vs the network decision."""
        acc = self._acc
        assert acc is not None
        present = (acc.counts > 0) & torch.isfinite(acc.means).all(1)
        counts = torch.zeros(2, dtype=acc.dtype, device=acc.device)  # mismatches, samples
        for batch in self._probe_batches(trainer, pl_module):
            x = self._as_matrix(self._probe_features(pl_module, batch)).to(acc.device, acc.dtype)
            counts[0] += (nearest_class_center(x, acc.means, present) != self._logits(x).argmax(1)).sum()
            counts[1] += x.shape[0]
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return counts[0] / counts[1]  # NaN when the probe is empty

    # -- one evaluation: begin, absorb batches, finish ------------------------------------------

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        return self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _begin(self) -> None:
        if self._head is None:
            return
        weight = self._head.weight
        k, d = weight.shape
        with _normal_tensors():
            if self._acc is None:
                self._acc = CollapseAccumulator(k, d, device=weight.device, dtype=self.dtype,
                                                global_mean=self.global_mean, full_covariance=self.full_covariance)
            elif self._acc.device != weight.device:
                self._acc.to(weight.device)
            self._acc.reset()
            reference = self._reference if self.nc4 == "lagged" else None
            if reference is not None and reference[0].shape != (k, d):
                self.warn_once("reference-shape", f"dropping the saved class means of shape "
                                                  f"{tuple(reference[0].shape)}: the classifier is {(k, d)}")
                self._reference = reference = None
            self._acc.set_reference_means(*(reference or (None,)))
        self._armed = True

    def _start_batch(self, wanted: bool) -> None:
        self._captured.clear()
        self._capturing = self._armed and wanted and not callable(self.feature_layer)

    def _end_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self._armed:
            return
        if callable(self.feature_layer):  # data="val" only: validation runs under no_grad already
            self._absorb(self.feature_layer(pl_module, batch), self._labels(batch))
            return
        if self._capturing:
            self._capturing = False
            if self._captured:
                self._absorb(self._take_captured(), self._labels(batch))
        self._decision = None

    def _take_captured(self) -> Tensor:
        features = torch.cat([self._as_matrix(f) for f in self._captured]) if self._captured else None
        self._captured.clear()
        if features is None:
            raise RuntimeError("the probe forward did not run the hooked module; check `input_fn` and "
                               "`feature_layer`")
        return features

    def _as_matrix(self, features: Tensor) -> Tensor:
        assert self._head is not None
        d = self._head.weight.shape[1]
        matrix = features.flatten(1) if features.ndim > 2 else features
        if matrix.ndim != 2 or matrix.shape[1] != d:
            raise ValueError(f"features of shape {tuple(features.shape)} do not match the classifier's input "
                             f"dimension {d}; `feature_layer` must give (N, {d}) features (or (N, ...) that "
                             "flatten to it)")
        return matrix

    def _labels(self, batch: Any) -> Tensor:
        if self.label_fn is not None:
            return self.label_fn(batch)
        if isinstance(batch, Mapping):
            for key in _LABEL_KEYS:
                if key in batch:
                    return batch[key]
            raise ValueError(f"no labels in the batch (keys {list(batch)}; looked for {_LABEL_KEYS}): pass `label_fn`")
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return batch[1]
        raise ValueError(f"cannot find labels in a batch of type {type(batch).__name__}: pass `label_fn`")

    def _logits(self, x: Tensor) -> Tensor:
        """The network decision ``W h + b`` in the accumulator dtype (the definition of NC4)."""
        assert self._head is not None
        weight, bias = self._decision or (self._head.weight.detach(), getattr(self._head, "bias", None))
        logits = x @ weight.to(x.device, x.dtype).T
        return logits if bias is None else logits + bias.detach().to(x.device, x.dtype)

    def _absorb(self, features: Tensor, labels: Tensor) -> None:
        acc = self._acc
        assert acc is not None
        features = self._as_matrix(features)
        labels = labels.reshape(-1)
        if labels.shape[0] != features.shape[0]:
            self.warn_once("rows", f"skipping batches with {features.shape[0]} feature rows but {labels.shape[0]} "
                                   "labels (several forwards per step?); pass a `feature_layer` callable")
            return
        with _normal_tensors():
            x = features.to(acc.device, acc.dtype)
            acc.update(x, labels, self._logits(x) if acc.reference_means is not None else None)

    def _sync(self, trainer: pl.Trainer) -> None:
        assert self._acc is not None
        with _normal_tensors():
            self._acc.sync(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))  # the default reduce is a mean

    def _finish(self, trainer: pl.Trainer, exact_nc4: Tensor | None = None) -> None:
        """Merge ranks, compute, publish (one host transfer), then keep the means for lagged NC4."""
        acc, head = self._acc, self._head
        assert acc is not None and head is not None
        self._armed = self._capturing = False
        with _normal_tensors():
            if not acc.synced:
                self._sync(trainer)
            metrics = acc.compute(head.weight, getattr(head, "bias", None))
            if exact_nc4 is not None:
                metrics["nc4"] = exact_nc4
            finite = torch.isfinite(acc.means).all(1) & torch.isfinite(acc.class_scatter)
            nonfinite = ((acc.counts > 0) & ~finite).sum().to(acc.dtype)
            values = torch.stack([*(metrics[k] for k in METRIC_KEYS), acc.counts.sum(), nonfinite])
            self._builtin_rules[0].update(values[self._builtin_index], trainer.global_step)
            logged = self.publish(trainer, trainer.global_step, self.keys, values)
            if self.cosine_image and has_tensorboard(trainer):
                image = cosine_image(class_mean_cosines(acc.means, acc.counts, self.global_mean))
                log_image(trainer, f"{self.prefix}/class_mean_cosine", image, trainer.global_step)
            self._reference = (acc.means.clone(), (acc.counts > 0) & finite)
            acc.reset()
        self._measured = True
        present, samples = int(logged[f"{self.prefix}/num_classes_present"]), logged[f"{self.prefix}/num_samples"]
        if samples == 0:
            self.warn_once("empty", f"no features were captured for data={self._data_name!r}: does the step run "
                                    "the classifier (or `feature_layer`)?")
        elif present < acc.num_classes:
            self.warn_once("missing", f"only {present} of {acc.num_classes} classes occur in "
                                      f"data={self._data_name!r}; the metrics use the classes present")

    @property
    def _data_name(self) -> str:
        return self.data if isinstance(self.data, str) else "probe"

    # -- checkpoint state -----------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        if self._reference is None:
            return {"reference_means": None, "reference_present": None}
        return {"reference_means": self._reference[0].cpu(), "reference_present": self._reference[1].cpu()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        means, present = state.get("reference_means"), state.get("reference_present")
        self._reference = None if means is None else (means.clone(), present.clone())


# -- helpers ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _normal_tensors() -> Iterator[None]:
    """Accumulator work outside inference mode, so its state never becomes inference tensors
    (Lightning validates under ``torch.inference_mode``; the state outlives that context)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


@contextlib.contextmanager
def _probe_mode(pl_module: pl.LightningModule) -> Iterator[None]:
    """``eval()``, ``no_grad``, no autocast and a forked RNG; every module's mode is restored after."""
    modes = [(m, m.training) for m in pl_module.modules()]
    device = pl_module.device
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    try:
        autocast: Any = torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        autocast = contextlib.nullcontext()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast:
            pl_module.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


def class_mean_cosines(means: Tensor, counts: Tensor, global_mean: str = "class") -> Tensor:
    """``K' x K'`` cosines of the centred means of the ``K'`` classes present (one host sync)."""
    present = (counts > 0).nonzero().squeeze(1)
    mu, n = means[present], counts[present]
    if mu.shape[0] == 0:
        return mu.new_zeros(0, 0)
    centre = mu.mean(0) if global_mean == "class" else (n[:, None] * mu).sum(0) / n.sum()
    unit = torch.nn.functional.normalize(mu - centre, dim=1)
    return unit @ unit.T


def cosine_image(cosines: Tensor) -> Tensor:
    """A ``(3, H, W)`` RGB image of a matrix of values in ``[-1, 1]``: blue -1, white 0, red +1, grey NaN.

    Each entry is a square of ``max(1, 256 // K)`` pixels (no matplotlib needed).
    """
    v = cosines.detach().float().clamp(-1, 1)
    rgb = torch.stack([1 + v.clamp(max=0), 1 - v.abs(), 1 - v.clamp(min=0)])
    rgb = torch.where(torch.isnan(v), torch.full_like(rgb, 0.5), rgb)
    scale = max(1, _IMAGE_SIZE // max(v.shape[0], 1))
    return rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).cpu()
