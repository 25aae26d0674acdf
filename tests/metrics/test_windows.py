import math

import numpy as np
import pytest
import torch

from lightning_diag.metrics.windows import RollingWindow, linear_fit


def _reference_fit(steps: np.ndarray, values: np.ndarray) -> tuple[float, float, float, float]:
    """OLS slope, its standard error, mean and span in float64 (numpy's polyfit)."""
    slope, intercept = np.polyfit(steps, values, 1)
    residuals = values - (slope * steps + intercept)
    sxx = float(np.sum((steps - steps.mean()) ** 2))
    stderr = math.sqrt(float(np.sum(residuals**2)) / (len(steps) - 2) / sxx)
    return float(slope), stderr, float(values.mean()), float(steps.max() - steps.min())


def test_linear_fit_matches_numpy_polyfit_on_a_masked_window():
    rng = np.random.default_rng(0)
    steps = np.arange(100, 140, dtype=np.float64)
    values = 3.0 + 0.05 * steps + rng.standard_normal(40)
    valid = np.ones(40, dtype=bool)
    valid[[3, 17, 30]] = False
    got = linear_fit(torch.from_numpy(steps), torch.from_numpy(values), torch.from_numpy(valid))
    want = _reference_fit(steps[valid], values[valid])
    for g, w in zip(got, want):
        assert math.isclose(float(g), w, rel_tol=1e-9, abs_tol=1e-12)


def test_linear_fit_without_a_mask_matches_numpy_polyfit():
    rng = np.random.default_rng(3)
    steps = np.arange(1_000_000, 1_000_050, dtype=np.float64)
    values = 2.0 - 1e-3 * steps + rng.standard_normal(50)
    got = linear_fit(torch.from_numpy(steps), torch.from_numpy(values))
    for g, w in zip(got, _reference_fit(steps, values)):
        assert math.isclose(float(g), w, rel_tol=1e-9, abs_tol=1e-12)


def test_linear_fit_is_zero_with_fewer_than_three_points_or_one_step():
    two = linear_fit(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 9.0]), torch.tensor([True, True]))
    assert float(two[0]) == 0.0 and float(two[1]) == 0.0 and float(two[2]) == 7.0
    same_step = linear_fit(torch.full((4,), 3.0), torch.arange(4.0), torch.ones(4, dtype=torch.bool))
    assert float(same_step[0]) == 0.0 and float(same_step[3]) == 0.0
    for valid in (None, torch.ones(2, dtype=torch.bool)):
        slope, stderr, _, _ = linear_fit(torch.tensor([1.0, 2.0]), torch.tensor([5.0, 9.0]), valid)
        assert float(slope) == 0.0 and float(stderr) == 0.0
    assert float(linear_fit(torch.full((4,), 3.0), torch.arange(4.0))[0]) == 0.0


def test_window_keeps_the_last_size_finite_values_in_ring_order():
    window = RollingWindow(3)
    for step, x in enumerate([1.0, float("nan"), 2.0, 3.0, float("inf"), 4.0]):
        window.update(torch.tensor(x, dtype=torch.float64), step)
    assert int(window.count) == 4  # non-finite values never enter
    assert sorted(zip(window.steps.tolist(), window.values.tolist())) == [(2.0, 2.0), (3.0, 3.0), (5.0, 4.0)]


def test_relative_rise_is_zero_until_full_then_matches_the_float64_lower_bound():
    rng = np.random.default_rng(1)
    xs = 2.0 + 0.01 * np.arange(60) + 0.05 * rng.standard_normal(60)
    window = RollingWindow(25)
    for step, x in enumerate(xs):
        window.update(torch.tensor(x, dtype=torch.float64), step)
        if step < 24:
            assert float(window.relative_rise()) == 0.0
            continue
        steps = np.arange(step - 24, step + 1, dtype=np.float64)
        slope, stderr, mean, span = _reference_fit(steps, xs[step - 24 : step + 1])
        want = (slope - 3.0 * stderr) * span / abs(mean)
        assert math.isclose(float(window.relative_rise(3.0)), want, rel_tol=1e-9, abs_tol=1e-12)


def test_relative_rise_lower_bound_stays_negative_on_a_stationary_stream():
    rng = np.random.default_rng(2)
    window = RollingWindow(100)
    worst = -math.inf
    for step, x in enumerate(1.0 + 0.1 * rng.standard_normal(2000)):
        window.update(torch.tensor(x), step)
        worst = max(worst, float(window.relative_rise(3.0)))
    assert worst < 0.01


def test_window_state_dict_round_trip_and_size_check():
    window = RollingWindow(4)
    for step in range(6):
        window.update(torch.tensor(float(step)), step)
    clone = RollingWindow(4)
    clone.load_state_dict(window.state_dict())
    assert torch.equal(clone.values, window.values) and torch.equal(clone.steps, window.steps)
    assert int(clone.count) == 6
    with pytest.raises(ValueError, match="keeps 5"):
        RollingWindow(5).load_state_dict(window.state_dict())


@pytest.mark.parametrize("size", [2, 0, 3.5, True])
def test_window_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="size"):
        RollingWindow(size)
