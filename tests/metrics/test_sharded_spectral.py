"""Row-sharded power iteration and summable SA moments equal their unsharded counterparts.

The ranks are simulated by threads that meet in a barrier-based all-reduce: each "rank" runs the
real function on its rows, and every call of ``all_reduce_sum`` returns the sum over ranks, as
``torch.distributed.all_reduce`` would.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest
import torch

from lightning_diag.metrics.spectral import (
    alignment_moments,
    alignment_summary,
    power_iteration,
    row_sharded_power_iteration,
    summary_from_moments,
)


class ThreadGroup:
    """``world`` threads that sum tensors over each other (an in-process fake all-reduce)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.calls = [0] * world

    def reducer(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = torch.stack(self.slots).sum(0)  # type: ignore[arg-type]
            self.barrier.wait()  # nobody overwrites a slot before everyone has read them all
            return total

        return all_reduce_sum

    def run(self, fn: Callable[[int, Callable[[torch.Tensor], torch.Tensor]], object]) -> list[object]:
        results: list[object] = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.reducer(rank))
            except BaseException as e:  # noqa: BLE001 (re-raised below)
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return results


def _rows(w: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split the rows (dim -2) of ``w`` into consecutive blocks of the given sizes (0 allowed)."""
    return list(w.split(sizes, dim=-2))


def _matrix(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


@pytest.mark.parametrize(
    ("shape", "sizes"),
    [((6, 4), [3, 3]), ((7, 5), [4, 3]), ((5, 8), [2, 2, 1]), ((3, 6, 5), [4, 2]), ((1, 5), [1, 0]),
     ((2, 9, 3), [3, 0, 6])],
)
def test_row_sharded_power_iteration_equals_unsharded(shape, sizes):
    w = _matrix(shape)
    v0 = _matrix(shape[:-2] + shape[-1:], seed=1)
    ref = power_iteration(w, v0, iters=3)
    group = ThreadGroup(len(sizes))
    blocks = _rows(w, sizes)
    out = group.run(lambda rank, reduce: row_sharded_power_iteration(blocks[rank], v0, iters=3, all_reduce_sum=reduce))
    assert group.calls == [3 + 1] * len(sizes)  # one all-reduce per iteration, one for sigma_1
    for sigma, u_local, v in out:
        torch.testing.assert_close(sigma, ref[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v, ref[2], rtol=1e-5, atol=1e-6)
    u = torch.cat([o[1] for o in out], dim=-1)  # the ranks' rows of u_1, in row order
    torch.testing.assert_close(u, ref[1], rtol=1e-5, atol=1e-6)


def test_row_sharded_cold_start_converges_to_the_float64_svd():
    w = _matrix((8, 6), seed=3).double()
    group = ThreadGroup(3)
    blocks = _rows(w, [3, 3, 2])
    out = group.run(lambda rank, reduce: row_sharded_power_iteration(blocks[rank], iters=60, all_reduce_sum=reduce))
    s = torch.linalg.svdvals(w)[0].item()
    for sigma, _, v in out:
        assert math.isclose(sigma.item(), s, rel_tol=1e-8)
        _, _, vh = torch.linalg.svd(w)
        assert math.isclose(abs(torch.dot(v, vh[0]).item()), 1.0, rel_tol=1e-8)


def test_row_sharded_without_reducer_equals_power_iteration():
    w = _matrix((4, 7, 5), seed=2)
    for got, ref in zip(row_sharded_power_iteration(w, iters=4), power_iteration(w, iters=4)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_row_sharded_zero_matrix_gives_zero_sigma_and_keeps_the_start():
    v0 = torch.tensor([3.0, 4.0])
    group = ThreadGroup(2)
    blocks = _rows(torch.zeros(3, 2), [2, 1])
    out = group.run(lambda rank, reduce: row_sharded_power_iteration(blocks[rank], v0, iters=2, all_reduce_sum=reduce))
    for sigma, u, v in out:
        assert sigma.item() == pytest.approx(0.0, abs=1e-30)
        assert torch.isfinite(u).all() and u.abs().sum().item() == pytest.approx(0.0, abs=1e-30)
        torch.testing.assert_close(v, torch.tensor([0.6, 0.8]))


def test_row_sharded_nonfinite_shard_gives_nan_sigma_on_every_rank():
    w = _matrix((4, 3))
    w[3, 0] = float("nan")
    group = ThreadGroup(2)
    blocks = _rows(w, [2, 2])
    out = group.run(lambda rank, reduce: row_sharded_power_iteration(blocks[rank], iters=2, all_reduce_sum=reduce))
    assert all(math.isnan(sigma.item()) for sigma, _, _ in out)


def test_row_sharded_rejects_bad_arguments():
    with pytest.raises(ValueError, match="local_rows"):
        row_sharded_power_iteration(torch.ones(3))
    with pytest.raises(ValueError, match="iters"):
        row_sharded_power_iteration(torch.ones(2, 2), iters=-1)
    with pytest.raises(ValueError, match="v0"):
        row_sharded_power_iteration(torch.ones(2, 3), torch.ones(2))


@pytest.mark.parametrize("sizes", [[5, 5], [7, 2, 1], [10, 0]])
def test_summed_moments_give_the_summary_of_all_values(sizes):
    g = torch.Generator().manual_seed(4)
    a = torch.rand(3, sum(sizes), generator=g) * 2 - 1
    a[0, :4] = 0.0  # zero rows count in n but in no sign
    a[2] = a[2].abs()  # one layer fully collapsed
    summed = sum(alignment_moments(part) for part in a.split(sizes, dim=-1))
    got, ref = summary_from_moments(summed), alignment_summary(a)
    for name in ref._fields:
        torch.testing.assert_close(getattr(got, name).float(), getattr(ref, name), rtol=1e-5, atol=1e-6)


def test_moments_without_sign_or_values_are_nan_not_healthy():
    no_sign = summary_from_moments(alignment_moments(torch.zeros(4)))
    assert math.isnan(no_sign.sign_diversity.item()) and math.isnan(no_sign.collapse.item())
    assert no_sign.mean_abs.item() == pytest.approx(0.0, abs=1e-30)
    empty = summary_from_moments(alignment_moments(torch.zeros(0)))
    assert math.isnan(empty.mean_abs.item()) and math.isnan(empty.std.item())
    nan = summary_from_moments(alignment_moments(torch.tensor([0.5, float("nan")])))
    assert math.isnan(nan.mean_abs.item()) and math.isnan(nan.std.item())


def test_summary_from_moments_rejects_bad_shapes():
    with pytest.raises(ValueError, match="moments"):
        summary_from_moments(torch.ones(5))
