"""Spectral alignment (SA): how layer inputs line up with the top singular direction of W.

After Qiu, Wu, Tan, Wang and Yao, "Spectral Alignment as Predictor of Loss Explosion" (2025,
arXiv 2510.04202). Only the paper's abstract could be read, so the definition below is *our
reconstruction* (DESIGN.md section 5, ``research/spectral_alignment_and_spikes.md`` section 1):

For a linear layer ``y = W x`` with PyTorch weight ``W`` of shape ``(d_out, d_in)`` and SVD
``W = sum_i s_i u_i v_i^T``, each input row ``x_t`` gets ``SA_t = cos(x_t, v_1)``, with ``v_1`` the
top *right* singular vector (input space). A step changes ``s_1`` by about
``-lr * sum_t (u_1^T delta_t) (v_1^T x_t)``: while the signs of ``SA_t`` are mixed the terms cancel;
when every input falls on one side of ``v_1`` they add up and ``s_1`` grows step after step. So the
warning sign is a collapse of *sign diversity*. ``v_1`` is defined only up to sign, hence the
sign-invariant summaries.

Everything here takes tensors and returns tensors on the same device, never reads a value back to
the host, and computes in float32 at least (bf16/fp16 are upcast; float64 stays float64).

**Sharded weights and rank-local inputs.** :func:`row_sharded_power_iteration` runs the power
iteration on a weight split by rows across ranks (FSDP2 shards dim 0 of ``(d_out, d_in)``) with
one all-reduce per iteration and never gathers the matrix; :func:`alignment_moments` turns each
rank's SA values into sums that add across ranks, and :func:`summary_from_moments` gives the
summary of all ranks' values from their sum. Neither imports ``torch.distributed``: the caller
passes the reduction (``lightning_diag.callbacks._sharding``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from lightning_diag.metrics.stats import EmaBaseline

__all__ = [
    "AlignmentSummary",
    "CollapseBaseline",
    "alignment_histogram",
    "alignment_moments",
    "alignment_summary",
    "power_iteration",
    "row_sharded_power_iteration",
    "spectral_alignment",
    "stable_rank",
    "summary_from_moments",
    "top_singular",
]

# Iterations used when there is no warm start: a random start is far from v_1, and the error
# shrinks by (s_2 / s_1)^2 per iteration only.
_COLD_START_ITERS = 20


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    # float32 at least: bf16 has 8 bits of mantissa, not enough for cosines or for power iteration.
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _normalize(x: Tensor, fallback: Tensor | float) -> Tensor:
    """``x / ||x||`` along the last dim; where ``||x|| == 0``, ``fallback`` instead (no NaN)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), fallback)


def power_iteration(
    weights: Tensor, v0: Tensor | None = None, *, iters: int = 2
) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triplet ``(sigma_1, u_1, v_1)`` of one matrix or a stack of equal-shape ones.

    Power iteration on ``W^T W``, written as alternating products ``u = W v / ||W v||``,
    ``v = W^T u / ||W^T u||`` (normalising both halves keeps huge weights from overflowing).
    ``v_1`` is the top *right* singular vector (input space, length ``d_in``),
    ``sigma_1 = ||W v_1||`` and ``u_1 = W v_1 / sigma_1``, so ``W v_1 = sigma_1 u_1`` holds exactly
    for what is returned. Cost: ``2 * iters + 1`` matrix-vector products per matrix.

    **Warm start.** Weights move little between checks, so passing the previous ``v_1`` as ``v0``
    makes 1-2 iterations enough (the angle error shrinks by ``(s_2 / s_1)^2`` per iteration), and
    ``sigma_1`` is a Rayleigh quotient, whose error is the *square* of the vector error. A warm
    start also keeps the sign of ``v_1`` from one check to the next (``W^T W`` has no negative
    eigenvalue to flip it), so a time series of SA does not jump between mirror images.

    **Near-degenerate top.** When ``s_1 ~ s_2`` the iterate converges to *some* unit vector of the
    top singular subspace, not to ``v_1`` (which is then ill-defined anyway), and it can swap
    direction after a large weight change. What still holds is that ``sigma_1`` is within the gap
    of ``s_1`` (it is a lower bound that converges to it). A caller that sees ``sigma_1`` jump
    between checks should re-run with more iterations (e.g. ``iters=20``).

    Args:
        weights: ``(d_out, d_in)`` or ``(B, d_out, d_in)``; any float dtype, computed in float32
            at least. Detached: no autograd graph is built.
        v0: start vector, ``(d_in,)`` or ``(B, d_in)``, nonzero, need not be normalised
            (typically the ``v_1`` returned by the previous check). ``None``: a fixed-seed
            Gaussian vector drawn from a private ``torch.Generator`` (no effect on the global
            RNG), and at least 20 iterations.
        iters: number of iterations (>= 0; 0 only evaluates ``sigma_1`` at ``v0``).

    Returns:
        ``(sigma_1, u_1, v_1)`` of shapes ``()``, ``(d_out,)``, ``(d_in,)``, or with a leading
        ``B``, in the compute dtype. A zero matrix gives ``sigma_1 = 0``, ``u_1 = 0`` and ``v_1``
        equal to the (normalised) start vector, never NaN; non-finite weights give a NaN
        ``sigma_1``.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 1.0]))
        >>> sigma, u, v = power_iteration(w)
        >>> round(float(sigma), 4), v.abs().round(decimals=4).tolist()
        (3.0, [1.0, 0.0])
        >>> sigma, u, v = power_iteration(1.01 * w, v0=v, iters=1)  # next check: warm start
        >>> round(float(sigma), 4)
        3.03
    """
    if weights.ndim not in (2, 3):
        raise ValueError(
            f"`weights` must be (d_out, d_in) or (B, d_out, d_in), got shape {tuple(weights.shape)}"
        )
    if iters < 0:
        raise ValueError(f"`iters` must be >= 0, got {iters}")
    single = weights.ndim == 2
    w = weights.detach().to(_compute_dtype(weights))
    if single:
        w = w.unsqueeze(0)
    v, iters = _start_vector(w, v0, iters, single)

    for _ in range(iters):
        u = _normalize(torch.bmm(w, v.unsqueeze(-1)).squeeze(-1), 0.0)
        # W^T u == 0 only for a zero matrix (or v in its null space): keep v rather than divide.
        v = _normalize(torch.bmm(w.mT, u.unsqueeze(-1)).squeeze(-1), v)

    wv = torch.bmm(w, v.unsqueeze(-1)).squeeze(-1)
    sigma = torch.linalg.vector_norm(wv, dim=-1)
    u = _normalize(wv, 0.0)
    if single:
        return sigma[0], u[0], v[0]
    return sigma, u, v


def row_sharded_power_iteration(
    local_rows: Tensor,
    v0: Tensor | None = None,
    *,
    iters: int = 2,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`power_iteration` on a weight whose rows are split across ranks, without gathering it.

    With ``W = [W_1; ...; W_r]`` (each rank ``i`` holds the rows ``W_i``, in any order), every
    iteration computes ``u_i = W_i v`` locally and ``v <- normalise(sum_i W_i^T u_i)``, which is
    ``normalise(W^T W v)``: the same iterate as :func:`power_iteration` (whose normalisation of
    ``u`` in between is a positive scalar that the normalisation of ``v`` absorbs). One
    all-reduce of a ``(B, d_in)`` tensor per iteration, then one of ``(B,)`` for
    ``sigma_1 = sqrt(sum_i ||W_i v||^2)``: ``iters + 1`` in all, each a few floats per layer.
    Every rank returns the same ``sigma_1`` and ``v_1`` and its own rows of ``u_1``.

    Every rank must call it with the same ``B``, ``d_in``, ``iters``, dtype and warm start (the
    cold start is a fixed-seed vector, the same on every rank), since each call is a collective.
    A rank that holds no row passes ``(B, 0, d_in)``; a rank whose rows are replicas of rows held
    elsewhere (HSDP) must pass no row either, or the replicas are counted twice. Without the
    normalisation of ``u``, ``W^T W v`` overflows float32 once ``sigma_1 > ~1.8e19``.

    Args:
        local_rows: this rank's rows, ``(d_out_i, d_in)`` or ``(B, d_out_i, d_in)`` (``d_out_i``
            may be 0); float32 at least in the computation.
        v0: start vector ``(d_in,)`` or ``(B, d_in)``, identical on every rank (e.g. the previous
            check's ``v_1``); ``None``: the fixed-seed cold start of :func:`power_iteration` and
            at least 20 iterations.
        iters: number of iterations (>= 0).
        all_reduce_sum: ``f(t) -> sum of t over ranks`` (may reduce in place and return ``t``),
            e.g. ``torch.distributed.all_reduce`` wrapped to return its input. ``None``: one rank,
            the result equals :func:`power_iteration`.

    Returns:
        ``(sigma_1, u_1_local, v_1)``: shapes ``()``, ``(d_out_i,)``, ``(d_in,)``, or with a
        leading ``B``. ``u_1_local`` holds this rank's rows of ``u_1 = W v_1 / sigma_1``.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> sigma, u, v = row_sharded_power_iteration(w, iters=20)  # one rank holding every row
        >>> round(float(sigma), 4), v.abs().round(decimals=4).tolist()
        (3.0, [1.0, 0.0, 0.0])
        >>> # under torch.distributed, each rank passes its rows and, e.g.,
        >>> # all_reduce_sum=lambda t: (torch.distributed.all_reduce(t), t)[1]
    """
    if local_rows.ndim not in (2, 3):
        raise ValueError(
            "`local_rows` must be (d_out_i, d_in) or (B, d_out_i, d_in), got shape "
            f"{tuple(local_rows.shape)}"
        )
    if iters < 0:
        raise ValueError(f"`iters` must be >= 0, got {iters}")
    reduce = all_reduce_sum if all_reduce_sum is not None else (lambda t: t)
    single = local_rows.ndim == 2
    w = local_rows.detach().to(_compute_dtype(local_rows))
    if single:
        w = w.unsqueeze(0)
    v, iters = _start_vector(w, v0, iters, single)

    for _ in range(iters):
        u = torch.bmm(w, v.unsqueeze(-1))  # (B, d_out_i, 1): local rows of W v, kept unnormalised
        # W^T W v == 0 only for a zero matrix (or v in its null space): keep v rather than divide.
        v = _normalize(reduce(torch.bmm(w.mT, u).squeeze(-1)), v)

    wv = torch.bmm(w, v.unsqueeze(-1)).squeeze(-1)
    sigma = reduce(wv.square().sum(-1)).sqrt()
    u = torch.where(sigma.unsqueeze(-1) > 0, wv / sigma.clamp_min(torch.finfo(w.dtype).tiny).unsqueeze(-1), 0.0)
    if single:
        return sigma[0], u[0], v[0]
    return sigma, u, v


def top_singular(
    weights: Tensor, v: Tensor | None, *, iters: int, all_reduce_sum: Callable[[Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """The lean warm-started power iteration a monitor runs at every check: ``(sigma_1, v_1)``.

    The iterate of :func:`row_sharded_power_iteration` (``v <- normalise(W^T W v)``, the local rows
    of a row-sharded ``W`` summed with ``all_reduce_sum``), with the vector kept as ``(B, d_in, 1)``
    between calls so that an iteration is 6 kernels: two ``bmm``, a norm, a division, a comparison
    and a ``where`` (a zero or NaN ``W^T W v`` keeps the previous ``v``). Where ``sigma_1`` comes
    out NaN (non-finite weights: an infinite ``W^T W v`` gives ``inf / inf``), the start vector is
    returned: ``v_1`` is never NaN, so it is a usable warm start once the weights are finite again.

    Args:
        weights: ``(B, d_out_i, d_in)`` (this rank's rows), float32 at least.
        v: ``(B, d_in, 1)`` unit start vectors (the previous call's), or ``None`` for the fixed-seed
            cold start of :func:`power_iteration` and at least 20 iterations.
        iters: iterations (>= 0).
        all_reduce_sum: the sum over ranks of row-sharded weights (``None``: one rank).

    Returns:
        ``sigma_1`` ``(B,)`` (NaN for non-finite weights, 0 for zero ones) and ``v_1`` ``(B, d_in, 1)``.

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 1.0])).unsqueeze(0)
        >>> sigma, v = top_singular(w, None, iters=20)
        >>> round(float(sigma[0]), 4), v.squeeze(-1).abs().round(decimals=4).tolist()
        (3.0, [[1.0, 0.0]])
    """
    reduce = all_reduce_sum if all_reduce_sum is not None else (lambda t: t)
    if v is None:
        cold, iters = _start_vector(weights, None, iters, single=False)
        v = cold.unsqueeze(-1)
    start, w_t = v, weights.mT
    for _ in range(iters):
        z = reduce(torch.bmm(w_t, torch.bmm(weights, v)))
        norm = torch.linalg.vector_norm(z, dim=1, keepdim=True)
        v = torch.where(norm > 0, z / norm, v)
    sigma = reduce(torch.bmm(weights, v).square().sum((1, 2))).sqrt()
    # An infinite weight makes W^T W v infinite, its norm inf and z / norm NaN: a NaN v_1 would poison
    # every later warm start (NaN stays NaN), even once the weights are finite again (a rollback). A NaN
    # anywhere in v makes sigma NaN, so sigma tells which vectors to drop (2 kernels, once per call).
    return sigma, torch.where(sigma.isnan().view(-1, 1, 1), start, v)


def _start_vector(w: Tensor, v0: Tensor | None, iters: int, single: bool) -> tuple[Tensor, int]:
    """The normalised start vector ``(B, d_in)`` and the iteration count (>= 20 on a cold start)."""
    batch, _, d_in = w.shape
    if v0 is None:
        # A fixed generator on the weights' device: deterministic (the same on every rank) and
        # no global RNG side effect. (A data-derived start such as the row sum can be 0 or
        # orthogonal to v_1.)
        gen = torch.Generator(device=w.device).manual_seed(0)
        v = torch.randn(batch, d_in, generator=gen, device=w.device, dtype=w.dtype)
        iters = max(iters, _COLD_START_ITERS)
    else:
        expected = (d_in,) if single else (batch, d_in)
        if tuple(v0.shape) != expected:
            raise ValueError(f"`v0` must have shape {expected}, got {tuple(v0.shape)}")
        v = v0.detach().to(device=w.device, dtype=w.dtype).reshape(batch, d_in)
    return _normalize(v, v), iters


def spectral_alignment(inputs: Tensor, v1: Tensor, eps: float = 0.0) -> Tensor:
    """Cosine of each input row with ``v_1``: ``SA_t = v_1^T x_t / (||x_t|| ||v_1||)``.

    Args:
        inputs: ``(N, d_in)`` rows of one layer's input (flatten batch and sequence first:
            ``x.reshape(-1, d_in)``), or ``(B, N, d_in)`` for ``B`` layers of equal input width.
        v1: ``(d_in,)``, or ``(B, d_in)`` with batched inputs; from :func:`power_iteration`.
        eps: rows with ``||x_t|| <= eps`` get ``SA_t = 0`` (zero rows, e.g. padding, always do).

    Returns:
        ``(N,)`` or ``(B, N)`` values in ``[-1, 1]``, float32 at least. Non-finite rows give NaN.

    Example:
        >>> spectral_alignment(torch.tensor([[1.0, 1.0], [-2.0, 0.0], [0.0, 0.0]]),
        ...                    torch.tensor([1.0, 0.0]))
        tensor([ 0.7071, -1.0000,  0.0000])
    """
    if inputs.ndim != v1.ndim + 1 or inputs.ndim not in (2, 3) or (
        inputs.shape[:-2] + inputs.shape[-1:] != v1.shape
    ):
        raise ValueError(
            "expected `inputs` (N, d_in) with `v1` (d_in,), or (B, N, d_in) with (B, d_in); got "
            f"{tuple(inputs.shape)} and {tuple(v1.shape)}"
        )
    dtype = _compute_dtype(inputs, v1)
    x = inputs.detach().to(dtype)
    v = v1.detach().to(dtype)
    v = _normalize(v, v)  # a unit v1 makes the projection a cosine
    proj = torch.matmul(x, v.unsqueeze(-1)).squeeze(-1)
    norm = torch.linalg.vector_norm(x, dim=-1)
    cos = proj / norm.clamp_min(torch.finfo(dtype).tiny)
    # Clamp: rounding can give 1 + 1e-7, which a histogram on [-1, 1] would silently drop.
    # `norm <= eps` rather than `norm > eps`: a NaN row stays NaN instead of passing for a zero row.
    return torch.where(norm <= eps, 0.0, cos.clamp(-1.0, 1.0))


class AlignmentSummary(NamedTuple):
    """Per-layer summaries of SA values; each field has the input's leading shape.

    Attributes:
        frac_positive: ``p+``, share of *nonzero* SA values that are positive. The one field
            that is not sign-invariant: flipping ``v_1`` turns it into ``1 - p+``.
        sign_diversity: ``D = 1 - |2 p+ - 1|``; 1 = balanced signs, 0 = all rows on one side.
        collapse: ``|2 p+ - 1| = 1 - D``, the collapse score to alert on.
        mean_abs: mean of ``|SA|`` (how aligned the rows are, whatever the side).
        abs_mean: ``|mean SA|`` (how aligned the *mean* input is).
        std: population standard deviation of SA.
    """

    frac_positive: Tensor
    sign_diversity: Tensor
    collapse: Tensor
    mean_abs: Tensor
    abs_mean: Tensor
    std: Tensor


def alignment_summary(alignment: Tensor) -> AlignmentSummary:
    """Sign-diversity statistics of SA values, reduced over the last dim (Qiu et al. 2025).

    Exact zeros (zero input rows) count as neither side: ``p+ = n_pos / (n_pos + n_neg)``. With no
    nonzero value at all, ``p+``, ``D`` and ``collapse`` are NaN (no sign information; a dead
    layer must not read as perfectly diverse). The magnitude figures use every value, zeros
    included. All fields but ``frac_positive`` are unchanged when ``v_1`` changes sign.

    Args:
        alignment: ``(N,)`` or ``(B, N)`` SA values, as returned by :func:`spectral_alignment`.

    Returns:
        An :class:`AlignmentSummary` of tensors of shape ``()`` or ``(B,)``; ``._asdict()`` gives
        a dict for logging.

    Example:
        >>> s = alignment_summary(torch.tensor([0.5, 0.25, -0.5, 0.0]))
        >>> round(float(s.frac_positive), 4), round(float(s.sign_diversity), 4)
        (0.6667, 0.6667)
    """
    a = alignment.detach().to(_compute_dtype(alignment))
    n_pos = (a > 0).sum(-1).to(a.dtype)
    n_neg = (a < 0).sum(-1).to(a.dtype)
    frac_positive = n_pos / (n_pos + n_neg)  # 0 / 0 = NaN when there is no sign at all
    # |2 p+ - 1| written as a symmetric count ratio, so a sign flip of v_1 (n_pos <-> n_neg)
    # gives bit-identical figures instead of ones equal up to rounding.
    collapse = (n_pos - n_neg).abs() / (n_pos + n_neg)
    return AlignmentSummary(
        frac_positive=frac_positive,
        sign_diversity=1 - collapse,
        collapse=collapse,
        mean_abs=a.abs().mean(-1),
        # The mean of SA flips sign with v_1; its absolute value does not.
        abs_mean=a.mean(-1).abs(),
        std=a.std(-1, correction=0),
    )


def alignment_moments(alignment: Tensor) -> Tensor:
    """Sums of SA values that add across ranks: ``(n_pos, n_neg, n, sum, sum_abs, sum_sq)``.

    Under data parallelism each rank samples its own input rows; the summary of all ranks' rows
    is :func:`summary_from_moments` of the *sum* of every rank's moments (one SUM all-reduce of
    ``6 * B`` numbers), equal to :func:`alignment_summary` of the concatenated values. Computed
    in float64, so that the variance ``sum_sq / n - mean^2`` keeps its digits.

    Args:
        alignment: ``(N,)`` or ``(B, N)`` SA values (``N`` may be 0).

    Returns:
        ``(6,)`` or ``(B, 6)`` float64: counts of positive, negative and all values, then the sums
        of the values, of their absolute values and of their squares. A non-finite value makes
        the last three non-finite (it counts in ``n`` and in no sign).

    Example:
        >>> a = torch.tensor([0.5, 0.25, -0.5, 0.0])
        >>> parts = alignment_moments(a[:1]) + alignment_moments(a[1:])  # two ranks
        >>> torch.equal(parts, alignment_moments(a))
        True
        >>> round(float(summary_from_moments(parts).sign_diversity), 4)
        0.6667
    """
    a = alignment.detach().to(torch.float64)
    n = torch.full(a.shape[:-1], a.shape[-1], dtype=torch.float64, device=a.device)
    return torch.stack(
        [(a > 0).sum(-1).double(), (a < 0).sum(-1).double(), n, a.sum(-1), a.abs().sum(-1), a.square().sum(-1)],
        dim=-1,
    )


def summary_from_moments(moments: Tensor) -> AlignmentSummary:
    """:class:`AlignmentSummary` from (summed) :func:`alignment_moments`, same conventions.

    ``frac_positive``, ``sign_diversity`` and ``collapse`` are NaN without any nonzero value;
    the magnitude figures are NaN when ``n == 0``. Fields are float64.

    Args:
        moments: ``(6,)`` or ``(B, 6)``, e.g. the sum over ranks of :func:`alignment_moments`.

    Example:
        >>> s = summary_from_moments(alignment_moments(torch.tensor([1.0, -1.0, 1.0, -1.0])))
        >>> float(s.collapse), float(s.std)
        (0.0, 1.0)
    """
    if moments.shape[-1:] != (6,) or moments.ndim not in (1, 2):
        raise ValueError(f"`moments` must be (6,) or (B, 6), got shape {tuple(moments.shape)}")
    n_pos, n_neg, n, total, total_abs, total_sq = moments.to(torch.float64).unbind(-1)
    collapse = (n_pos - n_neg).abs() / (n_pos + n_neg)  # 0 / 0 = NaN when there is no sign at all
    mean = total / n
    return AlignmentSummary(
        frac_positive=n_pos / (n_pos + n_neg),
        sign_diversity=1 - collapse,
        collapse=collapse,
        mean_abs=total_abs / n,
        abs_mean=mean.abs(),
        # Rounding can take E[x^2] - E[x]^2 a hair below 0 when all values are equal.
        std=(total_sq / n - mean.square()).clamp_min(0).sqrt(),
    )


def stable_rank(weights: Tensor, sigma1: Tensor, *, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Stable rank ``||W||_F^2 / s_1^2`` (between 1 and rank(W); MSign, arXiv 2602.01734).

    A drop towards 1 means one direction dominates W, the same pathology SA looks for. With
    ``sigma1`` from :func:`power_iteration` (a lower bound of ``s_1``), the result is an upper
    bound that is exact once the iteration has converged.

    Args:
        weights: ``(d_out, d_in)`` or ``(B, d_out, d_in)`` (this rank's rows, with ``all_reduce_sum``).
        sigma1: ``()`` or ``(B,)`` top singular values.
        all_reduce_sum: the sum over ranks, for row-sharded weights (``None``: one rank).

    Returns:
        ``()`` or ``(B,)``, float32 at least; 0 for a zero matrix (``sigma1 == 0``), NaN for a
        non-finite ``sigma1`` (a broken weight never gets a healthy-looking rank).

    Example:
        >>> w = torch.diag(torch.tensor([2.0, 1.0]))
        >>> stable_rank(w, power_iteration(w)[0])
        tensor(1.2500)
    """
    if weights.ndim not in (2, 3) or sigma1.shape != weights.shape[:-2]:
        raise ValueError(
            "expected `weights` (d_out, d_in) with `sigma1` (), or (B, d_out, d_in) with (B,); "
            f"got {tuple(weights.shape)} and {tuple(sigma1.shape)}"
        )
    dtype = _compute_dtype(weights, sigma1)
    frob_sq = weights.detach().to(dtype).square().sum((-2, -1))
    if all_reduce_sum is not None:  # row-sharded weights: the squares of every rank's rows
        frob_sq = all_reduce_sum(frob_sq)
    s_sq = sigma1.detach().to(dtype).square()
    ratio = torch.where(s_sq > 0, frob_sq / s_sq.clamp_min(torch.finfo(dtype).tiny), 0.0)
    return torch.where(torch.isfinite(s_sq) & torch.isfinite(frob_sq), ratio, float("nan"))


def alignment_histogram(alignment: Tensor, bins: int = 20) -> Tensor:
    """Counts of SA values in ``bins`` equal bins on ``[-1, 1]``, reduced over the last dim.

    Bins are half-open ``[a, b)`` except the last, which includes 1 (as ``numpy.histogram``).
    Non-finite values are not counted. Flipping the sign of ``v_1`` mirrors the histogram
    (``counts.flip(-1)``), up to values lying exactly on a bin edge.

    Args:
        alignment: ``(N,)`` or ``(B, N)`` SA values.
        bins: number of bins (>= 1).

    Returns:
        ``(bins,)`` or ``(B, bins)`` int64 counts.

    Example:
        >>> alignment_histogram(torch.tensor([-1.0, -0.2, 0.1, 0.3, 1.0]), bins=4)
        tensor([1, 1, 2, 1])
    """
    if bins < 1:
        raise ValueError(f"`bins` must be >= 1, got {bins}")
    a = alignment.detach().to(_compute_dtype(alignment))
    finite = torch.isfinite(a)
    # Bucket index by arithmetic rather than torch.histc, which has no batch dimension.
    idx = ((a.clamp(-1.0, 1.0) + 1) * (bins / 2)).floor().clamp(0, bins - 1)
    idx = torch.where(finite, idx, 0).long()  # NaN -> bin 0, but with weight 0 below
    counts = torch.zeros(*a.shape[:-1], bins, dtype=torch.long, device=a.device)
    return counts.scatter_add_(-1, idx, finite.long())


class CollapseBaseline:
    """Per-layer baselines of the collapse ``c = 1 - D`` and the layers past them (host, float64).

    A layer is *flagged* at a check when ``c >= threshold`` and, with ``rise``, ``c >= baseline +
    rise``, its baseline being an :class:`~lightning_diag.metrics.stats.EmaBaseline` of its own
    finite checks that were not flagged (exact mean over the first ``warmup`` of them, then EMA
    ``alpha``). Layers whose inputs are one-sided by construction (after a LayerNorm or a ReLU,
    ``c ~ 1`` in healthy runs) therefore never flag; ``rise=None`` is the absolute rule alone. NaN
    never flags and is never absorbed. Layers are tracked by name, so a layer missing from a check
    keeps its baseline.

    Example:
        >>> cb = CollapseBaseline(threshold=0.9, rise=0.4, warmup=2)
        >>> [cb.update(["fc"], np.array([c])).tolist() for c in (0.1, 0.2, 0.95)]
        [[False], [False], [True]]
    """

    def __init__(
        self, threshold: float = 0.9, rise: float | None = 0.4, *, alpha: float = 0.95, warmup: int = 5
    ) -> None:
        self.threshold, self.rise = threshold, rise
        self.baseline = EmaBaseline(0, alpha=alpha, warmup=warmup)
        self.layers: list[str] = []

    def update(self, layers: list[str] | tuple[str, ...], collapse: np.ndarray, absorb: bool = True) -> np.ndarray:
        """Flags of ``layers`` for this check's ``collapse``; absorbs the unflagged finite ones if ``absorb``."""
        self.layers += [name for name in layers if name not in self.layers]
        self.baseline.grow(len(self.layers))
        index = np.array([self.layers.index(name) for name in layers], dtype=np.int64)
        c = np.asarray(collapse, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            flagged = c >= self.threshold
            if self.rise is not None:
                base = self.baseline
                flagged &= base.ready[index] & (c >= base.mean[index] + self.rise)
        if absorb:
            full = np.full(len(self.layers), np.nan)
            full[index] = np.where(flagged, np.nan, c)
            self.baseline.update(full)
        return flagged

    def state_dict(self) -> dict[str, object]:
        return {"layers": list(self.layers), "baseline": self.baseline.state_dict()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.layers = list(state["layers"])  # type: ignore[call-overload]
        self.baseline.grow(len(self.layers))
        self.baseline.load_state_dict(state["baseline"])  # type: ignore[arg-type]
