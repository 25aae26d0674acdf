"""Spectral-alignment math against float64 references (torch.linalg.svd and numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_diag.metrics.spectral import (
    alignment_histogram,
    alignment_summary,
    power_iteration,
    spectral_alignment,
    stable_rank,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_spectrum(d_out: int, d_in: int, s: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """float64 matrix U diag(s) V^T with random orthonormal U, V and the given singular values."""
    k = len(s)
    u, _ = torch.linalg.qr(torch.randn(d_out, k, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d_in, k, generator=gen, dtype=torch.float64))
    return u @ torch.diag(s.double()) @ v.T


def _check_top_triplet(w, sigma, u, v, rtol):
    """sigma, u, v agree with the SVD of w up to the sign of the singular pair."""
    u_ref, s_ref, vh_ref = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(sigma, s_ref[..., 0], rtol=rtol, atol=0)
    sign = torch.sign((v * vh_ref[..., 0, :]).sum(-1, keepdim=True))
    torch.testing.assert_close(sign * v, vh_ref[..., 0, :], rtol=0, atol=rtol**0.5)
    torch.testing.assert_close(sign * u, u_ref[..., :, 0], rtol=0, atol=rtol**0.5)


@pytest.mark.parametrize("shape", [(16, 16), (24, 10), (10, 24), (3, 12, 20)])
def test_power_iteration_matches_svd_float64(shape):
    w = torch.randn(*shape, generator=_gen(1), dtype=torch.float64)
    # Plain Gaussian matrices can have s2/s1 ~ 0.9: give the cold start enough iterations.
    sigma, u, v = power_iteration(w, iters=500)
    assert sigma.dtype == torch.float64 and sigma.shape == shape[:-2]
    assert u.shape == shape[:-1] and v.shape == shape[:-2] + shape[-1:]
    _check_top_triplet(w, sigma, u, v, rtol=1e-10)
    # What the return convention promises: W v1 = sigma1 u1, unit vectors.
    torch.testing.assert_close(w @ v.unsqueeze(-1), (sigma[..., None] * u).unsqueeze(-1))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones_like(sigma))


def test_power_iteration_cold_start_default_iters_converges_with_a_gap():
    gen = _gen(2)
    s = torch.tensor([2.0, 1.0, 0.9, 0.5, 0.1])
    w = torch.stack([_with_spectrum(30, 20, s, gen) for _ in range(4)])
    sigma, u, v = power_iteration(w)  # iters=2 is raised to 20 without a start vector
    # (s2/s1)^(2*20) = 2^-40 ~ 1e-12 on the vector, squared on the Rayleigh quotient.
    _check_top_triplet(w, sigma, u, v, rtol=1e-12)


def test_power_iteration_cold_start_is_deterministic_and_leaves_global_rng_alone():
    w = torch.randn(8, 5, generator=_gen(3))
    state = torch.get_rng_state()
    first = power_iteration(w)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first, power_iteration(w)):
        assert torch.equal(a, b)


def test_power_iteration_warm_start_converges_in_one_or_two_iterations():
    gen = _gen(4)
    w = _with_spectrum(40, 32, torch.tensor([3.0, 1.5, 1.0, 0.2]), gen)
    s1 = torch.linalg.svdvals(w)[0]
    v_true = torch.linalg.svd(w).Vh[0]
    noise = torch.randn(32, generator=gen, dtype=torch.float64)
    v0 = v_true + 1e-3 * noise / noise.norm()  # previous check's v1, weights moved a little

    def angle_error(v):
        return 1 - (v @ v_true).abs()

    _, _, v_one = power_iteration(w, v0, iters=1)
    sigma, _, v_two = power_iteration(w, v0, iters=2)
    # Each iteration divides the angle by s1^2 / s2^2 = 4, the 1 - cos error by 16.
    assert angle_error(v_one) < angle_error(v0 / v0.norm()) / 10
    assert angle_error(v_two) < 1e-10
    torch.testing.assert_close(sigma, s1, rtol=1e-10, atol=0)
    # The warm start keeps the sign of the previous vector (no mirror flip between checks).
    assert v_two @ v0 > 0


def test_power_iteration_warm_start_accepts_unnormalised_batched_start():
    gen = _gen(5)
    s = torch.tensor([5.0, 1.0, 0.5])
    w = torch.stack([_with_spectrum(12, 9, s, gen) for _ in range(3)])
    v_ref = torch.linalg.svd(w).Vh[:, 0]
    sigma, _, v = power_iteration(w, 7.0 * v_ref, iters=1)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(sigma, torch.full((3,), 5.0, dtype=torch.float64))


def test_power_iteration_ill_conditioned_matrix():
    # Condition number 1e12, but a healthy top gap (s2/s1 ~ 0.41): only the top matters.
    s = torch.logspace(0, -12, 32, dtype=torch.float64)
    w = _with_spectrum(48, 32, s, _gen(6))
    sigma, u, v = power_iteration(w, iters=40)
    _check_top_triplet(w, sigma, u, v, rtol=1e-12)


def test_power_iteration_near_degenerate_top_keeps_rayleigh_quotient_and_top_subspace():
    # s1 = s2 (1 + 1e-6): v1 is numerically ill-defined and the iterate may sit anywhere in the
    # top-2 right singular subspace. What must still hold: sigma1 is within the gap of s1, and
    # the vector has (almost) no component outside that subspace.
    s2 = 2.0
    s = torch.tensor([s2 * (1 + 1e-6), s2, 1.0, 0.5, 0.25], dtype=torch.float64)
    w = _with_spectrum(20, 16, s, _gen(7))
    vh = torch.linalg.svd(w).Vh
    sigma, u, v = power_iteration(w)
    assert abs(sigma - s[0]) / s[0] <= 1.5e-6
    torch.testing.assert_close((vh[:2] @ v).norm(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(w @ v, sigma * u)


def test_power_iteration_zero_matrix_gives_zero_sigma_without_nan():
    sigma, u, v = power_iteration(torch.zeros(5, 3))
    assert sigma == 0 and torch.equal(u, torch.zeros(5))
    assert torch.isfinite(v).all() and torch.isclose(v.norm(), torch.tensor(1.0))

    # In a batch, a zero matrix does not disturb its neighbours and keeps its start vector.
    w = torch.stack([torch.zeros(4, 3), torch.diag(torch.tensor([1.0, 3.0, 2.0])).repeat(2, 1)[:4]])
    v0 = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    sigma, u, v = power_iteration(w, v0, iters=50)
    assert torch.isfinite(sigma).all() and torch.isfinite(u).all() and torch.isfinite(v).all()
    assert sigma[0] == 0 and torch.equal(v[0], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(sigma[1], torch.linalg.svdvals(w[1])[0])


def test_power_iteration_upcasts_bfloat16():
    w = torch.randn(4, 32, 24, generator=_gen(8)).bfloat16()
    v0 = torch.randn(4, 24, generator=_gen(9)).bfloat16()
    sigma, u, v = power_iteration(w, v0, iters=3)
    assert sigma.dtype == u.dtype == v.dtype == torch.float32
    assert torch.isfinite(sigma).all()
    ref = power_iteration(w.float(), v0.float(), iters=3)
    for got, want in zip((sigma, u, v), ref):
        torch.testing.assert_close(got, want)
    # Run to convergence, the float32 result is the s1 of the bf16 matrix (a lower bound before).
    s1 = torch.linalg.svdvals(w.double())[:, 0].float()
    assert (sigma <= s1 * (1 + 1e-6)).all()
    torch.testing.assert_close(power_iteration(w, iters=300)[0], s1, rtol=1e-5, atol=0)


def test_power_iteration_rejects_bad_shapes():
    with pytest.raises(ValueError, match="d_out, d_in"):
        power_iteration(torch.zeros(3))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        power_iteration(torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="iters"):
        power_iteration(torch.zeros(2, 4), iters=-1)


def _numpy_alignment(x: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, v = x.astype(np.float64), v.astype(np.float64)
    norms = np.linalg.norm(x, axis=-1)
    proj = np.einsum("...nd,...d->...n", x, v) / np.linalg.norm(v, axis=-1)[..., None]
    return np.where(norms > 0, proj / np.where(norms > 0, norms, 1.0), 0.0)


def _numpy_summary(a: np.ndarray) -> dict[str, np.ndarray]:
    a = a.astype(np.float64)
    pos, neg = (a > 0).sum(-1), (a < 0).sum(-1)
    p = pos / (pos + neg)
    return {
        "frac_positive": p,
        "sign_diversity": 1 - np.abs(2 * p - 1),
        "collapse": np.abs(2 * p - 1),
        "mean_abs": np.abs(a).mean(-1),
        "abs_mean": np.abs(a.mean(-1)),
        "std": a.std(-1),
    }


def _assert_summary_close(summary, reference, atol=1e-6):
    for name, want in reference.items():
        got = getattr(summary, name)
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=atol, err_msg=name)


def test_spectral_alignment_matches_numpy_cosine():
    x = torch.randn(3, 50, 16, generator=_gen(10))
    x[1, 7] = 0  # a zero row (padding) gives 0, not NaN
    v = torch.randn(3, 16, generator=_gen(11))
    got = spectral_alignment(x, v)
    assert got.shape == (3, 50)
    np.testing.assert_allclose(got.numpy(), _numpy_alignment(x.numpy(), v.numpy()), atol=1e-6)
    assert got[1, 7] == 0
    # The unbatched form gives the same numbers per layer.
    torch.testing.assert_close(spectral_alignment(x[2], v[2]), got[2])


def test_spectral_alignment_upcasts_bfloat16_and_stays_in_range():
    x = torch.randn(200, 32, generator=_gen(12))
    v = x[0].clone()  # row 0 is exactly aligned: cos must be 1, not 1 + rounding
    got = spectral_alignment(x.bfloat16(), v.bfloat16())
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert got.abs().max() <= 1.0 and torch.isclose(got[0], torch.tensor(1.0))
    torch.testing.assert_close(got, spectral_alignment(x, v), atol=2e-2, rtol=0)


def test_spectral_alignment_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="reshape|d_in"):
        spectral_alignment(torch.zeros(2, 5, 8), torch.zeros(8))


def test_sign_diversity_is_zero_when_all_inputs_lie_on_one_side():
    v = torch.randn(2, 16, generator=_gen(13))
    x = torch.randn(2, 64, 16, generator=_gen(14))
    # Reflect every row to the positive side of v.
    side = torch.sign((x * v[:, None]).sum(-1, keepdim=True))
    s = alignment_summary(spectral_alignment(side * x, v))
    torch.testing.assert_close(s.sign_diversity, torch.zeros(2))
    torch.testing.assert_close(s.collapse, torch.ones(2))
    torch.testing.assert_close(s.frac_positive, torch.ones(2))


def test_sign_diversity_is_one_for_symmetric_inputs():
    x = torch.randn(40, 8, generator=_gen(15))
    v = torch.randn(8, generator=_gen(16))
    s = alignment_summary(spectral_alignment(torch.cat([x, -x]), v))
    assert s.sign_diversity == 1 and s.collapse == 0 and s.frac_positive == 0.5
    assert s.abs_mean < 1e-7
    _assert_summary_close(s, _numpy_summary(_numpy_alignment(np.concatenate([x, -x]), v.numpy())))


def test_alignment_summary_matches_numpy_on_random_inputs():
    gen = _gen(17)
    # A mean offset makes the signs unbalanced, so p+ is not trivially 1/2.
    x = torch.randn(4, 300, 24, generator=gen) + 0.3 * torch.randn(4, 1, 24, generator=gen)
    x[0, :5] = 0  # zero rows: neither side in p+, but counted in the magnitudes
    v = torch.randn(4, 24, generator=gen)
    ref = _numpy_summary(_numpy_alignment(x.numpy(), v.numpy()))
    _assert_summary_close(alignment_summary(spectral_alignment(x, v)), ref)


def test_alignment_summary_is_invariant_to_flipping_v1():
    x = torch.randn(3, 100, 12, generator=_gen(18)) + 0.5
    v = torch.randn(3, 12, generator=_gen(19))
    a, a_flipped = spectral_alignment(x, v), spectral_alignment(x, -v)
    s, s_flipped = alignment_summary(a), alignment_summary(a_flipped)
    for name in ("sign_diversity", "collapse", "mean_abs", "abs_mean", "std"):
        torch.testing.assert_close(getattr(s_flipped, name), getattr(s, name), msg=name)
    # p+ is the one figure that mirrors, by definition.
    torch.testing.assert_close(s_flipped.frac_positive, 1 - s.frac_positive)
    assert torch.equal(alignment_histogram(a_flipped), alignment_histogram(a).flip(-1))


def test_alignment_summary_without_any_sign_is_nan_not_healthy():
    s = alignment_summary(torch.zeros(2, 10))
    assert torch.isnan(s.sign_diversity).all() and torch.isnan(s.frac_positive).all()
    assert torch.equal(s.mean_abs, torch.zeros(2)) and torch.equal(s.std, torch.zeros(2))


def test_alignment_histogram_matches_numpy_histogram():
    a = torch.rand(3, 500, generator=_gen(20)) * 2 - 1
    a[0, :3] = torch.tensor([-1.0, 1.0, float("nan")])  # both ends counted, NaN dropped
    got = alignment_histogram(a, bins=16)
    assert got.shape == (3, 16) and got.dtype == torch.long
    for row, counts in zip(a.numpy(), got.numpy()):
        want, _ = np.histogram(row[np.isfinite(row)], bins=16, range=(-1, 1))
        np.testing.assert_array_equal(counts, want)


def test_stable_rank_matches_numpy_and_is_scale_invariant():
    w = torch.randn(3, 20, 12, generator=_gen(21), dtype=torch.float64)
    s = np.linalg.svd(w.numpy(), compute_uv=False)
    want = (s**2).sum(-1) / s[:, 0] ** 2
    sigma = torch.linalg.svdvals(w)[:, 0]
    np.testing.assert_allclose(stable_rank(w, sigma).numpy(), want, rtol=1e-12)
    # With power-iteration sigma and with the matrix scaled by 1000: same figure.
    sigma_pi = power_iteration(w, iters=500)[0]
    np.testing.assert_allclose(stable_rank(w, sigma_pi).numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(stable_rank(1e3 * w, 1e3 * sigma).numpy(), want, rtol=1e-12)


def test_stable_rank_of_zero_matrix_is_zero():
    w = torch.stack([torch.zeros(4, 4), torch.eye(4)])
    got = stable_rank(w, power_iteration(w)[0])
    torch.testing.assert_close(got, torch.tensor([0.0, 4.0]))
