"""The overshoot ratio against closed forms (quadratics, a dense float64 Hessian), the fused dot
product against float64 numpy, and the controller's dynamics and state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DispatchCounter
from torch import nn
from torch.func import functional_call

from lightning_diag.metrics.overshoot import OvershootController, fused_dot, overshoot_ratio


def _quadratic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, n, generator=g, dtype=torch.float64)
    return q @ q.T / n + 0.1 * torch.eye(n, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def test_ratio_on_a_quadratic_equals_dhd_over_twice_the_first_order_decrease() -> None:
    a, b = _quadratic(6, 0)
    f = lambda t: 0.5 * t @ a @ t - b @ t  # noqa: E731
    theta = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = a @ theta - b
    for scale in (0.01, 0.3, 2.0):  # below, around and past the line minimum
        d = -scale * (g + 0.3 * torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
        gd = float(g @ d)
        assert gd < 0
        expected = float(d @ a @ d) / (2 * abs(gd))
        assert overshoot_ratio(float(f(theta)), float(f(theta + d)), gd) == pytest.approx(expected, rel=1e-9)


def test_sgd_ratio_matches_lr_gHg_over_twice_g2_from_a_dense_float64_hessian() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    names, shapes = [n for n, _ in net.named_parameters()], [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss_of(v: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = v[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        return nn.functional.mse_loss(functional_call(net, params, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss_of, flat)
    lr = 1e-4  # small: the cubic term of the finite step is O(lr) relative to the quadratic one
    loss = nn.functional.mse_loss(net(x), y)
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    params, grads = list(net.parameters()), [p.grad for p in net.parameters()]
    before = fused_dot(grads, params)
    torch.optim.SGD(net.parameters(), lr=lr).step()
    gd = fused_dot(grads, params) - before
    with torch.no_grad():
        f1 = nn.functional.mse_loss(net(x), y)
    expected = lr * float(g @ hessian @ g) / (2 * float(g @ g))
    assert float(gd) == pytest.approx(-lr * float(g @ g), rel=1e-9)
    assert overshoot_ratio(float(loss), float(f1), float(gd)) == pytest.approx(expected, rel=1e-3)


def test_adam_ratio_on_a_quadratic_uses_the_preconditioned_update() -> None:
    a, b = _quadratic(5, 3)
    theta = nn.Parameter(torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    adam = torch.optim.Adam([theta], lr=0.05, betas=(0.9, 0.99))
    for _ in range(4):  # moments that differ from the gradient: D is not along -g
        adam.zero_grad()
        f0 = 0.5 * theta @ a @ theta - b @ theta
        f0.backward()
        old = theta.detach().clone()
        before = fused_dot([theta.grad], [theta])
        adam.step()
        gd = float(fused_dot([theta.grad], [theta]) - before)
        d = theta.detach() - old
        with torch.no_grad():
            f1 = 0.5 * theta @ a @ theta - b @ theta
        expected = float(d @ a @ d) / (2 * abs(float(theta.grad @ d)))
        assert overshoot_ratio(float(f0), float(f1), gd) == pytest.approx(expected, rel=1e-7)
    assert abs(float(torch.nn.functional.cosine_similarity(d, -theta.grad, dim=0))) < 0.999


@pytest.mark.parametrize(("f0", "f1", "gd", "expected"), [
    (1.0, 0.9, 0.1, math.nan),  # not a descent direction
    (1.0, 1.0, 0.0, math.nan),
    (100.0, 100.0, -1e-5, math.nan),  # |gD| < 1e-6 |f0|: lost in the loss's rounding
    (math.nan, 1.0, -0.5, math.nan), (1.0, math.nan, -0.5, math.nan), (1.0, 0.5, math.nan, math.nan),
    (1.0, math.inf, -0.5, math.inf),  # the step overflowed the loss: no limit to the overshoot
    (1.0, 1.25, -0.5, 1.5),
])  # fmt: skip
def test_invalid_checks_give_nan_and_nan_in_gives_nan_out(f0: float, f1: float, gd: float, expected: float) -> None:
    r = overshoot_ratio(f0, f1, gd)
    assert (math.isnan(r) and math.isnan(expected)) or r == pytest.approx(expected)


def test_ratio_is_vectorized_over_arrays() -> None:
    r = overshoot_ratio([1.0, 1.0], [0.75, 1.1], [-0.5, 0.2])
    assert r[0] == pytest.approx(0.5) and np.isnan(r[1])


def _tensors(n: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float64]
    xs = [torch.randn(3 + i, 2, generator=g).to(dtypes[i % 3]) for i in range(n)]
    ys = [torch.randn(x.shape, generator=g).to(x.dtype) for x in xs]
    return xs, ys


def test_fused_dot_matches_float64_numpy_over_mixed_dtypes() -> None:
    xs, ys = _tensors(9, 0)
    expected = sum(float(np.dot(x.double().numpy().ravel(), y.double().numpy().ravel())) for x, y in zip(xs, ys))
    result = fused_dot(xs, ys)
    assert result.dtype == torch.float64
    assert float(result) == pytest.approx(expected, rel=1e-6)  # float32 products: 6e-8 relative rounding each
    low = [x for x in xs if x.dtype == torch.bfloat16], [y for y in ys if y.dtype == torch.bfloat16]
    exact = sum(float(np.dot(x.double().numpy().ravel(), y.double().numpy().ravel())) for x, y in zip(*low))
    assert float(fused_dot(*low)) == pytest.approx(exact, rel=1e-12)  # bf16 products are exact in float32
    assert float(fused_dot([], [])) == 0.0


def test_fused_dot_dispatches_as_many_kernels_for_40_tensors_as_for_4() -> None:
    def kernels(n: int) -> int:
        xs, ys = _tensors(n, 1)
        with DispatchCounter() as counter:
            fused_dot(xs, ys)
        return sum(c for op, c in counter.ops.items() if op.split(".")[-1] not in ("view", "reshape", "_reshape_alias"))

    assert kernels(40) == kernels(4)


# -- the controller -------------------------------------------------------------------------------------------


def test_a_ratio_above_target_cuts_the_scale_to_where_the_ratio_is_target() -> None:
    c = OvershootController(target=0.8)
    assert c.update(2.0) == pytest.approx(0.4)
    assert c.update(0.8, scale_used=0.4) == pytest.approx(0.4)  # at the cut scale the ratio is target: hold
    assert c.ratio_now() == pytest.approx(0.8)


def test_a_step_that_raised_its_own_loss_acts_at_once_while_noise_below_one_is_smoothed() -> None:
    calm = OvershootController(target=0.5, smoothing=0.9)
    for _ in range(5):
        calm.update(0.3)
    calm.update(0.9)  # above target, below 1: one noisy check moves the EMA by a tenth only
    assert float(calm.scale) == 1.0
    assert float(calm.smoothed) == pytest.approx(0.9 * 0.3 + 0.1 * 0.9)
    at_once = OvershootController(target=0.5, smoothing=0.9)
    for _ in range(5):
        at_once.update(0.3)
    assert at_once.update(1.5) == pytest.approx(0.5 / 1.5)


def test_recovery_is_monotone_capped_at_one_and_never_oscillates() -> None:
    c = OvershootController(target=0.8, smoothing=0.5, recovery=1.1, margin=0.2)
    c.update(4.0)  # cut to 0.2
    rng = np.random.default_rng(0)
    scales = []
    for _ in range(200):  # the run calms down: the ratio at the full rate falls to 0.5 +- 10%
        rho = 0.5 * (1 + 0.1 * rng.uniform(-1, 1))
        scales.append(c.update(rho * float(c.scale), scale_used=float(c.scale)))
    steps = np.diff([0.2, *scales])
    assert (steps >= -1e-15).all()  # never cut again on the way up
    assert scales[-1] == 1.0 and max(scales) <= 1.0


def test_a_stationary_ratio_gives_a_still_scale() -> None:
    c = OvershootController(target=0.8, smoothing=0.9, recovery=1.05, margin=0.2)
    rng = np.random.default_rng(1)
    scales = []
    for _ in range(300):  # the ratio at the full rate stays 2 +- 5%: the scale must settle, not cycle
        rho = 2.0 * (1 + 0.05 * rng.uniform(-1, 1))
        scales.append(c.update(rho * float(c.scale), scale_used=float(c.scale)))
    tail = np.array(scales[100:])
    changes = np.flatnonzero(np.diff(tail) != 0)
    assert tail.max() <= 0.8 / 1.9 and tail.min() >= 0.8 / 2.2
    assert len(changes) <= 5  # the odd max-update only, no cut/recover cycle


def test_the_floor_holds_and_pinned_counts_checks_that_still_overshoot_there() -> None:
    c = OvershootController(target=0.8, min_scale=0.1)
    assert c.update(50.0) == pytest.approx(0.1)
    for n in range(1, 4):
        c.update(3.0, scale_used=0.1)  # still r = 3 at the floor
        assert int(c.pinned) == n and float(c.scale) == pytest.approx(0.1)
    c.update(math.nan, scale_used=0.1)  # an invalid check neither counts nor resets
    assert int(c.pinned) == 3
    c.update(0.5, scale_used=0.1)
    assert int(c.pinned) == 0


def test_an_infinite_ratio_pins_the_floor_and_can_decay_again() -> None:
    c = OvershootController(target=0.8, min_scale=0.01, smoothing=0.5, recovery=2.0)
    assert c.update(math.inf) == pytest.approx(0.01)
    assert math.isfinite(float(c.smoothed))
    for _ in range(60):
        c.update(0.1 * float(c.scale), scale_used=float(c.scale))
    assert float(c.scale) == 1.0


def test_nan_ratios_change_nothing() -> None:
    c = OvershootController()
    c.update(0.3)
    state = c.state_dict()
    c.update(math.nan)
    assert c.state_dict() == state


def test_controller_state_round_trip_continues_identically() -> None:
    a = OvershootController(target=0.7, min_scale=0.05)
    for r in (0.2, 3.0, 0.5, 0.1):
        a.update(r, scale_used=float(a.scale))
    b = OvershootController(target=0.7, min_scale=0.05)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for r in (0.1, 0.05, 2.0):
        assert b.update(r) == a.update(r)


@pytest.mark.parametrize(("bad", "message"), [
    ({"target": 0.0}, "`target` must be a number > 0, got 0.0"),
    ({"smoothing": 1.0}, "`smoothing` must be a number in [0, 1), got 1.0"),
    ({"recovery": 1.0}, "`recovery` must be a number > 1, got 1.0"),
    ({"min_scale": 0.0}, "`min_scale` must be a number in (0, 1], got 0.0"),
    ({"margin": "0.1"}, "`margin` must be a number in [0, 1), got '0.1'"),
])  # fmt: skip
def test_controller_bad_arguments_name_the_value_and_what_is_allowed(bad: dict, message: str) -> None:
    with pytest.raises(ValueError) as error:
        OvershootController(**bad)
    assert str(error.value) == message
