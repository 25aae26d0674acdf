import math

import numpy as np
import pytest
import torch

from lightning_diag.metrics.stats import EmaZScore, zclip


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


def test_ema_zscore_matches_float64_reference_through_warmup_and_ema():
    rng = np.random.default_rng(0)
    xs = (5 + rng.standard_normal(60)).tolist()
    xs[40] = float("nan")
    ema = EmaZScore(alpha=0.9, warmup=7)
    for x, (z_ref, mean_ref, var_ref) in zip(xs, _reference(xs, 0.9, 7)):
        z = ema.score(torch.tensor(x))
        ema.update(torch.tensor(x))
        if np.isfinite(x):
            assert math.isclose(z.item(), z_ref, rel_tol=1e-4, abs_tol=1e-5)
        assert math.isclose(ema.mean.item(), mean_ref, rel_tol=1e-5)
        assert math.isclose(ema.var.item(), var_ref, rel_tol=1e-4, abs_tol=1e-7)


def test_zscore_is_zero_during_warmup_and_ready_after():
    ema = EmaZScore(warmup=3)
    for x in [1.0, 100.0]:
        assert ema.score(torch.tensor(x)).item() == 0.0
        ema.update(torch.tensor(x))
    assert not bool(ema.ready)
    ema.update(torch.tensor(2.0))
    assert bool(ema.ready)


def test_nonfinite_values_are_not_absorbed():
    ema = EmaZScore(warmup=2)
    for x in [1.0, float("inf"), 3.0, float("nan")]:
        ema.update(torch.tensor(x))
    assert ema.count.item() == 2 and ema.mean.item() == 2.0 and ema.var.item() == 1.0


def test_zclip_clips_spikes_to_the_zclip_target_and_passes_normal_values():
    ema = EmaZScore(warmup=4)
    for x in [1.0, 2.0, 3.0, 2.0]:
        ema.update(torch.tensor(x))
    mean, std = 2.0, math.sqrt(0.5)
    z, clipped = zclip(torch.tensor(10.0), ema, 2.5)
    z_ref = (10.0 - mean) / (std + 1e-6)
    assert math.isclose(z.item(), z_ref, rel_tol=1e-5)
    assert math.isclose(clipped.item(), mean + 2.5**2 / z_ref * std, rel_tol=1e-5)
    z, clipped = zclip(torch.tensor(2.5), ema, 2.5)
    assert z.item() < 2.5 and clipped.item() == 2.5
    _, clipped = zclip(torch.tensor(float("inf")), ema, 2.5)
    assert math.isinf(clipped.item())


def test_state_dict_round_trip_continues_the_same_stream():
    a, b = EmaZScore(warmup=3), EmaZScore(warmup=3)
    for x in [1.0, 2.0, 4.0, 3.0]:
        a.update(torch.tensor(x))
    b.load_state_dict(a.state_dict())
    for x in [5.0, 2.0]:
        a.update(torch.tensor(x))
        b.update(torch.tensor(x))
    assert (a.mean.item(), a.var.item(), a.count.item()) == (b.mean.item(), b.var.item(), b.count.item())


@pytest.mark.parametrize(
    "kwargs, match",
    [({"alpha": 1.0}, "alpha"), ({"alpha": 0.0}, "alpha"), ({"warmup": 1}, "warmup"), ({"eps": -1.0}, "eps")],
)
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EmaZScore(**kwargs)
