"""Sharpness: the top Hessian eigenvalue of the loss, against the optimizer's stability limit.

Gilmer et al. 2021 (arXiv 2110.04369): gradient descent with learning rate ``lr`` is unstable along
a direction of curvature ``lambda`` once ``lr * lambda > 2``; with heavy-ball momentum ``beta`` the
limit is ``2 + 2 beta``. Cohen et al. 2022 (arXiv 2207.14484): for Adam the quantity that settles at
the limit is the *preconditioned* sharpness ``lambda_max(P^-1 H)``, limit
``(2 + 2 beta1) / (1 - beta1)`` (38 for ``beta1 = 0.9``). DESIGN.md section 8.

The pieces, bottom up:

- :class:`HessianVectorProduct`: ``H v`` for a loss closure, by double backward or, where that is
  not implemented (flash attention, ``once_differentiable`` functions), by finite differences of
  gradients. Parameters are perturbed in place and copied back bit for bit.
- :func:`top_eigenvalue`: the largest *algebraic* eigenvalue (not the largest in magnitude), by
  warm-started restarted Lanczos (default) or shifted power iteration.
- :func:`optimizer_stability`: reads an optimizer's ``param_groups`` and state into a
  preconditioner ``P^-1`` and a limit per group.
- :class:`SharpnessEstimator`: the above, check after check, with the warm-start vectors kept.
- :class:`TrainingStateGuard`: what makes a loss recomputation side-effect free (buffers, RNG,
  train/eval flags).

Vectors are flat: one 1-D tensor over all parameters (in their order), float32 at least, on the
parameters' device. Nothing here reads a value back to the host unless ``tol`` is set (documented
where it applies).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from lightning_diag._checks import check_bool, check_int, check_number

__all__ = [
    "EigenEstimate",
    "GroupStability",
    "HessianVectorProduct",
    "SharpnessEstimator",
    "SharpnessResult",
    "TrainingStateGuard",
    "hutchinson_trace",
    "optimizer_stability",
    "random_unit_vector",
    "top_eigenvalue",
]

T = TypeVar("T")

# Substrings of the RuntimeError messages raised when a backward has no derivative of its own:
# "derivative for aten::_scaled_dot_product_flash_attention_backward is not implemented" (pytorch
# #116350), "trying to differentiate twice a function that was marked with @once_differentiable",
# torch.compile's "does not currently support double backward", and its "compiled with non-empty
# donated buffers which requires create_graph=False" (a compiled backward that frees its saved tensors).
_NO_DOUBLE_BACKWARD = ("is not implemented", "differentiate twice", "double backward", "donated buffers")
_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; trace probes add the check count to it


def _compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    # float32 at least: a bf16 power iteration cannot resolve a 1% eigenvalue change.
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _flat(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    # Sparse gradients (nn.Embedding(sparse=True)) come out of autograd.grad as COO tensors: densified,
    # since the vectors are flat over every entry of every parameter anyway.
    return torch.cat([(t.to_dense() if t.layout != torch.strided else t).reshape(-1).to(dtype) for t in tensors])


def _unit(v: Tensor) -> Tensor:
    """``v / ||v||``; a zero vector stays zero (no NaN)."""
    return v / torch.linalg.vector_norm(v).clamp_min(torch.finfo(v.dtype).tiny)


def random_unit_vector(
    n: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Tensor:
    """A Gaussian unit vector of length ``n`` from a private generator (the global RNG is untouched).

    Example:
        >>> v = random_unit_vector(5, seed=1)
        >>> round(float(v.norm()), 6)
        1.0
    """
    check_int("n", n, 1)
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    return _unit(torch.randn(n, generator=gen, device=device, dtype=dtype))


# -- Hessian-vector products ----------------------------------------------------------------------


def _check_hvp_args(method: str, fd_scheme: str, fd_step: float | None) -> None:
    if method not in ("auto", "autograd", "finite_difference"):
        raise ValueError(f"`method` must be 'auto', 'autograd' or 'finite_difference', got {method!r}")
    if fd_scheme not in ("forward", "central"):
        raise ValueError(f"`fd_scheme` must be 'forward' or 'central', got {fd_scheme!r}")
    check_number("fd_step", fd_step, 0.0, 1.0, optional=True)


def _undifferentiable_node(grads: Sequence[Tensor]) -> str | None:
    """Name of the first node of the gradients' graph that cannot be differentiated, if any.

    ``once_differentiable`` backward functions leave an ``Error`` node whose inputs are fake
    leaves: ``autograd.grad(..., inputs=params)`` prunes it instead of raising, and that part of the
    curvature silently comes out as 0. Native kernels without a double backward leave a
    ``NotImplemented`` node (that one raises, but only at the first product). One walk of the
    graph, once per check, finds both.
    """
    seen: set[Any] = set()
    stack = [g.grad_fn for g in grads if g.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ in ("Error", "NotImplemented"):
            return type(node).__name__
        stack.extend(next_node for next_node, _ in node.next_functions)
    return None


class HessianVectorProduct:
    """``H v`` for the Hessian ``H`` of a scalar loss with respect to a list of parameters.

    Methods:

    - ``"autograd"``: one forward and backward with ``create_graph=True`` on the first product,
      then one double backward per product (Pearlmutter's trick; the first-order graph is kept
      between products). Exact up to rounding; keeps the double-backward graph in memory.
    - ``"finite_difference"``: gradients at perturbed parameters, by ``loss_fn`` + ``autograd.grad``
      (``.grad`` is never touched). ``fd_scheme="forward"``: ``(g(theta + e v) - g(theta)) / e``,
      one forward+backward per product plus one for ``g(theta)`` per object; error O(e).
      ``"central"``: ``(g(theta + e v) - g(theta - e v)) / 2e``, two per product; error O(e^2).
      The step ``e`` makes the perturbation a relative change ``r`` of the parameters *where v
      lives*: ``e = r ||s * v|| / ||v * v||`` with ``s = max(|theta|, 0.1 rms(theta))``, so that
      ``e |v_i| ~ r |theta_i|`` on the support of ``v`` (a spread-out ``v`` gets ``e ~ r
      ||theta||``; the floor covers zero-initialised entries). ``r = sqrt(eps)`` (forward) or
      ``eps^(1/3)`` (central), ``eps`` the machine epsilon of the lowest-precision parameter
      dtype: the textbook balance of truncation against rounding error (Nocedal & Wright,
      section 8.1). A global scale ``r ||theta|| / ||v||`` was 10x too large for the top
      eigenvector of the benchmark transformer, which sits on small weights (attention and head,
      not the embeddings): 3% error instead of 0.2%. Measured in float32 against autograd, for a
      random and the top vector: forward 1e-3 and 2e-3, central 2e-4 and 8e-4 relative error on the
      benchmark transformer; 4e-4 and 3e-4, 2e-5 and 1e-5 on the benchmark's 212-parameter MLP. Parameters are saved
      before each perturbation and copied back afterwards (never ``theta + e v - e v``, which
      would drift by rounding), also when
      ``loss_fn`` raises, without bumping their version counters.
    - ``"auto"`` (default): autograd; if the double backward raises a ``RuntimeError`` saying a
      derivative is not implemented (flash/efficient SDPA kernels, pytorch #116350; functions
      marked ``once_differentiable``; ``torch.compile``, whose backward may donate its saved
      tensors), finite differences from then on, with
      the reason in :attr:`fallback_reason`. Other errors propagate.

    ``loss_fn`` must give the same function of the parameters at every call (same batch, same
    dropout masks: see :class:`TrainingStateGuard`); it is called once (autograd) or once per
    gradient (finite differences).

    Two traps of autograd, handled: a ``once_differentiable`` backward leaves a node that
    ``autograd.grad`` prunes instead of raising (the curvature through it would silently be 0), so
    the gradient graph is searched for such nodes once, before the first product, and treated as
    "not implemented"; and when such a backward's incoming gradient does not depend on the
    parameters it returns a plain detached tensor, indistinguishable from a gradient that is
    constant: :attr:`num_detached` counts parameters whose gradient has no graph (0 for a loss
    that depends on every parameter non-linearly), for the caller to report.

    Args:
        loss_fn: closure returning the scalar loss, with a graph to ``params``.
        params: the parameters (tensors with ``requires_grad``) on one device.
        method: ``"auto"``, ``"autograd"`` or ``"finite_difference"``.
        fd_scheme: ``"forward"`` or ``"central"``.
        fd_step: relative step ``r`` overriding the default (e.g. larger under bf16 autocast).
        reduce: applied to every product, e.g. an all-reduce mean over data-parallel ranks so that
            every rank iterates on the Hessian of the global batch.

    Attributes:
        method: the method in use (``"autograd"`` or ``"finite_difference"``).
        fallback_reason: first line of the error that caused the switch to finite differences.
        num_products: products computed so far.
        num_passes: forward+backward evaluations of ``loss_fn`` so far (the cost).

    Example:
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hvp = HessianVectorProduct(lambda: (w ** 3).sum(), [w])  # H = diag(6 w)
        >>> hvp(torch.tensor([1.0, 1.0]))
        tensor([ 6., 12.])
        >>> hvp.method, hvp.num_products
        ('autograd', 1)
    """

    def __init__(
        self,
        loss_fn: Callable[[], Tensor],
        params: Sequence[Tensor],
        *,
        method: str = "auto",
        fd_scheme: str = "forward",
        fd_step: float | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        _check_hvp_args(method, fd_scheme, fd_step)
        self.params = list(params)
        if not self.params:
            raise ValueError("`params` is empty: nothing to differentiate")
        for i, p in enumerate(self.params):
            if not (isinstance(p, Tensor) and p.is_floating_point() and p.requires_grad):
                raise ValueError(f"`params[{i}]` must be a floating-point tensor with requires_grad=True")
            if p.device != self.params[0].device:
                raise ValueError(f"`params` must be on one device, got {self.params[0].device} and {p.device}")
        self.loss_fn, self.fd_scheme, self.reduce = loss_fn, fd_scheme, reduce
        self.dtype = _compute_dtype(self.params)
        self.device = self.params[0].device
        self._numels = [p.numel() for p in self.params]
        self._offsets = [0, *np.cumsum(self._numels).tolist()]
        self.numel = self._offsets[-1]
        eps = max(torch.finfo(p.dtype).eps for p in self.params)
        self.fd_step = fd_step if fd_step is not None else (eps**0.5 if fd_scheme == "forward" else eps ** (1 / 3))
        self.method = "finite_difference" if method == "finite_difference" else "autograd"
        self._may_fall_back = method == "auto"
        self.fallback_reason: str | None = None
        self.num_products = self.num_passes = 0
        self.num_detached = 0
        self._grads: tuple[Tensor, ...] | None = None  # first-order gradients with their graph
        self._base: Tensor | None = None  # g(theta), forward differences only

    def __call__(self, v: Tensor, subset: Sequence[int] | None = None) -> Tensor:
        """``H v`` (or ``H_SS v`` for the diagonal block of the parameters ``subset``, indices into
        ``params``, with ``v`` over those parameters only), flat, in :attr:`dtype`."""
        index = tuple(range(len(self.params))) if subset is None else tuple(subset)
        n = sum(self._numels[i] for i in index)
        if v.shape != (n,):
            raise ValueError(f"`v` must have shape ({n},), got {tuple(v.shape)}")
        v = v.detach().to(device=self.device, dtype=self.dtype)
        if self.method == "autograd":
            try:
                out = self._autograd_product(v, index)
            except RuntimeError as err:
                if not (self._may_fall_back and any(s in str(err) for s in _NO_DOUBLE_BACKWARD)):
                    raise
                self._grads = None  # free the first-order graph
                self.method = "finite_difference"
                self.fallback_reason = str(err).strip().splitlines()[0]
                out = self._finite_difference_product(v, index)
        else:
            out = self._finite_difference_product(v, index)
        self.num_products += 1
        return out if self.reduce is None else self.reduce(out)

    def release(self) -> None:
        """Drop the kept graph and gradients (call when the check is done)."""
        self._grads = self._base = None

    def _views(self, flat: Tensor, index: Sequence[int]) -> list[Tensor]:
        sizes = [self._numels[i] for i in index]
        return [part.view(self.params[i].shape) for i, part in zip(index, flat.split(sizes))]

    def _loss(self) -> Tensor:
        loss = self.loss_fn()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"`loss_fn` must return a scalar tensor, got {loss!r:.80}")
        if not loss.requires_grad:
            raise ValueError("`loss_fn` returned a tensor without a graph (computed under torch.no_grad()?)")
        return loss.reshape(())

    def _autograd_product(self, v: Tensor, index: tuple[int, ...]) -> Tensor:
        if self._grads is None:
            with torch.enable_grad():
                self._grads = torch.autograd.grad(self._loss(), self.params, create_graph=True, materialize_grads=True)
            self.num_passes += 1
            self.num_detached = sum(not g.requires_grad for g in self._grads)
            blocker = _undifferentiable_node(self._grads)
            if blocker is not None:
                raise RuntimeError(f"double backward is not implemented through a {blocker} node of the gradient graph")
        # A gradient without a graph does not depend on the parameters: its Hessian rows are 0.
        pairs = [(self._grads[i], u) for i, u in zip(index, self._views(v, index)) if self._grads[i].requires_grad]
        if not pairs:
            return torch.zeros_like(v)
        hv = torch.autograd.grad(
            [g for g, _ in pairs], [self.params[i] for i in index],
            grad_outputs=[u.to(g.dtype) for g, u in pairs], retain_graph=True, materialize_grads=True,
        )
        return _flat(hv, self.dtype)

    def _gradient(self, index: tuple[int, ...], offset: Tensor | None) -> Tensor:
        """Flat gradient of the loss for ``params[index]`` at ``theta + offset``, restored after."""
        params = [self.params[i] for i in index]
        saved = [p.detach().clone() for p in params] if offset is not None else []
        # Through `.data`: the perturbation is undone bit for bit below, so it must not bump the
        # parameters' version counters, which would break any graph still alive that saved them
        # (the training step's with retain_graph=True, an autograd HessianVectorProduct's).
        try:
            if offset is not None:
                for p, d in zip(params, self._views(offset, index)):
                    p.data.add_(d.to(p.dtype))
            with torch.enable_grad():
                grads = torch.autograd.grad(self._loss(), params, materialize_grads=True)
        finally:
            for p, s in zip(params, saved):
                p.data.copy_(s)  # bit-exact restore, whatever happened in between
        self.num_passes += 1
        return _flat(grads, self.dtype)

    def _step(self, v: Tensor, index: tuple[int, ...]) -> Tensor:
        """``e`` such that ``e |v_i| ~ r |theta_i|`` where ``v`` lives (see the class docstring)."""
        tiny = torch.finfo(self.dtype).tiny
        theta = _flat([self.params[i].detach() for i in index], self.dtype).abs()
        rms = torch.linalg.vector_norm(theta) / math.sqrt(theta.numel())
        scale = torch.maximum(theta, 0.1 * rms)  # floor: zero-initialised entries (biases)
        scale = torch.where(rms > 0, scale, 1.0)  # an all-zero model: absolute steps
        return self.fd_step * torch.linalg.vector_norm(scale * v) / torch.linalg.vector_norm(v * v).clamp_min(tiny)

    def _finite_difference_product(self, v: Tensor, index: tuple[int, ...]) -> Tensor:
        step = self._step(v, index)
        offset = v * step  # a zero v gives a zero offset and a zero product
        if self.fd_scheme == "central":
            return (self._gradient(index, offset) - self._gradient(index, -offset)) / (2 * step)
        if self._base is None:
            self._base = self._gradient(tuple(range(len(self.params))), None)
        base = torch.cat([self._base[self._offsets[i]:self._offsets[i + 1]] for i in index])
        return (self._gradient(index, offset) - base) / step


# -- eigenvalues ----------------------------------------------------------------------------------


class EigenEstimate(NamedTuple):
    """Result of :func:`top_eigenvalue`.

    Attributes:
        eigenvalue: ``()`` the largest Ritz value / Rayleigh quotient met: a lower bound of
            ``lambda_max(A)`` (in exact arithmetic) that converges to it. NaN if a product was
            non-finite.
        vector: ``(n,)`` unit vector to pass as ``v0`` at the next call (warm start).
        shift: ``()`` power iteration's spectral shift (0 unless negative curvature dominated;
            always 0 for Lanczos); pass it back as ``shift`` at the next call.
        relative_change: ``()`` relative change of the estimate over the last step (power: the
            last product; Lanczos: the last restart), NaN after a single one: how settled it is.
        num_products: products computed (a Python int, known without a host read).
    """

    eigenvalue: Tensor
    vector: Tensor
    shift: Tensor
    relative_change: Tensor
    num_products: int


def _top_eigenpair_small(t: Tensor) -> tuple[Tensor, Tensor]:
    """Largest eigenvalue and its unit eigenvector of a small symmetric matrix, without host sync.

    ``torch.linalg.eigh`` checks its LAPACK status on the host (a sync on CUDA). Instead: shift
    by twice a Gershgorin bound ``c`` so that ``T + 2c I`` is positive definite with the wanted
    eigenvalue on top, square it 60 times (power ``2^60``, renormalised each time) and read the
    eigenvector off its largest column. A tie at the top gives a vector of the top eigenspace,
    which has the same eigenvalue.
    """
    # Eigenvalues of t lie in [-c, c]; those of m in [c, 3c]: positive definite (a matrix whose
    # eigenvalues all equal -c would give m = 0 with a shift of c), the top one on top.
    c = t.abs().sum(-1).amax()
    m = t + (2 * c) * torch.eye(t.shape[0], dtype=t.dtype, device=t.device)
    for _ in range(60):
        m = m @ m
        m = m / m.abs().amax().clamp_min(torch.finfo(t.dtype).tiny)
    y = m.index_select(1, torch.linalg.vector_norm(m, dim=0).argmax().reshape(1)).squeeze(1)
    y = _unit(y)
    return y @ t @ y, y


def _lanczos_cycle(matvec: Callable[[Tensor], Tensor], v: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``k`` Lanczos steps from the unit vector ``v``: top Ritz value and Ritz vector.

    Full re-orthogonalisation (classical Gram-Schmidt, twice) instead of the bare three-term
    recurrence: ``k`` is small and rounding would otherwise bring back copies of the top vector.
    A breakdown (an invariant subspace, ``beta ~ 0``) zeroes the later basis vectors, and their
    rows of ``T`` repeat ``alpha_0``, a Rayleigh quotient, so they can never exceed the true top.
    """
    n, dtype = v.shape[0], v.dtype
    basis = torch.zeros(k, n, dtype=dtype, device=v.device)
    basis[0] = v
    alpha = torch.zeros(k, dtype=dtype, device=v.device)
    beta = torch.zeros(max(k - 1, 0), dtype=dtype, device=v.device)
    alive = torch.ones(k, dtype=torch.bool, device=v.device)
    for j in range(k):
        av = matvec(basis[j]).to(dtype)
        coef = basis[: j + 1] @ av
        alpha[j] = coef[j]
        if j == k - 1:
            break
        w = av - basis[: j + 1].T @ coef
        w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = torch.linalg.vector_norm(w)
        ok = alive[j] & (b > 1e-10 * torch.linalg.vector_norm(av)) & torch.isfinite(b)
        alive[j + 1] = ok
        beta[j] = torch.where(ok, b, 0.0)
        basis[j + 1] = torch.where(ok, w / b.clamp_min(torch.finfo(dtype).tiny), 0.0)
    diag = torch.where(alive, alpha, alpha[0])
    t = torch.diag(diag.double()) + torch.diag(beta.double(), 1) + torch.diag(beta.double(), -1)
    theta, y = _top_eigenpair_small(t)
    return theta.to(dtype), _unit(basis.T @ y.to(dtype))


def top_eigenvalue(
    matvec: Callable[[Tensor], Tensor],
    v0: Tensor,
    *,
    iters: int,
    algorithm: str = "lanczos",
    basis: int = 5,
    tol: float | None = None,
    shift: Tensor | float | None = None,
) -> EigenEstimate:
    """Largest (algebraic) eigenvalue of a symmetric operator, warm-startable.

    **Lanczos** (default): restarted Lanczos, ``basis`` products per cycle, each cycle started
    from the previous cycle's top Ritz vector. The top Ritz value is the largest Rayleigh quotient
    over the Krylov space, so it beats power iteration's last Rayleigh quotient (which lies in the
    same space) for the same products, by a wide margin when the top of the spectrum is
    clustered, as in networks (convergence like ``exp(-2 k sqrt(gap))`` against ``(1 - gap)^(2k)``).
    On the benchmark transformer, 4 warm-started products per check on each step's batch were
    within 1% where power iteration was 25-41% low (``benchmarks/sharpness_peer.py``). It finds the
    largest *algebraic* eigenvalue whatever the negative ones do. Memory: ``basis + 2`` vectors.

    **Power** iteration (``algorithm="power"``, memory 3 vectors): converges to the eigenvalue of
    largest *magnitude*, and a Hessian can have a negative eigenvalue larger in magnitude than its
    largest positive one (early in training, near saddles). So it runs on ``A + s I`` with
    ``s = max(0, -min_k rho_k)``, ``rho_k = v_k^T A v_k``: once a Rayleigh quotient comes out
    negative, the spectrum is shifted up by it. Since ``rho >= lambda_min``, ``s <= |lambda_min|``
    never overshoots, and once ``s >= (|lambda_min| - lambda_max) / 2`` the top of the shifted
    spectrum is ``lambda_max + s``. The estimate is the largest *unshifted* Rayleigh quotient met.
    The shift is carried to the next call (``shift``), else a warm vector drifts back to
    ``lambda_min``.

    Either way the estimate is a lower bound of ``lambda_max``: an unconverged one errs low.

    **Warm start.** Pass the returned ``vector`` as ``v0`` at the next check: when the operator
    moved little, a few products are enough.

    **Host syncs.** None with ``tol=None``. With ``tol``, the loop stops once the relative change
    of the estimate is below ``tol`` (power: per product, after two; Lanczos: per cycle), which
    reads one boolean back each time.

    A non-finite product makes the estimate NaN but leaves the vector as it was (selected on
    device), so the next call does not start from NaN.

    Args:
        matvec: ``v -> A v`` on flat vectors (e.g. a :class:`HessianVectorProduct`).
        v0: ``(n,)`` nonzero start vector; normalised here.
        iters: maximum number of products (>= 1).
        algorithm: ``"lanczos"`` or ``"power"``.
        basis: Lanczos products per cycle (>= 1; memory ``basis + 2`` vectors).
        tol: relative tolerance for early stopping, or None for exactly ``iters`` products.
        shift: power iteration's starting shift (the previous call's), default 0.

    Returns:
        An :class:`EigenEstimate`.

    Example:
        >>> a = torch.diag(torch.tensor([1.0, -3.0, 2.0, 0.5]))  # largest magnitude: -3
        >>> round(float(top_eigenvalue(lambda v: a @ v, torch.ones(4), iters=4).eigenvalue), 4)
        2.0
        >>> est = top_eigenvalue(lambda v: a @ v, torch.ones(4), iters=80, algorithm="power")
        >>> round(float(est.eigenvalue), 4), bool(est.shift > 0)  # shifted once rho came out < 0
        (2.0, True)
    """
    check_int("iters", iters, 1)
    check_int("basis", basis, 1)
    if algorithm not in ("lanczos", "power"):
        raise ValueError(f"`algorithm` must be 'lanczos' or 'power', got {algorithm!r}")
    check_number("tol", tol, 0.0, optional=True)
    if v0.ndim != 1:
        raise ValueError(f"`v0` must be a 1-D (flat) vector, got shape {tuple(v0.shape)}")
    v = _unit(v0.detach())
    s = torch.zeros((), dtype=v.dtype, device=v.device)
    if shift is not None and algorithm == "power":
        s = s + (shift.to(v.dtype) if isinstance(shift, Tensor) else shift)  # no host-to-device copy
        s = s.clamp_min(0)
    best = torch.full((), -math.inf, dtype=v.dtype, device=v.device)
    prev = change = torch.full((), math.nan, dtype=v.dtype, device=v.device)
    done = 0
    while done < iters:
        if algorithm == "lanczos":
            k = min(basis, iters - done)
            estimate, w = _lanczos_cycle(matvec, v, k)
            done += k
            keep = ~(torch.isfinite(w).all() & torch.isfinite(estimate) & (torch.linalg.vector_norm(w) > 0))
        else:
            av = matvec(v).to(v.dtype)
            done += 1
            estimate = torch.dot(v, av)
            s_new = torch.maximum(s, -estimate)  # negative curvature in the lead: shift it out
            w = av + s_new * v
            # A non-finite product, or ||w|| == 0 (a zero operator), keeps v and s as they were.
            keep = ~(torch.isfinite(w).all() & (torch.linalg.vector_norm(w) > 0))
            s = torch.where(torch.isfinite(s_new), s_new, s)
        best = torch.maximum(best, estimate)  # NaN propagates
        change = (estimate - prev).abs() / estimate.abs().clamp_min(torch.finfo(v.dtype).tiny)
        prev = estimate
        v = torch.where(keep, v, _unit(w))
        if tol is not None and not change.isnan() and bool(change < tol):  # host read, documented
            break
    return EigenEstimate(best, v, s, change, done)


def hutchinson_trace(
    matvec: Callable[[Tensor], Tensor], n: int, *, probes: int = 1, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32, seed: int = 0,
) -> Tensor:
    """Hutchinson's estimate of ``trace(A)``: the mean of ``z^T A z`` over Rademacher probes ``z``.

    Unbiased; its variance is ``2 sum_{i != j} A_ij^2 / probes``, so a single probe per check is
    noisy and is best smoothed over checks. One product per probe; probes come from a private
    generator (``seed``), the global RNG is untouched.

    Example:
        >>> a = torch.diag(torch.tensor([1.0, 2.0, 3.0]))
        >>> hutchinson_trace(lambda v: a @ v, 3)  # exact for a diagonal matrix
        tensor(6.)
    """
    check_int("n", n, 1)
    check_int("probes", probes, 1)
    gen = torch.Generator(device=device or "cpu").manual_seed(seed)
    total = torch.zeros((), dtype=dtype, device=device)
    for _ in range(probes):
        z = torch.randint(0, 2, (n,), generator=gen, device=device).to(dtype) * 2 - 1
        total = total + torch.dot(z, matvec(z).to(dtype))
    return total / probes


# -- the optimizer's side -------------------------------------------------------------------------


class GroupStability(NamedTuple):
    """What one optimizer parameter group contributes to the stability question.

    For a quadratic model with frozen preconditioner, the update is
    ``theta <- theta - P^-1 (momentum of g)``, stable while ``lambda_max(P^-1 (H + W)) < limit``,
    ``W`` the coupled (L2) weight decay added to the gradient.

    Attributes:
        index: position in ``optimizer.param_groups``.
        name: ``group["name"]`` if the user set a string without ``/``, else ``"group<index>"``.
        kind: ``"sgd"``, ``"sgd_momentum"``, ``"sgd_nesterov"``, ``"adam"`` or ``"unsupported"``.
        limit: the limit on ``lambda_max(P^-1 (H + W))`` (NaN if unsupported).
        lr: the group's learning rate.
        params: the group's parameters (all of them, in group order).
        inverse_preconditioner: ``P^-1`` per parameter: the scalar ``lr`` (SGD) or a tensor
            ``lr / ((1 - beta1^t) (sqrt(v_hat) + eps))`` (Adam); ``0.0`` for a parameter without
            optimizer state (it has never been stepped). None if unavailable.
        weight_decay: coupled weight decay (SGD, Adam; 0 for AdamW, whose decay is decoupled).
        reason: why ``kind`` is ``"unsupported"`` or the preconditioner is None, else None.
    """

    index: int
    name: str
    kind: str
    limit: float
    lr: float | Tensor
    params: list[Tensor]
    inverse_preconditioner: list[Tensor | float] | None
    weight_decay: float
    reason: str | None


def _group_name(group: dict[str, Any], index: int) -> str:
    name = group.get("name")
    return name if isinstance(name, str) and name and "/" not in name else f"group{index}"


def _adam_inverse_preconditioner(
    optimizer: torch.optim.Optimizer, group: dict[str, Any], use_grad: bool
) -> list[Tensor | float] | None:
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    out: list[Tensor | float] = []
    for p in group["params"]:
        state = optimizer.state.get(p, {})
        v = state.get("exp_avg_sq")
        grad = p.grad if use_grad and p.grad is not None and not p.grad.is_sparse else None
        if v is None and grad is None:
            out.append(0.0)  # never stepped and not about to be: Adam does not move it
            continue
        step = state.get("step", 0)
        # A CPU step tensor (Adam's default) is read without a device sync; a device one
        # (capturable/fused) stays on device.
        t: Tensor | float = float(step) if not isinstance(step, Tensor) or step.device.type == "cpu" else step
        dtype = torch.promote_types(torch.float32, p.dtype)
        v = torch.zeros_like(p, dtype=dtype) if v is None else v.detach().to(dtype)
        v_max = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
        if grad is not None:  # the second moment the coming step will divide by
            t = t + 1
            v = beta2 * v + (1 - beta2) * grad.detach().to(dtype).square()
        if v_max is not None:
            v = torch.maximum(v_max.detach().to(dtype), v)
        bias1 = 1 - beta1**t  # the first moment's bias correction scales the step like lr does
        bias2 = 1 - beta2**t
        denom = (v / bias2).sqrt() + eps
        out.append(lr / (bias1 * denom))  # a Python or tensor lr; no host-to-device copy
    return out if any(isinstance(x, Tensor) for x in out) else None


def optimizer_stability(optimizer: torch.optim.Optimizer, *, use_grad: bool = True) -> list[GroupStability]:
    """The stability limit and preconditioner of each parameter group of a ``torch.optim`` optimizer.

    Limits on ``lambda_max(P^-1 (H + W))`` for a quadratic model (derivations: the characteristic
    polynomial of the update on one eigendirection, ``h = P^-1 lambda``):

    - ``SGD``: ``P^-1 = lr``, limit 2 (Gilmer et al. 2021).
    - ``SGD(momentum=beta, dampening=d)`` (heavy ball, PyTorch's form): limit
      ``(2 + 2 beta) / (1 - d)``.
    - ``SGD(momentum=beta, nesterov=True)``: ``z^2 - (1 + beta)(1 - h) z + beta (1 - h)`` has a
      root at -1 for ``h = (2 + 2 beta) / (1 + 2 beta)`` (1.357 for 0.9): the limit. The same
      value appears in Cohen et al. 2021 for Nesterov momentum.
    - ``Adam``/``AdamW``: ``P^-1 = lr / ((1 - beta1^t) (sqrt(v_hat) + eps))``, limit
      ``(2 + 2 beta1) / (1 - beta1)`` (heavy ball with dampening ``beta1``; Cohen et al. 2022).
      ``P`` is the preconditioner *of the coming step* when the gradients are in ``.grad``
      (``use_grad``, e.g. in ``on_before_optimizer_step``): ``v = beta2 exp_avg_sq + (1 - beta2)
      g^2``, ``t = step + 1``, as ``Adam.step`` is about to compute them; else the one of the last
      step taken (``exp_avg_sq``, ``t = step``). The difference matters: a parameter whose
      gradient was 0 so far (an embedding row of an unseen token) has ``exp_avg_sq = 0``, a stale
      ``P^-1 = lr / eps`` (3e4 for lr 3e-4), and the first step that sees it divides by its new
      gradient instead. ``v_hat = v / (1 - beta2^t)``; ``amsgrad`` takes the maximum with
      ``max_exp_avg_sq``. The factor ``1 / (1 - beta1^t)`` is the first moment's bias correction,
      part of Adam's step; it is ~1 after a few dozen steps. AdamW's decoupled decay shrinks the
      weights by ``lr * wd`` per step and is left out (it only helps stability, by ~1e-5).

    Unsupported (``kind="unsupported"``, NaN limit, ``reason`` says why): other optimizers,
    ``maximize=True``, ``dampening=1``. An Adam group with neither state nor gradients (before
    the first backward) is supported but has ``inverse_preconditioner=None`` (``reason`` says so).

    Host syncs: none for hyperparameters stored as Python numbers and CPU step counts.

    Example:
        >>> w = nn.Parameter(torch.ones(2))
        >>> [(g.kind, round(g.limit, 3)) for g in optimizer_stability(torch.optim.SGD([w], lr=0.1, momentum=0.9))]
        [('sgd_momentum', 3.8)]
    """
    groups = []
    for i, group in enumerate(optimizer.param_groups):
        name, params = _group_name(group, i), list(group["params"])
        kind, limit, inv, wd, reason = "unsupported", math.nan, None, 0.0, None
        if group.get("maximize", False):
            reason = "maximize=True (ascent) is not supported"
        elif isinstance(optimizer, torch.optim.SGD):
            beta, damp, wd = group["momentum"], group["dampening"], group["weight_decay"]
            inv = [group["lr"]] * len(params)
            if beta == 0:
                kind, limit = "sgd", 2.0
            elif group["nesterov"]:
                kind, limit = "sgd_nesterov", (2 + 2 * beta) / (1 + 2 * beta)
            elif damp < 1:
                kind, limit = "sgd_momentum", (2 + 2 * beta) / (1 - damp)
            else:
                inv, reason = None, f"dampening={damp} never lets a gradient into the momentum"
        elif isinstance(optimizer, torch.optim.Adam):  # AdamW is a subclass
            beta1 = group["betas"][0]
            kind, limit = "adam", (2 + 2 * beta1) / (1 - beta1)
            decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
            wd = 0.0 if decoupled else group["weight_decay"]
            inv = _adam_inverse_preconditioner(optimizer, group, use_grad)
            if inv is None:
                reason = "no second moment yet (no optimizer state and no gradient)"
        else:
            reason = f"{type(optimizer).__name__} is not supported (SGD, Adam and AdamW are)"
        groups.append(GroupStability(i, name, kind, limit, group["lr"], params, inv, float(wd), reason))
    return groups


# -- check after check ----------------------------------------------------------------------------


@dataclass
class SharpnessResult:
    """Figures of one check, as device tensors, with how they were obtained.

    Attributes:
        figures: ``lambda_max``; with an optimizer ``preconditioned_lambda_max``
            (``lambda_max(P^-1 (H + W))``) and ``stability_ratio`` (that over the limit; 1.0 =
            edge of stability); per group ``lambda_max/<group>``,
            ``preconditioned_lambda_max/<group>``, ``stability_ratio/<group>``; ``trace``
            (Hutchinson) if asked. NaN where ``notes`` says why.
        method: ``"autograd"`` or ``"finite_difference"`` (what ran last).
        fallback_reason: why autograd was abandoned, if it was.
        num_products: Hessian-vector products this check.
        num_passes: forward+backward evaluations of the loss this check.
        notes: figure name -> reason it is NaN or approximate.
    """

    figures: dict[str, Tensor]
    method: str
    fallback_reason: str | None = None
    num_products: int = 0
    num_passes: int = 0
    notes: dict[str, str] = field(default_factory=dict)


class SharpnessEstimator:
    """Warm-started sharpness and stability ratio, one :meth:`estimate` per check.

    Each check runs :func:`top_eigenvalue` (restarted Lanczos by default) on:

    - ``H`` over ``params`` -> ``lambda_max``;
    - ``D (H + W) D`` with ``D = P^-1/2`` from :func:`optimizer_stability`, whose eigenvalues are
      those of ``P^-1 (H + W)`` (a similarity transform) -> ``preconditioned_lambda_max`` and
      ``stability_ratio``. Skipped, at no cost, when ``P^-1 = lr`` is one scalar (single-LR SGD):
      then it is ``lr * (lambda_max + wd)``. Groups with different limits (e.g. different
      momenta) have no joint figure (NaN, noted);
    - with ``per_group`` and more than one group, the diagonal block ``H_gg`` of each group and its
      preconditioned version -> ``.../<group>`` figures. A block's top eigenvalue is at most the
      full one (interlacing): it says which group is closest to its limit.

    Each operator keeps its vector (and power iteration's shift) between checks, and in
    :meth:`state_dict` (on the CPU), so a restored estimator continues alike: ``cold_iters``
    products the first time (or after the parameter count changed), ``iters`` afterwards. With
    ``tol`` set, iterations stop early (host reads). The method sticks: after a fallback to finite
    differences, later checks start with finite differences.

    Args:
        iters: products per operator per warm check.
        cold_iters: products per operator on a cold start.
        algorithm, basis: see :func:`top_eigenvalue`.
        tol: relative tolerance for early stopping (host reads), or None.
        method, fd_scheme, fd_step: see :class:`HessianVectorProduct`.
        per_group: per-group figures; None: only when groups have different learning rates.
        trace_probes: Hutchinson probes per check (0: no ``trace`` figure).
        seed: seed of the cold-start vectors and the probes (private generators), in ``[0, 2**63)``.

    Example:
        >>> w = nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> loss_fn = lambda: 2.0 * w[0] ** 2 + 0.5 * w[1] ** 2  # H = diag(4, 1)
        >>> opt = torch.optim.SGD([w], lr=0.25)
        >>> est = SharpnessEstimator(cold_iters=30)
        >>> r = est.estimate(loss_fn, [w], opt)
        >>> round(float(r.figures["lambda_max"]), 4), round(float(r.figures["stability_ratio"]), 4)
        (4.0, 0.5)
        >>> est.estimate(loss_fn, [w], opt).num_products  # warm: `iters` products
        4
    """

    def __init__(
        self,
        *,
        iters: int = 4,
        cold_iters: int = 20,
        algorithm: str = "lanczos",
        basis: int = 5,
        tol: float | None = None,
        method: str = "auto",
        fd_scheme: str = "forward",
        fd_step: float | None = None,
        per_group: bool | None = None,
        trace_probes: int = 0,
        seed: int = 0,
    ) -> None:
        check_int("iters", iters, 1)
        check_int("cold_iters", cold_iters, 1)
        check_int("basis", basis, 1)
        check_int("trace_probes", trace_probes, 0)
        check_int("seed", seed, 0, maximum=_MAX_SEED)
        if per_group is not None:
            check_bool("per_group", per_group)
        if algorithm not in ("lanczos", "power"):
            raise ValueError(f"`algorithm` must be 'lanczos' or 'power', got {algorithm!r}")
        check_number("tol", tol, 0.0, optional=True)
        _check_hvp_args(method, fd_scheme, fd_step)
        self.iters, self.cold_iters, self.tol = iters, cold_iters, tol
        self.algorithm, self.basis = algorithm, basis
        self.method, self.fd_scheme, self.fd_step = method, fd_scheme, fd_step
        self.per_group, self.trace_probes, self.seed = per_group, trace_probes, seed
        self.fallback_reason: str | None = None
        self._warm: dict[str, tuple[Tensor, Tensor]] = {}  # operator name -> (vector, shift)
        self._checks = 0

    def reset(self) -> None:
        """Forget the warm-start vectors (the next check is a cold start)."""
        self._warm.clear()

    def warm_vector(self, operator: str = "hessian") -> Tensor | None:
        """The unit vector the next check starts from: ``"hessian"``, ``"preconditioned"``,
        ``"block/<group>"`` or ``"preconditioned/<group>"``; None before the first check."""
        return self._warm[operator][0] if operator in self._warm else None

    def state_dict(self) -> dict[str, Any]:
        # The warm-start vectors (model-sized, on the CPU) are checkpointed: a resumed run starts where
        # the uninterrupted one would, not from a cold vector that `iters` products leave far from the top.
        warm = {name: {"vector": v.detach().cpu(), "shift": shift.detach().cpu()} for name, (v, shift) in
                self._warm.items()}  # fmt: skip
        return {"method": self.method, "fallback_reason": self.fallback_reason, "checks": self._checks, "warm": warm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method, self.fallback_reason = state["method"], state["fallback_reason"]
        self._checks = state["checks"]
        # Left on the CPU: the first check moves each to the parameters' device and dtype.
        self._warm = {name: (w["vector"].clone(), w["shift"].clone()) for name, w in state.get("warm", {}).items()}

    def estimate(
        self,
        loss_fn: Callable[[], Tensor],
        params: Sequence[Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> SharpnessResult:
        """Run one check. ``params``: the trainable parameters (others are skipped).

        ``loss_fn`` must be deterministic within the check (wrap it with
        :meth:`TrainingStateGuard.wrap`). ``reduce``: see :class:`HessianVectorProduct`.
        """
        params = [p for p in params if p.requires_grad]
        hvp = HessianVectorProduct(loss_fn, params, method=self.method, fd_scheme=self.fd_scheme,
                                   fd_step=self.fd_step, reduce=reduce)
        figures: dict[str, Tensor] = {}
        notes: dict[str, str] = {}
        nan = torch.full((), math.nan, dtype=hvp.dtype, device=hvp.device)
        try:
            est = self._iterate("hessian", hvp, hvp.numel, hvp)
            figures["lambda_max"] = est.eigenvalue
            if self.trace_probes:
                figures["trace"] = hutchinson_trace(hvp, hvp.numel, probes=self.trace_probes, device=hvp.device,
                                                    dtype=hvp.dtype, seed=self.seed + self._checks)
            if optimizer is not None:
                self._stability(hvp, optimizer, est.eigenvalue, figures, notes, nan)
        finally:
            hvp.release()
        if hvp.fallback_reason is not None:  # sticky: no doomed double backward at every check
            self.method, self.fallback_reason = "finite_difference", hvp.fallback_reason
        self._checks += 1
        return SharpnessResult(figures, hvp.method, self.fallback_reason, hvp.num_products, hvp.num_passes, notes)

    def _iterate(
        self, name: str, matvec: Callable[[Tensor], Tensor], n: int, like: HessianVectorProduct
    ) -> EigenEstimate:
        vector, shift = self._warm.get(name, (None, None))
        if vector is None or vector.shape != (n,):
            # One seed for every operator: reproducible, and the operators differ anyway.
            vector = random_unit_vector(n, device=like.device, dtype=like.dtype, seed=self.seed)
            shift, iters = None, self.cold_iters
        else:
            # A no-op but after a resume (the checkpointed vectors are on the CPU).
            vector, shift = vector.to(like.device, like.dtype), shift.to(like.device, like.dtype)
            iters = self.iters
        est = top_eigenvalue(matvec, vector, iters=iters, algorithm=self.algorithm, basis=self.basis, tol=self.tol,
                             shift=shift)
        self._warm[name] = (est.vector, est.shift)
        return est

    def _stability(self, hvp: HessianVectorProduct, optimizer: torch.optim.Optimizer, lambda_max: Tensor,
                   figures: dict[str, Tensor], notes: dict[str, str], nan: Tensor) -> None:
        position = {id(p): i for i, p in enumerate(hvp.params)}
        groups = [g for g in optimizer_stability(optimizer) if any(id(p) in position for p in g.params)]
        ok = [g for g in groups if g.inverse_preconditioner is not None and not math.isnan(g.limit)]
        for g in groups:
            if g not in ok:
                notes[f"stability_ratio/{g.name}"] = g.reason or "unsupported"

        # The joint figure: one eigen-iteration on D (H + W) D over every parameter.
        if len(ok) < len(groups) or len({g.limit for g in ok}) != 1:
            why = "; ".join(f"{g.name}: {g.reason}" for g in groups if g not in ok) or "groups have different limits"
            figures["preconditioned_lambda_max"] = figures["stability_ratio"] = nan
            notes["preconditioned_lambda_max"] = notes["stability_ratio"] = why
        else:
            covered = {position[id(p)] for g in ok for p in g.params if id(p) in position}
            plain = not any(isinstance(x, Tensor) for g in ok for x in g.inverse_preconditioner)
            # Python numbers only: comparing tensors would read them back to the host.
            one = plain and len({(x, g.weight_decay) for g in ok for x in g.inverse_preconditioner}) == 1
            if one and len(covered) == len(hvp.params):
                # One LR and one decay for every parameter: P^-1 (H + W) = lr (H + wd I), no products.
                pre = ok[0].inverse_preconditioner[0] * (lambda_max + ok[0].weight_decay)
            else:
                d, w = self._diagonals(hvp, ok, position, range(len(hvp.params)))
                pre = self._iterate("preconditioned", lambda v: d * (hvp(d * v) + w * d * v), hvp.numel, hvp).eigenvalue
            figures["preconditioned_lambda_max"], figures["stability_ratio"] = pre, pre / ok[0].limit

        # Per group: the diagonal blocks.
        lrs = {id(g.lr) if isinstance(g.lr, Tensor) else g.lr for g in groups}  # tensors: by identity
        if not (self.per_group if self.per_group is not None else len(lrs) > 1) or len(groups) < 2:
            return
        for g in groups:
            idx = [position[id(p)] for p in g.params if id(p) in position]
            n = sum(hvp.params[i].numel() for i in idx)
            block = self._iterate(f"block/{g.name}", lambda v, idx=idx: hvp(v, idx), n, hvp)
            figures[f"lambda_max/{g.name}"] = block.eigenvalue
            if g not in ok:
                figures[f"preconditioned_lambda_max/{g.name}"] = figures[f"stability_ratio/{g.name}"] = nan
                continue
            if not any(isinstance(x, Tensor) for x in g.inverse_preconditioner):
                pre = g.inverse_preconditioner[0] * (block.eigenvalue + g.weight_decay)
            else:
                d, w = self._diagonals(hvp, [g], position, idx)
                pre = self._iterate(f"preconditioned/{g.name}",
                                  lambda v, d=d, w=w, idx=idx: d * (hvp(d * v, idx) + w * d * v), n, hvp).eigenvalue
            figures[f"preconditioned_lambda_max/{g.name}"] = pre
            figures[f"stability_ratio/{g.name}"] = pre / g.limit

    @staticmethod
    def _diagonals(hvp: HessianVectorProduct, groups: list[GroupStability], position: dict[int, int],
                   index: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Flat ``D = sqrt(P^-1)`` and ``W`` over ``params[index]``; 0 for a parameter no group steps."""
        inv: dict[int, tuple[Tensor | float, float]] = {}
        for g in groups:
            for p, x in zip(g.params, g.inverse_preconditioner or []):
                if id(p) in position:
                    inv[position[id(p)]] = (x, g.weight_decay)
        d_parts, w_parts = [], []
        for i in index:
            p = hvp.params[i]
            x, wd = inv.get(i, (0.0, 0.0))
            if isinstance(x, Tensor):
                d_parts.append(x.to(device=hvp.device, dtype=hvp.dtype).sqrt().expand(p.shape).reshape(-1))
            else:  # a Python number: a fill, not a host-to-device copy
                d_parts.append(torch.full((p.numel(),), math.sqrt(x), dtype=hvp.dtype, device=hvp.device))
            w_parts.append(torch.full((p.numel(),), wd, dtype=hvp.dtype, device=hvp.device))
        return torch.cat(d_parts), torch.cat(w_parts)


# -- a side-effect-free loss recomputation --------------------------------------------------------


class TrainingStateGuard:
    """Makes loss recomputations leave no trace: buffers, RNG streams and train/eval flags restored.

    On entry it snapshots every buffer of ``module`` (BatchNorm running statistics and
    ``num_batches_tracked`` included), the ``training`` flag of every submodule and the RNG states
    (torch CPU, the CUDA devices holding the module's tensors, Python's ``random``, NumPy's global
    generator); on exit (also on an exception) it puts all of them back, bit for bit, so the next
    training step runs exactly as if nothing had happened. :meth:`replay` resets the RNG streams to
    the snapshot, and :meth:`wrap` returns a closure that does so before each call: every
    evaluation of one check then draws the *same* dropout masks, which finite differences need
    (the gradients must be of one function) and autograd does not mind.

    A buffer replaced (re-assigned) during the block is re-attached on exit, and so is every plain
    attribute of ``module`` itself that the block set or added (``self.last_loss = loss`` in a
    ``training_step`` run again); a mutable attribute changed in place is not. Parameters are not
    guarded (:class:`HessianVectorProduct` restores its own perturbations), nor is ``.grad``
    (``autograd.grad`` never writes it). Modes: ``training=None`` keeps each submodule's flag;
    True/False sets the whole module for the block (e.g. False for PyHessian's eval-mode Hessian).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
        >>> x = torch.randn(4, 2)
        >>> with TrainingStateGuard(net) as guard:
        ...     loss_fn = guard.wrap(lambda: net(x).square().mean())
        ...     same = torch.equal(loss_fn(), loss_fn())  # same dropout mask each call
        >>> same, int(net[1].num_batches_tracked)  # the two forwards left no trace
        (True, 0)
    """

    def __init__(self, module: nn.Module, *, training: bool | None = None) -> None:
        if training not in (None, True, False):
            raise ValueError(f"`training` must be None, True or False, got {training!r}")
        self.module, self.training = module, training
        self._buffers: list[tuple[nn.Module, str, Tensor, Tensor]] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        self._rng: dict[str, Any] = {}
        self._attributes: dict[str, Any] = {}

    def _cuda_devices(self) -> list[int]:
        tensors = [*self.module.parameters(), *self.module.buffers()]
        return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})

    def __enter__(self) -> TrainingStateGuard:
        self._buffers = [
            (mod, name, buf, buf.detach().clone())
            for mod in self.module.modules() for name, buf in mod._buffers.items() if buf is not None
        ]
        self._modes = [(m, m.training) for m in self.module.modules()]
        self._attributes = dict(vars(self.module))  # shallow: the values, not copies of them
        self._rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                     "cuda": {d: torch.cuda.get_rng_state(d) for d in self._cuda_devices()}}
        if self.training is not None:
            self.module.train(self.training)
        return self

    def replay(self) -> None:
        """Put the RNG streams back to the snapshot (the next draws repeat)."""
        torch.set_rng_state(self._rng["torch"])
        random.setstate(self._rng["python"])
        np.random.set_state(self._rng["numpy"])
        for d, state in self._rng["cuda"].items():
            torch.cuda.set_rng_state(state, d)

    def wrap(self, fn: Callable[[], T]) -> Callable[[], T]:
        """``fn`` preceded by :meth:`replay` at every call."""

        def replayed() -> T:
            self.replay()
            return fn()

        return replayed

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for mod, name, original, saved in self._buffers:
                mod._buffers[name] = original  # re-attach if the block replaced it
                original.copy_(saved)
        for m, flag in self._modes:
            m.training = flag
        attributes = vars(self.module)
        for name in [n for n in attributes if n not in self._attributes]:
            del attributes[name]
        for name, value in self._attributes.items():
            if attributes.get(name, self) is not value:
                attributes[name] = value
        self.replay()
        self._buffers, self._modes, self._attributes = [], [], {}
