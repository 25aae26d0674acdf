"""Neural collapse metrics from streaming per-class statistics.

Notation (Papyan, Han & Donoho 2020, "Prevalence of neural collapse during the terminal phase of
deep learning training", PNAS): features ``h`` are the input of the last linear layer ``W h + b``
(``W`` is ``K x d`` with rows ``w_c``); ``mu_c`` are the class means, ``mu_G`` the global mean
(the mean of the class means by default, as in Papyan; the sample mean on request), ``M`` the
``K x d`` matrix of centred means ``mu_c - mu_G`` and::

    Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T      Sigma_B = M^T M / K

Only the ``K`` classes that occur in the data count: an absent class has no mean, so ``K`` is
the number of classes present everywhere below (reported as ``num_classes_present``) and only
their rows of ``W`` and ``b`` are used, except in NC4 where the network's decision is the argmax
over *all* its outputs (that is what the network predicts).

Metrics (keys of :meth:`CollapseAccumulator.compute` and :func:`neural_collapse_metrics`):

- ``nc1`` = Tr(Sigma_W Sigma_B^+) / K, computed from the thin SVD ``M = U diag(s) V^T``:
  Sigma_B = V diag(s^2 / K) V^T, so Sigma_B^+ = V diag(K / s^2) V^T and the ``/K`` cancels::

      nc1 = sum_i (v_i^T Sigma_W v_i) / s_i^2

  over at most ``K - 1`` singular values with ``s_i > max(K, d) * eps * max(s_1, max_c ||mu_c||)``
  (``eps`` of the state dtype). The cap at ``K - 1`` drops the direction that rounding (class
  mean) or class imbalance (sample mean) adds to the rank-``K - 1`` span of an ideal collapse; the
  ``max_c ||mu_c||`` term is there because the means are stored uncentred, so their rounding error
  scales with their magnitude, not their spread. No ``d x d`` pseudo-inverse is ever formed (a
  float32 ``pinv`` of Sigma_B can return NC1 = -1e4 where the truth is 2e-7). NaN if no singular
  value passes (all class means coincide). Many notebooks log ``K * nc1`` (no ``/K``).
- ``nc2_equinorm_means``, ``nc2_equinorm_weights``: std/mean of ``||mu_c - mu_G||`` and of
  ``||w_c||`` (std with Bessel's correction, as ``torch.std``).
- ``nc2_equiangular``: std over ``c != c'`` of ``cos(mu_c - mu_G, mu_c' - mu_G)``;
  ``nc2_maxangle``: mean over ``c != c'`` of ``|cos + 1/(K-1)|``. The same for the rows of ``W``
  under ``nc2_equiangular_weights`` and ``nc2_maxangle_weights``.
- ``nc3`` = ``|| W / ||W||_F - M / ||M||_F ||_F^2`` (squared, as Papyan).
- ``nc4``: fraction of samples where ``argmax_c (W h + b)_c != argmin_c ||h - mu_c||`` (bias
  included). See :class:`CollapseAccumulator` for why the streaming value is lagged.
- ``cdnv`` (Galanti, Gyorgy & Hutter 2022, "On the role of neural collapse in transfer
  learning"): mean over ``c != c'`` of ``(s_c^2 + s_c'^2) / (2 ||mu_c - mu_c'||^2)`` with
  ``s_c^2`` the mean squared distance of class ``c`` to its mean.
- ``trace_ratio`` = Tr Sigma_W / Tr Sigma_B (Tirer et al. 2023's quotient).
- ``bias_collapse`` = ``||W mu_G + b||`` (what Zhu et al. 2021 plot as their "NC4").
- ``num_classes_present``: ``K``.

Non-finite features make every metric that depends on them NaN (the state is poisoned until
``reset``), NC4 included (a NaN row has no nearest mean and no decision, so it is not counted as
agreeing); nothing raises. The weight-only metrics stay finite. Rows with a negative label
(PyTorch's ``ignore_index=-100``, padding tokens) are left out of every statistic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_diag._checks import check_int

__all__ = [
    "FULL_COVARIANCE_MAX_DIM",
    "METRIC_KEYS",
    "STATE_DTYPES",
    "CollapseAccumulator",
    "check_state_dtype",
    "nearest_class_center",
    "neural_collapse_metrics",
]

#: Above this feature dimension the ``d x d`` within-class scatter is not kept by default
#: (at d = 4096 it is already 128 MiB in float64).
FULL_COVARIANCE_MAX_DIM = 4096

#: The state dtypes: float64, or float32 where the device is slow at it (every update is centred);
#: float16 and bfloat16 sums lose the statistics, and the SVD of NC1 has no half-precision kernel.
STATE_DTYPES = (torch.float64, torch.float32)

#: Keys of every metrics dict, in a stable order.
METRIC_KEYS = (
    "nc1",
    "nc2_equinorm_means",
    "nc2_equinorm_weights",
    "nc2_equiangular",
    "nc2_maxangle",
    "nc2_equiangular_weights",
    "nc2_maxangle_weights",
    "nc3",
    "nc4",
    "cdnv",
    "trace_ratio",
    "bias_collapse",
    "num_classes_present",
)

# Metrics that depend only on W: they stay finite when the features are not.
_WEIGHT_ONLY = ("nc2_equinorm_weights", "nc2_equiangular_weights", "nc2_maxangle_weights")


class CollapseAccumulator:
    """Streaming, DDP-exact class statistics for neural collapse (NC1-NC4, CDNV).

    State, in ``dtype`` (float64 by default) on ``device``: class counts ``n_c``, running class
    means ``mu_c``, the per-class scalar scatter ``t_c = sum_{i in c} ||h_i - mu_c||^2`` and,
    when ``full_covariance``, the pooled within-class scatter ``S = N Sigma_W`` (``d x d``).

    Each :meth:`update` centres the batch by its *own* class means, adds ``Z^T Z`` to ``S`` and
    merges the batch means into the running ones with Chan et al.'s correction
    ``n_a n_b / (n_a + n_b) delta delta^T``. Every product is of centred numbers, so there is no
    ``sum(h h^T) - n mu mu^T`` cancellation (that textbook form was off by 18% in float32 near
    collapse). Memory ``O(K d + d^2)``; cost per batch one ``B x d x d`` GEMM whatever ``K``.
    :meth:`merge` combines two accumulators of one process with the same correction.

    **Large d.** With ``full_covariance=False`` (the default when ``d > 4096``) ``S`` is not kept
    and ``nc1`` is the trace approximation ``(K - 1) / K * Tr Sigma_W / Tr Sigma_B``. It is exact
    when the centred means form a simplex ETF and Sigma_W lies in their span, an upper bound on
    NC1 for ETF means in general, and ``d / (K - 1)`` times NC1 for ETF means with isotropic
    noise. Compare its curve over training, not its level against the exact NC1.

    **NC4 is lagged.** The nearest-class-centre rule needs the final means, which one streaming
    pass does not have. The accumulator counts disagreements against *reference means* that the
    caller sets with :meth:`set_reference_means` (typically the previous evaluation's means), for
    the batches whose ``logits`` are passed to :meth:`update`. ``compute()["nc4"]`` is NaN while
    no reference is set. For the exact value, run a second pass with the final means as the
    reference, or use :func:`neural_collapse_metrics` on cached features.

    **DDP.** Call :meth:`sync` once, on every rank, after the last update and before
    :meth:`compute` (a single process skips it); afterwards every rank holds the global state
    and further :meth:`update` or :meth:`sync` calls raise until :meth:`reset`. It takes the SUM all-reduce
    as a function, so this module needs no process group; with Lightning::

        acc.sync(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))  # default is "mean"!

    The state must live on the device the collective expects (CUDA for NCCL).

    Args:
        num_classes: number of classifier outputs ``K`` (labels are in ``[0, K)``).
        dim: feature dimension ``d``.
        device: where the state lives (default CPU).
        dtype: state dtype; float64 unless the device is slow at it (float32 is acceptable only
            because every update is centred).
        global_mean: ``"class"``: ``mu_G`` is the mean of the class means (Papyan); ``"sample"``:
            the sample mean (the two agree for balanced classes).
        full_covariance: keep the ``d x d`` scatter for exact NC1; ``None`` keeps it when
            ``dim <= 4096``.

    Example:
        >>> features = torch.tensor([[1.0, 0.0], [1.2, 0.0], [-1.0, 0.0], [-1.2, 0.0]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> weight = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> acc = CollapseAccumulator(num_classes=2, dim=2)
        >>> acc.update(features[:3], labels[:3])
        >>> acc.update(features[3:], labels[3:])
        >>> acc.sync(lambda t: t)  # single process: the identity is the sum over one rank
        >>> round(float(acc.compute(weight)["nc1"]), 6)  # 0.01 / (2 * 1.1 ** 2)
        0.004132
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        global_mean: Literal["class", "sample"] = "class",
        full_covariance: bool | None = None,
    ) -> None:
        check_int("num_classes", num_classes, 1)
        check_int("dim", dim, 1)
        if global_mean not in ("class", "sample"):
            raise ValueError(f"`global_mean` must be 'class' or 'sample', got {global_mean!r}")
        check_state_dtype(dtype)
        if full_covariance is not None and not isinstance(full_covariance, bool):
            raise TypeError(f"`full_covariance` must be a bool or None, got {full_covariance!r}")
        self.num_classes, self.dim, self.dtype, self.global_mean = num_classes, dim, dtype, global_mean
        self.full_covariance = dim <= FULL_COVARIANCE_MAX_DIM if full_covariance is None else full_covariance
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.reference_means: Tensor | None = None
        self.reference_present: Tensor | None = None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget all statistics (the reference means for NC4 are kept)."""
        k, d, kw = self.num_classes, self.dim, {"device": self.device, "dtype": self.dtype}
        # Counts are floats so they travel in the same all-reduce buffer as the sums (exact to 2^53).
        self.counts = torch.zeros(k, **kw)
        self.means = torch.zeros(k, d, **kw)
        self.class_scatter = torch.zeros(k, **kw)  # t_c = sum_{i in c} ||h_i - mu_c||^2
        self.within_class_scatter = torch.zeros(d, d, **kw) if self.full_covariance else None  # S
        self.ncc_mismatches = torch.zeros((), **kw)
        self.ncc_seen = torch.zeros((), **kw)
        self.synced = False

    def to(self, device: torch.device | str) -> CollapseAccumulator:
        """Move the state (and the reference means) to ``device``; returns ``self``."""
        self.device = torch.device(device)
        for name in ("counts", "means", "class_scatter", "within_class_scatter", "ncc_mismatches",
                     "ncc_seen", "reference_means", "reference_present"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(self.device))
        return self

    def set_reference_means(self, means: Tensor | None, present: Tensor | None = None) -> None:
        """Set (or clear with ``None``) the class means that lagged NC4 compares against.

        Args:
            means: ``(K, d)`` class means, e.g. ``acc.means`` of the previous evaluation.
            present: ``(K,)`` bool, the classes the nearest-centre rule may choose; by default
                the rows of ``means`` that are finite. Pass ``acc.counts > 0``.
        """
        if means is None:
            self.reference_means = self.reference_present = None
            return
        if means.shape != (self.num_classes, self.dim):
            raise ValueError(f"`means` must have shape {(self.num_classes, self.dim)}, got {tuple(means.shape)}")
        means = means.detach().to(self.device, self.dtype).clone()
        if present is None:
            present = torch.isfinite(means).all(dim=1)
        elif present.shape != (self.num_classes,):
            raise ValueError(f"`present` must have shape {(self.num_classes,)}, got {tuple(present.shape)}")
        self.reference_means = means
        self.reference_present = present.detach().to(self.device, torch.bool).clone()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: statistics, NC4 counters and reference means."""
        state: dict[str, Any] = {
            "num_classes": self.num_classes,
            "dim": self.dim,
            "full_covariance": self.full_covariance,
            "synced": self.synced,
        }
        for name in ("counts", "means", "class_scatter", "within_class_scatter", "ncc_mismatches",
                     "ncc_seen", "reference_means", "reference_present"):
            value = getattr(self, name)
            state[name] = None if value is None else value.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; tensors move to this accumulator's device and dtype."""
        for key in ("num_classes", "dim", "full_covariance"):
            if state[key] != getattr(self, key):
                raise ValueError(f"state has {key}={state[key]!r} but this accumulator has {getattr(self, key)!r}")
        for name in ("counts", "means", "class_scatter", "within_class_scatter", "ncc_mismatches", "ncc_seen"):
            value = state[name]
            setattr(self, name, None if value is None else value.to(self.device, self.dtype).clone())
        self.set_reference_means(state["reference_means"], state["reference_present"])
        self.synced = bool(state["synced"])

    # ------------------------------------------------------------------ update / merge
    def update(self, features: Tensor, labels: Tensor, logits: Tensor | None = None) -> None:
        """Absorb one batch. No host synchronisation.

        Args:
            features: ``(N, d)`` classifier inputs (cast to the state dtype; under bf16 autocast
                the rounding has already happened and sets a floor on NC1).
            labels: ``(N,)`` integer labels in ``[0, num_classes)``; a row with a negative label
                (PyTorch's ``ignore_index=-100``) is left out, whatever its features hold.
            logits: optional ``(N, K)`` network outputs ``W h + b`` for lagged NC4; ignored while
                no reference means are set. A row with non-finite features or logits makes NC4 NaN.
        """
        if self.synced:
            raise RuntimeError("update() after sync(): the state is already global; call reset() first")
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"`features` must have shape (N, {self.dim}), got {tuple(features.shape)}")
        if labels.shape != features.shape[:1]:
            raise ValueError(f"`labels` must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise TypeError(f"`labels` must be integers, got {labels.dtype}")
        if logits is not None and logits.shape != (features.shape[0], self.num_classes):
            raise ValueError(
                f"`logits` must have shape ({features.shape[0]}, {self.num_classes}), got {tuple(logits.shape)}"
            )
        y = labels.detach().to(self.device, torch.long)
        # Left-out rows (negative labels) get weight 0 and zero features: masks, not indexing, so no sync.
        keep = y >= 0
        y = y.clamp_min(0)
        x = torch.where(keep[:, None], features.detach().to(self.device, self.dtype), 0.0)
        k, kw = self.num_classes, {"device": self.device, "dtype": self.dtype}

        # Batch class counts and means over all K classes (index_add_, not unique: no sync).
        n_batch = torch.zeros(k, **kw).index_add_(0, y, keep.to(self.dtype))
        mean_batch = torch.zeros(k, self.dim, **kw).index_add_(0, y, x) / n_batch.clamp_min(1)[:, None]
        z = torch.where(keep[:, None], x - mean_batch[y], 0.0)
        n_total = self.counts + n_batch
        delta = mean_batch - self.means
        # Chan weight n_a n_b / (n_a + n_b); 0 for classes absent from the batch, so they stay put.
        chan = self.counts * n_batch / n_total.clamp_min(1)
        if self.within_class_scatter is not None:
            # sum_c chan_c delta_c delta_c^T folded into the one GEMM: within a class the rows of z
            # sum to 0, so sum_{i in c} (z_i + a_c)(z_i + a_c)^T = sum z_i z_i^T + n_b a_c a_c^T, and
            # a_c = delta_c sqrt(n_a / n) makes n_b a_c a_c^T the Chan term. Cost: B d^2, not K d^2.
            shift = (delta * (self.counts / n_total.clamp_min(1)).sqrt()[:, None])[y]
            shifted = torch.where(keep[:, None], z + shift, 0.0)
            self.within_class_scatter.addmm_(shifted.T, shifted)
        self.class_scatter += torch.zeros(k, **kw).index_add_(0, y, z.square().sum(1))
        self.class_scatter += chan * delta.square().sum(1)
        self.means += delta * (n_batch / n_total.clamp_min(1))[:, None]
        self.counts = n_total

        if logits is not None and self.reference_means is not None:
            means, present = self.reference_means, self.reference_present
            scores = logits.detach().to(self.device, self.dtype)
            mismatch = (nearest_class_center(x, means, present) != scores.argmax(dim=1)).to(self.dtype)
            # NaN in, NaN out: argmin and argmax of NaN both say 0, which would count as agreement.
            defined = torch.isfinite(x).all(1) & torch.isfinite(scores).all(1)
            # ... and so is a reference without classes, or with a class that has no finite mean.
            defined &= (torch.isfinite(means).all(1) | ~present).all() & present.any()
            mismatch = torch.where(defined, mismatch, float("nan"))
            self.ncc_mismatches += torch.where(keep, mismatch, 0.0).sum()
            self.ncc_seen += keep.sum()

    def merge(self, other: CollapseAccumulator) -> None:
        """Absorb another accumulator's statistics in this process, with Chan's pairwise merge.

        The result is that of passing ``other``'s batches to :meth:`update` here (up to rounding):
        ``mu_c`` is the count-weighted mean, and ``t_c`` and ``S`` gain ``other``'s scatters plus
        ``n_a n_b / (n_a + n_b) delta_c delta_c^T`` (``delta_c`` the difference of the two means).
        The NC4 counters add; the reference means stay this accumulator's. No host sync.
        """
        if self.synced:
            raise RuntimeError("merge() after sync(): the state is already global; call reset() first")
        for key in ("num_classes", "dim", "full_covariance"):
            if getattr(other, key) != getattr(self, key):
                mine, theirs = getattr(self, key), getattr(other, key)
                raise ValueError(f"cannot merge: other has {key}={theirs!r}, this one {mine!r}")
        kw = {"device": self.device, "dtype": self.dtype}
        n_other, means_other = other.counts.to(**kw), other.means.to(**kw)
        n_total = self.counts + n_other
        delta = means_other - self.means
        share = n_other / n_total.clamp_min(1)  # 0 for classes absent from other: they stay put
        chan = self.counts * share  # n_a n_b / (n_a + n_b)
        self.class_scatter = self.class_scatter + other.class_scatter.to(**kw) + chan * delta.square().sum(1)
        if self.within_class_scatter is not None:
            scatter = other.within_class_scatter.to(**kw) + (delta * chan[:, None]).T @ delta
            self.within_class_scatter = self.within_class_scatter + scatter
        self.means = self.means + delta * share[:, None]
        self.counts = n_total
        self.ncc_mismatches = self.ncc_mismatches + other.ncc_mismatches.to(**kw)
        self.ncc_seen = self.ncc_seen + other.ncc_seen.to(**kw)

    def sync(self, all_reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Merge the states of all ranks exactly, with two SUM all-reduces (every rank must call).

        1. Reduce ``(n_c, n_c mu_c)`` (and the NC4 counters): every rank gets the global means.
        2. Each rank adds ``n_c^r (mu_c^r - mu_c)(mu_c^r - mu_c)^T`` (Chan again, centred) to its
           scatters, then ``S`` and ``t_c`` are reduced.

        No ``world x d^2`` all-gather (torchmetrics' default sync would do that).

        Args:
            all_reduce_sum: returns the element-wise sum of its argument over all ranks, e.g.
                ``lambda t: trainer.strategy.reduce(t, reduce_op="sum")``, or
                ``lambda t: (torch.distributed.all_reduce(t), t)[1]``. It may work in place.
        """
        if self.synced:
            raise RuntimeError("sync() called twice: the state is already global; call reset() first")
        k, d = self.num_classes, self.dim
        first = all_reduce_sum(torch.cat([
            self.counts, (self.counts[:, None] * self.means).flatten(),
            self.ncc_mismatches.view(1), self.ncc_seen.view(1),
        ]))
        counts = first[:k]
        means = first[k:k + k * d].view(k, d) / counts.clamp_min(1)[:, None]
        offset = self.means - means  # this rank's means around the global ones
        weighted = offset * self.counts[:, None]
        parts = [self.class_scatter + (weighted * offset).sum(1)]
        if self.within_class_scatter is not None:
            parts.append((self.within_class_scatter + weighted.T @ offset).flatten())
        second = all_reduce_sum(torch.cat(parts))
        self.counts, self.means = counts.clone(), means.clone()
        self.ncc_mismatches, self.ncc_seen = first[-2].clone(), first[-1].clone()
        self.class_scatter = second[:k].clone()
        if self.within_class_scatter is not None:
            self.within_class_scatter = second[k:].view(d, d).clone()
        self.synced = True

    # ------------------------------------------------------------------ compute
    def compute(self, weight: Tensor, bias: Tensor | None = None) -> dict[str, Tensor]:
        """All metrics as 0-d tensors (state dtype, state device); see the module docstring.

        Synchronises with the host (the classes present decide the shapes; the SVD): call it once
        per evaluation, not per step. ``nc4`` is the
        lagged estimate described in the class docstring; ``bias`` only enters ``bias_collapse``
        (the network decision for NC4 came with the ``logits``).

        Args:
            weight: ``(K, d)`` classifier weight.
            bias: optional ``(K,)`` classifier bias.
        """
        return self._compute(weight, bias, within_along=None)

    def _compute(
        self, weight: Tensor, bias: Tensor | None, within_along: Callable[[Tensor], Tensor] | None
    ) -> dict[str, Tensor]:
        """``within_along(vh)`` returns ``v_i^T S v_i`` for the rows of ``vh`` when ``S`` is not kept."""
        k_all, d, kw = self.num_classes, self.dim, {"device": self.device, "dtype": self.dtype}
        if weight.shape != (k_all, d):
            raise ValueError(f"`weight` must have shape {(k_all, d)}, got {tuple(weight.shape)}")
        if bias is not None and bias.shape != (k_all,):
            raise ValueError(f"`bias` must have shape ({k_all},), got {tuple(bias.shape)}")
        nan = torch.full((), float("nan"), **kw)
        present = (self.counts > 0).nonzero().squeeze(1)  # the one sync
        k = present.numel()
        out = dict.fromkeys(METRIC_KEYS, nan)
        out["num_classes_present"] = torch.full((), float(k), **kw)
        out["nc4"] = self.ncc_mismatches / self.ncc_seen  # 0 / 0 = NaN when nothing was counted
        if k < 2:  # no between-class geometry with a single class
            return out

        n, mu, t = self.counts[present], self.means[present], self.class_scatter[present]
        w = weight.detach().to(**kw)[present]
        b = torch.zeros(k, **kw) if bias is None else bias.detach().to(**kw)[present]
        total = n.sum()
        mu_g = mu.mean(0) if self.global_mean == "class" else (n[:, None] * mu).sum(0) / total
        centred = mu - mu_g
        finite = torch.isfinite(mu).all() & torch.isfinite(t).all()
        if self.within_class_scatter is not None:
            finite &= torch.isfinite(self.within_class_scatter).all()

        trace_within, trace_between = t.sum() / total, centred.square().sum() / k
        out["trace_ratio"] = trace_within / trace_between

        # NC1 from the thin SVD of the centred means; zeros stand in for NaN so the SVD cannot fail.
        _, s, vh = torch.linalg.svd(torch.where(finite, centred, 0.0), full_matrices=False)
        scale = torch.maximum(s[0], torch.where(finite, mu, 0.0).norm(dim=1).max())
        rank = torch.arange(s.numel(), device=self.device)
        keep = (s > max(k, d) * torch.finfo(self.dtype).eps * scale) & (rank < k - 1)
        if self.within_class_scatter is not None:
            along = ((vh @ self.within_class_scatter) * vh).sum(1)
        elif within_along is not None:
            along = within_along(vh)
        else:
            along = None
        if along is not None:
            nc1 = torch.where(keep, along / (total * s.square()), 0.0).sum()
            out["nc1"] = torch.where(keep.any(), nc1, nan)
        else:
            out["nc1"] = (k - 1) / k * out["trace_ratio"]

        norms, w_norms = centred.norm(dim=1), w.norm(dim=1)
        out["nc2_equinorm_means"] = norms.std() / norms.mean()
        out["nc2_equinorm_weights"] = w_norms.std() / w_norms.mean()
        out["nc2_equiangular"], out["nc2_maxangle"] = _angle_statistics(centred)
        out["nc2_equiangular_weights"], out["nc2_maxangle_weights"] = _angle_statistics(w)
        out["nc3"] = (w / w.norm() - centred / centred.norm()).square().sum()
        out["bias_collapse"] = (w @ mu_g + b).norm()

        # CDNV: pair distances from the Gram of *centred* means (uncentred Gram cancels badly).
        gram = centred @ centred.T
        sq = gram.diagonal()
        distance2 = sq[:, None] + sq[None, :] - 2 * gram
        variance = t / n
        out["cdnv"] = _off_diagonal((variance[:, None] + variance[None, :]) / (2 * distance2)).mean()

        for key in METRIC_KEYS:
            if key not in _WEIGHT_ONLY and key not in ("nc4", "num_classes_present"):
                out[key] = torch.where(finite, out[key], nan)
        return out


def check_state_dtype(dtype: Any) -> None:
    """Raise a ``ValueError`` unless ``dtype`` is one of :data:`STATE_DTYPES` (float64 or float32).

    Example:
        >>> check_state_dtype(torch.bfloat16)
        Traceback (most recent call last):
        ...
        ValueError: `dtype` must be torch.float64 or torch.float32 (for the sums and NC1's SVD), got torch.bfloat16
    """
    if dtype not in STATE_DTYPES:
        raise ValueError(f"`dtype` must be torch.float64 or torch.float32 (for the sums and NC1's SVD), got {dtype!r}")


def _off_diagonal(matrix: Tensor) -> Tensor:
    """The ``k (k - 1)`` off-diagonal entries of a square matrix, without a boolean mask (no sync)."""
    k = matrix.shape[0]
    return matrix.flatten()[1:].view(k - 1, k + 1)[:, :-1].flatten()


def _angle_statistics(rows: Tensor) -> tuple[Tensor, Tensor]:
    """(std over c != c' of cos, mean over c != c' of |cos + 1/(K-1)|) of the rows."""
    unit = rows / rows.norm(dim=1, keepdim=True)
    cosines = _off_diagonal(unit @ unit.T)
    return cosines.std(), (cosines + 1.0 / (rows.shape[0] - 1)).abs().mean()


def nearest_class_center(features: Tensor, means: Tensor, present: Tensor | None = None) -> Tensor:
    """Index of the nearest class mean for each row: the NCC rule of NC4.

    ``argmin_c ||h - mu_c||^2 = argmin_c ||mu_c - m||^2 - 2 (h - m)^T (mu_c - m)`` with ``m`` the
    mean of the candidate means: centring first keeps the Gram form accurate (``torch.cdist``'s
    matmul mode lost 2% on offset means). Computed in the dtype of ``means``. No sync.

    Args:
        features: ``(N, d)``.
        means: ``(K, d)`` class means.
        present: optional ``(K,)`` bool; only these classes can be chosen (rows of absent classes
            may hold anything, NaN included).

    Example:
        >>> nearest_class_center(torch.tensor([[0.9, 0.0], [-2.0, 0.1]]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        tensor([0, 1])
    """
    if present is None:
        present = torch.ones(means.shape[0], dtype=torch.bool, device=means.device)
    candidates = torch.where(present[:, None], means, 0.0)
    center = candidates.sum(0) / present.sum().clamp_min(1)
    centred = torch.where(present[:, None], means - center, 0.0)
    h = features.detach().to(means.device, means.dtype) - center
    score = centred.square().sum(1)[None, :] - 2 * h @ centred.T
    score = torch.where(present[None, :], score, float("inf"))
    return score.argmin(dim=1)


def neural_collapse_metrics(
    features: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    num_classes: int | None = None,
    *,
    global_mean: Literal["class", "sample"] = "class",
    full_covariance: bool | None = None,
) -> dict[str, float]:
    """Neural collapse metrics of one set of features, exactly (NC4 with the final means).

    Runs :class:`CollapseAccumulator` on the whole set (so the streaming and one-shot numbers
    agree), then computes NC4 against the final class means and the network decision
    ``argmax(features @ weight.T + bias)``, in float64. When the ``d x d`` scatter is not kept
    (``d > 4096`` by default), NC1 is still exact: ``v_i^T S v_i`` is summed from the centred
    features projected on the ``<= K - 1`` mean directions. Definitions, references and the NaN
    behaviour are in the module docstring.

    Args:
        features: ``(N, d)`` classifier inputs.
        labels: ``(N,)`` integer labels in ``[0, K)``.
        weight: ``(K, d)`` classifier weight.
        bias: optional ``(K,)`` classifier bias.
        num_classes: ``K``; defaults to ``weight.shape[0]`` and must equal it.
        global_mean: ``"class"`` (mean of class means, Papyan) or ``"sample"``.
        full_covariance: as in :class:`CollapseAccumulator`.

    Returns:
        ``{key: float}`` for every key of ``METRIC_KEYS``.

    Example:
        >>> features = torch.tensor([[1.0, 0.0], [1.2, 0.0], [-1.0, 0.0], [-1.2, 0.0]])
        >>> weight = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> m = neural_collapse_metrics(features, torch.tensor([0, 0, 1, 1]), weight)
        >>> round(m["nc1"], 6), m["nc4"], m["nc2_maxangle"]
        (0.004132, 0.0, 0.0)
    """
    if features.ndim != 2:
        raise ValueError(f"`features` must have shape (N, d), got {tuple(features.shape)}")
    if weight.ndim != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(f"`weight` must have shape (K, {features.shape[1]}), got {tuple(weight.shape)}")
    if num_classes is not None and num_classes != weight.shape[0]:
        raise ValueError(f"`num_classes`={num_classes} but `weight` has {weight.shape[0]} rows")
    k = weight.shape[0]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"`labels` must be in [0, {k}), got range [{int(labels.min())}, {int(labels.max())}]")
    acc = CollapseAccumulator(
        k, features.shape[1], device=features.device, global_mean=global_mean, full_covariance=full_covariance
    )
    acc.update(features, labels)
    x = features.detach().to(acc.dtype)
    y = labels.to(features.device, torch.long)

    def within_along(vh: Tensor) -> Tensor:  # second pass over the in-memory features
        return ((x - acc.means[y]) @ vh.T).square().sum(0)

    metrics = acc._compute(weight, bias, within_along=within_along)
    w = weight.detach().to(x.device, acc.dtype)
    logits = x @ w.T if bias is None else x @ w.T + bias.detach().to(x.device, acc.dtype)
    mismatch = nearest_class_center(x, acc.means, acc.counts > 0) != logits.argmax(dim=1)
    nc4 = mismatch.to(acc.dtype).mean()  # NaN for N = 0
    metrics["nc4"] = torch.where(torch.isfinite(x).all(), nc4, float("nan"))
    return {key: float(value) for key, value in metrics.items()}
