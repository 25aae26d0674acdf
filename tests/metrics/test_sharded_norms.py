"""Squared norms of local shards add up to the norms of the unsharded tensors."""

import math

import numpy as np
import pytest
import torch

from lightning_diag.metrics.norms import grouped_norms, grouped_squares, squared_norms, tensor_norms


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g), torch.randn(5, generator=g), torch.randn(1, 3, generator=g),
            torch.randn(9, 4, generator=g).to(torch.bfloat16)]


@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_squared_norms_of_row_shards_sum_to_the_float64_norms(shards):
    params = _params()
    index = torch.tensor([0, 0, 1, 2])
    # torch.chunk splits unevenly and leaves trailing ranks empty (1 row over 2+ ranks), like FSDP2.
    local = [[p.chunk(shards)[r] if r < len(p.chunk(shards)) else p[:0] for p in params] for r in range(shards)]
    summed = sum(grouped_squares(squared_norms(ts), index, 3) for ts in local)
    for group in range(3):
        members = [p.double().flatten() for p, i in zip(params, index.tolist()) if i == group]
        ref = torch.linalg.vector_norm(torch.cat(members)).item()
        assert math.isclose(summed[group].sqrt().item(), ref, rel_tol=1e-5, abs_tol=0)


def test_squared_norms_are_float64_squares_of_tensor_norms_and_zero_when_empty():
    params = [*_params(1), torch.ones(0, 3)]
    got = squared_norms(params)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, tensor_norms(params).square())
    assert got[-1].item() == pytest.approx(0.0, abs=1e-30)


def test_grouped_squares_then_sqrt_equals_grouped_norms():
    norms = tensor_norms(_params(2))
    index = torch.tensor([1, 0, 1, 1])
    torch.testing.assert_close(grouped_squares(norms.square(), index, 3).sqrt(), grouped_norms(norms, index, 3))


def test_nonfinite_shard_makes_the_sum_nonfinite():
    summed = squared_norms([torch.tensor([1.0, float("nan")])]) + squared_norms([torch.ones(2)])
    assert not torch.isfinite(summed).any()


def test_grouped_squares_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        grouped_squares(torch.ones(3), torch.zeros(2, dtype=torch.long), 1)


def test_squared_norms_of_huge_finite_shards_stay_finite_and_sum_to_the_float64_norm():
    """Before: float32 squares overflowed from norms of about 1.8e19 (a finite 1e20 gradient gave inf)."""
    g = torch.Generator().manual_seed(4)
    whole = torch.randn(6, 5, generator=g) * 1e20
    summed = sum(squared_norms([piece]) for piece in whole.chunk(2))  # two ranks' rows, summed by the all-reduce
    assert torch.isfinite(summed).all()
    assert math.sqrt(summed.item()) == pytest.approx(float(np.sqrt(np.sum(whole.double().numpy() ** 2))), rel=1e-6)
