"""NCTracker: neural collapse (NC1-NC4, CDNV) of a classifier's features, streamed in one pass
through a :class:`~lightning_diag.metrics.neural_collapse.NeuralCollapse` metric."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from types import SimpleNamespace
from typing import Any, Literal, Union

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_diag._checks import check_bool, check_callable, check_int
from lightning_diag.alerts import Above, Action, Rule
from lightning_diag.callbacks._base import Cadence, DiagnosticCallback, Figures
from lightning_diag.callbacks._probe import (
    FeatureTap, batch_labels, check_data, class_mean_cosines, cosine_image, data_parallel, feature_matrix,
    find_head, normal_tensors, probe_batches, probe_mode,
)  # fmt: skip
from lightning_diag.callbacks._sharding import whole_tensor
from lightning_diag.callbacks._trainer import has_tensorboard, log_image
from lightning_diag.keys import Key
from lightning_diag.layers import find_module
from lightning_diag.metrics.collapse import check_state_dtype
from lightning_diag.metrics.neural_collapse import NeuralCollapse

__all__ = ["NCTracker", "class_mean_cosines", "cosine_image"]

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

    **Token classifiers.** Features ``(B, T, d)`` (what ``nn.Linear`` reads per token) count as
    ``B * T`` samples, with the labels ``(B, T)`` flattened alike. Rows whose label is
    ``ignore_index`` (-100, PyTorch's default) or negative are left out (padding); float labels
    that hold integers (``0.0``, ``1.0``) are classes. Labels that are not class indices in
    ``[0, K)`` (``0.5``, NaN, ``>= K``) are left out too, with one warning; nothing raises.

    **Data.** Each evaluation feeds the features to one
    :class:`~lightning_diag.metrics.neural_collapse.NeuralCollapse` metric (per-class counts, means
    and scatter in ``dtype`` on the model's device, no host sync), whose ``compute()`` merges the
    ranks exactly with two SUM all-reduces (over the data-parallel ranks), then logs.

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
    ``nc4="exact"`` (probe loaders only) runs a second probe pass with the final means. The decision
    is ``W h + b`` in ``dtype``, with the weights of the forward that gave ``h``.

    **Sharded heads** (FSDP2): the classifier's weight and bias are read whole at each evaluation
    (an all-gather of the ``(K, d)`` matrix on every rank).

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
        ignore_index: the label of rows to leave out (padding); negative labels always are. ``None``: only those.
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
        ignore_index: int | None = -100,
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
        check_data(data, nc4, every_n_epochs, probe_every_n_steps, feature_layer)  # and what depends on it
        if global_mean not in ("class", "sample"):
            raise ValueError(f"`global_mean` must be one of ('class', 'sample'), got {global_mean!r}")
        check_int("num_classes", num_classes, 2, optional=True)
        check_callable("label_fn", label_fn, optional=True)
        check_callable("input_fn", input_fn, optional=True)
        if ignore_index is not None and (not isinstance(ignore_index, int) or isinstance(ignore_index, bool)):
            raise ValueError(f"`ignore_index` must be None or an int, got {ignore_index!r}")
        if full_covariance is not None:
            check_bool("full_covariance", full_covariance)
        check_bool("cosine_image", cosine_image)
        check_state_dtype(dtype)  # here, not at the first evaluation mid-run
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise ValueError(f"`prefix` must be a non-empty string without '/', got {prefix!r}")
        self.data, self.feature_layer, self.classifier, self.num_classes = data, feature_layer, classifier, num_classes
        self.label_fn, self.input_fn, self.ignore_index = label_fn, input_fn, ignore_index
        self.every_n_epochs = every_n_epochs
        self.probe_every_n_steps, self.nc4, self.global_mean = probe_every_n_steps, nc4, global_mean
        self.full_covariance, self.dtype, self.cosine_image, self.family = full_covariance, dtype, cosine_image, prefix
        self._builtin_rules = [Above(f"{prefix}/nonfinite_classes", 0.0, severity="critical")]
        self._epochs, self._probes = Cadence(every_n_epochs), Cadence(probe_every_n_steps)
        self._head: nn.Module | None = None
        self._tap: FeatureTap | None = None
        self._metric: NeuralCollapse | None = None  # built at the first evaluation, on the head's device
        self._group, self._rank, self._ranks = None, 0, 1  # the data-parallel ranks: their sum is the data
        self._reference: tuple[Tensor, Tensor] | None = None  # class means and present mask for lagged NC4
        self._armed = False
        self._weights: tuple[Tensor, Tensor | None] | None = None  # (W, b) whole, in dtype, for this evaluation
        self._measured = False
        self._probe_step = -1  # trainer.global_step of the last probe
        self._dropped: Tensor | None = None  # labels of this evaluation that were not class indices (device)

    @property
    def source(self) -> str:
        return type(self).__name__ if self.family == "nc" else f"{type(self).__name__}[{self.family}]"

    @property
    def state_key(self) -> str:
        layer = getattr(self.feature_layer, "__qualname__", self.feature_layer)
        return self._generate_state_key(data=self._data_name, prefix=self.family, feature_layer=layer,
                                        classifier=self.classifier)  # fmt: skip

    @property
    def _data_name(self) -> str:
        return self.data if isinstance(self.data, str) else "probe"

    # -- wiring: resolve the modules once, hook the features -----------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "validate" and self.data == "val":  # trainer.validate() has no on_fit_start
            self._release()
            self.attach(trainer, pl_module)

    def attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measured, self._probe_step = False, -1
        head = find_head(pl_module, self.classifier, self.num_classes)
        if head is None:
            self.warn_once("no-classifier", "the model has no nn.Linear to take as the classifier; doing nothing "
                                            "(name the head with `classifier=`)")  # fmt: skip
            return
        source = head if self.feature_layer is None else None
        if isinstance(self.feature_layer, str):
            source = find_module(pl_module, self.feature_layer, "feature_layer")
        self._head, self._tap = head, FeatureTap(head, source, self.dtype)
        self._group, self._rank, self._ranks = data_parallel(trainer)

    def detach(self) -> None:
        if self._tap is not None:
            self._tap.remove()
        self._head = self._tap = self._metric = self._weights = None  # the means for lagged NC4 live on in _reference
        self._armed = False

    # -- data="val" ----------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        validating = trainer.state.fn == "validate"
        if self.data == "val" and not trainer.sanity_checking and (
            validating or self._epochs.at(trainer.current_epoch)
        ):
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

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._start_batch(self.data == "train")

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
        with probe_mode(pl_module):
            self._probe_pass(pl_module)
            if self.nc4 == "exact":  # the same data again, against the final class means of all ranks
                self._restart_against_final_means()
                self._probe_pass(pl_module)
        self._finish(trainer)

    def _probe_pass(self, pl_module: pl.LightningModule) -> None:
        assert self._tap is not None
        for batch in probe_batches(self.data, self._rank, self._ranks, pl_module.device):  # type: ignore[arg-type]
            if callable(self.feature_layer):
                features = self.feature_layer(pl_module, batch)
            else:
                self._tap.start(True)
                pl_module(self.input_fn(batch) if self.input_fn is not None else batch[0])
                features = self._tap.take()
                if features is None:
                    raise RuntimeError("the probe forward did not run the hooked module; check `input_fn` and "
                                       "`feature_layer`")
            self._absorb(features, batch_labels(batch, self.label_fn))

    def _restart_against_final_means(self) -> None:
        metric = self._metric
        assert metric is not None
        with normal_tensors():
            metric.sync()  # the global state (no-op in one process); reset() unsyncs
            means, present = metric.means.clone(), (metric.counts > 0) & torch.isfinite(metric.means).all(1)
            metric.reset()
            metric.set_reference_means(means, present)

    # -- one evaluation: begin, absorb batches, finish ------------------------------------------

    def _begin(self) -> None:
        if self._head is None:
            return
        self._weights = self._whole_head()  # the decision of NC4 when no forward of the head gave one
        weight = self._weights[0]
        k, d = weight.shape
        with normal_tensors():
            if self._metric is None:
                self._metric = NeuralCollapse(k, dim=d, nc4_reference="manual", global_mean=self.global_mean,
                                              full_covariance=self.full_covariance, dtype=self.dtype,
                                              process_group=self._group)  # fmt: skip
            metric = self._metric.to(weight.device)
            metric.reset()
            reference = self._reference if self.nc4 == "lagged" else None
            if reference is not None and reference[0].shape != (k, d):
                self.warn_once("reference-shape", f"dropping the saved class means of shape "
                                                  f"{tuple(reference[0].shape)}: the classifier is {(k, d)}")
                self._reference = reference = None
            metric.set_reference_means(*(reference or (None,)))
        self._dropped = None
        self._armed = True

    def _start_batch(self, wanted: bool) -> None:
        if self._tap is not None:  # NC4 compares with the decision of *this* training forward: keep its (W, b)
            lagged = self.data == "train" and self._metric is not None and self._metric.reference_means is not None
            self._tap.start(self._armed and wanted, keep_weights=lagged)

    def disarm(self) -> None:
        """The training forward is over (the base calls this before backward): a probe pass that another
        callback runs before this batch ends, or a forward recomputed in backward, is not captured."""
        if self._tap is not None:
            self._tap.on = False

    def _end_batch(self, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self._armed or self._tap is None:
            return
        if callable(self.feature_layer):  # data="val" only: validation runs under no_grad already
            features: Tensor | None = self.feature_layer(pl_module, batch)
        else:
            features = self._tap.take()
        if features is not None:
            self._absorb(features, batch_labels(batch, self.label_fn), self._tap.weights)
        self._tap.weights = None

    def _absorb(self, features: Tensor, labels: Tensor, weights: tuple[Tensor, Tensor | None] | None = None) -> None:
        metric = self._metric
        assert metric is not None and self._head is not None
        features = feature_matrix(features, self._head.weight.shape[1])
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.shape[0] != features.shape[0]:
            self.warn_once("rows", f"skipping batches with {features.shape[0]} feature rows but {labels.shape[0]} "
                                   "labels (several forwards per step?); pass a `feature_layer` callable")
            return
        with normal_tensors():
            labels = self._class_indices(labels, metric.num_classes)
            logits = None
            if metric.reference_means is not None:  # the network decision W h + b in dtype (the definition of NC4)
                weight, bias = weights or self._weights  # type: ignore[misc]
                x = features.to(weight.device, weight.dtype)
                logits = x @ weight.T if bias is None else x @ weight.T + bias
            metric.update(features, labels, logits)

    def _class_indices(self, labels: Tensor, num_classes: int) -> Tensor:
        """``labels`` as class indices, -1 for the rows to leave out (masks: no host sync).

        Left out: ``ignore_index`` and negative labels (padding), silently; labels that are not
        class indices (a float that is not an integer, NaN, ``>= K``), counted for one warning at
        the end of the evaluation (they would crash ``index_add_``, on CUDA with a device assert).
        """
        if labels.dtype == torch.bool:
            labels = labels.long()
        if labels.is_floating_point():
            integral = torch.isfinite(labels) & (labels == labels.round())
            stray = ~integral
            labels = torch.where(integral, labels, -1.0).long()
        else:
            labels = labels.long()
            stray = torch.zeros_like(labels, dtype=torch.bool)
        if self.ignore_index is not None and self.ignore_index >= 0:  # negative labels are left out anyway
            labels = torch.where(labels == self.ignore_index, -1, labels)
        stray |= labels >= num_classes
        labels = torch.where(stray, -1, labels)
        count = stray.sum()
        self._dropped = count if self._dropped is None else self._dropped + count.to(self._dropped.device)
        return labels

    def _whole_head(self) -> tuple[Tensor, Tensor | None]:
        """The head's ``(W, b)`` in dtype, whole on every rank: under FSDP2 an all-gather (every rank calls it)."""
        assert self._head is not None
        weight = whole_tensor(self._head.weight.detach()).to(dtype=self.dtype)
        bias = getattr(self._head, "bias", None)
        return weight, None if bias is None else whole_tensor(bias.detach()).to(weight.device, self.dtype)

    def _finish(self, trainer: pl.Trainer) -> None:
        """Merge ranks, compute, hand the figures to the base (one host transfer), keep the means for NC4."""
        metric = self._metric
        assert metric is not None and self._weights is not None
        self._armed = False
        step = trainer.global_step
        with normal_tensors():
            weight, bias = self._whole_head() if self.data == "train" else self._weights  # training moved W
            metric.classifier = SimpleNamespace(weight=weight, bias=bias)
            with warnings.catch_warnings():  # an evaluation without features is reported below, once
                warnings.filterwarnings("ignore", message=r".*`compute` method .* was called before")
                metrics = metric.compute()  # lagged NC4 is absent at the first evaluation: nothing logged
            metric.classifier = None
            means, counts = metric.computed_means, metric.computed_counts
            finite = torch.isfinite(means).all(1) & torch.isfinite(metric.computed_class_scatter)
            nonfinite = ((counts > 0) & ~finite).sum().to(means.dtype)
            self.record(step, Figures({**metrics, "num_samples": counts.sum(), "nonfinite_classes": nonfinite}))
            self.drain(trainer, step, wait=True)
            self.publish(trainer, step)
            cosines = class_mean_cosines(means, counts, self.global_mean)
            if self.cosine_image and cosines.numel() and has_tensorboard(trainer):
                log_image(trainer, f"{self.family}/class_mean_cosine", cosine_image(cosines), step)
            self._reference = (means, (counts > 0) & finite)
            metric.reset()
        self._weights = None
        self._measured = True
        host = dict(zip(self._host[1], self._host[2].tolist())) if self._host is not None else {}
        present, samples = (
            int(host.get(f"{self.family}/num_classes_present", 0)), host.get(f"{self.family}/num_samples", 0)
        )
        if samples == 0:
            self.warn_once("empty", f"no features were captured for data={self._data_name!r}: does the step run "
                                    "the classifier (or `feature_layer`)?")
        elif present < metric.num_classes:
            self.warn_once("missing", f"only {present} of {metric.num_classes} classes occur in "
                                      f"data={self._data_name!r}; the metrics use the classes present")
        dropped, self._dropped = (0 if self._dropped is None else int(self._dropped)), None  # once per evaluation
        if dropped:
            self.warn_once("labels", f"left out {dropped} label{'s' if dropped > 1 else ''} that "
                                     f"{'are' if dropped > 1 else 'is'} not an integer class index in "
                                     f"[0, {metric.num_classes}) (e.g. 0.5, NaN) in data={self._data_name!r}; the "
                                     "metrics use the other rows. Pass `label_fn` returning class indices, or "
                                     "`ignore_index` for padding")

    # -- checkpoint state -----------------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        if self._reference is None:
            return {"reference_means": None, "reference_present": None}
        return {"reference_means": self._reference[0].cpu(), "reference_present": self._reference[1].cpu()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        means, present = state.get("reference_means"), state.get("reference_present")
        self._reference = None if means is None else (means.clone(), present.clone())
