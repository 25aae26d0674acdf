"""The one place training is changed: the non-finite flag, the learning-rate scale and the step control."""

from __future__ import annotations

from typing import Any

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


def test_controls_removed_in_the_order_they_were_installed_leave_no_wrapper():
    """Two monitors' controls on one optimizer, removed bottom first: before, the bottom one's
    wrapper stayed on the optimizer for good (the top one restored it as its ``inner``)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    bottom, top = StepControl(lr_scale=lambda o: 0.5), StepControl(lr_scale=lambda o: 0.5)
    bottom.install([opt])
    top.install([opt])
    bottom.remove()
    top.remove()
    assert "step" not in vars(opt)


class TwiceClosureSGD(torch.optim.SGD):
    """An optimizer that evaluates its closure twice per step (as SAM and line searches do)."""

    def step(self, closure=None):  # type: ignore[override]
        closure()
        return super().step(closure)


def _twice_closure_run(*callbacks: Any) -> tuple[dict[str, torch.Tensor], int]:
    from conftest import TinyModule, make_trainer

    class Module(TinyModule):
        calls = 0

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            type(self).calls += 1
            return super().training_step(batch, batch_idx)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return TwiceClosureSGD(self.parameters(), lr=0.05)

    torch.manual_seed(0)
    module = Module()
    make_trainer(max_steps=4, callbacks=list(callbacks)).fit(module)
    return {k: v.clone() for k, v in module.state_dict().items()}, Module.calls


def test_an_optimizer_that_evaluates_its_closure_again_gets_fresh_evaluations():
    """Before: the step control replayed the first evaluation to every call, so a run that only
    measured (``govern=False``) or never skipped trained differently (4 forwards instead of 8)."""
    from lightning_diag import LossSpikeDetector, StabilityGovernor

    plain, plain_calls = _twice_closure_run()
    for callback in (StabilityGovernor(govern=False, action="log", check_every_n_steps=1),
                     LossSpikeDetector(action="skip")):
        state, calls = _twice_closure_run(callback)
        assert calls >= plain_calls == 8
        assert all(torch.equal(state[k], plain[k]) for k in plain), type(callback).__name__


def test_the_governor_says_once_that_it_cannot_measure_lbfgs_and_does_not_crash_the_run():
    from conftest import TinyModule, make_trainer

    from lightning_diag import StabilityGovernor

    class WithLBFGS(TinyModule):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.LBFGS(self.parameters(), lr=0.1)

    governor = StabilityGovernor(action="log")
    with pytest.warns(UserWarning, match="LBFGS"):
        make_trainer(max_steps=3, callbacks=[governor]).fit(WithLBFGS())
    assert governor.controller.scale == pytest.approx(1.0)
