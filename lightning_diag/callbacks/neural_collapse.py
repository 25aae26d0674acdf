"""NCTracker: neural collapse (NC1-NC4, CDNV) of a classifier's features, streamed in one pass."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_diag._checks import check_int
from lightning_diag.alerts import Above, Action, Rule
from lightning_diag.callbacks._base import Cadence, DiagnosticCallback, Figures
from lightning_diag.callbacks._trainer import has_tensorboard, log_image
from lightning_diag.keys import Key
from lightning_diag.layers import find_module, last_linear
from lightning_diag.metrics.collapse import METRIC_KEYS, CollapseAccumulator, nearest_class_center

__all__ = ["NCTracker"]

DATA_SOURCES = ("val", "train")
NC4_MODES = ("lagged", "exact")
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")
_IMAGE_SIZE = 256  # the cosine image is upscaled to about this many pixels a side
_NC1, _NC2, _NC34, _OTHER = ("NC1 (within-class variability)", "NC2 (equinorm, equiangularity)",
                             "NC3 (self-duality), NC4 (nearest class centre)", "CDNV, trace ratio")

FeatureFn = Callable[[pl.LightningModule, Any], Tensor]


class NCTracker(DiagnosticCallback):
    """Neural collapse of the classifier's features, in one streaming pass per evaluation.

    Neural collapse (Papyan, Han & Donoho 2020, PNAS) is the geometry a classifier's last layer
    settles into late in training: within-class variability of the features vanishes (NC1), the
    centred class means form a simplex equiangular tight frame (NC2), the classifier rows align
    with them (NC3) and the network decides like a nearest-class-centre rule (NC4). CDNV (Galanti
    et al. 2022) is the class-distance-normalised variance that predicts transfer. Definitions and
    NaN behaviour: :mod:`lightning_diag.metrics.collapse`; the numbers equal
    :func:`~lightning_diag.metrics.neural_collapse_metrics` on the same features.

    **Features.** By default the input of the classifier, the last ``nn.Linear`` registered (name
    it with ``classifier=`` otherwise). ``feature_layer="body.pool"`` takes that module's output
    (flattened to ``(N, d)``); a callable ``feature_layer(pl_module, batch) -> (N, d)`` computes them
    (one extra forward per batch). ``d`` must be the classifier's ``in_features``.

    **Data.** Each evaluation accumulates per-class counts, means and scatter in ``dtype`` on the
    model's device (no host sync), merges ranks with two SUM all-reduces, computes once and logs.

    - ``data="val"`` (default): the batches of the first validation loader, every
      ``every_n_epochs`` epochs and in ``trainer.validate``; no extra forward (eval mode, the
      precision of the run). Under DDP the ``DistributedSampler`` pads to a multiple of the world
      size: up to ``world_size - 1`` samples count twice.
    - ``data="train"``: the training batches of the epoch, from the training forwards (train-mode
      layers and moving weights: a cheap trend, not Papyan's protocol).
    - ``data=<DataLoader>``: a probe pass at the end of every ``every_n_epochs``-th epoch and, with
      ``probe_every_n_steps``, every that many optimizer steps, in ``eval()`` under ``no_grad``
      without autocast, with modes restored and the RNG forked, so training is bit-identical with
      and without it. Rank ``r`` of ``w`` takes batches ``r, r + w, ...`` (unless the loader has a
      ``DistributedSampler``). A probe on the training set is Papyan's protocol.

    **NC4** needs the final class means. ``nc4="lagged"`` (default) compares against the previous
    evaluation's means (not logged at the first evaluation; the means are checkpointed);
    ``nc4="exact"`` (probe loaders only) runs a second probe pass with the final means.

    With a TensorBoard logger, ``nc/class_mean_cosine`` is an image of the cosines of the centred
    class means (blue -1, white 0, red +1; a simplex ETF is a red diagonal on an even light blue).
    Alerts: ``nc/nonfinite_classes`` above 0 (critical), plus ``rules``.

    Args:
        data: ``"val"``, ``"train"`` or a probe ``DataLoader`` (or a list of ``(input, label)`` batches).
        feature_layer: ``None`` (input of the classifier), a module name whose output are the
            features, or ``callable(pl_module, batch) -> (N, d) tensor`` (not with ``"train"``).
        classifier: name of the linear head (a module with a ``(K, d)`` ``weight``); default the last ``nn.Linear``.
        num_classes: ``K``, checked against the classifier's outputs (inferred if None).
        label_fn: ``callable(batch) -> (N,)`` labels; default ``batch[1]`` or a mapping's ``"labels"``/``"label"``/
            ``"targets"``/``"target"``/``"y"``.
        input_fn: ``callable(batch) -> model input`` for probe passes; default ``batch[0]``.
        every_n_epochs: evaluate at the end of every this many epochs (``None``: only with ``probe_every_n_steps``).
        probe_every_n_steps: probe loaders only: also evaluate every this many optimizer steps.
        nc4: ``"lagged"`` or ``"exact"`` (probe loaders only).
        global_mean: ``"class"`` (mean of the class means, Papyan) or ``"sample"``.
        full_covariance: keep the ``d x d`` scatter for exact NC1 (``None``: when ``d <= 4096``).
        dtype: accumulator dtype; float64 unless the device is slow at it.
        cosine_image: log the class-mean cosine image to TensorBoard.
        prefix: the family of the logged keys (two trackers need two prefixes).
        action: ``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or ``callable(alert, trainer)``.
        rules: extra rules on the logged keys, e.g. ``Above("nc/nc1", 1.0, patience=3)``.

    Example:
        >>> tracker = NCTracker(data="val", rules=[Above("nc/nc4", 0.05)], action="log")
        >>> tracker.family, tracker.source
        ('nc', 'NCTracker')
    """

    family = "nc"
    KEYS = (
        Key("nc1", "Tr(Sigma_W Sigma_B^+) / K (the trace approximation without the d x d scatter)", _NC1, rate="eval"),
        Key("nc2_equinorm_means", "std / mean of the centred class-mean norms", _NC2, rate="eval"),
        Key("nc2_equinorm_weights", "std / mean of the classifier-row norms", _NC2, rate="eval"),
        Key("nc2_equiangular", "std of the pairwise cosines of the centred class means", _NC2, rate="eval"),
        Key("nc2_maxangle", "mean |cos + 1/(K-1)| of the centred class means", _NC2, rate="eval"),
        Key("nc2_equiangular_weights", "nc2_equiangular of the classifier rows", _NC2, rate="eval"),
        Key("nc2_maxangle_weights", "nc2_maxangle of the classifier rows", _NC2, rate="eval"),
        Key("nc3", "||W/||W||_F - M/||M||_F||_F^2 (self-duality)", _NC34, rate="eval"),
        Key("nc4", "share where argmax(W h + b) != nearest class mean", _NC34, rate="eval",
            note="from the second evaluation with nc4='lagged'"),
        Key("cdnv", "class-distance-normalised variance, mean over pairs", _OTHER, rate="eval"),
        Key("trace_ratio", "Tr Sigma_W / Tr Sigma_B", _OTHER, rate="eval"),
        Key("bias_collapse", "||W mu_G + b||", rate="eval"),
        Key("num_classes_present", "K: classes that occurred (absent ones are left out)", rate="eval"),
        Key("num_samples", "samples in the evaluation (all ranks)", rate="eval"),
        Key("nonfinite_classes", "classes whose features held inf or NaN", rate="eval"),
        Key("class_mean_cosine", "image of the K x K cosines of the centred class means", kind="image",
            requires="cosine_image"),
    )  # fmt: skip

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
        probe_every_n_steps: int | None = None,
        nc4: Literal["lagged", "exact"] = "lagged",
        global_mean: Literal["class", "sample"] = "class",
        full_covariance: bool | None = None,
        dtype: torch.dtype = torch.float64,
        cosine_image: bool = True,
        prefix: str = "nc",
        action: Action = "warn",
        rules: Sequence[Rule] = (),
    ) -> None:
        super().__init__(action=action, rules=rules)
        probe = not isinstance(data, str)
        _check_data(data)
        if nc4 not in NC4_MODES:
            raise ValueError(f"`nc4` must be one of {NC4_MODES}, got {nc4!r}")
        if nc4 == "exact" and not probe:
            raise ValueError(f"`nc4='exact'` needs a second pass, so a probe DataLoader as `data`, got data={data!r}")
        if global_mean not in ("class", "sample"):
            raise ValueError(f"`global_mean` must be one of ('class', 'sample'), got {global_mean!r}")
        check_int("every_n_epochs", every_n_epochs, 1, optional=True)
        check_int("probe_every_n_steps", probe_every_n_steps, 1, optional=True)
        if probe_every_n_steps is not None and not probe:
            raise ValueError(f"`probe_every_n_steps` needs a probe DataLoader as `data`, got data={data!r}")
        if every_n_epochs is None and probe_every_n_steps is None:
            raise ValueError("`every_n_epochs` and `probe_every_n_steps` are both None: the tracker would never run")
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
        self.probe_every_n_steps, self.nc4, self.global_mean = probe_every_n_steps, nc4, global_mean
        self.full_covariance, self.dtype, self.cosine_image, self.family = full_covariance, dtype, cosine_image, prefix
        self._builtin_rules = [Above(f"{prefix}/nonfinite_classes", 0.0, severity="critical")]
        self._epochs, self._probes = Cadence(every_n_epochs), Cadence(probe_every_n_steps)
        self._head: nn.Module | None = None
        self._handles: list[Any] = []
        self._acc: CollapseAccumulator | None = None
        self._reference: tuple[Tensor, Tensor] | None = None  # class means and present mask for lagged NC4
        self._armed = self._capturing = False
        self._captured: list[Tensor] = []
        self._decision: tuple[Tensor, Tensor | None] | None = None  # (W, b) of the forward being captured
        self._measured = False
        self._probe_step = -1  # trainer.global_step of the last probe

    @property
    def source(self) -> str:
        return type(self).__name__ if self.family == "nc" else f"{type(self).__name__}[{self.family}]"

    @property
    def state_key(self) -> str:
        data = self.data if isinstance(self.data, str) else "probe"
        layer = getattr(self.feature_layer, "__qualname__", self.feature_layer)
        return self._generate_state_key(data=data, prefix=self.family, feature_layer=layer, classifier=self.classifier)

    # -- wiring: resolve the modules once, hook the features -----------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "validate" and self.data == "val":  # trainer.validate() has no on_fit_start
            self._release()
            self.attach(trainer, pl_module)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measured, self._probe_step = False, -1
        if self.classifier is not None:
            head = find_module(pl_module, self.classifier, "classifier", matrix=True)
        else:
            head = (last_linear(pl_module) or (None, None))[1]
        if head is None:
            self.warn_once("no-classifier", "the model has no nn.Linear to take as the classifier; doing nothing "
                                            "(name the head with `classifier=`)")  # fmt: skip
            return
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            raise ValueError(f"`classifier={self.classifier!r}` must have a 2-D (K, d) `weight`, got "
                             f"{type(head).__name__} with weight {getattr(weight, 'shape', weight)!r}")  # fmt: skip
        if self.num_classes is not None and self.num_classes != weight.shape[0]:
            raise ValueError(f"`num_classes={self.num_classes}` but the classifier has {weight.shape[0]} outputs")
        self._head = head
        if isinstance(self.feature_layer, str):
            module = find_module(pl_module, self.feature_layer, "feature_layer")
            self._handles.append(module.register_forward_hook(self._capture_output))
        elif self.feature_layer is None:
            self._handles.append(head.register_forward_pre_hook(self._capture_input))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._head = [], None
        self._armed = self._capturing = False
        self._captured.clear()
        self._decision = self._acc = None  # the reference means for lagged NC4 live on in self._reference

    def _capture_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._capturing and args:
            self._captured.append(args[0].detach())

    def _capture_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._capturing:
            self._captured.append((output[0] if isinstance(output, (tuple, list)) else output).detach())

    # -- data="val" ----------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        validating = trainer.state.fn == "validate"
        if self.data == "val" and not trainer.sanity_checking and (validating or self._epochs.at(trainer.current_epoch)):
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

    # -- data="train" and probes ---------------------------------------------------------------

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.data == "train" and self._epochs.at(trainer.current_epoch):
            self._begin()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._start_batch(self.data == "train")
        if self._capturing and self._acc is not None and self._acc.reference_means is not None:
            # NC4 compares with the decision of *this* forward, made before the optimizer step moves W.
            weight, bias = self._head.weight, getattr(self._head, "bias", None)  # type: ignore[union-attr]
            self._decision = (weight.detach().clone(), None if bias is None else bias.detach().clone())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.data == "train":
            self._end_batch(pl_module, batch)
        # Once per optimizer step: under gradient accumulation the batches that do not step see the same global_step.
        step = trainer.global_step
        if self.probe_every_n_steps is not None and step > 0 and self._probes.at(step - 1) and step != self._probe_step:
            self._probe(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.data == "train" and self._armed:
            self._finish(trainer)
        elif not isinstance(self.data, str) and self._epochs.at(trainer.current_epoch):
            if trainer.global_step != self._probe_step:  # not twice at one step
                self._probe(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self._head is not None and not self._measured and self.data == "val":
            self.warn_once("no-val", "data='val' but no validation epoch was measured (no validation loop, or "
                                     "fewer epochs than `every_n_epochs`); pass data='train' or a probe DataLoader")

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """One evaluation on the probe loader (two passes with ``nc4="exact"``); training unchanged."""
        if self._head is None:
            return
        self._probe_step = trainer.global_step
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
        """Merge ranks, compute, hand the figures to the base (one host transfer), keep the means for NC4."""
        acc, head = self._acc, self._head
        assert acc is not None and head is not None
        self._armed = self._capturing = False
        with _normal_tensors():
            if not acc.synced:
                self._sync(trainer)
            metrics = acc.compute(head.weight, getattr(head, "bias", None))
            if exact_nc4 is not None:
                metrics["nc4"] = exact_nc4
            elif self._reference is None:
                del metrics["nc4"]  # lagged NC4 has no previous means at the first evaluation: log nothing
            finite = torch.isfinite(acc.means).all(1) & torch.isfinite(acc.class_scatter)
            nonfinite = ((acc.counts > 0) & ~finite).sum().to(acc.dtype)
            self.record(trainer.global_step, Figures({**metrics, "num_samples": acc.counts.sum(),
                                                      "nonfinite_classes": nonfinite}))  # fmt: skip
            self.drain(trainer, trainer.global_step, wait=True)
            self.publish(trainer, trainer.global_step)
            cosines = class_mean_cosines(acc.means, acc.counts, self.global_mean)
            if self.cosine_image and cosines.numel() and has_tensorboard(trainer):
                log_image(trainer, f"{self.family}/class_mean_cosine", cosine_image(cosines), trainer.global_step)
            self._reference = (acc.means.clone(), (acc.counts > 0) & finite)
            acc.reset()
        self._measured = True
        host = dict(zip(self._host[1], self._host[2].tolist())) if self._host is not None else {}
        present, samples = int(host.get(f"{self.family}/num_classes_present", 0)), host.get(f"{self.family}/num_samples", 0)
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


def _check_data(data: Any) -> None:
    """``data``: "val", "train", a DataLoader, or a re-iterable of ``(input, label)``-like batches."""
    if isinstance(data, str):
        if data not in DATA_SOURCES:
            raise ValueError(f"`data` must be one of {DATA_SOURCES} or a DataLoader, got {data!r}")
        return
    if isinstance(data, DataLoader):
        return
    if not isinstance(data, Iterable) or isinstance(data, Iterator):  # iter() of an iterator would consume it
        raise ValueError(f"`data` must be one of {DATA_SOURCES} or a re-iterable DataLoader, got {data!r}")
    if isinstance(data, Sequence) and not data:
        raise ValueError(f"`data` is an empty {type(data).__name__}: a probe needs at least one (input, label) batch")
    first = next(iter(data), None) if isinstance(data, Sequence) else None
    if isinstance(data, Sequence) and not (isinstance(first, (Mapping, Tensor)) or (
            isinstance(first, (tuple, list)) and len(first) >= 2)):  # fmt: skip
        raise ValueError(f"`data` must be one of {DATA_SOURCES} or a DataLoader of (input, label) batches, got a "
                         f"{type(data).__name__} whose first batch is {first!r}")  # fmt: skip


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
