"""Neural collapse as a :class:`torchmetrics.Metric`: a thin shape around
:class:`~lightning_diag.metrics.collapse.CollapseAccumulator` (the math, its formulas and
references are in :mod:`lightning_diag.metrics.collapse`)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from lightning_diag._checks import check_int
from lightning_diag.metrics.collapse import METRIC_KEYS, CollapseAccumulator, check_state_dtype

__all__ = ["CLASSIFIER_KEYS", "NeuralCollapse"]

#: Keys computed from the classifier's weights: absent from ``compute()`` without a classifier.
CLASSIFIER_KEYS = ("nc2_equinorm_weights", "nc2_equiangular_weights", "nc2_maxangle_weights", "nc3", "bias_collapse")

# The accumulator's statistics; they are this metric's torchmetrics states, under the same names.
_STATES = ("counts", "means", "class_scatter", "within_class_scatter", "ncc_mismatches", "ncc_seen")


class NeuralCollapse(Metric):
    """Neural collapse (NC1-NC4, CDNV, trace ratio) of the features fed to a classifier, streamed.

    ``update(features, labels)`` per batch, ``compute()`` returns ``{key: 0-d tensor}`` with the keys
    of :data:`~lightning_diag.metrics.collapse.METRIC_KEYS`, ``reset()`` starts over. With class
    means ``mu_c``, centred means ``M`` (rows ``mu_c - mu_G``) and classifier ``W h + b``:
    ``nc1 = Tr(Sigma_W Sigma_B^+) / K`` (thin SVD of ``M``, no pseudo-inverse), ``nc2_*`` the
    equinorm / equiangular spread of ``M`` and of the rows of ``W``,
    ``nc3 = ||W/||W||_F - M/||M||_F||_F^2``, ``nc4`` the fraction of samples where
    ``argmax(W h + b)`` differs from the nearest class mean, ``cdnv``, ``trace_ratio`` and
    ``bias_collapse = ||W mu_G + b||``; only the classes present count (``num_classes_present``).
    Definitions and references: :mod:`lightning_diag.metrics.collapse`.

    **What is in the dict.** A key is *absent* when it cannot be computed by construction: without
    a ``classifier`` the keys of :data:`CLASSIFIER_KEYS`; ``nc4`` when no sample was compared with
    reference means (no reference yet, or neither ``classifier`` nor ``logits``). A key is *NaN*
    when the data make it undefined (non-finite features, fewer than two classes). So
    ``self.log_dict(metric.compute())`` never logs a NaN that only means "not available".

    **NC4 is lagged** (see :class:`~lightning_diag.metrics.collapse.CollapseAccumulator`): the
    nearest-mean rule needs the final class means, which one streaming pass does not have, so each
    update compares with *reference means*. With ``nc4_reference="previous"`` the (global) class
    means of the last ``compute()`` become the reference at the next ``reset()``: NC4 of epoch
    ``e`` uses the means of epoch ``e - 1`` and is absent at the first evaluation. For the exact
    value, run the same data twice (update, compute, reset, update, compute): the second NC4 uses
    the final means of that data. ``"manual"``: only :meth:`set_reference_means` sets them. The
    network decision is ``logits`` when passed to ``update``, else ``classifier(features)`` in the
    state dtype, with the weights at update time; the other metrics read the weights at compute.

    **DDP.** torchmetrics' default sync would all-gather every state from every rank (``world x
    d^2`` floats per rank for the within-class scatter, 512 MiB at ``d = 4096`` and 4 float64 ranks)
    and then reduce them, and a reduction state by state cannot be right here: means do not add,
    and the sum of the per-rank scatters, each centred on its rank's own class means, misses the
    between-rank term ``sum_r n_c^r (mu_c^r - mu_c)(mu_c^r - mu_c)^T``. This metric overrides
    ``_sync_dist`` with :meth:`CollapseAccumulator.sync`: two in-place SUM all-reduces of
    ``K (d + 1) + 2`` and ``K + d^2`` floats, exact (Chan's merge). torchmetrics' machinery is
    unchanged: ``sync_on_compute`` (all ranks must call ``compute()``), ``sync()``/``unsync()``,
    ``process_group``, ``dist_sync_on_step``; a custom ``dist_sync_fn`` (an all-gather) is summed
    over ranks, exact but at its memory cost. ``merge_state`` and ``forward`` merge states with
    Chan's correction too (:meth:`CollapseAccumulator.merge`).

    **State.** ``counts`` (K), ``means`` (K, d), ``class_scatter`` (K), ``within_class_scatter``
    (d, d; only with ``full_covariance``) and two NC4 counters, in ``dtype`` (float64), updated
    with batch-centred Chan merges (never ``sum(h h^T) - n mu mu^T``). Memory ``O(K d + d^2)``,
    whatever the number of samples, so ``compute_on_cpu`` (which moves list states) has no effect;
    torchmetrics keeps a copy for ``reset`` and another while synced. ``.to(device)`` moves it;
    ``.half()``, ``.to(torch.bfloat16)`` (e.g. Lightning's ``"bf16-true"``) leave its dtype alone;
    only ``set_dtype`` changes it, to float32 or float64 (half precision is refused with a
    ``ValueError``: the sums lose the statistics and NC1's SVD has no such kernel). Not in
    ``state_dict`` unless ``metric.persistent(True)``, which saves the reference means too.

    Args:
        num_classes: number of classifier outputs ``K`` (labels are in ``[0, K)``).
        classifier: the last linear layer (``nn.Linear`` or any object with a ``(K, d)`` ``weight``
            and an optional ``(K,)`` ``bias``), read when needed, never trained nor saved here.
            ``metric.classifier = layer`` replaces it (a ``clone()`` holds a copy: reassign it).
        dim: feature dimension ``d``; defaults to the classifier's, and is required without one.
        nc4_reference: ``"previous"`` (the last compute's means, from the next reset) or
            ``"manual"`` (:meth:`set_reference_means` only).
        global_mean: ``"class"`` (mean of the class means, Papyan) or ``"sample"``.
        full_covariance: keep the ``d x d`` scatter for exact NC1; ``None`` keeps it when ``d <= 4096``
            (above, NC1 is the trace approximation of :class:`CollapseAccumulator`).
        dtype: state dtype: float64, or float32 (acceptable because every update is centred).
        kwargs: torchmetrics' ``Metric`` arguments (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> from torch import nn
        >>> head = nn.Linear(2, 2, bias=False)
        >>> _ = head.weight.data.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        >>> metric = NeuralCollapse(num_classes=2, classifier=head)
        >>> features = torch.tensor([[1.0, 0.0], [1.2, 0.0], [-1.0, 0.0], [-1.2, 0.0]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> metric.update(features[:3], labels[:3])
        >>> metric.update(features[3:], labels[3:])
        >>> result = metric.compute()
        >>> round(float(result["nc1"]), 6), "nc4" in result  # 0.01 / (2 * 1.1 ** 2); NC4 is lagged
        (0.004132, False)
        >>> metric.reset()  # the means of that compute become NC4's reference
        >>> metric.update(features, labels)
        >>> float(metric.compute()["nc4"])
        0.0
    """

    __jit_unused_properties__ = [*Metric.__jit_unused_properties__, "classifier", "reference_means",
                                 "reference_present"]  # fmt: skip

    is_differentiable = False
    higher_is_better = None  # NC1-NC4 fall as collapse proceeds, but the dict also holds counts
    full_state_update = False  # forward merges the batch state into the running one (Chan)

    def __init__(
        self,
        num_classes: int,
        classifier: nn.Module | None = None,
        *,
        dim: int | None = None,
        nc4_reference: Literal["previous", "manual"] = "previous",
        global_mean: Literal["class", "sample"] = "class",
        full_covariance: bool | None = None,
        dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        check_int("num_classes", num_classes, 1)
        check_int("dim", dim, 1, optional=True)
        if nc4_reference not in ("previous", "manual"):
            raise ValueError(f"`nc4_reference` must be 'previous' or 'manual', got {nc4_reference!r}")
        if classifier is not None:
            weight = _check_classifier(classifier, num_classes)
            if dim is not None and dim != weight.shape[1]:
                raise ValueError(f"`dim`={dim} but the classifier's weight has {weight.shape[1]} columns")
            dim = weight.shape[1]
        if dim is None:
            raise ValueError("`dim` is required without a `classifier` (the feature dimension d), got None")
        acc = CollapseAccumulator(
            num_classes, dim, dtype=dtype, global_mean=global_mean, full_covariance=full_covariance
        )
        super().__init__(**kwargs)
        self.num_classes, self.dim, self.nc4_reference = num_classes, dim, nc4_reference
        self.global_mean, self.full_covariance = global_mean, acc.full_covariance
        self.classifier = classifier
        for name in _STATES:
            if getattr(acc, name) is not None:
                # No per-state reduction: _sync_dist and _reduce_states merge the states as a whole.
                self.add_state(name, getattr(acc, name), dist_reduce_fx=None)
                setattr(acc, name, None)
        self._acc = acc  # an empty shell: each call binds the states to it (no copy)
        self._dtype = self.counts.dtype  # `dtype` is the states' (torchmetrics would say float32)
        self._reference: tuple[Tensor, Tensor] | None = None  # NC4 reference means and classes
        #: Global class means, counts and scatters ``t_c = sum_{i in c} ||h_i - mu_c||^2`` at the
        #: last ``compute()`` (after the DDP sync), or None. A class with a finite mean can still
        #: have an infinite scatter (squares that overflow the state dtype).
        self.computed_means: Tensor | None = None
        self.computed_counts: Tensor | None = None
        self.computed_class_scatter: Tensor | None = None
        self._new_reference = False  # a compute happened since the last reset
        self._in_forward = False

    # ------------------------------------------------------------------ classifier, reference
    @property
    def classifier(self) -> nn.Module | None:
        """The classifier whose weights NC2 (weights), NC3, NC4 and ``bias_collapse`` read."""
        return self._classifier[0]

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "classifier":  # held in a tuple: not a submodule (not moved, saved or trained here)
            if value is not None:
                _check_classifier(value, self.num_classes, self.dim)
            name, value = "_classifier", (value,)
        super().__setattr__(name, value)

    @property
    def reference_means(self) -> Tensor | None:
        """The ``(K, d)`` class means NC4 compares with (rows of absent classes are meaningless)."""
        return None if self._reference is None else self._reference[0]

    @property
    def reference_present(self) -> Tensor | None:
        """The ``(K,)`` bool mask of the reference classes the nearest-mean rule may choose."""
        return None if self._reference is None else self._reference[1]

    def set_reference_means(self, means: Tensor | None, present: Tensor | None = None) -> None:
        """Set (or clear with ``None``) the class means that NC4 compares with, from the next update.

        Args:
            means: ``(K, d)`` class means, e.g. :attr:`computed_means` of an earlier evaluation.
            present: ``(K,)`` bool, the classes the nearest-mean rule may choose; by default the
                finite rows of ``means``. Pass ``computed_counts > 0``.
        """
        with self._accumulator() as acc:
            acc.set_reference_means(means, present)

    # ------------------------------------------------------------------ torchmetrics API
    def update(self, features: Tensor, labels: Tensor, logits: Tensor | None = None) -> None:
        """Absorb one batch. No host synchronisation.

        Args:
            features: ``(N, d)`` classifier inputs (accumulated in the state dtype).
            labels: ``(N,)`` integer labels in ``[0, K)``; rows with a negative label (PyTorch's
                ``ignore_index=-100``) are left out.
            logits: optional ``(N, K)`` network outputs for NC4; by default ``classifier(features)``.
        """
        if self._is_synced:
            raise TorchMetricsUserError("update() while the state is synced: call unsync() first")
        with self._accumulator() as acc:
            if (logits is None and acc.reference_means is not None and self.classifier is not None
                    and features.ndim == 2 and features.shape[1] == self.dim):  # else acc.update says why
                weight, bias = self._classifier_tensors(acc)
                x = features.detach().to(acc.device, acc.dtype)
                logits = x @ weight.T if bias is None else x @ weight.T + bias
            acc.update(features, labels, logits)

    def compute(self) -> dict[str, Tensor]:
        """``{key: 0-d tensor}`` in :data:`METRIC_KEYS` order, without the keys that are unavailable.

        Synchronises with the host (which classes are present, the SVD): call it once per
        evaluation, then ``reset()``. Under DDP it runs on the global state (all ranks must call it).
        """
        with self._accumulator() as acc:
            params = self._classifier_tensors(acc) if self.classifier is not None else None
            placeholder = torch.zeros(self.num_classes, self.dim, device=acc.device, dtype=acc.dtype)
            out = acc.compute(*(params if params is not None else (placeholder, None)))
            counted = bool(acc.ncc_seen > 0)  # host read; this call syncs anyway
        drop = (CLASSIFIER_KEYS if params is None else ()) + (() if counted else ("nc4",))
        if not self._in_forward:  # forward computes on one batch: not an evaluation's means
            self.computed_means, self.computed_counts = self.means.clone(), self.counts.clone()
            self.computed_class_scatter = self.class_scatter.clone()
            self._new_reference = True
        return {key: out[key] for key in METRIC_KEYS if key not in drop}

    def reset(self) -> None:
        """Forget the statistics; with ``nc4_reference="previous"`` the last compute's means become
        NC4's reference (the reference itself survives resets)."""
        if not self._in_forward:
            if self._new_reference and self.nc4_reference == "previous":
                self.set_reference_means(self.computed_means, self.computed_counts > 0)
            self._new_reference = False
        super().reset()

    @torch.jit.unused  # as torchmetrics' own forward: scripting keeps the metric's other methods
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """torchmetrics' forward (accumulate, and return the metrics of this batch alone)."""
        self._in_forward = True  # its internal reset/compute must not touch the NC4 reference
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._in_forward = False

    def _sync_dist(self, dist_sync_fn: Callable | None = None, process_group: Any | None = None) -> None:
        """Replace torchmetrics' all-gather-then-reduce by the accumulator's exact SUM all-reduces."""
        group = process_group or self.process_group
        if dist_sync_fn is None or dist_sync_fn is gather_all_tensors:

            def all_reduce_sum(tensor: Tensor) -> Tensor:
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM, group=group)
                return tensor

        else:  # a user's gather function: sum what it gathers (exact, at its memory cost)

            def all_reduce_sum(tensor: Tensor) -> Tensor:
                return torch.stack(dist_sync_fn(tensor, group=group)).sum(0)

        with self._accumulator() as acc:
            acc.sync(all_reduce_sum)

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        """Merge another state of this metric (``merge_state``, ``forward``) with Chan's correction."""
        for name in self._defaults:
            value = incoming_state.get(name)
            if not isinstance(value, Tensor) or value.shape != getattr(self, name).shape:
                shape = tuple(getattr(self, name).shape)
                raise ValueError(f"incoming state {name!r} must be a tensor of shape {shape}, got {value!r}")
        other = copy.copy(self._acc)
        for name in _STATES:
            setattr(other, name, incoming_state[name] if name in self._defaults else None)
        with self._accumulator() as acc:
            acc.merge(other)

    # ------------------------------------------------------------------ device, dtype, state_dict
    def set_dtype(self, dst_type: str | torch.dtype) -> Metric:
        """Change the state dtype, to ``torch.float64`` or ``torch.float32`` only (``ValueError`` otherwise)."""
        dtype = getattr(torch, dst_type.removeprefix("torch."), dst_type) if isinstance(dst_type, str) else dst_type
        check_state_dtype(dtype)
        return super().set_dtype(dtype)

    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> nn.Module:
        """Move the states with the module, but change their dtype only through ``set_dtype``.

        torchmetrics casts states under ``module.to(dtype)`` (Lightning's ``"bf16-true"`` does
        that); these are sums whose float64 is the point, so a cast only moves them.
        """
        this = super()._apply(fn, exclude_state=tuple(self._defaults))

        def move(tensor: Tensor) -> Tensor:
            if self._dtype_convert:
                return fn(tensor)
            probe = fn(torch.zeros((), dtype=tensor.dtype, device=tensor.device))
            return fn(tensor) if probe.dtype == tensor.dtype else tensor.to(probe.device)

        for name in self._defaults:
            if name not in exclude_state:
                self._defaults[name] = move(self._defaults[name])
                setattr(self, name, move(getattr(self, name)))
        if self.computed_means is not None:
            self.computed_means, self.computed_counts = move(self.computed_means), move(self.computed_counts)
            self.computed_class_scatter = move(self.computed_class_scatter)
        if self._reference is not None:
            means = move(self._reference[0])
            self._reference = (means, self._reference[1].to(means.device))
        self._dtype = self.counts.dtype  # the states', whatever `.to(dtype)` asked
        return this

    def state_dict(self, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> dict[str, Any]:
        """torchmetrics' state dict, plus the NC4 reference means when the states are persistent."""
        destination = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self._persistent["counts"] and self._reference is not None:
            destination[prefix + "reference_means"] = self._reference[0].clone()
            destination[prefix + "reference_present"] = self._reference[1].clone()
        return destination

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        means = state_dict.pop(prefix + "reference_means", None)
        present = state_dict.pop(prefix + "reference_present", None)
        if means is not None:
            self.set_reference_means(means, present)
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _accumulator(self) -> Iterator[CollapseAccumulator]:
        """The accumulator over this metric's state tensors (no copy); what it rebinds is stored back."""
        acc = self._acc
        for name in _STATES:
            setattr(acc, name, getattr(self, name) if name in self._defaults else None)
        acc.device, acc.dtype, acc.synced = self.counts.device, self.counts.dtype, False
        acc.reference_means, acc.reference_present = self._reference or (None, None)
        try:
            yield acc
        finally:
            for name in _STATES:
                if name in self._defaults:
                    setattr(self, name, getattr(acc, name))
                setattr(acc, name, None)  # the shell keeps no tensor alive after a reset
            reference = acc.reference_means, acc.reference_present
            self._reference = None if reference[0] is None else reference
            acc.reference_means = acc.reference_present = None

    def _classifier_tensors(self, acc: CollapseAccumulator) -> tuple[Tensor, Tensor | None]:
        weight = self.classifier.weight.detach().to(acc.device, acc.dtype)
        bias = getattr(self.classifier, "bias", None)
        return weight, None if bias is None else bias.detach().to(acc.device, acc.dtype)


def _check_classifier(classifier: Any, num_classes: int, dim: int | None = None) -> Tensor:
    """The classifier's weight, after checking that it is ``(K, d)`` and its bias ``(K,)`` or None."""
    weight = getattr(classifier, "weight", None)
    columns = "d" if dim is None else str(dim)
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[0] != num_classes or (
        dim is not None and weight.shape[1] != dim
    ):
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(
            f"`classifier` must have a weight of shape ({num_classes}, {columns}) (e.g. nn.Linear(d, "
            f"{num_classes})), got {type(classifier).__name__} with weight {got}"
        )
    bias = getattr(classifier, "bias", None)
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (num_classes,)):
        got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"`classifier.bias` must be None or of shape ({num_classes},), got {got}")
    return weight
