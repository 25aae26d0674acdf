import math

import numpy as np
import pytest
import torch

from lightning_diag.metrics.norms import count_nonfinite, grouped_norms, tensor_norms, total_norm


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(7, 5, generator=g),
        torch.randn(11, generator=g),
        torch.randn(3, 2, 5, 5, generator=g).to(torch.float16),
        torch.randn(13, 3, generator=g).to(torch.bfloat16),
        torch.randn(1, generator=g).double(),
    ]


def test_tensor_norms_match_float64_reference():
    tensors = _tensors()
    expected = torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])
    got = tensor_norms(tensors)
    assert got.dtype == torch.float64 and got.shape == (len(tensors),)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=0)


def test_grouped_and_total_norms_match_float64_reference():
    tensors = _tensors(1)
    index = torch.tensor([2, 0, 2, 1, 0])
    norms = tensor_norms(tensors)
    per_group = grouped_norms(norms, index, 4)
    for group in range(4):
        members = [t.double().flatten() for t, i in zip(tensors, index.tolist()) if i == group]
        ref = torch.linalg.vector_norm(torch.cat(members)) if members else torch.tensor(0.0, dtype=torch.float64)
        assert math.isclose(per_group[group].item(), ref.item(), rel_tol=1e-6, abs_tol=0)
    everything = torch.cat([t.double().flatten() for t in tensors])
    assert math.isclose(total_norm(norms).item(), torch.linalg.vector_norm(everything).item(), rel_tol=1e-6)


def test_fp16_tensor_does_not_overflow_in_norm():
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # sum of squares overflows fp16
    assert math.isclose(tensor_norms([big]).item(), 60000.0 * math.sqrt(1000), rel_tol=1e-3)


def test_nonfinite_entries_give_nonfinite_norms_and_are_counted():
    a, b, c = torch.ones(4), torch.tensor([1.0, float("nan"), 2.0]), torch.tensor([float("inf"), -float("inf")])
    norms = tensor_norms([a, b, c])
    assert torch.isfinite(norms).tolist() == [True, False, False]
    assert count_nonfinite([a, b, c]).item() == 3
    assert count_nonfinite([]).item() == 0


def test_sparse_tensors_are_normed_like_their_dense_form():
    dense = torch.zeros(6, 4)
    dense[1] = torch.arange(4.0)
    dense[4] = -2.0
    sparse = dense.to_sparse()
    got = tensor_norms([torch.ones(3), sparse])
    assert math.isclose(got[1].item(), torch.linalg.vector_norm(dense.double()).item(), rel_tol=1e-6)
    assert math.isclose(got[0].item(), math.sqrt(3), rel_tol=1e-6)


def test_empty_inputs():
    assert tensor_norms([]).numel() == 0
    assert total_norm(tensor_norms([])).item() == 0.0


def test_grouped_norms_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        grouped_norms(torch.ones(3), torch.zeros(2, dtype=torch.long), 1)


@pytest.mark.parametrize("scale", [1e19, 1e20, 1e30, 1e38])
def test_finite_tensors_whose_float32_squares_overflow_get_finite_exact_norms(scale):
    """Before: norms were accumulated in float32, so any tensor norm above about 1.8e19 read as inf."""
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(5, 4, generator=g) * scale, torch.randn(7, generator=g).to(torch.bfloat16) * 1e19]
    assert all(torch.isfinite(t).all() for t in tensors)
    got = tensor_norms(tensors)
    expected = [np.sqrt(np.sum(t.double().numpy() ** 2)) for t in tensors]  # float64 numpy: no overflow
    assert torch.isfinite(got).all()
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert total_norm(got).item() == pytest.approx(float(np.sqrt(np.sum(np.square(expected)))), rel=1e-6)
    grouped = grouped_norms(got, torch.tensor([0, 0]), 1)
    assert grouped.item() == pytest.approx(float(np.sqrt(np.sum(np.square(expected)))), rel=1e-6)
