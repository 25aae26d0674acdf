"""The suite's ground truth on tiny synthetic traces: the explosion definition and the healthy phase."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_diag.testbeds.labels import divergence_step, explosion_step, healthy_end


def noisy(level: float, n: int, rel: float = 0.05, seed: int = 0) -> list[float]:
    """``n`` losses at ``level`` with +-``rel`` relative uniform noise."""
    rng = np.random.default_rng(seed)
    return list(level * (1 + rel * rng.uniform(-1, 1, n)))


def converging(n: int = 300, start: float = 2.3, floor: float = 0.01, seed: int = 0) -> list[float]:
    """A loss falling from ``start`` to ``floor``, with multiplicative noise that triples it at times near 0."""
    rng = np.random.default_rng(seed)
    clean = floor + (start - floor) * np.exp(-np.arange(n) / 30)
    return list(clean * np.exp(rng.normal(0.0, 0.6, n)))


def test_noise_near_zero_is_not_an_explosion_where_the_relative_rule_misfires():
    losses = converging()
    assert divergence_step(losses) is not None  # 3x the running minimum on noise alone
    assert explosion_step(losses) is None


def test_a_climb_back_past_half_the_progress_is_an_explosion_dated_to_its_start():
    losses = converging(200) + [1.4] * 30  # best ~0.005, reference ~2: 1.4 gave back more than half
    assert explosion_step(losses) == 200


def test_a_climb_that_gives_back_less_than_half_the_progress_is_not():
    losses = converging(200) + [0.8] * 30  # reference ~2 (median of the first 5), half-way ~1.0
    assert explosion_step(losses) is None


def test_before_any_progress_the_loss_must_rise_half_above_its_best():
    flat = noisy(4.6, 100)  # no progress: the uninformed loss with 5% noise
    assert explosion_step(flat) is None
    assert explosion_step(flat + [7.5] * 20) == 100


def test_the_first_non_finite_loss_is_an_explosion_and_a_climb_into_it_dates_it_earlier():
    assert explosion_step(noisy(2.0, 50) + [math.nan, 3.0]) == 50
    assert explosion_step(noisy(2.0, 50) + [math.inf]) == 50
    climbing = noisy(2.0, 50) + [3.5, 4.0, 8.0, math.inf]
    assert explosion_step(climbing) == 50


def test_a_short_excursion_is_not_an_explosion_but_a_sustained_one_is():
    losses = converging(200)
    short = losses + [2.0] * 9 + losses[-50:]
    assert explosion_step(short) is None
    assert explosion_step(short, patience=9) == 200


def test_an_explicit_reference_replaces_the_first_losses():
    losses = [1.0] * 5 + [0.2] * 50 + [0.75] * 20  # median of the first 5 = 1.0: half-way = 0.6
    assert explosion_step(losses) == 55
    assert explosion_step(losses, reference=2.3) is None  # half-way to 2.3 is 1.25


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"progress_lost": 0.0}, "progress_lost"), ({"min_ratio": 1.0}, "min_ratio"), ({"patience": 0}, "patience"),
     ({"reference_steps": 0}, "reference_steps")],
)  # fmt: skip
def test_explosion_step_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        explosion_step([1.0, 2.0], **kwargs)


def test_all_non_finite_or_empty_losses():
    assert explosion_step([math.nan, math.nan]) == 0
    assert explosion_step([]) is None


# ---------------------------------------------------------------------------------- healthy phase


def test_healthy_phase_ends_where_the_learning_rate_passes_the_twins():
    ramp = [1e-3 * 1.05**t for t in range(200)]
    safe = 0.1
    end = healthy_end(ramp, safe)
    assert ramp[end - 1] <= safe < ramp[end]


def test_healthy_phase_ends_at_a_fault_or_the_explosion_if_earlier():
    ramp = [1e-3 * 1.05**t for t in range(200)]
    assert healthy_end(ramp, 0.1, fault_step=20) == 20
    assert healthy_end(ramp, 0.1, explosion=30) == 30
    assert healthy_end([0.1] * 100, 0.1, fault_step=60) == 60  # a shock at the twin's own rate


def test_a_constant_rate_above_the_twins_has_no_healthy_phase_and_none_below_is_all_healthy():
    assert healthy_end([0.5] * 100, 0.05) == 0
    assert healthy_end([0.05] * 100, 0.05) == 100
    assert healthy_end([0.05] * 100, None) == 100


def test_the_rate_comparison_tolerates_float_recomputation():
    assert healthy_end([0.1 * (1 + 1e-12)] * 10, 0.1) == 10
