import math

import numpy as np
import pytest

from lightning_diag.metrics.windows import RollingWindow, linear_fit


def _reference_fit(steps: np.ndarray, values: np.ndarray) -> tuple[float, float, float, float]:
    """OLS slope, its standard error, mean and span in float64 (numpy's polyfit)."""
    slope, intercept = np.polyfit(steps, values, 1)
    residuals = values - (slope * steps + intercept)
    sxx = float(np.sum((steps - steps.mean()) ** 2))
    stderr = math.sqrt(float(np.sum(residuals**2)) / (len(steps) - 2) / sxx)
    return float(slope), stderr, float(values.mean()), float(steps.max() - steps.min())


def test_linear_fit_matches_numpy_polyfit():
    rng = np.random.default_rng(3)
    steps = np.arange(1_000_000, 1_000_050, dtype=np.float64)
    values = 2.0 - 1e-3 * steps + rng.standard_normal(50)
    for g, w in zip(linear_fit(steps, values), _reference_fit(steps, values)):
        assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-12)


def test_linear_fit_is_zero_with_fewer_than_three_points_or_one_step():
    slope, stderr, mean, _ = linear_fit([1.0, 2.0], [5.0, 9.0])
    assert slope == pytest.approx(0.0, abs=1e-15) and stderr == pytest.approx(0.0, abs=1e-15)
    assert mean == pytest.approx(7.0)
    slope, _, _, span = linear_fit(np.full(4, 3.0), np.arange(4.0))
    assert slope == pytest.approx(0.0, abs=1e-15) and span == pytest.approx(0.0, abs=1e-15)


def test_window_keeps_the_last_size_finite_values_in_order():
    window = RollingWindow(3)
    for step, x in enumerate([1.0, float("nan"), 2.0, 3.0, float("inf"), 4.0]):
        window.update(x, step)
    assert int(window.count) == 4  # non-finite values never enter
    steps, values = window.ordered()
    assert steps.tolist() == [2.0, 3.0, 5.0] and values.tolist() == pytest.approx([2.0, 3.0, 4.0])


def test_relative_rise_is_zero_until_full_then_matches_the_float64_lower_bound():
    rng = np.random.default_rng(1)
    xs = 2.0 + 0.01 * np.arange(60) + 0.05 * rng.standard_normal(60)
    window = RollingWindow(25)
    for step, x in enumerate(xs):
        window.update(x, step)
        if step < 24:
            assert window.relative_rise() == pytest.approx(0.0, abs=1e-15)
            continue
        steps = np.arange(step - 24, step + 1, dtype=np.float64)
        slope, stderr, mean, span = _reference_fit(steps, xs[step - 24 : step + 1])
        want = (slope - 3.0 * stderr) * span / abs(mean)
        assert math.isclose(window.relative_rise(3.0), want, rel_tol=1e-9, abs_tol=1e-12)


def test_relative_rise_lower_bound_stays_negative_on_a_stationary_stream():
    rng = np.random.default_rng(2)
    window = RollingWindow(100)
    worst = -math.inf
    for step, x in enumerate(1.0 + 0.1 * rng.standard_normal(2000)):
        window.update(x, step)
        worst = max(worst, window.relative_rise(3.0))
    assert worst < 0.01


def test_window_state_dict_round_trip_and_size_check():
    window = RollingWindow(4)
    for step in range(6):
        window.update(float(step), step)
    clone = RollingWindow(4)
    clone.load_state_dict(window.state_dict())
    assert [a.tolist() for a in clone.ordered()] == [a.tolist() for a in window.ordered()]
    assert int(clone.count) == 6
    with pytest.raises(ValueError, match="shape"):
        RollingWindow(5).load_state_dict(window.state_dict())


@pytest.mark.parametrize("size", [2, 0, 3.5, True])
def test_window_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="size"):
        RollingWindow(size)
