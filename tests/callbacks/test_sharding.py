"""The sharding helpers on one process: names, parameter resolution, local parts, masks, DeepSpeed.

The multi-process behaviour (FSDP2, HSDP, DDP) is proved in ``tests/distributed``.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_diag.callbacks._sharding import (
    Sharding,
    clean_name,
    count_flagged,
    deepspeed_limitation,
    deepspeed_zero_stage,
    is_row_sharded,
    local_grads,
    mean_over_ranks,
    resolve_parameters,
    sharding_of,
    sum_over_ranks,
    weight_rows,
)
from lightning_diag.metrics.norms import squared_norms
from lightning_diag.metrics.spectral import power_iteration, row_sharded_power_iteration


class Wrapper(nn.Module):
    """Stands for an FSDP1 unit or an activation-checkpoint wrapper: the same child attribute name."""

    def __init__(self, inner: nn.Module, attribute: str) -> None:
        super().__init__()
        setattr(self, attribute, inner)


class Wrapped(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(Wrapper(nn.Linear(3, 4), "_fsdp_wrapped_module"),
                                 Wrapper(Wrapper(nn.Linear(4, 2), "_checkpoint_wrapped_module"),
                                         "_fsdp_wrapped_module"))
        self.frozen = nn.Linear(2, 2).requires_grad_(False)


def _trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)


def test_clean_name_strips_every_wrapper_segment_and_nothing_else():
    assert clean_name("blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module.attn.weight") == "blocks.0.attn.weight"
    assert clean_name("enc._orig_mod.fc.bias") == "enc.fc.bias"
    assert clean_name("module.fsdp_like.weight") == "module.fsdp_like.weight"


def test_resolve_parameters_names_layers_as_the_model_does_and_matches_patterns_on_clean_names():
    groups = resolve_parameters(_trainer(), Wrapped())
    assert groups.layers == ["net.0", "net.1"]
    assert groups.names == ["net.0.weight", "net.0.bias", "net.1.weight", "net.1.bias"]
    only = resolve_parameters(_trainer(), Wrapped(), include=["net.1"], exclude=["*.bias"])
    assert only.names == ["net.1.weight"]


def test_local_grads_stand_in_an_empty_tensor_for_a_missing_gradient():
    a, b = nn.Parameter(torch.ones(2, 3)), nn.Parameter(torch.ones(4))
    a.grad = torch.full((2, 3), 2.0)
    grads = local_grads([a, b])
    assert grads[0] is a.grad and grads[1].shape == (0,) and grads[1].dtype == b.dtype
    assert squared_norms(grads).tolist() == pytest.approx([24.0, 0.0], rel=1e-6, abs=1e-12)


def test_one_process_sharding_is_none_and_never_reduces():
    params = list(nn.Linear(3, 2).parameters())
    sharding = sharding_of(_trainer(), params)
    assert sharding.kind == "none" and not sharding.reduces and sharding.owned is None
    squares = torch.tensor([9.0, 16.0])
    assert sharding.global_squares(squares, torch.tensor([0, 0]), 1).sqrt().item() == pytest.approx(5.0, rel=1e-6)
    values = torch.ones(3)
    assert sum_over_ranks(values) is values and mean_over_ranks(values) is values


def test_keep_owned_zeroes_replicas_without_letting_their_nan_through():
    sharding = Sharding("dtensor", owned=(True, False, True))
    squares = torch.tensor([4.0, float("nan"), float("inf")])
    kept = sharding.keep_owned(squares)
    assert kept[0].item() == pytest.approx(4.0, rel=1e-6) and kept[1].item() == pytest.approx(0.0, abs=1e-30)
    assert kept[2].item() == float("inf")
    assert sharding.count_nonfinite(squares).item() == pytest.approx(1.0, abs=1e-6)  # the replica's NaN is not ours
    assert [sharding.owns(i) for i in range(3)] == [True, False, True]


@pytest.mark.parametrize("owned", [(True, True, True), (True, False, True)], ids=["fsdp2", "replicated-second"])
def test_a_parameter_nonfinite_on_both_of_two_shards_is_counted_once(owned):
    """Two simulated FSDP2 ranks, each holding half the rows of three parameters: the first is NaN on
    both shards, the second inf on rank 1's only, the third finite. Before: each rank counted its own
    bad pieces and the all-reduce summed them, so the first parameter counted twice (3 instead of 2)."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.full((4, 3), float("nan")), torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    grads[1][3, 0] = float("inf")  # a row of rank 1's shard
    ranks = [[t.chunk(2)[r] for t in grads] for r in range(2)]
    sharding = Sharding("dtensor", owned=owned)
    # the packed vector each rank hands the SUM all-reduce, and the sum that comes back
    summed = sum(sharding.nonfinite_flags(squared_norms(local)) for local in ranks)
    expected = sum(sharding.owns(i) and not torch.isfinite(t).all().item() for i, t in enumerate(grads))
    assert count_flagged(summed).item() == pytest.approx(float(expected), abs=1e-9)
    assert expected == (2 if owned[1] else 1)
    # the per-rank count, summed over ranks, is what over-counted
    assert sum(sharding.count_nonfinite(squared_norms(local)).item() for local in ranks) == pytest.approx(
        float(expected + 1), abs=1e-9)


def test_weight_rows_and_row_sharding_of_plain_weights():
    w = torch.randn(5, 3)
    assert is_row_sharded(w) and not is_row_sharded(torch.randn(5))
    assert weight_rows(w, owned=True) is w and weight_rows(w, owned=False).shape == (0, 3)


def test_deepspeed_is_detected_from_the_strategy_and_explained_once():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = object.__new__(DeepSpeedStrategy)  # no deepspeed needed to recognise the strategy
    strategy.config = {"zero_optimization": {"stage": 2}}
    assert deepspeed_zero_stage(SimpleNamespace(strategy=strategy)) == 2  # type: ignore[arg-type]
    assert deepspeed_zero_stage(_trainer()) is None
    assert sharding_of(SimpleNamespace(strategy=strategy), []).kind == "deepspeed"  # type: ignore[arg-type]
    message = deepspeed_limitation(2, "gradient norms")
    assert "p.grad is None" in message and "gradient norms are not measured" in message
    assert "weights are partitioned" in deepspeed_limitation(3) and "weights" not in message


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_helpers_and_sharded_math_never_sync_with_the_host_on_cuda():
    params = [nn.Parameter(torch.randn(64, 32, device="cuda")), nn.Parameter(torch.randn(32, device="cuda"))]
    for p in params:
        p.grad = torch.randn_like(p)
    sharding = Sharding("dtensor", owned=(True, False))
    sharding._mask(torch.device("cuda", torch.cuda.current_device()))  # as sharding_of does at set-up
    index = torch.tensor([0, 0], device="cuda")
    v0 = torch.randn(32, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        squares = sharding.global_squares(squared_norms(local_grads(params)), index, 1)
        sharding.count_nonfinite(squares)
        sigma, _, v = row_sharded_power_iteration(weight_rows(params[0], True), v0, iters=3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert squares.item() == pytest.approx(params[0].grad.double().square().sum().item(), rel=1e-5)
    assert sigma.item() == pytest.approx(power_iteration(params[0].detach(), v0, iters=3)[0].item(), rel=1e-5)
