"""``top_singular``, the warm-started power iteration the spectral monitor runs at every check,
against numpy's SVD in float64, and row-sharded (a fake in-process all-reduce) against unsharded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_sharded_spectral import ThreadGroup

from lightning_diag.metrics.spectral import top_singular

# ThreadGroup: threads that sum tensors over each other, as torch.distributed.all_reduce would


def _spectrum(spectra: list[list[float]], d_out: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """``(B, d_out, d_in)`` float64 matrices ``U diag(s) V^T`` with given singular values (random U, V)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in spectra:
        u, _ = torch.linalg.qr(torch.randn(d_out, len(s), generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(d_in, len(s), generator=g, dtype=torch.float64))
        out.append(u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T)
    return torch.stack(out)


# s_2 / s_1 of 0.5, 0.6 and 0.4: the vector error shrinks by (s_2 / s_1)^2 per iteration
SPECTRA = [[3.0, 1.5, 1.0, 0.5, 0.2], [2.0, 1.2, 0.3, 0.1, 0.0], [5.0, 2.0, 2.0, 1.0, 0.5]]


def _svd(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """numpy's s_1 and v_1 of each matrix of a stack, in float64."""
    _, s, vt = np.linalg.svd(w.double().numpy())
    return s[:, 0], vt[:, 0, :]


def _assert_top(sigma: torch.Tensor, v: torch.Tensor, w: torch.Tensor, rel: float) -> None:
    s1, v1 = _svd(w)
    assert v.shape == (w.shape[0], w.shape[2], 1)
    np.testing.assert_allclose(sigma.double().numpy(), s1, rtol=rel)
    np.testing.assert_allclose(np.linalg.norm(v.squeeze(-1).double().numpy(), axis=1), 1.0, rtol=rel)
    cosines = np.abs(np.einsum("bi,bi->b", v.squeeze(-1).double().numpy(), v1))  # v_1 is defined up to sign
    np.testing.assert_allclose(cosines, 1.0, rtol=math.sqrt(rel))  # sigma's error is the square of v's


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cold_start_of_a_batch_matches_numpy_svd(dtype: torch.dtype) -> None:
    w = _spectrum(SPECTRA, 7, 5).to(dtype)
    sigma, v = top_singular(w, None, iters=0)  # a cold start runs at least 20 iterations
    assert sigma.dtype == v.dtype == dtype and sigma.shape == (3,)
    _assert_top(sigma, v, w, rel=1e-7 if dtype == torch.float64 else 1e-5)  # 0.6^40 ~ 1e-9 for the worst gap
    again, v_again = top_singular(w, None, iters=20)  # iters=0 and 20 are the same cold start
    torch.testing.assert_close(again, sigma, rtol=0, atol=0)
    torch.testing.assert_close(v_again, v, rtol=0, atol=0)


def test_cold_start_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    w = _spectrum(SPECTRA, 7, 5)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first = top_singular(w, None, iters=2)
    assert torch.equal(torch.rand(3), expected)
    second = top_singular(w, None, iters=2)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_warm_start_from_the_last_check_converges_in_two_iterations_and_keeps_the_sign() -> None:
    w = _spectrum(SPECTRA, 7, 5)
    _, v = top_singular(w, None, iters=100)
    g = torch.Generator().manual_seed(5)
    moved = w + 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64)  # the weights after some steps
    sigma, v_new = top_singular(moved, v, iters=2)
    # v is off by ~1e-3 / (s_1 - s_2), then by (s_2 / s_1)^4 of that; sigma (a Rayleigh quotient) by its square
    _assert_top(sigma, v_new, moved, rel=1e-7)  # 1.3e-9 at worst here
    assert (torch.einsum("bij,bij->b", v, v_new) > 0.99).all()  # the same sign as the previous check's v_1


def test_zero_iterations_evaluate_sigma_at_the_given_vector() -> None:
    w = _spectrum(SPECTRA, 7, 5)
    g = torch.Generator().manual_seed(2)
    v = torch.nn.functional.normalize(torch.randn(3, 5, 1, generator=g, dtype=torch.float64), dim=1)
    sigma, same = top_singular(w, v, iters=0)
    assert torch.equal(same, v)
    np.testing.assert_allclose(sigma.numpy(), np.linalg.norm((w @ v).squeeze(-1).numpy(), axis=1), rtol=1e-12)


def test_a_zero_matrix_gives_sigma_zero_and_a_finite_vector_without_disturbing_the_others() -> None:
    w = _spectrum(SPECTRA, 7, 5)
    w[1] = 0.0
    cold_sigma, cold_v = top_singular(w, None, iters=0)
    g = torch.Generator().manual_seed(3)
    start = torch.nn.functional.normalize(torch.randn(3, 5, 1, generator=g, dtype=torch.float64), dim=1)
    warm_sigma, warm_v = top_singular(w, start, iters=3)
    for sigma, v in ((cold_sigma, cold_v), (warm_sigma, warm_v)):
        assert sigma[1].item() == pytest.approx(0.0, abs=1e-300)
        assert torch.isfinite(v).all() and torch.linalg.vector_norm(v[1]).item() == pytest.approx(1.0, rel=1e-12)
    assert torch.equal(warm_v[1], start[1])  # nothing to iterate on: the start is kept
    _assert_top(cold_sigma[[0, 2]], cold_v[[0, 2]], w[[0, 2]], rel=1e-7)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_weights_give_nan_sigma_and_keep_the_previous_vector(bad: float) -> None:
    w = _spectrum(SPECTRA, 7, 5)
    _, previous = top_singular(w, None, iters=100)
    broken = w.clone()
    broken[2, 3, 1] = bad
    sigma, v = top_singular(broken, previous, iters=2)
    assert math.isnan(sigma[2].item())
    assert torch.equal(v[2], previous[2])  # a finite warm start, for when the weights are finite again
    _assert_top(sigma[:2], v[:2], w[:2], rel=1e-9)  # the other matrices of the batch are unaffected
    recovered, _ = top_singular(w, v, iters=2)
    _assert_top(recovered, v, w, rel=1e-9)


def test_every_weight_infinite_keeps_the_previous_vector() -> None:
    """``W^T W v`` is then all infinite: ``z / ||z||`` would be inf / inf = NaN."""
    w = torch.full((1, 3, 2), float("inf"), dtype=torch.float64)
    previous = torch.tensor([[[0.6], [0.8]]], dtype=torch.float64)
    sigma, v = top_singular(w, previous, iters=2)
    assert not math.isfinite(sigma.item()) and torch.equal(v, previous)


@pytest.mark.parametrize(("sizes", "warm"), [([4, 3], True), ([3, 0, 4], True), ([2, 2, 3], False), ([7, 0], False)])
def test_row_sharded_equals_unsharded(sizes: list[int], warm: bool) -> None:
    """Rows split across 2-3 in-process "ranks" (one with none): every rank gets the unsharded ``(sigma_1, v_1)``."""
    w = _spectrum(SPECTRA, 7, 5)
    start = top_singular(w + 0.05, None, iters=30)[1] if warm else None
    iters = 3
    expected = top_singular(w, start, iters=iters)
    group = ThreadGroup(len(sizes))
    blocks = w.split(sizes, dim=1)
    out = group.run(lambda rank, reduce: top_singular(blocks[rank], start, iters=iters, all_reduce_sum=reduce))
    runs = iters + 1 if warm else max(iters, 20) + 1
    assert group.calls == [runs] * len(sizes)  # one all-reduce per iteration, one for sigma_1
    for sigma, v in out:
        torch.testing.assert_close(sigma, expected[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(v, expected[1], rtol=1e-12, atol=1e-14)
    if not warm:  # 20 cold iterations: the float64 SVD
        _assert_top(out[0][0], out[0][1], w, rel=1e-7)


def test_row_sharded_nonfinite_rows_on_one_rank_give_nan_on_every_rank_and_keep_the_vector() -> None:
    w = _spectrum(SPECTRA, 6, 5)
    w[0, 5, 2] = float("nan")  # a row of rank 1
    _, start = top_singular(_spectrum(SPECTRA, 6, 5), None, iters=30)
    group = ThreadGroup(2)
    blocks = w.split([3, 3], dim=1)
    out = group.run(lambda rank, reduce: top_singular(blocks[rank], start, iters=2, all_reduce_sum=reduce))
    for sigma, v in out:
        assert math.isnan(sigma[0].item()) and torch.equal(v[0], start[0])
        _assert_top(sigma[1:], v[1:], w[1:], rel=1e-9)
