"""The one place training is changed: the non-finite flag, the learning-rate scale and the step control."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_diag.callbacks._interventions import StepControl, nonfinite_count, scaled_learning_rates


def _reference_count(tensors: list[torch.Tensor]) -> int:
    return sum(not np.isfinite(t.to_dense().double().numpy()).all() for t in tensors)


def test_nonfinite_count_flags_nan_and_inf_but_not_huge_finite_values_sparse_or_empty():
    huge = torch.full((3, 3), 3e38)  # its float32 squares overflow: a float32 2-norm would read inf
    sparse_nan = torch.sparse_coo_tensor([[0, 2]], [1.0, float("nan")], (4,))
    tensors = [huge, torch.tensor([1.0, float("inf")]), torch.zeros(0), sparse_nan, torch.tensor([-float("inf")]),
               torch.randn(5), torch.sparse_coo_tensor([[1]], [2.0], (4,))]
    assert float(nonfinite_count(tensors)) == _reference_count(tensors) == 3
    assert float(nonfinite_count([huge])) == 0.0 and float(nonfinite_count([])) == 0.0


def test_a_scale_of_one_touches_nothing_and_any_other_is_undone_exactly_float_and_tensor_lr():
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([{"params": [w], "lr": 0.3}, {"params": [torch.zeros(1, requires_grad=True)],
                                                         "lr": torch.tensor(0.7)}])
    tensor_lr = opt.param_groups[1]["lr"]
    with scaled_learning_rates(opt, 1.0):
        assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[1]["lr"] is tensor_lr
    with scaled_learning_rates(opt, 0.1):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.03) and float(tensor_lr) == pytest.approx(0.07)
    assert opt.param_groups[0]["lr"] == 0.3 and opt.param_groups[1]["lr"] is tensor_lr  # the same tensor object
    assert torch.equal(tensor_lr, torch.tensor(0.7))  # restored bit for bit


def test_chained_controls_multiply_their_scales_and_a_skip_leaves_the_weights_alone():
    w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=1.0)
    outer, inner = StepControl(lr_scale=lambda o: 0.5), StepControl(lr_scale=lambda o: 0.2)
    inner.install([opt])
    outer.install([opt])
    w.grad = torch.ones(1)
    opt.step()
    assert float(w) == pytest.approx(1.0 - 0.1) and opt.param_groups[0]["lr"] == 1.0
    skip = StepControl(skip=lambda o: True)
    skip.install([opt])
    opt.step()
    assert float(w) == pytest.approx(0.9)
    for control in (skip, outer, inner):
        control.remove()
    assert "step" not in vars(opt)  # every wrapper gone
