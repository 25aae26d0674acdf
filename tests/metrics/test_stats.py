import math

import numpy as np
import pytest
import torch

from lightning_diag.metrics.spikes import LossStatistics
from lightning_diag.metrics.state import Stateful
from lightning_diag.metrics.stats import EmaBaseline, zclip_coefficient


def _reference(xs: list[float], alpha: float, warmup: int) -> list[tuple[float, float, float]]:
    """(z before absorbing x, mean, var) after each x: ZClip's rule written out in float64."""
    out, seen, mean, var = [], [], 0.0, 0.0
    for x in xs:
        ready = len(seen) >= warmup
        z = (x - mean) / (math.sqrt(var) + 1e-6) if ready else 0.0
        if not np.isfinite(x):
            out.append((z, mean, var))
            continue
        if len(seen) < warmup:
            seen.append(x)
            mean, var = float(np.mean(seen)), float(np.var(seen))
        else:
            mean = alpha * mean + (1 - alpha) * x
            var = alpha * var + (1 - alpha) * (x - mean) ** 2
        out.append((z, mean, var))
    return out


def test_baseline_matches_the_float64_reference_through_warmup_and_ema():
    rng = np.random.default_rng(0)
    xs = (5 + rng.standard_normal(60)).tolist()
    xs[40] = float("nan")
    ema = EmaBaseline(alpha=0.9, warmup=7)
    for x, (z_ref, mean_ref, var_ref) in zip(xs, _reference(xs, 0.9, 7)):
        z = ema.score([x])[0]
        ema.update([x])
        if np.isfinite(x):
            assert math.isclose(z, z_ref, rel_tol=1e-9, abs_tol=1e-9)
        assert math.isclose(ema.mean[0], mean_ref, rel_tol=1e-12)
        assert math.isclose(ema.var[0], var_ref, rel_tol=1e-9, abs_tol=1e-12)


def test_streams_are_independent_and_equal_one_baseline_each():
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((30, 3)) * [1.0, 10.0, 0.1]
    together, alone = EmaBaseline(3, warmup=5), [EmaBaseline(1, warmup=5) for _ in range(3)]
    for row in xs:
        together.update(row)
        for j, baseline in enumerate(alone):
            baseline.update([row[j]])
    for j, baseline in enumerate(alone):
        assert together.mean[j] == pytest.approx(baseline.mean[0], rel=1e-12)
        assert together.var[j] == pytest.approx(baseline.var[0], rel=1e-12)


def test_zscore_is_zero_during_warmup_and_ready_after():
    ema = EmaBaseline(warmup=3)
    for x in [1.0, 100.0]:
        assert ema.score([x])[0] == pytest.approx(0.0, abs=1e-15)
        ema.update([x])
    assert not ema.ready[0]
    ema.update([2.0])
    assert ema.ready[0]


def test_nonfinite_and_masked_values_are_not_absorbed():
    ema = EmaBaseline(warmup=2)
    for x in [1.0, float("inf"), 3.0, float("nan")]:
        ema.update([x])
    ema.update([50.0], absorb=[False])
    assert int(ema.count[0]) == 2
    assert ema.mean[0] == pytest.approx(2.0) and ema.var[0] == pytest.approx(1.0)


def test_winsorized_clips_spikes_to_the_zclip_target_and_passes_the_rest():
    ema = EmaBaseline(warmup=4)
    for x in [1.0, 2.0, 3.0, 2.0]:
        ema.update([x])
    mean, std = 2.0, math.sqrt(0.5)
    z_ref = (10.0 - mean) / (std + 1e-6)
    assert ema.winsorized([10.0], 2.5)[0] == pytest.approx(mean + 2.5**2 / z_ref * std, rel=1e-12)
    assert ema.winsorized([2.5], 2.5)[0] == pytest.approx(2.5, rel=1e-12)
    assert math.isinf(ema.winsorized([float("inf")], 2.5)[0])


def test_device_coefficient_equals_the_host_clip():
    ema = EmaBaseline(warmup=4)
    for x in [1.0, 2.0, 3.0, 2.0]:
        ema.update([x])
    for norm in (10.0, 2.1, 50.0):
        coef = zclip_coefficient(torch.tensor(norm), float(ema.mean[0]), float(ema.std[0]), 2.5)
        assert float(coef) == pytest.approx(ema.winsorized([norm], 2.5)[0] / norm, rel=1e-12)
    assert float(zclip_coefficient(torch.tensor(9.0), 2.0, 1.0, 2.5, ready=False)) == pytest.approx(1.0)
    assert float(zclip_coefficient(torch.tensor(float("nan")), 2.0, 1.0, 2.5)) == pytest.approx(1.0)


def test_state_dict_round_trip_continues_the_same_stream():
    a, b = EmaBaseline(warmup=3), EmaBaseline(warmup=3)
    for x in [1.0, 2.0, 4.0, 3.0]:
        a.update([x])
    b.load_state_dict(a.state_dict())
    for x in [5.0, 2.0]:
        a.update([x])
        b.update([x])
    assert (a.mean[0], a.var[0], a.count[0]) == pytest.approx((b.mean[0], b.var[0], b.count[0]), rel=1e-15)


def test_grow_keeps_old_streams_and_a_bad_shape_is_refused():
    ema = EmaBaseline(1, warmup=2)
    ema.update([4.0])
    ema.grow(3)
    assert ema.mean.tolist() == pytest.approx([4.0, 0.0, 0.0]) and ema.count.tolist() == [1, 0, 0]
    with pytest.raises(ValueError, match="shape"):
        EmaBaseline(2).load_state_dict(ema.state_dict())


def test_declared_state_derives_reset_and_state_dict():
    class Counter(Stateful):
        def __init__(self) -> None:
            self.add_state("hits", 0, size=2)
            self.add_state("total", 0.0)

    c = Counter()
    c.hits += 1
    c.total = np.float64(3.5)
    saved = c.state_dict()
    c.reset()
    assert c.hits.tolist() == [0, 0] and float(c.total) == pytest.approx(0.0)
    c.load_state_dict(saved)
    assert c.hits.tolist() == [1, 1] and float(c.total) == pytest.approx(3.5)


@pytest.mark.parametrize(
    "kwargs, shown",
    [({"alpha": 1.0}, "`alpha` must be a number in (0, 1), got 1.0"), ({"alpha": 0.0}, "alpha"),
     ({"warmup": 0}, "warmup"), ({"eps": -1.0}, "`eps` must be a number >= 0, got -1.0"),
     # check_number: each was accepted before, or failed with a TypeError from the comparison
     ({"alpha": float("nan")}, "`alpha` must be a number in (0, 1), got nan"),
     ({"alpha": "0.9"}, "`alpha` must be a number in (0, 1), got '0.9'"),
     ({"alpha": True}, "`alpha` must be a number in (0, 1), got True"),
     ({"eps": "1e-6"}, "`eps` must be a number >= 0, got '1e-6'"),
     ({"eps": float("nan")}, "`eps` must be a number >= 0, got nan")],
)
def test_bad_arguments_name_the_value(kwargs, shown):
    with pytest.raises(ValueError) as error:
        EmaBaseline(**kwargs)
    assert shown in str(error.value)


@pytest.mark.parametrize(
    "kwargs, shown",
    [({"winsorize": 0.0}, "`winsorize` must be a number > 0, got 0.0"),
     ({"winsorize": "6"}, "`winsorize` must be a number > 0, got '6'"),
     ({"trend_confidence": -1.0}, "`trend_confidence` must be a number >= 0, got -1.0"),
     ({"trend_confidence": float("nan")}, "`trend_confidence` must be a number >= 0, got nan"),
     ({"mode": "up"}, "`mode` must be one of ('min', 'max'), got 'up'")],
)
def test_loss_statistics_bad_arguments_name_the_value(kwargs, shown):
    with pytest.raises(ValueError) as error:
        LossStatistics(**kwargs)
    assert shown in str(error.value)
