"""Sharpness machinery against dense float64 Hessians (torch.autograd.functional.hessian + eigvalsh)."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from lightning_diag.metrics.sharpness import (
    HessianVectorProduct,
    SharpnessEstimator,
    TrainingStateGuard,
    hutchinson_trace,
    optimizer_stability,
    random_unit_vector,
    top_eigenvalue,
)


class OnceTanh(torch.autograd.Function):
    """tanh whose backward has no derivative of its own, like the flash-attention kernels."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class Mlp(nn.Module):
    """3 -> 6 -> 2 tanh MLP (38 parameters); ``once=True`` routes tanh through OnceTanh."""

    def __init__(self, once: bool = False) -> None:
        super().__init__()
        self.fc1, self.fc2, self.once = nn.Linear(3, 6), nn.Linear(6, 2), once

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(OnceTanh.apply(h) if self.once else torch.tanh(h))


def _problem(dtype=torch.float64, seed=0, once=False):
    """A fixed batch, a model and its loss closure; the dense Hessian as reference."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Mlp(once).to(dtype)
    x = torch.randn(64, 3, generator=gen, dtype=dtype)
    y = torch.randint(0, 2, (64,), generator=gen)
    def loss_fn():
        return nn.functional.cross_entropy(net(x), y)

    return net, loss_fn, list(net.parameters()), (x, y)


def _dense_hessian(net, data):
    """float64 Hessian of the cross-entropy over the flat parameter vector (plain tanh)."""
    x, y = data
    names = [n for n, _ in net.named_parameters()]
    ref = copy.deepcopy(net).double()
    ref.once = False
    shapes = [p.shape for p in ref.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])

    def loss(theta):
        parts = dict(zip(names, (t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        return nn.functional.cross_entropy(functional_call(ref, parts, (x.double(),)), y)

    return torch.autograd.functional.hessian(loss, flat)


def test_autograd_hvp_matches_dense_hessian():
    net, loss_fn, params, data = _problem()
    h = _dense_hessian(net, data)
    hvp = HessianVectorProduct(loss_fn, params, method="autograd")
    for seed in range(3):
        v = random_unit_vector(hvp.numel, dtype=torch.float64, seed=seed)
        torch.testing.assert_close(hvp(v), h @ v, rtol=1e-10, atol=1e-12)
    # One forward+backward with create_graph, then one double backward per product.
    assert hvp.method == "autograd" and hvp.num_products == 3 and hvp.num_passes == 1


@pytest.mark.parametrize(("scheme", "rtol", "passes"), [("forward", 1e-6, 4), ("central", 1e-9, 6)])
def test_finite_difference_hvp_matches_dense_hessian_float64(scheme, rtol, passes):
    net, loss_fn, params, data = _problem()
    h = _dense_hessian(net, data)
    hvp = HessianVectorProduct(loss_fn, params, method="finite_difference", fd_scheme=scheme)
    for seed in range(3):
        v = random_unit_vector(hvp.numel, dtype=torch.float64, seed=seed)
        ref = h @ v
        assert (hvp(v) - ref).norm() / ref.norm() < rtol
    # forward: g(theta) once plus one gradient per product; central: two per product.
    assert hvp.method == "finite_difference" and hvp.num_passes == passes


@pytest.mark.parametrize(("scheme", "rtol"), [("forward", 5e-3), ("central", 5e-4)])
def test_finite_difference_hvp_default_step_is_accurate_in_float32(scheme, rtol):
    # The default relative step (sqrt(eps) forward, eps^(1/3) central) measured ~7e-4 and
    # ~4e-5 relative error on this problem in float32; the bounds leave a margin.
    net, loss_fn, params, data = _problem(torch.float32)
    h = _dense_hessian(net, data)
    hvp = HessianVectorProduct(loss_fn, params, method="finite_difference", fd_scheme=scheme)
    for seed in range(3):
        v = random_unit_vector(hvp.numel, seed=seed)
        ref = h @ v.double()
        assert (hvp(v).double() - ref).norm() / ref.norm() < rtol


def test_finite_difference_restores_parameters_bit_for_bit():
    _, loss_fn, params, _ = _problem(torch.float32)
    before = [p.detach().clone() for p in params]
    versions = [p._version for p in params]
    hvp = HessianVectorProduct(loss_fn, params, method="finite_difference", fd_scheme="central")
    for seed in range(4):
        hvp(random_unit_vector(hvp.numel, seed=seed) * 10.0 ** seed)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    # No version bump either: a graph still alive that saved the parameters stays usable.
    assert [p._version for p in params] == versions
    assert all(p.grad is None for p in params)  # .grad is never written


def test_finite_difference_restores_parameters_when_loss_fn_raises():
    _, loss_fn, params, _ = _problem(torch.float32)
    before = [p.detach().clone() for p in params]
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 2:  # the perturbed evaluation
            raise KeyError("boom")
        return loss_fn()

    hvp = HessianVectorProduct(flaky, params, method="finite_difference")
    with pytest.raises(KeyError):
        hvp(random_unit_vector(hvp.numel))
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_hvp_on_a_subset_is_the_diagonal_block(method):
    net, loss_fn, params, data = _problem()
    h = _dense_hessian(net, data)
    hvp = HessianVectorProduct(loss_fn, params, method=method, fd_scheme="central")
    # params: fc1.weight (18), fc1.bias (6), fc2.weight (12), fc2.bias (2); block of fc2.*
    block = h[24:, 24:]
    v = random_unit_vector(14, dtype=torch.float64, seed=3)
    torch.testing.assert_close(hvp(v, [2, 3]), block @ v, rtol=1e-7, atol=1e-9)
    with pytest.raises(ValueError, match="shape"):
        hvp(v, [0])


def test_auto_falls_back_to_finite_differences_without_double_backward():
    net, loss_fn, params, data = _problem(once=True)
    h = _dense_hessian(net, data)
    hvp = HessianVectorProduct(loss_fn, params, fd_scheme="central")
    v = random_unit_vector(hvp.numel, dtype=torch.float64, seed=0)
    ref = h @ v
    assert (hvp(v) - ref).norm() / ref.norm() < 1e-8
    assert hvp.method == "finite_difference"
    assert "Error node" in hvp.fallback_reason
    # method="autograd" does not fall back: the error propagates.
    strict = HessianVectorProduct(loss_fn, params, method="autograd")
    with pytest.raises(RuntimeError, match="not implemented"):
        strict(v)


def test_auto_does_not_swallow_unrelated_errors():
    w = torch.ones(3, requires_grad=True)

    def bad():
        raise RuntimeError("shape mismatch somewhere")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        HessianVectorProduct(bad, [w])(torch.ones(3))
    with pytest.raises(ValueError, match="without a graph"):
        HessianVectorProduct(lambda: w.detach().sum(), [w])(torch.ones(3))
    with pytest.raises(ValueError, match="scalar"):
        HessianVectorProduct(lambda: w * 2, [w])(torch.ones(3))


def test_hvp_argument_validation():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="method"):
        HessianVectorProduct(lambda: w.sum(), [w], method="exact")
    with pytest.raises(ValueError, match="fd_scheme"):
        HessianVectorProduct(lambda: w.sum(), [w], fd_scheme="backward")
    with pytest.raises(ValueError, match="fd_step"):
        HessianVectorProduct(lambda: w.sum(), [w], fd_step=0.0)
    with pytest.raises(ValueError, match="requires_grad"):
        HessianVectorProduct(lambda: w.sum(), [torch.ones(2)])
    with pytest.raises(ValueError, match="empty"):
        HessianVectorProduct(lambda: w.sum(), [])


def test_loss_linear_in_a_parameter_has_zero_hessian_rows():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0], requires_grad=True)
    hvp = HessianVectorProduct(lambda: (w**2).sum() + 5 * b.sum(), [w, b])
    torch.testing.assert_close(hvp(torch.tensor([1.0, 1.0, 1.0])), torch.tensor([2.0, 2.0, 0.0]))
    assert hvp.num_detached == 1


# -- power iteration ------------------------------------------------------------------------------


def _spectrum_matrix(eigs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


def test_lambda_max_matches_dense_top_eigenvalue():
    net, loss_fn, params, data = _problem()
    top = torch.linalg.eigvalsh(_dense_hessian(net, data))[-1]
    hvp = HessianVectorProduct(loss_fn, params)
    v0 = random_unit_vector(hvp.numel, dtype=torch.float64)
    quick = top_eigenvalue(hvp, v0, iters=20)  # the estimator's cold start
    assert abs(quick.eigenvalue - top) / top < 0.03
    assert quick.eigenvalue <= top * (1 + 1e-12)  # a Rayleigh quotient: a lower bound
    tight = top_eigenvalue(hvp, v0, iters=500, tol=1e-14)
    torch.testing.assert_close(tight.eigenvalue, top, rtol=1e-9, atol=0)
    assert tight.num_products < 500  # stopped on the tolerance


@pytest.mark.parametrize(("algorithm", "iters"), [("lanczos", 40), ("power", 400)])
def test_top_eigenvalue_finds_largest_positive_when_negative_dominates(algorithm, iters):
    a = _spectrum_matrix([1.0, 0.7, 0.2, -0.5, -3.0])
    one = torch.tensor(1.0, dtype=torch.float64)
    est = top_eigenvalue(lambda v: a @ v, torch.ones(5, dtype=torch.float64), iters=iters, algorithm=algorithm)
    torch.testing.assert_close(est.eigenvalue, one, rtol=1e-8, atol=0)
    if algorithm == "power":
        assert 0 < est.shift <= 3.0 + 1e-9  # never more than |lambda_min|
    else:
        assert est.shift == pytest.approx(0.0, abs=1e-15)
    # Warm start (with the shift carried): stays on lambda_max instead of drifting to -3.
    again = top_eigenvalue(lambda v: a @ v, est.vector, iters=iters // 8, algorithm=algorithm, shift=est.shift)
    torch.testing.assert_close(again.eigenvalue, one, rtol=1e-8, atol=0)
    # A negative definite operator: the largest (least negative) eigenvalue.
    b = _spectrum_matrix([-0.5, -1.0, -4.0])
    est = top_eigenvalue(lambda v: b @ v, torch.ones(3, dtype=torch.float64), iters=iters, algorithm=algorithm)
    torch.testing.assert_close(est.eigenvalue, torch.tensor(-0.5, dtype=torch.float64), rtol=1e-6, atol=0)


def test_lanczos_beats_power_iteration_on_a_clustered_spectrum():
    # A top eigenvalue 1% above a cluster: power iteration crawls, Lanczos does not.
    eigs = [1.0, *torch.linspace(0.99, 0.0, 59).tolist()]
    a = _spectrum_matrix(eigs, seed=2)
    v0 = torch.ones(60, dtype=torch.float64)
    lanczos = top_eigenvalue(lambda v: a @ v, v0, iters=20, basis=10)
    power = top_eigenvalue(lambda v: a @ v, v0, iters=20, algorithm="power")
    assert 1 - lanczos.eigenvalue < (1 - power.eigenvalue) / 10
    assert lanczos.eigenvalue <= 1 + 1e-12 and power.eigenvalue <= 1 + 1e-12  # lower bounds


def test_lanczos_breakdown_and_small_problems():
    # v0 is an exact eigenvector of a negative definite matrix: the Krylov space stops at one
    # vector, and the padded rows must not pass for an eigenvalue 0.
    b = torch.diag(torch.tensor([-0.5, -1.0, -4.0], dtype=torch.float64))
    est = top_eigenvalue(lambda v: b @ v, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), iters=5)
    assert est.eigenvalue == pytest.approx(-1.0, abs=1e-12)
    # A 2-parameter problem with a basis of 5: exact after the first cycle.
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    est = top_eigenvalue(lambda v: a @ v, torch.tensor([1.0, 0.0], dtype=torch.float64), iters=5)
    assert est.eigenvalue == pytest.approx(float(torch.linalg.eigvalsh(a)[-1]), rel=1e-12)
    zero = top_eigenvalue(lambda v: torch.zeros_like(v), torch.ones(3), iters=5)
    assert zero.eigenvalue == pytest.approx(0.0, abs=1e-12) and torch.isfinite(zero.vector).all()


def test_small_eigenpair_without_eigh_matches_eigh():
    from lightning_diag.metrics.sharpness import _top_eigenpair_small

    gen = torch.Generator().manual_seed(5)
    for size in (1, 3, 8):
        m = torch.randn(size, size, generator=gen, dtype=torch.float64)
        t = m + m.T
        theta, y = _top_eigenpair_small(t)
        assert theta == pytest.approx(float(torch.linalg.eigvalsh(t)[-1]), rel=1e-10, abs=1e-12)
        torch.testing.assert_close(t @ y, theta * y, rtol=0, atol=1e-8)
    tie = torch.diag(torch.tensor([2.0, 2.0, -5.0], dtype=torch.float64))
    assert _top_eigenpair_small(tie)[0] == pytest.approx(2.0, rel=1e-12)


def test_top_eigenvalue_without_negative_curvature_keeps_zero_shift():
    a = _spectrum_matrix([2.0, 1.0, 0.5, 0.1])
    est = top_eigenvalue(lambda v: a @ v, torch.ones(4, dtype=torch.float64), iters=80)
    assert est.shift == pytest.approx(0.0, abs=1e-15)
    assert est.eigenvalue == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("algorithm", ["lanczos", "power"])
def test_warm_start_is_closer_than_cold_for_the_same_products(algorithm):
    net, loss_fn, params, data = _problem()
    hvp = HessianVectorProduct(loss_fn, params)
    v0 = random_unit_vector(hvp.numel, dtype=torch.float64)
    first = top_eigenvalue(hvp, v0, iters=60, algorithm=algorithm)
    # A training step moves the weights a little; the previous vector is a good start.
    grads = torch.autograd.grad(loss_fn(), params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p -= 0.05 * g
    top = torch.linalg.eigvalsh(_dense_hessian(net, data))[-1]
    hvp = HessianVectorProduct(loss_fn, params)
    cold = top_eigenvalue(hvp, v0, iters=3, algorithm=algorithm)
    warm = top_eigenvalue(hvp, first.vector, iters=3, algorithm=algorithm)
    assert top - warm.eigenvalue < (top - cold.eigenvalue) / 10
    assert abs(warm.eigenvalue - top) / top < 1e-3
    if algorithm == "power":  # and with a tolerance, in fewer products
        cold = top_eigenvalue(hvp, v0, iters=500, tol=1e-8, algorithm="power")
        warm = top_eigenvalue(hvp, first.vector, iters=500, tol=1e-8, algorithm="power")
        assert warm.num_products < cold.num_products / 2


def test_nonfinite_product_gives_nan_and_keeps_the_vector():
    v0 = torch.tensor([0.6, 0.8])
    est = top_eigenvalue(lambda v: torch.full_like(v, math.nan), v0, iters=3)
    assert torch.isnan(est.eigenvalue)
    torch.testing.assert_close(est.vector, v0)
    zero = top_eigenvalue(lambda v: torch.zeros_like(v), v0, iters=2)
    assert zero.eigenvalue == pytest.approx(0.0, abs=1e-12) and torch.isfinite(zero.vector).all()


def test_top_eigenvalue_validation():
    with pytest.raises(ValueError, match="iters"):
        top_eigenvalue(lambda v: v, torch.ones(2), iters=0)
    with pytest.raises(ValueError, match="tol"):
        top_eigenvalue(lambda v: v, torch.ones(2), iters=1, tol=0.0)
    with pytest.raises(ValueError, match="1-D"):
        top_eigenvalue(lambda v: v, torch.ones(2, 2), iters=1)
    with pytest.raises(ValueError, match="algorithm"):
        top_eigenvalue(lambda v: v, torch.ones(2), iters=1, algorithm="arnoldi")
    with pytest.raises(ValueError, match="basis"):
        top_eigenvalue(lambda v: v, torch.ones(2), iters=1, basis=0)


def test_hutchinson_trace_is_unbiased():
    a = _spectrum_matrix([3.0, 1.0, -0.5, 0.25, 2.0], seed=4)
    probes = 4000
    est = hutchinson_trace(lambda v: a @ v, 5, probes=probes, dtype=torch.float64, seed=1)
    # Var(z^T A z) = 2 sum_{i != j} A_ij^2 for Rademacher z.
    sd = math.sqrt(2 * (a.square().sum() - a.diagonal().square().sum()) / probes)
    assert abs(est - a.trace()) < 4 * sd
    state = torch.get_rng_state()
    hutchinson_trace(lambda v: a @ v, 5, dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), state)  # private generator


# -- the optimizer's side -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "limit"),
    [({}, 2.0), ({"momentum": 0.9}, 3.8), ({"momentum": 0.5, "dampening": 0.5}, 6.0),
     ({"momentum": 0.9, "nesterov": True}, 3.8 / 2.8)],
)
def test_stability_ratio_sgd_is_lr_lambda_over_limit(kwargs, limit):
    net, loss_fn, params, data = _problem()
    top = torch.linalg.eigvalsh(_dense_hessian(net, data))[-1]
    opt = torch.optim.SGD(params, lr=0.3, **kwargs)
    result = SharpnessEstimator(cold_iters=400, tol=1e-13).estimate(loss_fn, params, opt)
    f = result.figures
    torch.testing.assert_close(f["lambda_max"], top, rtol=1e-8, atol=0)
    torch.testing.assert_close(f["stability_ratio"], 0.3 * top / limit, rtol=1e-8, atol=0)
    torch.testing.assert_close(f["preconditioned_lambda_max"], 0.3 * top, rtol=1e-8, atol=0)
    assert not result.notes and "lambda_max/group0" not in f  # one group: no per-group figures


def test_nesterov_limit_is_where_the_quadratic_iteration_diverges():
    # Run PyTorch's SGD(nesterov) on 0.5 * lambda * w^2 just below and above the stated limit.
    beta, lr = 0.9, 1.0
    limit = optimizer_stability(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr, momentum=beta,
                                                nesterov=True))[0].limit
    for factor, grows in ((0.98, False), (1.02, True)):
        w = nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.SGD([w], lr=lr, momentum=beta, nesterov=True)
        lam = factor * limit / lr
        for _ in range(2000):
            opt.zero_grad()
            (0.5 * lam * w.square()).sum().backward()
            opt.step()
        assert (w.abs().item() > 1) == grows


def test_sgd_weight_decay_adds_to_the_curvature():
    net, loss_fn, params, data = _problem()
    top = torch.linalg.eigvalsh(_dense_hessian(net, data))[-1]
    opt = torch.optim.SGD(params, lr=0.3, weight_decay=0.1)
    f = SharpnessEstimator(cold_iters=400, tol=1e-13).estimate(loss_fn, params, opt).figures
    torch.testing.assert_close(f["stability_ratio"], 0.3 * (top + 0.1) / 2, rtol=1e-8, atol=0)


def _adam_inverse_preconditioner_dense(opt, params, beta1, beta2, eps, lr):
    """P^-1 from the state, and from the gradients when they are there (the coming step)."""
    parts = []
    for p in params:
        st = opt.state[p]
        t, v = float(st["step"]), st["exp_avg_sq"]
        if p.grad is not None:
            t, v = t + 1, beta2 * v + (1 - beta2) * p.grad.square()
        v_hat = v / (1 - beta2**t)
        parts.append((lr / ((1 - beta1**t) * (v_hat.sqrt() + eps))).reshape(-1))
    return torch.cat(parts).double()


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("with_grad", [True, False])
def test_adam_preconditioned_sharpness_matches_dense(cls, with_grad):
    net, loss_fn, params, data = _problem()
    opt = cls(params, lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    for _ in range(5):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    if with_grad:  # as in on_before_optimizer_step: the coming step's gradient is in .grad
        net.fc1.weight.data.mul_(1.1)
        loss_fn().backward()
    h = _dense_hessian(net, data)
    d = _adam_inverse_preconditioner_dense(opt, params, 0.9, 0.99, 1e-8, 0.01).sqrt()
    top_pre = torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1]
    result = SharpnessEstimator(cold_iters=60, basis=20).estimate(loss_fn, params, opt)
    f = result.figures
    torch.testing.assert_close(f["preconditioned_lambda_max"], top_pre, rtol=1e-7, atol=0)
    torch.testing.assert_close(f["stability_ratio"], top_pre / 38.0, rtol=1e-7, atol=0)
    torch.testing.assert_close(f["lambda_max"], torch.linalg.eigvalsh(h)[-1], rtol=1e-7, atol=0)


def test_adam_preconditioner_of_the_coming_step_exists_before_the_first_step():
    _, loss_fn, params, _ = _problem()
    opt = torch.optim.Adam(params, lr=0.01)
    loss_fn().backward()  # gradients, no state yet
    (g,) = optimizer_stability(opt)
    for p, x in zip(params, g.inverse_preconditioner):
        # t = 1: v_hat = g^2 and the first moment's correction is 1 - 0.9.
        torch.testing.assert_close(x, 0.01 / (0.1 * (p.grad.abs() + 1e-8)))
    (stale,) = optimizer_stability(opt, use_grad=False)
    assert stale.inverse_preconditioner is None and "no second moment" in stale.reason


def test_adam_coupled_weight_decay_and_amsgrad():
    net, loss_fn, params, data = _problem()
    opt = torch.optim.Adam(params, lr=0.01, weight_decay=0.5, amsgrad=True)
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    (g,) = optimizer_stability(opt)
    assert g.kind == "adam" and g.weight_decay == pytest.approx(0.5)
    # amsgrad: the preconditioner reads max_exp_avg_sq.
    opt.zero_grad(set_to_none=True)  # the preconditioner of the last step taken
    (g,) = optimizer_stability(opt)
    p = params[0]
    st = opt.state[p]
    t = float(st["step"])
    expected = 0.01 / ((1 - 0.9**t) * ((st["max_exp_avg_sq"] / (1 - 0.999**t)).sqrt() + 1e-8))
    torch.testing.assert_close(g.inverse_preconditioner[0], expected)
    h = _dense_hessian(net, data)
    d = torch.cat([x.reshape(-1) for x in g.inverse_preconditioner]).double().sqrt()
    top_pre = torch.linalg.eigvalsh(d[:, None] * (h + 0.5 * torch.eye(len(d), dtype=h.dtype)) * d[None, :])[-1]
    f = SharpnessEstimator(cold_iters=2000, tol=1e-13).estimate(loss_fn, params, opt).figures
    torch.testing.assert_close(f["preconditioned_lambda_max"], top_pre, rtol=1e-6, atol=0)
    assert optimizer_stability(torch.optim.AdamW(params, weight_decay=0.5))[0].weight_decay == pytest.approx(0.0)


def test_sgd_groups_with_different_lr_get_their_own_figures():
    net, loss_fn, params, data = _problem()
    opt = torch.optim.SGD([{"params": [net.fc1.weight, net.fc1.bias], "lr": 0.3, "name": "body"},
                           {"params": [net.fc2.weight, net.fc2.bias], "lr": 0.03}], lr=0.1)
    h = _dense_hessian(net, data)
    lr = torch.cat([torch.full((24,), 0.3), torch.full((14,), 0.03)]).double()
    top_pre = torch.linalg.eigvalsh(lr.sqrt()[:, None] * h * lr.sqrt()[None, :])[-1]
    result = SharpnessEstimator(cold_iters=2000, tol=1e-13).estimate(loss_fn, params, opt)
    f = result.figures
    torch.testing.assert_close(f["preconditioned_lambda_max"], top_pre, rtol=1e-7, atol=0)
    torch.testing.assert_close(f["stability_ratio"], top_pre / 2, rtol=1e-7, atol=0)
    for name, sl, lr_g in (("body", slice(0, 24), 0.3), ("group1", slice(24, 38), 0.03)):
        top_block = torch.linalg.eigvalsh(h[sl, sl])[-1]
        torch.testing.assert_close(f[f"lambda_max/{name}"], top_block, rtol=1e-7, atol=0)
        torch.testing.assert_close(f[f"stability_ratio/{name}"], lr_g * top_block / 2, rtol=1e-7, atol=0)
        assert f[f"lambda_max/{name}"] <= f["lambda_max"] * (1 + 1e-9)  # interlacing


def test_unsupported_optimizer_and_adam_before_first_step_give_nan_with_reason():
    _, loss_fn, params, _ = _problem()
    est = SharpnessEstimator(cold_iters=5)
    result = est.estimate(loss_fn, params, torch.optim.RMSprop(params))
    assert torch.isfinite(result.figures["lambda_max"])
    assert torch.isnan(result.figures["stability_ratio"]) and torch.isnan(result.figures["preconditioned_lambda_max"])
    assert "RMSprop is not supported" in result.notes["stability_ratio"]
    result = est.estimate(loss_fn, params, torch.optim.Adam(params))
    assert torch.isnan(result.figures["stability_ratio"])
    assert "no second moment yet" in result.notes["stability_ratio"]
    (g,) = optimizer_stability(torch.optim.SGD(params, lr=0.1, maximize=True))
    assert g.kind == "unsupported" and math.isnan(g.limit) and "maximize" in g.reason


# -- the estimator, check after check -------------------------------------------------------------


def test_estimator_warm_checks_cost_iters_products_and_track_lambda_max():
    net, loss_fn, params, data = _problem()
    opt = torch.optim.SGD(params, lr=0.5)
    est = SharpnessEstimator(iters=3, cold_iters=40)
    first = est.estimate(loss_fn, params, opt)
    assert first.num_products == 40 and first.method == "autograd"
    for _ in range(5):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        r = est.estimate(loss_fn, params, opt)
        assert r.num_products == 3 and r.num_passes == 1
        top = torch.linalg.eigvalsh(_dense_hessian(net, data))[-1]
        assert abs(r.figures["lambda_max"] - top) / top < 0.01


def test_estimator_fallback_is_sticky():
    net, loss_fn, params, data = _problem(once=True)
    est = SharpnessEstimator(iters=2, cold_iters=30)
    first = est.estimate(loss_fn, params)
    assert first.method == "finite_difference" and "not implemented" in first.fallback_reason
    # The failed attempt cost one forward+backward; forward differences add g(theta) + 1 per product.
    assert first.num_passes == 1 + 1 + 30
    second = est.estimate(loss_fn, params)
    assert second.method == "finite_difference" and second.num_passes == 1 + 2
    top = torch.linalg.eigvalsh(_dense_hessian(net, data))[-1]
    assert abs(second.figures["lambda_max"] - top) / top < 0.02
    state = est.state_dict()
    fresh = SharpnessEstimator()
    fresh.load_state_dict(state)
    assert fresh.method == "finite_difference"


def test_estimator_state_carries_the_warm_vectors_so_a_restored_estimator_continues_alike():
    # Two products per check: the figure after three checks depends on the vectors the first two left.
    net, loss_fn, params, data = _problem()
    whole = SharpnessEstimator(iters=2, cold_iters=2)
    half = SharpnessEstimator(iters=2, cold_iters=2)
    for est in (whole, half):
        est.estimate(loss_fn, params)
        est.estimate(loss_fn, params)
    restored = SharpnessEstimator(iters=2, cold_iters=2)
    restored.load_state_dict(copy.deepcopy(half.state_dict()))
    assert restored.state_dict()["warm"]["hessian"]["vector"].device.type == "cpu"  # checkpointed on the CPU
    expected, got = whole.estimate(loss_fn, params), restored.estimate(loss_fn, params)
    torch.testing.assert_close(got.figures["lambda_max"], expected.figures["lambda_max"], rtol=1e-12, atol=0)
    cold = SharpnessEstimator(iters=2, cold_iters=2).estimate(loss_fn, params)
    assert abs(float(cold.figures["lambda_max"]) / float(expected.figures["lambda_max"]) - 1) > 1e-3  # the premise


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_hessian_vector_products_through_sparse_embedding_gradients_equal_the_dense_ones(method):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    sparse = copy.deepcopy(dense)
    sparse[0].sparse = True
    tokens, labels = torch.tensor([0, 1, 2, 3, 1, 2]), torch.tensor([0, 1, 0, 1, 1, 0])
    v = torch.randn(6 * 3 + 3 * 2 + 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    products = []
    for net in (dense, sparse):
        hvp = HessianVectorProduct(lambda net=net: nn.functional.cross_entropy(net(tokens), labels),
                                   list(net.parameters()), method=method, fd_scheme="central")
        products.append(hvp(v))
    assert torch.linalg.vector_norm(products[0]) > 0.1
    torch.testing.assert_close(products[1], products[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("kwargs", "match"), [({"seed": 2**70}, "`seed`"), ({"seed": -1}, "`seed`"),
                                               ({"per_group": "yes"}, "`per_group`"), ({"tol": math.nan}, "`tol`"),
                                               ({"fd_step": 1.5}, "`fd_step`")])
def test_estimator_arguments_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharpnessEstimator(**kwargs)
    SharpnessEstimator(seed=2**63 - 1)  # the largest seed a generator takes


def test_estimator_reduce_is_applied_to_every_product():
    net, loss_fn, params, data = _problem()
    top = torch.linalg.eigvalsh(_dense_hessian(net, data))[-1]
    r = SharpnessEstimator(cold_iters=400, tol=1e-13).estimate(loss_fn, params, reduce=lambda t: 2 * t)
    torch.testing.assert_close(r.figures["lambda_max"], 2 * top, rtol=1e-8, atol=0)


def test_estimator_trace_and_validation():
    net, loss_fn, params, data = _problem()
    h = _dense_hessian(net, data)
    r = SharpnessEstimator(cold_iters=3, trace_probes=2000).estimate(loss_fn, params)
    sd = math.sqrt(2 * (h.square().sum() - h.diagonal().square().sum()) / 2000)
    assert abs(r.figures["trace"] - h.trace()) < 4 * sd
    for kwargs, match in (({"iters": 0}, "iters"), ({"cold_iters": 0}, "cold_iters"), ({"tol": -1.0}, "tol"),
                          ({"method": "x"}, "method"), ({"trace_probes": -1}, "trace_probes")):
        with pytest.raises(ValueError, match=match):
            SharpnessEstimator(**kwargs)


# -- a side-effect-free recomputation -------------------------------------------------------------


class BnDropNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 1))

    def forward(self, x):
        return self.body(x)


def _train_step(net, opt, x, y):
    opt.zero_grad()
    out = net(x)
    nn.functional.mse_loss(out, y).backward()
    opt.step()
    return out.detach()


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_guarded_estimate_leaves_training_bit_identical(method):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
    nets = [BnDropNet(), None]
    nets[1] = copy.deepcopy(nets[0])
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in nets]
    for net, opt in zip(nets, opts):  # one step each, so momentum and BN stats are non-trivial
        torch.manual_seed(7)
        _train_step(net, opt, x, y)

    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    with TrainingStateGuard(nets[0]) as guard:
        loss_fn = guard.wrap(lambda: nn.functional.mse_loss(nets[0](x), y))
        assert torch.equal(loss_fn(), loss_fn())  # same dropout mask at each evaluation
        SharpnessEstimator(cold_iters=5, method=method).estimate(loss_fn, list(nets[0].parameters()), opts[0])
        random.random(), np.random.rand()
    after_a = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    out_a = _train_step(nets[0], opts[0], x, y)

    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(5)
    after_b = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    out_b = _train_step(nets[1], opts[1], x, y)

    assert torch.equal(after_a[0], after_b[0]) and after_a[1] == after_b[1] and np.array_equal(after_a[2], after_b[2])
    assert torch.equal(out_a, out_b)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.equal(a, b), name  # parameters, running stats, num_batches_tracked
    for pa, pb in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(pa.grad, pb.grad)
        assert torch.equal(opts[0].state[pa]["momentum_buffer"], opts[1].state[pb]["momentum_buffer"])


def test_guard_restores_modes_buffers_and_rng_on_exception():
    net = BnDropNet()
    net.body[3].eval()  # a mixed mode the guard must give back as it was
    modes = [m.training for m in net.modules()]
    stats = [b.clone() for b in net.buffers()]
    rng = torch.get_rng_state()
    original = net.body[1].running_mean
    with pytest.raises(ZeroDivisionError), TrainingStateGuard(net, training=True) as guard:
        assert all(m.training for m in net.modules())
        net(torch.randn(8, 4))  # updates running stats, draws dropout
        net.body[1].running_mean = torch.zeros(8)  # a module that replaces its buffer
        guard.replay()
        raise ZeroDivisionError
    assert [m.training for m in net.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), stats))
    assert net.body[1].running_mean is original
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match="training"):
        TrainingStateGuard(net, training="eval")


def test_guard_in_eval_mode_uses_running_statistics():
    net = BnDropNet()
    x = torch.randn(8, 4)
    with TrainingStateGuard(net, training=False):
        a, b = net(x), net(x)
    assert torch.equal(a, b)  # no dropout, BN from running stats
    assert all(m.training for m in net.modules())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_estimate_makes_no_host_sync_on_cuda(method):
    torch.manual_seed(0)
    net = BnDropNet().cuda()
    x, y = torch.randn(16, 4, device="cuda"), torch.randn(16, 1, device="cuda")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for _ in range(2):
        _train_step(net, opt, x, y)
    opt.zero_grad()
    nn.functional.mse_loss(net(x), y).backward()
    est = SharpnessEstimator(iters=4, cold_iters=10, method=method, trace_probes=1)
    params = list(net.parameters())
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # cold, then warm
            with TrainingStateGuard(net) as guard:
                result = est.estimate(guard.wrap(lambda: nn.functional.mse_loss(net(x), y)), params, opt)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(v.is_cuda for v in result.figures.values())
    assert torch.isfinite(result.figures["stability_ratio"])


def test_the_guard_puts_back_attributes_a_recomputed_training_step_sets():
    """A ``training_step`` run again for a check (the governor's ``f1``, a sharpness check) sets
    ``self.last_loss`` and the like: after the guard the module holds the training step's own
    values, and an attribute the recomputation added is gone."""
    from lightning_diag.metrics.sharpness import TrainingStateGuard

    net = nn.Linear(2, 1)
    net.last_loss = first = torch.tensor(1.0)
    with TrainingStateGuard(net):
        net.last_loss = torch.tensor(99.0)
        net.scratch = 3
    assert net.last_loss is first and not hasattr(net, "scratch")
    assert isinstance(net.weight, nn.Parameter)  # modules and parameters untouched
